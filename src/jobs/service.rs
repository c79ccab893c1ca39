//! [`JobService`]: the face of the job layer. The API calls it to submit, read, list and cancel
//! jobs and to check health; it owns the store, the image builder and runner it was given, and
//! starts the worker ([`super::worker`]). At start it recovers what a previous run left: jobs it
//! held (or whose lease ran out) were building or running when it died; their containers are
//! killed and they are recorded `interrupted`. Queued jobs need nothing: they are in the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::store::{Holder, NewJob, NodeInfo, Notice, QueueCaps};
use super::{
    BuildOptions, JobDir, JobError, JobId, JobRecord, JobStatus, Owner, Patch, Runner, Store,
    StoreError, images, metrics,
};
use crate::buildkit::{ImageBuilder, SourcePolicy};
use crate::config::{BuildNetworkSetting, Config};
use crate::sandbox::build_cgroup::{BuildCgroup, BuildCgroups};

/// What the service is built from: the configuration and its three dependencies (real ones in
/// `perfbox serve`, fakes in unit tests).
pub struct Deps {
    /// The configuration in force.
    pub cfg: Config,
    /// Records and queue.
    pub store: Arc<dyn Store>,
    /// Builds images.
    pub builder: Arc<dyn ImageBuilder>,
    /// Runs them.
    pub runner: Arc<dyn Runner>,
    /// Where builds' RUN steps get cgroups of their own ([`build_cgroups_for`] for the real host).
    pub build_cgroups: BuildCgroups,
}

/// A running job: how to cancel it, and a flag that turns true when it is over.
type Active = (CancellationToken, tokio::sync::watch::Receiver<bool>);

pub(super) struct Inner {
    pub(super) cfg: Config,
    pub(super) store: Arc<dyn Store>,
    pub(super) builder: Arc<dyn ImageBuilder>,
    pub(super) runner: Arc<dyn Runner>,
    jobs_dir: PathBuf,
    /// Wakes the worker: a job was queued, or a build slot freed.
    pub(super) wake: Notify,
    pub(super) run_slots: Arc<Semaphore>,
    /// Each owner's runs at once on this node.
    pub(super) owner_runs: super::quota::OwnerSlots,
    /// Each owner's submissions per minute (on this node).
    rate: super::quota::RateLimiter,
    /// Bumped whenever a job ends (here, or on another node as its notice tells): what
    /// [`JobService::wait_final`] waits on.
    ended: tokio::sync::watch::Sender<u64>,
    /// What every build may fetch.
    pub(super) policy: SourcePolicy,
    /// Where builds get cgroups of their own.
    pub(super) build_cgroups: BuildCgroups,
    /// Build cgroups in use, by name, with the number of builds using each (an owner-scoped one
    /// is shared by that owner's concurrent builds). Made and removed under this lock, so that a
    /// build never gets a cgroup that is being removed.
    pub(super) live_build_cgroups: Mutex<HashMap<String, (Arc<BuildCgroup>, usize)>>,
    /// This service's id (8 hex digits, kept in the state dir): part of every build scope, and
    /// its name as a claimant of jobs.
    pub(super) instance: String,
    /// This program, which measures what builds write (`perfbox measure-tree`).
    pub(super) exe: Option<PathBuf>,
    pub(super) active: Mutex<HashMap<JobId, Active>>,
    /// Who holds each active job (this node, under the attempt its claim gave): every write
    /// the worker makes for the job names it, so a lost job's late writes are refused.
    pub(super) holders: Mutex<HashMap<JobId, Holder>>,
    /// How long a claim holds without renewal.
    pub(super) lease: Duration,
    pub(super) metrics: metrics::Metrics,
    pub(super) images: images::ImageCache,
    /// Signs result receipts.
    receipt_key: super::receipt::ReceiptKey,
}

/// What a submission brings.
#[derive(Debug, Clone, Copy)]
pub struct Submission<'a> {
    /// The uploaded file's name (display only).
    pub filename: &'a str,
    /// The Dockerfile (None: the `Dockerfile` at the context's root).
    pub dockerfile: Option<&'a [u8]>,
    /// The build context archive (tar, tar.gz or zip), if any.
    pub context: Option<&'a [u8]>,
    /// Build args, target, dataset, callback.
    pub options: &'a BuildOptions,
    /// Its `Idempotency-Key`, if any.
    pub idempotency_key: Option<&'a str>,
}

/// What a submission made.
#[derive(Debug)]
pub struct Submitted {
    /// The job.
    pub job: JobRecord,
    /// Whether an earlier submission with the same `Idempotency-Key` made it.
    pub replayed: bool,
}

/// The job service (cheap to clone).
#[derive(Clone)]
pub struct JobService {
    pub(super) inner: Arc<Inner>,
}

/// Health of the service's dependencies.
#[derive(Debug, serde::Serialize)]
pub struct Health {
    /// All good.
    pub ok: bool,
    /// buildkitd.
    pub buildkit: Check,
    /// The OCI runtime.
    pub runtime: Check,
    /// The state dir.
    pub state_dir: Check,
    /// cgroup layout for job limits.
    pub cgroups: String,
    /// Whether each build's RUN steps get a cgroup of their own, apart from the build daemon.
    pub build_cgroups: String,
    /// The source policy of every build.
    pub build_sources: String,
    /// This node: its name (instance id) and store (`sqlite`, or `postgresql` shared with
    /// the nodes of `GET /nodes`).
    pub node: NodeHealth,
    /// How the API is exposed.
    pub api: ApiHealth,
}

/// The API's exposure, in [`Health`].
#[derive(Debug, serde::Serialize)]
pub struct ApiHealth {
    /// The listen address.
    pub bind: String,
    /// Whether the API speaks TLS.
    pub tls: bool,
    /// Whether callers need a token.
    pub tokens: bool,
    /// What is weaker than it should be (tokens in clear on the network, an open service).
    pub warning: Option<String>,
    /// Per-owner quotas in force.
    pub quotas: crate::config::Quotas,
}

/// This node, in [`Health`].
#[derive(Debug, serde::Serialize)]
pub struct NodeHealth {
    /// Instance id.
    pub name: String,
    /// `sqlite` or `postgresql`.
    pub store: &'static str,
    /// Seconds a claim holds without renewal.
    pub lease_secs: u64,
}

/// One dependency's health: `{"ok": true, "version": "…"}` (or `"path"` for the state dir), or
/// `{"ok": false, "error": "<why>"}`.
#[derive(Debug, serde::Serialize)]
pub struct Check {
    /// Whether it works.
    pub ok: bool,
    /// Its version, when it works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its path, when it works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Why not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Check {
    fn new(r: Result<String, String>, is_path: bool) -> Self {
        match r {
            Ok(v) => Check {
                ok: true,
                version: (!is_path).then(|| v.clone()),
                path: is_path.then_some(v),
                error: None,
            },
            Err(error) => Check {
                ok: false,
                version: None,
                path: None,
                error: Some(error),
            },
        }
    }
}

impl JobService {
    /// Open the image cache, recover from a previous run, and start the worker. Must be called
    /// within a tokio runtime.
    pub async fn start(deps: Deps) -> Result<Self, JobError> {
        let Deps {
            cfg,
            store,
            builder,
            runner,
            build_cgroups,
        } = deps;
        std::fs::create_dir_all(&cfg.state_dir)?;
        let jobs_dir = cfg.state_dir.join("jobs");
        std::fs::create_dir_all(&jobs_dir)?;
        let images =
            images::ImageCache::open(&cfg.state_dir.join("images"), cfg.image_cache_bytes)?;
        let policy = cfg
            .source_policy()
            .map_err(|e| JobError::InvalidRequest(e.to_string()))?;
        tracing::info!(build_cgroups = %build_cgroups.describe(), "build isolation");
        let instance = instance_id(&cfg.state_dir)?;
        let (receipt_key, made) = super::receipt::ReceiptKey::load_or_create(&cfg.state_dir)?;
        if made {
            tracing::info!(key = %receipt_key.public()["key_id"], "made the receipt signing key");
        }
        let lease_secs = cfg.lease_secs;
        let node = NodeInfo {
            name: instance.clone(),
            url: cfg.node_url.clone().unwrap_or_else(|| {
                let scheme = if cfg.tls.paths().is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{}", cfg.bind)
            }),
            capacity: cfg.max_concurrent_builds as i64,
            pid: i64::from(std::process::id()),
            started_at: super::store::now(),
            heartbeat_at: super::store::now(),
        };
        store.register_node(&node)?;
        let inner = Arc::new(Inner {
            receipt_key,
            wake: Notify::new(),
            run_slots: Arc::new(Semaphore::new(cfg.max_concurrent_runs)),
            owner_runs: super::quota::OwnerSlots::new(cfg.quotas.runs_per_owner),
            rate: super::quota::RateLimiter::new(cfg.quotas.submissions_per_minute),
            ended: tokio::sync::watch::Sender::new(0),
            policy,
            build_cgroups,
            live_build_cgroups: Mutex::new(HashMap::new()),
            instance,
            exe: std::env::current_exe().ok(),
            cfg,
            store,
            builder,
            runner,
            jobs_dir,
            active: Mutex::new(HashMap::new()),
            holders: Mutex::new(HashMap::new()),
            lease: Duration::from_secs(lease_secs),
            metrics: metrics::Metrics::default(),
            images,
        });
        let svc = JobService { inner };
        svc.recover().await?;
        if let Some(notices) = svc.inner.store.notices() {
            tokio::spawn(svc.clone().follow_notices(notices));
        }
        tokio::spawn(svc.clone().work());
        Ok(svc)
    }

    /// Act on what other nodes announce: work to claim, or a cancel of a job held here.
    async fn follow_notices(self, mut notices: tokio::sync::broadcast::Receiver<Notice>) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match notices.recv().await {
                Ok(Notice::Work) | Err(RecvError::Lagged(_)) => self.inner.wake.notify_one(),
                Ok(Notice::Ended(_)) => self.job_ended(),
                Ok(Notice::Cancel(id)) => {
                    let active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((token, _)) = active.get(&id) {
                        tracing::info!(job = id, "cancel asked for through another node");
                        token.cancel();
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// A job ended (here or, as a notice tells, on another node): wake whoever waits for one
    /// ([`Self::wait_final`]).
    pub(super) fn job_ended(&self) {
        self.inner.ended.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// This node recorded job `id`'s end: wake the waiters, and call back if it asked.
    pub(super) fn ended_here(&self, id: JobId) {
        self.job_ended();
        self.call_back(id);
    }

    /// Job `id` once it is final, or as it is after `within` (whichever comes first). Woken by
    /// the end of any job on this node or, through the store's notices, on another; it looks
    /// again every second too, for ends no notice told of.
    pub async fn wait_final(
        &self,
        id: JobId,
        owner: &Owner,
        within: Duration,
    ) -> Result<JobRecord, JobError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut ended = self.inner.ended.subscribe();
        loop {
            ended.borrow_and_update();
            let rec = self.get(id, owner)?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if rec.status.is_terminal() || left.is_zero() {
                return Ok(rec);
            }
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), ended.changed()).await;
        }
    }

    /// The holder of an active job of this node.
    pub(super) fn holder(&self, id: JobId) -> Option<Holder> {
        self.inner
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// The nodes working from this store.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, JobError> {
        Ok(self.inner.store.nodes()?)
    }

    /// Where to ask for a job's live state when another node, alive, is building or running
    /// it (its API's URL); None when this node has all there is to show.
    pub fn holder_url(&self, rec: &JobRecord) -> Option<String> {
        if !self.inner.store.shared() || rec.status.is_terminal() {
            return None;
        }
        let node = rec.claimed_by.as_deref()?;
        if node == self.inner.instance {
            return None;
        }
        let fresh = 2.0 * self.inner.lease.as_secs_f64();
        self.inner
            .store
            .nodes()
            .ok()?
            .into_iter()
            .find(|n| n.name == node && super::store::now() - n.heartbeat_at < fresh)
            .map(|n| n.url)
    }

    /// This node's name (its instance id) and how long its claims hold.
    pub fn node(&self) -> (&str, Duration) {
        (&self.inner.instance, self.inner.lease)
    }

    /// A job's directory here, with its kept files brought from a shared store when another
    /// node ran it (its logs and spec are then readable here too).
    pub(super) fn local_dir(&self, rec: &JobRecord) -> JobDir {
        let dir = self.job_dir(rec.id);
        let elsewhere = rec.claimed_by.as_deref() != Some(self.inner.instance.as_str());
        if self.inner.store.shared() && elsewhere && rec.status.is_terminal() {
            match self.inner.store.files(rec.id) {
                Ok(files) => {
                    if let Err(e) = dir.restore(&files) {
                        tracing::warn!(job = rec.id, error = %e, "cannot restore the job's files here");
                    }
                }
                Err(e) => tracing::warn!(job = rec.id, error = %e, "cannot read the job's files"),
            }
        }
        dir
    }

    /// Jobs this service held when it died, and any whose lease ran out, are given up
    /// ([`Self::give_up`]); their containers here, if still alive, are killed first.
    async fn recover(&self) -> Result<(), JobError> {
        for id in self.inner.store.stale(&self.inner.instance)? {
            self.give_up(id).await?;
        }
        Ok(())
    }

    /// A building or running job nobody works on any more (its node stopped, or stopped
    /// answering): queued again for another attempt where the store is shared and attempts
    /// remain, else recorded `interrupted` with why. Fenced by the attempt: if another node
    /// took it first, nothing happens.
    pub(super) async fn give_up(&self, id: JobId) -> Result<(), JobError> {
        let store = &self.inner.store;
        let Some(rec) = store.get(id)? else {
            return Ok(());
        };
        let mine = rec
            .claimed_by
            .as_deref()
            .is_none_or(|n| n == self.inner.instance);
        if mine {
            self.inner.runner.reap(self.job_dir(id).path()).await;
        }
        let max = if store.shared() {
            i64::from(self.inner.cfg.max_attempts)
        } else {
            1
        };
        let requeue = rec.attempt < max;
        let why = match (&rec.claimed_by, mine) {
            (Some(node), false) => format!(
                "its node {node} stopped answering while the job was {} (attempt {} of {max}); it did not finish",
                rec.status, rec.attempt
            ),
            _ if max > 1 => format!(
                "perfbox stopped while the job was {} (attempt {} of {max}); it did not finish",
                rec.status, rec.attempt
            ),
            _ => format!(
                "perfbox stopped while the job was {}; it did not finish",
                rec.status
            ),
        };
        match store.give_up(id, rec.attempt, requeue, &why) {
            Ok(r) if r.status == JobStatus::Queued => {
                tracing::warn!(
                    job = id,
                    attempt = rec.attempt,
                    "its node is gone: queued again"
                );
                self.inner.wake.notify_one();
            }
            Ok(r) => {
                tracing::warn!(job = id, status = %r.status, "its node is gone: {why}");
                self.ended_here(id);
            }
            Err(StoreError::Fenced { .. } | StoreError::NotFound(_)) => {} // someone else did
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// The directory of a job.
    pub fn job_dir(&self, id: JobId) -> JobDir {
        JobDir::new(self.inner.jobs_dir.join(id.to_string()))
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
        let s = Submission {
            filename,
            dockerfile: Some(dockerfile),
            context: None,
            options,
            idempotency_key: None,
        };
        self.submit_once(&s, owner, submitter).map(|s| s.job)
    }

    /// [`Self::submit`] of a whole [`Submission`], at most once per idempotency key (and
    /// submitter): a repeated key answers the job the first submission made (`replayed`),
    /// provided it carried the same Dockerfile, and counts against no quota.
    pub fn submit_once(
        &self,
        sub: &Submission<'_>,
        owner: Owner,
        submitter: &str,
    ) -> Result<Submitted, JobError> {
        let options = sub.options;
        let idempotency_key = sub.idempotency_key;
        if let Some(key) = idempotency_key
            && (key.is_empty()
                || key.len() > 255
                || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        {
            return Err(JobError::InvalidRequest(
                "Idempotency-Key must be 1-255 printable ASCII characters".into(),
            ));
        }
        // The context first: the Dockerfile may come from its root.
        let from_context = match sub.context {
            None => None,
            Some(archive) => {
                let max = self.inner.cfg.context.max_archive_bytes;
                if archive.len() as u64 > max {
                    return Err(JobError::InvalidRequest(format!(
                        "the context archive is {} bytes; the limit is {max}",
                        archive.len()
                    )));
                }
                let (_, dockerfile) = super::context::check(archive, self.inner.cfg.context_caps())
                    .map_err(|e| JobError::InvalidRequest(e.to_string()))?;
                dockerfile
            }
        };
        let dockerfile: &[u8] = match (sub.dockerfile, &from_context) {
            (Some(d), _) => d,
            (None, Some(d)) => d,
            (None, None) => {
                return Err(JobError::InvalidRequest(if sub.context.is_some() {
                    "no Dockerfile: send it in the \"file\" field or at the context's root".into()
                } else {
                    "no Dockerfile: send it in the \"file\" field".into()
                }));
            }
        };
        let sha = hex::encode(Sha256::digest(dockerfile));
        if let Some(key) = idempotency_key
            && let Some(job) = self.replay(submitter, key, &sha)?
        {
            return Ok(job);
        }
        options.validate()?;
        if let Some(url) = &options.callback_url {
            super::callback::check_url(url, &self.inner.cfg.callbacks.allowed_hosts)
                .map_err(JobError::InvalidRequest)?;
        }
        if let Some(name) = &options.dataset
            && self.inner.cfg.dataset(name).is_none()
        {
            let known: Vec<&str> = self
                .inner
                .cfg
                .datasets
                .iter()
                .map(|d| d.name.as_str())
                .collect();
            return Err(JobError::InvalidRequest(format!(
                "unknown dataset {name:?}; this service has: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
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
        let filename = sanitize_filename(sub.filename);
        let files = JobDir::submission(dockerfile, options, sub.context)?;
        let files: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(name, content)| (*name, content.as_slice()))
            .collect();
        let new = NewJob {
            filename: &filename,
            owner: owner.as_deref(),
            submitter,
            dockerfile_sha256: &sha,
            idempotency_key,
            files: &files,
        };
        // Only a submission that would be queued counts against the rate.
        let rate = &self.inner.rate;
        rate.take(submitter, std::time::Instant::now())
            .map_err(|wait| JobError::RateLimited {
                per_minute: rate.per_minute(),
                retry_after_secs: wait.as_secs_f64().ceil() as u64,
            })?;
        let caps = QueueCaps {
            total: self.inner.cfg.max_queued_jobs,
            per_submitter: self.inner.cfg.quotas.queued_per_owner,
        };
        // The job's directory is written before the job is visible to any worker; if that fails
        // there is no job.
        let rec = self
            .inner
            .store
            .insert(&new, caps, &mut |id| {
                let dir = self.job_dir(id);
                dir.create(dockerfile, options, sub.context)
                    .inspect_err(|_| {
                        let _ = std::fs::remove_dir_all(dir.path());
                    })
            })
            .map_err(|e| match e {
                StoreError::OwnerQueueFull(queued) => JobError::OwnerQueueFull {
                    queued,
                    max: caps.per_submitter,
                },
                e => e.into(),
            });
        let rec = match (rec, idempotency_key) {
            // The same key, sent twice at once: the other request made the job.
            (Err(JobError::Store(StoreError::DuplicateKey)), Some(key)) => {
                return self
                    .replay(submitter, key, &sha)?
                    .ok_or(JobError::Store(StoreError::DuplicateKey));
            }
            (rec, _) => rec?,
        };
        self.inner.wake.notify_one();
        Ok(Submitted {
            job: rec,
            replayed: false,
        })
    }

    /// The job an earlier submission with `key` made, if any; refused if it was another
    /// Dockerfile (by its SHA-256, hex).
    fn replay(
        &self,
        submitter: &str,
        key: &str,
        dockerfile_sha256: &str,
    ) -> Result<Option<Submitted>, JobError> {
        let Some(job) = self.inner.store.by_idempotency_key(submitter, key)? else {
            return Ok(None);
        };
        if job.dockerfile_sha256 != dockerfile_sha256 {
            return Err(JobError::IdempotencyMismatch { id: job.id });
        }
        Ok(Some(Submitted {
            job,
            replayed: true,
        }))
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

    /// A page of the jobs visible to `owner` (of `statuses`, or all when empty), newest first,
    /// and how many there are in all.
    pub fn list(
        &self,
        owner: &Owner,
        statuses: &[JobStatus],
        before: Option<JobId>,
        limit: usize,
    ) -> Result<(Vec<JobRecord>, i64), JobError> {
        let which = super::Listing {
            owner: owner.as_deref(),
            statuses,
        };
        let jobs = self.inner.store.list(which, before, limit)?;
        Ok((jobs, self.inner.store.count(which)?))
    }

    /// The leaderboard as `owner` may see it: its own succeeded jobs, or everyone's when
    /// `[leaderboard] public` is set (see [`Leaderboard`]). Tied perfs share a rank.
    pub fn leaderboard(
        &self,
        owner: &Owner,
        best_per_owner: bool,
        limit: usize,
    ) -> Result<Leaderboard, JobError> {
        let cfg = &self.inner.cfg.leaderboard;
        let higher_is_better = cfg.direction == crate::config::Direction::Higher;
        let board = super::Board {
            owner: if cfg.public { None } else { owner.as_deref() },
            higher_is_better,
            best_per_owner,
            limit,
        };
        let mut entries: Vec<Ranked> = Vec::new();
        for job in self.inner.store.leaderboard(&board)? {
            let Some(perf) = job.perf.filter(|p| p.is_finite()) else {
                continue;
            };
            let rank = match entries.last() {
                Some(prev) if prev.job.perf == Some(perf) => prev.rank,
                _ => entries.len() + 1,
            };
            let visible = owner.is_none() || job.owner == *owner;
            entries.push(Ranked { rank, visible, job });
        }
        Ok(Leaderboard {
            higher_is_better,
            public: cfg.public,
            entries,
        })
    }

    /// The OCI spec the job ran with (its config.json, verbatim).
    pub fn spec(&self, id: JobId, owner: &Owner) -> Result<serde_json::Value, JobError> {
        self.spec_of(&self.get(id, owner)?)
    }

    /// [`Self::spec`] of a record the caller already read (and may see).
    pub fn spec_of(&self, rec: &JobRecord) -> Result<serde_json::Value, JobError> {
        let text = std::fs::read_to_string(self.local_dir(rec).spec())
            .map_err(|_| JobError::NoSpec(rec.id))?;
        serde_json::from_str(&text).map_err(|_| JobError::NoSpec(rec.id))
    }

    /// Check a job against every audit rule ([`super::audit`]).
    pub fn audit(&self, id: JobId, owner: &Owner) -> Result<super::audit::JobAudit, JobError> {
        Ok(self.audit_of(&self.get(id, owner)?))
    }

    /// [`Self::audit`] of a record the caller already read (and may see).
    pub fn audit_of(&self, rec: &JobRecord) -> super::audit::JobAudit {
        let dir = self.local_dir(rec);
        let seccomp_digest = self.inner.runner.seccomp_digest();
        super::audit::audit_job(
            rec,
            &super::audit::AuditBasis {
                job_dir: dir.path(),
                seccomp_digest: &seccomp_digest,
                frontend: super::pipeline::FRONTEND,
                datasets: &self.inner.cfg.datasets,
            },
        )
    }

    /// The signed receipt of a finished job ([`super::receipt`]).
    pub fn receipt(&self, id: JobId, owner: &Owner) -> Result<serde_json::Value, JobError> {
        let rec = self.get(id, owner)?;
        if !rec.status.is_terminal() {
            return Err(JobError::NotFinished {
                id,
                status: rec.status,
            });
        }
        Ok(self
            .inner
            .receipt_key
            .receipt(&rec, std::time::SystemTime::now()))
    }

    /// The public key receipts are signed with.
    pub fn receipt_key(&self) -> serde_json::Value {
        self.inner.receipt_key.public()
    }

    /// The log files of a job, build first.
    pub fn log_paths(&self, id: JobId, owner: &Owner) -> Result<[PathBuf; 2], JobError> {
        let rec = self.get(id, owner)?;
        let dir = self.local_dir(&rec);
        Ok([dir.build_log(), dir.run_log()])
    }

    /// Cancel a job: a queued one at once; a building or running one by stopping the build or
    /// killing the container, waiting until that is done (so no container is left on return).
    pub async fn cancel(&self, id: JobId, owner: &Owner) -> Result<JobRecord, JobError> {
        // A job the worker has just claimed is registered a moment later: look again shortly.
        for _ in 0..250 {
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
            if let Some((token, mut done)) = active {
                token.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(30), done.wait_for(|d| *d)).await;
                return self.get(id, owner);
            }
            if rec.status != JobStatus::Queued
                && self.inner.store.shared()
                && rec.claimed_by.as_deref() != Some(self.inner.instance.as_str())
            {
                return self.cancel_elsewhere(id, owner).await;
            }
            if rec.status == JobStatus::Queued {
                let patch = Patch {
                    error: Some("cancelled by request before it started".into()),
                    ..Default::default()
                };
                match self.inner.store.transition(id, JobStatus::Cancelled, patch) {
                    Ok(rec) => {
                        self.ended_here(id);
                        return Ok(rec);
                    }
                    Err(StoreError::IncorrectStatus { .. }) => continue, // claimed meanwhile
                    Err(e) => return Err(e.into()),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Building or running, but not here (its worker is gone): record it cancelled.
        let patch = Patch {
            error: Some("cancelled by request; no worker held it".into()),
            ..Default::default()
        };
        let rec = self
            .inner
            .store
            .transition(id, JobStatus::Cancelled, patch)?;
        self.ended_here(id);
        Ok(rec)
    }

    /// Cancel a job another node works on: ask its holder (through the store) and wait for
    /// the job to end; a holder that does not answer within two leases loses the job to
    /// [`Self::give_up`], which ends it `cancelled` too.
    async fn cancel_elsewhere(&self, id: JobId, owner: &Owner) -> Result<JobRecord, JobError> {
        self.inner.store.request_cancel(id)?;
        let deadline = tokio::time::Instant::now() + self.inner.lease * 2;
        loop {
            let rec = self.get(id, owner)?;
            if rec.status.is_terminal() || tokio::time::Instant::now() > deadline {
                return Ok(rec);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> Result<String, JobError> {
        let counts = self.inner.store.counts()?;
        let depth = self.inner.store.queue_depth()?;
        Ok(self.inner.metrics.render(&counts, depth))
    }

    /// Check buildkitd, the runtime and the state dir.
    pub async fn health(&self) -> Health {
        let buildkit = match tokio::time::timeout(
            Duration::from_secs(3),
            self.inner.builder.version(),
        )
        .await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("no answer within 3 s".into()),
        };
        let runtime = self.inner.runner.version().await;
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
        let remote: Vec<&str> = policy
            .remote_sources()
            .iter()
            .map(|r| r.pattern())
            .collect();
        let node = NodeHealth {
            name: self.inner.instance.clone(),
            store: if self.inner.store.shared() {
                "postgresql"
            } else {
                "sqlite"
            },
            lease_secs: self.inner.lease.as_secs(),
        };
        let cfg = &self.inner.cfg;
        let api = ApiHealth {
            bind: cfg.bind.clone(),
            tls: cfg.tls.paths().is_some(),
            tokens: !cfg.tokens.is_empty(),
            warning: cfg.exposure_warning(),
            quotas: cfg.quotas.clone(),
        };
        Health {
            node,
            api,
            ok: buildkit.is_ok() && runtime.is_ok() && state_dir.is_ok(),
            buildkit: Check::new(buildkit, false),
            runtime: Check::new(runtime, false),
            state_dir: Check::new(state_dir, true),
            cgroups: self.inner.runner.cgroup_version().to_string(),
            build_cgroups: self.inner.build_cgroups.describe(),
            build_sources: format!(
                "images only from {}; other remote sources: {}",
                policy.registries().join(", "),
                if remote.is_empty() {
                    "none".to_string()
                } else {
                    remote.join(", ")
                }
            ),
        }
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
pub fn build_cgroups_for(cfg: &Config, addr: &str) -> BuildCgroups {
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

/// Succeeded jobs ranked by perf, as one caller may see them ([`JobService::leaderboard`]).
#[derive(Debug)]
pub struct Leaderboard {
    /// A higher perf ranks first.
    pub higher_is_better: bool,
    /// Every owner's entries are shown (`[leaderboard] public`).
    pub public: bool,
    /// Best first.
    pub entries: Vec<Ranked>,
}

/// One leaderboard entry.
#[derive(Debug)]
pub struct Ranked {
    /// 1 for the best; equal perfs share a rank (1, 2, 2, 4).
    pub rank: usize,
    /// The caller may see the job itself (its id, file, page); on a public board other owners'
    /// entries show only their rank, owner, perf and time.
    pub visible: bool,
    /// The job.
    pub job: JobRecord,
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
