//! BuildKit client: builds a Dockerfile with a (rootless) buildkitd spoken to directly over its
//! gRPC API, and unpacks the result into a rootfs directory.
//!
//! One build is one `Control.Solve` through the *gateway forwarder*, so a single solve returns
//! both the image config and the filesystem:
//!
//! 1. `Control.Session` opens the session tunnel; we serve Health, FileSend (and Auth if
//!    credentials are configured) on it ([`session`]).
//! 2. `Control.Status` streams progress into a [`BuildLog`] ([`status`]).
//! 3. `Control.Solve{ref, session, exporters: [tar]}` without a frontend holds the build open.
//! 4. `LLBBridge.Solve{dockerfile.v0, evaluate}` (metadata `buildkit-controlapi-buildid: ref`)
//!    runs the Dockerfile, whose text travels as an LLB mkfile [`definition`]; its result carries
//!    `containerimage.config`.
//! 5. `LLBBridge.Return{result}` hands the result back; the daemon then runs the tar exporter,
//!    which streams the rootfs over the session's `FileSend/DiffCopy` into the unpacker
//!    ([`export`]), and `Control.Solve` returns.
//!
//! Every solve carries a source policy ([`policy`]): images only from the configured registries,
//! no other remote source unless allowed. Every build is scoped ([`BuildScope`]): its cache mounts
//! and RUN results are its own (or its owner's), its RUN steps can run in a cgroup of its own, and
//! `# syntax=` directives are ignored (frontend images never run).
//!
//! Errors are typed ([`BuildError`]); dropping a build future (or cancelling its token) cancels
//! the solve on the daemon. This module owns the gRPC and session protocol and nothing else.

#![forbid(unsafe_code)]

mod build;
mod client;
mod connect;
mod definition;
mod error;
mod export;
pub mod policy;
mod proto;
mod session;
mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::client::BuildkitClient;
pub use self::connect::TlsOptions;
pub use self::definition::DefinitionError;
pub use self::error::{BuildError, ExportError};
pub use self::export::{UnpackStats, unpack_tar};
/// The entitlements every solve asks for: none (no `network.host`, no `security.insecure`), so a
/// Dockerfile's `RUN --network=host` or `--security=insecure` fails. Job records keep this list.
pub const ENTITLEMENTS: &[&str] = &[];
pub use self::policy::{PolicyError, RemoteSource, SourcePolicy};
pub use self::session::auth::RegistryCredentials;
pub use self::status::{BuildLog, FileLog, MemoryLog, NullLog};
use crate::image::ImageConfig;

/// Network for `RUN` steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BuildNetwork {
    /// `force-network-mode=none`: `RUN` steps get a network namespace with only `lo`. They cannot
    /// reach the host's 127.0.0.1 (where the perfbox API and the registry listen) or anything else.
    /// This is a security requirement, hence the default.
    #[default]
    None,
    /// `force-network-mode=sandbox`: BuildKit's default network. **On the perfbox host this is
    /// the host network**, because buildkitd runs under `rootlesskit --net=host`: `RUN` steps can
    /// then reach every host loopback service. perfbox's config must refuse it unless explicitly
    /// allowed; this client only exposes the option.
    Sandbox,
}

impl BuildNetwork {
    /// The `force-network-mode` frontend option value.
    pub fn as_frontend_value(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Sandbox => "sandbox",
        }
    }
}

/// One Dockerfile build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The Dockerfile text. Without [`Self::context_dir`] it is the whole build context:
    /// `COPY`/`ADD` from the context only see this Dockerfile itself.
    pub dockerfile: Vec<u8>,
    /// A directory served to the daemon as the build context (`COPY`'s source), through this
    /// build's session only, under the local name `context`; the source policy then allows
    /// `local://context` and nothing else local. `None`: the Dockerfile alone.
    pub context_dir: Option<PathBuf>,
    /// `--build-arg NAME=value` pairs.
    pub build_args: BTreeMap<String, String>,
    /// `--target` stage name; `None` builds the last stage.
    pub target: Option<String>,
    /// Target platform such as `linux/amd64`; `None` is the daemon's default. One platform only.
    pub platform: Option<String>,
    /// Network for `RUN` steps (default: none).
    pub network: BuildNetwork,
    /// Where the image filesystem is unpacked. Must not exist or be an empty directory; on
    /// failure it may hold a partial tree (the caller owns and removes it).
    pub rootfs_dir: PathBuf,
    /// Ignore BuildKit's cache for every step (`no-cache`).
    pub no_cache: bool,
    /// Cancelling this token cancels the build on the daemon; [`BuildkitClient::build`] then
    /// returns [`BuildError::Cancelled`]. Dropping the build future has the same effect.
    pub cancel: CancellationToken,
    /// Asked, once the solve is done and before anything is exported, whether the caller already
    /// holds the root filesystem with this key ([`BuiltImage::rootfs_key`]). `true` skips the
    /// export: the build returns with [`BuiltImage::exported`] false and nothing unpacked.
    pub skip_export: Option<ExportFilter>,
    /// What the build may fetch (default: images from `127.0.0.1:5000` only).
    pub source_policy: SourcePolicy,
    /// Whose cache the build may use ([`BuildScope`]); `None`: BuildKit's global cache.
    pub scope: Option<BuildScope>,
    /// Cgroup (inside the hierarchy, e.g. `perfbox-build/runs/job-7`) under which BuildKit runs
    /// this build's RUN steps; only honoured by a daemon started with `--oci-worker-rootless=false`.
    pub cgroup_parent: Option<String>,
    /// The most bytes the exported image may have (apparent size: a sparse file counts in
    /// full); the export stops, and the build fails with [`ExportError::TooLarge`], past it.
    pub max_image_bytes: Option<u64>,
}

/// The scope of a build's cache: a `/`-free tag (e.g. `job-7` or `owner-3fa9…`). It namespaces
/// `RUN --mount=type=cache` ids (`BUILDKIT_CACHE_MOUNT_NS`) and is set as the hostname of every
/// RUN step, which makes it part of every RUN step's cache key: builds of different scopes share
/// neither cache mounts nor RUN results (BuildKit drops an explicit cache-mount id from the RUN
/// cache key, so the namespace alone would still let a RUN result cross scopes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildScope(String);

impl BuildScope {
    /// A scope named `tag`: 1 to 63 characters of `[A-Za-z0-9-]` (it is also a hostname).
    pub fn new(tag: &str) -> Result<Self, BuildError> {
        let ok = !tag.is_empty()
            && tag.len() <= 63
            && !tag.starts_with('-')
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if ok {
            Ok(Self(tag.to_owned()))
        } else {
            Err(BuildError::InvalidRequest {
                message: format!("bad build scope {tag:?} (1-63 of A-Z a-z 0-9 -)"),
            })
        }
    }

    /// The tag.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// See [`BuildRequest::skip_export`].
#[derive(Clone)]
pub struct ExportFilter(pub Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl std::fmt::Debug for ExportFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportFilter(..)")
    }
}

impl BuildRequest {
    /// A request with defaults: no build args, last stage, default platform, no network.
    pub fn new(dockerfile: impl Into<Vec<u8>>, rootfs_dir: impl Into<PathBuf>) -> Self {
        Self {
            dockerfile: dockerfile.into(),
            context_dir: None,
            build_args: BTreeMap::new(),
            target: None,
            platform: None,
            network: BuildNetwork::None,
            rootfs_dir: rootfs_dir.into(),
            no_cache: false,
            cancel: CancellationToken::new(),
            skip_export: None,
            source_policy: SourcePolicy::default(),
            scope: None,
            cgroup_parent: None,
            max_image_bytes: None,
        }
    }
}

/// Whether `name` may be a build arg: not empty, no `=` or white space, and not `BUILDKIT_*` (any
/// case), the names of BuildKit's own options (cache-mount namespace, syntax, hostname...), which
/// would let a submission change how its build is isolated.
pub fn check_build_arg_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.contains('=')
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("bad build arg name {name:?}"));
    }
    if name.to_ascii_uppercase().starts_with("BUILDKIT_") {
        return Err(format!(
            "build arg {name:?} is refused: BUILDKIT_* build args set BuildKit's own options, which perfbox sets itself"
        ));
    }
    Ok(())
}

/// A finished build.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The unpacked image filesystem (= [`BuildRequest::rootfs_dir`]).
    pub rootfs: PathBuf,
    /// Entrypoint/Cmd/Env/WorkingDir/User of the image.
    pub config: ImageConfig,
    /// `sha256:` of the image config JSON as the frontend returned it. Stable for identical
    /// builds; not the digest a registry would show (the exporter adds layer diff_ids).
    pub config_digest: Option<String>,
    /// Of [`Self::total_steps`], those BuildKit took from its cache.
    pub cached_steps: usize,
    /// Dockerfile steps (`[N/M] ...` vertices: RUN, COPY, WORKDIR, ...) the build needed. `FROM`
    /// is not counted (an image source is resolved, never run or reported cached); metadata-only
    /// instructions (CMD, ENV, USER, ...) have no vertex.
    pub total_steps: usize,
    /// Size of the exported tar stream.
    pub export_bytes: u64,
    /// From the first tar byte received to the last file written.
    pub export_duration: Duration,
    /// Whole build, from the call to the return.
    pub duration: Duration,
    /// Content key of the image's root filesystem: `llb-` + sha256 of the ops of BuildKit's final
    /// build definition. Builds with the same definition produce the same filesystem (BuildKit
    /// serves them from its cache), so a CMD-only change keeps the key.
    pub rootfs_key: Option<String>,
    /// False when [`BuildRequest::skip_export`] said the caller already has this rootfs.
    pub exported: bool,
}

impl BuiltImage {
    /// Export throughput in MB/s (10^6 bytes), 0 if too fast to measure.
    pub fn export_mb_per_s(&self) -> f64 {
        let secs = self.export_duration.as_secs_f64();
        if secs > 0.0 {
            self.export_bytes as f64 / 1e6 / secs
        } else {
            0.0
        }
    }
}

/// What [`BuildkitClient::health`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    /// `buildkit_version.version`, e.g. `v0.13.2+debian-...`.
    pub version: String,
    /// The daemon's workers.
    pub workers: Vec<WorkerInfo>,
}

/// One BuildKit worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Worker id.
    pub id: String,
    /// Platforms as `os/arch[/variant]`.
    pub platforms: Vec<String>,
    /// Worker labels (`org.mobyproject.buildkit.worker.*`).
    pub labels: BTreeMap<String, String>,
}

/// Something that builds images; [`BuildkitClient`] is the real one, tests of the job service can
/// substitute a fake.
pub trait ImageBuilder: Send + Sync {
    /// Build `req`, writing progress to `log`.
    fn build_image(
        &self,
        req: BuildRequest,
        log: Arc<dyn BuildLog>,
    ) -> BoxFuture<'_, Result<BuiltImage, BuildError>>;

    /// Delete the daemon's unused layer cache and `scope`'s unused cache mounts (never another
    /// scope's: with owner scopes they are that owner's); the bytes freed.
    fn prune<'a>(&'a self, scope: Option<&'a BuildScope>)
    -> BoxFuture<'a, Result<u64, BuildError>>;

    /// The daemon's version, or why it cannot be reached (health checks).
    fn version(&self) -> BoxFuture<'_, Result<String, BuildError>>;

    /// The daemon's address, as configured.
    fn addr(&self) -> &str;
}

/// A spawned task that is aborted when this handle is dropped, so that no background work of a
/// build outlives the build future.
#[derive(Debug)]
pub(crate) struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    pub(crate) fn new(handle: JoinHandle<T>) -> Self {
        Self(handle)
    }

    /// Wait for the task (it is aborted if this future is dropped).
    pub(crate) async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
