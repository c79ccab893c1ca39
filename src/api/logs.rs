//! `GET /job/{id}/logs[?follow=1]`: the build log then the run log as text. With `follow`, the
//! response streams new lines as they are written until the job ends.
//!
//! In a cluster, a job another node is building or running has its logs on that node: the
//! request is passed to it (the caller's token with it, marked so that it is never passed on
//! again) and its answer streamed back, live. A finished job's logs are in the store, readable
//! from any node; if the holder cannot be reached, the answer is what this node has (the logs
//! arrive when the job ends).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::handlers::{Caller, parse_id};
use crate::jobs::{JobId, JobService, JobStatus, Owner};

#[derive(Deserialize, Default)]
pub struct LogQuery {
    follow: Option<String>,
}

const POLL: Duration = Duration::from_millis(200);
const CHUNK: usize = 64 * 1024;

/// Read what is new in `path` after `offset` (at most one chunk).
fn read_from(path: &PathBuf, offset: &mut u64) -> Vec<u8> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return vec![];
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return vec![];
    }
    let mut buf = Vec::new();
    let _ = f.by_ref().take(CHUNK as u64).read_to_end(&mut buf);
    *offset += buf.len() as u64;
    buf
}

struct Follow {
    jobs: JobService,
    id: JobId,
    owner: Owner,
    paths: [PathBuf; 2],
    part: usize,
    offset: u64,
    follow: bool,
    header_sent: bool,
    refreshed: bool,
}

impl Follow {
    /// The next piece of output, or None at the end.
    async fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            if self.part >= 2 {
                return None;
            }
            if !self.header_sent {
                self.header_sent = true;
                let title = if self.part == 0 { "build" } else { "run" };
                return Some(format!("===== {title} log =====\n").into_bytes());
            }
            let data = read_from(&self.paths[self.part], &mut self.offset);
            if !data.is_empty() {
                return Some(data);
            }
            // Nothing new. Is this part finished?
            let status = self
                .jobs
                .get(self.id, &self.owner)
                .map(|r| r.status)
                .unwrap_or(JobStatus::Interrupted);
            let part_done = match self.part {
                0 => status != JobStatus::Queued && status != JobStatus::Building,
                _ => status.is_terminal(),
            };
            if status.is_terminal() && !self.refreshed {
                // Run by another node: its logs are here once it has ended (see
                // JobService::local_dir).
                self.refreshed = true;
                if let Ok(paths) = self.jobs.log_paths(self.id, &self.owner) {
                    self.paths = paths;
                }
            }
            if part_done || !self.follow {
                // One last read: the writer may have added a final line after our read.
                let tail = read_from(&self.paths[self.part], &mut self.offset);
                if !tail.is_empty() {
                    return Some(tail);
                }
                self.part += 1;
                self.offset = 0;
                self.header_sent = false;
                continue;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Marks a request one node passed to another.
const FORWARDED: &str = "x-perfbox-forwarded";

/// Pass the logs request to the node holding the job; None if it does not answer 200.
async fn from_holder(url: &str, id: JobId, follow: bool, headers: &HeaderMap) -> Option<Response> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default()
    });
    let mut req = client
        .get(format!(
            "{url}/job/{id}/logs{}",
            if follow { "?follow=1" } else { "" }
        ))
        .header(FORWARDED, "1");
    if let Some(auth) = headers.get(axum::http::header::AUTHORIZATION) {
        req = req.header(axum::http::header::AUTHORIZATION, auth.as_bytes());
    }
    let answer = match req.send().await {
        Ok(a) if a.status() == reqwest::StatusCode::OK => a,
        Ok(a) => {
            tracing::warn!(job = id, node = url, status = %a.status(), "the job's node refused its logs");
            return None;
        }
        Err(e) => {
            tracing::warn!(job = id, node = url, error = %e, "the job's node did not answer for its logs");
            return None;
        }
    };
    Some(
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            Body::from_stream(answer.bytes_stream()),
        )
            .into_response(),
    )
}

/// The handler.
pub async fn logs(
    State(jobs): State<JobService>,
    Caller(owner): Caller,
    Path(raw): Path<String>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let follow = matches!(q.follow.as_deref(), Some("1" | "true" | "yes" | ""));
    if !headers.contains_key(FORWARDED) {
        let rec = jobs.get(id, &owner)?;
        if let Some(url) = jobs.holder_url(&rec)
            && let Some(answer) = from_holder(&url, id, follow, &headers).await
        {
            return Ok(answer);
        }
    }
    let paths = jobs.log_paths(id, &owner)?;
    let state = Follow {
        jobs,
        id,
        owner,
        paths,
        part: 0,
        offset: 0,
        follow,
        header_sent: false,
        refreshed: false,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        st.next()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), st))
    });
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        Body::from_stream(stream),
    )
        .into_response())
}
