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
//! (jobs of an owner already holding its share are passed over, FIFO otherwise). After a restart,
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
}

/// The columns of a record (what every query selects, in this order).
const NAMES: [&str; 25] = [
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
];

/// [`NAMES`], comma-separated, for `SELECT`.
static COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| NAMES.join(", "));

/// The position of column `name` in [`NAMES`], found at compile time (a row is read by index:
/// looking a column up by name walks the statement's column names for every field).
const fn col(name: &str) -> usize {
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
        })
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
}

impl Patch {
    /// The columns this patch sets, with their values.
    fn assignments(&self) -> Vec<(&'static str, Value)> {
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
    /// Putting a new job's files in place failed; it was not recorded.
    #[error("cannot store the job's files: {0}")]
    Prepare(std::io::Error),
}

/// What the job service needs of a database. Every method is one transaction.
pub trait Store: Send + Sync {
    /// Record a new queued job, unless `max_queued` jobs already wait. `prepare` runs with the
    /// new id before the job becomes visible (its files go in place there); if it fails, no job
    /// is recorded.
    fn insert(
        &self,
        job: &NewJob<'_>,
        max_queued: usize,
        prepare: &mut dyn FnMut(JobId) -> std::io::Result<()>,
    ) -> Result<JobRecord, StoreError>;
    /// One job.
    fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;
    /// A page of jobs, newest first, optionally only one owner's, with ids below `before`.
    fn list(
        &self,
        owner: Option<&str>,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError>;
    /// Number of jobs (of one owner).
    fn count(&self, owner: Option<&str>) -> Result<i64, StoreError>;
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
    /// Extend the leases of the jobs `node` holds.
    fn renew(&self, node: &str, lease: Duration) -> Result<(), StoreError>;
    /// Building or running jobs that nobody works on any more: those `node` held before it
    /// (re)started, and those whose lease ran out. Oldest first.
    fn stale(&self, node: &str) -> Result<Vec<JobId>, StoreError>;
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
        max_queued: usize,
        prepare: &mut dyn FnMut(JobId) -> std::io::Result<()>,
    ) -> Result<JobRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let queued: i64 = tx.query_row(
            "SELECT count(*) FROM jobs WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?;
        if queued >= max_queued as i64 {
            return Err(StoreError::QueueFull(queued));
        }
        tx.execute(
            "INSERT INTO jobs (filename, owner, submitter, status, dockerfile_sha256, created_at)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5)",
            params![
                job.filename,
                job.owner,
                job.submitter,
                job.dockerfile_sha256,
                now()
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

    fn list(
        &self,
        owner: Option<&str>,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM jobs WHERE (?1 IS NULL OR owner = ?1) AND id < ?2 ORDER BY id DESC LIMIT ?3",
            *COLUMNS
        ))?;
        let rows = stmt.query_map(
            params![owner, before.unwrap_or(i64::MAX), limit as i64],
            JobRecord::from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn count(&self, owner: Option<&str>) -> Result<i64, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row(
            "SELECT count(*) FROM jobs WHERE (?1 IS NULL OR owner = ?1)",
            [owner],
            |r| r.get(0),
        )?)
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
        let from: Option<String> = tx
            .query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        let from = from.ok_or(StoreError::NotFound(id))?;
        let from = JobStatus::parse(&from).unwrap_or(JobStatus::Interrupted);
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
        values.extend(sets.into_iter().map(|(_, v)| v));
        let conn = self.lock();
        let changed = conn.execute(
            &format!(
                "UPDATE jobs SET {} WHERE id = ?1 AND status = ?2",
                assign.join(", ")
            ),
            rusqlite::params_from_iter(values),
        )?;
        if changed == 1 {
            return Ok(());
        }
        let now: Option<String> = conn
            .query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        match now {
            None => Err(StoreError::NotFound(id)),
            Some(from) => Err(StoreError::IncorrectStatus {
                id,
                from: JobStatus::parse(&from).unwrap_or(JobStatus::Interrupted),
                to: status,
            }),
        }
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
                 ORDER BY j.id LIMIT 1",
                params![claim.node, claim.build_slots as i64, claim.per_owner as i64],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE jobs SET status = 'building', build_started_at = ?2, slot = 'build',
                    claimed_by = ?3, lease_until = ?4
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

    fn renew(&self, node: &str, lease: Duration) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "UPDATE jobs SET lease_until = ?2
             WHERE claimed_by = ?1 AND status IN ('building', 'running')",
            params![node, now() + lease.as_secs_f64()],
        )?;
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job<'a>(owner: Option<&'a str>, submitter: &'a str) -> NewJob<'a> {
        NewJob {
            filename: "a.Dockerfile",
            owner,
            submitter,
            dockerfile_sha256: "abc",
        }
    }

    fn ok(_: JobId) -> std::io::Result<()> {
        Ok(())
    }

    #[test]
    fn a_failed_prepare_records_nothing() {
        let store = SqliteStore::open(&tempfile::tempdir().unwrap().path().join("j.db")).unwrap();
        let mut fail = |_| Err(std::io::Error::other("disk full"));
        assert!(matches!(
            store.insert(&job(None, "a"), 10, &mut fail),
            Err(StoreError::Prepare(_))
        ));
        assert_eq!(store.count(None).unwrap(), 0);
        let mut seen = None;
        let rec = store
            .insert(&job(None, "a"), 10, &mut |id| {
                seen = Some(id);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, Some(rec.id));
    }

    fn claim(node: &str, slots: usize, per_owner: usize) -> Claim<'_> {
        Claim {
            node,
            build_slots: slots,
            per_owner,
            lease: Duration::from_secs(60),
        }
    }

    #[test]
    fn lifecycle_persists_and_guards_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = SqliteStore::open(&path).unwrap();
        let a = store
            .insert(&job(None, "addr:127.0.0.1"), 10, &mut ok)
            .unwrap();
        let b = store
            .insert(&job(Some("alice"), "alice"), 10, &mut ok)
            .unwrap();
        assert_eq!(b.submitter.as_deref(), Some("alice"));
        assert_eq!((a.id, b.id, a.status), (1, 2, JobStatus::Queued));
        assert_eq!(store.queue_position(b.id).unwrap(), 1);
        assert_eq!(store.queue_depth().unwrap(), 2);
        let claimed = store.claim(&claim("n1", 2, 2)).unwrap().unwrap();
        assert_eq!((claimed.id, claimed.status), (a.id, JobStatus::Building));
        assert!(claimed.build_started_at.is_some());
        let r = store
            .transition(
                a.id,
                JobStatus::Running,
                Patch {
                    image_digest: Some("sha256:x".into()),
                    build: Some(serde_json::json!({"scope": "job-1"})),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(r.build_finished_at.is_some() && r.run_started_at.is_some());
        assert_eq!(r.build_json(), Some(serde_json::json!({"scope": "job-1"})));
        let done = store
            .transition(
                a.id,
                JobStatus::Succeeded,
                Patch {
                    perf: Some(0.5),
                    exit_code: Some(0),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(done.perf, Some(0.5));
        assert_eq!(done.image_digest.as_deref(), Some("sha256:x"), "kept");
        assert!(done.finished_at.is_some());
        assert!(matches!(
            store.transition(a.id, JobStatus::Cancelled, Patch::default()),
            Err(StoreError::IncorrectStatus {
                from: JobStatus::Succeeded,
                ..
            })
        ));
        assert!(matches!(
            store.transition(99, JobStatus::Cancelled, Patch::default()),
            Err(StoreError::NotFound(99))
        ));
        drop(store);
        // Reopened: results are still there, ids continue, the queue is where it was.
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.get(a.id).unwrap().unwrap().perf, Some(0.5));
        assert_eq!(store.list(Some("alice"), None, 10).unwrap().len(), 1);
        assert_eq!(store.list(None, None, 10).unwrap().len(), 2);
        assert_eq!(store.count(Some("alice")).unwrap(), 1);
        assert_eq!(store.insert(&job(None, "x"), 10, &mut ok).unwrap().id, 3);
        assert_eq!(store.queue_depth().unwrap(), 2);
        assert_eq!(store.claim(&claim("n1", 2, 2)).unwrap().unwrap().id, 2);
    }

    #[test]
    fn a_full_queue_refuses_inserts() {
        let store = SqliteStore::open(&tempfile::tempdir().unwrap().path().join("j.db")).unwrap();
        store.insert(&job(None, "a"), 2, &mut ok).unwrap();
        store.insert(&job(None, "a"), 2, &mut ok).unwrap();
        assert!(matches!(
            store.insert(&job(None, "a"), 2, &mut ok),
            Err(StoreError::QueueFull(2))
        ));
        assert_eq!(store.count(None).unwrap(), 2);
    }

    #[test]
    fn claims_respect_slots_and_owner_shares_fifo_otherwise() {
        let store = SqliteStore::open(&tempfile::tempdir().unwrap().path().join("j.db")).unwrap();
        for who in ["slow", "slow", "slow", "other"] {
            store.insert(&job(Some(who), who), 10, &mut ok).unwrap();
        }
        let next = |slots, per_owner| {
            store
                .claim(&claim("n1", slots, per_owner))
                .unwrap()
                .map(|r| r.id)
        };
        assert_eq!(next(2, 1), Some(1));
        // Job 2 is older, but its owner holds its share: job 4 takes the other slot.
        assert_eq!(next(2, 1), Some(4));
        assert_eq!(next(2, 1), None, "both slots are taken");
        // Job 4's build is over (it waits to run): its slot is free, but only "slow" waits.
        store.release_build_slot(4).unwrap();
        assert_eq!(
            next(2, 1),
            None,
            "the free slot stays free rather than go to slow"
        );
        store
            .insert(&job(Some("third"), "third"), 10, &mut ok)
            .unwrap();
        assert_eq!(next(2, 1), Some(5));
        // Another node has slots of its own; the owner's share counts over all nodes.
        assert_eq!(store.claim(&claim("n2", 2, 1)).unwrap().map(|r| r.id), None);
        store
            .transition(1, JobStatus::BuildFailed, Patch::default())
            .unwrap();
        assert_eq!(
            store.claim(&claim("n2", 2, 1)).unwrap().map(|r| r.id),
            Some(2)
        );
        // A cancelled queued job is never claimed.
        store
            .transition(3, JobStatus::Cancelled, Patch::default())
            .unwrap();
        assert_eq!(next(3, 3), None);
    }

    #[test]
    fn stale_jobs_are_the_restarted_nodes_and_the_expired_leases() {
        let store = SqliteStore::open(&tempfile::tempdir().unwrap().path().join("j.db")).unwrap();
        for _ in 0..3 {
            store.insert(&job(None, "a"), 10, &mut ok).unwrap();
        }
        let mut short = claim("n1", 3, 3);
        store.claim(&short).unwrap();
        short.node = "n2";
        store.claim(&short).unwrap();
        short.lease = Duration::ZERO;
        short.node = "n3";
        store.claim(&short).unwrap();
        assert_eq!(
            store.stale("n1").unwrap(),
            vec![1, 3],
            "n1's own and n3's expired one"
        );
        store.renew("n3", Duration::from_secs(60)).unwrap();
        assert_eq!(store.stale("n1").unwrap(), vec![1]);
        assert_eq!(store.stale("nobody").unwrap(), Vec::<JobId>::new());
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
