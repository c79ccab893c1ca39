//! `grpc.health.v1.Health` on the session tunnel.
//!
//! Not optional: buildkitd calls `Health/Check` every 5 s on every session and drops the session
//! after two failures, which fails any build longer than ~10 s with
//! `no active session for <id>: context deadline exceeded`.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::buildkit::proto::health::{
    Health, HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse,
    ServingStatus,
};

/// Always answers `SERVING`: the session lives exactly as long as the build that uses it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HealthService;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    async fn list(
        &self,
        _request: Request<HealthListRequest>,
    ) -> Result<Response<HealthListResponse>, Status> {
        Err(Status::unimplemented(
            "Health/List is not served on perfbox sessions",
        ))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "Health/Watch is not served on perfbox sessions",
        ))
    }
}
