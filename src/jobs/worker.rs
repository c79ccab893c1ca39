//! The worker: claims queued jobs from the store whenever a build slot is free for them, and
//! drives each claimed job through the pipeline to its recorded end.
//!
//! Claims come from the store ([`super::Store::claim`]: FIFO, at most `max_concurrent_builds` of
//! this service's and `max_builds_per_owner` of one owner's at once). The worker claims when it is
//! woken (a submission, a freed build slot) and at least every second, so jobs queued by another
//! process sharing the store are found too. While it holds jobs it renews their leases.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::service::JobService;
use super::store::Claim;
use super::{JobRecord, JobStatus};

/// How long a claim holds without renewal; renewed every third of it.
pub const LEASE: Duration = Duration::from_secs(60);
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
                    lease: LEASE,
                };
                match self.inner.store.claim(&claim) {
                    Ok(Some(rec)) => {
                        let active = self.register(rec.id);
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

    /// Keep this service's claims alive.
    async fn renew_leases(self) {
        loop {
            tokio::time::sleep(LEASE / 3).await;
            if let Err(e) = self.inner.store.renew(&self.inner.instance, LEASE) {
                tracing::error!(error = %e, "cannot renew job leases");
            }
        }
    }

    /// Register a claimed job as running work that a DELETE can cancel. Done before the job
    /// leaves the worker loop, so that a cancel finds either `queued` or this entry.
    fn register(&self, id: super::JobId) -> Active {
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
        let (status, patch) = self.pipeline(&rec, &active.token).await;
        if let Err(e) = self.inner.store.transition(id, status, patch) {
            tracing::error!(job = id, error = %e, "could not record the job's end");
        }
        tracing::info!(job = id, status = %status, "job finished");
        drop(active);
        // Its build slot (if it still held it) is free.
        self.inner.wake.notify_one();
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
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let _ = self.done.send(true);
    }
}

/// A status the pipeline ends a job with, and why (for [`super::Patch::error`]).
pub(super) type Ending = (JobStatus, String);
