//! Durable job records, and the queue: a job waits in the store until a worker claims it.
//!
//! [`Store`] is what the job service needs of a database; [`SqliteStore`] is the embedded one (a
//! SQLite file in WAL mode in the state dir). Ids come from an AUTOINCREMENT sequence and are
//! never reused. Every status change is checked against the state machine inside the transaction
//! that writes it.
//!
//! The queue is the `queued` rows, oldest first: no channel, no counter kept by hand. A worker
//! [`Store::claim`]s a job in one transaction, which moves it to `building`, takes a build slot for
//! it (`slot = 'build'`), and stamps it with the claiming node and a lease that the node renews
//! ([`Store::renew`]). A claim respects the node's build slots and the owner's share of them
//! (jobs of an owner already holding its share are passed over), and takes turns between owners:
//! the owner with the fewest jobs building or running goes first, FIFO among equals and within
//! an owner — so an owner who floods the queue delays another's next job by one job's turn at
//! most. An insert respects [`QueueCaps`]. After a restart,
//! the jobs a node held, and any whose lease ran out, are found by [`Store::stale`].
//!
//! The record is declared once ([`NAMES`], read by [`JobRecord::from_row`] at indices found at
//! compile time from those names); the schema
//! grows by numbered migrations ([`MIGRATIONS`], tracked in `PRAGMA user_version`).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use serde_json::value::RawValue;

use super::state::JobStatus;

/// A job id.
pub type JobId = i64;

/// Everything known about a job.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct JobRecord {
    /// Id.
    pub id: JobId,
    /// The uploaded file's name.
    pub filename: String,
    /// Token name that submitted it (None without authentication).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Status.
    pub status: JobStatus,
    /// Why it failed (terminal failures only).
    pub error: Option<String>,
    /// The result.
    pub perf: Option<f64>,
    /// sha256 of the Dockerfile.
    pub dockerfile_sha256: String,
    /// Unix time (s) of submission.
    pub created_at: f64,
    /// Unix time the build started.
    pub build_started_at: Option<f64>,
    /// Unix time the build ended.
    pub build_finished_at: Option<f64>,
    /// Unix time the run started.
    pub run_started_at: Option<f64>,
    /// Unix time the job ended.
    pub finished_at: Option<f64>,
    /// Image config digest.
    pub image_digest: Option<String>,
    /// Build steps served from cache / total.
    pub cached_steps: Option<i64>,
    /// Build steps in total.
    pub total_steps: Option<i64>,
    /// OCI runtime used.
    pub runtime: Option<String>,
    /// cgroup layout used for limits (v1, v2, none).
    pub cgroup: Option<String>,
    /// The limits that really applied (JSON, passed through as stored).
    pub limits: Option<Box<RawValue>>,
    /// Container exit code.
    pub exit_code: Option<i64>,
    /// Killed by the OOM killer.
    pub oom_killed: Option<bool>,
    /// Where the image came from: "hit" (an identical Dockerfile was built before: no BuildKit
    /// call, no export), "rootfs-hit" (BuildKit solved it, mostly from its cache, and its root
    /// filesystem was already in perfbox's image cache: no export — e.g. only CMD changed), or
    /// "miss" (built and exported).
    pub image_cache: Option<String>,
    /// What the build ran with: cache scope, network, frontend, source policy, image size cap,
    /// and the cgroup of its RUN steps (JSON as stored, see [`super::BuildRecord`]).
    pub build: Option<Box<RawValue>>,
    /// Whose share of build slots the job used: the owner, or the client's address without
    /// tokens (not shown: it may be another user's address).
    #[serde(skip)]
    pub submitter: Option<String>,
    /// SHA-256 (hex) of the spec (`config.json`) as the sandbox wrote it for the run: what
    /// `perfbox audit` compares the file with.
    pub spec_sha256: Option<String>,
    /// The OCI runtime's version (`--version`, first line).
    pub runtime_version: Option<String>,
    /// How many times a node claimed the job (a job whose node died is queued again, up to
    /// `max_attempts`). Writes by a worker are fenced by it: see [`Holder`].
    #[serde(default)]
    pub attempt: i64,
    /// The node (perfbox process, by instance id) that claimed it last.
    #[serde(rename = "node")]
    pub claimed_by: Option<String>,
    /// The job's directory on the node that ran it (its `out/` is the run's `/data`): what
    /// an audit on any node checks the spec's one bind mount against.
    pub run_dir: Option<String>,
    /// What the run used, measured by the host: wall, CPU (user, system) and peak memory, and
    /// where the numbers come from (JSON as stored, see [`crate::sandbox::Usage`]).
    pub usage: Option<Box<RawValue>>,
    /// The submission's `Idempotency-Key`, if it had one (unique per submitter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The dataset mounted read-only at `/input` in the run, by name.
    pub dataset: Option<String>,
    /// What became of the submission's callback (JSON as stored, see
    /// [`super::callback::Delivery`]).
    pub callback: Option<Box<RawValue>>,
}

/// The columns of a record (what every query selects, in this order).
const NAMES: [&str; 32] = [
    "id",
    "filename",
    "owner",
    "status",
    "error",
    "perf",
    "dockerfile_sha256",
    "created_at",
    "build_started_at",
    "build_finished_at",
    "run_started_at",
    "finished_at",
    "image_digest",
    "cached_steps",
    "total_steps",
    "runtime",
    "cgroup",
    "limits",
    "exit_code",
    "oom_killed",
    "image_cache",
    "build",
    "submitter",
    "spec_sha256",
    "runtime_version",
    "attempt",
    "claimed_by",
    "run_dir",
    "usage",
    "idempotency_key",
    "dataset",
    "callback",
];

/// [`NAMES`], comma-separated, for `SELECT`.
pub(super) static COLUMNS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| NAMES.join(", "));

/// The position of column `name` in [`NAMES`], found at compile time (a row is read by index:
/// looking a column up by name walks the statement's column names for every field).
pub(super) const fn col(name: &str) -> usize {
    let mut i = 0;
    while i < NAMES.len() {
        let (a, b) = (NAMES[i].as_bytes(), name.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("not a column of jobs")
}

impl JobRecord {
    /// A row of [`COLUMNS`].
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        // JSON columns are passed through as stored (they were written from valid JSON).
        let json = |i: usize| -> rusqlite::Result<Option<Box<RawValue>>> {
            Ok(r.get::<_, Option<String>>(i)?
                .and_then(|text| RawValue::from_string(text).ok()))
        };
        let status: String = r.get(const { col("status") })?;
        Ok(JobRecord {
            id: r.get(const { col("id") })?,
            filename: r.get(const { col("filename") })?,
            owner: r.get(const { col("owner") })?,
            status: JobStatus::parse(&status).unwrap_or(JobStatus::Interrupted),
            error: r.get(const { col("error") })?,
            perf: r.get(const { col("perf") })?,
            dockerfile_sha256: r.get(const { col("dockerfile_sha256") })?,
            created_at: r.get(const { col("created_at") })?,
            build_started_at: r.get(const { col("build_started_at") })?,
            build_finished_at: r.get(const { col("build_finished_at") })?,
            run_started_at: r.get(const { col("run_started_at") })?,
            finished_at: r.get(const { col("finished_at") })?,
            image_digest: r.get(const { col("image_digest") })?,
            cached_steps: r.get(const { col("cached_steps") })?,
            total_steps: r.get(const { col("total_steps") })?,
            runtime: r.get(const { col("runtime") })?,
            cgroup: r.get(const { col("cgroup") })?,
            limits: json(const { col("limits") })?,
            exit_code: r.get(const { col("exit_code") })?,
            oom_killed: r
                .get::<_, Option<i64>>(const { col("oom_killed") })?
                .map(|v| v != 0),
            image_cache: r.get(const { col("image_cache") })?,
            build: json(const { col("build") })?,
            submitter: r.get(const { col("submitter") })?,
            spec_sha256: r.get(const { col("spec_sha256") })?,
            runtime_version: r.get(const { col("runtime_version") })?,
            attempt: r.get(const { col("attempt") })?,
            claimed_by: r.get(const { col("claimed_by") })?,
            run_dir: r.get(const { col("run_dir") })?,
            usage: json(const { col("usage") })?,
            idempotency_key: r.get(const { col("idempotency_key") })?,
            dataset: r.get(const { col("dataset") })?,
            callback: json(const { col("callback") })?,
        })
    }

    /// The answer `GET /job/performance/{id}` gives (and a callback carries): the perf of a
    /// succeeded job, the error of a failed one, the phase of one under way.
    pub fn answer(&self) -> serde_json::Value {
        use serde_json::json;
        let (id, s) = (self.id, self.status);
        match s {
            JobStatus::Succeeded => json!({ "job": id, "status": s, "perf": self.perf }),
            s if !s.is_terminal() => json!({ "job": id, "status": s, "info": s.info() }),
            s => json!({
                "job": id, "status": s,
                "error": self.error.clone().unwrap_or_else(|| s.to_string()),
            }),
        }
    }

    /// [`Self::build`], parsed.
    pub fn build_json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(self.build.as_ref()?.get()).ok()
    }
}

/// Fields a transition may set (unset ones keep their value).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Patch {
    /// error
    pub error: Option<String>,
    /// perf
    pub perf: Option<f64>,
    /// image_digest
    pub image_digest: Option<String>,
    /// cached_steps
    pub cached_steps: Option<i64>,
    /// total_steps
    pub total_steps: Option<i64>,
    /// runtime
    pub runtime: Option<String>,
    /// cgroup
    pub cgroup: Option<String>,
    /// limits
    pub limits: Option<serde_json::Value>,
    /// exit_code
    pub exit_code: Option<i64>,
    /// oom_killed
    pub oom_killed: Option<bool>,
    /// image_cache
    pub image_cache: Option<String>,
    /// build
    pub build: Option<serde_json::Value>,
    /// spec_sha256
    pub spec_sha256: Option<String>,
    /// runtime_version
    pub runtime_version: Option<String>,
    /// run_dir
    pub run_dir: Option<String>,
    /// usage
    pub usage: Option<serde_json::Value>,
    /// dataset
    pub dataset: Option<String>,
    /// callback
    pub callback: Option<serde_json::Value>,
    /// Not a field: when set, the write happens only if this node still holds the job under
    /// this attempt (fencing: a node that lost its lease, and whose job was queued again and
    /// claimed by another, cannot write over the new attempt).
    pub holder: Option<Holder>,
}

/// Who works on a claimed job: the node and the attempt number its claim gave the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The node's instance id.
    pub node: String,
    /// The job's attempt number under that claim.
    pub attempt: i64,
}

/// A job as a write checks it: its status, the node that claimed it, its attempt.
pub(super) type Held = (String, Option<String>, i64);

/// Why a write to job `id` (moving it to, or expecting it in, `to`) was refused, from the job
/// as it is now: gone, held by another node or attempt than `holder`, or in another status.
pub(super) fn refusal(
    id: JobId,
    to: JobStatus,
    holder: Option<Holder>,
    now: Option<Held>,
) -> StoreError {
    let Some((from, node, attempt)) = now else {
        return StoreError::NotFound(id);
    };
    match holder {
        Some(h) if !h.holds(node.as_deref(), attempt) => StoreError::Fenced {
            id,
            node: h.node,
            attempt: h.attempt,
        },
        _ => StoreError::IncorrectStatus {
            id,
            from: JobStatus::parse(&from).unwrap_or(JobStatus::Interrupted),
            to,
        },
    }
}

impl Holder {
    /// Whether a job claimed by `node` under `attempt` is still this holder's.
    pub fn holds(&self, node: Option<&str>, attempt: i64) -> bool {
        node == Some(self.node.as_str()) && attempt == self.attempt
    }

    /// The holder a claimed record names.
    pub fn of(rec: &JobRecord) -> Option<Self> {
        Some(Holder {
            node: rec.claimed_by.clone()?,
            attempt: rec.attempt,
        })
    }
}

impl Patch {
    /// The columns this patch sets, with their values.
    pub(super) fn assignments(&self) -> Vec<(&'static str, Value)> {
        let text = |v: &Option<String>| v.clone().map(Value::Text);
        let json = |v: &Option<serde_json::Value>| v.as_ref().map(|j| Value::Text(j.to_string()));
        [
            ("error", text(&self.error)),
            ("perf", self.perf.map(Value::Real)),
            ("image_digest", text(&self.image_digest)),
            ("cached_steps", self.cached_steps.map(Value::Integer)),
            ("total_steps", self.total_steps.map(Value::Integer)),
            ("runtime", text(&self.runtime)),
            ("cgroup", text(&self.cgroup)),
            ("limits", json(&self.limits)),
            ("exit_code", self.exit_code.map(Value::Integer)),
            (
                "oom_killed",
                self.oom_killed.map(|b| Value::Integer(i64::from(b))),
            ),
            ("image_cache", text(&self.image_cache)),
            ("build", json(&self.build)),
            ("spec_sha256", text(&self.spec_sha256)),
            ("runtime_version", text(&self.runtime_version)),
            ("run_dir", text(&self.run_dir)),
            ("usage", json(&self.usage)),
            ("dataset", text(&self.dataset)),
            ("callback", json(&self.callback)),
        ]
        .into_iter()
        .filter_map(|(column, value)| value.map(|v| (column, v)))
        .collect()
    }
}

/// A job to record.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// The uploaded file's name.
    pub filename: &'a str,
    /// The token's name.
    pub owner: Option<&'a str>,
    /// Whose share of build slots it uses.
    pub submitter: &'a str,
    /// sha256 of the Dockerfile.
    pub dockerfile_sha256: &'a str,
    /// The submission's `Idempotency-Key`: a second insert with the same key and submitter is
    /// refused ([`StoreError::DuplicateKey`]).
    pub idempotency_key: Option<&'a str>,
    /// The submission's files (name, content), for a store that other nodes share: they run
    /// the job from these ([`Store::files`]). A store of one node ignores them (`prepare` put
    /// them in the job's directory).
    pub files: &'a [(&'a str, &'a [u8])],
}

/// Which jobs a listing holds: one owner's or all, of some statuses or all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listing<'a> {
    /// Only this owner's jobs (all owners' when None).
    pub owner: Option<&'a str>,
    /// Only jobs in one of these statuses (every status when empty).
    pub statuses: &'a [JobStatus],
}

impl<'a> Listing<'a> {
    /// Every job of `owner` (of everyone when None).
    pub fn of(owner: Option<&'a str>) -> Self {
        Self {
            owner,
            statuses: &[],
        }
    }

    /// The statuses as one query parameter: `",succeeded,run_failed,"`, or `""` for all (the
    /// statement tests `instr`/`strpos` of `',' || status || ','` in it).
    pub(super) fn statuses_param(&self) -> String {
        if self.statuses.is_empty() {
            return String::new();
        }
        let mut s = String::from(",");
        for st in self.statuses {
            s.push_str(st.as_str());
            s.push(',');
        }
        s
    }
}

/// A leaderboard: succeeded jobs with a perf, ranked by it. Ties keep the order in which the jobs
/// finished (the first to reach a perf ranks first), then their ids.
#[derive(Debug, Clone, Copy)]
pub struct Board<'a> {
    /// Only this owner's jobs (all owners' when None).
    pub owner: Option<&'a str>,
    /// A higher perf ranks first (else a lower one).
    pub higher_is_better: bool,
    /// Only each owner's best job (jobs without an owner each stand alone).
    pub best_per_owner: bool,
    /// At most this many entries.
    pub limit: usize,
}

impl Board<'_> {
    /// The statement, with parameters written by `p(n)` (`?n` for SQLite, `$n` for
    /// PostgreSQL): `p(1)` = owner (NULL for all), `p(2)` = limit. `nan` is the SQL that rules out
    /// a NaN perf where the engine has one (PostgreSQL sorts NaN above every number).
    pub(super) fn sql(&self, p: fn(usize) -> String, owner_type: &str, nan: &str) -> String {
        let dir = if self.higher_is_better { "DESC" } else { "ASC" };
        let order = format!("perf {dir}, finished_at ASC, id ASC");
        let filter = format!(
            "status = 'succeeded' AND perf IS NOT NULL {nan} AND ({o}{owner_type} IS NULL OR owner = {o})",
            o = p(1)
        );
        if self.best_per_owner {
            format!(
                "SELECT {cols} FROM (SELECT {cols}, row_number() OVER (PARTITION BY COALESCE(owner, '#' || id) ORDER BY {order}) AS nth FROM jobs WHERE {filter}) AS best WHERE nth = 1 ORDER BY {order} LIMIT {l}",
                cols = *COLUMNS,
                l = p(2)
            )
        } else {
            format!(
                "SELECT {cols} FROM jobs WHERE {filter} ORDER BY {order} LIMIT {l}",
                cols = *COLUMNS,
                l = p(2)
            )
        }
    }
}

/// How many jobs may wait: in all, and of one submitter (`NewJob::submitter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCaps {
    /// Jobs waiting in all.
    pub total: usize,
    /// Jobs of one submitter waiting.
    pub per_submitter: usize,
}

impl From<usize> for QueueCaps {
    /// `total` waiting jobs, any number of them one submitter's.
    fn from(total: usize) -> Self {
        Self {
            total,
            per_submitter: usize::MAX,
        }
    }
}

impl QueueCaps {
    /// The refusal for a queue holding `queued` jobs, `mine` of them the submitter's.
    pub fn check(&self, queued: i64, mine: i64) -> Result<(), StoreError> {
        let cap = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        if queued >= cap(self.total) {
            return Err(StoreError::QueueFull(queued));
        }
        if mine >= cap(self.per_submitter) {
            return Err(StoreError::OwnerQueueFull(mine));
        }
        Ok(())
    }
}

/// A perfbox process working from the store.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct NodeInfo {
    /// Instance id.
    pub name: String,
    /// Where its API answers.
    pub url: String,
    /// Build slots.
    pub capacity: i64,
    /// Its process id (on its own machine).
    pub pid: i64,
    /// Unix time it (re)started.
    pub started_at: f64,
    /// Unix time of its last heartbeat (every lease renewal).
    pub heartbeat_at: f64,
}

/// What a shared store tells every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A job may be claimable: one was queued, or a slot or an owner's share freed.
    Work,
    /// Someone asked to cancel this job (its holder stops it).
    Cancel(JobId),
    /// This job reached a final status (whoever waits for it may look).
    Ended(JobId),
}

/// What a worker asks for when it claims a job.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    /// The claiming node (process).
    pub node: &'a str,
    /// Build slots of that node.
    pub build_slots: usize,
    /// Build slots one owner may hold (over all nodes).
    pub per_owner: usize,
    /// How long the claim holds without [`Store::renew`].
    pub lease: Duration,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("job database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// No such job.
    #[error("no job {0}")]
    NotFound(JobId),
    /// Illegal status change (e.g. cancelling a finished job).
    #[error("job {id} is {from}, it cannot become {to}")]
    IncorrectStatus {
        /// Job.
        id: JobId,
        /// Current status.
        from: JobStatus,
        /// Requested status.
        to: JobStatus,
    },
    /// The queue holds as many jobs as allowed.
    #[error("the queue is full ({0} jobs waiting)")]
    QueueFull(i64),
    /// The submitter already has a job with this `Idempotency-Key`.
    #[error("a job with this Idempotency-Key exists")]
    DuplicateKey,
    /// The submitter has as many jobs waiting as one submitter may.
    #[error("{0} of your jobs are already waiting")]
    OwnerQueueFull(i64),
    /// Putting a new job's files in place failed; it was not recorded.
    #[error("cannot store the job's files: {0}")]
    Prepare(std::io::Error),
    /// PostgreSQL failed (or could not be reached).
    #[error("job database (PostgreSQL): {0}")]
    Postgres(String),
    /// The writer no longer holds the job (its lease ran out and the job was queued again).
    #[error("job {id}: node {node} no longer holds attempt {attempt}; nothing written")]
    Fenced {
        /// Job.
        id: JobId,
        /// The writer.
        node: String,
        /// Its attempt.
        attempt: i64,
    },
}

impl StoreError {
    /// Whether retrying the same write later may succeed (the database was unreachable), as
    /// opposed to a verdict on the write itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Postgres(_))
            || matches!(self, StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy)
    }
}

/// What the job service needs of a database. Every method is one transaction.
pub trait Store: Send + Sync {
    /// Record a new queued job, unless the queue or the submitter's share of it is full (see
    /// [`QueueCaps`]). `prepare` runs with the
    /// new id before the job becomes visible (its files go in place there); if it fails, no job
    /// is recorded.
    fn insert(
        &self,
        job: &NewJob<'_>,
        caps: QueueCaps,
        prepare: &mut dyn FnMut(JobId) -> std::io::Result<()>,
    ) -> Result<JobRecord, StoreError>;
    /// One job.
    fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;
    /// The submitter's job with this `Idempotency-Key`, if any.
    fn by_idempotency_key(
        &self,
        submitter: &str,
        key: &str,
    ) -> Result<Option<JobRecord>, StoreError>;
    /// A page of the jobs `which` selects, newest first, with ids below `before`.
    fn list(
        &self,
        which: Listing<'_>,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError>;
    /// Number of the jobs `which` selects.
    fn count(&self, which: Listing<'_>) -> Result<i64, StoreError>;
    /// Succeeded jobs ranked by perf (see [`Board`]), best first.
    fn leaderboard(&self, board: &Board<'_>) -> Result<Vec<JobRecord>, StoreError>;
    /// Queued jobs ahead of `id`.
    fn queue_position(&self, id: JobId) -> Result<i64, StoreError>;
    /// Queued jobs.
    fn queue_depth(&self) -> Result<i64, StoreError>;
    /// Jobs per status.
    fn counts(&self) -> Result<Vec<(JobStatus, i64)>, StoreError>;
    /// Move a job to `to`, if the state machine allows it from its current status; set the
    /// phase timestamp that `to` implies and the patch's fields. Leaving `building` gives its
    /// build slot back. Returns the updated record.
    fn transition(&self, id: JobId, to: JobStatus, patch: Patch) -> Result<JobRecord, StoreError>;

    /// Set the fields of `patch` on a job that is still `status` (what a phase learns as it
    /// goes, e.g. the spec digest once the run's spec is written); fails if it is not.
    fn annotate(&self, id: JobId, status: JobStatus, patch: Patch) -> Result<(), StoreError>;
    /// Take the oldest queued job that may start now (see the module docs), moving it to
    /// `building`; None when there is none.
    fn claim(&self, claim: &Claim<'_>) -> Result<Option<JobRecord>, StoreError>;
    /// The build of `id` is over (the job now waits for a run slot): its build slot is free.
    fn release_build_slot(&self, id: JobId) -> Result<(), StoreError>;
    /// Extend the leases of `jobs` (those `node` works on) and `node`'s heartbeat. Returns
    /// the ones `node` still holds: a job missing from the answer was taken from it.
    fn renew(&self, node: &str, jobs: &[JobId], lease: Duration) -> Result<Vec<JobId>, StoreError>;
    /// Building or running jobs that nobody works on any more: those `node` held before it
    /// (re)started, and those whose lease ran out (`node` = "" for these only). Oldest first.
    fn stale(&self, node: &str) -> Result<Vec<JobId>, StoreError>;
    /// A stale job (see [`Self::stale`]) under `attempt`: queue it again (`requeue`), or record
    /// it `interrupted` with `why` — `cancelled` instead if a cancel was asked for. Fenced by
    /// `attempt`: if another node claimed it meanwhile, [`StoreError::Fenced`].
    fn give_up(
        &self,
        id: JobId,
        attempt: i64,
        requeue: bool,
        why: &str,
    ) -> Result<JobRecord, StoreError>;
    /// Whether other nodes may share this store (then job files live in it too).
    fn shared(&self) -> bool {
        false
    }
    /// Keep files of a job in the store (a shared store's nodes read them from there), fenced
    /// by `holder` when given. A store of one node keeps nothing: the files are in the job's
    /// directory.
    fn put_files(
        &self,
        _id: JobId,
        _holder: Option<&Holder>,
        _files: &[(&str, &[u8])],
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// The files kept for a job ([`Self::put_files`] and the submission's).
    fn files(&self, _id: JobId) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(vec![])
    }
    /// Record (or refresh) a node.
    fn register_node(&self, node: &NodeInfo) -> Result<(), StoreError>;
    /// The nodes known, by name.
    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError>;
    /// Ask the holder of a building or running job to cancel it ([`Notice::Cancel`]).
    fn request_cancel(&self, id: JobId) -> Result<(), StoreError>;
    /// Notices from other nodes, if the store carries any.
    fn notices(&self) -> Option<tokio::sync::broadcast::Receiver<Notice>> {
        None
    }
}

/// Seconds since the epoch.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A schema step: SQL, or a column added where it is missing (databases made before numbered
/// migrations may already have it).
enum Migration {
    Sql(&'static str),
    AddColumn(&'static str, &'static str),
}

/// The schema, step by step; `PRAGMA user_version` is the number of steps applied.
const MIGRATIONS: &[Migration] = &[
    // 1: the first schema (databases from before numbered migrations have it already).
    Migration::Sql(
        "CREATE TABLE IF NOT EXISTS jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            filename TEXT NOT NULL,
            owner TEXT,
            status TEXT NOT NULL,
            error TEXT,
            perf REAL,
            dockerfile_sha256 TEXT NOT NULL,
            created_at REAL NOT NULL,
            build_started_at REAL,
            build_finished_at REAL,
            run_started_at REAL,
            finished_at REAL,
            image_digest TEXT,
            cached_steps INTEGER,
            total_steps INTEGER,
            runtime TEXT,
            cgroup TEXT,
            limits TEXT,
            exit_code INTEGER,
            oom_killed INTEGER
        );
        CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, id);
        CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, id);",
    ),
    // 2: the image cache's verdict.
    Migration::AddColumn("image_cache", "TEXT"),
    // 3: what the build ran with.
    Migration::AddColumn("build", "TEXT"),
    // 4: whose share of build slots the job uses.
    Migration::AddColumn("submitter", "TEXT"),
    // 5: the queue's claims: who holds the job, until when, and which slot.
    Migration::AddColumn("claimed_by", "TEXT"),
    Migration::AddColumn("lease_until", "REAL"),
    Migration::AddColumn("slot", "TEXT"),
    Migration::Sql("CREATE INDEX IF NOT EXISTS jobs_slot ON jobs(slot, claimed_by)"),
    // 6: what audits and receipts rest on: the spec's digest and the runtime's version.
    Migration::AddColumn("spec_sha256", "TEXT"),
    Migration::AddColumn("runtime_version", "TEXT"),
    // 7: attempts (a job whose node died may run again), cancel requests, and nodes.
    Migration::AddColumn("attempt", "INTEGER NOT NULL DEFAULT 0"),
    Migration::AddColumn("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
    Migration::AddColumn("run_dir", "TEXT"),
    Migration::Sql(
        "CREATE TABLE IF NOT EXISTS nodes (
            name TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            capacity INTEGER NOT NULL,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        )",
    ),
    // 8: what a run used and its dataset, and idempotent submissions (one job per submitter
    // and key).
    Migration::AddColumn("usage", "TEXT"),
    Migration::AddColumn("dataset", "TEXT"),
    Migration::AddColumn("callback", "TEXT"),
    Migration::AddColumn("idempotency_key", "TEXT"),
    Migration::Sql(
        "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency
         ON jobs(coalesce(submitter, owner, ''), idempotency_key) WHERE idempotency_key IS NOT NULL",
    ),
];

/// The embedded store: one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Open (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let done: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.unchecked_transaction()?;
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::AddColumn(column, kind) => {
                let has: bool = tx
                    .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = ?1")?
                    .exists([column])?;
                if !has {
                    tx.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {column} {kind}"))?;
                }
            }
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// The job as a write checks it ([`Held`]), if it exists.
fn held(conn: &Connection, id: JobId) -> rusqlite::Result<Option<Held>> {
    conn.query_row(
        "SELECT status, claimed_by, attempt FROM jobs WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
}

fn select_one(conn: &Connection, id: JobId) -> rusqlite::Result<JobRecord> {
    conn.query_row(
        &format!("SELECT {} FROM jobs WHERE id = ?1", *COLUMNS),
        [id],
        JobRecord::from_row,
    )
}

impl Store for SqliteStore {
    fn insert(
        &self,
        job: &NewJob<'_>,
        caps: QueueCaps,
        prepare: &mut dyn FnMut(JobId) -> std::io::Result<()>,
    ) -> Result<JobRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if let Some(key) = job.idempotency_key {
            let taken = tx
                .query_row(
                    "SELECT 1 FROM jobs WHERE coalesce(submitter, owner, '') = ?1
                       AND idempotency_key = ?2",
                    [job.submitter, key],
                    |_| Ok(()),
                )
                .optional()?;
            if taken.is_some() {
                return Err(StoreError::DuplicateKey);
            }
        }
        let (queued, mine): (i64, i64) = tx.query_row(
            "SELECT count(*), count(*) FILTER (WHERE coalesce(submitter, owner, '') = ?1)
             FROM jobs WHERE status = 'queued'",
            [job.submitter],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        caps.check(queued, mine)?;
        tx.execute(
            "INSERT INTO jobs (filename, owner, submitter, status, dockerfile_sha256, created_at,
                               idempotency_key)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6)",
            params![
                job.filename,
                job.owner,
                job.submitter,
                job.dockerfile_sha256,
                now(),
                job.idempotency_key,
            ],
        )?;
        let rec = select_one(&tx, tx.last_insert_rowid())?;
        prepare(rec.id).map_err(StoreError::Prepare)?;
        tx.commit()?;
        Ok(rec)
    }

    fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {} FROM jobs WHERE id = ?1", *COLUMNS))?;
        Ok(stmt.query_row([id], JobRecord::from_row).optional()?)
    }

    fn by_idempotency_key(
        &self,
        submitter: &str,
        key: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM jobs WHERE coalesce(submitter, owner, '') = ?1 AND idempotency_key = ?2",
            *COLUMNS
        ))?;
        Ok(stmt
            .query_row([submitter, key], JobRecord::from_row)
            .optional()?)
    }

    fn list(
        &self,
        which: Listing<'_>,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM jobs WHERE (?1 IS NULL OR owner = ?1) AND id < ?2
             AND (?4 = '' OR instr(?4, ',' || status || ',') > 0) ORDER BY id DESC LIMIT ?3",
            *COLUMNS
        ))?;
        let rows = stmt.query_map(
            params![
                which.owner,
                before.unwrap_or(i64::MAX),
                limit as i64,
                which.statuses_param()
            ],
            JobRecord::from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn count(&self, which: Listing<'_>) -> Result<i64, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row(
            "SELECT count(*) FROM jobs WHERE (?1 IS NULL OR owner = ?1)
             AND (?2 = '' OR instr(?2, ',' || status || ',') > 0)",
            params![which.owner, which.statuses_param()],
            |r| r.get(0),
        )?)
    }

    fn leaderboard(&self, board: &Board<'_>) -> Result<Vec<JobRecord>, StoreError> {
        let conn = self.lock();
        // SQLite keeps no NaN in a REAL column (it stores NULL), so `perf IS NOT NULL` is enough.
        let mut stmt = conn.prepare_cached(&board.sql(|n| format!("?{n}"), "", ""))?;
        let rows = stmt.query_map(
            params![board.owner, board.limit as i64],
            JobRecord::from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn queue_position(&self, id: JobId) -> Result<i64, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row(
            "SELECT count(*) FROM jobs WHERE status = 'queued' AND id < ?1",
            [id],
            |r| r.get(0),
        )?)
    }

    fn queue_depth(&self) -> Result<i64, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row(
            "SELECT count(*) FROM jobs WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?)
    }

    fn counts(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT status, count(*) FROM jobs GROUP BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = vec![];
        for row in rows {
            let (s, n) = row?;
            if let Some(s) = JobStatus::parse(&s) {
                out.push((s, n));
            }
        }
        Ok(out)
    }

    fn transition(&self, id: JobId, to: JobStatus, patch: Patch) -> Result<JobRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let current = held(&tx, id)?;
        let from = match &current {
            Some((from, node, attempt))
                if patch
                    .holder
                    .as_ref()
                    .is_none_or(|h| h.holds(node.as_deref(), *attempt)) =>
            {
                JobStatus::parse(from).unwrap_or(JobStatus::Interrupted)
            }
            _ => return Err(refusal(id, to, patch.holder, current)),
        };
        if !from.can_transition_to(to) {
            return Err(StoreError::IncorrectStatus { id, from, to });
        }
        let t = now();
        // The phase timestamps `to` implies, and the slot it leaves.
        let mut sets: Vec<(&'static str, Value)> =
            vec![("status", Value::Text(to.as_str().into()))];
        match (from, to) {
            (_, JobStatus::Building) => sets.push(("build_started_at", Value::Real(t))),
            (JobStatus::Building, _) => sets.push(("build_finished_at", Value::Real(t))),
            _ => {}
        }
        if to == JobStatus::Running {
            sets.push(("run_started_at", Value::Real(t)));
        }
        if to.is_terminal() {
            sets.push(("finished_at", Value::Real(t)));
        }
        if to != JobStatus::Building {
            sets.push(("slot", Value::Null));
        }
        sets.extend(patch.assignments());
        let assign: Vec<String> = sets
            .iter()
            .enumerate()
            .map(|(i, (column, _))| format!("{column} = ?{}", i + 2))
            .collect();
        let mut values: Vec<Value> = vec![Value::Integer(id)];
        values.extend(sets.into_iter().map(|(_, v)| v));
        tx.execute(
            &format!("UPDATE jobs SET {} WHERE id = ?1", assign.join(", ")),
            rusqlite::params_from_iter(values),
        )?;
        let rec = select_one(&tx, id)?;
        tx.commit()?;
        Ok(rec)
    }

    fn annotate(&self, id: JobId, status: JobStatus, patch: Patch) -> Result<(), StoreError> {
        let sets = patch.assignments();
        if sets.is_empty() {
            return Ok(());
        }
        let assign: Vec<String> = sets
            .iter()
            .enumerate()
            .map(|(i, (column, _))| format!("{column} = ?{}", i + 3))
            .collect();
        let mut values = vec![Value::Integer(id), Value::Text(status.as_str().into())];
        let n = values.len() + sets.len();
        values.extend(sets.into_iter().map(|(_, v)| v));
        let mut fence = String::new();
        if let Some(h) = &patch.holder {
            fence = format!(" AND claimed_by = ?{} AND attempt = ?{}", n + 1, n + 2);
            values.push(Value::Text(h.node.clone()));
            values.push(Value::Integer(h.attempt));
        }
        let conn = self.lock();
        let changed = conn.execute(
            &format!(
                "UPDATE jobs SET {} WHERE id = ?1 AND status = ?2{fence}",
                assign.join(", ")
            ),
            rusqlite::params_from_iter(values),
        )?;
        if changed == 1 {
            return Ok(());
        }
        Err(refusal(id, status, patch.holder, held(&conn, id)?))
    }

    fn claim(&self, claim: &Claim<'_>) -> Result<Option<JobRecord>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let t = now();
        let id: Option<JobId> = tx
            .query_row(
                "SELECT j.id FROM jobs j
                 WHERE j.status = 'queued'
                   AND (SELECT count(*) FROM jobs b WHERE b.slot = 'build' AND b.claimed_by = ?1) < ?2
                   AND (SELECT count(*) FROM jobs b WHERE b.slot = 'build'
                          AND coalesce(b.submitter, b.owner, '') = coalesce(j.submitter, j.owner, '')) < ?3
                 ORDER BY (SELECT count(*) FROM jobs a WHERE a.status IN ('building', 'running')
                          AND coalesce(a.submitter, a.owner, '') = coalesce(j.submitter, j.owner, '')),
                          j.id
                 LIMIT 1",
                params![claim.node, claim.build_slots as i64, claim.per_owner as i64],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE jobs SET status = 'building', build_started_at = ?2, slot = 'build',
                    claimed_by = ?3, lease_until = ?4, attempt = attempt + 1
             WHERE id = ?1 AND status = 'queued'",
            params![id, t, claim.node, t + claim.lease.as_secs_f64()],
        )?;
        let rec = select_one(&tx, id)?;
        tx.commit()?;
        Ok(Some(rec))
    }

    fn release_build_slot(&self, id: JobId) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "UPDATE jobs SET slot = NULL WHERE id = ?1 AND slot = 'build'",
            [id],
        )?;
        Ok(())
    }

    fn renew(&self, node: &str, jobs: &[JobId], lease: Duration) -> Result<Vec<JobId>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let t = now();
        tx.execute(
            "UPDATE nodes SET heartbeat_at = ?2 WHERE name = ?1",
            params![node, t],
        )?;
        let mut held = vec![];
        for &id in jobs {
            let n = tx.execute(
                "UPDATE jobs SET lease_until = ?3
                 WHERE id = ?1 AND claimed_by = ?2 AND status IN ('building', 'running')",
                params![id, node, t + lease.as_secs_f64()],
            )?;
            if n == 1 {
                held.push(id);
            }
        }
        tx.commit()?;
        Ok(held)
    }

    fn stale(&self, node: &str) -> Result<Vec<JobId>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM jobs WHERE status IN ('building', 'running')
               AND (claimed_by IS NULL OR claimed_by = ?1 OR coalesce(lease_until, 0) < ?2)
             ORDER BY id",
        )?;
        let rows = stmt.query_map(params![node, now()], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn give_up(
        &self,
        id: JobId,
        attempt: i64,
        requeue: bool,
        why: &str,
    ) -> Result<JobRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let t = now();
        let n = tx.execute(
            "UPDATE jobs SET
                status = CASE WHEN cancel_requested <> 0 THEN 'cancelled'
                              WHEN ?3 THEN 'queued' ELSE 'interrupted' END,
                error = CASE WHEN cancel_requested <> 0 THEN 'cancelled by request; its node stopped'
                             WHEN ?3 THEN NULL ELSE ?4 END,
                finished_at = CASE WHEN cancel_requested <> 0 OR NOT ?3 THEN ?5 END,
                build_finished_at = CASE WHEN status = 'building' THEN ?5 ELSE build_finished_at END,
                claimed_by = CASE WHEN cancel_requested = 0 AND ?3 THEN NULL ELSE claimed_by END,
                slot = NULL, lease_until = NULL
             WHERE id = ?1 AND attempt = ?2 AND status IN ('building', 'running')",
            params![id, attempt, requeue, why, t],
        )?;
        if n == 0 {
            let (_, node, _) = held(&tx, id)?.ok_or(StoreError::NotFound(id))?;
            return Err(StoreError::Fenced {
                id,
                node: node.unwrap_or_default(),
                attempt,
            });
        }
        let rec = select_one(&tx, id)?;
        tx.commit()?;
        Ok(rec)
    }

    fn register_node(&self, node: &NodeInfo) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO nodes (name, url, capacity, pid, started_at, heartbeat_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET url = ?2, capacity = ?3, pid = ?4,
                started_at = ?5, heartbeat_at = ?6",
            params![
                node.name,
                node.url,
                node.capacity,
                node.pid,
                node.started_at,
                node.heartbeat_at
            ],
        )?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT name, url, capacity, pid, started_at, heartbeat_at FROM nodes ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(NodeInfo {
                name: r.get(0)?,
                url: r.get(1)?,
                capacity: r.get(2)?,
                pid: r.get(3)?,
                started_at: r.get(4)?,
                heartbeat_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn request_cancel(&self, id: JobId) -> Result<(), StoreError> {
        self.lock()
            .execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1", [id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conforms() {
        let dirs = Mutex::new(vec![]);
        let new = || -> Box<dyn Store> {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("jobs.db")).unwrap();
            dirs.lock().unwrap().push(dir);
            Box::new(store)
        };
        for (name, test) in super::super::store_conformance::ALL {
            eprintln!("conformance: {name}");
            test(&new);
        }
    }

    #[test]
    fn a_reopened_database_keeps_results_and_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let ok = |_| Ok(());
        let job = NewJob {
            filename: "a.Dockerfile",
            owner: None,
            submitter: "a",
            dockerfile_sha256: "abc",
            idempotency_key: None,
            files: &[],
        };
        let store = SqliteStore::open(&path).unwrap();
        let a = store.insert(&job, 10.into(), &mut { ok }).unwrap();
        store.insert(&job, 10.into(), &mut { ok }).unwrap();
        store
            .transition(a.id, JobStatus::Cancelled, Patch::default())
            .unwrap();
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store.get(a.id).unwrap().unwrap().status,
            JobStatus::Cancelled
        );
        assert_eq!(store.insert(&job, 10.into(), &mut { ok }).unwrap().id, 3);
        assert_eq!(store.queue_depth().unwrap(), 2);
    }

    #[test]
    fn an_old_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        {
            // What the first versions made (no user_version, image_cache added by hand).
            let conn = Connection::open(&path).unwrap();
            let first = match &MIGRATIONS[0] {
                Migration::Sql(sql) => *sql,
                Migration::AddColumn(..) => unreachable!(),
            };
            conn.execute_batch(first).unwrap();
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN image_cache TEXT")
                .unwrap();
            conn.execute(
                "INSERT INTO jobs (filename, status, dockerfile_sha256, created_at, image_cache)
                 VALUES ('old', 'succeeded', 'x', 1.0, 'miss')",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let old = store.get(1).unwrap().unwrap();
        assert_eq!(
            (old.filename.as_str(), old.image_cache.as_deref()),
            ("old", Some("miss"))
        );
        let conn = store.lock();
        let version: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
    }
}
