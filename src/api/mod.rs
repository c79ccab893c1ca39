//! The HTTP API (axum). HTTP only: handlers extract and validate input, call
//! [`JobService`](crate::jobs::JobService), and shape JSON; [`serve`] is the listener (TLS,
//! slow-client timeouts, connection cap). Routes (compatible with existing curl clients of the
//! older service):
//!
//! | route | what |
//! |---|---|
//! | `POST`/`PUT /job/build` | multipart field `file` = a Dockerfile and/or `context` = a tar, tar.gz or zip; optional `build_arg`, `target`, `dataset`, `callback_url`; header `Idempotency-Key` → 202 `{"id", "filename", "status", "links"}` (200 for a repeated key) |
//! | `GET /job/performance/{id}[?wait=N]` | `{"job", "status", "perf"}` / `{"job", "status", "info", "queue_position"}` / `{"job", "status", "error"}`; `wait` holds the answer until the job is final (at most N s) |
//! | `GET /jobs?limit=&before=&status=` | a page of jobs, newest first; `status` = comma-separated statuses or the groups `active`, `failed` |
//! | `GET /leaderboard?per=owner\|job&limit=` | succeeded jobs ranked by perf (`[leaderboard]` direction; ties share a rank): each owner's best, or every job |
//! | `GET /job/{id}` | the full record |
//! | `GET /job/{id}/logs[?follow=1]` | build log then run log, streamed live with follow |
//! | `GET /job/{id}/spec` | the OCI config.json the job ran with |
//! | `GET /job/{id}/audit` | every audit rule's verdict with its evidence (`ok` says whether all passed) |
//! | `GET /job/{id}/receipt` | the signed receipt of a finished job (409 before) |
//! | `GET /receipt-key` | the public key receipts are signed with (no token needed) |
//! | `DELETE /job/{id}` | cancel (on any node: the job's node is told through the store) |
//! | `GET /nodes` | the nodes working from this store: name, url, capacity, pid, heartbeat, `alive` |
//! | `GET /healthz`, `GET /metrics` | health (no token needed) and Prometheus metrics |
//! | `GET /`, `/board`, `/submit`, `/job/{id}/view` | the web page ([`web`]): the same data, same tokens |

mod error;
mod handlers;
mod logs;
pub mod serve;
#[cfg(test)]
mod tests;
pub mod web;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use error::ApiError;

use crate::jobs::JobService;

/// Multipart framing allowance on top of the Dockerfile size limit.
const MULTIPART_SLACK: usize = 64 * 1024;

/// The API router.
pub fn router(jobs: JobService) -> Router {
    let cfg = jobs.config();
    let body_limit = cfg.max_dockerfile_bytes
        + usize::try_from(cfg.context.max_archive_bytes).unwrap_or(usize::MAX / 2)
        + MULTIPART_SLACK;
    Router::new()
        .route("/job/build", post(handlers::submit).put(handlers::submit))
        .route("/job/performance/{id}", get(handlers::performance))
        .route("/jobs", get(handlers::list))
        .route("/job/{id}", get(handlers::record).delete(handlers::cancel))
        .route("/job/{id}/logs", get(logs::logs))
        .route("/job/{id}/spec", get(handlers::spec))
        .route("/job/{id}/audit", get(handlers::audit))
        .route("/job/{id}/receipt", get(handlers::receipt))
        .route("/receipt-key", get(handlers::receipt_key))
        .route("/nodes", get(handlers::nodes))
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .route("/leaderboard", get(handlers::leaderboard))
        .merge(web::routes())
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(jobs)
}
