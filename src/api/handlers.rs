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

/// `POST|PUT /job/build`: multipart field `file` holding a Dockerfile and/or `context` (a tar,
/// tar.gz or zip, with the Dockerfile at its root when `file` is absent); optional fields
/// `build_arg` (`NAME=value`, repeatable), `target`, `dataset` and `callback_url`; optional
/// header `Idempotency-Key`.
pub async fn submit(
    State(jobs): State<JobService>,
    who: Submitter,
    headers: axum::http::HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected a multipart/form-data upload with a field named \"file\": {e}"
        ))
    })?;
    let max = jobs.config().max_dockerfile_bytes;
    let mut upload: Option<(String, Vec<u8>)> = None;
    let mut context: Option<Vec<u8>> = None;
    let mut other_fields = vec![];
    let mut options = BuildOptions::default();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e, max)),
        };
        let name = field.name().unwrap_or("").to_string();
        if name == "callback_url" {
            options.callback_url = Some(field.text().await.map_err(|e| multipart_error(e, max))?);
            continue;
        }
        if name == "build_arg" || name == "target" || name == "dataset" {
            let text = field.text().await.map_err(|e| multipart_error(e, max))?;
            if name == "target" {
                options.target = Some(text);
                continue;
            }
            if name == "dataset" {
                options.dataset = Some(text);
                continue;
            }
            let (arg, value) = text.split_once('=').ok_or_else(|| {
                ApiError::BadRequest(format!("build_arg must be NAME=value, got {text:?}"))
            })?;
            options.build_args.insert(arg.to_owned(), value.to_owned());
            continue;
        }
        if name == "context" {
            if context.is_some() {
                return Err(ApiError::BadRequest(
                    "send at most one field named \"context\"".into(),
                ));
            }
            let bytes = field.bytes().await.map_err(|e| multipart_error(e, max))?;
            context = Some(bytes.to_vec());
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
    if upload.is_none() && context.is_none() {
        let seen = if other_fields.is_empty() {
            "no fields".to_string()
        } else {
            format!("fields {other_fields:?}")
        };
        return Err(ApiError::BadRequest(format!(
            "no multipart field named \"file\" (got {seen}); use: curl -F file=@job.Dockerfile"
        )));
    }
    if !other_fields.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "unknown multipart fields {other_fields:?}: send \"file\" (the Dockerfile) and optionally \"context\" (a tar, tar.gz or zip), \"build_arg\" (NAME=value, repeatable), \"target\", \"dataset\" and \"callback_url\""
        )));
    }
    let key =
        match headers.get("idempotency-key") {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::BadRequest("Idempotency-Key must be printable ASCII".into())
            })?),
        };
    let submission = crate::jobs::service::Submission {
        filename: upload.as_ref().map_or("Dockerfile", |(n, _)| n.as_str()),
        dockerfile: upload.as_ref().map(|(_, b)| b.as_slice()),
        context: context.as_deref(),
        options: &options,
        idempotency_key: key,
    };
    let made = jobs.submit_once(&submission, who.owner, &who.name)?;
    let rec = made.job;
    let body = json!({
        "id": rec.id,
        "filename": rec.filename,
        "status": rec.status,
        "links": links(rec.id),
    });
    // A repeated Idempotency-Key: the first submission's job, 200 rather than 202, and said so.
    if made.replayed {
        let mut resp = (StatusCode::OK, Json(body)).into_response();
        resp.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
        return Ok(resp);
    }
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

/// Longest `?wait=` honoured (seconds).
pub const MAX_WAIT_SECS: f64 = 300.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Hold the answer until the job is final or this many seconds passed.
    wait: Option<f64>,
}

/// `GET /job/performance/{id}[?wait=N]`: with `wait`, the answer comes when the job reaches a
/// final state or after N seconds (at most [`MAX_WAIT_SECS`]), whichever is first.
pub async fn performance(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    Path(raw): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw)?;
    let Query(q) =
        query.map_err(|e| ApiError::BadRequest(format!("bad query: {}", e.body_text())))?;
    let rec = match q.wait {
        None => jobs.get(id, &owner)?,
        Some(w) if w.is_finite() && w >= 0.0 => {
            let within = std::time::Duration::from_secs_f64(w.min(MAX_WAIT_SECS));
            jobs.wait_final(id, &owner, within).await?
        }
        Some(w) => {
            return Err(ApiError::BadRequest(format!(
                "wait must be a number of seconds >= 0, got {w}"
            )));
        }
    };
    let mut answer = rec.answer();
    if rec.status == JobStatus::Queued {
        answer["queue_position"] = json!(jobs.queue_position(id)?);
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    before: Option<JobId>,
    status: Option<String>,
}

/// Jobs still going.
pub const ACTIVE: &[JobStatus] = &[JobStatus::Queued, JobStatus::Building, JobStatus::Running];
/// Jobs that ended without a perf, by failure (not by a cancel).
pub const FAILED: &[JobStatus] = &[
    JobStatus::BuildFailed,
    JobStatus::RunFailed,
    JobStatus::TimedOut,
    JobStatus::NoPerf,
    JobStatus::InvalidPerf,
    JobStatus::Interrupted,
];

/// `?status=`: comma-separated statuses and the groups `active` and `failed` (empty: all).
pub fn parse_statuses(raw: Option<&str>) -> Result<Vec<JobStatus>, ApiError> {
    let mut out = Vec::new();
    for name in raw.unwrap_or("").split(',').map(str::trim) {
        let add: &[JobStatus] = match name {
            "" | "all" => &[],
            "active" => ACTIVE,
            "failed" => FAILED,
            other => match JobStatus::parse(other) {
                Some(st) => {
                    out.push(st);
                    &[]
                }
                None => {
                    let names: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                    return Err(ApiError::BadRequest(format!(
                        "unknown status {other:?}: use active, failed or any of {}",
                        names.join(", ")
                    )));
                }
            },
        };
        out.extend_from_slice(add);
    }
    out.sort_by_key(|s| *s as u8);
    out.dedup();
    Ok(out)
}

/// `GET /jobs?limit=50&before=<id>&status=<statuses>`.
pub async fn list(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::BadRequest(format!("bad query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let statuses = parse_statuses(q.status.as_deref())?;
    let (page, total) = jobs.list(&owner, &statuses, q.before, limit)?;
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| format!("&status={s}"))
        .unwrap_or_default();
    let next = (page.len() == limit)
        .then(|| {
            page.last()
                .map(|j| format!("/jobs?limit={limit}&before={}{status}", j.id))
        })
        .flatten();
    let page = page.iter().map(with_times).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "jobs": page, "total": total, "next": next })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardQuery {
    per: Option<String>,
    limit: Option<usize>,
}

/// `?per=owner` (the default: each owner's best job) or `?per=job` (every submission).
pub fn parse_per(raw: Option<&str>) -> Result<bool, ApiError> {
    match raw.unwrap_or("owner") {
        "owner" => Ok(true),
        "job" => Ok(false),
        other => Err(ApiError::BadRequest(format!(
            "per must be owner or job, got {other:?}"
        ))),
    }
}

/// `GET /leaderboard?per=owner|job&limit=50`: succeeded jobs ranked by perf (direction from
/// `[leaderboard]`); tied perfs share a rank, the first to finish listed first. A token sees
/// its own jobs, or with `[leaderboard] public` every owner's entries, whose jobs it still
/// cannot open (they carry no `job` or `filename`).
pub async fn leaderboard(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    query: Result<Query<BoardQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::BadRequest(format!("bad query: {}", e.body_text())))?;
    let per_owner = parse_per(q.per.as_deref())?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let board = jobs.leaderboard(&owner, per_owner, limit)?;
    let entries: Vec<Value> = board
        .entries
        .iter()
        .map(|e| {
            let mut v = json!({
                "rank": e.rank,
                "owner": e.job.owner,
                "perf": e.job.perf,
                "finished_at": e.job.finished_at,
                "times": { "finished_at": e.job.finished_at.and_then(rfc3339) },
            });
            if e.visible {
                v["job"] = e.job.id.into();
                v["filename"] = e.job.filename.clone().into();
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "direction": if board.higher_is_better { "higher" } else { "lower" },
        "per": if per_owner { "owner" } else { "job" },
        "public": board.public,
        "entries": entries,
    })))
}

/// A Unix time as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(t: f64) -> Option<String> {
    (t.is_finite() && t >= 0.0).then(|| {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(t);
        humantime::format_rfc3339_millis(at).to_string()
    })
}

/// A record as JSON, with its Unix times also as RFC 3339 strings under `times` (same names).
fn with_times(rec: &JobRecord) -> Result<Value, ApiError> {
    let mut v = serde_json::to_value(rec).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut times = serde_json::Map::new();
    for (name, t) in [
        ("created_at", Some(rec.created_at)),
        ("build_started_at", rec.build_started_at),
        ("build_finished_at", rec.build_finished_at),
        ("run_started_at", rec.run_started_at),
        ("finished_at", rec.finished_at),
    ] {
        if let Some(t) = t.and_then(rfc3339) {
            times.insert(name.into(), t.into());
        }
    }
    v["times"] = times.into();
    Ok(v)
}

fn full_record(jobs: &JobService, rec: JobRecord) -> Result<Value, ApiError> {
    let mut v = with_times(&rec)?;
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
