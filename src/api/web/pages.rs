//! The page templates (maud: compile-time HTML, every interpolated value escaped). Pure
//! functions from records to markup; [`super`] fetches the records.
//!
//! Conventions the script relies on: elements with `data-live` and an `id` are the parts it
//! refreshes in place; `main[data-poll]` is how often (ms, 0 = never) it refreshes them;
//! `time[datetime]` it shows in the viewer's local time; `#log[data-src]` it streams into.

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use crate::api::handlers::{FAILED, rfc3339};
use crate::jobs::audit::JobAudit;
use crate::jobs::service::Leaderboard;
use crate::jobs::{JobRecord, JobStatus};

/// Which page the navigation marks as current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Jobs,
    Board,
    Submit,
    None,
}

/// What every page shares.
pub struct Chrome<'a> {
    pub title: &'a str,
    pub nav: Nav,
    /// The API needs tokens: the page shows the token form.
    pub tokens: bool,
}

/// The whole page around `main`. `who` is the caller when known: `Some(None)` with tokens off.
pub fn layout(chrome: &Chrome<'_>, who: Option<Option<&str>>, main: Markup) -> Markup {
    let link = |nav: Nav, href: &str, text: &str| {
        html! {
            a href=(href) aria-current=[(chrome.nav == nav).then_some("page")] { (text) }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (chrome.title) " · perfbox" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body data-tokens=(if chrome.tokens { "on" } else { "off" })
                data-shell=[who.is_none().then_some("1")] {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Main" {
                        a.brand href="/" { "perfbox" }
                        (link(Nav::Jobs, "/", "Jobs"))
                        (link(Nav::Board, "/board", "Leaderboard"))
                        (link(Nav::Submit, "/submit", "Submit"))
                    }
                    @if chrome.tokens {
                        div.auth {
                            span #who data-live {
                                @if let Some(Some(name)) = who { "Token: " strong { (name) } }
                            }
                            button #forget type="button" hidden { "Forget token" }
                        }
                    }
                }
                @if chrome.tokens {
                    form #token-form hidden {
                        label for="token" { "API token" }
                        input #token name="token" type="password" autocomplete="off" required;
                        button type="submit" { "Use token" }
                        p.hint { "Kept in this browser tab only (session storage), sent as "
                            code { "Authorization: Bearer" } " to this server." }
                        p #token-error.error role="alert" {}
                    }
                }
                main #main tabindex="-1" { (main) }
            }
        }
    }
}

/// The main part of a page that needs a token first.
pub fn ask_token(why: Option<&str>) -> Markup {
    html! {
        div #content data-live data-poll="0" {
            h1 { "Token needed" }
            @if let Some(why) = why {
                p.error role="alert" { "The token was refused: " (why) }
            }
            p { "This perfbox needs an API token. Enter yours above: you will see your own jobs." }
            noscript { p.error { "This page needs JavaScript to send the token. "
                "The JSON API works without it: " code { "curl -H 'Authorization: Bearer …'" } } }
        }
    }
}

/// The main part of a page whose request failed.
pub fn problem(message: &str) -> Markup {
    html! {
        div #content data-live data-poll="0" {
            h1 { "Not available" }
            p.error role="alert" { (message) }
            p { a href="/" { "Back to the jobs" } }
        }
    }
}

/// A table's head: one column per name (an empty name: no column).
fn header(columns: &[&str]) -> Markup {
    html! {
        thead { tr { @for c in columns.iter().filter(|c| !c.is_empty()) { th scope="col" { (c) } } } }
    }
}

/// A status in words; the class gives it its colour.
pub fn status_label(st: JobStatus) -> &'static str {
    match st {
        JobStatus::Queued => "Queued",
        JobStatus::Building => "Building",
        JobStatus::Running => "Running",
        JobStatus::Succeeded => "Succeeded",
        JobStatus::BuildFailed => "Build failed",
        JobStatus::RunFailed => "Run failed",
        JobStatus::TimedOut => "Timed out",
        JobStatus::NoPerf => "No perf written",
        JobStatus::InvalidPerf => "Invalid perf",
        JobStatus::Cancelled => "Cancelled",
        JobStatus::Interrupted => "Interrupted",
    }
}

fn badge(st: JobStatus) -> Markup {
    let kind = match st {
        JobStatus::Queued => "wait",
        JobStatus::Building | JobStatus::Running => "busy",
        JobStatus::Succeeded => "ok",
        JobStatus::Cancelled => "off",
        JobStatus::TimedOut | JobStatus::NoPerf | JobStatus::InvalidPerf => "warn",
        _ => "bad",
    };
    html! {
        span class={ "badge " (kind) } data-status=(st.as_str()) { (status_label(st)) }
    }
}

/// A time as `<time>`: UTC in the text (the script shows it in local time).
fn time(t: Option<f64>) -> Markup {
    match t.and_then(rfc3339) {
        Some(iso) => {
            let utc = format!("{} UTC", iso[..19].replace('T', " "));
            html! { time datetime=(iso) { (utc) } }
        }
        None => html! { span.none { "—" } },
    }
}

/// Seconds between two times, in words.
fn duration(from: Option<f64>, to: Option<f64>) -> Markup {
    match (from, to) {
        (Some(a), Some(b)) if b >= a => html! { (secs(b - a)) },
        (Some(_), None) => html! { span.none { "…" } },
        _ => html! { span.none { "—" } },
    }
}

/// `0.42 s`, `12.3 s`, `4 min 05 s`, `1 h 02 min`.
pub fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{} h {:02} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn perf(p: Option<f64>) -> Markup {
    match p.filter(|p| p.is_finite()) {
        Some(p) => html! { span.perf { (p) } },
        None => html! { span.none { "—" } },
    }
}

fn owner(o: Option<&str>) -> Markup {
    match o {
        Some(o) => html! { (o) },
        None => html! { span.none { "anonymous" } },
    }
}

/// What the jobs list shows.
pub struct JobsView<'a> {
    pub jobs: &'a [JobRecord],
    pub total: i64,
    /// `?status=` as given.
    pub filter: &'a str,
    pub before: Option<i64>,
    /// The page is full: there may be older jobs.
    pub full_page: bool,
    pub show_owner: bool,
}

/// The filters the jobs list offers: label, `?status=`.
const FILTERS: [(&str, &str); 5] = [
    ("All", ""),
    ("Active", "active"),
    ("Succeeded", "succeeded"),
    ("Failed", "failed"),
    ("Cancelled", "cancelled"),
];

fn with_status(filter: &str, before: Option<i64>) -> String {
    let mut q = vec![];
    if !filter.is_empty() {
        q.push(format!("status={filter}"));
    }
    if let Some(b) = before {
        q.push(format!("before={b}"));
    }
    if q.is_empty() {
        "/".into()
    } else {
        format!("/?{}", q.join("&"))
    }
}

/// `GET /`.
pub fn jobs(v: &JobsView<'_>) -> Markup {
    html! {
        div #content data-live data-poll="2000" {
            h1 { "Jobs" }
            nav.filters aria-label="Filter by status" {
                @for (label, value) in FILTERS {
                    a href=(with_status(value, None))
                        aria-current=[(v.filter == value).then_some("page")] { (label) }
                }
            }
            p.count { (v.total) " job" @if v.total != 1 { "s" }
                @if v.before.is_some() { " · older than job " (v.before.unwrap_or(0)) } }
            @if v.jobs.is_empty() {
                p.empty { "No jobs here yet. " a href="/submit" { "Submit one" } "." }
            } @else {
                div.scroll {
                    table #jobs.cards {
                        (header(&[
                            "Job", "Status", "Perf", "File", if v.show_owner { "Owner" } else { "" },
                            "Submitted", "Finished", "Build", "Run",
                        ]))
                        tbody {
                            @for j in v.jobs {
                                tr data-job=(j.id) {
                                    td { a href={ "/job/" (j.id) "/view" } { "#" (j.id) } }
                                    td { (badge(j.status)) }
                                    td data-label="Perf" { (perf(j.perf)) }
                                    td.file data-label="File" { (j.filename) }
                                    @if v.show_owner { td data-label="Owner" { (owner(j.owner.as_deref())) } }
                                    td data-label="Submitted" { (time(Some(j.created_at))) }
                                    td data-label="Finished" { (time(j.finished_at)) }
                                    td data-label="Build" { (duration(j.build_started_at, j.build_finished_at)) }
                                    td data-label="Run" { (duration(j.run_started_at, j.finished_at)) }
                                }
                            }
                        }
                    }
                }
            }
            nav.pages aria-label="Pages" {
                @if v.before.is_some() { a href=(with_status(v.filter, None)) { "← Newest" } }
                @if v.full_page {
                    @if let Some(last) = v.jobs.last() {
                        a rel="next" href=(with_status(v.filter, Some(last.id))) { "Older →" }
                    }
                }
            }
        }
    }
}

/// `GET /board`.
pub fn board(b: &Leaderboard, per_owner: bool) -> Markup {
    html! {
        div #content data-live data-poll="5000" {
            h1 { "Leaderboard" }
            p { "Succeeded jobs ranked by perf, "
                strong { @if b.higher_is_better { "higher" } @else { "lower" } " is better" }
                ". Equal perfs share a rank; the first to finish is listed first."
                @if b.public { " Every owner's entries are shown; only your own jobs open." } }
            nav.filters aria-label="Entries" {
                a href="/board?per=owner" aria-current=[per_owner.then_some("page")] { "Best per owner" }
                a href="/board?per=job" aria-current=[(!per_owner).then_some("page")] { "All submissions" }
            }
            @if b.entries.is_empty() {
                p.empty { "No succeeded jobs yet." }
            } @else {
                div.scroll {
                    table #board.cards {
                        (header(&["Rank", "Perf", "Owner", "Job", "File", "Finished"]))
                        tbody {
                            @for e in &b.entries {
                                tr data-job=[e.visible.then_some(e.job.id)] {
                                    td.rank data-label="Rank" { (e.rank) }
                                    td data-label="Perf" { (perf(e.job.perf)) }
                                    td data-label="Owner" { (owner(e.job.owner.as_deref())) }
                                    @if e.visible {
                                        td data-label="Job" { a href={ "/job/" (e.job.id) "/view" } { "#" (e.job.id) } }
                                        td.file data-label="File" { (e.job.filename) }
                                    } @else {
                                        td data-label="Job" { span.none { "—" } }
                                        td data-label="File" { span.none { "—" } }
                                    }
                                    td data-label="Finished" { (time(e.job.finished_at)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /submit`.
pub fn submit(datasets: &[String]) -> Markup {
    html! {
        div #content data-poll="0" {
            h1 { "Submit a job" }
            form #submit-form method="post" action="/job/build" enctype="multipart/form-data" {
                p {
                    label for="file" { "Dockerfile" }
                    input #file name="file" type="file";
                    span.hint { "It writes " code { "{\"perf\": <number>}" } " to "
                        code { "/data/perf.json" } "." }
                }
                p {
                    label for="context" { "Build context (optional)" }
                    input #context name="context" type="file" accept=".tar,.tar.gz,.tgz,.zip";
                    span.hint { "A tar, tar.gz or zip; its root Dockerfile is used when none is given above." }
                }
                @if !datasets.is_empty() {
                    p {
                        label for="dataset" { "Dataset (read-only at /input)" }
                        select #dataset name="dataset" {
                            option value="" { "none" }
                            @for d in datasets { option value=(d) { (d) } }
                        }
                    }
                }
                p {
                    label for="build-args" { "Build arguments (optional, one NAME=value per line)" }
                    textarea #build-args rows="3" spellcheck="false" {}
                }
                p {
                    label for="target" { "Target stage (optional)" }
                    input #target name="target" type="text" autocomplete="off";
                }
                p {
                    label for="callback" { "Callback URL (optional)" }
                    input #callback name="callback_url" type="url" autocomplete="off";
                }
                p { button #submit type="submit" { "Submit" } }
                p #submit-error.error role="alert" {}
            }
        }
    }
}

/// What a job's page shows.
pub struct JobView<'a> {
    pub rec: &'a JobRecord,
    pub queue_position: Option<i64>,
    /// Its spec, where this node has it.
    pub spec: Option<&'a Value>,
    pub audit: Option<&'a JobAudit>,
}

/// `GET /job/{id}/view`.
pub fn job(v: &JobView<'_>) -> Markup {
    let r = v.rec;
    let done = r.status.is_terminal();
    html! {
        div #content data-poll=(if done { "0" } else { "1000" }) {
            h1 { "Job #" (r.id) }
            p.file.name { (r.filename) }
            (summary(v))
            (facts(r))
            (sandbox(v))
            section #logs {
                h2 { "Logs" }
                p.hint { "Build log, then run log" @if !done { ", live" } "." }
                pre #log tabindex="0" data-src={ "/job/" (r.id) "/logs?follow=1" } {}
            }
        }
    }
}

fn summary(v: &JobView<'_>) -> Markup {
    let r = v.rec;
    let steps = [
        ("Submitted", Some(r.created_at)),
        ("Build started", r.build_started_at),
        ("Build finished", r.build_finished_at),
        ("Run started", r.run_started_at),
        ("Finished", r.finished_at),
    ];
    html! {
        section #summary data-live aria-live="polite" {
            div.headline {
                (badge(r.status))
                @if r.status == JobStatus::Succeeded {
                    span.big { "perf " (perf(r.perf)) }
                }
                @if !r.status.is_terminal() {
                    span.info { (r.status.info())
                        @if let Some(n) = v.queue_position { " · " (n) " ahead in the queue" } }
                    button #cancel type="button" data-job=(r.id) { "Cancel job" }
                }
            }
            @if let Some(err) = &r.error {
                div.reason role="alert" {
                    strong { (reason_title(r.status)) }
                    pre { (err) }
                }
            }
            h2 { "Timeline" }
            ol.timeline {
                @for (name, t) in steps {
                    li.done[t.is_some()] { span.step { (name) } " " (time(t)) }
                }
            }
            p { "Build " (duration(r.build_started_at, r.build_finished_at))
                " · run " (duration(r.run_started_at, r.finished_at))
                @if let Some(owner) = &r.owner { " · owner " (owner) } }
        }
    }
}

fn reason_title(st: JobStatus) -> &'static str {
    if FAILED.contains(&st) {
        "Why it failed"
    } else if st == JobStatus::Cancelled {
        "Cancelled"
    } else {
        "Note"
    }
}

fn facts(r: &JobRecord) -> Markup {
    let raw = |v: &Option<Box<serde_json::value::RawValue>>| {
        v.as_ref()
            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
    };
    let cache = match r.image_cache.as_deref() {
        Some("hit") => "hit: an identical Dockerfile was built before",
        Some("rootfs-hit") => "root filesystem hit: solved from BuildKit's cache, nothing exported",
        Some("miss") => "miss: built and exported",
        Some(_) | None => "—",
    };
    html! {
        section #facts data-live {
            h2 { "What it ran with" }
            dl.facts {
                dt { "Runtime" } dd { (r.runtime.as_deref().unwrap_or("—"))
                    @if let Some(v) = &r.runtime_version { " (" (v) ")" } }
                dt { "cgroup" } dd { (r.cgroup.as_deref().unwrap_or("—")) }
                dt { "Limits that applied" } dd { (limits(raw(&r.limits).as_ref())) }
                dt { "Usage" } dd { (json_view(raw(&r.usage).as_ref())) }
                dt { "Exit code" } dd { (r.exit_code.map_or("—".to_string(), |c| c.to_string()))
                    @if r.oom_killed == Some(true) { " · killed for memory" } }
                dt { "Image digest" } dd { code { (r.image_digest.as_deref().unwrap_or("—")) } }
                dt { "Image cache" } dd { (cache)
                    @if let (Some(c), Some(t)) = (r.cached_steps, r.total_steps) {
                        " · " (c) " of " (t) " build steps cached" } }
                dt { "Build" } dd {
                    @if r.build.is_some() {
                        details { summary { "How it was built (cache scope, network, source policy, cgroup)" }
                            (json_view(raw(&r.build).as_ref())) }
                    } @else { span.none { "—" } }
                }
                dt { "Dataset" } dd { (r.dataset.as_deref().unwrap_or("none")) }
                dt { "Dockerfile sha256" } dd { code { (r.dockerfile_sha256) } }
                dt { "Node, attempt" } dd { (r.claimed_by.as_deref().unwrap_or("—")) ", " (r.attempt) }
                @if r.callback.is_some() {
                    dt { "Callback" } dd { (json_view(raw(&r.callback).as_ref())) }
                }
            }
        }
    }
}

fn sandbox(v: &JobView<'_>) -> Markup {
    html! {
        section #sandbox data-live {
            h2 { "Sandbox" }
            @match (v.spec, v.audit) {
                (Some(spec), Some(a)) => {
                    @let failed: Vec<_> = a.findings.iter().filter(|f| !f.ok).collect();
                    @if a.ok {
                        p.verdict.ok { "Audit passed: all " (a.findings.len()) " rules hold for the spec this job ran with." }
                    } @else {
                        p.verdict.bad role="alert" { "Audit failed: " (failed.len()) " of " (a.findings.len()) " rules do not hold." }
                        ul { @for f in &failed { li { strong { (f.rule) } ": " (f.detail) } } }
                    }
                    details {
                        summary { "Every rule" }
                        div.scroll { table {
                            (header(&["Rule", "Verdict", "What was found"]))
                            tbody { @for f in &a.findings {
                                tr { td { (f.rule) } td { @if f.ok { "ok" } @else { strong { "FAILED" } } } td { (f.detail) } }
                            } }
                        } }
                        @if !a.not_audited.is_empty() {
                            p { "Not audited: " (a.not_audited.join("; ")) }
                        }
                    }
                    details {
                        summary { "The OCI spec (config.json)"
                            @if let Some(d) = &v.rec.spec_sha256 { ", sha256 " code { (d[..12.min(d.len())]) } "…" } }
                        pre.spec { (serde_json::to_string_pretty(spec).unwrap_or_default()) }
                    }
                }
                _ => {
                    @if v.rec.spec_sha256.is_some() {
                        p { "The spec is on the node that ran the job (" (v.rec.claimed_by.as_deref().unwrap_or("unknown")) ")." }
                    } @else if v.rec.status.is_terminal() {
                        p { "No sandbox: the job ended before its run." }
                    } @else {
                        p { "The sandbox is written when the run starts." }
                    }
                }
            }
        }
    }
}

/// The record's `limits` (`{name: {value, by, control|name, note}}`) as a table: what was
/// asked, what applied it (cgroup, rlimit, the sandbox), and any note on why not as asked.
fn limits(v: Option<&Value>) -> Markup {
    let Some(Value::Object(m)) = v else {
        return json_view(v);
    };
    let text = |v: Option<&Value>| match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    html! {
        div.scroll { table.limits {
            (header(&["Limit", "Value", "Applied by", "Note"]))
            tbody { @for (name, l) in m {
                tr {
                    td { (name) }
                    td { (text(l.get("value"))) }
                    td { (text(l.get("by")))
                        @let how = text(l.get("control").or(l.get("name")));
                        @if !how.is_empty() { " (" (how) ")" } }
                    td { (text(l.get("note"))) }
                }
            } }
        } }
    }
}

/// A JSON value as nested lists (objects as `dl`), for the record's JSON fields.
fn json_view(v: Option<&Value>) -> Markup {
    match v {
        None | Some(Value::Null) => html! { span.none { "—" } },
        Some(Value::Object(m)) if m.is_empty() => html! { span.none { "none" } },
        Some(Value::Object(m)) => html! {
            dl.json { @for (k, v) in m { dt { (k) } dd { (json_view(Some(v))) } } }
        },
        Some(Value::Array(a)) => html! {
            @if a.is_empty() { span.none { "none" } }
            @else { ul.json { @for v in a { li { (json_view(Some(v))) } } } }
        },
        Some(Value::String(s)) => html! { (s) },
        Some(other) => html! { (other.to_string()) },
    }
}
