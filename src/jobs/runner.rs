//! [`Runner`]: what the pipeline needs of the sandbox, so that the job service can be driven by a
//! fake in unit tests ([`crate::sandbox::Sandbox`] is the real one; the image builder's seam is
//! [`crate::buildkit::ImageBuilder`]).

use std::path::Path;

use futures::future::BoxFuture;

use tokio_util::sync::CancellationToken;

use crate::sandbox::{Prepared, RunReport, RunRequest, Sandbox, SandboxError};

/// Runs images.
pub trait Runner: Send + Sync {
    /// Write the spec of a run (see [`Sandbox::prepare`]).
    fn prepare<'a>(&'a self, req: RunRequest<'a>) -> BoxFuture<'a, Result<Prepared, SandboxError>>;

    /// Run what [`Runner::prepare`] wrote (see [`Sandbox::start`]).
    fn start(
        &self,
        prepared: Prepared,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<RunReport, SandboxError>>;

    /// Kill and delete whatever a job left running when perfbox died.
    fn reap<'a>(&'a self, job_dir: &'a Path) -> BoxFuture<'a, ()>;

    /// The runtime's version, or why it cannot run (health checks).
    fn version(&self) -> BoxFuture<'_, Result<String, String>>;

    /// The cgroup layout jobs' limits go through ("v1", "v2", "none").
    fn cgroup_version(&self) -> &'static str;

    /// The memory limit of a run (for the reason of an OOM kill).
    fn memory_limit(&self) -> u64;

    /// The digest of the seccomp section every spec carries (the audit's `seccomp` rule).
    fn seccomp_digest(&self) -> String;
}

impl Runner for Sandbox {
    fn prepare<'a>(&'a self, req: RunRequest<'a>) -> BoxFuture<'a, Result<Prepared, SandboxError>> {
        Box::pin(Sandbox::prepare(self, req))
    }

    fn start(
        &self,
        prepared: Prepared,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<RunReport, SandboxError>> {
        Box::pin(Sandbox::start(self, prepared, cancel))
    }

    fn reap<'a>(&'a self, job_dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(Sandbox::reap(self, job_dir))
    }

    fn version(&self) -> BoxFuture<'_, Result<String, String>> {
        // Asked afresh: a health check must notice a runtime that stopped working.
        Box::pin(async move { self.runtime().version().await.map_err(|e| e.to_string()) })
    }

    fn cgroup_version(&self) -> &'static str {
        self.cgroups().version()
    }

    fn memory_limit(&self) -> u64 {
        self.limits().memory_bytes
    }

    fn seccomp_digest(&self) -> String {
        Sandbox::seccomp_digest(self).to_owned()
    }
}
