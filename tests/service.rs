//! End-to-end tests of the service: the real `perfbox serve` binary running as the unprivileged
//! perfbox user, with the real rootless buildkitd, the real runtime (runc) and a real SQLite
//! file, driven with curl over loopback exactly as users do.

mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::service::{Service, stop_all};
use common::*;
use libtest_mimic::{Arguments, Failed, Trial};

fn shared() -> &'static Service {
    static S: OnceLock<Service> = OnceLock::new();
    S.get_or_init(|| Service::start("svc", &[]))
}

const SAMPLE: &str = "FROM alpine\nRUN echo hi\nCMD echo '{\"perf\":0.9876}' > /data/perf.json\n";

fn curl_flow() -> Result<(), Failed> {
    let s = shared();
    let id = s.submit(SAMPLE);
    let v = s.wait(id);
    assert_eq!(
        v,
        serde_json::json!({"job": id, "status": "succeeded", "perf": 0.9876})
    );
    // The full record says how it ran.
    let (code, rec) = s.curl(&[&format!("/job/{id}")]);
    assert_eq!(code, 200);
    assert_eq!(rec["runtime"], "runc");
    assert_eq!(rec["exit_code"], 0);
    assert!(
        rec["image_digest"].as_str().unwrap().starts_with("sha256:"),
        "{rec}"
    );
    for k in [
        "created_at",
        "build_started_at",
        "build_finished_at",
        "run_started_at",
        "finished_at",
    ] {
        assert!(rec[k].as_f64().is_some(), "{k} missing: {rec}");
    }
    assert!(rec["limits"]["memory"]["by"].is_string(), "{rec}");
    // The spec is the sandbox it ran in.
    let (code, spec) = s.curl(&[&format!("/job/{id}/spec")]);
    assert_eq!(code, 200);
    let ns: Vec<&str> = spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(ns.contains(&"network") && ns.contains(&"user"), "{ns:?}");
    assert_eq!(spec["root"]["readonly"], true);
    // Logs: build then run.
    let (code, logs) = s.curl(&[&format!("/job/{id}/logs")]);
    assert_eq!(code, 200);
    let logs = logs.as_str().unwrap().to_string();
    assert!(
        logs.contains("===== build log =====") && logs.contains("===== run log ====="),
        "{logs}"
    );
    assert!(logs.contains("RUN echo hi"), "{logs}");
    Ok(())
}

fn twenty_jobs_at_once() -> Result<(), Failed> {
    let s = shared();
    let ids: Vec<(i64, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|n| {
                scope.spawn(move || {
                    (
                        s.submit(&format!(
                            "FROM busybox\nCMD echo '{{\"perf\": {n}.5}}' > /data/perf.json\n"
                        )),
                        n,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (id, n) in ids {
        let v = s.wait(id);
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(
            v["perf"].as_f64(),
            Some(n as f64 + 0.5),
            "job {id} got someone else's perf: {v}"
        );
    }
    Ok(())
}

fn failure_statuses() -> Result<(), Failed> {
    let _disk = DISK_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let s = shared();
    let cases = [
        (
            "FROM busybox\nRUN echo before && exit 3\n",
            "build_failed",
            "exit code: 3",
        ),
        ("FRM busybox\n", "build_failed", "line 1"),
        (
            "FROM no-such-image-perfbox\nCMD true\n",
            "build_failed",
            "no-such-image-perfbox",
        ),
        (
            "FROM busybox\nCMD echo oops >&2; exit 4\n",
            "run_failed",
            "exited with code 4",
        ),
        ("FROM busybox\nCMD true\n", "no_perf", "no /data/perf.json"),
        (
            "FROM busybox\nCMD echo '{\"perf\": \"fast\"}' > /data/perf.json\n",
            "invalid_perf",
            "not a number",
        ),
        (
            "FROM busybox\nCMD ln -s /etc/shadow /data/perf.json\n",
            "invalid_perf",
            "symlink",
        ),
        ("FROM busybox\nCMD sleep 1000\n", "timed_out", "8 s limit"),
        (
            "FROM busybox\nCMD awk 'BEGIN { s = \"xxxxxxxx\"; while (1) s = s s }'\n",
            "run_failed",
            "out of memory",
        ),
        (
            "FROM busybox\nUSER ghost\nCMD true\n",
            "run_failed",
            "ghost",
        ),
        (
            "FROM busybox\nCMD while true; do dd if=/dev/zero of=/data/f$RANDOM bs=1M count=64; done 2>/dev/null\n",
            "run_failed",
            "bytes of disk in /data",
        ),
    ];
    let ids: Vec<i64> = cases.iter().map(|(df, _, _)| s.submit(df)).collect();
    for ((df, status, reason), id) in cases.iter().zip(ids) {
        let v = s.wait(id);
        assert_eq!(v["status"], *status, "{df:?}: {v}");
        let err = v["error"].as_str().unwrap_or("");
        assert!(
            err.contains(reason),
            "{df:?}: reason {err:?} should mention {reason:?}"
        );
    }
    Ok(())
}

fn bad_requests() -> Result<(), Failed> {
    // Its own service: other tests submit to the shared one concurrently, and this one counts jobs.
    let s = &Service::start("svc-bad", &[]);
    let before = s.total_jobs();
    let dir = s.dir.path();
    std::fs::write(dir.join("empty"), "").unwrap();
    std::fs::write(dir.join("big"), "#".repeat(2 << 20)).unwrap();
    std::fs::write(dir.join("binary"), [0xffu8, 0xfe, 0x00, 0x41]).unwrap();
    std::fs::write(dir.join("ok"), "FROM busybox\n").unwrap();
    let f = |name: &str| format!("file=@{}", dir.join(name).display());
    let cases: Vec<(Vec<String>, u16)> = vec![
        (vec!["-X".into(), "POST".into(), "/job/build".into()], 400),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "Content-Type: text/plain".into(),
                "--data".into(),
                "FROM x".into(),
                "/job/build".into(),
            ],
            400,
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-F".into(),
                format!("dockerfile=@{}", dir.join("ok").display()),
                "/job/build".into(),
            ],
            400,
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-F".into(),
                f("empty"),
                "/job/build".into(),
            ],
            400,
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-F".into(),
                f("big"),
                "/job/build".into(),
            ],
            413,
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-F".into(),
                f("binary"),
                "/job/build".into(),
            ],
            400,
        ),
        (vec!["/job/performance/abc".into()], 400),
        (vec!["/job/performance/999999".into()], 404),
        (vec!["/job/999999/spec".into()], 404),
        (vec!["/nope".into()], 404),
    ];
    for (args, want) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, v) = s.curl(&a);
        assert_eq!(code, want, "{args:?}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{args:?}: no error message: {v}"
        );
    }
    assert_eq!(s.total_jobs(), before, "a bad request queued a job");
    Ok(())
}

fn marker_gone(marker: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if processes_with(marker).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn delete_running() -> Result<(), Failed> {
    let s = shared();
    let marker = format!("4242.{}", std::process::id());
    let id = s.submit(&format!("FROM busybox\nCMD sleep {marker}\n"));
    s.wait_status(id, "running");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !processes_with(&marker).is_empty(),
        "the job's process should be running"
    );
    let (code, v) = s.curl(&["-X", "DELETE", &format!("/job/{id}")]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(marker_gone(&marker), "container process left after DELETE");
    let (code, _) = s.curl(&["-X", "DELETE", &format!("/job/{id}")]);
    assert_eq!(code, 409, "cancelling a finished job is a conflict");
    // During the build: the solve is cancelled on the daemon.
    let marker = format!("4343.{}", std::process::id());
    let id = s.submit(&format!("FROM busybox\nRUN sleep {marker}\nCMD true\n"));
    s.wait_status(id, "building");
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_with(&marker).is_empty() {
        assert!(Instant::now() < deadline, "the RUN step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, v) = s.curl(&["-X", "DELETE", &format!("/job/{id}")]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(
        marker_gone(&marker),
        "the build's RUN process is left after DELETE"
    );
    // PUT is accepted like POST (existing clients use both).
    let path = s.dir.path().join("put.Dockerfile");
    std::fs::write(
        &path,
        "FROM busybox\nCMD echo '{\"perf\": 5}' > /data/perf.json\n",
    )
    .unwrap();
    let (code, v) = s.curl(&[
        "-X",
        "PUT",
        "-F",
        &format!("file=@{}", path.display()),
        "/job/build",
    ]);
    assert_eq!(code, 202, "{v}");
    assert_eq!(s.wait(v["id"].as_i64().unwrap())["perf"], 5.0);
    Ok(())
}

fn kill9_restart() -> Result<(), Failed> {
    let mut s = Service::start("svc-kill9", &[]);
    let done = s.submit("FROM busybox\nCMD echo '{\"perf\": 7}' > /data/perf.json\n");
    assert_eq!(s.wait(done)["perf"], 7.0);
    let marker = format!("5353.{}", std::process::id());
    let victim = s.submit(&format!("FROM busybox\nCMD sleep {marker}\n"));
    s.wait_status(victim, "running");
    s.kill9();
    s.spawn();
    let v = s.wait(victim);
    assert_eq!(v["status"], "interrupted", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("perfbox stopped"),
        "{v}"
    );
    assert!(
        marker_gone(&marker),
        "the interrupted job's container survived the restart"
    );
    assert_eq!(s.wait(done)["perf"], 7.0, "a finished result was lost");
    let fresh = s.submit("FROM busybox\nCMD echo '{\"perf\": 8}' > /data/perf.json\n");
    assert_eq!(s.wait(fresh)["perf"], 8.0);
    assert!(fresh > victim, "ids must keep increasing across restarts");
    Ok(())
}

fn tokens() -> Result<(), Failed> {
    let s = Service::start(
        "svc-auth",
        &[("PERFBOX_TOKENS", "alice=alice-secret-1,bob=bob-secret-22")],
    );
    let alice = ["-H", "Authorization: Bearer alice-secret-1"];
    let bob = ["-H", "Authorization: Bearer bob-secret-22"];
    let path = s.dir.path().join("a.Dockerfile");
    std::fs::write(
        &path,
        "FROM busybox\nCMD echo '{\"perf\": 1}' > /data/perf.json\n",
    )
    .unwrap();
    let file = format!("file=@{}", path.display());
    let (code, _) = s.curl(&["-X", "POST", "-F", &file, "/job/build"]);
    assert_eq!(code, 401);
    let (code, _) = s.curl(&["-H", "Authorization: Bearer wrong-token", "/jobs"]);
    assert_eq!(code, 401);
    let (code, v) = s.curl(&[alice[0], alice[1], "-X", "POST", "-F", &file, "/job/build"]);
    assert_eq!(code, 202);
    let id = v["id"].as_i64().unwrap();
    let (code, _) = s.curl(&[bob[0], bob[1], &format!("/job/performance/{id}")]);
    assert_eq!(code, 404, "bob must not see alice's job");
    let (code, _) = s.curl(&[bob[0], bob[1], "-X", "DELETE", &format!("/job/{id}")]);
    assert_eq!(code, 404);
    let (_, list) = s.curl(&[bob[0], bob[1], "/jobs"]);
    assert_eq!(list["total"], 0);
    let (code, _) = s.curl(&[alice[0], alice[1], &format!("/job/{id}")]);
    assert_eq!(code, 200);
    let (code, _) = s.curl(&["/healthz"]);
    assert_eq!(code, 200, "healthz needs no token");
    let (code, _) = s.curl(&["/metrics"]);
    assert_eq!(code, 401);
    Ok(())
}

fn health_metrics_pages() -> Result<(), Failed> {
    let s = shared();
    let (code, h) = s.curl(&["/healthz"]);
    assert_eq!(code, 200);
    assert_eq!(h["ok"], true, "{h}");
    assert_eq!(h["buildkit"]["ok"], true, "{h}");
    assert!(
        h["buildkit"]["version"].as_str().unwrap().contains("v0."),
        "{h}"
    );
    let a = s.submit("FROM busybox\nCMD echo '{\"perf\": 1}' > /data/perf.json\n");
    let b = s.submit("FROM busybox\nCMD echo '{\"perf\": 2}' > /data/perf.json\n");
    s.wait(a);
    s.wait(b);
    let (_, page) = s.curl(&["/jobs?limit=1"]);
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    let next = page["next"].as_str().unwrap().to_string();
    let (_, page2) = s.curl(&[&next]);
    assert!(page2["jobs"][0]["id"].as_i64().unwrap() < page["jobs"][0]["id"].as_i64().unwrap());
    let (code, _) = s.curl(&["/jobs?limit=abc"]);
    assert_eq!(code, 400);
    let (code, m) = s.curl(&["/metrics"]);
    assert_eq!(code, 200);
    let m = m.as_str().unwrap().to_string();
    assert!(
        m.contains("perfbox_jobs{status=\"succeeded\"}") && m.contains("perfbox_queue_depth"),
        "{m}"
    );
    assert!(
        m.contains("perfbox_phase_seconds_count{phase=\"build\"}"),
        "{m}"
    );
    Ok(())
}

fn job_cannot_reach_the_api() -> Result<(), Failed> {
    let s = shared();
    let port = s.port;
    let df = format!(
        "FROM busybox\nRUN (nc -w 2 127.0.0.1 {port} </dev/null && echo reached || echo blocked) > /build-net\n\
         CMD if grep -q blocked /build-net && ! nc -w 2 127.0.0.1 {port} </dev/null; then echo '{{\"perf\": 0}}'; else echo '{{\"perf\": 1}}'; fi > /data/perf.json\n"
    );
    let v = s.wait(s.submit(&df));
    assert_eq!(
        v["perf"], 0.0,
        "a job reached the perfbox API (1 = reached): {v}"
    );
    Ok(())
}

fn logs_follow() -> Result<(), Failed> {
    let s = shared();
    let id = s.submit("FROM busybox\nCMD for i in 1 2 3; do echo tick-$i; sleep 0.5; done; echo '{\"perf\": 3}' > /data/perf.json\n");
    let out = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "-m",
            "60",
            &format!("http://127.0.0.1:{}/job/{id}/logs?follow=1", s.port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tick-1") && text.contains("tick-3"), "{text}");
    let (_, v) = s.curl(&[&format!("/job/performance/{id}")]);
    assert_eq!(
        v["status"], "succeeded",
        "follow must end when the job ends: {v}"
    );
    Ok(())
}

fn resubmission_reuses_the_cached_image() -> Result<(), Failed> {
    // By default (cache_scope = "job") nothing is shared between jobs: built again.
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let df = format!(
        "FROM busybox\nRUN echo {nonce} > /nonce\nCMD echo \"{{\\\"perf\\\": $(wc -c < /nonce)}}\" > /data/perf.json\n"
    );
    {
        let s = shared();
        let first = s.submit(&df);
        assert_eq!(s.wait(first)["perf"], 33.0);
        let second = s.submit(&df);
        assert_eq!(s.wait(second)["perf"], 33.0);
        let rec = s.curl(&[&format!("/job/{second}")]).1;
        assert_eq!(rec["image_cache"], "miss", "{rec}");
        assert_eq!(rec["build"]["cache_scope"], "job", "{rec}");
    }
    // With cache_scope = "owner", one owner's resubmission reuses its image.
    let s = &Service::start("svc-owner-cache", &[("PERFBOX_BUILD_CACHE_SCOPE", "owner")]);
    let first = s.submit(&df);
    assert_eq!(s.wait(first)["perf"], 33.0);
    let second = s.submit(&df);
    assert_eq!(s.wait(second)["perf"], 33.0);
    let rec = |id: i64| s.curl(&[&format!("/job/{id}")]).1;
    assert_eq!(rec(first)["image_cache"], "miss");
    assert_eq!(rec(second)["image_cache"], "hit", "{}", rec(second));
    assert_eq!(rec(first)["image_digest"], rec(second)["image_digest"]);
    // Only CMD changed: BuildKit solves (from its cache) but the rootfs is already cached, so
    // nothing is exported.
    let cmd_only = df.replace("wc -c < /nonce", "cat /nonce | wc -c");
    let third = s.submit(&cmd_only);
    assert_eq!(s.wait(third)["perf"], 33.0);
    assert_eq!(rec(third)["image_cache"], "rootfs-hit", "{}", rec(third));
    let (_, logs3) = s.curl(&[&format!("/job/{third}/logs")]);
    assert!(
        logs3.as_str().unwrap().contains("export skipped"),
        "{logs3}"
    );
    let (_, logs) = s.curl(&[&format!("/job/{second}/logs")]);
    assert!(
        logs.as_str().unwrap().contains("reusing its cached image"),
        "{logs}"
    );
    Ok(())
}

/// The disk tests measure free space: they must not overlap each other.
static DISK_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn build_disk_bomb_is_stopped() -> Result<(), Failed> {
    let _disk = DISK_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    // A service whose free-disk floor sits 300 MB below what is free now: a RUN step writing
    // 8 GB must be stopped long before the disk fills, and its space given back.
    let free_now = free_bytes;
    let free = free_now();
    let floor = (free - (300 << 20)).to_string();
    let s = Service::start(
        "svc-disk",
        &[("PERFBOX_MIN_FREE_DISK_BYTES", floor.as_str())],
    );
    // Watch the lowest free space while the build runs.
    let mut disk = LowestFreeDisk::start();
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let id = s.submit(&format!(
        "FROM busybox\nRUN echo {marker}; dd if=/dev/zero of=/big bs=1M count=8000\nCMD true\n"
    ));
    let v = s.wait(id);
    let drop = disk.stop();
    assert_eq!(v["status"], "build_failed", "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.starts_with("the build was stopped") && err.contains("bytes free"),
        "{v}"
    );
    let used_at_worst = drop >> 20;
    eprintln!("  stopped; at worst {used_at_worst} MB of the disk was used (floor at 300 MB)");
    assert!(
        used_at_worst < 4000,
        "the build used {used_at_worst} MB before it was stopped"
    );
    // BuildKit drops the failed step's snapshot: the space comes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while free_now() + (200 << 20) < free {
        assert!(
            Instant::now() < deadline,
            "the disk space was not given back: {} MB still used",
            (free - free_now()) >> 20
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn cli_client() -> Result<(), Failed> {
    let s = shared();
    let url = format!("http://127.0.0.1:{}", s.port);
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_perfbox"))
            .args(args)
            .env("PERFBOX_URL", &url)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let path = s.dir.path().join("cli.Dockerfile");
    std::fs::write(
        &path,
        "FROM busybox\nCMD echo '{\"perf\": 0.25}' > /data/perf.json\n",
    )
    .unwrap();
    let (ok, out, err) = cli(&["submit", "--wait", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "0.25");
    assert!(
        err.contains("succeeded"),
        "progress is shown while waiting: {err}"
    );
    let (ok, out, _) = cli(&["submit", path.to_str().unwrap()]);
    assert!(ok);
    // Without --wait it prints the job id, as its help says.
    let id: i64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an id: {out}"));
    s.wait(id);
    let (ok, out, _) = cli(&["status", &id.to_string()]);
    assert!(ok && out.contains("\"succeeded\""), "{out}");
    let (ok, out, _) = cli(&["spec", &id.to_string()]);
    assert!(ok && out.contains("\"namespaces\""), "{out}");
    let (ok, out, _) = cli(&["logs", &id.to_string()]);
    assert!(ok && out.contains("===== run log ====="), "{out}");
    let (ok, _, err) = cli(&["status", "999999"]);
    assert!(!ok && err.contains("404"), "{err}");
    // A failing job makes `submit --wait` fail with the reason.
    std::fs::write(&path, "FROM busybox\nCMD exit 9\n").unwrap();
    let (ok, _, err) = cli(&["submit", "--wait", path.to_str().unwrap()]);
    assert!(
        !ok && err.contains("run_failed") && err.contains("code 9"),
        "{err}"
    );
    Ok(())
}

fn main() {
    require_setup();
    require_buildkitd(&buildkit_socket());
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("curl_post_and_poll_returns_perf", curl_flow),
        Trial::test(
            "twenty_jobs_at_once_each_get_their_own_perf",
            twenty_jobs_at_once,
        ),
        Trial::test("each_failure_status_has_a_useful_reason", failure_statuses),
        Trial::test("bad_requests_are_4xx_and_queue_nothing", bad_requests),
        Trial::test(
            "delete_running_job_cancels_and_leaves_no_process",
            delete_running,
        ),
        Trial::test(
            "kill9_restart_interrupts_running_job_and_keeps_results",
            kill9_restart,
        ),
        Trial::test("tokens_isolate_owners", tokens),
        Trial::test("healthz_metrics_and_pagination", health_metrics_pages),
        Trial::test(
            "job_cannot_reach_the_api_at_build_or_run_time",
            job_cannot_reach_the_api,
        ),
        Trial::test("logs_follow_streams_until_the_job_ends", logs_follow),
        Trial::test("cli_submit_wait_status_spec_logs", cli_client),
        Trial::test("build_disk_bomb_is_stopped", build_disk_bomb_is_stopped),
        Trial::test(
            "resubmission_reuses_the_cached_image",
            resubmission_reuses_the_cached_image,
        ),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    stop_all();
    conclusion.exit();
}
