//! The API's listener: HTTP/1.1 over TCP, or over TLS whose certificate is read again on SIGHUP
//! (connections already open keep the one they started with); at most `max_connections` open at
//! once (the rest wait in the kernel's accept queue); a client that has not finished its TLS
//! handshake and request headers within `header_timeout` is cut off, and a request with a body
//! not answered within `request_timeout` (its body included) gets a 408. None of this touches a job: a job
//! exists once its submission was answered.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How the listener treats connections (from [`crate::config::HttpLimits`]).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// TLS handshake plus request headers.
    pub header_timeout: Duration,
    /// Request headers to the answer's start.
    pub request_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("TLS {what} {path}: {message}")]
    File {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refuses the pair (e.g. the key does not match the certificate).
    #[error("TLS certificate {cert} with key {key}: {message}")]
    Config {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls' reason.
        message: String,
    },
}

/// The server side of TLS from PEM files: the certificate chain (server certificate first) and
/// its private key; HTTP/1.1 offered by ALPN.
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let file_err = |what, path: &Path| {
        let path = path.to_owned();
        move |e: rustls_pki_types::pem::Error| TlsError::File {
            what,
            path,
            message: e.to_string(),
        }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(file_err("certificate", cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_err("certificate", cert))?;
    if chain.is_empty() {
        return Err(TlsError::File {
            what: "certificate",
            path: cert.to_owned(),
            message: "no CERTIFICATE block".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(file_err("key", key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config_err = |e: rustls::Error| TlsError::Config {
        cert: cert.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(config_err)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS configuration in force, replaced by [`TlsState::reload`].
pub struct TlsState {
    files: (PathBuf, PathBuf),
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsState {
    /// Load the files once (an error here stops the service from starting).
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(load_tls(cert, key)?),
            files: (cert.to_owned(), key.to_owned()),
        }))
    }

    /// Read the files again; on an error the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load_tls(&self.files.0, &self.files.1)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Serve `app` on `listener` until `shutdown` resolves; then stop accepting and give open
/// connections up to 5 s to finish (a `logs?follow=1` stream may never).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<TlsState>>,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = app.layer(axum::middleware::from_fn_with_state(
        opts.request_timeout,
        request_deadline,
    ));
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let header_timeout = opts.header_timeout;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors and the like: wait rather than spin.
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let tls = tls.as_ref().map(|t| t.current());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let result = match tls {
                None => {
                    let conn = http.serve_connection(TokioIo::new(stream), svc);
                    watcher.watch(conn).await
                }
                Some(config) => {
                    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
                    let stream = match tokio::time::timeout(header_timeout, accept).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = http.serve_connection(TokioIo::new(stream), svc);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("connections still open after 5 s were closed");
    }
    Ok(())
}

/// A 408 for a request with a body (POST, PUT, DELETE...) not answered within the deadline: the
/// client did not send its body in time. GET and HEAD carry none and are not limited here
/// (`?wait=` holds its answer on purpose; their handlers bound themselves).
async fn request_deadline(
    axum::extract::State(deadline): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if matches!(req.method(), &http::Method::GET | &http::Method::HEAD) {
        return next.run(req).await;
    }
    match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => super::ApiError::Timeout(format!(
            "the request was not complete within {} s",
            deadline.as_secs()
        ))
        .into_response(),
    }
}
