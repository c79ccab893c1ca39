//! Connecting to buildkitd: a unix socket, or `tcp://` in plaintext (loopback) or with mutual
//! TLS. The connection is one tonic [`tonic::transport::Channel`], made lazily and re-made after the daemon
//! restarts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Endpoint, Uri};

use super::client::BuildkitClient;
use super::error::{BuildError, error_chain};
use super::session::auth::RegistryCredentials;

/// Connect timeout, and the bound on health checks: a dead daemon is reported within this.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// BuildKit's errors carry stacks and source maps in their trailers; tonic's default 16 KiB
/// header list turns a long one (e.g. a policy denial) into a bare "h2 protocol error".
const MAX_HEADER_LIST: u32 = 1 << 20;

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
            .map_err(|e| invalid(format!("TLS configuration for {addr}: {}", error_chain(&e))))?;
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
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
}
