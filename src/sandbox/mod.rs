//! The sandbox runner: turns a built image (root filesystem + image config) and a job directory
//! into a hardened rootless OCI bundle, runs it with runc, crun or youki, and reads the job's
//! `perf` back without trusting anything the job wrote.
//!
//! # Operation (what [`Sandbox::run`] does, in order)
//! 1. Resolve the process from the image config: argv (Entrypoint + Cmd), Env (PATH and HOME
//!    defaulted), WorkingDir, and USER against the image's own passwd/group (never following
//!    symlinks out of the rootfs).
//! 2. Prepare the job directory: `out/` (mounted at /data, the only host path the container
//!    sees) and `runtime/` (this run's private `--root` state dir), owned by the runtime user.
//! 3. Generate the spec ([`spec::hardened_spec`]) and write it to `config.json` — it is both what
//!    the runtime executes and the audit record ([`read_spec`], checked by [`audit`]); its
//!    SHA-256 goes in the report, so a later change to the file shows.
//! 4. `run` in the foreground, stdout+stderr into `run.log` capped at the log limit.
//! 5. Wait for exit, the wall-clock timeout, or cancellation; on the latter two, `kill KILL` the
//!    container (its pid namespace dies with init, SIGSTOPped processes included).
//! 6. Read OOM counters while the cgroup still exists, then `delete --force` and remove the
//!    state dir — on every path, including a dropped future (a guard does it synchronously).
//! 7. Read `/data/perf.json` with [`perf::read_perf`].

pub mod audit;
pub mod build_cgroup;
pub mod build_writes;
pub mod cgroups;
pub mod idmap;
pub mod image_user;
pub mod perf;
pub mod policy;
pub mod runtime;
pub mod safe_read;
pub mod seccomp;
pub mod spec;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oci_spec::runtime::{LinuxSeccomp, Spec};
use serde::Serialize;
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::image::ImageConfig;
use cgroups::{CgroupHost, Controller};
use idmap::HostIdentity;
use perf::PerfError;
use policy::{AppliedLimits, Limits};
use runtime::{Runtime, RuntimeKind};

/// The spec file name inside a job directory.
pub const SPEC_FILE: &str = "config.json";
/// The output directory (mounted at /data) inside a job directory.
pub const OUT_DIR: &str = "out";
/// The run log inside a job directory.
pub const RUN_LOG: &str = "run.log";
/// The runtime state dir (`--root`) inside a job directory, removed after each run.
pub const STATE_DIR: &str = "runtime";

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the sandbox is configured.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Which OCI runtime.
    pub runtime: RuntimeKind,
    /// The unprivileged user that runs containers; None = the current user (must not be root).
    pub runtime_user: Option<String>,
    /// Default limits.
    pub limits: Limits,
    /// Parent cgroup for jobs (inside the hierarchy); None = "/perfbox".
    pub cgroup_parent: Option<String>,
    /// A seccomp profile file replacing the shipped one.
    pub seccomp_profile: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::Runc,
            runtime_user: None,
            limits: Limits::default(),
            cgroup_parent: None,
            seccomp_profile: None,
        }
    }
}

/// Errors that prevent a run (the job's own failures are in [`RunReport`], not here).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The runtime user cannot be used.
    #[error(transparent)]
    Identity(#[from] idmap::IdentityError),
    /// Runtime CLI problem.
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    /// Seccomp profile problem.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The spec cannot be built.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// The image USER cannot be resolved.
    #[error(transparent)]
    User(#[from] image_user::UserError),
    /// Neither Entrypoint nor Cmd.
    #[error("the image has neither ENTRYPOINT nor CMD: nothing to run")]
    NoCommand,
    /// Filesystem work on the job dir failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError + use<> {
    let path = path.to_path_buf();
    move |source| SandboxError::Io { what, path, source }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunEnd {
    /// The container's process exited (code 128+N: killed by signal N).
    Exited {
        /// Exit status as the runtime reports it.
        code: i32,
    },
    /// Killed at the wall-clock limit.
    TimedOut {
        /// The limit.
        after_secs: u64,
    },
    /// Killed because the job was cancelled.
    Cancelled,
    /// Killed because it wrote more to /data than allowed (disk blocks or files); the output
    /// was then removed so it cannot fill the host's disk.
    DataLimit {
        /// What was exceeded, for humans.
        exceeded: String,
    },
}

/// What runc prints when it fails inside its own setup, before the job's process exists: runc
/// 1.1's nsexec could not copy and seal its own binary into a memfd (`F_ADD_SEALS` answered
/// `EBUSY`, seen about once in 150 runs inside perfbox's container image). The job never ran, so
/// running it again is safe.
pub const RUNTIME_SETUP_FAILURES: &[&str] = &["could not ensure we are a cloned binary"];

/// The result of one run.
#[derive(Debug)]
pub struct RunReport {
    /// How it ended.
    pub end: RunEnd,
    /// The memory cgroup recorded an OOM kill (or, where it cannot be read, SIGKILL under a
    /// memory limit that nobody else sent).
    pub oom_killed: bool,
    /// `/data/perf.json`, validated.
    pub perf: Result<f64, PerfError>,
    /// What limits really applied.
    pub applied: AppliedLimits,
    /// Bytes of output beyond the log cap (counted, not stored).
    pub log_dropped_bytes: u64,
    /// The last lines of the log (for failure reasons).
    pub log_tail: String,
    /// What the run used, measured by the host.
    pub usage: Usage,
}

impl RunReport {
    /// The runtime failed in its own setup, before the job's process started
    /// ([`RUNTIME_SETUP_FAILURES`]). A job that prints the same words itself gets one more run
    /// of its own, no more.
    pub fn runtime_failed_before_start(&self) -> bool {
        matches!(self.end, RunEnd::Exited { code } if code != 0)
            && RUNTIME_SETUP_FAILURES
                .iter()
                .any(|m| self.log_tail.contains(m))
    }
}

/// What a run used, measured by the host (never reported by the job): wall time from the
/// runtime's start to its exit, CPU time and peak memory from the job's cgroup.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Wall clock seconds.
    pub wall_seconds: f64,
    /// CPU seconds (user + system).
    pub cpu_seconds: Option<f64>,
    /// CPU seconds in user mode.
    pub user_seconds: Option<f64>,
    /// CPU seconds in the kernel.
    pub system_seconds: Option<f64>,
    /// Most memory charged at once (page cache included, as the cgroup counts it).
    pub peak_memory_bytes: Option<u64>,
    /// Where the numbers come from: `cgroup v1`/`cgroup v2` (read at exit), `... sampled`
    /// (the runtime removed the cgroup at exit: the last of the samples taken every 250 ms), or
    /// why there are none.
    pub source: String,
}

impl Usage {
    fn from_cgroup(wall: Duration, u: cgroups::CgroupUsage, source: String) -> Self {
        let secs = |ns: Option<u64>| ns.map(|n| n as f64 / 1e9);
        Usage {
            wall_seconds: wall.as_secs_f64(),
            cpu_seconds: secs(u.cpu_ns),
            user_seconds: secs(u.user_ns),
            system_seconds: secs(u.system_ns),
            peak_memory_bytes: u.peak_memory_bytes,
            source,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    /// The job directory (created by the caller; the sandbox adds out/, runtime/, config.json, run.log).
    pub job_dir: &'a Path,
    /// Image root filesystem (absolute; mounted read-only).
    pub rootfs: &'a Path,
    /// Image config.
    pub image: &'a ImageConfig,
    /// Container id (unique per run).
    pub container_id: &'a str,
    /// Limits for this run (None: the sandbox defaults).
    pub limits: Option<&'a Limits>,
    /// A read-only dataset to mount at `/input` (absolute host path), if the job asked for one.
    pub input: Option<&'a Path>,
    /// Cancels the run.
    pub cancel: CancellationToken,
}

/// A run whose spec is written ([`Sandbox::prepare`]), ready to [`Sandbox::start`].
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The job directory (absolute).
    pub job_dir: PathBuf,
    /// The container id.
    pub container_id: String,
    /// The limits the run gets.
    pub limits: Limits,
    /// How each of them applies.
    pub applied: AppliedLimits,
    /// SHA-256 (hex) of `config.json` as written.
    pub spec_sha256: String,
    /// The runtime that will run it.
    pub runtime: RuntimeKind,
    /// The runtime's version.
    pub runtime_version: String,
    /// cgroup layout the limits go through ("v1", "v2", "none").
    pub cgroup_version: &'static str,
}

/// A configured sandbox, shared by all jobs.
#[derive(Debug, Clone)]
pub struct Sandbox {
    runtime: Runtime,
    identity: HostIdentity,
    limits: Limits,
    cgroups: CgroupHost,
    seccomp: LinuxSeccomp,
    /// The runtime's version, asked once.
    version: Arc<tokio::sync::OnceCell<String>>,
    /// [`audit::seccomp_digest`] of `seccomp`.
    seccomp_digest: String,
}

/// Return the OCI spec a job ran with (its `config.json`), for audit.
pub fn read_spec(job_dir: &Path) -> Result<Spec, SandboxError> {
    let path = job_dir.join(SPEC_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err("cannot read", &path))?;
    serde_json::from_str(&text).map_err(|e| SandboxError::Io {
        what: "invalid spec",
        path,
        source: std::io::Error::other(e),
    })
}

impl Sandbox {
    /// Probe the host and load the policy: runtime binary, runtime user and its id ranges,
    /// cgroups available to it, seccomp profile.
    pub fn new(cfg: SandboxConfig) -> Result<Self, SandboxError> {
        let identity = HostIdentity::lookup(cfg.runtime_user.as_deref())?;
        let run_as = nix::unistd::geteuid()
            .is_root()
            .then_some((identity.uid, identity.gid));
        let runtime = Runtime::locate(cfg.runtime, run_as)?;
        let cgroups = CgroupHost::detect(identity.uid, cfg.cgroup_parent.as_deref());
        let seccomp = match &cfg.seccomp_profile {
            Some(p) => seccomp::parse_profile(
                &std::fs::read_to_string(p).map_err(io_err("cannot read", p))?,
            )?,
            None => seccomp::default_profile(),
        };
        Ok(Self {
            runtime,
            identity,
            limits: cfg.limits,
            cgroups,
            seccomp_digest: audit::seccomp_digest(
                &serde_json::to_value(&seccomp).unwrap_or_default(),
            ),
            seccomp,
            version: Arc::default(),
        })
    }

    /// The runtime's version (`--version`, first line), asked once and then remembered.
    pub async fn runtime_version(&self) -> Result<String, runtime::RuntimeError> {
        self.version
            .get_or_try_init(|| self.runtime.version())
            .await
            .cloned()
    }

    /// The digest ([`audit::seccomp_digest`]) of the seccomp section every spec carries: what
    /// the audit's `seccomp` rule compares a job's spec with.
    pub fn seccomp_digest(&self) -> &str {
        &self.seccomp_digest
    }

    /// The runtime in use.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The cgroup layout found at startup.
    pub fn cgroups(&self) -> &CgroupHost {
        &self.cgroups
    }

    /// Default limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Kill and delete any container left in a job's runtime state dir (after perfbox itself was
    /// killed mid-run), then remove the state dir.
    pub async fn reap(&self, job_dir: &Path) {
        let state = job_dir.join(STATE_DIR);
        if let Ok(entries) = std::fs::read_dir(&state) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                let id = e.file_name().to_string_lossy().into_owned();
                let _ = self.runtime.kill(&state, &id).await;
                if let Err(err) = self.runtime.delete(&state, &id).await {
                    tracing::warn!(container = %id, error = %err, "could not delete a leftover container");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&state);
    }

    fn give_to_runtime_user(&self, path: &Path) -> Result<(), SandboxError> {
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(path, Some(self.identity.uid), Some(self.identity.gid))
                .map_err(io_err("cannot chown", path))?;
        }
        Ok(())
    }

    /// Run a job's image once: [`Self::prepare`], then [`Self::start`]. See the module doc for
    /// the sequence.
    pub async fn run(&self, req: RunRequest<'_>) -> Result<RunReport, SandboxError> {
        let cancel = req.cancel.clone();
        let prepared = self.prepare(req).await?;
        self.start(prepared, cancel).await
    }

    /// Steps 1 to 3: the process, the job directory and the spec, written to `config.json`.
    /// Nothing runs yet; what is returned says what will (the spec's digest, the limits).
    pub async fn prepare(&self, req: RunRequest<'_>) -> Result<Prepared, SandboxError> {
        let limits = req.limits.unwrap_or(&self.limits);
        let job_dir =
            std::path::absolute(req.job_dir).map_err(io_err("bad job dir", req.job_dir))?;
        let rootfs = std::path::absolute(req.rootfs).map_err(io_err("bad rootfs", req.rootfs))?;

        // 1. The process, as the image describes it.
        let user = image_user::resolve(&rootfs, req.image.user.as_deref().unwrap_or(""))?;
        let args = req.image.argv();
        if args.is_empty() {
            return Err(SandboxError::NoCommand);
        }
        let mut env = req.image.env.clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(DEFAULT_PATH.into());
        }
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!("HOME={}", user.home.as_deref().unwrap_or("/")));
        }
        let cwd = match req.image.working_dir.as_deref() {
            Some(w) if w.starts_with('/') => w.to_string(),
            Some(w) if !w.is_empty() => format!("/{w}"),
            _ => "/".to_string(),
        };

        // 2. The job directory: out/ is the job's, runtime/ is the runtime's; both belong to the
        // runtime user. out/ is world-writable inside a 0700 job dir so that any image USER can
        // write /data while no other host user can reach it.
        self.give_to_runtime_user(&job_dir)?;
        std::fs::set_permissions(&job_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("cannot chmod", &job_dir))?;
        let out_dir = job_dir.join(OUT_DIR);
        std::fs::create_dir_all(&out_dir).map_err(io_err("cannot create", &out_dir))?;
        std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777))
            .map_err(io_err("cannot chmod", &out_dir))?;
        self.give_to_runtime_user(&out_dir)?;
        let state_dir = job_dir.join(STATE_DIR);
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir(&state_dir).map_err(io_err("cannot create", &state_dir))?;
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("cannot chmod", &state_dir))?;
        self.give_to_runtime_user(&state_dir)?;

        // 3. The spec, kept for audit.
        let (spec, applied) = spec::hardened_spec(&spec::SpecInput {
            rootfs: rootfs.clone(),
            out_dir: out_dir.clone(),
            input: req.input.map(Path::to_path_buf),
            args,
            env,
            cwd,
            user,
            identity: &self.identity,
            limits,
            cgroups: &self.cgroups,
            container_id: req.container_id,
            seccomp: self.seccomp.clone(),
        })?;
        let spec_path = job_dir.join(SPEC_FILE);
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| SandboxError::Io {
            what: "cannot serialize spec",
            path: spec_path.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&spec_path, &json).map_err(io_err("cannot write", &spec_path))?;
        let spec_sha256 = hex::encode(sha2::Sha256::digest(&json));
        let runtime_version = self
            .runtime_version()
            .await
            .unwrap_or_else(|e| format!("unknown ({e})"));
        Ok(Prepared {
            job_dir,
            container_id: req.container_id.to_owned(),
            limits: limits.clone(),
            applied,
            spec_sha256,
            runtime: self.runtime.kind,
            runtime_version,
            cgroup_version: self.cgroups.version(),
        })
    }

    /// Steps 4 to 7: run what [`Self::prepare`] wrote, until it exits, times out, passes a data
    /// bound or `cancel` fires.
    pub async fn start(
        &self,
        prepared: Prepared,
        cancel: CancellationToken,
    ) -> Result<RunReport, SandboxError> {
        let Prepared {
            job_dir,
            container_id,
            limits,
            applied,
            ..
        } = prepared;
        let limits = &limits;
        let out_dir = job_dir.join(OUT_DIR);
        let state_dir = job_dir.join(STATE_DIR);

        // 4. Run in the foreground. From here on the guard deletes the container on every path.
        let log_path = job_dir.join(RUN_LOG);
        let log = std::fs::File::create(&log_path).map_err(io_err("cannot create", &log_path))?;
        let mut guard = ContainerGuard::new(&self.runtime, &state_dir, &container_id);
        let parent_ooms_before = self.cgroups.parent_oom_kills();
        let started = std::time::Instant::now();
        let mut child = self
            .runtime
            .spawn_run(&state_dir, &job_dir, &container_id)?;
        // crun and youki remove the cgroup as the container exits: keep its latest counters
        // (no cgroup here, nothing to sample).
        let last_sample = Arc::new(std::sync::Mutex::new(None));
        let sampler = (!matches!(self.cgroups, CgroupHost::Unavailable { .. })).then(|| {
            let (cgroups, id, keep) = (
                self.cgroups.clone(),
                container_id.clone(),
                last_sample.clone(),
            );
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if let Some(u) = cgroups.usage(&id) {
                        *keep.lock().unwrap_or_else(|e| e.into_inner()) = Some(u);
                    }
                }
            }))
        });
        let pump = LogPump::start(
            log,
            limits.log_bytes,
            child.stdout.take(),
            child.stderr.take(),
        );

        // 5. Exit, timeout or cancellation.
        let timeout = Duration::from_secs(limits.timeout_secs);
        // /data is a host directory: a watchdog bounds what the job may write there.
        let watchdog = data_watchdog(out_dir.clone(), limits.data_bytes, limits.data_files);
        let end = tokio::select! {
            status = child.wait() => Ok(status),
            _ = tokio::time::sleep(timeout) => Err(RunEnd::TimedOut { after_secs: limits.timeout_secs }),
            _ = cancel.cancelled() => Err(RunEnd::Cancelled),
            exceeded = watchdog => Err(RunEnd::DataLimit { exceeded }),
        };
        let end = match end {
            Ok(status) => {
                let status = status.map_err(io_err("cannot wait for runtime", &job_dir))?;
                RunEnd::Exited {
                    code: exit_code(status),
                }
            }
            Err(end) => {
                // `kill` fails while the runtime is still creating the container (a cancel
                // right at the start): ask again until it is gone, then kill the runtime.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let _ = self.runtime.kill(&state_dir, &container_id).await;
                    if tokio::time::timeout(Duration::from_millis(200), child.wait())
                        .await
                        .is_ok()
                    {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        break;
                    }
                }
                if matches!(end, RunEnd::DataLimit { .. }) {
                    // Free the disk at once; the directory itself stays (empty) for the record.
                    if let Ok(entries) = std::fs::read_dir(&out_dir) {
                        for e in entries.flatten() {
                            let p = e.path();
                            let _ = if p.is_dir() && !p.is_symlink() {
                                std::fs::remove_dir_all(&p)
                            } else {
                                std::fs::remove_file(&p)
                            };
                        }
                    }
                }
                end
            }
        };
        let wall = started.elapsed();
        let log_dropped_bytes = pump.finish().await;

        // 6. OOM evidence and usage while the cgroup exists, then delete on every path.
        drop(sampler);
        let version = self.cgroups.version();
        let usage = match (
            self.cgroups.usage(&container_id),
            *last_sample.lock().unwrap_or_else(|e| e.into_inner()),
        ) {
            (Some(u), _) => Usage::from_cgroup(wall, u, format!("cgroup {version}")),
            (None, Some(u)) => Usage::from_cgroup(
                wall,
                u,
                format!(
                    "cgroup {version} sampled (the runtime removed the cgroup at exit: the last sample, taken every 250 ms)"
                ),
            ),
            (None, None) => Usage {
                wall_seconds: wall.as_secs_f64(),
                source: match &self.cgroups {
                    CgroupHost::Unavailable { reason } => format!("wall time only: {reason}"),
                    _ => "wall time only: the cgroup was gone before its counters could be read"
                        .into(),
                },
                ..Usage::default()
            },
        };
        let counted = self.cgroups.oom_kills(&container_id);
        // youki's `run` reports a container killed by signal N as exit code N, not 128+N.
        let youki_sigkill =
            self.runtime.kind == RuntimeKind::Youki && matches!(end, RunEnd::Exited { code: 9 });
        let sigkilled = matches!(end, RunEnd::Exited { code: 137 }) || youki_sigkill;
        let parent_ooms_after = self.cgroups.parent_oom_kills();
        let oom_killed = match (counted, parent_ooms_before, parent_ooms_after) {
            (Some(n), _, _) => n > 0,
            // The job's cgroup is gone (crun and youki delete it at exit): a SIGKILL we did not
            // send while the parent's OOM counter moved (v2), or under an enforced memory limit.
            (None, Some(before), Some(after)) => sigkilled && after > before,
            (None, _, _) => sigkilled && self.cgroups.has(Controller::Memory),
        };
        let end = if youki_sigkill && oom_killed {
            RunEnd::Exited { code: 137 }
        } else {
            end
        };
        guard.cleanup().await;

        // 7. The job's answer.
        let perf = perf::read_perf(&out_dir);
        let log_tail = log_tail(&log_path, 2048);
        Ok(RunReport {
            end,
            oom_killed,
            perf,
            applied,
            log_dropped_bytes,
            log_tail,
            usage,
        })
    }
}

/// Stops a background task when dropped (on every path out of a run).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves when `dir` holds more than `max_bytes` of allocated disk blocks or more than
/// `max_files` entries (checked every 200 ms; the walk stops as soon as a bound is passed, and
/// never follows symlinks). Never resolves otherwise.
async fn data_watchdog(dir: PathBuf, max_bytes: u64, max_files: u64) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let d = dir.clone();
        let over = tokio::task::spawn_blocking(move || data_usage_over(&d, max_bytes, max_files))
            .await
            .ok()
            .flatten();
        if let Some(what) = over {
            return what;
        }
    }
}

/// Walk `dir` (no symlinks followed) and say which bound it passes, if any.
pub fn data_usage_over(dir: &Path, max_bytes: u64, max_files: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            files += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
            if bytes > max_bytes {
                return Some(format!("more than {max_bytes} bytes of disk in /data"));
            }
            if files > max_files {
                return Some(format!("more than {max_files} files in /data"));
            }
        }
    }
    None
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn log_tail(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Deletes the container and its state dir when the run ends, however it ends. `cleanup` does
/// it asynchronously; if the future is dropped first, `Drop` does it with blocking commands.
struct ContainerGuard {
    runtime: Runtime,
    state_dir: PathBuf,
    id: String,
    armed: bool,
}

impl ContainerGuard {
    fn new(runtime: &Runtime, state_dir: &Path, id: &str) -> Self {
        Self {
            runtime: runtime.clone(),
            state_dir: state_dir.to_path_buf(),
            id: id.to_string(),
            armed: true,
        }
    }

    async fn cleanup(&mut self) {
        if let Err(e) = self.runtime.delete(&self.state_dir, &self.id).await {
            tracing::debug!(container = %self.id, error = %e, "delete after run (usually: already gone)");
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        self.armed = false;
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for verb in [
            vec!["kill", &self.id, "KILL"],
            vec!["delete", "--force", &self.id],
        ] {
            let mut cmd = self.runtime.command(&self.state_dir, &verb).into_std();
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let _ = cmd.status();
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Copies the container's stdout and stderr into the run log, up to a byte cap; the rest is
/// drained (so the job never blocks on a full pipe) and counted.
struct LogPump {
    task: tokio::task::JoinHandle<u64>,
}

impl LogPump {
    fn start(
        log: std::fs::File,
        cap: u64,
        stdout: Option<tokio::process::ChildStdout>,
        stderr: Option<tokio::process::ChildStderr>,
    ) -> Self {
        let log = std::sync::Arc::new(std::sync::Mutex::new((log, 0u64, 0u64)));
        async fn pump(
            mut r: impl AsyncRead + Unpin,
            log: std::sync::Arc<std::sync::Mutex<(std::fs::File, u64, u64)>>,
            cap: u64,
        ) {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut g = log.lock().expect("log lock");
                let (file, written, dropped) = &mut *g;
                let room = cap.saturating_sub(*written) as usize;
                let keep = n.min(room);
                if keep > 0 && file.write_all(&buf[..keep]).is_ok() {
                    *written += keep as u64;
                }
                if keep < n {
                    if *dropped == 0 {
                        let _ = writeln!(
                            file,
                            "\n[perfbox: log capped at {cap} bytes; further output dropped]"
                        );
                    }
                    *dropped += (n - keep) as u64;
                }
            }
        }
        let task = tokio::spawn(async move {
            let a = stdout.map(|s| tokio::spawn(pump(s, log.clone(), cap)));
            let b = stderr.map(|s| tokio::spawn(pump(s, log.clone(), cap)));
            for t in [a, b].into_iter().flatten() {
                let _ = t.await;
            }
            let g = log.lock().expect("log lock");
            g.2
        });
        Self { task }
    }

    /// Wait for both pipes to close (bounded: every writer died with the pid namespace).
    async fn finish(self) -> u64 {
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(dropped)) => dropped,
            _ => 0,
        }
    }
}
