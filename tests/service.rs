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

static SHARED: OnceLock<Service> = OnceLock::new();

fn shared() -> &'static Service {
    SHARED.get_or_init(|| Service::start("svc", &[]))
}

fn shared_started() -> bool {
    SHARED.get().is_some()
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
    // The interrupted job's spec digest was recorded before it ran: it passes its audit too.
    let (ok, out, err) = cli_of(&s, &["audit", "--all"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("3 jobs audited: 3 passed, 0 failed"), "{out}");
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

/// Run the perfbox CLI against `s`: (succeeded, stdout, stderr).
fn cli_of(s: &Service, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_perfbox"))
        .args(args)
        .env("PERFBOX_URL", format!("http://127.0.0.1:{}", s.port))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_client() -> Result<(), Failed> {
    let s = shared();
    let cli = |args: &[&str]| cli_of(s, args);
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

/// The audit of one job, as `perfbox audit ID --json` reports it: (exit ok, the job's report).
fn audit_json(s: &Service, id: i64) -> (bool, serde_json::Value) {
    let (ok, out, err) = cli_of(s, &["audit", &id.to_string(), "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(v["ok"], ok, "the exit status follows the verdict: {v}");
    (ok, v["jobs"][0].clone())
}

fn failing(report: &serde_json::Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["ok"] == false)
        .map(|f| f["rule"].as_str().unwrap().to_owned())
        .collect()
}

fn an_edited_spec_fails_its_audit_with_the_rule_and_its_evidence() -> Result<(), Failed> {
    let s = Service::start("svc-audit", &[]);
    let id = s.submit(SAMPLE);
    // An ordinary job beside the one whose spec is tampered with.
    let other = s.submit("FROM busybox\nCMD echo '{\"perf\": 0.5}' > /data/perf.json\n");
    assert_eq!(s.wait(id)["status"], "succeeded");
    assert_eq!(s.wait(other)["perf"], 0.5);
    let (ok, report) = audit_json(&s, id);
    assert!(ok, "{report:#}");
    assert_eq!(
        report["findings"].as_array().unwrap().len(),
        16,
        "{report:#}"
    );

    let path = s.state().join(format!("jobs/{id}/config.json"));
    let original = std::fs::read(&path).unwrap();
    let spec: serde_json::Value = serde_json::from_slice(&original).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit, &str, &str); 4] = [
        (
            "no_capabilities",
            |s| {
                let caps = &mut s["process"]["capabilities"];
                caps["bounding"] = serde_json::json!(["CAP_SYS_ADMIN"]);
                caps["effective"] = serde_json::json!(["CAP_SYS_ADMIN"]);
            },
            "/process/capabilities/bounding",
            "CAP_SYS_ADMIN",
        ),
        (
            "only_data_from_host",
            |s| {
                s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                    "destination": "/host", "type": "bind", "source": "/etc",
                    "options": ["rbind", "rw"]
                }))
            },
            "/mounts/",
            "\"/etc\"",
        ),
        (
            "private_namespaces",
            |s| {
                let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
                ns.retain(|n| n["type"] != "network");
            },
            "/linux/namespaces",
            "",
        ),
        (
            "user_namespace",
            |s| s["linux"]["uidMappings"][0]["hostID"] = 0.into(),
            "/linux/uidMappings",
            "\"hostID\":0",
        ),
    ];
    for (rule, edit, path_prefix, value_has) in edits {
        let mut edited = spec.clone();
        edit(&mut edited);
        std::fs::write(&path, serde_json::to_vec_pretty(&edited).unwrap()).unwrap();
        let (ok, report) = audit_json(&s, id);
        assert!(!ok, "{rule}: {report:#}");
        assert_eq!(failing(&report), ["spec_integrity", rule], "{report:#}");
        let finding = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["rule"] == rule)
            .unwrap();
        let evidence = finding["evidence"].as_array().unwrap();
        assert!(
            evidence
                .iter()
                .any(|e| e["path"].as_str().unwrap().starts_with(path_prefix)
                    && e["value"].to_string().contains(value_has)),
            "{rule}: {finding:#}"
        );
        // The human report names the rule and its evidence, and exits 1.
        let (ok, out, _) = cli_of(&s, &["audit", &id.to_string()]);
        assert!(
            !ok && out.contains(&format!("FAIL {rule}")) && out.contains(path_prefix),
            "{out}"
        );
        // Only the tampered job fails; the one beside it still passes.
        assert!(
            audit_json(&s, other).0,
            "{rule}: the other job's audit failed"
        );
        let (ok, out, _) = cli_of(&s, &["audit", "--all"]);
        assert!(
            !ok && out.contains("2 jobs audited: 1 passed, 1 failed"),
            "{out}"
        );
    }
    // The file as the sandbox wrote it passes again.
    std::fs::write(&path, &original).unwrap();
    assert!(audit_json(&s, id).0);
    Ok(())
}

fn every_kind_of_job_passes_its_audit() -> Result<(), Failed> {
    let s = Service::start("svc-audit-all", &[]);
    let jobs = [
        (SAMPLE, "succeeded"),
        ("FROM busybox\nCMD exit 3\n", "run_failed"),
        ("FROM busybox\nCMD true\n", "no_perf"),
        ("FROM busybox\nRUN exit 1\n", "build_failed"),
        ("FROM busybox\nCMD sleep 60\n", "timed_out"),
        (
            "FROM busybox\nADD http://127.0.0.1:1/x /x\n",
            "build_failed",
        ),
    ];
    let ids: Vec<i64> = jobs.iter().map(|(df, _)| s.submit(df)).collect();
    for (id, (_, want)) in ids.iter().zip(jobs) {
        assert_eq!(s.wait(*id)["status"], want, "job {id}");
    }
    let (ok, out, err) = cli_of(&s, &["audit", "--all"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("6 jobs audited: 6 passed, 0 failed"), "{out}");
    // Build failures had their build audited, not a sandbox they never reached.
    let (_, report) = audit_json(&s, ids[3]);
    assert_eq!(
        report["findings"].as_array().unwrap().len(),
        5,
        "{report:#}"
    );
    assert!(
        report["not_audited"][0]
            .as_str()
            .unwrap()
            .starts_with("sandbox:")
    );
    // --since bounds --all.
    let (ok, out, _) = cli_of(&s, &["audit", "--all", "--since", "2999-01-01"]);
    assert!(ok && out.contains("0 jobs audited"), "{out}");
    let (ok, _, err) = cli_of(&s, &["audit", "--since", "2026-01-01", "1"]);
    assert!(!ok && err.contains("--since goes with --all"), "{err}");
    Ok(())
}

fn receipts_verify_and_changed_ones_do_not() -> Result<(), Failed> {
    let s = shared();
    let id = s.submit(SAMPLE);
    assert_eq!(s.wait(id)["perf"], 0.9876);
    // The secret key is the service user's alone.
    let secret = s.state().join("receipt.key");
    let meta = std::fs::metadata(&secret).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        nix::unistd::User::from_uid(meta.uid().into())
            .unwrap()
            .unwrap()
            .name,
        user()
    );
    let (ok, receipt, err) = cli_of(s, &["receipt", &id.to_string()]);
    assert!(ok, "{err}");
    let dir = s.dir.path();
    let file = dir.join(format!("receipt-{id}.json"));
    std::fs::write(&file, &receipt).unwrap();
    let public = s.state().join("receipt.pub");
    let verify = |r: &std::path::Path, key: &std::path::Path| {
        cli_of(
            s,
            &[
                "verify",
                r.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ],
        )
    };
    let (ok, out, err) = verify(&file, &public);
    assert!(ok && out.starts_with("OK: job"), "{out}{err}");
    // GET /receipt-key's answer is a key file too.
    let key_json = dir.join("receipt-key.json");
    std::fs::write(&key_json, s.curl(&["/receipt-key"]).1.to_string()).unwrap();
    assert!(verify(&file, &key_json).0);

    // perf changed: the signature fails.
    let mut changed: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    changed["receipt"]["perf"] = serde_json::json!(0.9999);
    let changed_file = dir.join(format!("receipt-{id}-changed.json"));
    std::fs::write(&changed_file, changed.to_string()).unwrap();
    let (ok, out, _) = verify(&changed_file, &public);
    assert!(!ok && out.contains("INVALID: signature"), "{out}");
    // Another key: refused, naming both keys.
    let other = TestDir::new("other-key");
    let (ok, _, err) = cli_of(
        s,
        &["keygen", "--state-dir", other.path().to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let (ok, out, _) = verify(&file, &other.path().join("receipt.pub"));
    assert!(!ok && out.contains("INVALID: key"), "{out}");
    // A malformed field is named.
    changed["receipt"]["perf"] = serde_json::json!("high");
    std::fs::write(&changed_file, changed.to_string()).unwrap();
    let (ok, out, _) = verify(&changed_file, &public);
    assert!(!ok && out.contains("receipt.perf"), "{out}");
    Ok(())
}

/// After every other trial: each job the shared service ran for them passes its audit.
fn the_suites_jobs_pass_their_audit() -> Result<(), Failed> {
    let s = shared();
    let (ok, out, err) = cli_of(s, &["audit", "--all"]);
    let total = s.total_jobs();
    assert!(total > 0);
    assert!(
        ok && out.contains(&format!(
            "{total} {} audited: {total} passed, 0 failed",
            if total == 1 { "job" } else { "jobs" }
        )),
        "{out}{err}"
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
        Trial::test(
            "an_edited_spec_fails_its_audit_with_the_rule_and_its_evidence",
            an_edited_spec_fails_its_audit_with_the_rule_and_its_evidence,
        ),
        Trial::test(
            "every_kind_of_job_passes_its_audit",
            every_kind_of_job_passes_its_audit,
        ),
        Trial::test(
            "receipts_verify_and_changed_ones_do_not",
            receipts_verify_and_changed_ones_do_not,
        ),
    ];
    let mut conclusion = libtest_mimic::run(&args, trials);
    // Then, over what the trials above left on the shared service (skipped when none of them
    // used it, e.g. under a name filter).
    let name = "the_suites_jobs_pass_their_audit";
    let last = libtest_mimic::run(
        &args,
        vec![if shared_started() {
            Trial::test(name, the_suites_jobs_pass_their_audit)
        } else {
            skipped(name, "no trial that ran used the shared service")
        }],
    );
    conclusion.num_failed += last.num_failed;
    conclusion.num_passed += last.num_passed;
    stop_all();
    conclusion.exit();
}
