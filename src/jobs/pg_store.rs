//! [`PgStore`]: the job store on PostgreSQL, which every node of a cluster shares (chosen by
//! `database_url = "postgres://…"`; SQLite stays the embedded default).
//!
//! It keeps what [`super::store::SqliteStore`] keeps, plus what nodes need of each other:
//! - **Claims** take the oldest claimable queued job with `FOR UPDATE SKIP LOCKED` in one
//!   statement, so concurrent nodes never take the same job; each claim bumps the job's
//!   `attempt`, and every write a worker makes names its [`Holder`] (node and attempt): a node
//!   whose lease ran out, and whose job was queued again, writes nothing (fencing).
//! - **Time** is the database's clock (`clock_timestamp()`), so leases do not depend on nodes'
//!   clocks agreeing.
//! - **Files**: the submission's Dockerfile and options (any node may run the job) and, at its
//!   end, its logs and spec (any node may show them, after the node that ran it is gone), in
//!   `job_files`.
//! - **Notices**: `NOTIFY perfbox` when work may be claimable (`work`) or a cancel is asked for
//!   (`cancel:<id>`) or a job ended (`ended:<id>`); one connection per node `LISTEN`s and
//!   reconnects when it drops.
//!
//! The [`Store`] trait is synchronous (SQLite calls are microseconds); this store runs its async
//! driver (tokio-postgres through a deadpool pool) on a runtime thread of its own, and each call
//! waits for its answer there, so it works from any thread, inside an async runtime or not.
//! Pooled connections are verified before use, so a restarted server costs a reconnect, not an
//! error.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use serde_json::value::RawValue;
use tokio::sync::broadcast;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::JobStatus;
use super::store::{
    Board, COLUMNS, Claim, Holder, JobId, JobRecord, Listing, NewJob, NodeInfo, Notice, Patch,
    QueueCaps, Store, StoreError, col, refusal,
};

/// The database's clock, in Unix seconds.
const NOW: &str = "extract(epoch from clock_timestamp())::float8";
/// The notification channel.
const CHANNEL: &str = "perfbox";
/// How long one call may take, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema (idempotent; run under an advisory lock so nodes starting together do not race,
/// and only when `perfbox_schema` says the database is behind [`SCHEMA_VERSION`]).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id BIGSERIAL PRIMARY KEY,
    filename TEXT NOT NULL,
    owner TEXT,
    status TEXT NOT NULL,
    error TEXT,
    perf DOUBLE PRECISION,
    dockerfile_sha256 TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    build_started_at DOUBLE PRECISION,
    build_finished_at DOUBLE PRECISION,
    run_started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    image_digest TEXT,
    cached_steps BIGINT,
    total_steps BIGINT,
    runtime TEXT,
    cgroup TEXT,
    limits TEXT,
    exit_code BIGINT,
    oom_killed BOOLEAN,
    image_cache TEXT,
    build TEXT,
    submitter TEXT,
    spec_sha256 TEXT,
    runtime_version TEXT,
    claimed_by TEXT,
    lease_until DOUBLE PRECISION,
    slot TEXT,
    attempt BIGINT NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT false
);
-- Columns added after the first schema: ADD COLUMN IF NOT EXISTS, one per line, in order
-- (each with a new SCHEMA_VERSION).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS run_dir TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS usage TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS idempotency_key TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS dataset TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS callback TEXT;
CREATE TABLE IF NOT EXISTS perfbox_schema (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, id);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (claimed_by) WHERE status IN ('building', 'running');
CREATE INDEX IF NOT EXISTS jobs_slot ON jobs (slot, claimed_by) WHERE slot IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs ((coalesce(submitter, owner, '')), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS job_files (
    job_id BIGINT NOT NULL REFERENCES jobs (id),
    name TEXT NOT NULL,
    content BYTEA NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    pid BIGINT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);
";

/// The schema's version: bump it with every change to [`SCHEMA`].
const SCHEMA_VERSION: i32 = 3;

/// The version of the schema in the database (0: none yet).
async fn schema_version(c: &Object) -> Result<i32, StoreError> {
    match c.query_opt("SELECT version FROM perfbox_schema", &[]).await {
        Ok(row) => Ok(row.map_or(0, |r| r.get(0))),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(0),
        Err(e) => Err(pg(e)),
    }
}

/// A prepared statement for `sql`, cached per connection (one round trip per call instead of
/// two: the parse is not repeated).
async fn prepared(c: &Object, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
    c.prepare_cached(sql).await.map_err(pg)
}

/// A parameter of a query.
type Param = Box<dyn ToSql + Sync + Send>;

/// The shared store.
pub struct PgStore {
    pool: Pool,
    rt: tokio::runtime::Handle,
    notices: broadcast::Sender<Notice>,
    /// Dropped with the store: ends its runtime thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{}: {}", db.code().code(), db.message())),
        None => StoreError::Postgres(e.to_string()),
    }
}

/// How a [`PgStore`] connects.
#[derive(Debug, Clone, Copy)]
pub struct PgOptions {
    /// Pooled connections at most (a node: 8).
    pub pool_size: usize,
    /// Whether to keep a connection listening for notices (a node: yes; a tool that only
    /// reads or claims: no).
    pub listen: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            listen: true,
        }
    }
}

impl PgStore {
    /// Connect to `url` (a `postgres://` URL or key=value string) as a node does, and make the
    /// schema.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, PgOptions::default())
    }

    /// [`Self::open`] with other [`PgOptions`].
    pub fn open_with(url: &str, opts: PgOptions) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Postgres(format!("database_url: {e}")))?;
        config.connect_timeout(Duration::from_secs(3));
        config.application_name("perfbox");
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("perfbox-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| StoreError::Postgres(format!("cannot start its thread: {e}")))?;
        let rt = handle_rx
            .recv()
            .map_err(|_| StoreError::Postgres("its thread died".into()))?
            .map_err(|e| StoreError::Postgres(format!("cannot start its runtime: {e}")))?;
        let pool = {
            let _guard = rt.enter();
            Pool::builder(manager)
                .max_size(opts.pool_size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(5)))
                .create_timeout(Some(Duration::from_secs(3)))
                .recycle_timeout(Some(Duration::from_secs(3)))
                .build()
                .map_err(|e| StoreError::Postgres(format!("connection pool: {e}")))?
        };
        let (notices, _) = broadcast::channel(256);
        let store = PgStore {
            pool,
            rt,
            notices: notices.clone(),
            _stop: stop,
        };
        store.call(|mut c| async move {
            // DDL only when the schema is behind: ALTER TABLE takes an exclusive lock on jobs,
            // which every node starting would otherwise put in front of every claim.
            if schema_version(&c).await? >= SCHEMA_VERSION {
                return Ok(());
            }
            let tx = c.transaction().await.map_err(pg)?;
            tx.execute("SELECT pg_advisory_xact_lock(7205759403792793)", &[])
                .await
                .map_err(pg)?;
            tx.batch_execute(SCHEMA).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO perfbox_schema (only_row, version) VALUES (true, $1)
                 ON CONFLICT (only_row) DO UPDATE SET version = $1",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)
        })?;
        if opts.listen {
            store.rt.spawn(listen(config, notices));
        }
        Ok(store)
    }

    /// Run `f` with a pooled connection on the store's runtime and wait for its answer.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let pool = self.pool.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let work = async {
                let conn = pool
                    .get()
                    .await
                    .map_err(|e| StoreError::Postgres(format!("no connection: {e}")))?;
                f(conn).await
            };
            let r = tokio::time::timeout(CALL_TIMEOUT, work)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Postgres(format!(
                        "no answer within {} s",
                        CALL_TIMEOUT.as_secs()
                    )))
                });
            let _ = tx.send(r);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Postgres("the store's runtime stopped".into())))
    }

    /// One `SELECT count(*)`-like scalar.
    fn scalar(&self, sql: &'static str, params: Vec<Param>) -> Result<i64, StoreError> {
        self.call(move |c| async move {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
            let st = prepared(&c, sql).await?;
            Ok(c.query_one(&st, &refs).await.map_err(pg)?.get(0))
        })
    }

    /// The job's status, holder and attempt: what a refused write is explained with.
    fn why_not(
        &self,
        id: JobId,
        to: JobStatus,
        holder: Option<Holder>,
    ) -> Result<StoreError, StoreError> {
        let now = self.call(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT status, claimed_by, attempt FROM jobs WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(pg)?;
            Ok(row.map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, Option<String>>(1),
                    r.get::<_, i64>(2),
                )
            }))
        })?;
        Ok(refusal(id, to, holder, now))
    }
}

/// Keep one connection listening on [`CHANNEL`] and pass what arrives on; reconnect when it
/// drops (telling every node's worker to look for work: a notice may have been missed).
async fn listen(config: tokio_postgres::Config, notices: broadcast::Sender<Notice>) {
    use futures::StreamExt;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (msg_tx, mut msg_rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = m {
                            let _ = msg_tx.send(n.payload().to_owned());
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!(error = %pg(e), "cannot LISTEN; retrying");
                } else {
                    let _ = notices.send(Notice::Work);
                    while let Some(payload) = msg_rx.recv().await {
                        let notice = if let Some(id) = payload.strip_prefix("cancel:") {
                            match id.parse() {
                                Ok(id) => Notice::Cancel(id),
                                Err(_) => continue,
                            }
                        } else if let Some(id) = payload.strip_prefix("ended:") {
                            match id.parse() {
                                Ok(id) => Notice::Ended(id),
                                Err(_) => continue,
                            }
                        } else {
                            Notice::Work
                        };
                        let _ = notices.send(notice);
                    }
                    tracing::warn!("the database connection for notices dropped; reconnecting");
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %pg(e), "cannot connect for notices; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A row of [`COLUMNS`].
fn record(r: &Row) -> JobRecord {
    let json = |i: usize| -> Option<Box<RawValue>> {
        r.get::<_, Option<String>>(i)
            .and_then(|t| RawValue::from_string(t).ok())
    };
    let status: String = r.get(const { col("status") });
    JobRecord {
        id: r.get(const { col("id") }),
        filename: r.get(const { col("filename") }),
        owner: r.get(const { col("owner") }),
        status: JobStatus::parse(&status).unwrap_or(JobStatus::Interrupted),
        error: r.get(const { col("error") }),
        perf: r.get(const { col("perf") }),
        dockerfile_sha256: r.get(const { col("dockerfile_sha256") }),
        created_at: r.get(const { col("created_at") }),
        build_started_at: r.get(const { col("build_started_at") }),
        build_finished_at: r.get(const { col("build_finished_at") }),
        run_started_at: r.get(const { col("run_started_at") }),
        finished_at: r.get(const { col("finished_at") }),
        image_digest: r.get(const { col("image_digest") }),
        cached_steps: r.get(const { col("cached_steps") }),
        total_steps: r.get(const { col("total_steps") }),
        runtime: r.get(const { col("runtime") }),
        cgroup: r.get(const { col("cgroup") }),
        limits: json(const { col("limits") }),
        exit_code: r.get(const { col("exit_code") }),
        oom_killed: r.get(const { col("oom_killed") }),
        image_cache: r.get(const { col("image_cache") }),
        build: json(const { col("build") }),
        submitter: r.get(const { col("submitter") }),
        spec_sha256: r.get(const { col("spec_sha256") }),
        runtime_version: r.get(const { col("runtime_version") }),
        attempt: r.get(const { col("attempt") }),
        claimed_by: r.get(const { col("claimed_by") }),
        run_dir: r.get(const { col("run_dir") }),
        usage: json(const { col("usage") }),
        idempotency_key: r.get(const { col("idempotency_key") }),
        dataset: r.get(const { col("dataset") }),
        callback: json(const { col("callback") }),
    }
}

/// A patch's assignments as SQL (`column = $n`, numbered from `first`) and parameters.
fn assignments(patch: &Patch, first: usize) -> (Vec<String>, Vec<Param>) {
    use rusqlite::types::Value;
    let mut sql = vec![];
    let mut params: Vec<Param> = vec![];
    for (column, value) in patch.assignments() {
        let p: Param = match value {
            Value::Integer(i) if column == "oom_killed" => Box::new(i != 0),
            Value::Integer(i) => Box::new(i),
            Value::Real(f) => Box::new(f),
            Value::Text(t) => Box::new(t),
            Value::Null | Value::Blob(_) => continue,
        };
        sql.push(format!("{column} = ${}", first + params.len()));
        params.push(p);
    }
    (sql, params)
}

fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as _).collect()
}

impl Store for PgStore {
    fn insert(
        &self,
        job: &NewJob<'_>,
        caps: QueueCaps,
        prepare: &mut dyn FnMut(JobId) -> std::io::Result<()>,
    ) -> Result<JobRecord, StoreError> {
        // The caps are checked before the id is taken: nodes inserting at the same moment may
        // pass them by a few jobs (soft caps), never by more than the nodes inserting at once.
        // An Idempotency-Key already taken is refused before the id is taken too; two inserts
        // racing with one key are settled by the unique index.
        let who = job.submitter.to_owned();
        let key = job.idempotency_key.map(str::to_owned);
        let (queued, mine, id, taken) = self.call(|c| async move {
            let row = c
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE coalesce(submitter, owner, '') = $1),
                            nextval(pg_get_serial_sequence('jobs', 'id')),
                            $2::text IS NOT NULL AND EXISTS (SELECT 1 FROM jobs
                                WHERE coalesce(submitter, owner, '') = $1 AND idempotency_key = $2)
                     FROM jobs WHERE status = 'queued'",
                    &[&who, &key],
                )
                .await
                .map_err(pg)?;
            Ok((
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, i64>(2),
                row.get::<_, bool>(3),
            ))
        })?;
        if taken {
            return Err(StoreError::DuplicateKey);
        }
        caps.check(queued, mine)?;
        prepare(id).map_err(StoreError::Prepare)?;
        let (filename, owner, submitter, sha, key) = (
            job.filename.to_owned(),
            job.owner.map(str::to_owned),
            job.submitter.to_owned(),
            job.dockerfile_sha256.to_owned(),
            job.idempotency_key.map(str::to_owned),
        );
        let files: Vec<(String, Vec<u8>)> = job
            .files
            .iter()
            .map(|(n, c)| ((*n).to_owned(), c.to_vec()))
            .collect();
        self.call(move |mut c| async move {
            let tx = c.transaction().await.map_err(pg)?;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO jobs (id, filename, owner, submitter, status, dockerfile_sha256,
                                           created_at, idempotency_key)
                         VALUES ($1, $2, $3, $4, 'queued', $5, {NOW}, $6) RETURNING {}",
                        *COLUMNS
                    ),
                    &[&id, &filename, &owner, &submitter, &sha, &key],
                )
                .await
                .map_err(|e| {
                    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                        StoreError::DuplicateKey
                    } else {
                        pg(e)
                    }
                })?;
            for (name, content) in &files {
                tx.execute(
                    "INSERT INTO job_files (job_id, name, content) VALUES ($1, $2, $3)",
                    &[&id, name, content],
                )
                .await
                .map_err(pg)?;
            }
            tx.execute(&format!("NOTIFY {CHANNEL}, 'work'"), &[])
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(record(&row))
        })
    }

    fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.call(move |c| async move {
            let st = prepared(&c, &format!("SELECT {} FROM jobs WHERE id = $1", *COLUMNS)).await?;
            let row = c.query_opt(&st, &[&id]).await.map_err(pg)?;
            Ok(row.as_ref().map(record))
        })
    }

    fn by_idempotency_key(
        &self,
        submitter: &str,
        key: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        let (who, key) = (submitter.to_owned(), key.to_owned());
        self.call(move |c| async move {
            let row = c
                .query_opt(
                    &format!(
                        "SELECT {} FROM jobs
                         WHERE coalesce(submitter, owner, '') = $1 AND idempotency_key = $2",
                        *COLUMNS
                    ),
                    &[&who, &key],
                )
                .await
                .map_err(pg)?;
            Ok(row.as_ref().map(record))
        })
    }

    fn list(
        &self,
        which: Listing<'_>,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let owner = which.owner.map(str::to_owned);
        let statuses = which.statuses_param();
        let before = before.unwrap_or(i64::MAX);
        let limit = limit as i64;
        self.call(move |c| async move {
            let rows = c
                .query(
                    &format!(
                        "SELECT {} FROM jobs WHERE ($1::text IS NULL OR owner = $1) AND id < $2
                         AND ($4 = '' OR strpos($4, ',' || status || ',') > 0)
                         ORDER BY id DESC LIMIT $3",
                        *COLUMNS
                    ),
                    &[&owner, &before, &limit, &statuses],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(record).collect())
        })
    }

    fn count(&self, which: Listing<'_>) -> Result<i64, StoreError> {
        self.scalar(
            "SELECT count(*) FROM jobs WHERE ($1::text IS NULL OR owner = $1)
             AND ($2 = '' OR strpos($2, ',' || status || ',') > 0)",
            vec![
                Box::new(which.owner.map(str::to_owned)),
                Box::new(which.statuses_param()),
            ],
        )
    }

    fn leaderboard(&self, board: &Board<'_>) -> Result<Vec<JobRecord>, StoreError> {
        let sql = board.sql(|n| format!("${n}"), "::text", "AND perf <> 'NaN'::float8");
        let owner = board.owner.map(str::to_owned);
        let limit = board.limit as i64;
        self.call(move |c| async move {
            let rows = c.query(&sql, &[&owner, &limit]).await.map_err(pg)?;
            Ok(rows.iter().map(record).collect())
        })
    }

    fn queue_position(&self, id: JobId) -> Result<i64, StoreError> {
        self.scalar(
            "SELECT count(*) FROM jobs WHERE status = 'queued' AND id < $1",
            vec![Box::new(id)],
        )
    }

    fn queue_depth(&self) -> Result<i64, StoreError> {
        self.scalar("SELECT count(*) FROM jobs WHERE status = 'queued'", vec![])
    }

    fn counts(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        self.call(|c| async move {
            let rows = c
                .query("SELECT status, count(*) FROM jobs GROUP BY status", &[])
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .filter_map(|r| Some((JobStatus::parse(r.get(0))?, r.get::<_, i64>(1))))
                .collect())
        })
    }

    fn transition(&self, id: JobId, to: JobStatus, patch: Patch) -> Result<JobRecord, StoreError> {
        let allowed: Vec<String> = JobStatus::ALL
            .into_iter()
            .filter(|from| from.can_transition_to(to))
            .map(|s| s.as_str().to_owned())
            .collect();
        let (sets, mut params) = assignments(&patch, 5);
        let mut sql = format!(
            "UPDATE jobs SET status = $2,
                build_started_at = CASE WHEN $2 = 'building' THEN {NOW} ELSE build_started_at END,
                build_finished_at = CASE WHEN status = 'building' AND $2 <> 'building' THEN {NOW}
                                         ELSE build_finished_at END,
                run_started_at = CASE WHEN $2 = 'running' THEN {NOW} ELSE run_started_at END,
                finished_at = CASE WHEN $3 THEN {NOW} ELSE finished_at END,
                slot = CASE WHEN $2 = 'building' THEN slot END{}
             WHERE id = $1 AND status = ANY($4)",
            sets.iter().map(|s| format!(", {s}")).collect::<String>()
        );
        if let Some(h) = &patch.holder {
            let n = 5 + params.len();
            sql.push_str(&format!(" AND claimed_by = ${n} AND attempt = ${}", n + 1));
            params.push(Box::new(h.node.clone()));
            params.push(Box::new(h.attempt));
        }
        sql.push_str(&format!(" RETURNING {}", *COLUMNS));
        let mut all: Vec<Param> = vec![
            Box::new(id),
            Box::new(to.as_str().to_owned()),
            Box::new(to.is_terminal()),
            Box::new(allowed),
        ];
        all.extend(params);
        // No NOTIFY for capacity here: what frees it for others is a build slot, and the worker
        // gives its slot back (release_build_slot, which notifies) before the job moves on. A
        // NOTIFY serialises committing transactions, so it is sent only where it matters: once
        // per job at its end (`ended:<id>`, for callers waiting on other nodes).
        let ended = to.is_terminal().then(|| format!("ended:{id}"));
        let row = self.call(move |c| async move {
            let st = prepared(&c, &sql).await?;
            let row = c.query_opt(&st, &refs(&all)).await.map_err(pg)?;
            if let (Some(_), Some(payload)) = (&row, &ended) {
                // Best effort: a waiter also looks again every second.
                let _ = c
                    .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, payload])
                    .await;
            }
            Ok(row)
        })?;
        match row {
            Some(r) => Ok(record(&r)),
            None => Err(self.why_not(id, to, patch.holder)?),
        }
    }

    fn annotate(&self, id: JobId, status: JobStatus, patch: Patch) -> Result<(), StoreError> {
        let (sets, mut params) = assignments(&patch, 3);
        if sets.is_empty() {
            return Ok(());
        }
        let mut sql = format!(
            "UPDATE jobs SET {} WHERE id = $1 AND status = $2",
            sets.join(", ")
        );
        if let Some(h) = &patch.holder {
            let n = 3 + params.len();
            sql.push_str(&format!(" AND claimed_by = ${n} AND attempt = ${}", n + 1));
            params.push(Box::new(h.node.clone()));
            params.push(Box::new(h.attempt));
        }
        let mut all: Vec<Param> = vec![Box::new(id), Box::new(status.as_str().to_owned())];
        all.extend(params);
        let changed = self.call(move |c| async move {
            let st = prepared(&c, &sql).await?;
            c.execute(&st, &refs(&all)).await.map_err(pg)
        })?;
        if changed == 1 {
            return Ok(());
        }
        Err(self.why_not(id, status, patch.holder)?)
    }

    fn claim(&self, claim: &Claim<'_>) -> Result<Option<JobRecord>, StoreError> {
        // One statement. The owners' build slots in use are counted once per claim (`busy`),
        // not once per queued row looked at: with many claimers, each skips the rows the
        // others hold locked, and a per-row count made every claim cost rows × slots.
        let node = claim.node.to_owned();
        let slots = claim.build_slots as i64;
        let per_owner = claim.per_owner as i64;
        let lease = claim.lease.as_secs_f64();
        self.call(move |c| async move {
            let st = prepared(
                &c,
                &format!(
                        "WITH busy AS MATERIALIZED (
                            SELECT coalesce(submitter, owner, '') AS who,
                                   count(*) FILTER (WHERE slot = 'build') AS n,
                                   count(*) AS active
                            FROM jobs WHERE status IN ('building', 'running') GROUP BY 1)
                         UPDATE jobs SET status = 'building', build_started_at = {NOW}, slot = 'build',
                                claimed_by = $1, lease_until = {NOW} + $4, attempt = attempt + 1
                         WHERE status = 'queued' AND id = (
                            SELECT j.id FROM jobs j
                            WHERE j.status = 'queued'
                              AND (SELECT count(*) FROM jobs b
                                   WHERE b.slot = 'build' AND b.claimed_by = $1) < $2
                              AND coalesce((SELECT n FROM busy
                                   WHERE who = coalesce(j.submitter, j.owner, '')), 0) < $3
                            ORDER BY coalesce((SELECT active FROM busy
                                   WHERE who = coalesce(j.submitter, j.owner, '')), 0), j.id
                            LIMIT 1
                            FOR UPDATE OF j SKIP LOCKED)
                         RETURNING {}",
                        *COLUMNS
                    ),
            )
            .await?;
            let row = c
                .query_opt(
                    &st,
                    &[&node, &slots, &per_owner, &lease],
                )
                .await
                .map_err(pg)?;
            Ok(row.as_ref().map(record))
        })
    }

    fn release_build_slot(&self, id: JobId) -> Result<(), StoreError> {
        self.call(move |c| async move {
            let n = c
                .execute(
                    "UPDATE jobs SET slot = NULL WHERE id = $1 AND slot = 'build'",
                    &[&id],
                )
                .await
                .map_err(pg)?;
            if n > 0 {
                c.execute(&format!("NOTIFY {CHANNEL}, 'work'"), &[])
                    .await
                    .map_err(pg)?;
            }
            Ok(())
        })
    }

    fn renew(&self, node: &str, jobs: &[JobId], lease: Duration) -> Result<Vec<JobId>, StoreError> {
        let node = node.to_owned();
        let jobs = jobs.to_vec();
        let lease = lease.as_secs_f64();
        self.call(move |c| async move {
            c.execute(
                &format!("UPDATE nodes SET heartbeat_at = {NOW} WHERE name = $1"),
                &[&node],
            )
            .await
            .map_err(pg)?;
            let rows = c
                .query(
                    &format!(
                        "UPDATE jobs SET lease_until = {NOW} + $3
                         WHERE id = ANY($2) AND claimed_by = $1 AND status IN ('building', 'running')
                         RETURNING id"
                    ),
                    &[&node, &jobs, &lease],
                )
                .await
                .map_err(pg)?;
            let mut held: Vec<JobId> = rows.iter().map(|r| r.get(0)).collect();
            held.sort();
            Ok(held)
        })
    }

    fn stale(&self, node: &str) -> Result<Vec<JobId>, StoreError> {
        let node = node.to_owned();
        self.call(move |c| async move {
            let rows = c
                .query(
                    &format!(
                        "SELECT id FROM jobs WHERE status IN ('building', 'running')
                           AND (claimed_by IS NULL OR claimed_by = $1 OR coalesce(lease_until, 0) < {NOW})
                         ORDER BY id"
                    ),
                    &[&node],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn give_up(
        &self,
        id: JobId,
        attempt: i64,
        requeue: bool,
        why: &str,
    ) -> Result<JobRecord, StoreError> {
        let why = why.to_owned();
        let row = self.call(move |c| async move {
            let row = c
                .query_opt(
                    &format!(
                        "UPDATE jobs SET
                            status = CASE WHEN cancel_requested THEN 'cancelled'
                                          WHEN $3 THEN 'queued' ELSE 'interrupted' END,
                            error = CASE WHEN cancel_requested THEN 'cancelled by request; its node stopped'
                                         WHEN $3 THEN NULL ELSE $4 END,
                            finished_at = CASE WHEN cancel_requested OR NOT $3 THEN {NOW} END,
                            build_finished_at = CASE WHEN status = 'building' THEN {NOW}
                                                     ELSE build_finished_at END,
                            claimed_by = CASE WHEN NOT cancel_requested AND $3 THEN NULL
                                              ELSE claimed_by END,
                            slot = NULL, lease_until = NULL
                         WHERE id = $1 AND attempt = $2 AND status IN ('building', 'running')
                         RETURNING {}",
                        *COLUMNS
                    ),
                    &[&id, &attempt, &requeue, &why],
                )
                .await
                .map_err(pg)?;
            if row.is_some() {
                c.execute(&format!("NOTIFY {CHANNEL}, 'work'"), &[])
                    .await
                    .map_err(pg)?;
            }
            Ok(row)
        })?;
        match row {
            Some(r) => Ok(record(&r)),
            None => match self.get(id)? {
                None => Err(StoreError::NotFound(id)),
                Some(r) => Err(StoreError::Fenced {
                    id,
                    node: r.claimed_by.unwrap_or_default(),
                    attempt,
                }),
            },
        }
    }

    fn shared(&self) -> bool {
        true
    }

    fn put_files(
        &self,
        id: JobId,
        holder: Option<&Holder>,
        files: &[(&str, &[u8])],
    ) -> Result<(), StoreError> {
        let holder = holder.cloned();
        let files: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(n, c)| ((*n).to_owned(), c.to_vec()))
            .collect();
        self.call(move |mut c| async move {
            let tx = c.transaction().await.map_err(pg)?;
            if let Some(h) = &holder {
                let held = tx
                    .query_opt(
                        "SELECT 1 FROM jobs WHERE id = $1 AND claimed_by = $2 AND attempt = $3
                         FOR UPDATE",
                        &[&id, &h.node, &h.attempt],
                    )
                    .await
                    .map_err(pg)?;
                if held.is_none() {
                    return Err(StoreError::Fenced {
                        id,
                        node: h.node.clone(),
                        attempt: h.attempt,
                    });
                }
            }
            for (name, content) in &files {
                tx.execute(
                    "INSERT INTO job_files (job_id, name, content) VALUES ($1, $2, $3)
                     ON CONFLICT (job_id, name) DO UPDATE SET content = EXCLUDED.content",
                    &[&id, name, content],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
    }

    fn files(&self, id: JobId) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.call(move |c| async move {
            let rows = c
                .query(
                    "SELECT name, content FROM job_files WHERE job_id = $1 ORDER BY name",
                    &[&id],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn register_node(&self, node: &NodeInfo) -> Result<(), StoreError> {
        let n = node.clone();
        self.call(move |c| async move {
            c.execute(
                "INSERT INTO nodes (name, url, capacity, pid, started_at, heartbeat_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET url = $2, capacity = $3, pid = $4,
                    started_at = $5, heartbeat_at = $6",
                &[
                    &n.name,
                    &n.url,
                    &n.capacity,
                    &n.pid,
                    &n.started_at,
                    &n.heartbeat_at,
                ],
            )
            .await
            .map_err(pg)?;
            Ok(())
        })
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        self.call(|c| async move {
            let rows = c
                .query(
                    "SELECT name, url, capacity, pid, started_at, heartbeat_at FROM nodes ORDER BY name",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| NodeInfo {
                    name: r.get(0),
                    url: r.get(1),
                    capacity: r.get(2),
                    pid: r.get(3),
                    started_at: r.get(4),
                    heartbeat_at: r.get(5),
                })
                .collect())
        })
    }

    fn request_cancel(&self, id: JobId) -> Result<(), StoreError> {
        self.call(move |c| async move {
            c.execute(
                "UPDATE jobs SET cancel_requested = true WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg)?;
            c.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &format!("cancel:{id}")],
            )
            .await
            .map_err(pg)?;
            Ok(())
        })
    }

    fn notices(&self) -> Option<broadcast::Receiver<Notice>> {
        Some(self.notices.subscribe())
    }
}
