//! Jobs: everything between an accepted Dockerfile and its recorded result.
//!
//! - [`state`]: the state machine (`queued → building → running →` one terminal state);
//! - [`store`]: the durable records, which are also the queue ([`Store`], SQLite by default);
//! - [`service`]: [`JobService`], the face the API talks to (submit, read, cancel, health,
//!   metrics) and restart recovery;
//! - [`worker`]: claims queued jobs from the store as build slots free up, and drives each one;
//! - [`pipeline`]: one job's work — get an image (the image cache, or a build with the build-side
//!   isolation below), then run it;
//! - [`outcome`]: the pure mapping from what a run reported to the job's final status;
//! - [`job_dir`]: the layout of a job's directory; [`images`]: the shared image cache;
//!   [`metrics`]: Prometheus text;
//! - [`audit`]: every rule a job must satisfy, checked against its record and spec; [`receipt`]:
//!   signed receipts of results;
//! - [`runner`]: the sandbox seam ([`crate::buildkit::ImageBuilder`] is the builder's), so that
//!   all of the above runs in unit tests with fakes ([`fakes`]), no root and no daemon.
//!
//! Every build is isolated from the others and from the host: a source policy (images only from
//! the configured registries, nothing else remote unless allowed), a cache scope (the job's own,
//! or its owner's), a cgroup of its own for its RUN steps where the host allows, and caps on what
//! it may write and export. What each build ran with is kept in the job record (`build`).

#![forbid(unsafe_code)]

pub mod audit;
pub mod callback;
pub mod context;
#[cfg(test)]
pub mod fakes;
pub mod images;
pub mod job_dir;
pub mod metrics;
pub mod outcome;
pub mod pg_store;
pub mod pipeline;
pub mod quota;
pub mod receipt;
pub mod runner;
pub mod service;
pub mod state;
pub mod store;
pub mod store_conformance;
#[cfg(test)]
mod tests;
pub mod worker;

use std::collections::BTreeMap;

use crate::config::{BuildNetworkSetting, CacheScope};
use crate::sandbox::build_cgroup::BuildLimits;
pub use job_dir::JobDir;
pub use runner::Runner;
pub use service::{Health, JobService};
pub use state::JobStatus;
pub use store::{Board, JobId, JobRecord, Listing, Patch, SqliteStore, Store, StoreError};

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
    QueueFull(i64),
    /// The submitter has as many jobs waiting as one may.
    #[error(
        "{queued} of your jobs are already waiting, as many as one submitter may queue \
         (quotas.queued_per_owner = {max}); submit again when one has started"
    )]
    OwnerQueueFull {
        /// Their waiting jobs.
        queued: i64,
        /// The quota.
        max: usize,
    },
    /// An `Idempotency-Key` used again for another Dockerfile.
    #[error(
        "this Idempotency-Key was used for job {id}, with another Dockerfile; use a new key for \
         a new submission"
    )]
    IdempotencyMismatch {
        /// The job the key made.
        id: JobId,
    },
    /// The submitter sent more submissions than its rate allows.
    #[error(
        "more than {per_minute} submissions per minute (quotas.submissions_per_minute); \
         try again in {retry_after_secs} s"
    )]
    RateLimited {
        /// The quota.
        per_minute: u32,
        /// When the next submission is allowed.
        retry_after_secs: u64,
    },
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
    /// The job has not finished (no receipt yet).
    #[error("job {id} is {status}: receipts are for finished jobs")]
    NotFinished {
        /// Job.
        id: JobId,
        /// Its status.
        status: JobStatus,
    },
    /// The receipt signing key cannot be used.
    #[error("receipt key: {0}")]
    ReceiptKey(#[from] receipt::KeyError),
    /// The job has no spec yet.
    #[error("job {0} has not run yet, so it has no sandbox spec")]
    NoSpec(JobId),
    /// Store failure.
    #[error(transparent)]
    Store(StoreError),
    /// Filesystem failure.
    #[error("job storage: {0}")]
    Io(#[from] std::io::Error),
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::QueueFull(n) => JobError::QueueFull(n),
            e => JobError::Store(e),
        }
    }
}

/// Who is asking: `None` when authentication is off (sees everything).
pub type Owner = Option<String>;

/// What a submission asks for besides the Dockerfile (kept with it as `build-options.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildOptions {
    /// `--build-arg NAME=value` pairs (never `BUILDKIT_*`).
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// `--target` stage.
    #[serde(default)]
    pub target: Option<String>,
    /// The dataset (by its configured name) to mount read-only at `/input` in the run; never
    /// in the build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Where to POST the final answer (a host `[callbacks] allowed_hosts` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
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
    /// Whether the build read the submission's own context (served by perfbox's session as
    /// `local://context`).
    pub context: bool,
    /// The cache scope tag (`job-<id>-<instance>` or `owner-<hash>-<instance>`).
    pub scope: String,
    /// Whose cache: "job" or "owner".
    pub cache_scope: CacheScope,
    /// Network of RUN steps: "none" or "isolated".
    pub network: BuildNetworkSetting,
    /// The frontend that ran.
    pub frontend: &'static str,
    /// Entitlements the solve asked for ([`crate::buildkit::ENTITLEMENTS`]: none).
    pub entitlements: Vec<String>,
    /// The source policy the daemon evaluated every source against, rule by rule.
    pub source_policy: Vec<String>,
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
