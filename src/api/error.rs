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

impl ApiError {
    /// The status, the message a client is shown, and `Retry-After` (seconds) if any. A 500's
    /// message is logged here and replaced by a generic one.
    pub fn into_parts(self) -> (StatusCode, String, Option<u64>) {
        match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m, None),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m, None),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m, None),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m, None),
            ApiError::Timeout(m) => (StatusCode::REQUEST_TIMEOUT, m, None),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m, None),
            ApiError::TooMany {
                message,
                retry_after_secs,
            } => (StatusCode::TOO_MANY_REQUESTS, message, retry_after_secs),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m, None),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the service log".to_string(),
                    None,
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message, retry_after) = self.into_parts();
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
