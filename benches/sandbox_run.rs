//! Benchmark (not a test): perfbox's sandbox run of a busybox image vs a plain `runc run` of a
//! hand-made rootless bundle (`runc spec --rootless` + the same command + a /data bind), in the
//! same process, interleaved. Prints medians and the ratio; `--write` appends to BENCHMARKS.md.
//! Run as root after scripts/setup: `cargo bench --bench sandbox_run [-- --write]`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use perfbox::image::ImageConfig;
use perfbox::sandbox::runtime::RuntimeKind;
use perfbox::sandbox::{RunEnd, RunRequest, Sandbox, SandboxConfig};
use tokio_util::sync::CancellationToken;

const SCRIPT: &str = r#"echo '{"perf":0.9876}' > /data/perf.json"#;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    require_setup();
    let write = std::env::args().any(|a| a == "--write");
    let runs: usize = std::env::var("PERFBOX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let rootfs = busybox_rootfs();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sandbox = Sandbox::new(SandboxConfig {
        runtime: RuntimeKind::Runc,
        runtime_user: Some(user().into()),
        ..Default::default()
    })
    .unwrap();
    let image = ImageConfig {
        cmd: Some(vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()]),
        ..Default::default()
    };

    // The hand-made bundle: runc's own rootless template, the same command, /data bound.
    let raw = TestDir::new("bench-raw");
    Command::new("chown")
        .arg(user())
        .arg(raw.path())
        .status()
        .unwrap();
    let data = raw.path().join("data");
    std::fs::create_dir(&data).unwrap();
    Command::new("chown")
        .arg(user())
        .arg(&data)
        .status()
        .unwrap();
    assert!(
        as_perfbox(&[
            "sh",
            "-c",
            &format!("cd {} && runc spec --rootless", raw.path().display())
        ])
        .status()
        .unwrap()
        .success()
    );
    let cfg_path = raw.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["root"]["path"] = rootfs.to_string_lossy().into();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["/bin/sh", "-c", SCRIPT]);
    cfg["mounts"].as_array_mut().unwrap().push(serde_json::json!({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}));
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let state = raw.path().join("state");

    let (mut ours, mut floor) = (vec![], vec![]);
    for i in 0..runs + 1 {
        let t = Instant::now();
        let id = format!("bench-raw-{i}");
        let ok = as_perfbox(&[
            "runc",
            "--root",
            &state.to_string_lossy(),
            "run",
            "--bundle",
            &raw.path().to_string_lossy(),
            &id,
        ])
        .status()
        .unwrap()
        .success();
        let raw_time = t.elapsed();
        assert!(
            ok && data.join("perf.json").exists(),
            "plain runc run failed"
        );

        let job = TestDir::new("bench-job");
        let t = Instant::now();
        let report = rt
            .block_on(sandbox.run(RunRequest {
                job_dir: job.path(),
                rootfs: &rootfs,
                image: &image,
                container_id: &format!("bench-{i}"),
                limits: None,
                input: None,
                cancel: CancellationToken::new(),
            }))
            .unwrap();
        let our_time = t.elapsed();
        assert_eq!(report.end, RunEnd::Exited { code: 0 });
        assert_eq!(report.perf, Ok(0.9876));
        if i > 0 {
            // the first pair warms page caches
            floor.push(raw_time);
            ours.push(our_time);
        }
    }
    let (m_ours, m_floor) = (median(&mut ours), median(&mut floor));
    let ratio = m_ours.as_secs_f64() / m_floor.as_secs_f64();
    let line = format!(
        "| {} | {runs} | {:.1} ms | {:.1} ms | {ratio:.2}x |",
        chrono_date(),
        m_floor.as_secs_f64() * 1e3,
        m_ours.as_secs_f64() * 1e3
    );
    println!(
        "sandbox run (busybox, runc): plain runc run median {:.1} ms, perfbox median {:.1} ms, ratio {ratio:.2}x",
        m_floor.as_secs_f64() * 1e3,
        m_ours.as_secs_f64() * 1e3
    );
    println!("{line}");
    if write {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
        let mut text =
            std::fs::read_to_string(&path).unwrap_or_else(|_| "# perfbox benchmarks\n".into());
        let header = "\n## Sandbox run vs plain `runc run`\n\nperfbox's `Sandbox::run` (spec generation, seccomp, cgroup limits, log capture, safe perf read, cleanup) of a busybox\nrootfs vs `setpriv --reuid perfbox runc run` of a `runc spec --rootless` bundle running the same command with /data bound,\ninterleaved, same process, 2-core dev machine (cgroup v1 hybrid). Command: `cargo bench --bench sandbox_run -- --write`.\n\n| date | runs | plain runc run (median) | perfbox run (median) | ratio |\n|---|---|---|---|---|\n";
        if !text.contains("## Sandbox run vs plain") {
            text.push_str(header);
        }
        text.push_str(&line);
        text.push('\n');
        std::fs::write(&path, text).unwrap();
    }
    remove_busybox_rootfs();
}

fn chrono_date() -> String {
    let out = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
