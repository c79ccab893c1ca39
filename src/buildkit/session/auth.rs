//! `moby.filesync.v1.Auth` on the session tunnel: registry credentials for the daemon.
//!
//! The daemon calls `Auth/Credentials{host}` only when a registry answers 401. Without any
//! configured credentials the service is not even registered, and tonic answers
//! `Unimplemented`, which BuildKit treats as anonymous access. `FetchToken` and the token
//! authority methods stay `Unimplemented`: the daemon then runs the token exchange itself with the
//! username/secret from `Credentials`. (Not exercised on the dev box: its mirror is anonymous.)

use std::collections::BTreeMap;
use std::fmt;

use tonic::{Request, Response, Status};

use crate::buildkit::proto::filesync::{
    Auth, CredentialsRequest, CredentialsResponse, FetchTokenRequest, FetchTokenResponse,
    GetTokenAuthorityRequest, GetTokenAuthorityResponse, VerifyTokenAuthorityRequest,
    VerifyTokenAuthorityResponse,
};

/// Registry credentials by registry host (as the daemon names it, e.g. `registry-1.docker.io`,
/// `ghcr.io`, `127.0.0.1:5000`). Secrets are never printed by `Debug`.
#[derive(Clone, Default)]
pub struct RegistryCredentials {
    by_host: BTreeMap<String, (String, String)>,
}

impl RegistryCredentials {
    /// No credentials: every pull is anonymous.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) the username and secret (password or token) for `host`.
    pub fn insert(
        &mut self,
        host: impl Into<String>,
        username: impl Into<String>,
        secret: impl Into<String>,
    ) -> &mut Self {
        self.by_host
            .insert(host.into(), (username.into(), secret.into()));
        self
    }

    /// Whether no host has credentials.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    fn lookup(&self, host: &str) -> Option<&(String, String)> {
        self.by_host.get(host).or_else(|| {
            // Docker's convention: credentials stored for docker.io apply to its registry host.
            (host == "registry-1.docker.io")
                .then(|| self.by_host.get("docker.io"))
                .flatten()
        })
    }
}

impl fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.by_host
                    .iter()
                    .map(|(h, (u, _))| (h, format!("{u}:<redacted>"))),
            )
            .finish()
    }
}

/// The Auth service for one session.
#[derive(Debug, Clone)]
pub(crate) struct AuthService {
    credentials: RegistryCredentials,
}

impl AuthService {
    pub(crate) fn new(credentials: RegistryCredentials) -> Self {
        Self { credentials }
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn credentials(
        &self,
        request: Request<CredentialsRequest>,
    ) -> Result<Response<CredentialsResponse>, Status> {
        let host = request.into_inner().host;
        // Unknown host: empty strings mean anonymous.
        let (username, secret) = self.credentials.lookup(&host).cloned().unwrap_or_default();
        Ok(Response::new(CredentialsResponse { username, secret }))
    }

    async fn fetch_token(
        &self,
        _request: Request<FetchTokenRequest>,
    ) -> Result<Response<FetchTokenResponse>, Status> {
        Err(Status::unimplemented(
            "perfbox does not fetch registry tokens",
        ))
    }

    async fn get_token_authority(
        &self,
        _request: Request<GetTokenAuthorityRequest>,
    ) -> Result<Response<GetTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("no token authority"))
    }

    async fn verify_token_authority(
        &self,
        _request: Request<VerifyTokenAuthorityRequest>,
    ) -> Result<Response<VerifyTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("no token authority"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_credentials_for_known_hosts_only() {
        let mut c = RegistryCredentials::new();
        c.insert("docker.io", "me", "s3cret");
        let svc = AuthService::new(c.clone());
        let r = svc
            .credentials(Request::new(CredentialsRequest {
                host: "registry-1.docker.io".into(),
            }))
            .await
            .expect("ok")
            .into_inner();
        assert_eq!((r.username.as_str(), r.secret.as_str()), ("me", "s3cret"));
        let r = svc
            .credentials(Request::new(CredentialsRequest {
                host: "ghcr.io".into(),
            }))
            .await
            .expect("ok")
            .into_inner();
        assert!(r.username.is_empty() && r.secret.is_empty());
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
