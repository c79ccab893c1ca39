//! `ApiError`: the only place where HTTP statuses are chosen. Every error body is
//! `{"error": "<message>"}`; server-side failures are logged and answered with a generic 500.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::jobs::{JobError, StoreError};

/// An error answered to an HTTP client.
#[derive(Debug)]
pub enum ApiError {
    /// 400 with a message.
    BadRequest(String),
    /// 401.
    Unauthorized(String),
    /// 404.
    NotFound(String),
    /// 409.
    Conflict(String),
    /// 408: the request did not arrive (or get its answer started) in time.
    Timeout(String),
    /// 413.
    TooLarge(String),
    /// 429 with `Retry-After` (seconds) when known: a quota was hit.
    TooMany {
        /// Which quota, and how to get under it.
        message: String,
        /// When trying again may succeed.
        retry_after_secs: Option<u64>,
    },
    /// 503.
    Unavailable(String),
    /// 500 (message logged, not shown).
    Internal(String),
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::InvalidDockerfile(m) | JobError::InvalidRequest(m) => ApiError::BadRequest(m),
            e @ JobError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            e @ JobError::QueueFull(_) => ApiError::Unavailable(e.to_string()),
            e @ JobError::OwnerQueueFull { .. } => ApiError::TooMany {
                message: e.to_string(),
                retry_after_secs: None,
            },
            e @ JobError::RateLimited {
                retry_after_secs, ..
            } => ApiError::TooMany {
                message: e.to_string(),
                retry_after_secs: Some(retry_after_secs),
            },
            e @ (JobError::NotFound(_) | JobError::NoSpec(_)) => ApiError::NotFound(e.to_string()),
            e @ (JobError::Finished { .. }
            | JobError::NotFinished { .. }
            | JobError::IdempotencyMismatch { .. }) => ApiError::Conflict(e.to_string()),
            JobError::Store(StoreError::NotFound(id)) => ApiError::NotFound(format!("no job {id}")),
            e @ JobError::Store(StoreError::IncorrectStatus { .. }) => {
                ApiError::Conflict(e.to_string())
            }
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match &self {
            ApiError::TooMany {
                retry_after_secs, ..
            } => *retry_after_secs,
            _ => None,
        };
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Timeout(m) => (StatusCode::REQUEST_TIMEOUT, m),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            ApiError::TooMany { message, .. } => (StatusCode::TOO_MANY_REQUESTS, message),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the service log".to_string(),
                )
            }
        };
        let mut resp = (status, Json(serde_json::json!({ "error": message }))).into_response();
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
