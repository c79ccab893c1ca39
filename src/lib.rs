//! perfbox: receive a Dockerfile, build it with rootless BuildKit, run the image in a hardened
//! rootless OCI sandbox, and report the `perf` number the job writes to `/data/perf.json`.
//!
//! Data flows one way: `api` (HTTP) → `jobs` (state machine, store that is also the queue,
//! worker, pipeline) → `buildkit` (gRPC and session protocol) | `sandbox` (bundle, spec, runtime,
//! cgroups): the last two are siblings that never call each other.

pub mod api;
pub mod buildkit;
pub mod config;
pub mod image;
pub mod jobs;
pub mod sandbox;

pub use oci_spec;
