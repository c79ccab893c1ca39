//! [`BuildkitClient`]: the connection to buildkitd (one tonic [`Channel`] shared by every call and
//! build; made in [`super::connect`]), the daemon calls (health, version, prune), and the entry
//! of a build ([`super::build`]).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::Channel;

use super::connect::CONNECT_TIMEOUT;
use super::error::{self, BuildError, error_chain};
use super::proto::control::{
    ControlClient, DiskUsageRequest, InfoRequest, ListWorkersRequest, PruneRequest,
};
use super::proto::pb;
use super::session::auth::RegistryCredentials;
use super::status::BuildLog;
use super::{BuildRequest, BuildScope, BuiltImage, DaemonInfo, ImageBuilder, WorkerInfo};

/// Large enough for status batches with logs and for the frontend's result.
pub(super) const MAX_MESSAGE: usize = 64 << 20;

/// Client for one buildkitd. Cheap to clone; all clones share one HTTP/2 connection, which is
/// (re)established lazily, so the client survives daemon restarts.
#[derive(Clone)]
pub struct BuildkitClient {
    pub(super) addr: Arc<str>,
    pub(super) channel: Channel,
    pub(super) credentials: Arc<RegistryCredentials>,
}

impl std::fmt::Debug for BuildkitClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildkitClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl BuildkitClient {
    /// Ask the daemon to delete the build-cache records nothing uses (BuildKit's own prune),
    /// e.g. the snapshot of a RUN step stopped for filling the disk: every unused layer
    /// (`type==regular`), and the cache mounts of `scope` only — another scope's cache mounts
    /// are what its (owner-scoped) next builds read, and a hostile build that fills the disk
    /// must not be able to wipe them. Returns the bytes freed.
    pub async fn prune(&self, scope: Option<&BuildScope>) -> Result<u64, BuildError> {
        let mut freed = self.prune_once(vec!["type==regular".to_owned()]).await?;
        let Some(scope) = scope else {
            return Ok(freed);
        };
        // A cache mount's description ends `with id "<scope>/<id>"` (the mount namespace is
        // the scope). Prune does not match descriptions, so the scope's mounts are found with
        // DiskUsage and pruned by id. The stopped build's mounts are released a moment after
        // its solve ends: look again while they are still in use, for up to ~3 s.
        let marker = format!("with id \"{}/", scope.as_str());
        for attempt in 0..7 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let mounts: Vec<(String, bool)> = self
                .usage(vec!["type==exec.cachemount".to_owned()])
                .await?
                .into_iter()
                .filter(|r| r.description.contains(&marker))
                .map(|r| (r.id, r.in_use))
                .collect();
            if mounts.is_empty() {
                break;
            }
            let idle: Vec<String> = mounts
                .iter()
                .filter(|(_, in_use)| !in_use)
                .map(|(id, _)| format!("id=={id}"))
                .collect();
            if !idle.is_empty() {
                freed += self.prune_once(idle).await?;
            }
        }
        Ok(freed)
    }

    /// One Prune call with `filter`; the bytes freed.
    async fn prune_once(&self, filter: Vec<String>) -> Result<u64, BuildError> {
        let mut control = self.control();
        let call = control.prune(PruneRequest {
            all: true,
            filter,
            ..Default::default()
        });
        let mut stream = tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .map_err(|_| self.unavailable("no answer to Prune within 60 s"))?
            .map_err(|s| self.call_error("Prune", &s))?
            .into_inner();
        let mut freed = 0u64;
        while let Some(record) = stream
            .message()
            .await
            .map_err(|s| self.call_error("Prune", &s))?
        {
            freed += u64::try_from(record.size).unwrap_or(0);
        }
        Ok(freed)
    }

    /// The cache records that match `filter` (DiskUsage).
    async fn usage(
        &self,
        filter: Vec<String>,
    ) -> Result<Vec<super::proto::control::UsageRecord>, BuildError> {
        let mut control = self.control();
        let call = control.disk_usage(DiskUsageRequest {
            filter,
            ..Default::default()
        });
        let answer = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .map_err(|_| self.unavailable("no answer to DiskUsage within 30 s"))?
            .map_err(|s| self.call_error("DiskUsage", &s))?
            .into_inner();
        Ok(answer.record)
    }

    /// Use `credentials` when a registry asks the daemon to authenticate (default: anonymous).
    pub fn with_registry_credentials(mut self, credentials: RegistryCredentials) -> Self {
        self.credentials = Arc::new(credentials);
        self
    }

    /// The address this client was created with.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub(super) fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn unavailable(&self, message: impl Into<String>) -> BuildError {
        BuildError::DaemonUnavailable {
            addr: self.addr.to_string(),
            message: message.into(),
        }
    }

    /// Version and workers of the daemon. Fails with [`BuildError::DaemonUnavailable`] naming
    /// the address within about 2 s when the daemon is down.
    pub async fn health(&self) -> Result<DaemonInfo, BuildError> {
        let version = self.info_version().await?;
        let mut control = self.control();
        let workers = tokio::time::timeout(
            CONNECT_TIMEOUT,
            control.list_workers(ListWorkersRequest::default()),
        )
        .await
        .map_err(|_| self.unavailable("ListWorkers got no answer within 2 s"))?
        .map_err(|s| self.call_error("ListWorkers", &s))?
        .into_inner();
        let workers = workers
            .record
            .into_iter()
            .map(|w| WorkerInfo {
                id: w.id,
                platforms: w.platforms.iter().map(platform_string).collect(),
                labels: w.labels.into_iter().collect(),
            })
            .collect();
        Ok(DaemonInfo { version, workers })
    }

    /// `Control.Info`, retried once right away: after a daemon restart the first call on the
    /// old connection can fail before the channel reconnects.
    pub(super) async fn info_version(&self) -> Result<String, BuildError> {
        let mut last = None;
        for _attempt in 0..2 {
            let mut control = self.control();
            match tokio::time::timeout(CONNECT_TIMEOUT, control.info(InfoRequest {})).await {
                Err(_) => return Err(self.unavailable("no answer within 2 s")),
                Ok(Ok(resp)) => {
                    return Ok(resp
                        .into_inner()
                        .buildkit_version
                        .map(|v| v.version)
                        .unwrap_or_default());
                }
                Ok(Err(status)) if error::is_transport_error(&status) => last = Some(status),
                Ok(Err(status)) => return Err(self.call_error("Info", &status)),
            }
        }
        Err(self.unavailable(last.map(|s| describe(&s)).unwrap_or_default()))
    }

    fn call_error(&self, call: &str, status: &tonic::Status) -> BuildError {
        if error::is_transport_error(status) {
            self.unavailable(describe(status))
        } else {
            BuildError::Other {
                message: format!("{call}: {}", status.message()),
            }
        }
    }

    /// Build `req`, streaming progress lines to `log`, and unpack the image into
    /// `req.rootfs_dir`.
    ///
    /// Cancel-safe: dropping the returned future, or cancelling `req.cancel`, cancels the solve on
    /// the daemon (the in-flight gRPC calls are reset) and stops the unpack.
    pub async fn build(
        &self,
        req: BuildRequest,
        log: impl BuildLog,
    ) -> Result<BuiltImage, BuildError> {
        self.build_shared(req, Arc::new(log)).await
    }

    async fn build_shared(
        &self,
        req: BuildRequest,
        log: Arc<dyn BuildLog>,
    ) -> Result<BuiltImage, BuildError> {
        let cancel = req.cancel.clone();
        let dockerfile = String::from_utf8_lossy(&req.dockerfile).into_owned();
        let result = tokio::select! {
            biased;
            () = cancel.cancelled() => Err(BuildError::Cancelled),
            r = super::build::run(self, req, log.clone()) => r.map_err(|e| e.locate_in(&dockerfile)),
        };
        let result = error::unasked_cancel_is_daemon_lost(result, cancel.is_cancelled());
        if let Err(e) = &result {
            log.line(&format!("ERROR: {e}"));
        }
        result
    }

    /// Map a failed solve call: a broken connection mid-build is `DaemonLost`.
    pub(super) fn solve_error(&self, status: &tonic::Status) -> BuildError {
        if error::is_transport_error(status) {
            BuildError::DaemonLost {
                message: format!("{} ({})", describe(status), self.addr),
            }
        } else {
            error::classify(status)
        }
    }
}

impl ImageBuilder for BuildkitClient {
    fn build_image(
        &self,
        req: BuildRequest,
        log: Arc<dyn BuildLog>,
    ) -> BoxFuture<'_, Result<BuiltImage, BuildError>> {
        Box::pin(self.build_shared(req, log))
    }

    fn prune<'a>(
        &'a self,
        scope: Option<&'a BuildScope>,
    ) -> BoxFuture<'a, Result<u64, BuildError>> {
        Box::pin(BuildkitClient::prune(self, scope))
    }

    fn version(&self) -> BoxFuture<'_, Result<String, BuildError>> {
        Box::pin(async move { self.health().await.map(|info| info.version) })
    }

    fn addr(&self) -> &str {
        BuildkitClient::addr(self)
    }
}

fn platform_string(p: &pb::Platform) -> String {
    let mut s = format!("{}/{}", p.os, p.architecture);
    if !p.variant.is_empty() {
        s.push('/');
        s.push_str(&p.variant);
    }
    s
}

/// A status message with its transport cause, for humans.
fn describe(status: &tonic::Status) -> String {
    error_chain(status)
}
