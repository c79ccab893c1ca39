//! Jobs: the state machine ([`state`]), the durable store ([`store`]), and the service that
//! moves each job through it — a FIFO queue ([`queue`]) feeding a bounded pool of build slots (no
//! owner holding more than its share) and a separate pool of run slots, with cancellation,
//! restart recovery and metrics.
//!
//! Every build is isolated from the others and from the host: a source policy (images only from
//! the configured registries, nothing else remote unless allowed), a cache scope (the job's own,
//! or its owner's), a cgroup of its own for its RUN steps where the host allows, and a cap on the
//! image it may export. What each build ran with is kept in the job record (`build`).
//!
//! A job's directory (`<state_dir>/jobs/<id>/`, mode 0700) holds `Dockerfile`, `build-options.json`
//! (its build args and target), `build.log`, `run.log`, `config.json` (the OCI spec it ran with)
//! and `out/` (its /data). Image root filesystems live in the shared, size-bounded
//! [`images::ImageCache`], not in job dirs.

pub mod images;
pub mod metrics;
pub mod queue;
pub mod state;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::buildkit::{
    BuildError, BuildLog, BuildNetwork, BuildRequest, BuildScope, BuildkitClient, ExportFilter,
    FileLog, ImageBuilder, SourcePolicy,
};
use crate::config::{BuildNetworkSetting, CacheScope, Config};
use crate::sandbox::build_cgroup::{BuildCgroup, BuildCgroups, BuildLimits};
use crate::sandbox::build_writes::BuildWrites;
use crate::sandbox::perf::PerfError;
use crate::sandbox::{RunEnd, RunRequest, Sandbox};
pub use state::JobStatus;
pub use store::{JobId, JobRecord, Patch, Store, StoreError};

/// Build log file name in a job dir.
pub const BUILD_LOG: &str = "build.log";
/// Dockerfile name in a job dir.
pub const DOCKERFILE: &str = "Dockerfile";
/// A job's build args and target, in its dir.
pub const BUILD_OPTIONS: &str = "build-options.json";

/// What a submission may ask of the build besides the Dockerfile.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildOptions {
    /// `--build-arg NAME=value` pairs (never `BUILDKIT_*`).
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// `--target` stage.
    #[serde(default)]
    pub target: Option<String>,
}

impl BuildOptions {
    /// Refuse what BuildKit would refuse, and BuildKit's own knobs (`BUILDKIT_*` args: cache
    /// namespace, syntax, hostname...), which are perfbox's to set.
    pub fn validate(&self) -> Result<(), JobError> {
        for name in self.build_args.keys() {
            crate::buildkit::check_build_arg_name(name).map_err(JobError::InvalidRequest)?;
        }
        if let Some(t) = &self.target
            && (t.is_empty()
                || t.len() > 128
                || t.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(JobError::InvalidRequest(format!("bad target {t:?}")));
        }
        Ok(())
    }
}

/// What a build ran with, kept in the job record (`build`) for audits.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildRecord {
    /// The cache scope tag (`job-<id>` or `owner-<hash>`).
    pub scope: String,
    /// Whose cache: "job" or "owner".
    pub cache_scope: CacheScope,
    /// Network of RUN steps: "none" or "isolated".
    pub network: BuildNetworkSetting,
    /// The frontend that ran.
    pub frontend: &'static str,
    /// Registries images could come from.
    pub registries: Vec<String>,
    /// Remote sources allowed besides them.
    pub allowed_remote_sources: Vec<String>,
    /// Largest image the export would accept (apparent bytes).
    pub max_image_bytes: u64,
    /// The cgroup of the build's RUN steps, or why there was none.
    pub cgroup: BuildCgroupRecord,
}

/// The cgroup part of a [`BuildRecord`].
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum BuildCgroupRecord {
    /// RUN steps had a cgroup of the build's own.
    Own {
        /// Its path in the hierarchy.
        path: String,
        /// Its limits.
        limits: BuildLimits,
        /// Whether a RUN step ran in it (false: the build had no RUN step that was not cached).
        used: bool,
    },
    /// They shared the daemon's.
    Shared {
        /// Why.
        shared_with_daemon: String,
    },
}

/// Why a submission or request was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The Dockerfile is unusable (empty, not UTF-8, too large...).
    #[error("{0}")]
    InvalidDockerfile(String),
    /// Too large.
    #[error("Dockerfile is {size} bytes; the limit is {max}")]
    TooLarge {
        /// Size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// The queue is full.
    #[error("the job queue is full ({0} jobs waiting); try again later")]
    QueueFull(usize),
    /// The submission asks for something not allowed (bad build arg, target...).
    #[error("{0}")]
    InvalidRequest(String),
    /// No such job (or not visible to this token).
    #[error("no job {0}")]
    NotFound(JobId),
    /// The job cannot do that in its status.
    #[error("job {id} is already {status}")]
    Finished {
        /// Job.
        id: JobId,
        /// Its status.
        status: JobStatus,
    },
    /// The job has no spec yet.
    #[error("job {0} has not run yet, so it has no sandbox spec")]
    NoSpec(JobId),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Filesystem failure.
    #[error("job storage: {0}")]
    Io(#[from] std::io::Error),
}

/// Who is asking: `None` when authentication is off (sees everything).
pub type Owner = Option<String>;

struct Inner {
    cfg: Config,
    store: Store,
    jobs_dir: PathBuf,
    buildkit: BuildkitClient,
    sandbox: Sandbox,
    /// Jobs waiting for a build slot, and the slots in use per owner.
    queue: Mutex<queue::BuildQueue>,
    /// Wakes the dispatcher: a job was queued or a build slot freed.
    wake: Notify,
    run_slots: Arc<Semaphore>,
    /// What every build may fetch.
    policy: SourcePolicy,
    /// Where builds get cgroups of their own.
    build_cgroups: BuildCgroups,
    /// Build cgroups in use, by name (an owner-scoped one is shared by that owner's builds).
    live_build_cgroups: Mutex<HashMap<String, Weak<BuildCgroup>>>,
    /// This service's id (8 hex digits, kept in the state dir): part of every build scope.
    instance: String,
    /// This program, which measures what builds write (`perfbox measure-tree`).
    exe: Option<PathBuf>,
    active: Mutex<HashMap<JobId, (CancellationToken, tokio::sync::watch::Receiver<bool>)>>,
    metrics: metrics::Metrics,
    images: images::ImageCache,
}

/// The job service (cheap to clone).
#[derive(Clone)]
pub struct JobService {
    inner: Arc<Inner>,
}

/// Health of the service's dependencies.
#[derive(Debug, serde::Serialize)]
pub struct Health {
    /// All good.
    pub ok: bool,
    /// buildkitd version, or the error.
    pub buildkit: Result<String, String>,
    /// Runtime version, or the error.
    pub runtime: Result<String, String>,
    /// State dir writable, or the error.
    pub state_dir: Result<String, String>,
    /// cgroup layout for job limits.
    pub cgroups: String,
    /// Whether each build's RUN steps get a cgroup of their own, apart from the build daemon.
    pub build_cgroups: String,
    /// The source policy of every build.
    pub build_sources: String,
}

impl JobService {
    /// Open the store, recover from a previous run, and start the queue. Must be called within
    /// a tokio runtime.
    pub async fn start(
        cfg: Config,
        buildkit: BuildkitClient,
        sandbox: Sandbox,
    ) -> Result<Self, JobError> {
        std::fs::create_dir_all(&cfg.state_dir)?;
        let jobs_dir = cfg.state_dir.join("jobs");
        std::fs::create_dir_all(&jobs_dir)?;
        let store = Store::open(&cfg.state_dir.join("jobs.db"))?;
        let images =
            images::ImageCache::open(&cfg.state_dir.join("images"), cfg.image_cache_bytes)?;
        let policy = cfg
            .source_policy()
            .map_err(|e| JobError::InvalidRequest(e.to_string()))?;
        let build_cgroups = build_cgroups_for(&cfg, buildkit.addr());
        let instance = instance_id(&cfg.state_dir)?;
        tracing::info!(build_cgroups = %build_cgroups.describe(), "build isolation");
        let inner = Arc::new(Inner {
            queue: Mutex::new(queue::BuildQueue::new(
                cfg.max_concurrent_builds,
                cfg.build.max_builds_per_owner,
            )),
            wake: Notify::new(),
            run_slots: Arc::new(Semaphore::new(cfg.max_concurrent_runs)),
            policy,
            build_cgroups,
            live_build_cgroups: Mutex::new(HashMap::new()),
            instance,
            exe: std::env::current_exe().ok(),
            cfg,
            store,
            jobs_dir,
            buildkit,
            sandbox,
            active: Mutex::new(HashMap::new()),
            metrics: metrics::Metrics::default(),
            images,
        });
        let svc = JobService { inner };
        svc.recover().await?;
        tokio::spawn(svc.clone().dispatch());
        Ok(svc)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, queue::BuildQueue> {
        self.inner.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, id: JobId, submitter: &str) {
        self.inner.metrics.enqueue();
        self.queue().push(id, submitter);
        self.inner.wake.notify_one();
    }

    /// A job that was building or running when perfbox died is marked interrupted (its
    /// container, if still alive, is killed and deleted); queued jobs are queued again in order.
    async fn recover(&self) -> Result<(), JobError> {
        let store = &self.inner.store;
        for status in [JobStatus::Building, JobStatus::Running] {
            for id in store.ids_in(status)? {
                let dir = self.job_dir(id);
                self.inner.sandbox.reap(&dir).await;
                store.transition(
                    id,
                    JobStatus::Interrupted,
                    Patch {
                        error: Some(format!(
                            "perfbox stopped while the job was {status}; it did not finish"
                        )),
                        ..Default::default()
                    },
                )?;
                tracing::warn!(job = id, "marked interrupted after restart");
            }
        }
        for (id, submitter) in store.queued()? {
            self.enqueue(id, &submitter);
        }
        Ok(())
    }

    /// The directory of a job.
    pub fn job_dir(&self, id: JobId) -> PathBuf {
        self.inner.jobs_dir.join(id.to_string())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// Accept a Dockerfile from `submitter` (the owner, or the client's address without tokens:
    /// whose share of build slots it uses): validate, record, queue. Never waits for the build.
    pub fn submit(
        &self,
        filename: &str,
        dockerfile: &[u8],
        owner: Owner,
        submitter: &str,
        options: &BuildOptions,
    ) -> Result<JobRecord, JobError> {
        options.validate()?;
        let max = self.inner.cfg.max_dockerfile_bytes;
        if dockerfile.len() > max {
            return Err(JobError::TooLarge {
                size: dockerfile.len(),
                max,
            });
        }
        let text = std::str::from_utf8(dockerfile).map_err(|e| {
            JobError::InvalidDockerfile(format!("the Dockerfile is not UTF-8 text: {e}"))
        })?;
        if text.trim().is_empty() {
            return Err(JobError::InvalidDockerfile(
                "the Dockerfile is empty".into(),
            ));
        }
        if text.contains('\0') {
            return Err(JobError::InvalidDockerfile(
                "the Dockerfile contains NUL bytes".into(),
            ));
        }
        let queued = self.inner.metrics.queued();
        if queued >= self.inner.cfg.max_queued_jobs {
            return Err(JobError::QueueFull(queued));
        }
        let filename = sanitize_filename(filename);
        let sha = hex::encode(Sha256::digest(dockerfile));
        let rec = self
            .inner
            .store
            .insert(&filename, owner.as_deref(), submitter, &sha)?;
        let dir = self.job_dir(rec.id);
        let written = (|| {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(DOCKERFILE), dockerfile)?;
            std::fs::write(
                dir.join(BUILD_OPTIONS),
                serde_json::to_vec(options).map_err(std::io::Error::other)?,
            )
        })();
        if let Err(e) = written {
            let _ = self.inner.store.transition(
                rec.id,
                JobStatus::Cancelled,
                Patch {
                    error: Some(format!("could not store the Dockerfile: {e}")),
                    ..Default::default()
                },
            );
            return Err(e.into());
        }
        self.enqueue(rec.id, submitter);
        Ok(rec)
    }

    /// A job, if `owner` may see it.
    pub fn get(&self, id: JobId, owner: &Owner) -> Result<JobRecord, JobError> {
        match self.inner.store.get(id)? {
            Some(r) if owner.is_none() || r.owner == *owner => Ok(r),
            _ => Err(JobError::NotFound(id)),
        }
    }

    /// Queued jobs ahead of this one.
    pub fn queue_position(&self, id: JobId) -> Result<i64, JobError> {
        Ok(self.inner.store.queue_position(id)?)
    }

    /// A page of jobs visible to `owner`, newest first.
    pub fn list(
        &self,
        owner: &Owner,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<(Vec<JobRecord>, i64), JobError> {
        let jobs = self.inner.store.list(owner.as_deref(), before, limit)?;
        Ok((jobs, self.inner.store.count(owner.as_deref())?))
    }

    /// The OCI spec the job ran with (its config.json, verbatim).
    pub fn spec(&self, id: JobId, owner: &Owner) -> Result<serde_json::Value, JobError> {
        self.get(id, owner)?;
        let path = self.job_dir(id).join(crate::sandbox::SPEC_FILE);
        let text = std::fs::read_to_string(&path).map_err(|_| JobError::NoSpec(id))?;
        serde_json::from_str(&text).map_err(|_| JobError::NoSpec(id))
    }

    /// The log files of a job, build first.
    pub fn log_paths(&self, id: JobId, owner: &Owner) -> Result<[PathBuf; 2], JobError> {
        self.get(id, owner)?;
        let dir = self.job_dir(id);
        Ok([dir.join(BUILD_LOG), dir.join(crate::sandbox::RUN_LOG)])
    }

    /// Cancel a job: a queued one at once; a building or running one by stopping the build or
    /// killing the container, waiting until that is done (so no container is left on return).
    pub async fn cancel(&self, id: JobId, owner: &Owner) -> Result<JobRecord, JobError> {
        let rec = self.get(id, owner)?;
        if rec.status.is_terminal() {
            return Err(JobError::Finished {
                id,
                status: rec.status,
            });
        }
        let active = self
            .inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        match active {
            Some((token, mut done)) => {
                token.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(30), done.wait_for(|d| *d)).await;
            }
            None => {
                match self.inner.store.transition(
                    id,
                    JobStatus::Cancelled,
                    Patch {
                        error: Some("cancelled by request before it started".into()),
                        ..Default::default()
                    },
                ) {
                    Ok(_) => {
                        self.inner.metrics.dequeue();
                        self.queue().remove(id);
                    }
                    // It started meanwhile: cancel the running work instead.
                    Err(StoreError::IncorrectStatus { .. }) => {
                        return Box::pin(self.cancel(id, owner)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.get(id, owner)
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> Result<String, JobError> {
        let counts = self.inner.store.counts()?;
        Ok(self.inner.metrics.render(&counts))
    }

    /// Check buildkitd, the runtime and the state dir.
    pub async fn health(&self) -> Health {
        let buildkit = match tokio::time::timeout(
            Duration::from_secs(3),
            self.inner.buildkit.health(),
        )
        .await
        {
            Ok(Ok(info)) => Ok(info.version),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 3 s".into()),
        };
        let runtime = self
            .inner
            .sandbox
            .runtime()
            .version()
            .await
            .map_err(|e| e.to_string());
        let probe = self
            .inner
            .cfg
            .state_dir
            .join(format!(".healthz-{}", std::process::id()));
        let state_dir = std::fs::write(&probe, b"ok")
            .and_then(|_| std::fs::remove_file(&probe))
            .map(|_| self.inner.cfg.state_dir.display().to_string())
            .map_err(|e| format!("{}: {e}", self.inner.cfg.state_dir.display()));
        let policy = &self.inner.policy;
        Health {
            ok: buildkit.is_ok() && runtime.is_ok() && state_dir.is_ok(),
            buildkit,
            runtime,
            state_dir,
            cgroups: self.inner.sandbox.cgroups().version().to_string(),
            build_cgroups: self.inner.build_cgroups.describe(),
            build_sources: format!(
                "images only from {}; other remote sources: {}",
                policy.registries().join(", "),
                if policy.remote_sources().is_empty() {
                    "none".to_string()
                } else {
                    policy
                        .remote_sources()
                        .iter()
                        .map(|r| r.pattern())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        }
    }

    /// Starts each queued job once a build slot is free for it ([`queue::BuildQueue`]: FIFO, no
    /// owner over its share).
    async fn dispatch(self) {
        loop {
            loop {
                let next = self.queue().start_next();
                let Some((id, owner)) = next else { break };
                let slot = BuildSlot {
                    svc: self.clone(),
                    owner,
                };
                tokio::spawn(self.clone().process(id, slot));
            }
            self.inner.wake.notified().await;
        }
    }

    /// The cgroup for a build in `scope` (shared by the concurrent builds of one scope), if the
    /// host gives builds cgroups of their own.
    fn build_cgroup(&self, scope: &str) -> Result<Option<Arc<BuildCgroup>>, String> {
        let mut live = self
            .inner
            .live_build_cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        live.retain(|_, w| w.strong_count() > 0);
        if let Some(cg) = live.get(scope).and_then(Weak::upgrade) {
            return Ok(Some(cg));
        }
        let limits = BuildLimits {
            memory_bytes: self.inner.cfg.build.memory_bytes,
            pids: self.inner.cfg.build.pids,
        };
        match self.inner.build_cgroups.create(scope, limits) {
            Ok(Some(cg)) => {
                let cg = Arc::new(cg);
                live.insert(scope.to_owned(), Arc::downgrade(&cg));
                Ok(Some(cg))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn process(self, id: JobId, build_permit: BuildSlot) {
        let token = CancellationToken::new();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        // Register before leaving `queued`, so a DELETE sees either queued or this token.
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (token.clone(), done_rx));
        match self
            .inner
            .store
            .transition(id, JobStatus::Building, Patch::default())
        {
            Ok(rec) => {
                self.inner.metrics.dequeue();
                let dir = self.job_dir(id);
                let mut build = None;
                let (status, mut patch) = self
                    .build_and_run(&rec, &dir, build_permit, &token, &mut build)
                    .await;
                patch.build = build.and_then(|b| serde_json::to_value(b).ok());
                if let Err(e) = self.inner.store.transition(id, status, patch) {
                    tracing::error!(job = id, error = %e, "could not record the job's end");
                }
                tracing::info!(job = id, status = %status, "job finished");
            }
            Err(_) => drop(build_permit), // cancelled while queued
        }
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let _ = done_tx.send(true);
    }

    /// The build scope tag of a job: its own, or its owner's ([`CacheScope`]).
    ///
    /// The tag ends with this service's instance id: services sharing one build daemon (and its
    /// cgroup parent) number their jobs independently, and must never share a scope.
    fn scope_tag(&self, rec: &JobRecord) -> String {
        let instance = &self.inner.instance;
        match self.inner.cfg.build.cache_scope {
            CacheScope::Job => format!("job-{}-{instance}", rec.id),
            CacheScope::Owner => {
                let who = rec.submitter.as_deref().unwrap_or("anonymous");
                let who = &hex::encode(Sha256::digest(who.as_bytes()))[..16];
                format!("owner-{who}-{instance}")
            }
        }
    }

    async fn build_and_run(
        &self,
        rec: &JobRecord,
        dir: &Path,
        build_permit: BuildSlot,
        token: &CancellationToken,
        record: &mut Option<BuildRecord>,
    ) -> (JobStatus, Patch) {
        let id = rec.id;
        let fail = |status: JobStatus, error: String| {
            (
                status,
                Patch {
                    error: Some(error),
                    ..Default::default()
                },
            )
        };
        let cfg = &self.inner.cfg;
        let dockerfile = match std::fs::read(dir.join(DOCKERFILE)) {
            Ok(d) => d,
            Err(e) => {
                return fail(
                    JobStatus::BuildFailed,
                    format!("cannot read the stored Dockerfile: {e}"),
                );
            }
        };
        // --- the image: from the cache when an identical Dockerfile was built, else BuildKit ---
        let log: Arc<dyn BuildLog> = match FileLog::append(&dir.join(BUILD_LOG)) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                return fail(
                    JobStatus::BuildFailed,
                    format!("cannot create build.log: {e}"),
                );
            }
        };
        let options: BuildOptions = std::fs::read(dir.join(BUILD_OPTIONS))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let sha = hex::encode(Sha256::digest(&dockerfile));
        let scope = self.scope_tag(rec);
        let build_scope = match BuildScope::new(&scope) {
            Ok(s) => s,
            Err(e) => return fail(JobStatus::BuildFailed, e.to_string()),
        };
        let policy = &self.inner.policy;
        let mut build_record = BuildRecord {
            scope: scope.clone(),
            cache_scope: cfg.build.cache_scope,
            network: cfg.build_network,
            frontend: "dockerfile.v0 (BuildKit's built-in Dockerfile frontend; # syntax= directives are ignored)",
            registries: policy.registries().to_vec(),
            allowed_remote_sources: policy
                .remote_sources()
                .iter()
                .map(|r| r.pattern().to_owned())
                .collect(),
            max_image_bytes: cfg.build.max_image_bytes,
            cgroup: BuildCgroupRecord::Shared {
                shared_with_daemon: match &self.inner.build_cgroups {
                    BuildCgroups::Unavailable { reason } => reason.clone(),
                    _ => "not created yet".into(),
                },
            },
        };
        // An identical Dockerfile of the same scope (with the owner scope: the same owner) may
        // reuse its image without a build; with the job scope nothing is shared.
        let alias_key = (cfg.build.cache_scope == CacheScope::Owner
            && options == BuildOptions::default())
        .then(|| hex::encode(Sha256::digest(format!("{scope}\n{sha}").as_bytes())));
        let cached = alias_key
            .as_deref()
            .and_then(|k| self.inner.images.lookup_alias(k));
        let started = Instant::now();
        let (config, lease, built_patch) = if let Some((alias, lease)) = cached {
            *record = Some(build_record.clone());
            log.line(&format!(
                "perfbox: an identical Dockerfile was built before; reusing its cached image (rootfs {}, config {}) without calling BuildKit",
                alias.rootfs_key,
                alias.config_digest.as_deref().unwrap_or("-")
            ));
            let patch = Patch {
                image_digest: alias.config_digest.clone(),
                image_cache: Some("hit".into()),
                ..Default::default()
            };
            (alias.config, lease, patch)
        } else {
            let staging = self.inner.images.staging_dir();
            let mut req = BuildRequest::new(dockerfile, staging.clone());
            req.network = match cfg.build_network {
                BuildNetworkSetting::None => BuildNetwork::None,
                BuildNetworkSetting::Isolated => BuildNetwork::Sandbox,
            };
            req.cancel = token.child_token();
            req.build_args = options.build_args.clone();
            req.target = options.target.clone();
            req.source_policy = policy.clone();
            req.scope = Some(build_scope);
            req.max_image_bytes = Some(cfg.build.max_image_bytes);
            // RUN steps in a cgroup of this build's scope, with the build's limits.
            let cgroup = match self.build_cgroup(&scope) {
                Ok(cg) => cg,
                Err(e) => {
                    *record = Some(build_record);
                    return fail(
                        JobStatus::BuildFailed,
                        format!("cannot prepare the build's cgroup: {e}"),
                    );
                }
            };
            if let Some(cg) = &cgroup {
                req.cgroup_parent = Some(cg.frontend_parent().to_owned());
                build_record.cgroup = BuildCgroupRecord::Own {
                    path: format!("/{}", cg.frontend_parent()),
                    limits: cg.limits(),
                    used: false,
                };
            }
            *record = Some(build_record);
            // After the solve, before the export: if the cache holds this rootfs, lease it
            // (so it cannot be evicted) and skip the export.
            let reused: Arc<Mutex<Option<images::Lease>>> = Arc::new(Mutex::new(None));
            let (cache, slot) = (self.inner.images.clone(), reused.clone());
            req.skip_export = Some(ExportFilter(Arc::new(move |key| match cache.lease(key) {
                Some(lease) => {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
                    true
                }
                None => false,
            })));
            let timeout = Duration::from_secs(cfg.build_timeout_secs);
            // A RUN step can write until the disk is full: watch the free space where BuildKit
            // and the image cache write, and stop the build before the host runs out.
            let watched = self.disk_watch_paths();
            if let Some(low) = low_disk(&watched, cfg.min_free_disk_bytes) {
                let _ = std::fs::remove_dir_all(&staging);
                return fail(JobStatus::BuildFailed, format!("not started: {low}"));
            }
            let build = self.inner.buildkit.build_image(req, log.clone());
            // What the RUN steps write to BuildKit's disk, sampled while they run: the build is
            // stopped past max_image_bytes / max_image_files, long before the disk floor.
            let writes = async {
                match (&cgroup, &self.inner.exe) {
                    (Some(cg), Some(exe)) => {
                        let w = BuildWrites::new(cg.procs_dir(), exe.clone());
                        watch_writes(w, cfg.build.max_image_bytes, cfg.build.max_image_files).await
                    }
                    _ => std::future::pending().await,
                }
            };
            let outcome = tokio::select! {
                r = tokio::time::timeout(timeout, build) => Ok(r),
                low = disk_guard(watched, cfg.min_free_disk_bytes) => Err(low),
                over = writes => Err(over),
            };
            // Evidence for the record that the daemon ran RUN steps in the build's cgroup.
            if let (
                Some(cg),
                Some(BuildRecord {
                    cgroup: BuildCgroupRecord::Own { used, .. },
                    ..
                }),
            ) = (&cgroup, record.as_mut())
            {
                *used = cg.used();
            }
            drop(cgroup);
            let outcome = match outcome {
                Ok(r) => r,
                Err(low) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    log.line(&format!("perfbox: build stopped: {low}"));
                    // The stopped step's snapshot stays in BuildKit's cache: give the space back.
                    match self.inner.buildkit.prune().await {
                        Ok(freed) => log.line(&format!(
                            "perfbox: pruned {freed} bytes of unused BuildKit cache"
                        )),
                        Err(e) => {
                            log.line(&format!("perfbox: could not prune BuildKit's cache: {e}"))
                        }
                    }
                    return fail(
                        JobStatus::BuildFailed,
                        format!("the build was stopped: {low}"),
                    );
                }
            };
            let built = match outcome {
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    log.line(&format!(
                        "perfbox: build exceeded {} s; cancelled",
                        cfg.build_timeout_secs
                    ));
                    return fail(
                        JobStatus::TimedOut,
                        format!(
                            "the build exceeded its {} s limit and was cancelled",
                            cfg.build_timeout_secs
                        ),
                    );
                }
                Ok(Err(e)) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    if matches!(e, BuildError::Cancelled) {
                        return fail(
                            JobStatus::Cancelled,
                            "cancelled by request during the build".into(),
                        );
                    }
                    log.line(&format!("perfbox: build failed: {e}"));
                    return fail(JobStatus::BuildFailed, e.to_string());
                }
                Ok(Ok(b)) => b,
            };
            let reused = reused.lock().unwrap_or_else(|p| p.into_inner()).take();
            let (lease, source) = match reused {
                Some(lease) if !built.exported => {
                    let _ = std::fs::remove_dir_all(&staging);
                    (lease, "rootfs-hit")
                }
                _ => {
                    let key = built
                        .rootfs_key
                        .clone()
                        .unwrap_or_else(|| format!("df-{sha}"));
                    match self.inner.images.insert(&key, &staging, built.export_bytes) {
                        Ok(l) => (l, "miss"),
                        Err(e) => {
                            let _ = std::fs::remove_dir_all(&staging);
                            return fail(
                                JobStatus::BuildFailed,
                                format!("cannot store the built image: {e}"),
                            );
                        }
                    }
                }
            };
            if let Some(key) = &alias_key {
                self.inner.images.set_alias(
                    key,
                    &images::Alias {
                        rootfs_key: lease.key().to_string(),
                        config: built.config.clone(),
                        config_digest: built.config_digest.clone(),
                    },
                );
            }
            let patch = Patch {
                image_digest: built.config_digest.clone(),
                cached_steps: Some(built.cached_steps as i64),
                total_steps: Some(built.total_steps as i64),
                image_cache: Some(source.into()),
                ..Default::default()
            };
            (built.config, lease, patch)
        };
        self.inner.metrics.observe("build", started.elapsed());
        drop(build_permit);
        // --- wait for a run slot, then run ---
        let run_permit = tokio::select! {
            p = self.inner.run_slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return fail(JobStatus::Interrupted, "perfbox is shutting down".into()) },
            _ = token.cancelled() => return fail(JobStatus::Cancelled, "cancelled by request before the run".into()),
        };
        // What the build ran with is known now: visible while the job runs, not only at its end.
        let mut built_patch = built_patch;
        built_patch.build = record.as_ref().and_then(|b| serde_json::to_value(b).ok());
        if let Err(e) = self
            .inner
            .store
            .transition(id, JobStatus::Running, built_patch)
        {
            return fail(
                JobStatus::Interrupted,
                format!("cannot record the run: {e}"),
            );
        }
        let container_id = format!(
            "perfbox-{id}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let started = Instant::now();
        let report = self
            .inner
            .sandbox
            .run(RunRequest {
                job_dir: dir,
                rootfs: lease.rootfs(),
                image: &config,
                container_id: &container_id,
                limits: None,
                cancel: token.child_token(),
            })
            .await;
        drop(run_permit);
        drop(lease);
        self.inner.metrics.observe("run", started.elapsed());
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                return fail(
                    JobStatus::RunFailed,
                    format!("the sandbox could not run the image: {e}"),
                );
            }
        };
        let mut patch = Patch {
            runtime: Some(report.runtime.to_string()),
            cgroup: Some(report.cgroup_version.to_string()),
            limits: serde_json::to_value(&report.applied).ok(),
            oom_killed: Some(report.oom_killed),
            ..Default::default()
        };
        let last_line = report
            .log_tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        let (status, error) = match (&report.end, &report.perf) {
            (RunEnd::Cancelled, _) => (
                JobStatus::Cancelled,
                Some("cancelled by request while running; the container was killed".into()),
            ),
            (RunEnd::DataLimit { exceeded }, _) => (
                JobStatus::RunFailed,
                Some(format!(
                    "the job wrote {exceeded}; it was killed and its /data removed"
                )),
            ),
            (RunEnd::TimedOut { after_secs }, _) => (
                JobStatus::TimedOut,
                Some(format!(
                    "the run exceeded its {after_secs} s limit; the container was killed"
                )),
            ),
            (RunEnd::Exited { code }, _) if report.oom_killed => {
                patch.exit_code = Some(i64::from(*code));
                (
                    JobStatus::RunFailed,
                    Some(format!(
                        "out of memory: the container was killed by the OOM killer at its {} byte memory limit",
                        self.inner.sandbox.limits().memory_bytes
                    )),
                )
            }
            (RunEnd::Exited { code }, _) if *code != 0 => {
                patch.exit_code = Some(i64::from(*code));
                let tail = if last_line.is_empty() {
                    String::new()
                } else {
                    format!("; last output: {last_line}")
                };
                (
                    JobStatus::RunFailed,
                    Some(format!("the container exited with code {code}{tail}")),
                )
            }
            (RunEnd::Exited { .. }, Ok(perf)) => {
                patch.exit_code = Some(0);
                patch.perf = Some(*perf);
                (JobStatus::Succeeded, None)
            }
            (RunEnd::Exited { .. }, Err(PerfError::Missing)) => {
                patch.exit_code = Some(0);
                (
                    JobStatus::NoPerf,
                    Some("the container exited 0 but wrote no /data/perf.json".into()),
                )
            }
            (RunEnd::Exited { .. }, Err(e)) => {
                patch.exit_code = Some(0);
                (JobStatus::InvalidPerf, Some(e.to_string()))
            }
        };
        patch.error = error;
        (status, patch)
    }
}

/// A build slot [`queue::BuildQueue::start_next`] handed out; given back (and the dispatcher woken)
/// when dropped.
struct BuildSlot {
    svc: JobService,
    owner: String,
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        self.svc.queue().release(&self.owner);
        self.svc.inner.wake.notify_one();
    }
}

/// This service's instance id: 8 random hex digits made once and kept in `<state_dir>/instance`.
fn instance_id(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join("instance");
    match std::fs::read_to_string(&path) {
        Ok(id) if id.trim().len() == 8 && id.trim().chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(id.trim().to_owned())
        }
        _ => {
            let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
            std::fs::write(&path, &id)?;
            Ok(id)
        }
    }
}

/// Where this service's builds get cgroups of their own: only with a local daemon that perfbox's
/// setup started (`--oci-worker-rootless=false`), never the networked one (it keeps BuildKit's
/// rootless mode) nor a remote one.
fn build_cgroups_for(cfg: &Config, addr: &str) -> BuildCgroups {
    if cfg.build_network == BuildNetworkSetting::Isolated {
        return BuildCgroups::Unavailable {
            reason: "networked builds (build_network = \"isolated\") run on buildkitd-net, which keeps RUN steps in its own cgroup".into(),
        };
    }
    if addr.starts_with("tcp://") {
        return BuildCgroups::Unavailable {
            reason: format!("the build daemon is remote ({addr}): its host places RUN steps"),
        };
    }
    BuildCgroups::detect(&cfg.build.cgroup_parent, nix::unistd::geteuid().as_raw())
}

impl JobService {
    /// Filesystems a build fills: BuildKit's root (when local) and perfbox's state dir.
    fn disk_watch_paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.inner.cfg.state_dir.clone()];
        if let Some(root) = &self.inner.cfg.buildkit_root {
            v.push(root.clone());
        }
        v
    }
}

/// Free bytes for unprivileged users on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// The first watched filesystem with less than `min_free` bytes free, described.
fn low_disk(paths: &[PathBuf], min_free: u64) -> Option<String> {
    paths.iter().find_map(|p| {
        let free = free_bytes(p)?;
        (free < min_free).then(|| {
            format!("the disk holding {} has {} bytes free, below the {} byte minimum (min_free_disk_bytes)", p.display(), free, min_free)
        })
    })
}

/// Resolves, with the reason, once the RUN steps of a build have written more than `max_bytes`
/// or made more than `max_files` entries (sampled every 250 ms).
async fn watch_writes(mut w: BuildWrites, max_bytes: u64, max_files: u64) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok((back, u)) = tokio::task::spawn_blocking(move || {
            let u = w.sample();
            (w, u)
        })
        .await
        else {
            return std::future::pending().await;
        };
        w = back;
        if u.bytes > max_bytes {
            return format!(
                "its RUN steps wrote {} bytes to disk, past the {max_bytes} byte limit (max_image_bytes)",
                u.bytes
            );
        }
        if u.entries > max_files {
            return format!(
                "its RUN steps made {} files and directories, past the limit of {max_files} (max_image_files)",
                u.entries
            );
        }
    }
}

/// Resolves when a watched filesystem runs low (checked every 250 ms).
async fn disk_guard(paths: Vec<PathBuf>, min_free: u64) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(low) = low_disk(&paths, min_free) {
            return low;
        }
    }
}

/// A safe display name for an uploaded file (it is only shown, never used as a path).
fn sanitize_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = base.chars().filter(|c| !c.is_control()).take(255).collect();
    if clean.is_empty() {
        "Dockerfile".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn filenames_are_display_only() {
        assert_eq!(super::sanitize_filename("../../etc/passwd"), "passwd");
        assert_eq!(super::sanitize_filename(""), "Dockerfile");
        assert_eq!(
            super::sanitize_filename("job\n.Dockerfile"),
            "job.Dockerfile"
        );
    }
}
