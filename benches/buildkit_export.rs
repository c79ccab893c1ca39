//! Build + export through perfbox's BuildKit client vs `buildctl` (+ `tar -x`), warm cache.
//!
//! Run: `flock /tmp/perfbox-cargo.lock cargo bench --bench buildkit_export` (as root, with the
//! rootless buildkitd from `scripts/setup` running). Prints medians of N interleaved runs per
//! Dockerfile and the ratio; not a test, nothing is asserted.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use perfbox::buildkit::{BuildRequest, BuildkitClient, NullLog};

#[path = "../tests/common/mod.rs"]
mod common;

/// The rootless buildkitd of the setup under test.
fn socket() -> String {
    common::buildkit_socket()
}
const RUNS: usize = 7;

struct Case {
    name: &'static str,
    dockerfile: &'static str,
}

const CASES: [Case; 2] = [
    Case {
        name: "busybox + RUN (2.1 MB rootfs)",
        dockerfile: "FROM busybox\nRUN echo built > /built\nCMD [\"cat\",\"/built\"]\n",
    },
    Case {
        name: "python:3-slim + RUN",
        dockerfile: "FROM python:3-slim\nRUN echo built > /built\nCMD [\"python3\",\"-c\",\"print(1)\"]\n",
    },
];

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `buildctl build ... --output type=tar` then `tar -x`, like a shell pipeline would do it.
fn buildctl_once(context: &Path, work: &Path) -> Duration {
    let tar = work.join("image.tar");
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("mkdir");
    let t = Instant::now();
    let st = Command::new("buildctl")
        .args([
            "--addr",
            &format!("unix://{}", socket()),
            "build",
            "--frontend",
            "dockerfile.v0",
        ])
        .arg("--local")
        .arg(format!("context={}", context.display()))
        .arg("--local")
        .arg(format!("dockerfile={}", context.display()))
        .args([
            "--opt",
            "force-network-mode=none",
            "--progress",
            "quiet",
            "--output",
        ])
        .arg(format!("type=tar,dest={}", tar.display()))
        .status()
        .expect("run buildctl");
    assert!(st.success(), "buildctl failed");
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&rootfs)
        .status()
        .expect("run tar");
    assert!(st.success(), "tar -x failed");
    t.elapsed()
}

fn main() {
    // `cargo bench` passes `--bench`; there are no options. Diagnostic: with
    // BENCH_UNPACK_TAR=<file.tar>, only time `unpack_tar` of that file (no daemon involved).
    if let Some(tar) = std::env::var_os("BENCH_UNPACK_TAR") {
        for _ in 0..3 {
            let dst = tempfile::tempdir().expect("tempdir");
            let file = std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(&tar).expect("open"),
            );
            let t = Instant::now();
            let stats = perfbox::buildkit::unpack_tar(file, dst.path()).expect("unpack");
            let d = t.elapsed();
            println!(
                "unpack_tar: {} entries, {:.1} MB in {:.0} ms ({:.0} MB/s)",
                stats.entries,
                stats.tar_bytes as f64 / 1e6,
                ms(d),
                stats.tar_bytes as f64 / 1e6 / d.as_secs_f64()
            );
        }
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt
        .block_on(BuildkitClient::connect(&format!("unix://{}", socket())))
        .expect("client");
    let info = rt
        .block_on(client.health())
        .expect("buildkitd must be running (scripts/setup)");
    println!(
        "buildkitd {} ({} worker(s)), {RUNS} interleaved runs per tool, warm cache",
        info.version,
        info.workers.len()
    );

    for case in &CASES {
        let scratch = tempfile::tempdir().expect("tempdir");
        let context = scratch.path().join("context");
        std::fs::create_dir(&context).expect("mkdir");
        std::fs::write(context.join("Dockerfile"), case.dockerfile).expect("write");

        let ours_once = |i: usize, tag: &str| {
            let dir = scratch.path().join(format!("ours-{tag}-{i}"));
            let mut req =
                BuildRequest::new(case.dockerfile.as_bytes().to_vec(), dir.join("rootfs"));
            req.source_policy =
                perfbox::buildkit::SourcePolicy::new(&[common::registry()]).expect("registry");
            let t = Instant::now();
            let img = rt.block_on(client.build(req, NullLog)).expect("build");
            let elapsed = t.elapsed();
            let _ = std::fs::remove_dir_all(&dir);
            (elapsed, img)
        };

        // Warm up both paths (cache, page cache, connection).
        let (_, mut last) = ours_once(0, "warmup");
        let w = scratch.path().join("buildctl-warmup");
        buildctl_once(&context, &w);
        let _ = std::fs::remove_dir_all(&w);

        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut mbps = Vec::new();
        for i in 0..RUNS {
            let (d, img) = ours_once(i, "run");
            ours.push(d);
            mbps.push(img.export_mb_per_s());
            last = img;
            let w = scratch.path().join(format!("buildctl-{i}"));
            theirs.push(buildctl_once(&context, &w));
            let _ = std::fs::remove_dir_all(&w);
        }
        let (ours_min, ours_max) = (ours.iter().min().copied(), ours.iter().max().copied());
        let (th_min, th_max) = (theirs.iter().min().copied(), theirs.iter().max().copied());
        let ours_med = median(&mut ours);
        let theirs_med = median(&mut theirs);
        mbps.sort_by(f64::total_cmp);
        println!(
            "\n{} — export {:.1} MB, {}/{} steps cached",
            case.name,
            last.export_bytes as f64 / 1e6,
            last.cached_steps,
            last.total_steps
        );
        println!(
            "  perfbox client : median {:7.1} ms  (min {:.1}, max {:.1})  export {:.0} MB/s (median)",
            ms(ours_med),
            ms(ours_min.unwrap_or_default()),
            ms(ours_max.unwrap_or_default()),
            mbps[mbps.len() / 2]
        );
        println!(
            "  buildctl + tar : median {:7.1} ms  (min {:.1}, max {:.1})",
            ms(theirs_med),
            ms(th_min.unwrap_or_default()),
            ms(th_max.unwrap_or_default())
        );
        println!(
            "  ratio buildctl/perfbox = {:.2}x",
            ms(theirs_med) / ms(ours_med)
        );
    }
}
