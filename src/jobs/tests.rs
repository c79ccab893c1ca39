//! The job service driven by fakes ([`super::fakes`]): every state transition, cancellation at
//! each phase, timeouts, low disk, the image cache, fair build slots and restart recovery, with
//! no root and no daemon.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::store::{Claim, NewJob};
use super::*;
use crate::config::Config;

use super::fakes::{FakeService, fake_config, fake_service, fake_service_in, fake_service_with};

type Harness = FakeService;

async fn harness(tune: impl FnOnce(&mut Config)) -> Harness {
    fake_service(tune).await
}

async fn start(dir: tempfile::TempDir, cfg: Config) -> Harness {
    fake_service_in(dir, cfg).await
}

fn config(dir: &std::path::Path) -> Config {
    fake_config(dir)
}

#[tokio::test]
async fn a_job_goes_queued_building_running_succeeded() {
    let h = harness(|_| {}).await;
    let id = h.submit("perf=0.75");
    let rec = h.finish(id).await;
    assert_eq!(rec.status, JobStatus::Succeeded);
    assert_eq!(rec.perf, Some(0.75));
    assert_eq!(rec.exit_code, Some(0));
    assert_eq!(rec.image_cache.as_deref(), Some("miss"));
    assert!(rec.build_started_at.is_some() && rec.run_started_at.is_some());
    assert!(rec.finished_at.is_some());
    let build = rec.build_json().unwrap();
    assert_eq!(build["cache_scope"], "job");
    assert!(
        build["scope"]
            .as_str()
            .unwrap()
            .starts_with(&format!("job-{id}-"))
    );
    assert_eq!(build["cgroup"]["shared_with_daemon"], "fake");
    let metrics = h.svc.metrics_text().unwrap();
    assert!(
        metrics.contains("perfbox_jobs{status=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("perfbox_queue_depth 0"), "{metrics}");
    let health = h.svc.health().await;
    assert!(health.ok);
    assert_eq!(health.buildkit.version.as_deref(), Some("fake-buildkit"));
}

#[tokio::test]
async fn every_failure_has_its_status_and_reason() {
    let h = harness(|_| {}).await;
    let cases = [
        (
            "build-fails",
            JobStatus::BuildFailed,
            "RUN failed on line 2",
        ),
        ("run-exits-3", JobStatus::RunFailed, "exited with code 3"),
        ("run-oom", JobStatus::RunFailed, "out of memory"),
        ("run-no-perf", JobStatus::NoPerf, "wrote no /data/perf.json"),
        ("run-bad-perf", JobStatus::InvalidPerf, "not a number"),
        ("run-timeout", JobStatus::TimedOut, "exceeded its 8 s limit"),
        (
            "run-errors",
            JobStatus::RunFailed,
            "could not prepare the run",
        ),
    ];
    let ids: Vec<JobId> = cases.iter().map(|(s, _, _)| h.submit(s)).collect();
    for (id, (script, status, reason)) in ids.into_iter().zip(cases) {
        let rec = h.finish(id).await;
        assert_eq!(rec.status, status, "{script}: {rec:?}");
        let error = rec.error.unwrap_or_default();
        assert!(error.contains(reason), "{script}: {error}");
        assert!(
            rec.build.is_some(),
            "{script}: the build is recorded on every path"
        );
    }
}

#[tokio::test]
async fn a_runtime_failing_in_its_own_setup_gets_one_more_run_not_more() {
    let h = harness(|_| {}).await;
    let once = h.submit("run-runtime-flake perf=0.7");
    let rec = h.finish(once).await;
    assert_eq!(rec.status, JobStatus::Succeeded, "{rec:?}");
    assert_eq!(rec.perf, Some(0.7));
    assert_eq!(h.runner.runs.load(Ordering::SeqCst), 2);
    let always = h.submit("run-runtime-flake-always");
    let rec = h.finish(always).await;
    assert_eq!(rec.status, JobStatus::RunFailed, "{rec:?}");
    assert!(
        rec.error.unwrap_or_default().contains("cloned binary"),
        "the reason shows the runtime's words"
    );
    assert_eq!(
        h.runner.runs.load(Ordering::SeqCst),
        4,
        "two runs each, no third"
    );
}

#[tokio::test]
async fn cancel_works_in_every_phase_and_leaves_nothing_running() {
    let h = harness(|c| {
        c.max_concurrent_builds = 1;
        c.max_concurrent_runs = 1;
    })
    .await;
    // Running: a run that only ends when cancelled holds the only run slot.
    let running = h.submit("run-hangs");
    h.wait_for(running, |s| s == JobStatus::Running).await;
    // Built, waiting for the run slot (still "building").
    let waiting = h.submit("x");
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.builder.builds.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Building: a build that only ends when cancelled holds the only build slot.
    let building = h.submit("build-hangs");
    h.wait_for(building, |s| s == JobStatus::Building).await;
    // Queued behind it.
    let queued = h.submit("x");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.get(queued).status, JobStatus::Queued);
    assert_eq!(h.svc.queue_position(queued).unwrap(), 0);

    for (id, why) in [
        (queued, "before it started"),
        (building, "during the build"),
        (waiting, "before the run"),
        (running, "while running"),
    ] {
        let rec = h.svc.cancel(id, &None).await.unwrap();
        assert_eq!(rec.status, JobStatus::Cancelled, "{why}: {rec:?}");
        assert!(rec.error.unwrap().contains(why), "{why}");
    }
    assert_eq!(h.builder.running.load(Ordering::SeqCst), 0);
    assert_eq!(h.runner.running.load(Ordering::SeqCst), 0);
    assert!(matches!(
        h.svc.cancel(queued, &None).await,
        Err(JobError::Finished { .. })
    ));
    // The slots are free again.
    assert_eq!(h.finish(h.submit("perf=1")).await.perf, Some(1.0));
}

#[tokio::test]
async fn a_build_past_its_timeout_is_timed_out() {
    let h = harness(|c| c.build_timeout_secs = 1).await;
    let rec = h.finish(h.submit("build-hangs")).await;
    assert_eq!(rec.status, JobStatus::TimedOut);
    assert!(rec.error.unwrap().contains("exceeded its 1 s limit"));
    assert_eq!(
        h.builder.running.load(Ordering::SeqCst),
        0,
        "the build was dropped"
    );
}

#[tokio::test]
async fn low_disk_refuses_builds() {
    let h = harness(|c| c.min_free_disk_bytes = u64::MAX).await;
    let rec = h.finish(h.submit("x")).await;
    assert_eq!(rec.status, JobStatus::BuildFailed);
    assert!(rec.error.unwrap().contains("not started: the disk holding"));
    assert_eq!(h.builder.builds.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_image_cache_is_shared_only_within_the_cache_scope() {
    // Job scope (the default): nothing is shared, every job builds.
    let h = harness(|_| {}).await;
    let a = h.finish(h.submit("same")).await;
    let b = h.finish(h.submit("same")).await;
    assert_eq!(a.image_cache.as_deref(), Some("miss"));
    assert_eq!(b.image_cache.as_deref(), Some("miss"));
    assert_eq!(h.builder.builds.load(Ordering::SeqCst), 2);
    let scopes: Vec<String> = h
        .builder
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.scope.as_ref().unwrap().as_str().to_owned())
        .collect();
    assert_ne!(scopes[0], scopes[1]);

    // Owner scope: the same owner's resubmission reuses the image, another owner's does not.
    let h = harness(|c| c.build.cache_scope = crate::config::CacheScope::Owner).await;
    let a = h.finish(h.submit_as("alice", "same")).await;
    let b = h.finish(h.submit_as("alice", "same")).await;
    let c = h.finish(h.submit_as("bob", "same")).await;
    assert_eq!(a.image_cache.as_deref(), Some("miss"));
    assert_eq!(b.image_cache.as_deref(), Some("hit"));
    assert_eq!(c.image_cache.as_deref(), Some("miss"));
    assert_eq!(
        h.builder.builds.load(Ordering::SeqCst),
        2,
        "alice's second needed no build"
    );
}

#[tokio::test]
async fn one_owner_cannot_hold_every_build_slot() {
    let h = harness(|c| {
        c.max_concurrent_builds = 2;
        c.build.max_builds_per_owner = 1;
    })
    .await;
    let slow1 = h.submit_as("mallory", "build-hangs");
    let slow2 = h.submit_as("mallory", "build-hangs");
    h.wait_for(slow1, |s| s == JobStatus::Building).await;
    let alice = h.submit_as("alice", "perf=0.25");
    let rec = h.finish(alice).await;
    assert_eq!(
        rec.perf,
        Some(0.25),
        "alice's job ran beside mallory's slow build"
    );
    assert_eq!(
        h.get(slow2).status,
        JobStatus::Queued,
        "mallory holds one slot only"
    );
    assert_eq!(h.builder.peak.load(Ordering::SeqCst), 2);
    h.svc.cancel(slow1, &None).await.unwrap();
    h.wait_for(slow2, |s| s == JobStatus::Building).await;
    h.svc.cancel(slow2, &None).await.unwrap();
}

#[tokio::test]
async fn bad_submissions_queue_nothing() {
    let h = harness(|c| c.max_queued_jobs = 1).await;
    let submit = |df: &[u8], options: &BuildOptions| h.svc.submit("x", df, None, "anyone", options);
    let ok = BuildOptions::default();
    assert!(matches!(
        submit(b"", &ok),
        Err(JobError::InvalidDockerfile(_))
    ));
    assert!(matches!(
        submit(b"\xff\xfe", &ok),
        Err(JobError::InvalidDockerfile(_))
    ));
    assert!(matches!(
        submit(b"FROM x\0", &ok),
        Err(JobError::InvalidDockerfile(_))
    ));
    let big = vec![b'#'; (1 << 20) + 1];
    assert!(matches!(submit(&big, &ok), Err(JobError::TooLarge { .. })));
    let mut knob = BuildOptions::default();
    knob.build_args
        .insert("BUILDKIT_CACHE_MOUNT_NS".into(), "x".into());
    assert!(matches!(
        submit(b"FROM x", &knob),
        Err(JobError::InvalidRequest(_))
    ));
    assert_eq!(h.svc.list(&None, &[], None, 10).unwrap().1, 0);
    // A full queue (the worker cannot take a job while the only build hangs).
    let first = h.submit("build-hangs");
    h.wait_for(first, |s| s == JobStatus::Building).await;
    h.submit("x");
    assert!(matches!(
        submit(b"FROM x", &ok),
        Err(JobError::QueueFull(1))
    ));
    h.svc.cancel(first, &None).await.unwrap();
}

#[tokio::test]
async fn build_args_reach_the_builder_with_the_scope() {
    let h = harness(|_| {}).await;
    let mut options = BuildOptions::default();
    options.build_args.insert("SCORE".into(), "3".into());
    options.target = Some("final".into());
    let id = h
        .svc
        .submit("j", b"FROM busybox\n", None, "anyone", &options)
        .unwrap()
        .id;
    h.finish(id).await;
    let seen = h.builder.seen.lock().unwrap();
    assert_eq!(seen[0].build_args["SCORE"], "3");
    assert_eq!(seen[0].target.as_deref(), Some("final"));
    assert!(seen[0].scope.is_some());
    assert_eq!(seen[0].max_image_bytes, Some(8 << 30));
}

#[tokio::test]
async fn a_restart_interrupts_what_the_service_held_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // What a previous run of this service left: one job it was building, one finished, one
    // queued.
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    std::fs::write(cfg.state_dir.join("instance"), "0badcafe").unwrap();
    {
        let store = SqliteStore::open(&cfg.state_dir.join("jobs.db")).unwrap();
        let new = NewJob {
            filename: "a",
            owner: None,
            submitter: "anyone",
            dockerfile_sha256: "x",
            idempotency_key: None,
            files: &[],
        };
        let mut prepare = |id: JobId| {
            let dir = JobDir::new(cfg.state_dir.join("jobs").join(id.to_string()));
            dir.create(
                b"# fake: perf=0.125\nFROM busybox\n",
                &BuildOptions::default(),
                None,
            )
        };
        for _ in 0..3 {
            store.insert(&new, 10.into(), &mut prepare).unwrap();
        }
        let claim = Claim {
            node: "0badcafe",
            build_slots: 2,
            per_owner: 2,
            lease: Duration::from_secs(60),
        };
        store.claim(&claim).unwrap(); // 1: building when it died
        store.claim(&claim).unwrap();
        store
            .transition(2, JobStatus::Running, Patch::default())
            .unwrap();
        store
            .transition(
                2,
                JobStatus::Succeeded,
                Patch {
                    perf: Some(0.5),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    let h = start(dir, cfg).await;
    let one = h.get(1);
    assert_eq!(one.status, JobStatus::Interrupted);
    assert!(
        one.error
            .unwrap()
            .contains("perfbox stopped while the job was building")
    );
    assert_eq!(
        h.runner.reaped.lock().unwrap().len(),
        1,
        "its container was reaped"
    );
    assert_eq!(h.get(2).perf, Some(0.5), "finished results are kept");
    let three = h.finish(3).await;
    assert_eq!(
        three.perf,
        Some(0.125),
        "the queued job ran after the restart"
    );
}

#[tokio::test]
async fn one_owners_builds_share_its_cgroup_until_the_last_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (cgroot, cgroups) = cgroupfs_standin(dir.path());
    assert!(cgroups.available());
    let mut cfg = config(&dir.path().join("state"));
    cfg.build.cache_scope = crate::config::CacheScope::Owner;
    cfg.build.max_builds_per_owner = 2;
    let h = fake_service_with(dir, cfg, cgroups).await;
    *h.builder.cgroup_root.lock().unwrap() = Some(cgroot.clone());
    // The short build ends first and gives the cgroup back; the long one still needs it.
    let long = h.submit_as("alice", "build-checks-cgroup");
    let short = h.submit_as("alice", "x");
    let long = h.finish(long).await;
    assert_eq!(h.finish(short).await.status, JobStatus::Succeeded);
    assert_eq!(long.status, JobStatus::Succeeded, "{:?}", long.error);
    let scope = long.build_json().unwrap()["cgroup"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(scope.starts_with("/pb/runs/owner-"), "{scope}");
    assert_eq!(
        h.builder.peak.load(Ordering::SeqCst),
        2,
        "the two builds ran together"
    );
}

/// A cgroupfs stand-in under `dir` where builds get cgroups of their own (v1 layout, parent
/// `/pb/runs`): its root, and the build cgroups found there.
fn cgroupfs_standin(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    crate::sandbox::build_cgroup::BuildCgroups,
) {
    let cgroot = dir.join("cgroup");
    for h in ["memory", "pids"] {
        std::fs::create_dir_all(cgroot.join(h).join("pb/runs")).unwrap();
    }
    let uid = nix::unistd::geteuid().as_raw();
    let cgroups = crate::sandbox::build_cgroup::BuildCgroups::detect_in(&cgroot, "/pb/runs", uid);
    (cgroot, cgroups)
}

/// A fake service whose builds get cgroups of their own, as on a host where every audit rule
/// can pass.
async fn harness_with_build_cgroups() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (_, cgroups) = cgroupfs_standin(dir.path());
    let cfg = config(&dir.path().join("state"));
    fake_service_with(dir, cfg, cgroups).await
}

fn failed_rules(a: &audit::JobAudit) -> Vec<&'static str> {
    a.findings
        .iter()
        .filter(|f| !f.ok)
        .map(|f| f.rule)
        .collect()
}

#[tokio::test]
async fn a_job_as_the_service_ran_it_passes_its_audit_and_an_edited_spec_fails() {
    let h = harness_with_build_cgroups().await;
    let id = h.submit("perf=0.5");
    let rec = h.finish(id).await;
    assert_eq!(rec.status, JobStatus::Succeeded);
    let digest = rec.spec_sha256.clone().unwrap();
    assert_eq!(rec.runtime_version.as_deref(), Some("fake-runtime 1.0"));

    let a = h.svc.audit(id, &None).unwrap();
    assert!(a.ok, "{:#?}", a.findings);
    let rules: Vec<&str> = a.findings.iter().map(|f| f.rule).collect();
    assert_eq!(rules.len(), 5 + 1 + 10, "{rules:?}");
    assert!(a.not_audited.is_empty());

    // The file changes after the run: integrity fails, and the rule the change breaks.
    let spec_path = h.svc.job_dir(id).spec();
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    spec["process"]["capabilities"]["bounding"] = serde_json::json!(["CAP_SYS_ADMIN"]);
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let a = h.svc.audit(id, &None).unwrap();
    assert!(!a.ok);
    assert_eq!(failed_rules(&a), ["spec_integrity", "no_capabilities"]);
    let integrity = &a
        .findings
        .iter()
        .find(|f| f.rule == "spec_integrity")
        .unwrap();
    assert_eq!(integrity.evidence[0].value, serde_json::json!(digest));

    // A missing file fails too.
    std::fs::remove_file(&spec_path).unwrap();
    let a = h.svc.audit(id, &None).unwrap();
    assert!(!a.ok);
    assert!(failed_rules(&a).contains(&"spec_integrity"));
    assert!(a.findings.iter().any(|f| f.detail.contains("missing")));
}

#[tokio::test]
async fn audits_cover_what_a_job_has_and_say_what_they_left_out() {
    let h = harness(|_| {}).await;
    // Never reached the sandbox: only the build is audited (and, here, fails on the cgroup the
    // fake daemon could not give).
    let id = h.submit("build-fails");
    h.finish(id).await;
    let a = h.svc.audit(id, &None).unwrap();
    assert_eq!(a.findings.len(), 5, "{:#?}", a.findings);
    assert_eq!(failed_rules(&a), ["build_cgroup"]);
    assert!(
        a.not_audited[0].starts_with("sandbox:"),
        "{:?}",
        a.not_audited
    );
    // The sandbox refused the image before writing a spec: the same.
    let id = h.submit("run-errors");
    h.finish(id).await;
    let a = h.svc.audit(id, &None).unwrap();
    assert!(
        a.not_audited[0].starts_with("sandbox:"),
        "{:?}",
        a.not_audited
    );
    // A job still building: its build record only.
    let hung = h.submit("build-hangs");
    h.wait_for(hung, |s| s == JobStatus::Building).await;
    let a = h.svc.audit(hung, &None).unwrap();
    assert!(a.findings.iter().all(|f| f.source == audit::RECORD_SOURCE));
    h.svc.cancel(hung, &None).await.unwrap();
}

#[tokio::test]
async fn receipts_are_for_finished_jobs_and_verify_with_the_service_key() {
    let h = harness(|_| {}).await;
    let id = h.submit("perf=0.9876");
    let hung = h.submit("run-hangs");
    h.wait_for(hung, |s| s == JobStatus::Running).await;
    assert!(matches!(
        h.svc.receipt(hung, &None),
        Err(JobError::NotFinished { .. })
    ));
    let rec = h.finish(id).await;
    let receipt = h.svc.receipt(id, &None).unwrap();
    let key = receipt::parse_public_key(&h.svc.receipt_key().to_string()).unwrap();
    let body = receipt::verify(&receipt, &key).unwrap();
    assert_eq!(body["perf"], 0.9876);
    assert_eq!(body["dockerfile_sha256"], rec.dockerfile_sha256);
    assert_eq!(body["spec_sha256"], rec.spec_sha256.unwrap());
    assert_eq!(body["image_digest"], rec.image_digest.unwrap());
    h.svc.cancel(hung, &None).await.unwrap();
}
