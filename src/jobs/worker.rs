//! The worker: claims queued jobs from the store whenever a build slot is free for them, and
//! drives each claimed job through the pipeline to its recorded end.
//!
//! Claims come from the store ([`super::Store::claim`]: FIFO, at most `max_concurrent_builds` of
//! this service's and `max_builds_per_owner` of one owner's at once). The worker claims when it is
//! woken (a submission, a freed build slot) and at least every second, so jobs queued by another
//! process sharing the store are found too. While it holds jobs it renews their leases; a job
//! whose lease it lost (another node took it: see [`super::Store::give_up`]) is stopped here,
//! and its late writes are refused by the store. It also gives up other nodes' jobs whose
//! leases ran out, so a dead node's jobs go back to the queue.
//!
//! With a shared store the job's submitted files come from the store before the build, and its
//! logs and spec go back to it before its end is recorded (any node can show them).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::service::JobService;
use super::store::{Claim, Holder};
use super::{JobRecord, JobStatus};

/// How often the worker looks for work when nothing woke it.
const POLL: Duration = Duration::from_secs(1);

impl JobService {
    /// The worker loop (spawned by [`JobService::start`]).
    pub(super) async fn work(self) {
        tokio::spawn(self.clone().renew_leases());
        loop {
            loop {
                let cfg = &self.inner.cfg;
                let claim = Claim {
                    node: &self.inner.instance,
                    build_slots: cfg.max_concurrent_builds,
                    per_owner: cfg.build.max_builds_per_owner,
                    lease: self.inner.lease,
                };
                match self.inner.store.claim(&claim) {
                    Ok(Some(rec)) => {
                        let active = self.register(&rec);
                        tokio::spawn(self.clone().process(rec, active));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot claim a job");
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(POLL, self.inner.wake.notified()).await;
        }
    }

    /// Keep this service's claims alive, stop work on jobs it lost, and give up jobs whose
    /// node stopped renewing.
    async fn renew_leases(self) {
        loop {
            tokio::time::sleep(self.inner.lease / 3).await;
            let mine = self.active_ids();
            match self
                .inner
                .store
                .renew(&self.inner.instance, &mine, self.inner.lease)
            {
                Ok(held) => {
                    let active = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
                    for id in mine.iter().filter(|id| !held.contains(id)) {
                        if let Some((token, _)) = active.get(id) {
                            tracing::warn!(
                                job = id,
                                "lost this job's lease to another node: stopping it here"
                            );
                            token.cancel();
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot renew job leases"),
            }
            match self.inner.store.stale("") {
                Ok(ids) => {
                    let active = self.active_ids();
                    // Our own jobs whose lease ran out (this process was paused, or the
                    // database unreachable) are still ours until another node takes them.
                    for id in ids.into_iter().filter(|id| !active.contains(id)) {
                        if let Err(e) = self.give_up(id).await {
                            tracing::error!(job = id, error = %e, "cannot give up a stale job");
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot look for stale jobs"),
            }
        }
    }

    /// The jobs this node works on now.
    fn active_ids(&self) -> Vec<super::JobId> {
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Register a claimed job as running work that a DELETE can cancel. Done before the job
    /// leaves the worker loop, so that a cancel finds either `queued` or this entry.
    fn register(&self, rec: &JobRecord) -> Active {
        let id = rec.id;
        if let Some(h) = Holder::of(rec) {
            self.inner
                .holders
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, h);
        }
        let token = CancellationToken::new();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (token.clone(), done_rx));
        Active {
            svc: self.clone(),
            id,
            token,
            done: done_tx,
        }
    }

    /// One claimed job, from `building` to its recorded end.
    async fn process(self, rec: JobRecord, active: Active) {
        let id = rec.id;
        let holder = self.holder(id);
        let (status, mut patch) = match self.fetch_submission(&rec).await {
            Ok(()) => self.pipeline(&rec, &active.token).await,
            Err(e) => (
                JobStatus::Interrupted,
                super::Patch::default()
                    .with_error(format!("cannot bring the job's files from the store: {e}")),
            ),
        };
        patch.holder = holder.clone();
        self.record_end(id, status, patch, holder.as_ref()).await;
        drop(active);
        // Its build slot (if it still held it) is free.
        self.inner.wake.notify_one();
    }

    /// With a shared store, a job claimed here may have been submitted elsewhere: its
    /// Dockerfile and options come from the store.
    async fn fetch_submission(&self, rec: &JobRecord) -> Result<(), super::StoreError> {
        let dir = self.job_dir(rec.id);
        if !self.inner.store.shared() || dir.dockerfile().is_ok() {
            return Ok(());
        }
        let files = self
            .write_through(rec.id, "the job's files", || self.inner.store.files(rec.id))
            .await?;
        dir.restore(&files).map_err(super::StoreError::Prepare)
    }

    /// The job's callback, if its submission asked for one: its final answer POSTed in the
    /// background, the outcome then written into its record.
    pub(super) fn call_back(&self, id: super::JobId) {
        // The job's options: from its directory here, or (a job of another node, ended here
        // because that node was lost) from the shared store.
        let url = self.job_dir(id).build_options().callback_url.or_else(|| {
            let files = self.inner.store.files(id).ok()?;
            let (_, options) = files
                .iter()
                .find(|(name, _)| name == super::job_dir::BUILD_OPTIONS)?;
            serde_json::from_slice::<super::BuildOptions>(options)
                .ok()?
                .callback_url
        });
        let Some(url) = url else {
            return;
        };
        let cfg = &self.inner.cfg.callbacks;
        let url = match super::callback::check_url(&url, &cfg.allowed_hosts) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(job = id, "callback not sent: {e}");
                return;
            }
        };
        let secret = cfg.secret.clone().unwrap_or_default();
        let attempts = cfg.max_attempts;
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(Some(rec)) = me.inner.store.get(id) else {
                return;
            };
            let body = rec.answer().to_string();
            let d = super::callback::deliver(
                &url,
                body.as_bytes(),
                secret.as_bytes(),
                id,
                attempts,
                Duration::from_secs(1),
            )
            .await;
            tracing::info!(
                job = id,
                delivered = d.delivered,
                attempts = d.attempts,
                "callback"
            );
            let patch = super::Patch {
                callback: serde_json::to_value(&d).ok(),
                ..Default::default()
            };
            if let Err(e) = me.inner.store.annotate(id, rec.status, patch) {
                tracing::warn!(job = id, "the callback's outcome was not recorded: {e}");
            }
        });
    }

    /// Record a job's end (with a shared store, its logs and spec first), retrying while the
    /// database is unreachable; a refused write (this node lost the job, or it was cancelled
    /// meanwhile) is logged, never retried.
    async fn record_end(
        &self,
        id: super::JobId,
        status: JobStatus,
        patch: super::Patch,
        holder: Option<&Holder>,
    ) {
        let store = &self.inner.store;
        let cap = self.inner.cfg.limits.log_bytes.max(1 << 20);
        let results = if store.shared() {
            self.job_dir(id).results(cap)
        } else {
            vec![]
        };
        let kept: Vec<(&str, &[u8])> = results.iter().map(|(n, c)| (*n, c.as_slice())).collect();
        let written = self
            .write_through(id, "the job's end", || {
                store.put_files(id, holder, &kept)?;
                store.transition(id, status, patch.clone()).map(|_| ())
            })
            .await;
        match written {
            Ok(()) => {
                tracing::info!(job = id, status = %status, "job finished");
                self.ended_here(id);
            }
            Err(e) => {
                tracing::warn!(job = id, error = %e, status = %status, "the job's end was not recorded")
            }
        }
    }

    /// Run a store write for job `id`, again while the database is unreachable (backoff from
    /// 0.2 s to 5 s, about three minutes in all): a database restart must not fail the jobs
    /// under way. A refused write (fenced, wrong status) is returned at once.
    pub(super) async fn write_through<T>(
        &self,
        id: super::JobId,
        what: &str,
        mut write: impl FnMut() -> Result<T, super::StoreError>,
    ) -> Result<T, super::StoreError> {
        let mut delay = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            match write() {
                Err(e) if e.is_transient() && tries < 40 => {
                    tries += 1;
                    tracing::warn!(job = id, error = %e, "the database is unreachable for {what}; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// The build of a claimed job is over: its build slot goes to the next job.
    pub(super) fn release_build_slot(&self, id: super::JobId) {
        if let Err(e) = self.inner.store.release_build_slot(id) {
            tracing::error!(job = id, error = %e, "cannot release a build slot");
        }
        self.inner.wake.notify_one();
    }
}

/// A job being worked on; unregistered (and its cancellers told it is over) when dropped.
pub(super) struct Active {
    svc: JobService,
    id: super::JobId,
    /// Cancels the job's build or run.
    pub(super) token: CancellationToken,
    done: tokio::sync::watch::Sender<bool>,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.svc
            .inner
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.svc
            .inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let _ = self.done.send(true);
    }
}

/// A status the pipeline ends a job with, and why (for [`super::Patch::error`]).
pub(super) type Ending = (JobStatus, String);
