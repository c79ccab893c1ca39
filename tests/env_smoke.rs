//! Smoke tests of the environment that scripts/setup provides, used the way perfbox uses it:
//! build with the real rootless buildkitd (through buildctl), run the result rootless with each
//! OCI runtime through its CLI, and read a file the container wrote into a bind-mounted dir.
//! Also: the daemons are not root, build RUN steps cannot reach the host's loopback, and the
//! base-image registry is read-only.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use libtest_mimic::{Arguments, Failed, Trial};

/// Build on the main daemon with no network for RUN steps, as perfbox does.
fn build_no_net(dir: &Path, dockerfile: &str, tar: &Path) -> Result<String, String> {
    buildctl_build(
        &buildkit_socket(),
        dir,
        dockerfile,
        tar,
        &["--opt", "force-network-mode=none"],
    )
}

/// A bundle: the image built once (FROM busybox + RUN + CMD), unpacked as perfbox.
fn built_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<std::path::PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = TestDir::new("smoke-image");
        let tar = dir.path().join("image.tar");
        build_no_net(
            dir.path(),
            "FROM busybox\nRUN echo built-by-buildkit > /built\nCMD [\"sh\", \"-c\", \"cat /built > /data/out.txt\"]\n",
            &tar,
        )
        .unwrap_or_else(|log| panic!("buildctl build failed:\n{log}"));
        let rootfs = state().join("test").join(format!("smoke-rootfs-{}", std::process::id()));
        std::fs::create_dir_all(&rootfs).unwrap();
        run_ok(Command::new("chown").arg(user()).arg(&rootfs));
        run_ok(Command::new("chmod").arg("644").arg(&tar));
        run_ok(&mut as_perfbox(&["tar", "-C", &rootfs.to_string_lossy(), "-xf", &tar.to_string_lossy()]));
        let _ = std::fs::rename(dir.path(), rootfs.with_extension("build")); // removed at the end
        rootfs
    })
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `<runtime> spec --rootless`-style bundle run by the runtime CLI as perfbox; returns what the
/// container wrote to the bind-mounted /data.
fn run_built_image(runtime: &str) -> Result<String, String> {
    let rootfs = built_rootfs();
    let bundle = TestDir::new(&format!("smoke-{runtime}"));
    run_ok(Command::new("chown").arg(user()).arg(bundle.path()));
    let data = bundle.path().join("data");
    std::fs::create_dir(&data).unwrap();
    run_ok(Command::new("chown").arg(user()).arg(&data));
    // runc's rootless template, made by the runtime user itself (so the uid map points at it).
    run_ok(&mut as_perfbox(&[
        "sh",
        "-c",
        &format!("cd {} && runc spec --rootless", bundle.path().display()),
    ]));
    let cfg_path = bundle.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["root"]["path"] = rootfs.to_string_lossy().into();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["sh", "-c", "cat /built > /data/out.txt"]);
    cfg["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]
        }));
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    run_ok(Command::new("chown").arg(user()).arg(&cfg_path));
    let state = bundle.path().join("state");
    let id = format!("smoke-{runtime}-{}", std::process::id());
    let out = as_perfbox(&[
        runtime,
        "--root",
        &state.to_string_lossy(),
        "run",
        "--bundle",
        &bundle.path().to_string_lossy(),
        &id,
    ])
    .stdin(std::process::Stdio::null())
    .output()
    .map_err(|e| e.to_string())?;
    let _ = as_perfbox(&[
        runtime,
        "--root",
        &state.to_string_lossy(),
        "delete",
        "--force",
        &id,
    ])
    .output();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // The whole story for runc (its refusals are not expected here); one line for the
        // runtimes whose refusal becomes a skip's name.
        if runtime == "runc" {
            return Err(format!(
                "runc run exited with {}: stderr: {err} stdout: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        return Err(first_error_line(&err));
    }
    std::fs::read_to_string(data.join("out.txt")).map_err(|e| format!("no /data/out.txt: {e}"))
}

fn daemon_uids(comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .filter_map(|e| std::fs::metadata(e.path()).ok().map(|m| m.uid()))
        .collect()
}

fn daemons_are_not_root() -> Result<(), Failed> {
    for comm in ["buildkitd", "docker-registry", "rootlesskit"] {
        let uids = daemon_uids(comm);
        assert!(
            !uids.is_empty(),
            "{comm} is not running (scripts/setup starts it)"
        );
        assert!(
            uids.iter().all(|u| *u != 0),
            "{comm} runs as root: {uids:?}"
        );
    }
    Ok(())
}

fn build_run_cannot_reach_host_loopback() -> Result<(), Failed> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = TestDir::new("smoke-net");
    let tar = dir.path().join("net.tar");
    let nonce = format!("{}-{port}", std::process::id());
    let registry_port = registry_port();
    let df = format!(
        "FROM busybox\nRUN echo {nonce}; (nc -w 2 127.0.0.1 {port} </dev/null && echo reached || echo blocked) > /net; \
         (nc -w 2 127.0.0.1 {registry_port} </dev/null && echo reached || echo blocked) > /registry; awk 'NR>2 {{ sub(\":\", \"\", $1); print $1 }}' /proc/net/dev > /ifaces\n"
    );
    build_no_net(dir.path(), &df, &tar).map_err(|l| format!("build failed:\n{l}"))?;
    let read = |name: &str| run_ok(Command::new("tar").args(["-xOf"]).arg(&tar).arg(name));
    assert_eq!(read("net").trim(), "blocked");
    assert_eq!(read("registry").trim(), "blocked");
    assert_eq!(
        read("ifaces").split_whitespace().collect::<Vec<_>>(),
        vec!["lo"]
    );
    assert!(
        listener.accept().is_err(),
        "a RUN step connected to the host's loopback"
    );
    Ok(())
}

fn registry_is_read_only_and_serves_base_images() -> Result<(), Failed> {
    let code = |args: &[&str]| {
        run_ok(
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(args),
        )
    };
    let accept = "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
    for image in [
        "busybox/manifests/latest",
        "alpine/manifests/latest",
        "python/manifests/3-slim",
    ] {
        let c = code(&[
            "-H",
            accept,
            &format!("http://{}/v2/library/{image}", registry()),
        ]);
        assert_eq!(c, "200", "{image} missing from the registry");
    }
    let upload = code(&[
        "-X",
        "POST",
        &format!("http://{}/v2/library/busybox/blobs/uploads/", registry()),
    ]);
    assert_ne!(
        upload, "202",
        "the registry accepted an upload: it must be read-only"
    );
    Ok(())
}

fn build_cgroup_file(controller: &str, file: &str) -> Option<String> {
    let path = if cgroup_v2_host() {
        format!("/sys/fs/cgroup/{}-build/{file}", cgroup_name())
    } else {
        format!("/sys/fs/cgroup/{controller}/{}-build/{file}", cgroup_name())
    };
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn build_fork_bomb_is_contained() -> Result<(), Failed> {
    let max: u64 = build_cgroup_file("pids", "pids.max")
        .ok_or("no perfbox-build pids cgroup (scripts/setup)")?
        .parse()?;
    let dir = TestDir::new("smoke-forkbomb");
    let tar = dir.path().join("out.tar");
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let df = format!(
        "FROM busybox\nRUN echo {nonce}; bomb() {{ bomb | bomb & }}; bomb; sleep 4; echo done\n"
    );
    let started = std::time::Instant::now();
    let handle = std::thread::spawn({
        let (d, t) = (dir.path().to_path_buf(), tar.clone());
        move || build_no_net(&d, &df, &t)
    });
    // While the bomb runs, the host still forks, and the build cgroup stays at its limit.
    let mut peak = 0u64;
    while !handle.is_finished() {
        assert!(
            Command::new("true").status().unwrap().success(),
            "the host cannot fork during a build fork bomb"
        );
        if let Some(n) = build_cgroup_file("pids", "pids.current").and_then(|v| v.parse().ok()) {
            peak = peak.max(n);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = handle.join().unwrap();
    eprintln!(
        "  build cgroup peaked at {peak} tasks (pids.max {max}) in {:?}",
        started.elapsed()
    );
    assert!(peak <= max);
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after: u64 = build_cgroup_file("pids", "pids.current").unwrap().parse()?;
    assert!(
        after < 200,
        "{after} tasks left in the build cgroup after the bomb"
    );
    // The next test finds the daemon answering.
    require_buildkitd(&buildkit_socket());
    Ok(())
}

fn build_memory_bomb_is_contained() -> Result<(), Failed> {
    let limit: u64 = build_cgroup_file(
        "memory",
        if cgroup_v2_host() {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        },
    )
    .ok_or("no perfbox-build memory cgroup (scripts/setup)")?
    .parse()?;
    assert!(limit < 64 << 30, "build memory is not limited ({limit})");
    let before = daemon_pids("buildkitd");
    let dir = TestDir::new("smoke-membomb");
    let tar = dir.path().join("out.tar");
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let df = format!(
        "FROM busybox\nRUN echo {nonce}; awk 'BEGIN {{ s = \"xxxxxxxxxxxxxxxx\"; while (1) s = s s }}'\n"
    );
    let log = build_no_net(dir.path(), &df, &tar)
        .expect_err("a RUN past the build memory limit must fail");
    assert!(
        log.contains("exit code: 137") || log.contains("signal: killed") || log.contains("Killed"),
        "{log}"
    );
    // The OOM killer took the RUN step, not the daemon.
    assert_eq!(
        daemon_pids("buildkitd"),
        before,
        "buildkitd was killed by the memory bomb"
    );
    require_buildkitd(&buildkit_socket());
    Ok(())
}

fn daemon_pids(comm: &str) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    v.sort();
    v
}

fn main() {
    require_setup();
    require_buildkitd(&buildkit_socket());
    let mut args = Arguments::from_args();
    // One at a time: the fork bomb fills the build cgroup's pids for a few seconds, which would
    // fail any build running beside it (the bombs are contained to builds, not to one build).
    args.test_threads = Some(1);
    let mut trials = vec![
        Trial::test("daemons_run_as_the_unprivileged_user", daemons_are_not_root),
        Trial::test(
            "build_run_step_cannot_reach_host_loopback",
            build_run_cannot_reach_host_loopback,
        ),
        Trial::test(
            "registry_is_read_only_and_serves_base_images",
            registry_is_read_only_and_serves_base_images,
        ),
        Trial::test("build_fork_bomb_is_contained", build_fork_bomb_is_contained),
        Trial::test(
            "build_memory_bomb_is_contained",
            build_memory_bomb_is_contained,
        ),
    ];
    for runtime in ["runc", "crun", "youki"] {
        let name = format!("buildctl_image_runs_rootless::{runtime}");
        if runtime != "runc" && !cgroup_v2_host() {
            // A cgroup v1 hybrid host: try once, and report a refusal as a skip with its reason.
            if let Err(reason) = run_built_image(runtime) {
                trials.push(skipped(
                    &name,
                    &format!("cgroup v1 hybrid host, {runtime} refuses it: {reason}"),
                ));
                continue;
            }
        }
        trials.push(Trial::test(name, move || {
            let out = run_built_image(runtime)?;
            assert_eq!(out.trim(), "built-by-buildkit");
            Ok(())
        }));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    let rootfs = state()
        .join("test")
        .join(format!("smoke-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(rootfs.with_extension("build"));
    let _ = std::fs::remove_dir_all(rootfs);
    conclusion.exit();
}
