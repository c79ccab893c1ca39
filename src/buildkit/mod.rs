//! BuildKit client (gRPC control API and session protocol).
