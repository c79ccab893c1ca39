//! Request handlers: thin translations between HTTP and [`JobService`].

use axum::Json;
use axum::extract::{FromRequestParts, Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::jobs::{BuildOptions, JobId, JobRecord, JobService, JobStatus, Owner};

/// The caller, from the `Authorization: Bearer` header (None when tokens are off).
pub struct Caller(pub Owner);

impl FromRequestParts<JobService> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, jobs: &JobService) -> Result<Self, ApiError> {
        Ok(Caller(
            Submitter::from_request_parts(parts, jobs).await?.owner,
        ))
    }
}

/// The caller, and whose share of build slots a submission takes: the token's name, or without
/// tokens the client's address (`addr:<ip>`).
pub struct Submitter {
    /// The token's name (None when tokens are off).
    pub owner: Owner,
    /// The name the build queue counts.
    pub name: String,
}

impl FromRequestParts<JobService> for Submitter {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, jobs: &JobService) -> Result<Self, ApiError> {
        let tokens = &jobs.config().tokens;
        if tokens.is_empty() {
            let name = parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map_or_else(|| "anonymous".to_owned(), |c| format!("addr:{}", c.0.ip()));
            return Ok(Submitter { owner: None, name });
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| {
                ApiError::Unauthorized("missing Authorization: Bearer <token>".into())
            })?;
        let presented = header.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::Unauthorized("Authorization must be: Bearer <token>".into())
        })?;
        // Tokens are compared as SHA-256 digests (the config keeps only those), each one in
        // constant time and all of them every time.
        let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let mut found = None;
        for t in tokens {
            if t.digest().is_some_and(|d| constant_time_eq(&d, &presented)) {
                found = Some(t);
            }
        }
        found
            .map(|t| Submitter {
                owner: Some(t.name.clone()),
                name: t.name.clone(),
            })
            .ok_or_else(|| ApiError::Unauthorized("invalid token".into()))
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A job id from the path.
pub fn parse_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse::<JobId>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            ApiError::BadRequest(format!("job id must be a positive integer, got {raw:?}"))
        })
}

fn links(id: JobId) -> Value {
    json!({
        "performance": format!("/job/performance/{id}"),
        "job": format!("/job/{id}"),
        "logs": format!("/job/{id}/logs"),
        "spec": format!("/job/{id}/spec"),
        "audit": format!("/job/{id}/audit"),
        "receipt": format!("/job/{id}/receipt"),
        "cancel": format!("/job/{id}"),
    })
}

/// `POST|PUT /job/build`: multipart field `file` holding a Dockerfile; optional fields
/// `build_arg` (`NAME=value`, repeatable) and `target`.
pub async fn submit(
    State(jobs): State<JobService>,
    who: Submitter,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected a multipart/form-data upload with a field named \"file\": {e}"
        ))
    })?;
    let max = jobs.config().max_dockerfile_bytes;
    let mut upload: Option<(String, Vec<u8>)> = None;
    let mut other_fields = vec![];
    let mut options = BuildOptions::default();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e, max)),
        };
        let name = field.name().unwrap_or("").to_string();
        if name == "build_arg" || name == "target" {
            let text = field.text().await.map_err(|e| multipart_error(e, max))?;
            if name == "target" {
                options.target = Some(text);
                continue;
            }
            let (arg, value) = text.split_once('=').ok_or_else(|| {
                ApiError::BadRequest(format!("build_arg must be NAME=value, got {text:?}"))
            })?;
            options.build_args.insert(arg.to_owned(), value.to_owned());
            continue;
        }
        if name != "file" {
            other_fields.push(name);
            continue;
        }
        if upload.is_some() {
            return Err(ApiError::BadRequest(
                "send exactly one field named \"file\"".into(),
            ));
        }
        let filename = field.file_name().unwrap_or("Dockerfile").to_string();
        let bytes = field.bytes().await.map_err(|e| multipart_error(e, max))?;
        upload = Some((filename, bytes.to_vec()));
    }
    let (filename, bytes) = upload.ok_or_else(|| {
        let seen = if other_fields.is_empty() {
            "no fields".to_string()
        } else {
            format!("fields {other_fields:?}")
        };
        ApiError::BadRequest(format!(
            "no multipart field named \"file\" (got {seen}); use: curl -F file=@job.Dockerfile"
        ))
    })?;
    if !other_fields.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "unknown multipart fields {other_fields:?}: send \"file\" (the Dockerfile) and optionally \"build_arg\" (NAME=value, repeatable) and \"target\""
        )));
    }
    let rec = jobs.submit(&filename, &bytes, who.owner, &who.name, &options)?;
    let body = json!({
        "id": rec.id,
        "filename": rec.filename,
        "status": rec.status,
        "links": links(rec.id),
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn multipart_error(e: axum::extract::multipart::MultipartError, max: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!(
            "upload too large: the Dockerfile limit is {max} bytes"
        ))
    } else {
        ApiError::BadRequest(format!("malformed multipart upload: {}", e.body_text()))
    }
}

/// `GET /job/performance/{id}`.
pub async fn performance(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw)?;
    let rec = jobs.get(id, &owner)?;
    Ok(Json(match rec.status {
        JobStatus::Succeeded => json!({ "job": id, "status": rec.status, "perf": rec.perf }),
        JobStatus::Queued => json!({
            "job": id, "status": rec.status, "info": rec.status.info(),
            "queue_position": jobs.queue_position(id)?,
        }),
        s if !s.is_terminal() => json!({ "job": id, "status": s, "info": s.info() }),
        s => json!({ "job": id, "status": s, "error": rec.error.unwrap_or_else(|| s.to_string()) }),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    before: Option<JobId>,
}

/// `GET /jobs?limit=50&before=<id>`.
pub async fn list(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::BadRequest(format!("bad query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let (page, total) = jobs.list(&owner, q.before, limit)?;
    let next = (page.len() == limit)
        .then(|| {
            page.last()
                .map(|j| format!("/jobs?limit={limit}&before={}", j.id))
        })
        .flatten();
    Ok(Json(json!({ "jobs": page, "total": total, "next": next })))
}

fn full_record(jobs: &JobService, rec: JobRecord) -> Result<Value, ApiError> {
    let mut v = serde_json::to_value(&rec).map_err(|e| ApiError::Internal(e.to_string()))?;
    if rec.status == JobStatus::Queued {
        v["queue_position"] = json!(jobs.queue_position(rec.id)?);
    }
    v["links"] = links(rec.id);
    Ok(v)
}

/// `GET /job/{id}`.
pub async fn record(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let rec = jobs.get(parse_id(&raw)?, &owner)?;
    Ok(Json(full_record(&jobs, rec)?))
}

/// `DELETE /job/{id}`.
pub async fn cancel(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let rec = jobs.cancel(parse_id(&raw)?, &owner).await?;
    Ok(Json(full_record(&jobs, rec)?))
}

/// `GET /job/{id}/spec`.
pub async fn spec(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(jobs.spec(parse_id(&raw)?, &owner)?))
}

/// `GET /job/{id}/audit`: every audit rule's verdict (200 whether it passes or not: `ok` says).
pub async fn audit(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    Path(raw): Path<String>,
) -> Result<Json<crate::jobs::audit::JobAudit>, ApiError> {
    Ok(Json(jobs.audit(parse_id(&raw)?, &owner)?))
}

/// `GET /job/{id}/receipt`: the signed receipt of a finished job (409 before it finishes).
pub async fn receipt(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(jobs.receipt(parse_id(&raw)?, &owner)?))
}

/// `GET /receipt-key` (no token needed): the public key receipts are signed with.
pub async fn receipt_key(State(jobs): State<JobService>) -> Json<Value> {
    Json(jobs.receipt_key())
}

/// `GET /healthz` (no token needed).
pub async fn healthz(State(jobs): State<JobService>) -> Response {
    let h = jobs.health().await;
    let status = if h.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
}

/// `GET /nodes`: every node that registered with this store; `alive` = heartbeat within two
/// leases (by this node's clock).
pub async fn nodes(
    State(jobs): State<JobService>,
    Caller(_): Caller,
) -> Result<Response, ApiError> {
    let (me, lease) = jobs.node();
    let now = crate::jobs::store::now();
    let nodes: Vec<serde_json::Value> = jobs
        .nodes()?
        .into_iter()
        .map(|n| {
            let alive = now - n.heartbeat_at < 2.0 * lease.as_secs_f64();
            let this = n.name == me;
            let mut v = serde_json::to_value(n).unwrap_or_default();
            v["alive"] = alive.into();
            v["this"] = this.into();
            v
        })
        .collect();
    Ok(Json(serde_json::json!({ "nodes": nodes })).into_response())
}

/// `GET /metrics`.
pub async fn metrics(
    State(jobs): State<JobService>,
    Caller(_): Caller,
) -> Result<Response, ApiError> {
    let text = jobs.metrics_text()?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::jobs::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

/// Unknown routes.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route {}", uri.path()))
}
