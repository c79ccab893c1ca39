//! [`BuildkitClient`]: the connection to buildkitd (one tonic [`Channel`] shared by every call and
//! build), the health check, and the orchestration of one build (see the module docs of
//! [`crate::buildkit`] for the sequence of calls).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};

use super::definition::{self, DefinitionError};
use super::error::{self, BuildError};
use super::export;
use super::proto::control::{
    ControlClient, Exporter, InfoRequest, ListWorkersRequest, PruneRequest, SolveRequest,
    StatusRequest,
};
use super::proto::gateway::{self, GatewayResult, LlbBridgeClient, ReturnRequest};
use super::proto::{RpcStatus, pb};
use super::session::Session;
use super::session::auth::RegistryCredentials;
use super::status::{BuildLog, StatusSummary, StatusTracker};
use super::{AbortOnDrop, BuildRequest, BuiltImage, DaemonInfo, ImageBuilder, WorkerInfo};
use crate::image::ImageConfig;

/// Connect timeout, and the bound on health checks: a dead daemon is reported within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Large enough for status batches with logs and for the frontend's result.
const MAX_MESSAGE: usize = 64 << 20;
/// Metadata that routes LLBBridge calls to the build with this ref (gateway forwarder).
const BUILD_ID_HEADER: &str = "buildkit-controlapi-buildid";
/// How long to wait for the tail of a finished build (status stream end, error propagation).
const WIND_DOWN: Duration = Duration::from_secs(5);
/// BuildKit's errors carry stacks and source maps in their trailers; tonic's default 16 KiB
/// header list turns a long one (e.g. a policy denial) into a bare "h2 protocol error".
const MAX_HEADER_LIST: u32 = 1 << 20;

/// Client for one buildkitd. Cheap to clone; all clones share one HTTP/2 connection, which is
/// (re)established lazily, so the client survives daemon restarts.
#[derive(Clone)]
pub struct BuildkitClient {
    addr: Arc<str>,
    channel: Channel,
    credentials: Arc<RegistryCredentials>,
}

impl std::fmt::Debug for BuildkitClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildkitClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

enum Target {
    Unix(PathBuf),
    Tcp(String),
}

fn parse_addr(addr: &str) -> Result<Target, BuildError> {
    let invalid = |why: &str| BuildError::InvalidRequest {
        message: format!("bad buildkitd address {addr:?}: {why}"),
    };
    if let Some(path) = addr.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(invalid("unix:// needs an absolute path (unix:///run/...)"));
        }
        Ok(Target::Unix(PathBuf::from(path)))
    } else if addr.starts_with('/') {
        Ok(Target::Unix(PathBuf::from(addr)))
    } else if let Some(hostport) = addr.strip_prefix("tcp://") {
        let hostport = hostport.trim_end_matches('/');
        if hostport.is_empty() || !hostport.contains(':') {
            return Err(invalid("tcp:// needs host:port"));
        }
        Ok(Target::Tcp(hostport.to_owned()))
    } else {
        Err(invalid("expected unix:///path, /path or tcp://host:port"))
    }
}

/// TLS settings for a remote daemon (buildkitd `--tlscert/--tlskey/--tlscacert`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// PEM CA certificate that signed the daemon's certificate.
    pub ca_cert: PathBuf,
    /// PEM client certificate (when the daemon verifies clients).
    pub cert: Option<PathBuf>,
    /// PEM client key.
    pub key: Option<PathBuf>,
    /// Name to verify in the daemon's certificate (default: the address's host).
    pub server_name: Option<String>,
}

impl BuildkitClient {
    /// Prepare a client for `addr`: `unix:///path/buildkitd.sock`, `/path/buildkitd.sock` or
    /// `tcp://host:port` (plaintext h2c: loopback or a trusted network only; see
    /// [`Self::connect_tls`] for a remote daemon). Does not contact the daemon: the connection is made on first use and
    /// re-made after the daemon restarts; call [`Self::health`] to check it.
    pub async fn connect(addr: &str) -> Result<Self, BuildError> {
        let target = parse_addr(addr)?;
        let tune = |e: Endpoint| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .http2_max_header_list_size(MAX_HEADER_LIST)
                .tcp_nodelay(true)
        };
        let channel = match target {
            Target::Unix(path) => {
                // The URI is a placeholder; the connector decides where to connect.
                let endpoint = tune(Endpoint::from_static("http://buildkitd.local"));
                endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
            }
            Target::Tcp(hostport) => {
                let endpoint =
                    Endpoint::from_shared(format!("http://{hostport}")).map_err(|e| {
                        BuildError::InvalidRequest {
                            message: format!("bad buildkitd address {addr:?}: {e}"),
                        }
                    })?;
                tune(endpoint)
                    .tcp_keepalive(Some(Duration::from_secs(30)))
                    .connect_lazy()
            }
        };
        Ok(Self {
            addr: addr.into(),
            channel,
            credentials: Arc::new(RegistryCredentials::new()),
        })
    }

    /// Prepare a client for a remote daemon at `tcp://host:port` over TLS: the daemon's
    /// certificate is checked against `tls.ca_cert`, and `tls.cert`/`tls.key` are presented as
    /// the client identity when the daemon requires one (buildkitd `--tlscacert`). Lazy like
    /// [`Self::connect`].
    pub async fn connect_tls(addr: &str, tls: &TlsOptions) -> Result<Self, BuildError> {
        let invalid = |message: String| BuildError::InvalidRequest { message };
        let Target::Tcp(hostport) = parse_addr(addr)? else {
            return Err(invalid(format!(
                "TLS needs a tcp://host:port address, not {addr:?}"
            )));
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| invalid(format!("cannot read TLS file {}: {e}", p.display())))
        };
        let host = hostport
            .rsplit_once(':')
            .map_or(hostport.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(&tls.ca_cert)?))
            .domain_name(tls.server_name.clone().unwrap_or_else(|| host.to_owned()))
            // buildkitd v0.13's TLS listener does not offer ALPN; it speaks gRPC (HTTP/2) anyway.
            .assume_http2(true);
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    "a TLS client certificate needs both cert and key".into(),
                ));
            }
        }
        let endpoint = Endpoint::from_shared(format!("https://{hostport}"))
            .map_err(|e| invalid(format!("bad buildkitd address {addr:?}: {e}")))?
            .tls_config(config)
            .map_err(|e| {
                use std::error::Error as _;
                let mut msg = e.to_string();
                let mut source = e.source();
                while let Some(cause) = source {
                    msg = format!("{msg}: {cause}");
                    source = cause.source();
                }
                invalid(format!("TLS configuration for {addr}: {msg}"))
            })?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .http2_max_header_list_size(MAX_HEADER_LIST)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .connect_lazy();
        Ok(Self {
            addr: addr.into(),
            channel,
            credentials: Arc::new(RegistryCredentials::new()),
        })
    }

    /// Ask the daemon to delete every build-cache record nothing uses (BuildKit's own prune),
    /// e.g. the snapshot of a RUN step stopped for filling the disk. Returns the bytes freed.
    pub async fn prune(&self) -> Result<u64, BuildError> {
        let mut control = self.control();
        let call = control.prune(PruneRequest {
            all: true,
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

    /// Use `credentials` when a registry asks the daemon to authenticate (default: anonymous).
    pub fn with_registry_credentials(mut self, credentials: RegistryCredentials) -> Self {
        self.credentials = Arc::new(credentials);
        self
    }

    /// The address this client was created with.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn control(&self) -> ControlClient<Channel> {
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
    async fn info_version(&self) -> Result<String, BuildError> {
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
            r = self.run_build(req, log.clone()) => r.map_err(|e| e.locate_in(&dockerfile)),
        };
        if let Err(e) = &result {
            log.line(&format!("ERROR: {e}"));
        }
        result
    }

    async fn run_build(
        &self,
        req: BuildRequest,
        log: Arc<dyn BuildLog>,
    ) -> Result<BuiltImage, BuildError> {
        let started = Instant::now();
        let frontend_opt = frontend_options(&req)?;
        let def = definition::dockerfile_definition(&req.dockerfile)?;
        export::prepare_target(&req.rootfs_dir)?;
        self.info_version().await?;
        if let Some(directive) = syntax_directive(&String::from_utf8_lossy(&req.dockerfile)) {
            log.line(&format!(
                "perfbox: ignoring the directive `{directive}`: perfbox builds every Dockerfile with BuildKit's built-in Dockerfile frontend and never runs a frontend image"
            ));
        }

        let build_ref = format!("perfbox-{}", uuid::Uuid::new_v4().simple());
        let (sink, unpacker) = export::start(req.rootfs_dir.clone(), req.max_image_bytes);
        let session = Session::start(self.channel.clone(), sink, &self.credentials);

        let status_task = AbortOnDrop::new(tokio::spawn(stream_status(
            self.control(),
            build_ref.clone(),
            log.clone(),
        )));

        // The outer solve: no frontend, only the tar exporter. It stays open until the gateway
        // calls below Return a result (or an error), then exports and finishes.
        let mut control = self.control();
        let outer = SolveRequest {
            r#ref: build_ref.clone(),
            session: session.id().to_owned(),
            exporters: vec![Exporter {
                r#type: "tar".to_owned(),
                attrs: HashMap::new(),
            }],
            // Evaluated on the daemon for every source of this build, the frontend's included.
            source_policy: Some(req.source_policy.to_proto()),
            ..Default::default()
        };
        let mut outer_solve = pin!(control.solve(outer));

        let mut bridge = LlbBridgeClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let inner = gateway::SolveRequest {
            frontend: "dockerfile.v0".to_owned(),
            frontend_opt,
            frontend_inputs: HashMap::from([
                ("dockerfile".to_owned(), def.clone()),
                // The context is the same single-file tree (see `definition`): nothing on this
                // machine is ever exposed to the daemon.
                ("context".to_owned(), def),
            ]),
            allow_result_return: true,
            allow_result_array_ref: true,
            evaluate: true,
            ..Default::default()
        };
        let inner_request = with_build_id(inner, &build_ref)?;

        let frontend = tokio::select! {
            outer = &mut outer_solve => {
                // The outer solve cannot succeed before the frontend returned.
                return Err(match outer {
                    Err(status) => self.solve_error(&status),
                    Ok(_) => BuildError::Other {
                        message: "solve finished before the frontend returned".to_owned(),
                    },
                });
            }
            r = bridge.solve(inner_request) => r,
        };

        let result = match frontend {
            Ok(resp) => resp.into_inner().result.ok_or_else(|| BuildError::Other {
                message: "frontend returned no result".to_owned(),
            }),
            Err(status) if error::is_transport_error(&status) => Err(self.solve_error(&status)),
            Err(status) => {
                // Hand the error back so the outer solve ends with it, then report the frontend's
                // status (it carries the Dockerfile line and exit code details).
                let ret = ReturnRequest {
                    result: None,
                    error: Some(rpc_status(&status)),
                };
                if let Ok(r) = with_build_id(ret, &build_ref) {
                    let _ = tokio::time::timeout(WIND_DOWN, bridge.r#return(r)).await;
                }
                let _ = tokio::time::timeout(WIND_DOWN, &mut outer_solve).await;
                Err(error::classify(&status))
            }
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                drop(session);
                let _ = tokio::time::timeout(WIND_DOWN, status_task.join()).await;
                return Err(e);
            }
        };

        let (config, config_digest) = image_config(&result)?;
        check_result_defs(&result)?;
        let rootfs_key = rootfs_key(&result);
        if let (Some(key), Some(filter)) = (&rootfs_key, &req.skip_export)
            && (filter.0)(key)
        {
            // The caller already has this filesystem: end the build without exporting it.
            let ret = with_build_id(
                ReturnRequest {
                    result: None,
                    error: Some(RpcStatus {
                        code: tonic::Code::Cancelled as i32,
                        message: "perfbox: root filesystem already cached; export skipped"
                            .to_owned(),
                        details: vec![],
                    }),
                },
                &build_ref,
            )?;
            let _ = tokio::time::timeout(WIND_DOWN, bridge.r#return(ret)).await;
            let _ = tokio::time::timeout(WIND_DOWN, &mut outer_solve).await;
            drop(session);
            let summary = match tokio::time::timeout(WIND_DOWN, status_task.join()).await {
                Ok(Ok(s)) => s,
                _ => StatusSummary::default(),
            };
            log.line(&format!(
                "perfbox: root filesystem {key} is already cached; export skipped"
            ));
            return Ok(BuiltImage {
                rootfs: req.rootfs_dir,
                config,
                config_digest,
                cached_steps: summary.cached_steps,
                total_steps: summary.total_steps,
                export_bytes: 0,
                export_duration: Duration::ZERO,
                duration: started.elapsed(),
                rootfs_key,
                exported: false,
            });
        }
        let ret = with_build_id(
            ReturnRequest {
                result: Some(result),
                error: None,
            },
            &build_ref,
        )?;
        if let Err(status) = bridge.r#return(ret).await {
            return Err(self.solve_error(&status));
        }

        let outer = outer_solve.await;
        // The daemon answers only after our DiffCopy handler returned, so the export is complete
        // (or failed) by now; the session is no longer needed.
        drop(session);
        let export = tokio::time::timeout(WIND_DOWN, unpacker.finish()).await;
        if let Err(status) = outer {
            if error::is_transport_error(&status) {
                return Err(self.solve_error(&status));
            }
            // If our unpacker failed, the daemon only saw an aborted DiffCopy: report the cause.
            if let Ok(Err(e)) = export
                && !matches!(e, super::ExportError::NothingReceived)
            {
                return Err(e.into());
            }
            return Err(error::classify(&status));
        }
        let export =
            export.map_err(|_| super::ExportError::Task("unpacker did not finish".into()))??;

        log.line(&format!(
            "unpacked {} entries ({:.1} MB) into {} in {:.2}s, skipped {} device nodes/FIFOs",
            export.stats.entries,
            export.bytes as f64 / 1e6,
            req.rootfs_dir.display(),
            export.duration.as_secs_f64(),
            export.stats.skipped_special,
        ));
        let summary = match tokio::time::timeout(WIND_DOWN, status_task.join()).await {
            Ok(Ok(s)) => s,
            _ => StatusSummary::default(),
        };
        Ok(BuiltImage {
            rootfs: req.rootfs_dir,
            config,
            config_digest,
            cached_steps: summary.cached_steps,
            total_steps: summary.total_steps,
            export_bytes: export.bytes,
            export_duration: export.duration,
            duration: started.elapsed(),
            rootfs_key,
            exported: true,
        })
    }

    /// Map a failed solve call: a broken connection mid-build is `DaemonLost`.
    fn solve_error(&self, status: &tonic::Status) -> BuildError {
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

    fn prune(&self) -> BoxFuture<'_, Result<u64, BuildError>> {
        Box::pin(BuildkitClient::prune(self))
    }

    fn version(&self) -> BoxFuture<'_, Result<String, BuildError>> {
        Box::pin(async move { self.health().await.map(|info| info.version) })
    }

    fn addr(&self) -> &str {
        BuildkitClient::addr(self)
    }
}

/// The `dockerfile.v0` options for `req`.
///
/// Options perfbox always sets, after the caller's build args so that none can override them:
/// - `force-network-mode` (none unless the caller chose the isolated network);
/// - `cmdline` (present, empty): the frontend then ignores `# syntax=` and `BUILDKIT_SYNTAX`
///   instead of running the named frontend image (which could reach the host's network);
/// - with a scope: `build-arg:BUILDKIT_CACHE_MOUNT_NS` and `hostname` (see [`BuildScope`]);
/// - with a cgroup parent: `cgroup-parent`.
///
/// Build args named `BUILDKIT_*` (any case) are refused: they are BuildKit's own knobs
/// (cache-mount namespace, syntax, hostname...), not the Dockerfile's.
fn frontend_options(req: &BuildRequest) -> Result<HashMap<String, String>, BuildError> {
    let invalid = |message: String| BuildError::InvalidRequest { message };
    let mut opts = HashMap::new();
    for (name, value) in &req.build_args {
        super::check_build_arg_name(name).map_err(invalid)?;
        opts.insert(format!("build-arg:{name}"), value.clone());
    }
    if let Some(target) = &req.target {
        if target.is_empty() || target.chars().any(char::is_whitespace) {
            return Err(invalid(format!("bad target {target:?}")));
        }
        opts.insert("target".to_owned(), target.clone());
    }
    if let Some(platform) = &req.platform {
        if platform.is_empty() || platform.contains(',') {
            return Err(invalid(format!(
                "bad platform {platform:?} (exactly one platform, e.g. linux/amd64)"
            )));
        }
        opts.insert("platform".to_owned(), platform.clone());
    }
    if req.no_cache {
        opts.insert("no-cache".to_owned(), String::new());
    }
    if req.dockerfile.is_empty() {
        return Err(invalid("empty Dockerfile".to_owned()));
    }
    opts.insert(
        "force-network-mode".to_owned(),
        req.network.as_frontend_value().to_owned(),
    );
    opts.insert("cmdline".to_owned(), String::new());
    if let Some(scope) = &req.scope {
        opts.insert(
            "build-arg:BUILDKIT_CACHE_MOUNT_NS".to_owned(),
            scope.as_str().to_owned(),
        );
        opts.insert("hostname".to_owned(), scope.as_str().to_owned());
    }
    if let Some(parent) = &req.cgroup_parent {
        let ok = !parent.is_empty()
            && parent.split('/').all(|c| {
                !c.is_empty() && c != "." && c != ".." && !c.contains(char::is_whitespace)
            });
        if !ok {
            return Err(invalid(format!("bad cgroup parent {parent:?}")));
        }
        opts.insert("cgroup-parent".to_owned(), parent.clone());
    }
    Ok(opts)
}

/// The `# syntax=…` (or `// syntax=…`) directive of a Dockerfile, as written, if it has one:
/// directives are the comment lines at the very top (after an optional `#!` line) of the form
/// `# key=value`, keys case-insensitive (BuildKit's `DetectSyntax`).
fn syntax_directive(dockerfile: &str) -> Option<String> {
    for (i, line) in dockerfile.lines().enumerate() {
        let t = line.trim();
        if i == 0 && t.starts_with("#!") {
            continue;
        }
        let body = t.strip_prefix('#').or_else(|| t.strip_prefix("//"))?;
        let (key, value) = body.split_once('=')?;
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return None; // an ordinary comment ends the directives
        }
        if key.eq_ignore_ascii_case("syntax") && !value.trim().is_empty() {
            return Some(t.to_owned());
        }
    }
    None
}

fn with_build_id<T>(msg: T, build_ref: &str) -> Result<tonic::Request<T>, BuildError> {
    let mut request = tonic::Request::new(msg);
    let value = MetadataValue::try_from(build_ref).map_err(|e| BuildError::Other {
        message: format!("build ref {build_ref:?} is not a valid header: {e}"),
    })?;
    request.metadata_mut().insert(BUILD_ID_HEADER, value);
    Ok(request)
}

/// The image config from the frontend result's metadata (`containerimage.config`, or
/// `containerimage.config/<platform>` for a platform-keyed result).
fn image_config(result: &GatewayResult) -> Result<(ImageConfig, Option<String>), BuildError> {
    let raw = result.metadata.get("containerimage.config").or_else(|| {
        let mut keyed: BTreeMap<&String, &Vec<u8>> = result
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("containerimage.config/"))
            .collect();
        keyed.pop_first().map(|(_, v)| v)
    });
    let Some(raw) = raw else {
        return Err(BuildError::Other {
            message: "frontend result has no containerimage.config".to_owned(),
        });
    };
    let config = ImageConfig::from_image_config_json(raw).map_err(|e| BuildError::Other {
        message: format!("cannot parse the image config returned by the frontend: {e}"),
    })?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(raw)));
    Ok((config, Some(digest)))
}

/// `llb-` + sha256 over the ops of the result's definition (length-prefixed, in order): the
/// identity of the root filesystem, independent of the image config (CMD, ENV...) and of op
/// metadata such as progress names.
fn rootfs_key(result: &GatewayResult) -> Option<String> {
    use super::proto::gateway_result::Kind;
    let def = match &result.result {
        Some(Kind::Ref(r)) => r.def.as_ref()?,
        _ => return None,
    };
    let mut h = Sha256::new();
    for op in &def.def {
        h.update((op.len() as u64).to_le_bytes());
        h.update(op);
    }
    Some(format!("llb-{}", hex::encode(h.finalize())))
}

/// The result we hand back in `Return` contains Definitions (the daemon's own); they are
/// validated like ours before being sent.
fn check_result_defs(result: &GatewayResult) -> Result<(), DefinitionError> {
    use super::proto::gateway_result::Kind;
    let defs: Vec<&pb::Definition> = match &result.result {
        Some(Kind::Ref(r)) => r.def.iter().collect(),
        Some(Kind::Refs(m)) => m.refs.values().filter_map(|r| r.def.as_ref()).collect(),
        _ => Vec::new(),
    };
    defs.into_iter().try_for_each(definition::validate)
}

/// A `google.rpc.Status` equivalent of `status` (code, message, decoded details).
fn rpc_status(status: &tonic::Status) -> RpcStatus {
    let details = RpcStatus::decode(status.details())
        .map(|s| s.details)
        .unwrap_or_default();
    RpcStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details,
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
    use std::error::Error as _;
    let mut out = status.message().to_owned();
    let mut source = status.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Follow `Control.Status` for `build_ref` until the build ends, writing log lines.
async fn stream_status(
    mut control: ControlClient<Channel>,
    build_ref: String,
    log: Arc<dyn BuildLog>,
) -> StatusSummary {
    let mut tracker = StatusTracker::new(log);
    match control.status(StatusRequest { r#ref: build_ref }).await {
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(update)) => tracker.apply(&update),
                    Ok(None) => break,
                    Err(status) => {
                        tracker.note(&format!("status stream ended: {}", status.message()));
                        break;
                    }
                }
            }
        }
        Err(status) => tracker.note(&format!("status unavailable: {}", status.message())),
    }
    tracker.finish()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::BuildNetwork;
    use super::*;

    #[test]
    fn parses_addresses() {
        assert!(
            matches!(parse_addr("unix:///run/b.sock"), Ok(Target::Unix(p)) if p == Path::new("/run/b.sock"))
        );
        assert!(matches!(parse_addr("/run/b.sock"), Ok(Target::Unix(_))));
        assert!(
            matches!(parse_addr("tcp://127.0.0.1:1234"), Ok(Target::Tcp(h)) if h == "127.0.0.1:1234")
        );
        assert!(parse_addr("unix://relative.sock").is_err());
        assert!(parse_addr("tcp://nohost").is_err());
        assert!(parse_addr("http://x:1").is_err());
    }

    #[test]
    fn frontend_options_defaults_to_no_network_and_no_syntax_forwarding() {
        let req = BuildRequest::new("FROM busybox\n", "/tmp/x");
        let opts = frontend_options(&req).expect("valid");
        assert_eq!(
            opts.get("force-network-mode").map(String::as_str),
            Some("none")
        );
        assert_eq!(opts.get("cmdline").map(String::as_str), Some(""));
        assert_eq!(opts.len(), 2);
    }

    #[test]
    fn scope_and_cgroup_become_options_no_user_arg_overrides() {
        let mut req = BuildRequest::new("FROM busybox\n", "/tmp/x");
        req.scope = Some(super::super::BuildScope::new("job-7").unwrap());
        req.cgroup_parent = Some("perfbox-build/runs/job-7".into());
        let opts = frontend_options(&req).expect("valid");
        assert_eq!(opts["build-arg:BUILDKIT_CACHE_MOUNT_NS"], "job-7");
        assert_eq!(opts["hostname"], "job-7");
        assert_eq!(opts["cgroup-parent"], "perfbox-build/runs/job-7");
        for knob in [
            "BUILDKIT_CACHE_MOUNT_NS",
            "buildkit_syntax",
            "BuildKit_Sandbox_Hostname",
        ] {
            let mut r = req.clone();
            r.build_args.insert(knob.into(), "x".into());
            let e = frontend_options(&r).expect_err(knob);
            assert!(e.to_string().contains("BUILDKIT_"), "{e}");
        }
        for bad in ["", "/abs", "a/../b", "a//b", "a b"] {
            let mut r = req.clone();
            r.cgroup_parent = Some(bad.into());
            assert!(frontend_options(&r).is_err(), "{bad:?}");
        }
        assert!(super::super::BuildScope::new("a/b").is_err());
        assert!(super::super::BuildScope::new("").is_err());
    }

    #[test]
    fn syntax_directives_are_found_like_buildkit_does() {
        assert_eq!(
            syntax_directive("# syntax=docker/dockerfile:1\nFROM x\n").as_deref(),
            Some("# syntax=docker/dockerfile:1")
        );
        assert_eq!(
            syntax_directive("#!/bin/false\n# SYNTAX = docker/dockerfile:1.7-labs\nFROM x\n")
                .as_deref(),
            Some("# SYNTAX = docker/dockerfile:1.7-labs")
        );
        assert_eq!(
            syntax_directive("# escape=`\n//syntax=x\nFROM x\n").as_deref(),
            Some("//syntax=x")
        );
        assert_eq!(syntax_directive("FROM x\n# syntax=y\n"), None);
        assert_eq!(syntax_directive("# a comment\n# syntax=y\nFROM x\n"), None);
        assert_eq!(syntax_directive("FROM x\n"), None);
    }

    #[test]
    fn frontend_options_pass_through() {
        let mut req = BuildRequest::new("FROM busybox\n", "/tmp/x");
        req.build_args.insert("A".into(), "1".into());
        req.target = Some("build".into());
        req.platform = Some("linux/amd64".into());
        req.network = BuildNetwork::Sandbox;
        req.no_cache = true;
        let opts = frontend_options(&req).expect("valid");
        assert_eq!(opts["build-arg:A"], "1");
        assert_eq!(opts["target"], "build");
        assert_eq!(opts["platform"], "linux/amd64");
        assert_eq!(opts["force-network-mode"], "sandbox");
        assert_eq!(opts["no-cache"], "");
        req.build_args
            .insert("BUILDKIT_CACHE_MOUNT_NS".into(), "x".into());
        assert!(frontend_options(&req).is_err());
        req.build_args.remove("BUILDKIT_CACHE_MOUNT_NS");

        req.platform = Some("linux/amd64,linux/arm64".into());
        assert!(frontend_options(&req).is_err());
        req.platform = None;
        req.build_args.insert("B=C".into(), "1".into());
        assert!(frontend_options(&req).is_err());
    }

    #[test]
    fn config_is_read_from_result_metadata() {
        let json = br#"{"config":{"Cmd":["cat","/built"],"User":"1000"}}"#;
        let result = GatewayResult {
            metadata: HashMap::from([("containerimage.config".to_owned(), json.to_vec())]),
            ..Default::default()
        };
        let (config, digest) = image_config(&result).expect("config");
        assert_eq!(
            config.cmd,
            Some(vec!["cat".to_owned(), "/built".to_owned()])
        );
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert!(digest.expect("digest").starts_with("sha256:"));

        let keyed = GatewayResult {
            metadata: HashMap::from([(
                "containerimage.config/linux/amd64".to_owned(),
                json.to_vec(),
            )]),
            ..Default::default()
        };
        assert!(image_config(&keyed).is_ok());
        assert!(image_config(&GatewayResult::default()).is_err());
    }
}
