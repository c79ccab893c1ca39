//! Sandbox runner against the real OCI runtimes (rootless, as the perfbox user): the sample job,
//! every isolation promise attacked from inside the container, perf reading attacks, timeouts,
//! cancellation, limits. Runs as root (like CI); containers run as perfbox.

mod common;

use std::time::{Duration, Instant};

use common::*;
use libtest_mimic::{Arguments, Trial};
use perfbox::image::ImageConfig;
use perfbox::sandbox::perf::PerfError;
use perfbox::sandbox::policy::{Enforcement, Limits};
use perfbox::sandbox::runtime::RuntimeKind;
use perfbox::sandbox::{RunEnd, RunReport, RunRequest, Sandbox, SandboxConfig, read_spec};
use tokio_util::sync::CancellationToken;

fn sandbox(kind: RuntimeKind) -> Sandbox {
    Sandbox::new(SandboxConfig {
        runtime: kind,
        runtime_user: Some(user().into()),
        cgroup_parent: Some(cgroup_parent()),
        ..Default::default()
    })
    .expect("sandbox")
}

fn shell(script: &str) -> ImageConfig {
    ImageConfig {
        cmd: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
        ..Default::default()
    }
}

async fn run_with(
    sb: &Sandbox,
    job: &TestDir,
    image: &ImageConfig,
    limits: Option<&Limits>,
    cancel: CancellationToken,
) -> RunReport {
    let id = format!("test-{}", job.path().file_name().unwrap().to_string_lossy());
    sb.run(RunRequest {
        job_dir: job.path(),
        rootfs: &busybox_rootfs(),
        image,
        container_id: &id,
        limits,
        input: None,
        cancel,
    })
    .await
    .expect("sandbox run")
}

async fn run(kind: RuntimeKind, image: &ImageConfig) -> (TestDir, RunReport) {
    let job = TestDir::new("job");
    let r = run_with(&sandbox(kind), &job, image, None, CancellationToken::new()).await;
    (job, r)
}

fn out(job: &TestDir, file: &str) -> String {
    std::fs::read_to_string(job.path().join("out").join(file)).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(job.path().join("run.log")).unwrap_or_default();
        panic!("no /data/{file} ({e}); run.log:\n{log}")
    })
}

const SAMPLE: &str = r#"echo '{"perf":0.9876}' > /data/perf.json"#;

/// The sample job of the README, on one runtime.
fn sample_job(kind: RuntimeKind) {
    block_on(async move {
        let (job, r) = run(kind, &shell(SAMPLE)).await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "log: {}", r.log_tail);
        assert_eq!(r.perf, Ok(0.9876));
        assert!(
            !job.path().join("runtime").exists(),
            "runtime state dir left behind"
        );
        let spec = read_spec(job.path()).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap()[2],
            SAMPLE
        );
    })
    .unwrap();
}

/// Try the sample job once to learn whether this host lets a runtime run at all.
fn probe(kind: RuntimeKind) -> Result<(), String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // the refusal is reported as the skip reason
    let result = std::panic::catch_unwind(|| {
        block_on(async move {
            let sb = Sandbox::new(SandboxConfig {
                runtime: kind,
                runtime_user: Some(user().into()),
                cgroup_parent: Some(cgroup_parent()),
                ..Default::default()
            })
            .map_err(|e| e.to_string());
            let sb = match sb {
                Ok(s) => s,
                Err(e) => panic!("{e}"),
            };
            let job = TestDir::new("probe");
            let r = run_with(&sb, &job, &shell(SAMPLE), None, CancellationToken::new()).await;
            if r.perf.is_err() {
                panic!("{}", first_error_line(&r.log_tail));
            }
        })
    });
    std::panic::set_hook(hook);
    result.map(|_| ()).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// The runtime the attack trials use: `PERFBOX_TEST_RUNTIME` (runc, crun or youki), default runc.
/// The cgroup v2 VM test runs this binary once per runtime.
fn attack_runtime() -> RuntimeKind {
    std::env::var("PERFBOX_TEST_RUNTIME")
        .ok()
        .map(|v| v.parse().expect("PERFBOX_TEST_RUNTIME"))
        .unwrap_or(RuntimeKind::Runc)
}

fn tests() -> Vec<Trial> {
    let mut trials = vec![];
    for kind in [RuntimeKind::Runc, RuntimeKind::Crun, RuntimeKind::Youki] {
        let name = format!("sample_job_writes_perf::{kind}");
        // runc must work on every host; crun/youki may be refused by a cgroup v1 hybrid host,
        // which is then reported as a skip with the runtime's own words.
        if kind != RuntimeKind::Runc
            && !cgroup_v2_host()
            && let Err(reason) = probe(kind)
        {
            trials.push(skipped(
                &name,
                &format!("cgroup v1 hybrid host, {kind} refuses it: {reason}"),
            ));
            continue;
        }
        trials.push(Trial::test(name, move || {
            sample_job(kind);
            Ok(())
        }));
    }
    let t = |name: &str, f: fn()| {
        Trial::test(name.to_string(), move || {
            f();
            Ok(())
        })
    };
    trials.extend([
        t(
            "root_maps_to_unprivileged_host_uid_without_capabilities",
            identity_and_capabilities,
        ),
        t("only_data_and_tmp_are_writable", writable_paths),
        t(
            "network_namespace_has_only_lo_and_host_loopback_is_unreachable",
            network_isolation,
        ),
        t(
            "image_user_env_workdir_and_exec_form_are_honoured",
            image_config_honoured,
        ),
        t(
            "two_jobs_at_once_cannot_see_each_others_data",
            concurrent_jobs_isolated,
        ),
        t("perf_symlink_to_host_file_is_refused", perf_symlink),
        t("perf_of_1GiB_is_refused_without_reading_it", perf_huge),
        t("perf_fifo_does_not_hang_the_reader", perf_fifo),
        t("perf_garbage_is_a_typed_error", perf_garbage),
        t(
            "sleep_is_killed_at_the_timeout_and_nothing_is_left",
            timeout_kills,
        ),
        t("sigstopped_job_is_killed_by_the_timeout", sigstop_killed),
        t("cancellation_kills_the_container", cancellation),
        t("fork_bomb_ends_without_harming_the_host", fork_bomb),
        t("memory_limit_applies_and_oom_is_reported", memory_limit),
        t("log_is_capped", log_capped),
        t("filling_data_is_stopped_and_cleaned_up", data_disk_bomb),
        t("seccomp_denies_unshare_and_mount", seccomp_denies),
    ]);
    trials
}

fn identity_and_capabilities() {
    block_on(async {
        let (job, r) = run(attack_runtime(), &shell(
            "id -u > /data/uid; cat /proc/self/uid_map > /data/uid_map; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status > /data/status; cat /proc/self/oom_score_adj > /data/oom",
        )).await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        assert_eq!(out(&job, "uid").trim(), "0");
        let perfbox_uid = nix::unistd::User::from_name(user()).unwrap().unwrap().uid.as_raw();
        let first: Vec<u32> = out(&job, "uid_map").lines().next().unwrap().split_whitespace().map(|n| n.parse().unwrap()).collect();
        assert_eq!(first, vec![0, perfbox_uid, 1], "container root must be the unprivileged perfbox uid");
        assert_ne!(perfbox_uid, 0);
        let status = out(&job, "status");
        for cap in ["CapEff", "CapPrm", "CapBnd"] {
            let line = status.lines().find(|l| l.starts_with(cap)).unwrap();
            assert!(line.ends_with("0000000000000000"), "{line}");
        }
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        assert!(status.contains("Seccomp:\t2"), "{status}");
        assert_eq!(out(&job, "oom").trim(), "1000", "the OOM killer's first choice");
    })
    .unwrap();
}

fn writable_paths() {
    block_on(async {
        let script = r#"for p in / /bin /etc /root /proc/sys/kernel/hostname /sys/kernel /dev/x /tmp /data; do
            if touch "$p/perfbox-probe" 2>/dev/null || echo x > "$p" 2>/dev/null; then echo "$p writable"; else echo "$p denied"; fi; done > /data/w
            dd if=/dev/zero of=/tmp/fill bs=1M count=100 2>/dev/null; ls -l /tmp/fill | awk '{print $5}' > /data/tmpsize"#;
        let (job, r) = run(attack_runtime(), &shell(script)).await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        let w = out(&job, "w");
        for p in ["/ ", "/bin ", "/etc ", "/root ", "/proc/sys/kernel/hostname ", "/sys/kernel "] {
            assert!(w.contains(&format!("{p}denied")), "{p} must not be writable:\n{w}");
        }
        assert!(w.contains("/tmp writable") && w.contains("/data writable"), "{w}");
        let tmp_size: u64 = out(&job, "tmpsize").trim().parse().unwrap();
        assert!(tmp_size <= Limits::default().tmpfs_bytes, "/tmp grew to {tmp_size}");
        assert!(!busybox_rootfs().join("perfbox-probe").exists());
    })
    .unwrap();
}

fn network_isolation() {
    block_on(async {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = format!(
            "ls /sys/class/net > /data/ifaces; cat /proc/net/route > /data/route; cat /proc/net/if_inet6 > /data/inet6 2>/dev/null;
             if nc -w 2 127.0.0.1 {port} </dev/null; then echo reached; else echo blocked; fi > /data/nc"
        );
        let (job, r) = run(attack_runtime(), &shell(&script)).await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        assert_eq!(out(&job, "ifaces").split_whitespace().collect::<Vec<_>>(), vec!["lo"]);
        // No route entries (runc prints the header line; youki's /proc/net/route is empty).
        let routes = out(&job, "route");
        assert_eq!(routes.lines().filter(|l| !l.starts_with("Iface")).count(), 0, "routing table must be empty: {routes}");
        assert_eq!(out(&job, "nc").trim(), "blocked");
        assert!(listener.accept().is_err(), "the host listener saw a connection from the sandbox");
    })
    .unwrap();
}

fn image_config_honoured() {
    block_on(async {
        let image = ImageConfig {
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec![r#"echo "{\"perf\": $(id -u)}" > /data/perf.json; pwd > /data/pwd; echo "$GREETING" > /data/env; echo $HOME > /data/home"#.into()]),
            env: Some(vec!["GREETING=hello world".into()]),
            working_dir: Some("/tmp".into()),
            user: Some("user".into()),
        };
        let (job, r) = run(attack_runtime(), &image).await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        assert_eq!(r.perf, Ok(1000.0), "USER user must run as uid 1000 (subuid mapping)");
        assert_eq!(out(&job, "pwd").trim(), "/tmp");
        assert_eq!(out(&job, "env").trim(), "hello world");
        assert_eq!(out(&job, "home").trim(), "/home/user");
        // Exec form without a shell: the argv is passed as is.
        let exec = ImageConfig { cmd: Some(vec!["/bin/touch".into(), "/data/exec form".into()]), ..Default::default() };
        let (job, r) = run(attack_runtime(), &exec).await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        assert!(job.path().join("out/exec form").exists());
        // A USER the image does not know is a clear error, not a run as root.
        let job = TestDir::new("job");
        let bad = ImageConfig { user: Some("ghost".into()), ..shell("true") };
        let err = sandbox(attack_runtime())
            .run(RunRequest { job_dir: job.path(), rootfs: &busybox_rootfs(), image: &bad, container_id: "ghost", limits: None, input: None, cancel: CancellationToken::new() })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ghost"), "{err}");
    })
    .unwrap();
}

fn concurrent_jobs_isolated() {
    block_on(async {
        let sb = sandbox(attack_runtime());
        let (a, b) = (TestDir::new("job-a"), TestDir::new("job-b"));
        let img_a = shell("echo secret-a > /data/secret; sleep 2; ls -a /data > /data/seen");
        let img_b = shell("sleep 1; ls -a /data > /data/seen; find / -xdev -name secret 2>/dev/null > /data/found; cat /data/secret 2>&1 > /data/cat || true");
        let (ra, rb) = tokio::join!(
            run_with(&sb, &a, &img_a, None, CancellationToken::new()),
            run_with(&sb, &b, &img_b, None, CancellationToken::new())
        );
        assert_eq!(ra.end, RunEnd::Exited { code: 0 }, "{}", ra.log_tail);
        assert_eq!(rb.end, RunEnd::Exited { code: 0 }, "{}", rb.log_tail);
        assert!(!out(&b, "seen").contains("secret"), "job b saw job a's /data: {}", out(&b, "seen"));
        assert_eq!(out(&b, "found").trim(), "");
        assert!(!out(&a, "seen").contains("found"));
    })
    .unwrap();
}

fn perf_symlink() {
    block_on(async {
        let secret = state()
            .join("test")
            .join(format!("host-secret-{}", std::process::id()));
        std::fs::write(&secret, r#"{"perf": 42}"#).unwrap();
        let script = format!("ln -s {} /data/perf.json", secret.display());
        let (_job, r) = run(attack_runtime(), &shell(&script)).await;
        let _ = std::fs::remove_file(&secret);
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        assert_eq!(
            r.perf,
            Err(PerfError::Symlink),
            "a perf.json symlink must not be followed to the host file"
        );
        // A symlinked parent is refused too: /data itself cannot be swapped, so try a dir link.
        let (_job, r) = run(
            attack_runtime(),
            &shell("mkdir /data/d; ln -s /etc /data/perf.json"),
        )
        .await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        assert_eq!(r.perf, Err(PerfError::Symlink), "{}", r.log_tail);
    })
    .unwrap();
}

fn perf_huge() {
    block_on(async {
        let started = Instant::now();
        let (_job, r) = run(attack_runtime(), &shell("truncate -s 1G /data/perf.json")).await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        assert_eq!(r.perf, Err(PerfError::TooBig(1 << 30)));
        assert!(started.elapsed() < Duration::from_secs(20));
    })
    .unwrap();
}

fn perf_fifo() {
    block_on(async {
        let started = Instant::now();
        let (_job, r) = run(attack_runtime(), &shell("mkfifo /data/perf.json")).await;
        assert_eq!(r.perf, Err(PerfError::NotRegular("FIFO")));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "reading a FIFO must not block"
        );
    })
    .unwrap();
}

fn perf_garbage() {
    block_on(async {
        type Expect = fn(&Result<f64, PerfError>) -> bool;
        let cases: [(&str, Expect); 5] = [
            ("true", |p| *p == Err(PerfError::Missing)),
            ("echo not json > /data/perf.json", |p| {
                matches!(p, Err(PerfError::NotJson(_)))
            }),
            (r#"echo '{"perf": "high"}' > /data/perf.json"#, |p| {
                matches!(p, Err(PerfError::NotANumber(_)))
            }),
            (r#"echo '{"perf": NaN}' > /data/perf.json"#, |p| {
                matches!(p, Err(PerfError::NotFinite(_)))
            }),
            ("mkdir /data/perf.json", |p| {
                *p == Err(PerfError::NotRegular("directory"))
            }),
        ];
        for (script, ok) in cases {
            let (_job, r) = run(attack_runtime(), &shell(script)).await;
            assert!(ok(&r.perf), "{script}: got {:?}", r.perf);
        }
    })
    .unwrap();
}

fn short(timeout_secs: u64) -> Limits {
    Limits {
        timeout_secs,
        ..Limits::default()
    }
}

fn timeout_kills() {
    block_on(async {
        let marker = format!("1000.{}", std::process::id());
        let job = TestDir::new("job");
        let limits = short(2);
        let started = Instant::now();
        let r = run_with(
            &sandbox(attack_runtime()),
            &job,
            &shell(&format!("sleep {marker}")),
            Some(&limits),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.end, RunEnd::TimedOut { after_secs: 2 });
        assert!(started.elapsed() < Duration::from_secs(15));
        assert!(
            processes_with(&marker).is_empty(),
            "processes left: {:?}",
            processes_with(&marker)
        );
        assert!(
            !job.path().join("runtime").exists(),
            "runtime state left behind"
        );
    })
    .unwrap();
}

fn sigstop_killed() {
    block_on(async {
        let marker = format!("stopme{}", std::process::id());
        let job = TestDir::new("job");
        let limits = short(2);
        let script = format!("sh -c 'kill -STOP $$; echo {marker}' ; kill -STOP $$");
        let r = run_with(
            &sandbox(attack_runtime()),
            &job,
            &shell(&script),
            Some(&limits),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.end, RunEnd::TimedOut { after_secs: 2 });
        assert!(
            processes_with(&marker).is_empty(),
            "stopped processes left: {:?}",
            processes_with(&marker)
        );
    })
    .unwrap();
}

fn cancellation() {
    block_on(async {
        let marker = format!("2000.{}", std::process::id());
        let job = TestDir::new("job");
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            c2.cancel();
        });
        let r = run_with(
            &sandbox(attack_runtime()),
            &job,
            &shell(&format!("sleep {marker}")),
            None,
            cancel,
        )
        .await;
        assert_eq!(r.end, RunEnd::Cancelled);
        assert!(processes_with(&marker).is_empty());
        // A cancel at the very start (the runtime still creating the container, when its
        // `kill` fails) ends the run at once too, not after the 10 s grace for a stuck runtime.
        // "At once" is relative to how long a whole run of `true` takes on this host, measured
        // here (a few ms on this machine, seconds in the emulated VM): within that plus 4 s, far
        // below the 10 s the grace would take.
        let t = std::time::Instant::now();
        let baseline_job = TestDir::new("job");
        let r = run_with(
            &sandbox(attack_runtime()),
            &baseline_job,
            &shell("true"),
            None,
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 });
        let bound = t.elapsed() + Duration::from_secs(4);
        for delay_ms in [0, 20, 60] {
            let job = TestDir::new("job");
            let marker = format!("2500.{delay_ms}{}", std::process::id());
            let cancel = CancellationToken::new();
            let c2 = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                c2.cancel();
            });
            let t = std::time::Instant::now();
            let r = run_with(
                &sandbox(attack_runtime()),
                &job,
                &shell(&format!("sleep {marker}")),
                None,
                cancel,
            )
            .await;
            assert_eq!(r.end, RunEnd::Cancelled, "cancel after {delay_ms} ms");
            assert!(
                t.elapsed() < bound,
                "cancel after {delay_ms} ms took {:?} (a whole run of `true` + 4 s: {bound:?})",
                t.elapsed()
            );
            assert!(processes_with(&marker).is_empty());
        }
        // Dropping the run future midway cleans up too.
        let job = TestDir::new("job");
        let marker2 = format!("3000.{}", std::process::id());
        let sb = sandbox(attack_runtime());
        let img = shell(&format!("sleep {marker2}"));
        let fut = run_with(&sb, &job, &img, None, CancellationToken::new());
        let _ = tokio::time::timeout(Duration::from_millis(1500), fut).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            processes_with(&marker2).is_empty(),
            "dropped run left {:?}",
            processes_with(&marker2)
        );
    })
    .unwrap();
}

fn fork_bomb() {
    block_on(async {
        let job = TestDir::new("job");
        let limits = Limits {
            timeout_secs: 5,
            pids: 64,
            ..Limits::default()
        };
        let r = run_with(
            &sandbox(attack_runtime()),
            &job,
            &shell("bomb() { bomb | bomb & }; bomb; sleep 60"),
            Some(&limits),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(
            r.end,
            RunEnd::TimedOut { .. } | RunEnd::Exited { .. }
        ));
        assert!(matches!(
            r.applied.pids,
            Enforcement::Cgroup { .. } | Enforcement::Rlimit { .. }
        ));
        // The host still forks, and nothing of the bomb is left.
        assert!(
            std::process::Command::new("true")
                .status()
                .unwrap()
                .success()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(processes_with("bomb").is_empty());
    })
    .unwrap();
}

fn memory_limit() {
    block_on(async {
        let sb = sandbox(attack_runtime());
        let job = TestDir::new("job");
        let limits = Limits {
            memory_bytes: 64 << 20,
            timeout_secs: 60,
            ..Limits::default()
        };
        let hog = shell(r#"awk 'BEGIN { s = "xxxxxxxxxxxxxxxx"; while (1) { s = s s } }'"#);
        let r = run_with(&sb, &job, &hog, Some(&limits), CancellationToken::new()).await;
        eprintln!(
            "memory limit enforcement: {:?}, oom_killed={}",
            r.applied.memory, r.oom_killed
        );
        match &r.applied.memory {
            Enforcement::Cgroup { .. } => {
                assert_eq!(r.end, RunEnd::Exited { code: 137 }, "{}", r.log_tail);
                assert!(r.oom_killed, "OOM kill not detected");
            }
            Enforcement::Rlimit { .. } => {
                // Address-space rlimit: the allocation fails instead of an OOM kill.
                assert!(
                    matches!(r.end, RunEnd::Exited { code } if code != 0),
                    "{:?}",
                    r.end
                );
            }
            other => panic!("memory limit not applied at all: {other:?}"),
        }
    })
    .unwrap();
}

fn data_disk_bomb() {
    block_on(async {
        let job = TestDir::new("job");
        let limits = Limits { data_bytes: 32 << 20, data_files: 1000, timeout_secs: 60, ..Limits::default() };
        let started = Instant::now();
        let r = run_with(
            &sandbox(attack_runtime()),
            &job,
            &shell("i=0; while true; do i=$((i+1)); dd if=/dev/zero of=/data/fill-$i bs=1M count=16 2>/dev/null; done"),
            Some(&limits),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(&r.end, RunEnd::DataLimit { exceeded } if exceeded.contains("bytes")), "{:?}", r.end);
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(std::fs::read_dir(job.path().join("out")).unwrap().count(), 0, "the oversized output must be removed");
        // Many small files: the file count bound.
        let job = TestDir::new("job");
        let r = run_with(
            &sandbox(attack_runtime()),
            &job,
            &shell("i=0; while true; do i=$((i+1)); : > /data/f$i; done"),
            Some(&limits),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(&r.end, RunEnd::DataLimit { exceeded } if exceeded.contains("files")), "{:?}", r.end);
    })
    .unwrap();
}

fn log_capped() {
    block_on(async {
        let job = TestDir::new("job");
        let limits = Limits {
            log_bytes: 10_000,
            ..Limits::default()
        };
        let r = run_with(
            &sandbox(attack_runtime()),
            &job,
            &shell("yes perfbox | head -c 1000000; echo done >&2"),
            Some(&limits),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 });
        let len = std::fs::metadata(job.path().join("run.log")).unwrap().len();
        assert!(len < 10_200, "log is {len} bytes");
        assert!(
            r.log_dropped_bytes >= 990_000 - 10_000,
            "{}",
            r.log_dropped_bytes
        );
    })
    .unwrap();
}

fn seccomp_denies() {
    block_on(async {
        let (job, r) = run(attack_runtime(), &shell(
            "unshare -r true 2>&1; echo unshare=$? > /data/r; mount -t tmpfs x /mnt 2>&1; echo mount=$? >> /data/r; nsenter -t 1 -m true; echo nsenter=$? >> /data/r",
        )).await;
        assert_eq!(r.end, RunEnd::Exited { code: 0 }, "{}", r.log_tail);
        let res = out(&job, "r");
        for l in res.lines() {
            assert!(!l.ends_with("=0"), "{l} succeeded inside the sandbox: {res}");
        }
    })
    .unwrap();
}

fn main() {
    require_setup();
    let args = Arguments::from_args();
    let trials = tests();
    let conclusion = libtest_mimic::run(&args, trials);
    remove_busybox_rootfs();
    conclusion.exit();
}
