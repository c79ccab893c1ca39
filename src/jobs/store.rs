//! Durable job records in an embedded SQLite database (WAL mode) in the state dir. Ids come from
//! an AUTOINCREMENT sequence and are never reused. Every status change is checked against the
//! state machine inside the same lock that writes it.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::state::JobStatus;

/// A job id.
pub type JobId = i64;

/// Everything known about a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// The limits that really applied (JSON).
    pub limits: Option<serde_json::Value>,
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
    /// and the cgroup of its RUN steps (JSON, see [`super::BuildRecord`]).
    pub build: Option<serde_json::Value>,
    /// Whose share of build slots the job used: the owner, or the client's address without
    /// tokens (not shown: it may be another user's address).
    #[serde(skip)]
    pub submitter: Option<String>,
}

/// Fields a transition may set.
#[derive(Debug, Default, Clone)]
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
}

/// Seconds since the epoch.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
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
    oom_killed INTEGER,
    image_cache TEXT,
    build TEXT,
    submitter TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, id);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, id);
";

const COLUMNS: &str = "id, filename, owner, status, error, perf, dockerfile_sha256, created_at, build_started_at, \
    build_finished_at, run_started_at, finished_at, image_digest, cached_steps, total_steps, runtime, cgroup, limits, \
    exit_code, oom_killed, image_cache, build, submitter";

fn from_row(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let status: String = r.get(3)?;
    let limits: Option<String> = r.get(17)?;
    Ok(JobRecord {
        id: r.get(0)?,
        filename: r.get(1)?,
        owner: r.get(2)?,
        status: JobStatus::parse(&status).unwrap_or(JobStatus::Interrupted),
        error: r.get(4)?,
        perf: r.get(5)?,
        dockerfile_sha256: r.get(6)?,
        created_at: r.get(7)?,
        build_started_at: r.get(8)?,
        build_finished_at: r.get(9)?,
        run_started_at: r.get(10)?,
        finished_at: r.get(11)?,
        image_digest: r.get(12)?,
        cached_steps: r.get(13)?,
        total_steps: r.get(14)?,
        runtime: r.get(15)?,
        cgroup: r.get(16)?,
        limits: limits.and_then(|l| serde_json::from_str(&l).ok()),
        exit_code: r.get(18)?,
        oom_killed: r.get::<_, Option<i64>>(19)?.map(|v| v != 0),
        image_cache: r.get(20)?,
        build: r
            .get::<_, Option<String>>(21)?
            .and_then(|b| serde_json::from_str(&b).ok()),
        submitter: r.get(22)?,
    })
}

/// The job database.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Databases made by older versions lack the later columns.
        for column in ["image_cache", "build", "submitter"] {
            let has: bool = conn
                .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = ?1")?
                .exists([column])?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {column} TEXT"))?;
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a new queued job.
    pub fn insert(
        &self,
        filename: &str,
        owner: Option<&str>,
        submitter: &str,
        sha256: &str,
    ) -> Result<JobRecord, StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO jobs (filename, owner, submitter, status, dockerfile_sha256, created_at) VALUES (?1, ?2, ?3, 'queued', ?4, ?5)",
            params![filename, owner, submitter, sha256, now()],
        )?;
        let id = conn.last_insert_rowid();
        Ok(conn.query_row(
            &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
            [id],
            from_row,
        )?)
    }

    /// One job.
    pub fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))?;
        Ok(stmt.query_row([id], from_row).optional()?)
    }

    /// A page of jobs, newest first, optionally only one owner's, with ids below `before`.
    pub fn list(
        &self,
        owner: Option<&str>,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE (?1 IS NULL OR owner = ?1) AND id < ?2 ORDER BY id DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![owner, before.unwrap_or(i64::MAX), limit as i64],
            from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Number of jobs.
    pub fn count(&self, owner: Option<&str>) -> Result<i64, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row(
            "SELECT count(*) FROM jobs WHERE (?1 IS NULL OR owner = ?1)",
            [owner],
            |r| r.get(0),
        )?)
    }

    /// Queued jobs ahead of `id`.
    pub fn queue_position(&self, id: JobId) -> Result<i64, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row(
            "SELECT count(*) FROM jobs WHERE status = 'queued' AND id < ?1",
            [id],
            |r| r.get(0),
        )?)
    }

    /// Ids in a status, oldest first.
    pub fn ids_in(&self, status: JobStatus) -> Result<Vec<JobId>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT id FROM jobs WHERE status = ?1 ORDER BY id")?;
        let rows = stmt.query_map([status.as_str()], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Queued jobs, oldest first, with their submitters.
    pub fn queued(&self) -> Result<Vec<(JobId, String)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, coalesce(submitter, owner, 'anonymous') FROM jobs WHERE status = 'queued' ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Jobs per status.
    pub fn counts(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
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

    /// Move a job to `to`, if the state machine allows it from its current status; set the
    /// phase timestamp that `to` implies and the patch's fields. Returns the updated record.
    pub fn transition(
        &self,
        id: JobId,
        to: JobStatus,
        patch: Patch,
    ) -> Result<JobRecord, StoreError> {
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
        let stamp = match (from, to) {
            (_, JobStatus::Building) => "build_started_at",
            (JobStatus::Building, JobStatus::Running) => "build_finished_at",
            (JobStatus::Building, _) => "build_finished_at",
            _ => "finished_at",
        };
        tx.execute(
            &format!("UPDATE jobs SET status = ?2, {stamp} = ?3 WHERE id = ?1"),
            params![id, to.as_str(), t],
        )?;
        if to == JobStatus::Running {
            tx.execute(
                "UPDATE jobs SET run_started_at = ?2 WHERE id = ?1",
                params![id, t],
            )?;
        }
        if to.is_terminal() {
            tx.execute(
                "UPDATE jobs SET finished_at = ?2 WHERE id = ?1",
                params![id, t],
            )?;
        }
        let limits = patch.limits.map(|l| l.to_string());
        let build = patch.build.map(|b| b.to_string());
        tx.execute(
            "UPDATE jobs SET error = coalesce(?2, error), perf = coalesce(?3, perf), image_digest = coalesce(?4, image_digest),
             cached_steps = coalesce(?5, cached_steps), total_steps = coalesce(?6, total_steps), runtime = coalesce(?7, runtime),
             cgroup = coalesce(?8, cgroup), limits = coalesce(?9, limits), exit_code = coalesce(?10, exit_code),
             oom_killed = coalesce(?11, oom_killed), image_cache = coalesce(?12, image_cache),
             build = coalesce(?13, build) WHERE id = ?1",
            params![
                id,
                patch.error,
                patch.perf,
                patch.image_digest,
                patch.cached_steps,
                patch.total_steps,
                patch.runtime,
                patch.cgroup,
                limits,
                patch.exit_code,
                patch.oom_killed.map(i64::from),
                patch.image_cache,
                build
            ],
        )?;
        let rec = tx.query_row(
            &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
            [id],
            from_row,
        )?;
        tx.commit()?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_persists_and_guards_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = Store::open(&path).unwrap();
        let a = store
            .insert("a.Dockerfile", None, "addr:127.0.0.1", "abc")
            .unwrap();
        let b = store
            .insert("b.Dockerfile", Some("alice"), "alice", "def")
            .unwrap();
        assert_eq!(b.submitter.as_deref(), Some("alice"));
        assert_eq!((a.id, b.id, a.status), (1, 2, JobStatus::Queued));
        assert_eq!(store.queue_position(b.id).unwrap(), 1);
        store
            .transition(a.id, JobStatus::Building, Patch::default())
            .unwrap();
        let r = store
            .transition(
                a.id,
                JobStatus::Running,
                Patch {
                    image_digest: Some("sha256:x".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(r.build_finished_at.is_some() && r.run_started_at.is_some());
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
        // Reopened: results are still there, ids continue.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get(a.id).unwrap().unwrap().perf, Some(0.5));
        assert_eq!(store.list(Some("alice"), None, 10).unwrap().len(), 1);
        assert_eq!(store.list(None, None, 10).unwrap().len(), 2);
        assert_eq!(store.insert("c", None, "addr:10.0.0.1", "x").unwrap().id, 3);
        assert_eq!(store.ids_in(JobStatus::Queued).unwrap(), vec![2, 3]);
        assert_eq!(
            store.queued().unwrap(),
            vec![(2, "alice".to_owned()), (3, "addr:10.0.0.1".to_owned())]
        );
    }
}
