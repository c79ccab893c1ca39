//! perfbox benchmark suite (not a test): everything measured in one run, side by side with the
//! raw floor, printed as medians and ratios and written to BENCHMARKS.md (`--write`).
//!
//! 1. raw floor: `buildctl build` (tar export) + untar + plain `runc run` of a hand-made bundle
//! 2. perfbox cold: submit → perf visible, first build of that Dockerfile
//! 3. perfbox warm: the same Dockerfile again, and one differing only in CMD
//! 4. API: GET /job/performance throughput and latency from this (second) process on loopback
//! 5. scale: 200 submissions at once; service RSS peak and idle
//! 6. export: a ~200 MB image (python base + generated data), solve to runnable rootfs
//!
//! `cargo bench --bench suite [-- --short] [-- --write] [-- --shared-cache]` as root after
//! scripts/setup; `--shared-cache` runs the service with one owner's cache shared (see main); `--short`
//! is the quick version CI may run (it never fails on a number).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::service::{Service, stop_all};
use common::*;

struct Opts {
    short: bool,
    write: bool,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn job_dockerfile(nonce: &str, perf: &str) -> String {
    format!(
        "FROM busybox\nRUN echo {nonce} > /nonce\nCMD echo '{{\"perf\": {perf}}}' > /data/perf.json\n"
    )
}

/// The cheapest a user could do by hand: buildctl → tar → untar → runc run. Seconds.
fn raw_floor(work: &Path, dockerfile: &str, template: &serde_json::Value) -> f64 {
    let dir = work.join(format!("floor-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    Command::new("chown")
        .arg(user())
        .arg(&dir)
        .status()
        .unwrap();
    let t = Instant::now();
    let tar = dir.join("image.tar");
    if let Err(log) = buildctl_build(
        &buildkit_socket(),
        &dir,
        dockerfile,
        &tar,
        &["--opt", "force-network-mode=none"],
    ) {
        panic!("buildctl build failed:\n{log}");
    }
    let rootfs = dir.join("rootfs");
    assert!(
        as_perfbox(&[
            "sh",
            "-c",
            &format!(
                "mkdir {0} && tar -C {0} -xf {1}/image.tar",
                rootfs.display(),
                dir.display()
            )
        ])
        .status()
        .unwrap()
        .success()
    );
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    Command::new("chown")
        .arg(user())
        .arg(&data)
        .status()
        .unwrap();
    let mut cfg = template.clone();
    cfg["root"]["path"] = rootfs.to_string_lossy().into();
    cfg["mounts"].as_array_mut().unwrap().push(serde_json::json!({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}));
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let state = dir.join("state");
    let id = format!("floor-{}", uuid::Uuid::new_v4().simple());
    assert!(
        as_perfbox(&[
            "runc",
            "--root",
            &state.to_string_lossy(),
            "run",
            "--bundle",
            &dir.to_string_lossy(),
            &id
        ])
        .status()
        .unwrap()
        .success()
    );
    let perf = std::fs::read_to_string(data.join("perf.json")).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(perf.contains("perf"));
    let _ = std::fs::remove_dir_all(&dir);
    secs
}

fn runc_template(work: &Path) -> serde_json::Value {
    let d = work.join("template");
    std::fs::create_dir_all(&d).unwrap();
    Command::new("chown").arg(user()).arg(&d).status().unwrap();
    assert!(
        as_perfbox(&[
            "sh",
            "-c",
            &format!("cd {} && runc spec --rootless", d.display())
        ])
        .status()
        .unwrap()
        .success()
    );
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] =
        serde_json::json!(["/bin/sh", "-c", "echo '{\"perf\": 1}' > /data/perf.json"]);
    cfg
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// Submit and poll until perf is visible. Seconds from submit to the answer.
    async fn job(&self, dockerfile: &str) -> (f64, serde_json::Value) {
        let t = Instant::now();
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(dockerfile.as_bytes().to_vec())
                .file_name("job.Dockerfile"),
        );
        let v: serde_json::Value = self
            .http
            .post(format!("{}/job/build", self.base))
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = v["id"].as_i64().unwrap_or_else(|| panic!("{v}"));
        loop {
            let p: serde_json::Value = self
                .http
                .get(format!("{}/job/performance/{id}", self.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if !matches!(
                p["status"].as_str(),
                Some("queued" | "building" | "running")
            ) {
                return (t.elapsed().as_secs_f64(), p);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn rss_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn service_pid(s: &Service) -> u32 {
    common::service::SPAWNED
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(_, d)| d == s.dir.path())
        .map(|(p, _)| *p)
        .unwrap()
}

fn main() {
    require_setup();
    let args: Vec<String> = std::env::args().collect();
    let o = Opts {
        short: args.iter().any(|a| a == "--short"),
        write: args.iter().any(|a| a == "--write"),
    };
    let n = if o.short { 3 } else { 9 };
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/perfbox");
    let binary = if binary.exists() {
        binary
    } else {
        PathBuf::from(env!("CARGO_BIN_EXE_perfbox"))
    };
    let work = TestDir::new("bench-suite");
    let template = runc_template(work.path());
    // `--shared-cache`: the cache shared by one owner's jobs and two build slots for it, as
    // before build isolation (to compare the pipeline itself); default: the shipped defaults
    // (every job's cache its own, one build slot per owner).
    let shared = args.iter().any(|a| a == "--shared-cache");
    let mut env = vec![("PERFBOX_MAX_CONCURRENT_RUNS", "4")];
    if shared {
        env.extend([
            ("PERFBOX_BUILD_CACHE_SCOPE", "owner"),
            ("PERFBOX_MAX_BUILDS_PER_OWNER", "2"),
        ]);
    }
    println!(
        "service: {}",
        if shared {
            "cache_scope = owner, max_builds_per_owner = 2 (--shared-cache)"
        } else {
            "shipped defaults (cache_scope = job, max_builds_per_owner = 1)"
        }
    );
    let svc = Service::start_with(binary.clone(), "bench-svc", &env);
    let pid = service_pid(&svc);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{}", svc.port),
    };
    let mut report = vec![];
    let mut line = |s: String| {
        println!("{s}");
        report.push(s);
    };
    let idle_rss = rss_kb(pid, "VmRSS");

    // Warm BuildKit's cache of the base image for both sides.
    raw_floor(work.path(), &job_dockerfile("warmup", "1"), &template);
    rt.block_on(client.job(&job_dockerfile("warmup-svc", "1")));

    // 1-3. floor, cold, warm, warm-CMD, interleaved.
    let (mut floor, mut cold, mut warm, mut warm_cmd) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        floor.push(raw_floor(
            work.path(),
            &job_dockerfile(&format!("floor-{nonce}"), "1"),
            &template,
        ));
        let df = job_dockerfile(&nonce, "1");
        let (c, v) = rt.block_on(client.job(&df));
        assert_eq!(v["status"], "succeeded", "{v}");
        cold.push(c);
        let (w, v) = rt.block_on(client.job(&df));
        assert_eq!(v["status"], "succeeded", "{v}");
        warm.push(w);
        let (wc, v) = rt.block_on(client.job(&job_dockerfile(&nonce, &format!("{i}.5"))));
        assert_eq!(v["perf"].as_f64(), Some(i as f64 + 0.5), "{v}");
        warm_cmd.push(wc);
    }
    let f = median(&floor);
    line("| measurement | median | ratio to floor |".into());
    line("|---|---|---|".into());
    line(format!(
        "| raw floor: buildctl build + untar + runc run | {:.0} ms | 1.00x |",
        f * 1e3
    ));
    line(format!(
        "| perfbox cold (new Dockerfile, submit → perf visible) | {:.0} ms | {:.2}x |",
        median(&cold) * 1e3,
        median(&cold) / f
    ));
    line(format!(
        "| perfbox warm (same Dockerfile again) | {:.0} ms | {:.2}x |",
        median(&warm) * 1e3,
        median(&warm) / f
    ));
    line(format!(
        "| perfbox warm, only CMD changed | {:.0} ms | {:.2}x |",
        median(&warm_cmd) * 1e3,
        median(&warm_cmd) / f
    ));

    // 5. scale: 200 submissions at once.
    let scale_n = if o.short { 50 } else { 200 };
    let t = Instant::now();
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..scale_n)
            .map(|i| {
                let c = Client {
                    http: client.http.clone(),
                    base: client.base.clone(),
                };
                tokio::spawn(
                    async move { c.job(&job_dockerfile("scale", &format!("{i}"))).await.1 },
                )
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let scale_secs = t.elapsed().as_secs_f64();
    let ok = results
        .iter()
        .filter(|v| v["status"] == "succeeded")
        .count();
    for v in results.iter().filter(|v| v["status"] != "succeeded") {
        eprintln!("scale: a job did not succeed: {v}");
    }
    let peak_rss = rss_kb(pid, "VmHWM");
    line(format!(
        "| scale: {scale_n} submissions at once, all finished | {scale_secs:.1} s ({ok}/{scale_n} succeeded) | |"
    ));

    // 4. API: GET /job/performance under load, with a few thousand jobs in the store.
    let store_jobs = if o.short { 100 } else { 2000 };
    rt.block_on(async {
        let df = job_dockerfile("fill", "1");
        let mut pending = vec![];
        for _ in 0..store_jobs {
            let c = Client {
                http: client.http.clone(),
                base: client.base.clone(),
            };
            let df = df.clone();
            pending.push(tokio::spawn(async move { c.job(&df).await }));
            if pending.len() >= 64 {
                for p in pending.drain(..) {
                    p.await.unwrap();
                }
            }
        }
        for p in pending {
            p.await.unwrap();
        }
    });
    let total: i64 = svc.total_jobs();
    let secs = if o.short { 2.0 } else { 10.0 };
    let conns = 32;
    let (count, lat) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = vec![];
        for c in 0..conns {
            let (stop, count) = (stop.clone(), count.clone());
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let base = client.base.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = vec![];
                let mut i = c as i64;
                while !stop.load(Ordering::Relaxed) {
                    let id = 1 + (i * 7919) % total;
                    i += 1;
                    let t = Instant::now();
                    let r = http
                        .get(format!("{base}/job/performance/{id}"))
                        .send()
                        .await
                        .unwrap();
                    let _ = r.bytes().await.unwrap();
                    lat.push(t.elapsed().as_secs_f64());
                    count.fetch_add(1, Ordering::Relaxed);
                }
                lat
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut lat = vec![];
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        (count.load(Ordering::Relaxed), lat)
    });
    line(format!(
        "| API: GET /job/performance, {conns} keep-alive connections, {total} jobs in store | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms | |",
        count as f64 / secs,
        pct(&lat, 0.5) * 1e3,
        pct(&lat, 0.99) * 1e3
    ));
    std::thread::sleep(Duration::from_secs(2));
    let idle_after = rss_kb(pid, "VmRSS");
    line(format!(
        "| service RSS: idle at start / peak / idle after load | {} MB / {} MB / {} MB | |",
        idle_rss / 1024,
        peak_rss.max(rss_kb(pid, "VmHWM")) / 1024,
        idle_after / 1024
    ));

    // 6. export: ~200 MB image through perfbox's BuildKit client vs buildctl + untar.
    let mb = if o.short { 50 } else { 150 };
    let big = format!(
        "FROM python:3-slim\nRUN head -c {}000000 /dev/urandom > /blob\nCMD true\n",
        mb
    );
    let (ours, bytes) = rt.block_on(async {
        let client =
            perfbox::buildkit::BuildkitClient::connect(&format!("unix://{}", buildkit_socket()))
                .await
                .unwrap();
        let mut best = (f64::MAX, 0u64);
        for i in 0..3 {
            let dst = work.path().join(format!("export-{i}"));
            let mut req =
                perfbox::buildkit::BuildRequest::new(big.clone().into_bytes(), dst.clone());
            req.source_policy =
                perfbox::buildkit::SourcePolicy::new(&[registry()]).expect("registry");
            let t = Instant::now();
            let built = client.build(req, perfbox::buildkit::NullLog).await.unwrap();
            let s = t.elapsed().as_secs_f64();
            if i > 0 && s < best.0 {
                best = (s, built.export_bytes);
            }
            let _ = std::fs::remove_dir_all(&dst);
        }
        best
    });
    let mut floor_export = f64::MAX;
    for _ in 0..2 {
        let dir = work.path().join("export-floor");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), &big).unwrap();
        let t = Instant::now();
        assert!(Command::new("sh").arg("-c").arg(format!(
            "buildctl --addr unix://{1} build --frontend dockerfile.v0 --local context={0} --local dockerfile={0} --opt force-network-mode=none --output type=tar,dest=- | (mkdir -p {0}/rootfs && tar -C {0}/rootfs -xf -)",
            dir.display(),
            buildkit_socket()
        )).stderr(Stdio::null()).status().unwrap().success());
        floor_export = floor_export.min(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&dir);
    }
    line(format!(
        "| export: {:.0} MB image, solve → runnable rootfs (best of warm runs) | perfbox {:.2} s = {:.0} MB/s; buildctl \\| tar -x {:.2} s | {:.2}x |",
        bytes as f64 / 1e6,
        ours,
        bytes as f64 / 1e6 / ours,
        floor_export,
        ours / floor_export
    ));
    line(
        "| docker build + docker run | not measured: no Docker engine runs on these machines | |"
            .into(),
    );

    drop(svc);
    stop_all();
    if o.write {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
        let mut text =
            std::fs::read_to_string(&path).unwrap_or_else(|_| "# perfbox benchmarks\n".into());
        if let Some(i) = text.find("\n## Suite") {
            let end = text[i + 1..]
                .find("\n## ")
                .map(|j| i + 1 + j)
                .unwrap_or(text.len());
            text.replace_range(i..end, "");
        }
        let date = String::from_utf8_lossy(
            &Command::new("date")
                .args(["-u", "+%Y-%m-%d %H:%M UTC"])
                .output()
                .unwrap()
                .stdout,
        )
        .trim()
        .to_string();
        text.push_str(&format!(
            "\n## Suite ({date}, {} run)\n\n2-core dev machine, Debian 12, cgroup v1 hybrid, rootless buildkitd v0.13.2, runc 1.1.5, release build.\nCommand: `cargo bench --bench suite -- --write{}`. Medians of {n} interleaved runs.\n\n{}\n",
            if o.short { "short" } else { "full" },
            if o.short { " --short" } else { "" },
            report.join("\n")
        ));
        std::fs::write(&path, text).unwrap();
    }
}
