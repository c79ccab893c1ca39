//! The generated BuildKit protocol types (from `bollard-buildkit-proto`), re-exported under short
//! names. This is the only file in perfbox that names that crate: everything else goes through
//! `buildkit::proto`, so a change of proto source touches one place.

pub(crate) use bollard_buildkit_proto::google::protobuf::Any;
#[cfg(test)]
pub(crate) use bollard_buildkit_proto::google::protobuf::Timestamp;
pub(crate) use bollard_buildkit_proto::google::rpc::Status as RpcStatus;
pub(crate) use bollard_buildkit_proto::pb;

/// `moby.buildkit.v1` (the Control service: Solve, Status, Session, ListWorkers, Info).
pub(crate) mod control {
    pub(crate) use bollard_buildkit_proto::moby::buildkit::v1::control_client::ControlClient;
    pub(crate) use bollard_buildkit_proto::moby::buildkit::v1::{
        BytesMessage, DiskUsageRequest, Exporter, InfoRequest, ListWorkersRequest, PruneRequest,
        SolveRequest, SolveResponse, StatusRequest, StatusResponse, UsageRecord,
    };
    #[cfg(test)]
    pub(crate) use bollard_buildkit_proto::moby::buildkit::v1::{Vertex, VertexLog};
}

/// `moby.buildkit.v1.sourcepolicy` (the policy a solve carries: which sources may be fetched).
pub(crate) mod sourcepolicy {
    pub(crate) use bollard_buildkit_proto::moby::buildkit::v1::sourcepolicy::{
        MatchType, Policy, PolicyAction, Rule, Selector, Update,
    };
}

/// `moby.buildkit.v1.frontend` (the LLBBridge gateway API, reached through the Control socket's
/// gateway forwarder).
pub(crate) mod gateway {
    pub(crate) use bollard_buildkit_proto::moby::buildkit::v1::frontend::llb_bridge_client::LlbBridgeClient;
    pub(crate) use bollard_buildkit_proto::moby::buildkit::v1::frontend::{
        Result as GatewayResult, ReturnRequest, SolveRequest,
    };
}

/// The oneof of a gateway `Result` (`Ref`, `Refs`, ...).
pub(crate) mod gateway_result {
    pub(crate) use bollard_buildkit_proto::moby::buildkit::v1::frontend::result::Result as Kind;
}

/// `moby.filesync.v1` (FileSend for exports, Auth for registry credentials): services the
/// *client* serves on the session tunnel.
pub(crate) mod filesync {
    pub(crate) use bollard_buildkit_proto::moby::filesync::v1::auth_server::{Auth, AuthServer};
    pub(crate) use bollard_buildkit_proto::moby::filesync::v1::file_send_server::{
        FileSend, FileSendServer,
    };
    pub(crate) use bollard_buildkit_proto::moby::filesync::v1::file_sync_server::{
        FileSync, FileSyncServer,
    };
    pub(crate) use bollard_buildkit_proto::moby::filesync::v1::{
        BytesMessage, CredentialsRequest, CredentialsResponse, FetchTokenRequest,
        FetchTokenResponse, GetTokenAuthorityRequest, GetTokenAuthorityResponse,
        VerifyTokenAuthorityRequest, VerifyTokenAuthorityResponse,
    };
}

/// `fsutil.types` (the packets of a FileSync DiffCopy: one Stat per entry, then file data).
pub(crate) mod fsutil {
    pub(crate) use bollard_buildkit_proto::fsutil::types::packet::PacketType;
    pub(crate) use bollard_buildkit_proto::fsutil::types::{Packet, Stat};
}

/// `grpc.health.v1`, which the daemon polls on the session every 5 s.
pub(crate) mod health {
    pub(crate) use bollard_buildkit_proto::health::health_check_response::ServingStatus;
    pub(crate) use bollard_buildkit_proto::health::health_server::{Health, HealthServer};
    pub(crate) use bollard_buildkit_proto::health::{
        HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse,
    };
}
