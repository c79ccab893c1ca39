//! Integration tests of `perfbox::buildkit` against the real rootless buildkitd that
//! `scripts/setup` runs (socket `/run/perfbox/buildkit/buildkitd.sock`). Nothing is mocked.
//!
//! The trials run one at a time, in order, whatever `--test-threads` says: they share one daemon,
//! some compare timings, and the last one stops and restarts the daemon.
//! A missing daemon is a failure (setup is required), never a silent pass.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use perfbox::buildkit::{
    BuildError, BuildNetwork, BuildRequest, BuildkitClient, BuiltImage, ExportError, MemoryLog,
    SourcePolicy, unpack_tar,
};

mod common;

/// The rootless buildkitd of the setup under test.
fn socket() -> String {
    common::buildkit_socket()
}

fn addr() -> String {
    format!("unix://{}", socket())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Fail (not skip) when setup has not provided a daemon.
fn require_daemon(rt: &tokio::runtime::Runtime) -> BuildkitClient {
    assert!(
        Path::new(&socket()).exists(),
        "buildkitd socket {} is missing: run `sudo scripts/setup` (README, Quick start) first",
        socket()
    );
    rt.block_on(async {
        let client = BuildkitClient::connect(&addr()).await.expect("client");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match client.health().await {
                Ok(_) => return client,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for buildkitd: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => panic!(
                    "buildkitd at {} does not answer (run scripts/setup): {e}",
                    socket()
                ),
            }
        }
    })
}

fn nonce() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

/// A build of `dockerfile` into `dir/rootfs`, allowed images from the setup's registry.
fn request(dockerfile: &str, dir: &Path) -> BuildRequest {
    let mut req = BuildRequest::new(dockerfile.as_bytes().to_vec(), dir.join("rootfs"));
    req.source_policy = SourcePolicy::new(&[common::registry()]).expect("registry");
    req
}

fn read(rootfs: &Path, rel: &str) -> String {
    std::fs::read_to_string(rootfs.join(rel))
        .unwrap_or_else(|e| panic!("{rel} in {}: {e}", rootfs.display()))
}

fn build_ok(
    rt: &tokio::runtime::Runtime,
    client: &BuildkitClient,
    req: BuildRequest,
) -> BuiltImage {
    let log = MemoryLog::new();
    match rt.block_on(client.build(req, log.clone())) {
        Ok(img) => img,
        Err(e) => panic!("build failed: {e}\nlog:\n{}", log.lines().join("\n")),
    }
}

// ---- 1 ----
fn run_and_cmd() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let dir = tempfile::tempdir()?;
    let img = build_ok(
        &rt,
        &client,
        request(
            "FROM busybox\nRUN echo built > /built\nCMD [\"cat\",\"/built\"]\n",
            dir.path(),
        ),
    );
    assert_eq!(read(&img.rootfs, "built"), "built\n");
    assert!(
        img.rootfs.join("bin/busybox").exists(),
        "busybox binary unpacked"
    );
    assert!(
        !img.rootfs.join("Dockerfile").exists(),
        "the Dockerfile is not part of the image"
    );
    assert_eq!(
        img.config.cmd,
        Some(vec!["cat".to_owned(), "/built".to_owned()])
    );
    assert_eq!(
        img.total_steps, 1,
        "one RUN step (FROM is a source, CMD is metadata): {img:?}"
    );
    assert!(img.export_bytes > 500_000, "{img:?}");
    assert!(
        img.config_digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    eprintln!(
        "  build {:?}, export {} bytes in {:?} ({:.0} MB/s)",
        img.duration,
        img.export_bytes,
        img.export_duration,
        img.export_mb_per_s()
    );
    Ok(())
}

// ---- 2 ----
fn multi_stage_copy_from_and_user() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let dir = tempfile::tempdir()?;
    let df = format!(
        "FROM busybox AS build\nRUN echo stage0-{n} > /artifact\n\
         FROM busybox\nCOPY --from=0 /artifact /copied\nUSER 1000\nENV MODE=test\nWORKDIR /work\n\
         ENTRYPOINT [\"/bin/sh\",\"-c\"]\nCMD [\"cat /copied\"]\n",
        n = nonce()
    );
    let img = build_ok(&rt, &client, request(&df, dir.path()));
    assert!(read(&img.rootfs, "copied").starts_with("stage0-"));
    assert_eq!(img.config.user.as_deref(), Some("1000"));
    assert_eq!(img.config.working_dir.as_deref(), Some("/work"));
    assert!(
        img.config
            .env
            .as_ref()
            .is_some_and(|e| e.iter().any(|v| v == "MODE=test"))
    );
    assert_eq!(img.config.argv(), vec!["/bin/sh", "-c", "cat /copied"]);
    assert!(img.rootfs.join("work").is_dir());
    Ok(())
}

// ---- build args, target ----
fn build_args_and_target() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let dir = tempfile::tempdir()?;
    let df = "FROM busybox AS first\nARG GREETING=default\nRUN echo \"$GREETING\" > /greeting\n\
              FROM busybox AS second\nRUN echo second > /second\n";
    let mut req = request(df, dir.path());
    req.build_args = BTreeMap::from([("GREETING".to_owned(), format!("hello-{}", nonce()))]);
    req.target = Some("first".to_owned());
    req.platform = Some("linux/amd64".to_owned());
    let img = build_ok(&rt, &client, req);
    assert!(read(&img.rootfs, "greeting").starts_with("hello-"));
    assert!(
        !img.rootfs.join("second").exists(),
        "target stops at stage `first`"
    );
    Ok(())
}

// ---- 3 ----
fn second_build_is_cached_and_quicker() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let df = format!(
        "FROM busybox\nRUN echo cold-{} > /nonce && sleep 1\nRUN echo two > /two\n",
        nonce()
    );
    let d1 = tempfile::tempdir()?;
    let cold = build_ok(&rt, &client, request(&df, d1.path()));
    let d2 = tempfile::tempdir()?;
    let log = MemoryLog::new();
    let warm = rt
        .block_on(client.build(request(&df, d2.path()), log.clone()))
        .map_err(|e| format!("warm build: {e}"))?;
    let warm_log = log.lines().join("\n");
    eprintln!(
        "  cold {:?} ({}/{} cached), warm {:?} ({}/{} cached)",
        cold.duration,
        cold.cached_steps,
        cold.total_steps,
        warm.duration,
        warm.cached_steps,
        warm.total_steps
    );
    assert_eq!(cold.total_steps, 2);
    assert!(
        cold.cached_steps < cold.total_steps,
        "first build must run the RUN steps"
    );
    assert_eq!(warm.total_steps, 2);
    assert_eq!(
        warm.cached_steps, warm.total_steps,
        "second build: every step cached; log:\n{warm_log}"
    );
    assert!(
        warm.duration < cold.duration,
        "warm {:?} >= cold {:?}",
        warm.duration,
        cold.duration
    );
    assert_eq!(read(&warm.rootfs, "nonce"), read(&cold.rootfs, "nonce"));
    Ok(())
}

// ---- 4 ----
fn errors_are_typed() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let build_err = |df: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = MemoryLog::new();
        let r = rt.block_on(client.build(request(df, dir.path()), log.clone()));
        match r {
            Ok(_) => panic!("build of {df:?} succeeded"),
            Err(e) => (e, log.lines()),
        }
    };

    let (e, _) = build_err("FRM busybox\n");
    match &e {
        BuildError::DockerfileSyntax { line, message } => {
            assert_eq!(*line, Some(1), "{e}");
            assert!(message.contains("unknown instruction: FRM"), "{message}");
        }
        other => panic!("syntax error gave {other:?}"),
    }

    let (e, log) = build_err(&format!(
        "FROM busybox\nRUN echo before-{} && exit 3\n",
        nonce()
    ));
    match &e {
        BuildError::RunFailed {
            message,
            exit_code,
            line,
        } => {
            assert_eq!(*exit_code, Some(3), "{e}");
            assert_eq!(*line, Some(2), "{e}");
            assert!(
                message.contains("did not complete successfully: exit code: 3"),
                "{message}"
            );
        }
        other => panic!("failing RUN gave {other:?}"),
    }
    assert!(
        log.iter().any(|l| l.contains("before-")),
        "RUN output in the log: {log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("ERROR:")),
        "vertex error in the log: {log:?}"
    );

    let (e, _) = build_err("FROM nosuchimage-xyz\nRUN true\n");
    match &e {
        BuildError::BaseImageNotFound { image, message } => {
            assert!(image.contains("nosuchimage-xyz"), "{image}");
            assert!(!message.is_empty());
        }
        other => panic!("unknown base image gave {other:?}"),
    }
    Ok(())
}

// ---- 6 ----
fn parallel_builds_share_one_client() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let dir = tempfile::tempdir()?;
    let n = nonce();
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..4 {
            let client = client.clone();
            let df = format!("FROM busybox\nRUN echo par-{i}-{n} > /which\n");
            let mut req = request(&df, dir.path());
            req.rootfs_dir = dir.path().join(format!("rootfs{i}"));
            set.spawn(async move { (i, client.build(req, MemoryLog::new()).await) });
        }
        set.join_all().await
    });
    assert_eq!(results.len(), 4);
    for (i, r) in results {
        let img = r.unwrap_or_else(|e| panic!("parallel build {i}: {e}"));
        assert_eq!(read(&img.rootfs, "which"), format!("par-{i}-{n}\n"));
    }
    Ok(())
}

// ---- 7 ----
fn run_steps_have_no_network() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (accepted, stop) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if listener.accept().is_ok() {
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let df = format!(
        "FROM busybox\nRUN echo {n}; (nc -w 2 127.0.0.1 {port} </dev/null && echo reached || echo blocked) > /net; \
         cat /proc/net/dev > /netdev; (ip -o link 2>&1 || true) > /iplink\n",
        n = nonce()
    );
    let dir = tempfile::tempdir()?;
    let img = build_ok(&rt, &client, request(&df, dir.path()));
    let net = read(&img.rootfs, "net");
    let netdev = read(&img.rootfs, "netdev");
    let iplink = read(&img.rootfs, "iplink");

    // Control: the same probe reports "reached" for a listener in the RUN step's own network
    // namespace, so "blocked" above is a real refusal, not a broken probe.
    let control_dir = tempfile::tempdir()?;
    let control_df = format!(
        "FROM busybox\nRUN echo control-{n}; (nc -l -p 7777 </dev/null >/dev/null 2>&1 &); sleep 1; \
         (nc -w 2 127.0.0.1 7777 </dev/null && echo reached || echo blocked) > /net\n",
        n = nonce()
    );
    let control_img = build_ok(&rt, &client, request(&control_df, control_dir.path()));
    // The opt-in sandbox network is the host's network on this machine (rootlesskit --net=host).
    // A daemon that gives RUN steps cgroups of their own (--oci-worker-rootless=false) cannot
    // start a RUN step there at all; a plain rootless one can, and then reaches the listener.
    let host_dir = tempfile::tempdir()?;
    let mut host_net = request(
        &df.replace("RUN echo ", "RUN echo host-net-"),
        host_dir.path(),
    );
    host_net.network = BuildNetwork::Sandbox;
    let host_net = rt.block_on(client.build(host_net, MemoryLog::new()));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let _ = watcher.join();

    assert_eq!(
        net.trim(),
        "blocked",
        "RUN reached the host's 127.0.0.1:{port}"
    );
    let ifaces: Vec<&str> = netdev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"], "/proc/net/dev:\n{netdev}");
    assert!(iplink.contains("lo"), "{iplink}");
    assert!(!iplink.contains("eth0"), "{iplink}");
    assert_eq!(
        read(&control_img.rootfs, "net").trim(),
        "reached",
        "control build"
    );
    if daemon_separates_run_steps() {
        let e = host_net.expect_err("a RUN step in the host's network namespace must not start");
        eprintln!("  host network refused: {e}");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "nothing reached the host"
        );
    } else {
        let img = host_net.map_err(|e| format!("host-network build: {e}"))?;
        assert_eq!(
            read(&img.rootfs, "net").trim(),
            "reached",
            "host-network control"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "only the host-network control connected"
        );
    }
    Ok(())
}

/// Whether the main buildkitd runs with `--oci-worker-rootless=false` (scripts/services does
/// where RUN steps get cgroups of their own).
fn daemon_separates_run_steps() -> bool {
    common::main_buildkitd_pids().iter().any(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("--oci-worker-rootless=false"))
            .unwrap_or(false)
    })
}

// ---- 8 ----
fn hostile_tar_never_escapes() -> Result<(), Failed> {
    fn raw_header(path: &str, kind: tar::EntryType, size: u64, link: Option<&str>) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            let ln = &mut h.as_old_mut().linkname;
            ln.fill(0);
            ln[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        h
    }
    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, k, d, l) in entries {
            b.append(&raw_header(p, *k, d.len() as u64, *l), *d)
                .expect("append");
        }
        b.into_inner().expect("tar")
    }

    let root = tempfile::tempdir()?;
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside)?;
    let outside_s = outside.to_str().ok_or("utf8")?.to_owned();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            tar_of(&[("../x", tar::EntryType::Regular, b"evil", None)]),
        ),
        (
            "dotdot-deep",
            tar_of(&[("a/../../x", tar::EntryType::Regular, b"evil", None)]),
        ),
        (
            "symlink-parent",
            tar_of(&[
                ("d", tar::EntryType::Symlink, b"", Some(&outside_s)),
                ("d/file", tar::EntryType::Regular, b"evil", None),
            ]),
        ),
        (
            "symlink-relative-parent",
            tar_of(&[
                ("e", tar::EntryType::Symlink, b"", Some("../outside")),
                ("e/file", tar::EntryType::Regular, b"evil", None),
            ]),
        ),
        (
            "hardlink-out",
            tar_of(&[(
                "h",
                tar::EntryType::Link,
                b"",
                Some(&format!("{outside_s}/target")),
            )]),
        ),
    ];
    for (name, tar) in cases {
        let dst = root.path().join(format!("rootfs-{name}"));
        std::fs::create_dir(&dst)?;
        let r = unpack_tar(tar.as_slice(), &dst);
        assert!(r.is_err(), "{name}: hostile tar was accepted");
        if name != "hardlink-out" {
            assert!(
                matches!(r, Err(ExportError::UnsafeEntry { .. })),
                "{name}: {r:?}"
            );
        }
        assert!(!root.path().join("x").exists(), "{name} wrote ../x");
        let escaped: Vec<_> = std::fs::read_dir(&outside)?.collect();
        assert!(
            escaped.is_empty(),
            "{name} wrote into {outside_s}: {escaped:?}"
        );
    }

    // Absolute paths are re-rooted inside the target.
    let dst = root.path().join("rootfs-abs");
    std::fs::create_dir(&dst)?;
    let abs_target = format!("{outside_s}/abs");
    let tar = tar_of(&[(abs_target.as_str(), tar::EntryType::Regular, b"in", None)]);
    unpack_tar(tar.as_slice(), &dst)?;
    assert!(!outside.join("abs").exists(), "absolute path escaped");
    let mut inside = String::new();
    std::fs::File::open(dst.join(abs_target.trim_start_matches('/')))?
        .read_to_string(&mut inside)?;
    assert_eq!(inside, "in");
    Ok(())
}

// ---- 9 ----
fn cancellation_stops_the_solve() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    for how in ["token", "drop"] {
        let secs = if how == "token" { 47 } else { 53 };
        let marker = format!("sleep {secs}");
        let df = format!("FROM busybox\nRUN echo {} && sleep {secs}\n", nonce());
        let dir = tempfile::tempdir()?;
        let req = request(&df, dir.path());
        let cancel = req.cancel.clone();
        let log = MemoryLog::new();
        let (result, cancelled_at) = rt.block_on(async {
            // Boxed so that `drop(build)` below really drops the future.
            let mut build = Box::pin(client.build(req, log.clone()));
            // Wait until the RUN process exists on the host, then one more second.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                tokio::select! {
                    r = &mut build => panic!("build ended before cancel: {r:?}"),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if !processes_with(&marker).is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "RUN never started: {:?}",
                    log.lines()
                );
            }
            tokio::select! {
                r = &mut build => panic!("build ended before cancel: {r:?}"),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let at = Instant::now();
            if how == "token" {
                cancel.cancel();
                (Some(build.await), at)
            } else {
                drop(build);
                (None, at)
            }
        });
        let returned_in = cancelled_at.elapsed();
        if let Some(r) = result {
            assert!(matches!(r, Err(BuildError::Cancelled)), "{how}: {r:?}");
            assert!(
                returned_in < Duration::from_secs(2),
                "{how}: returned after {returned_in:?}"
            );
        }
        // The daemon must kill the RUN process, not let it sleep on.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !processes_with(&marker).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{how}: `{marker}` still running 5 s after cancel: the daemon did not cancel"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "  {how}: RUN process gone {:?} after cancel",
            cancelled_at.elapsed()
        );
    }
    // The client still works afterwards.
    let dir = tempfile::tempdir()?;
    build_ok(
        &rt,
        &client,
        request("FROM busybox\nRUN echo after > /after\n", dir.path()),
    );
    Ok(())
}

fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = vec![];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.trim_end() == marker {
                found.push(pid);
            }
        }
    }
    found
}

// ---- 5 (runs last: it stops the daemon) ----
fn services(action: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/services");
    let out = Command::new("bash")
        .arg(&script)
        .args([action, "buildkitd"])
        .output()
        .expect("run scripts/services");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts buildkitd again however the test ends.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let out = services("start");
        eprintln!("  restored buildkitd: {}", out.trim());
        // Later tests (and test binaries) find it answering, not starting.
        common::require_buildkitd(&socket());
    }
}

fn wait_healthy(rt: &tokio::runtime::Runtime, client: &BuildkitClient) -> Duration {
    let t = Instant::now();
    rt.block_on(async {
        while client.health().await.is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "buildkitd did not come back"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    t.elapsed()
}

/// Drive `build` until a process whose command line is `marker` exists: its RUN step started.
async fn until_running<F>(build: &mut std::pin::Pin<&mut F>, marker: &str)
where
    F: std::future::Future<Output = Result<perfbox::buildkit::BuiltImage, BuildError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_with(marker).is_empty() {
        tokio::select! {
            r = &mut *build => panic!("build ended early: {r:?}"),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert!(Instant::now() < deadline, "RUN never started");
    }
}

fn daemon_restart_same_client() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let _restore = RestartOnDrop;

    // (a) The daemon dies in the middle of a build: DaemonLost, promptly.
    let df = format!("FROM busybox\nRUN echo {} && sleep 59\n", nonce());
    let dir = tempfile::tempdir()?;
    let req = request(&df, dir.path());
    let lost = rt.block_on(async {
        let build = client.build(req, MemoryLog::new());
        tokio::pin!(build);
        until_running(&mut build, "sleep 59").await;
        let stop = tokio::task::spawn_blocking(|| services("stop"));
        let r = tokio::time::timeout(Duration::from_secs(15), &mut build).await;
        let _ = stop.await;
        r.expect("build must fail promptly when the daemon dies")
    });
    match lost {
        Err(BuildError::DaemonLost { .. } | BuildError::DaemonUnavailable { .. }) => {}
        other => panic!("daemon died mid-build, got {other:?}"),
    }

    // (b) Daemon down: health and build fail within 2 s, naming the socket.
    let t = Instant::now();
    let e = rt.block_on(client.health()).expect_err("daemon is stopped");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "health took {took:?}");
    assert!(matches!(e, BuildError::DaemonUnavailable { .. }), "{e:?}");
    assert!(e.to_string().contains(&socket()), "{e}");

    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let e = rt
        .block_on(client.build(request("FROM busybox\n", dir.path()), MemoryLog::new()))
        .expect_err("daemon is stopped");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "build took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, BuildError::DaemonUnavailable { .. }), "{e:?}");
    assert!(e.to_string().contains(&socket()), "{e}");

    // (c) Back up: the same client builds again.
    eprintln!("  {}", services("start").trim());
    let up = wait_healthy(&rt, &client);
    eprintln!("  daemon healthy again after {up:?}");
    let dir = tempfile::tempdir()?;
    let img = build_ok(
        &rt,
        &client,
        request(
            &format!("FROM busybox\nRUN echo back-{} > /back\n", nonce()),
            dir.path(),
        ),
    );
    assert!(read(&img.rootfs, "back").starts_with("back-"));
    Ok(())
}

// ---- a crash, as buildkitd v0.13.2 has on malformed LLB: kill -9, the supervisor restarts it ----
fn daemon_crash_supervisor_restarts() -> Result<(), Failed> {
    let rt = runtime();
    let client = require_daemon(&rt);
    let _restore = RestartOnDrop;
    let df = format!("FROM busybox\nRUN echo {} && sleep 58\n", nonce());
    let dir = tempfile::tempdir()?;
    let req = request(&df, dir.path());
    let lost = rt.block_on(async {
        let build = client.build(req, MemoryLog::new());
        tokio::pin!(build);
        until_running(&mut build, "sleep 58").await;
        let pids = common::main_buildkitd_pids();
        assert_eq!(pids.len(), 1, "expected one main buildkitd, found {pids:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pids[0]),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(15), &mut build)
            .await
            .expect("build must fail promptly when the daemon crashes")
    });
    match lost {
        Err(e @ (BuildError::DaemonLost { .. } | BuildError::DaemonUnavailable { .. })) => {
            eprintln!("  crash reported as: {e}")
        }
        other => panic!("daemon crashed mid-build, got {other:?}"),
    }
    // Nobody but the supervisor restarts it; the same client builds again.
    let up = wait_healthy(&rt, &client);
    eprintln!("  supervisor brought buildkitd back after {up:?}");
    let dir = tempfile::tempdir()?;
    let img = build_ok(
        &rt,
        &client,
        request(
            &format!("FROM busybox\nRUN echo again-{} > /again\n", nonce()),
            dir.path(),
        ),
    );
    assert!(read(&img.rootfs, "again").starts_with("again-"));
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // Serial and in order, whatever the caller asked for (see the module docs).
    args.test_threads = Some(1);
    let tests = vec![
        Trial::test(
            "buildkit_hostile_tar_never_escapes",
            hostile_tar_never_escapes,
        ),
        Trial::test("buildkit_run_and_cmd", run_and_cmd),
        Trial::test(
            "buildkit_multi_stage_copy_from_and_user",
            multi_stage_copy_from_and_user,
        ),
        Trial::test("buildkit_build_args_and_target", build_args_and_target),
        Trial::test(
            "buildkit_second_build_is_cached_and_quicker",
            second_build_is_cached_and_quicker,
        ),
        Trial::test("buildkit_errors_are_typed", errors_are_typed),
        Trial::test(
            "buildkit_parallel_builds_share_one_client",
            parallel_builds_share_one_client,
        ),
        Trial::test(
            "buildkit_run_steps_have_no_network",
            run_steps_have_no_network,
        ),
        Trial::test(
            "buildkit_cancellation_stops_the_solve",
            cancellation_stops_the_solve,
        ),
        Trial::test(
            "buildkit_daemon_crash_supervisor_restarts",
            daemon_crash_supervisor_restarts,
        ),
        Trial::test(
            "buildkit_daemon_restart_same_client",
            daemon_restart_same_client,
        ),
    ];
    libtest_mimic::run(&args, tests).exit();
}
