//! Fakes of the image builder and the runner, for unit tests of the job service and the API that
//! need no root and no daemon. Each is scripted per Dockerfile: the first line of the Dockerfile
//! (`# fake: <behaviour>`) says what the fake does with it.
//!
//! Builder behaviours: `build-fails`, `build-hangs` (until cancelled), `build-slow` (200 ms),
//! `build-checks-cgroup` (400 ms, then fails unless its cgroup still exists under
//! [`FakeBuilder::cgroup_root`]); anything else builds an image whose rootfs holds a `marker` file
//! with the Dockerfile.
//! Runner behaviours (same line): `run-hangs` (until cancelled), `run-exits-3`, `run-oom`,
//! `run-no-perf`, `run-bad-perf`, `run-timeout`, `run-errors`, `run-runtime-flake` (the first run
//! of the job fails as runc does in its own setup), `run-runtime-flake-always` (every run does);
//! otherwise it reports `perf: 0.5`
//! (or the number after `perf=`). Every run but `run-errors` writes the spec the real sandbox
//! would (so audits of fake jobs check a real spec).

#![allow(missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::service::Deps;
use super::{BuildOptions, JobId, JobRecord, JobService, JobStatus, Runner, SqliteStore};
use crate::buildkit::{BuildError, BuildLog, BuildRequest, BuiltImage, ImageBuilder};
use crate::config::Config;
use crate::image::ImageConfig;
use crate::sandbox::build_cgroup::BuildCgroups;
use crate::sandbox::perf::PerfError;
use crate::sandbox::policy::AppliedLimits;
use crate::sandbox::runtime::RuntimeKind;
use crate::sandbox::{Prepared, RunEnd, RunReport, RunRequest, SandboxError};
use tokio_util::sync::CancellationToken;

/// The `# fake: …` line of a Dockerfile.
fn script(dockerfile: &[u8]) -> String {
    String::from_utf8_lossy(dockerfile)
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# fake:"))
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// A builder that follows each Dockerfile's script.
#[derive(Debug, Default)]
pub struct FakeBuilder {
    /// Builds started.
    pub builds: AtomicUsize,
    /// Builds running now (and the most at once).
    pub running: AtomicUsize,
    pub peak: AtomicUsize,
    /// Prunes asked for.
    pub prunes: AtomicUsize,
    /// The requests seen (scope, cgroup parent, build args), for assertions.
    pub seen: std::sync::Mutex<Vec<BuildRequest>>,
    /// `version()` fails.
    pub down: std::sync::atomic::AtomicBool,
    /// A cgroupfs root (a temporary tree): a `build-checks-cgroup` build fails unless its
    /// cgroup still exists there (in the pids hierarchy) when it ends.
    pub cgroup_root: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl ImageBuilder for FakeBuilder {
    fn build_image(
        &self,
        req: BuildRequest,
        log: Arc<dyn BuildLog>,
    ) -> BoxFuture<'_, Result<BuiltImage, BuildError>> {
        Box::pin(async move {
            self.builds.fetch_add(1, Ordering::SeqCst);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            let _running = Dec(&self.running);
            self.seen.lock().unwrap().push(req.clone());
            let what = script(&req.dockerfile);
            log.line(&format!("fake build: {what}"));
            if what.contains("build-hangs") {
                req.cancel.cancelled().await;
                return Err(BuildError::Cancelled);
            }
            if what.contains("build-slow") {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = req.cancel.cancelled() => return Err(BuildError::Cancelled),
                }
            }
            if what.contains("build-checks-cgroup") {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let root = self.cgroup_root.lock().unwrap().clone();
                let alive = match (root, &req.cgroup_parent) {
                    (Some(root), Some(parent)) => root.join("pids").join(parent).is_dir(),
                    _ => false,
                };
                if !alive {
                    return Err(BuildError::Other {
                        message: "the build's cgroup was removed under it".into(),
                    });
                }
            }
            if what.contains("build-fails") {
                return Err(BuildError::RunFailed {
                    message:
                        "process \"/bin/sh -c false\" did not complete successfully: exit code: 1"
                            .into(),
                    exit_code: Some(1),
                    line: Some(2),
                });
            }
            std::fs::create_dir_all(&req.rootfs_dir).unwrap();
            std::fs::write(req.rootfs_dir.join("marker"), &req.dockerfile).unwrap();
            let key = format!(
                "fake-{}",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!(
                    "{:?}{}",
                    req.scope,
                    String::from_utf8_lossy(&req.dockerfile)
                )))
            );
            let exported = !req.skip_export.as_ref().is_some_and(|f| (f.0)(&key));
            Ok(BuiltImage {
                rootfs: req.rootfs_dir.clone(),
                config: ImageConfig {
                    cmd: Some(vec!["/bin/true".into()]),
                    ..Default::default()
                },
                // A digest of the Dockerfile, in the form of a real one.
                config_digest: Some(format!(
                    "sha256:{}",
                    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&req.dockerfile))
                )),
                cached_steps: 0,
                total_steps: 1,
                export_bytes: if exported { 100 } else { 0 },
                export_duration: Duration::ZERO,
                duration: Duration::ZERO,
                rootfs_key: Some(key),
                exported,
            })
        })
    }

    fn prune<'a>(
        &'a self,
        _scope: Option<&'a crate::buildkit::BuildScope>,
    ) -> BoxFuture<'a, Result<u64, BuildError>> {
        self.prunes.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(0) })
    }

    fn version(&self) -> BoxFuture<'_, Result<String, BuildError>> {
        let down = self.down.load(Ordering::SeqCst);
        Box::pin(async move {
            if down {
                Err(BuildError::DaemonUnavailable {
                    addr: "fake".into(),
                    message: "down".into(),
                })
            } else {
                Ok("fake-buildkit".into())
            }
        })
    }

    fn addr(&self) -> &str {
        "unix:///fake.sock"
    }
}

/// Limits a fake run reports: none applied.
/// The spec the real sandbox would write for a run of `rootfs` from `job_dir` (no cgroups: its
/// limits apply as rlimits), written to `config.json` as the sandbox does: the limits that
/// applied and the file's SHA-256.
fn write_spec(
    job_dir: &Path,
    rootfs: &Path,
    container_id: &str,
    input: Option<&Path>,
) -> (AppliedLimits, String) {
    use crate::sandbox::{idmap, image_user, policy, seccomp, spec};
    use sha2::Digest;
    let identity = idmap::HostIdentity {
        uid: 1000,
        gid: 1000,
        name: "fake".into(),
        subuid: Some(idmap::IdRange {
            start: 100_000,
            count: 65536,
        }),
        subgid: Some(idmap::IdRange {
            start: 100_000,
            count: 65536,
        }),
    };
    let (spec, applied) = spec::hardened_spec(&spec::SpecInput {
        rootfs: rootfs.to_path_buf(),
        out_dir: job_dir.join(crate::sandbox::OUT_DIR),
        input: input.map(Path::to_path_buf),
        args: vec!["/bin/true".into()],
        env: vec![],
        cwd: "/".into(),
        user: image_user::ProcessUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: None,
        },
        identity: &identity,
        limits: &policy::Limits::default(),
        cgroups: &crate::sandbox::cgroups::CgroupHost::Unavailable {
            reason: "fake runner".into(),
        },
        container_id,
        seccomp: seccomp::default_profile(),
    })
    .unwrap();
    let json = serde_json::to_vec_pretty(&spec).unwrap();
    std::fs::write(job_dir.join(crate::sandbox::SPEC_FILE), &json).unwrap();
    (applied, hex::encode(sha2::Sha256::digest(&json)))
}

struct Dec<'a>(&'a AtomicUsize);

impl Drop for Dec<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A runner that follows the script of the Dockerfile whose image it runs (read from the rootfs's
/// `marker`).
#[derive(Debug, Default)]
pub struct FakeRunner {
    /// Runs started.
    pub runs: AtomicUsize,
    /// Runs going on now, and the most at once.
    pub running: AtomicUsize,
    pub peak: AtomicUsize,
    /// Job dirs reaped.
    pub reaped: std::sync::Mutex<Vec<std::path::PathBuf>>,
    /// Job dirs whose `run-runtime-flake` run already failed once.
    flaked: std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>,
    /// The script of each prepared run, by container id.
    scripts: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl Runner for FakeRunner {
    fn prepare<'a>(&'a self, req: RunRequest<'a>) -> BoxFuture<'a, Result<Prepared, SandboxError>> {
        Box::pin(async move {
            let what = script(&std::fs::read(req.rootfs.join("marker")).unwrap_or_default());
            std::fs::create_dir_all(req.job_dir.join("out")).unwrap();
            if what.contains("run-errors") {
                return Err(SandboxError::NoCommand);
            }
            let (applied, spec_sha256) =
                write_spec(req.job_dir, req.rootfs, req.container_id, req.input);
            Ok(Prepared {
                job_dir: req.job_dir.to_path_buf(),
                container_id: req.container_id.to_owned(),
                limits: crate::sandbox::policy::Limits::default(),
                applied,
                spec_sha256,
                runtime: RuntimeKind::Runc,
                runtime_version: "fake-runtime 1.0".into(),
                cgroup_version: "none",
            })
            .inspect(|p: &Prepared| {
                let id = p.container_id.clone();
                self.scripts.lock().unwrap().insert(id, what);
            })
        })
    }

    fn start(
        &self,
        prepared: Prepared,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<RunReport, SandboxError>> {
        Box::pin(async move {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            let _running = Dec(&self.running);
            let what = self
                .scripts
                .lock()
                .unwrap()
                .remove(&prepared.container_id)
                .unwrap_or_default();
            std::fs::write(
                prepared.job_dir.join("run.log"),
                format!("fake run: {what}\n"),
            )
            .unwrap();
            let report = |end: RunEnd, oom: bool, perf: Result<f64, PerfError>| RunReport {
                end,
                oom_killed: oom,
                perf,
                applied: prepared.applied.clone(),
                log_dropped_bytes: 0,
                log_tail: format!("fake run: {what}\n"),
                usage: crate::sandbox::Usage {
                    wall_seconds: 0.01,
                    source: "fake".into(),
                    ..Default::default()
                },
            };
            if what.contains("run-hangs") {
                cancel.cancelled().await;
                return Ok(report(RunEnd::Cancelled, false, Err(PerfError::Missing)));
            }
            let perf = what
                .split_whitespace()
                .find_map(|w| w.strip_prefix("perf="))
                .and_then(|p| p.parse().ok())
                .unwrap_or(0.5);
            let flake = what.contains("run-runtime-flake-always")
                || (what.contains("run-runtime-flake")
                    && self.flaked.lock().unwrap().insert(prepared.job_dir.clone()));
            if flake {
                let mut r = report(RunEnd::Exited { code: 1 }, false, Err(PerfError::Missing));
                r.log_tail = "level=fatal msg=\"nsexec[149]: could not ensure we are a cloned binary: Device or resource busy\"\n".into();
                return Ok(r);
            }
            Ok(if what.contains("run-exits-3") {
                report(RunEnd::Exited { code: 3 }, false, Err(PerfError::Missing))
            } else if what.contains("run-oom") {
                report(RunEnd::Exited { code: 137 }, true, Err(PerfError::Missing))
            } else if what.contains("run-no-perf") {
                report(RunEnd::Exited { code: 0 }, false, Err(PerfError::Missing))
            } else if what.contains("run-bad-perf") {
                report(
                    RunEnd::Exited { code: 0 },
                    false,
                    Err(PerfError::NotANumber("\"x\"".into())),
                )
            } else if what.contains("run-timeout") {
                report(RunEnd::TimedOut { after_secs: 8 }, false, Ok(perf))
            } else {
                report(RunEnd::Exited { code: 0 }, false, Ok(perf))
            })
        })
    }

    fn reap<'a>(&'a self, job_dir: &'a Path) -> BoxFuture<'a, ()> {
        self.reaped.lock().unwrap().push(job_dir.to_path_buf());
        Box::pin(async {})
    }

    fn version(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async { Ok("fake-runtime".into()) })
    }

    fn cgroup_version(&self) -> &'static str {
        "none"
    }

    fn memory_limit(&self) -> u64 {
        512
    }

    fn seccomp_digest(&self) -> String {
        let profile = crate::sandbox::seccomp::default_profile();
        crate::sandbox::audit::seccomp_digest(&serde_json::to_value(profile).unwrap())
    }
}

/// A job service on fakes, in a temporary state dir (kept as long as the returned guard).
pub struct FakeService {
    pub svc: JobService,
    pub builder: Arc<FakeBuilder>,
    pub runner: Arc<FakeRunner>,
    pub dir: tempfile::TempDir,
}

/// The configuration of a [`FakeService`] in `dir`: defaults, no BuildKit root to watch, two
/// build slots per owner.
pub fn fake_config(dir: &Path) -> Config {
    let mut cfg = Config {
        state_dir: dir.to_path_buf(),
        buildkit_root: None,
        ..Default::default()
    };
    cfg.build.max_builds_per_owner = 2;
    cfg
}

/// Start a job service on fakes with `cfg` in `dir`.
pub async fn fake_service_in(dir: tempfile::TempDir, cfg: Config) -> FakeService {
    fake_service_with(
        dir,
        cfg,
        BuildCgroups::Unavailable {
            reason: "fake".into(),
        },
    )
    .await
}

/// [`fake_service_in`] with builds getting cgroups from `build_cgroups`.
pub async fn fake_service_with(
    dir: tempfile::TempDir,
    cfg: Config,
    build_cgroups: BuildCgroups,
) -> FakeService {
    let builder = Arc::new(FakeBuilder::default());
    let runner = Arc::new(FakeRunner::default());
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let store = SqliteStore::open(&cfg.state_dir.join("jobs.db")).unwrap();
    let svc = JobService::start(Deps {
        cfg,
        store: Arc::new(store),
        builder: builder.clone(),
        runner: runner.clone(),
        build_cgroups,
    })
    .await
    .unwrap();
    FakeService {
        svc,
        builder,
        runner,
        dir,
    }
}

/// Start a job service on fakes, its configuration tuned by `tune`.
pub async fn fake_service(tune: impl FnOnce(&mut Config)) -> FakeService {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fake_config(dir.path());
    tune(&mut cfg);
    fake_service_in(dir, cfg).await
}

/// Driving a [`FakeService`] from tests: submit a scripted Dockerfile, wait for a status.
impl FakeService {
    pub fn submit_as(&self, who: &str, script: &str) -> JobId {
        let df = format!("# fake: {script}\nFROM busybox\n");
        self.svc
            .submit(
                "job.Dockerfile",
                df.as_bytes(),
                None,
                who,
                &BuildOptions::default(),
            )
            .unwrap()
            .id
    }

    pub fn submit(&self, script: &str) -> JobId {
        self.submit_as("anyone", script)
    }

    pub fn get(&self, id: JobId) -> JobRecord {
        self.svc.get(id, &None).unwrap()
    }

    pub async fn wait_for(&self, id: JobId, want: impl Fn(JobStatus) -> bool) -> JobRecord {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rec = self.get(id);
            if want(rec.status) {
                return rec;
            }
            assert!(Instant::now() < deadline, "job {id} stuck: {rec:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn finish(&self, id: JobId) -> JobRecord {
        self.wait_for(id, JobStatus::is_terminal).await
    }
}
