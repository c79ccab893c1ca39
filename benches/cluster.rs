//! perfbox on PostgreSQL, measured (not a test): every number against a baseline taken in the
//! same run.
//!
//! 1. **Store cost per job**: one node on SQLite, then one on PostgreSQL (same machine, same
//!    build daemon): submit → perf visible for the same cached Dockerfile (no BuildKit call, so
//!    the store's share shows). Ratio PostgreSQL / SQLite.
//! 2. **The queue at scale, simulated**: 100 claimer processes with a fake runner (claim, mark
//!    running, record the result, all fenced as a node does) contending on one PostgreSQL for
//!    5000 jobs; claims per second and p99 claim latency against one claimer alone, and a check
//!    that no job was claimed twice.
//! 3. **BuildKit's registry cache between nodes**: a build whose one costly step takes ~5 s,
//!    built on node A (exporting its cache to a registry) then on node B cold and with the
//!    cache imported.
//!
//! `cargo bench --bench cluster [-- --short]` as root after scripts/up (--short: fewer jobs).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::Postgres;
use common::service::Service;
use perfbox::jobs::JobStatus;
use perfbox::jobs::pg_store::{PgOptions, PgStore};
use perfbox::jobs::store::{Claim, Holder, NewJob, Patch, Store};

const CHILD: &str = "PERFBOX_BENCH_CLAIMER";

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn job() -> NewJob<'static> {
    NewJob {
        filename: "sim.Dockerfile",
        owner: None,
        submitter: "sim",
        dockerfile_sha256: "0",
        idempotency_key: None,
        files: &[],
    }
}

/// A simulated node (child process): wait for the start file, then claim and finish jobs
/// until the queue is empty; print `{"ids": [...], "lat_ms": [...], "t0": s, "t1": s}`.
fn claimer(url: &str) {
    let name = format!("sim-{}", std::process::id());
    let store = PgStore::open_with(
        url,
        PgOptions {
            pool_size: 1,
            listen: false,
        },
    )
    .unwrap();
    let go = std::env::var("PERFBOX_BENCH_GO").unwrap();
    while !std::path::Path::new(&go).exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let t0 = now();
    let (mut ids, mut lat) = (vec![], vec![]);
    let claim = Claim {
        node: &name,
        build_slots: 1,
        per_owner: 1_000_000,
        lease: Duration::from_secs(60),
    };
    let mut slowest = (0f64, "");
    loop {
        let t = Instant::now();
        let claimed = store.claim(&claim);
        if let Err(e) = &claimed {
            eprintln!("claimer {name}: claim failed after {:?}: {e}", t.elapsed());
        }
        let Some(rec) = claimed.unwrap() else {
            break;
        };
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        let holder = Holder::of(&rec);
        let t = Instant::now();
        store
            .transition(
                rec.id,
                JobStatus::Running,
                Patch {
                    holder: holder.clone(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("running after {:?}: {e}", t.elapsed()));
        if t.elapsed().as_secs_f64() > slowest.0 {
            slowest = (t.elapsed().as_secs_f64(), "running");
        }
        let t = Instant::now();
        store
            .transition(
                rec.id,
                JobStatus::Succeeded,
                Patch {
                    perf: Some(0.5),
                    holder,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("result after {:?}: {e}", t.elapsed()));
        if t.elapsed().as_secs_f64() > slowest.0 {
            slowest = (t.elapsed().as_secs_f64(), "result");
        }
        ids.push(rec.id);
    }
    if slowest.0 > 1.0 {
        eprintln!(
            "claimer {name}: slowest write {:.2} s ({})",
            slowest.0, slowest.1
        );
    }
    let t1 = now();
    println!(
        "{}",
        serde_json::json!({"ids": ids, "lat_ms": lat, "t0": t0, "t1": t1})
    );
}

struct SimResult {
    claims_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    jobs: usize,
    duplicates: usize,
}

/// `n` claimer processes over `jobs` queued jobs on a fresh database.
fn simulate(pg: &Postgres, db: &str, n: usize, jobs: usize) -> SimResult {
    pg.create_db(db);
    let url = pg.url(db);
    let store = PgStore::open_with(
        &url,
        PgOptions {
            pool_size: 1,
            listen: false,
        },
    )
    .unwrap();
    for _ in 0..jobs {
        store
            .insert(&job(), usize::MAX.into(), &mut |_| Ok(()))
            .unwrap();
    }
    let go = std::env::temp_dir().join(format!("perfbox-bench-go-{}-{db}", std::process::id()));
    let _ = std::fs::remove_file(&go);
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(&exe)
                .env(CHILD, &url)
                .env("PERFBOX_BENCH_GO", &go)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2)); // every child connected and waiting
    std::fs::write(&go, b"go").unwrap();
    let (mut ids, mut lat, mut t0, mut t1) = (vec![], vec![], f64::MAX, 0f64);
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.extend(
            v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_i64().unwrap()),
        );
        lat.extend(
            v["lat_ms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_f64().unwrap()),
        );
        t0 = t0.min(v["t0"].as_f64().unwrap());
        t1 = t1.max(v["t1"].as_f64().unwrap());
    }
    let _ = std::fs::remove_file(&go);
    let total = ids.len();
    ids.sort();
    ids.dedup();
    let left = store.queue_depth().unwrap();
    assert_eq!(left, 0, "jobs left in the queue");
    SimResult {
        claims_per_s: total as f64 / (t1 - t0),
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        jobs: total,
        duplicates: total - ids.len(),
    }
}

/// Submit → perf visible, `n` times, for one cached Dockerfile, polled every 2 ms over one
/// HTTP connection (so the store's share is not hidden by the client). Milliseconds.
fn per_job_ms(s: &Service, n: usize) -> Vec<f64> {
    let dockerfile = "FROM busybox\nCMD echo '{\"perf\": 0.25}' > /data/perf.json\n";
    let first = s.submit(dockerfile);
    s.wait(first); // built once: the rest are image cache hits
    let base = format!("http://127.0.0.1:{}", s.port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let mut out = vec![];
        for _ in 0..n {
            let t = Instant::now();
            let form = reqwest::multipart::Form::new().part(
                "file",
                reqwest::multipart::Part::bytes(dockerfile.as_bytes().to_vec())
                    .file_name("job.Dockerfile"),
            );
            let r: serde_json::Value = http
                .post(format!("{base}/job/build"))
                .multipart(form)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = r["id"].as_i64().unwrap();
            loop {
                let v: serde_json::Value = http
                    .get(format!("{base}/job/performance/{id}"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                match v["status"].as_str() {
                    Some("queued" | "building" | "running") => {
                        tokio::time::sleep(Duration::from_millis(2)).await
                    }
                    _ => {
                        assert_eq!(v["status"], "succeeded", "{v}");
                        break;
                    }
                }
                assert!(t.elapsed() < Duration::from_secs(60));
            }
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out
    })
}

fn buildctl(socket: &str, ctx: &std::path::Path, extra: &[&str]) -> f64 {
    let t = Instant::now();
    let ctx_s = ctx.display().to_string();
    let mut argv = vec![
        "buildctl".to_string(),
        "--addr".into(),
        format!("unix://{socket}"),
        "build".into(),
        "--frontend".into(),
        "dockerfile.v0".into(),
        "--local".into(),
        format!("context={ctx_s}"),
        "--local".into(),
        format!("dockerfile={ctx_s}"),
        "--opt".into(),
        "force-network-mode=none".into(),
        "--output".into(),
        "type=tar,dest=/dev/null".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = common::as_perfbox(&refs).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

fn prune(socket: &str) {
    let out = common::as_perfbox(&[
        "buildctl",
        "--addr",
        &format!("unix://{socket}"),
        "prune",
        "--all",
    ])
    .output()
    .unwrap();
    assert!(out.status.success());
}

/// Node A builds and exports its cache to a scratch registry; node B builds cold, then (pruned)
/// with the cache imported. Seconds: (A no export, A with export, B cold, B import).
fn registry_cache() -> (f64, f64, f64, f64) {
    let dir = common::TestDir::new("bench-cache");
    let reg = dir.path().join("registry");
    std::fs::create_dir_all(reg.join("data")).unwrap();
    let port = common::service::free_port();
    std::fs::write(
        reg.join("config.yml"),
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            reg.join("data").display()
        ),
    )
    .unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM alpine\nRUN sleep 5 && head -c 67108864 /dev/urandom > /blob\nRUN sha256sum /blob > /sum\n",
    )
    .unwrap();
    Command::new("chown")
        .args(["-R", common::user()])
        .arg(dir.path())
        .status()
        .unwrap();
    let mut registry = common::as_perfbox(&[
        "docker-registry",
        "serve",
        reg.join("config.yml").to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Two nodes' build daemons, from scripts/cluster.
    let name = format!("bench-cache-{}", std::process::id());
    let env = [
        ("PERFBOX_CLUSTER_NAME", name.as_str()),
        (
            "PERFBOX_CLUSTER_PORT",
            &common::service::free_port().to_string(),
        ),
        (
            "PERFBOX_CLUSTER_DB_PORT",
            &common::service::free_port().to_string(),
        ),
        (
            "PERFBOX_EXE",
            &common::service::reachable_copy(env!("CARGO_BIN_EXE_perfbox").as_ref())
                .display()
                .to_string(),
        ),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let script = |args: &[&str]| {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    script(&["up", "2"]);
    let sock = |k: u32| {
        format!(
            "{}/{name}/node{k}/buildkit/buildkitd.sock",
            common::run_dir().display()
        )
    };
    let (a, b) = (sock(1), sock(2));
    let cache = format!("type=registry,ref=127.0.0.1:{port}/cache:bench,registry.insecure=true");
    let a_plain = buildctl(&a, &ctx, &[]);
    prune(&a);
    let a_export = buildctl(&a, &ctx, &["--export-cache", &format!("{cache},mode=max")]);
    let b_cold = buildctl(&b, &ctx, &[]);
    prune(&b);
    let b_import = buildctl(&b, &ctx, &["--import-cache", &cache]);
    script(&["down", "--purge"]);
    let _ = registry.kill();
    let _ = registry.wait();
    (a_plain, a_export, b_cold, b_import)
}

fn main() {
    if let Ok(url) = std::env::var(CHILD) {
        claimer(&url);
        return;
    }
    let short = std::env::args().any(|a| a == "--short");
    // `--only store|queue|cache`: one part.
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let pg = Postgres::start("bench-pg").expect("PostgreSQL");
    let mut report = vec![];

    // 1. Store cost per job.
    let n = if short { 10 } else { 40 };
    if part("store") {
        let env: &[(&str, &str)] = &[];
        let mut sqlite = Service::start("bench-sqlite", env);
        let sqlite_ms = per_job_ms(&sqlite, n);
        sqlite.stop();
        pg.create_db("perjob");
        let url = pg.url("perjob");
        let mut on_pg = Service::start("bench-on-pg", &[("PERFBOX_DATABASE_URL", url.as_str())]);
        let pg_ms = per_job_ms(&on_pg, n);
        on_pg.stop();
        let (s50, p50) = (pct(&sqlite_ms, 0.5), pct(&pg_ms, 0.5));
        report.push(format!(
        "| store cost: submit → perf visible, cached image ({n} jobs each) | SQLite p50 {s50:.1} ms, p90 {:.1} ms | PostgreSQL p50 {p50:.1} ms, p90 {:.1} ms | **{:.2}×** |",
        pct(&sqlite_ms, 0.9),
        pct(&pg_ms, 0.9),
        p50 / s50
    ));
    }

    // 2. The queue at scale.
    if part("queue") {
        let jobs = if short { 1000 } else { 5000 };
        let one = simulate(&pg, "sim1", 1, jobs / 5);
        let ten = simulate(&pg, "sim10", 10, jobs);
        let many = simulate(&pg, "sim100", 100, jobs);
        assert_eq!(
            ten.duplicates + many.duplicates,
            0,
            "a job was claimed twice"
        );
        assert_eq!((ten.jobs, many.jobs), (jobs, jobs));
        report.push(format!(
        "| queue: claim + running + result, fenced ({} jobs; 1 claimer: {} jobs) | 1 claimer: {:.0} jobs/s, claim p50 {:.2} ms, p99 {:.2} ms | 100 claimer processes: {:.0} jobs/s, claim p50 {:.2} ms, p99 {:.2} ms, {} claimed twice | **{:.2}×** throughput |",
        many.jobs, one.jobs, one.claims_per_s, one.p50_ms, one.p99_ms,
        many.claims_per_s, many.p50_ms, many.p99_ms, many.duplicates,
        many.claims_per_s / one.claims_per_s
    ));

        report.push(format!(
        "| queue: the same with 10 claimer processes ({} jobs) | 1 claimer (above) | 10 claimers: {:.0} jobs/s, claim p50 {:.2} ms, p99 {:.2} ms, {} claimed twice | **{:.2}×** throughput |",
        ten.jobs, ten.claims_per_s, ten.p50_ms, ten.p99_ms, ten.duplicates,
        ten.claims_per_s / one.claims_per_s
    ));
    }

    // 3. Registry cache between nodes.
    if part("cache") {
        let (a_plain, a_export, b_cold, b_import) = registry_cache();
        report.push(format!(
        "| BuildKit registry cache between nodes (one ~5 s step, 64 MiB layer) | node A without export {a_plain:.2} s; node B cold {b_cold:.2} s | node A exporting {a_export:.2} s; node B importing {b_import:.2} s | export **{:.2}×**, import **{:.2}×** |",
        a_export / a_plain,
        b_import / b_cold
    ));
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n| measure | baseline | perfbox on PostgreSQL | ratio |\n|---|---|---|---|"
    )
    .unwrap();
    for line in report {
        writeln!(out, "{line}").unwrap();
    }
    common::service::stop_all();
}
