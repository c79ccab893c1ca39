//! The BuildKit *session*: a tunnel through which the daemon calls services back on the client.
//!
//! `Control.Session` is a bidirectional stream of `BytesMessage`s carrying raw bytes. On it the
//! daemon runs an HTTP/2 gRPC **client** and we run an h2c **server** (hyper + tonic routes):
//!
//! ```text
//! daemon ──Control.Session(BytesMessage…)──► tunnel task ──duplex──► hyper h2 server
//!        ◄──────────BytesMessage…──────────             ◄──duplex───  (Health, FileSend, Auth,
//!                                                                      FileSync for a context)
//! ```
//!
//! The request metadata announces the session id and the methods we serve
//! (`x-docker-expose-session-*`); the solve names the session by id. The tunnel lives exactly as
//! long as the [`Session`] value: dropping it aborts the task, which closes the stream and tells
//! the daemon the session is gone.

pub(crate) mod auth;
pub(crate) mod filesend;
pub(crate) mod filesync;
pub(crate) mod health;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::service::Routes;
use tonic::transport::Channel;

use self::auth::{AuthService, RegistryCredentials};
use self::filesend::FileSendService;
use self::filesync::FileSyncService;
use self::health::HealthService;
use super::AbortOnDrop;
use super::export::ExportSink;
use super::proto::control::{BytesMessage, ControlClient};
use super::proto::filesync::{AuthServer, FileSendServer, FileSyncServer};
use super::proto::health::HealthServer;

/// Bytes buffered in each direction of the in-process pipe between tunnel and h2 server.
const PIPE_BUFFER: usize = 4 << 20;
/// Largest outbound tunnel message (our h2 frames towards the daemon are small).
const OUTBOUND_CHUNK: usize = 32 << 10;
/// DiffCopy messages are ≤ 3 MiB; leave room.
const MAX_MESSAGE: usize = 16 << 20;

/// Methods we always serve. The daemon only *checks* for FileSend/FileSync ones, and checks
/// case-insensitively; Health is called regardless, but listing it is accurate.
const METHODS: [&str; 2] = [
    "/moby.filesync.v1.FileSend/DiffCopy",
    "/grpc.health.v1.Health/Check",
];
const AUTH_METHODS: [&str; 4] = [
    "/moby.filesync.v1.Auth/Credentials",
    "/moby.filesync.v1.Auth/FetchToken",
    "/moby.filesync.v1.Auth/GetTokenAuthority",
    "/moby.filesync.v1.Auth/VerifyTokenAuthority",
];

/// A running session. Dropping it tears the tunnel down.
pub(crate) struct Session {
    id: String,
    _task: AbortOnDrop<()>,
    _end: tokio_util::sync::DropGuard,
}

impl Session {
    /// The id to put in `SolveRequest.session`.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Open `Control.Session` on `channel` and serve our services on it. Returns at once; the
    /// tunnel runs in a background task. Failures there surface as a failed solve (the daemon
    /// reports `no active session` or the transport error), so they are only traced here.
    pub(crate) fn start(
        channel: Channel,
        export: ExportSink,
        credentials: &RegistryCredentials,
        context: Option<std::path::PathBuf>,
    ) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let end = tokio_util::sync::CancellationToken::new();
        let mut routes = Routes::new(HealthServer::new(HealthService)).add_service(
            FileSendServer::new(FileSendService::new(export, end.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        );
        let mut methods: Vec<&str> = METHODS.to_vec();
        if !credentials.is_empty() {
            routes = routes.add_service(AuthServer::new(AuthService::new(credentials.clone())));
            methods.extend(AUTH_METHODS);
        }
        if let Some(dir) = context {
            routes = routes.add_service(FileSyncServer::new(FileSyncService::new(dir)));
            methods.push("/moby.filesync.v1.FileSync/DiffCopy");
        }
        let task = tokio::spawn(run_tunnel(channel, id.clone(), methods, routes));
        Self {
            id,
            _task: AbortOnDrop::new(task),
            _end: end.drop_guard(),
        }
    }
}

async fn run_tunnel(channel: Channel, id: String, methods: Vec<&'static str>, routes: Routes) {
    let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
    let (pipe_read, mut pipe_write) = tokio::io::split(ours);

    // Bytes our h2 server writes → BytesMessages to the daemon.
    let outbound = tokio_util::io::ReaderStream::with_capacity(pipe_read, OUTBOUND_CHUNK)
        .map_while(|chunk| chunk.ok())
        .map(|data| BytesMessage {
            data: data.to_vec(),
        });
    let mut request = tonic::Request::new(outbound);
    let md = request.metadata_mut();
    let static_headers = [
        ("x-docker-expose-session-uuid", id.as_str()),
        ("x-docker-expose-session-name", "perfbox"),
        ("x-docker-expose-session-sharedkey", "perfbox"),
    ];
    for (key, value) in static_headers {
        match MetadataValue::try_from(value) {
            Ok(v) => {
                md.insert(key, v);
            }
            Err(e) => tracing::warn!(%key, error = %e, "bad session header"),
        }
    }
    for method in methods {
        md.append(
            "x-docker-expose-session-grpc-method",
            MetadataValue::from_static(method),
        );
    }

    let server = async move {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .max_frame_size(1 << 20);
        let conn = builder.serve_connection(TokioIo::new(theirs), TowerToHyperService::new(routes));
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "session h2 server ended");
        }
    };

    let tunnel = async move {
        let mut control = ControlClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let response = match control.session(request).await {
            Ok(r) => r,
            Err(status) => {
                tracing::debug!(%status, "Control.Session refused");
                return;
            }
        };
        let mut inbound = response.into_inner();
        loop {
            match inbound.message().await {
                Ok(Some(msg)) => {
                    if pipe_write.write_all(&msg.data).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%status, "session stream ended with error");
                    break;
                }
            }
        }
        let _ = pipe_write.shutdown().await;
    };

    // Either side ending ends the session.
    tokio::select! {
        () = server => {}
        () = tunnel => {}
    }
}
