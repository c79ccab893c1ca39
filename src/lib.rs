//! perfbox: receive a Dockerfile, build it with rootless BuildKit, run the image in a hardened
//! rootless OCI sandbox, and report the `perf` number the job writes to `/data/perf.json`.
//!
//! Data flows one way: `api` (HTTP) → `jobs` (state machine, store, queue) → `buildkit` (gRPC and
//! session protocol) → `sandbox` (bundle, spec, runtime).

pub mod api;
pub mod buildkit;
pub mod config;
pub mod image;
pub mod jobs;
pub mod sandbox;

pub use oci_spec;
