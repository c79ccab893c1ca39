//! The web page: HTML for the people who submit and review jobs, served by perfbox itself.
//!
//! | page | what |
//! |---|---|
//! | `GET /` | jobs, newest first: `?status=` (as `/jobs`), `?before=` pages |
//! | `GET /board` | the leaderboard: `?per=owner` (best per owner) or `?per=job` |
//! | `GET /job/{id}/view` | one job: timeline, reason, limits, usage, image, audit, spec, live logs, cancel |
//! | `GET /submit` | a form for `POST /job/build` |
//! | `GET /assets/app.js`, `/assets/app.css` | the page's script and style, compiled into the binary |
//!
//! Pages are rendered here, on the server ([`pages`], maud templates), from the same
//! [`JobService`] calls the JSON routes make, for the same caller ([`Viewer`] is the JSON API's
//! token check): a page shows nothing the JSON API would not show that caller.
//!
//! With tokens on, a browser's plain navigation carries no token. The page then comes without
//! data and asks for one; the script keeps it in the tab's `sessionStorage` (never a cookie, so
//! no other site can use it) and fetches the same page with `Authorization: Bearer`. The same
//! fetch keeps the parts marked `data-live` current while jobs move. Actions go to the JSON
//! API: `POST /job/build`, `DELETE /job/{id}`, `GET /job/{id}/logs?follow=1`.
//!
//! Every page is sent with a Content-Security-Policy that allows only this origin's script and
//! style (no inline script, nothing from elsewhere), and with `no-store`.

mod pages;

use std::convert::Infallible;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::Markup;
use serde::Deserialize;

use super::error::ApiError;
use super::handlers::{Submitter, parse_id, parse_per, parse_statuses};
use crate::jobs::{JobService, Owner};

/// The page's script.
const APP_JS: &str = include_str!("assets/app.js");
/// The page's style.
const APP_CSS: &str = include_str!("assets/app.css");

/// What every page is sent with.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Jobs per page of the jobs list.
pub const PAGE_SIZE: usize = 25;

/// The page routes (merged into the API router).
pub fn routes() -> Router<JobService> {
    Router::new()
        .route("/", get(jobs_page))
        .route("/board", get(board_page))
        .route("/submit", get(submit_page))
        .route("/job/{id}/view", get(job_page))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
}

/// Who is looking: the JSON API's caller, or someone who still has to give a token.
pub enum Viewer {
    /// Sees what this owner sees (everything when tokens are off).
    Sees(Owner),
    /// Tokens are on and none (or a wrong one) came with the request.
    NeedsToken(Option<String>),
}

impl FromRequestParts<JobService> for Viewer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, jobs: &JobService) -> Result<Self, Infallible> {
        let presented = parts.headers.contains_key(header::AUTHORIZATION);
        Ok(match Submitter::from_request_parts(parts, jobs).await {
            Ok(who) => Viewer::Sees(who.owner),
            Err(e) if presented => Viewer::NeedsToken(Some(e.into_parts().1)),
            Err(_) => Viewer::NeedsToken(None),
        })
    }
}

/// An HTML answer with the page headers.
fn html(status: StatusCode, markup: Markup) -> Response {
    let mut resp = (status, markup.into_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("Authorization"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// A page, or the page asking for a token (401 when a wrong one came).
fn page(
    jobs: &JobService,
    viewer: &Viewer,
    nav: pages::Nav,
    title: &str,
    body: impl FnOnce(&Owner) -> Result<Markup, ApiError>,
) -> Response {
    let chrome = pages::Chrome {
        title,
        nav,
        tokens: !jobs.config().tokens.is_empty(),
    };
    match viewer {
        Viewer::NeedsToken(why) => {
            let status = if why.is_some() {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            };
            html(
                status,
                pages::layout(&chrome, None, pages::ask_token(why.as_deref())),
            )
        }
        Viewer::Sees(owner) => match body(owner) {
            Ok(markup) => html(
                StatusCode::OK,
                pages::layout(&chrome, Some(owner.as_deref()), markup),
            ),
            Err(e) => {
                let (status, message, _) = e.into_parts();
                html(
                    status,
                    pages::layout(&chrome, Some(owner.as_deref()), pages::problem(&message)),
                )
            }
        },
    }
}

#[derive(Deserialize)]
pub struct JobsQuery {
    status: Option<String>,
    before: Option<String>,
}

/// `GET /`: the jobs list.
async fn jobs_page(
    State(jobs): State<JobService>,
    viewer: Viewer,
    Query(q): Query<JobsQuery>,
) -> Response {
    page(&jobs, &viewer, pages::Nav::Jobs, "Jobs", |owner| {
        let statuses = parse_statuses(q.status.as_deref())?;
        let before = match q.before.as_deref().filter(|b| !b.is_empty()) {
            Some(raw) => Some(parse_id(raw)?),
            None => None,
        };
        let (list, total) = jobs.list(owner, &statuses, before, PAGE_SIZE)?;
        Ok(pages::jobs(&pages::JobsView {
            jobs: &list,
            total,
            filter: q.status.as_deref().unwrap_or(""),
            before,
            full_page: list.len() == PAGE_SIZE,
            show_owner: !jobs.config().tokens.is_empty(),
        }))
    })
}

#[derive(Deserialize)]
pub struct BoardQuery {
    per: Option<String>,
}

/// `GET /board`: the leaderboard.
async fn board_page(
    State(jobs): State<JobService>,
    viewer: Viewer,
    Query(q): Query<BoardQuery>,
) -> Response {
    page(&jobs, &viewer, pages::Nav::Board, "Leaderboard", |owner| {
        let per_owner = parse_per(q.per.as_deref())?;
        let board = jobs.leaderboard(owner, per_owner, 100)?;
        Ok(pages::board(&board, per_owner))
    })
}

/// `GET /submit`: the submission form.
async fn submit_page(State(jobs): State<JobService>, viewer: Viewer) -> Response {
    let datasets: Vec<String> = jobs
        .config()
        .datasets
        .iter()
        .map(|d| d.name.clone())
        .collect();
    page(&jobs, &viewer, pages::Nav::Submit, "Submit", |_| {
        Ok(pages::submit(&datasets))
    })
}

/// `GET /job/{id}/view`: one job.
async fn job_page(
    State(jobs): State<JobService>,
    viewer: Viewer,
    Path(raw): Path<String>,
) -> Response {
    let title = format!("Job {raw}");
    page(&jobs, &viewer, pages::Nav::None, &title, |owner| {
        let id = parse_id(&raw)?;
        let rec = jobs.get(id, owner)?;
        let queue_position = if rec.status == crate::jobs::JobStatus::Queued {
            Some(jobs.queue_position(id)?)
        } else {
            None
        };
        // The spec and its audit exist once the run was prepared (its digest is recorded then),
        // on the node that ran it. Read from the record already in hand: the page is polled.
        let spec = rec
            .spec_sha256
            .as_ref()
            .and_then(|_| jobs.spec_of(&rec).ok());
        let audit = spec.as_ref().map(|_| jobs.audit_of(&rec));
        Ok(pages::job(&pages::JobView {
            rec: &rec,
            queue_position,
            spec: spec.as_ref(),
            audit: audit.as_ref(),
        }))
    })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
