//! Every route's answers, through `tower::ServiceExt::oneshot` on the router over a job service on
//! fakes ([`crate::jobs::fakes`]): no server, no root, no daemon. (The real service is driven with
//! curl by `tests/service.rs`.)

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;

use super::router;
use crate::jobs::fakes::{FakeService, fake_service};
use crate::jobs::{JobId, JobStatus};

const BOUNDARY: &str = "perfbox-test-boundary";

/// A multipart body of `(field name, file name, content)` parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, content) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let disposition = match filename {
            Some(f) => {
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n")
            }
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n"),
        };
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

struct Call {
    status: StatusCode,
    json: Value,
    text: String,
    headers: axum::http::HeaderMap,
}

async fn call(h: &FakeService, req: Request<Body>) -> Call {
    let resp = router(h.svc.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Call {
        status,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
        headers,
    }
}

async fn get(h: &FakeService, path: &str, token: Option<&str>) -> Call {
    let mut req = Request::get(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    call(h, req.body(Body::empty()).unwrap()).await
}

async fn post(h: &FakeService, parts: &[(&str, Option<&str>, &[u8])], token: Option<&str>) -> Call {
    let mut req = Request::post("/job/build").header(
        header::CONTENT_TYPE,
        format!("multipart/form-data; boundary={BOUNDARY}"),
    );
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    call(h, req.body(Body::from(multipart(parts))).unwrap()).await
}

async fn submit(h: &FakeService, script: &str) -> JobId {
    let df = format!("# fake: {script}\nFROM busybox\n");
    let c = post(h, &[("file", Some("job.Dockerfile"), df.as_bytes())], None).await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.text);
    c.json["id"].as_i64().unwrap()
}

fn assert_error(c: &Call, status: StatusCode, words: &str) {
    assert_eq!(c.status, status, "{}", c.text);
    let e = c.json["error"].as_str().unwrap_or_default();
    assert!(e.contains(words), "{status}: {e:?} lacks {words:?}");
}

#[tokio::test]
async fn submit_answers_202_with_links_and_perf_comes_back() {
    let h = fake_service(|_| {}).await;
    let df = b"# fake: perf=0.9876\nFROM busybox\n";
    let c = post(&h, &[("file", Some("job.Dockerfile"), df)], None).await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.text);
    assert_eq!(c.json["filename"], "job.Dockerfile");
    assert_eq!(c.json["status"], "queued");
    let id = c.json["id"].as_i64().unwrap();
    assert_eq!(
        c.json["links"]["performance"],
        format!("/job/performance/{id}")
    );
    h.finish(id).await;
    let c = get(&h, &format!("/job/performance/{id}"), None).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(
        c.json,
        serde_json::json!({"job": id, "status": "succeeded", "perf": 0.9876})
    );
    // PUT works like POST; build args and a target are accepted.
    let req = Request::put("/job/build")
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Body::from(multipart(&[
            ("file", Some("x.Dockerfile"), b"FROM busybox\n"),
            ("build_arg", None, b"A=1"),
            ("target", None, b"final"),
        ])))
        .unwrap();
    let c = call(&h, req).await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.text);
}

#[tokio::test]
async fn bad_submissions_are_4xx_and_queue_nothing() {
    let h = fake_service(|c| c.max_dockerfile_bytes = 64).await;
    let ok: &[u8] = b"FROM busybox\n";
    type Parts<'a> = Vec<(&'a str, Option<&'a str>, &'a [u8])>;
    let cases: Vec<(Parts, StatusCode, &str)> = vec![
        (
            vec![],
            StatusCode::BAD_REQUEST,
            "no multipart field named \"file\"",
        ),
        (
            vec![("dockerfile", Some("d"), ok)],
            StatusCode::BAD_REQUEST,
            "no multipart field named \"file\" (got fields",
        ),
        (
            vec![("file", Some("d"), ok), ("bogus", None, b"1")],
            StatusCode::BAD_REQUEST,
            "unknown multipart fields",
        ),
        (
            vec![("file", Some("d"), b"")],
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            vec![("file", Some("d"), b"\xff\xfe")],
            StatusCode::BAD_REQUEST,
            "not UTF-8",
        ),
        (
            vec![("file", Some("d"), &[b'#'; 100])],
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit is 64",
        ),
        (
            vec![
                ("file", Some("d"), ok),
                ("build_arg", None, b"BUILDKIT_SYNTAX=x"),
            ],
            StatusCode::BAD_REQUEST,
            "BUILDKIT_",
        ),
        (
            vec![("file", Some("d"), ok), ("build_arg", None, b"NOEQUALS")],
            StatusCode::BAD_REQUEST,
            "NAME=value",
        ),
        (
            vec![("file", Some("d"), ok), ("file", Some("e"), ok)],
            StatusCode::BAD_REQUEST,
            "exactly one",
        ),
    ];
    for (parts, status, words) in cases {
        let c = post(&h, &parts, None).await;
        assert_error(&c, status, words);
    }
    // Not multipart at all.
    let req = Request::post("/job/build")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("FROM x"))
        .unwrap();
    assert_error(&call(&h, req).await, StatusCode::BAD_REQUEST, "multipart");
    assert_eq!(get(&h, "/jobs", None).await.json["total"], 0);
}

#[tokio::test]
async fn reads_answer_in_every_state_and_refuse_bad_ids() {
    let h = fake_service(|c| c.max_concurrent_builds = 1).await;
    let hanging = submit(&h, "build-hangs").await;
    h.wait_for(hanging, |s| s == JobStatus::Building).await;
    let queued = submit(&h, "x").await;
    let c = get(&h, &format!("/job/performance/{queued}"), None).await;
    assert_eq!(c.json["status"], "queued");
    assert_eq!(c.json["queue_position"], 0);
    assert!(c.json["info"].is_string());
    let c = get(&h, &format!("/job/performance/{hanging}"), None).await;
    assert_eq!(c.json["status"], "building");
    let c = get(&h, &format!("/job/{queued}"), None).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.json["queue_position"], 0);
    assert_eq!(c.json["links"]["logs"], format!("/job/{queued}/logs"));
    assert_error(
        &get(&h, "/job/performance/abc", None).await,
        StatusCode::BAD_REQUEST,
        "positive integer",
    );
    assert_error(
        &get(&h, "/job/performance/0", None).await,
        StatusCode::BAD_REQUEST,
        "positive integer",
    );
    assert_error(
        &get(&h, "/job/performance/999", None).await,
        StatusCode::NOT_FOUND,
        "no job 999",
    );
    assert_error(
        &get(&h, "/job/999", None).await,
        StatusCode::NOT_FOUND,
        "no job 999",
    );
    assert_error(
        &get(&h, &format!("/job/{queued}/spec"), None).await,
        StatusCode::NOT_FOUND,
        "has not run yet",
    );
    assert_error(
        &get(&h, "/nope", None).await,
        StatusCode::NOT_FOUND,
        "no route /nope",
    );

    // Cancel: 200 with the record, then 409 (already cancelled), 404 for nobody's job.
    let req = |id: JobId| {
        Request::delete(format!("/job/{id}"))
            .body(Body::empty())
            .unwrap()
    };
    let c = call(&h, req(hanging)).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.text);
    assert_eq!(c.json["status"], "cancelled");
    assert_error(
        &call(&h, req(hanging)).await,
        StatusCode::CONFLICT,
        "already cancelled",
    );
    assert_error(
        &call(&h, req(999)).await,
        StatusCode::NOT_FOUND,
        "no job 999",
    );

    // A finished job: its failure reason, logs, spec.
    let failed = submit(&h, "build-fails").await;
    h.finish(failed).await;
    let c = get(&h, &format!("/job/performance/{failed}"), None).await;
    assert_eq!(c.json["status"], "build_failed");
    assert!(c.json["error"].as_str().unwrap().contains("RUN failed"));
    let done = submit(&h, "perf=2").await;
    h.finish(done).await;
    let c = get(&h, &format!("/job/{done}/logs"), None).await;
    assert_eq!(c.status, StatusCode::OK);
    assert!(
        c.text.contains("===== build log =====") && c.text.contains("fake run"),
        "{}",
        c.text
    );
    std::fs::write(h.svc.job_dir(done).spec(), r#"{"ociVersion": "1.0.2"}"#).unwrap();
    let c = get(&h, &format!("/job/{done}/spec"), None).await;
    assert_eq!(c.json["ociVersion"], "1.0.2");
}

#[tokio::test]
async fn lists_paginate_and_refuse_bad_queries() {
    let h = fake_service(|_| {}).await;
    for _ in 0..3 {
        submit(&h, "x").await;
    }
    let c = get(&h, "/jobs?limit=2", None).await;
    assert_eq!(c.json["total"], 3);
    let ids: Vec<i64> = c.json["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![3, 2]);
    assert_eq!(c.json["next"], "/jobs?limit=2&before=2");
    let c = get(&h, "/jobs?limit=2&before=2", None).await;
    assert_eq!(c.json["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(c.json["next"], Value::Null);
    assert_error(
        &get(&h, "/jobs?limit=x", None).await,
        StatusCode::BAD_REQUEST,
        "bad query",
    );
    assert_error(
        &get(&h, "/jobs?bogus=1", None).await,
        StatusCode::BAD_REQUEST,
        "bad query",
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let h = fake_service(|_| {}).await;
    let c = get(&h, "/healthz", None).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.text);
    assert_eq!(c.json["ok"], true);
    assert_eq!(
        c.json["buildkit"],
        serde_json::json!({"ok": true, "version": "fake-buildkit"})
    );
    assert_eq!(c.json["runtime"]["version"], "fake-runtime");
    assert!(c.json["state_dir"]["path"].is_string());
    assert!(
        c.json["build_sources"]
            .as_str()
            .unwrap()
            .starts_with("images only from 127.0.0.1:5000")
    );
    h.builder
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let c = get(&h, "/healthz", None).await;
    assert_eq!(c.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(c.json["buildkit"]["ok"], false);
    assert!(
        c.json["buildkit"]["error"]
            .as_str()
            .unwrap()
            .contains("down")
    );
    let c = get(&h, "/metrics", None).await;
    assert_eq!(c.status, StatusCode::OK);
    assert!(
        c.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(c.text.contains("perfbox_queue_depth 0"), "{}", c.text);
}

#[tokio::test]
async fn tokens_are_required_and_owners_see_only_their_jobs() {
    let h = fake_service(|c| {
        c.tokens = vec![
            crate::config::Token::clear("alice", "alice-secret-1"),
            // bob's is kept hashed, as `perfbox token new` prints it: sha256("bob-secret-22").
            crate::config::Token {
                name: "bob".into(),
                token: None,
                sha256: Some(
                    "416b11aaf26760a8cc99fa15978ff9be2396347b01beb743d9f8b83f07716ea5".into(),
                ),
            },
        ];
    })
    .await;
    let df: &[u8] = b"# fake: perf=1\nFROM busybox\n";
    let c = post(&h, &[("file", Some("d"), df)], None).await;
    assert_error(&c, StatusCode::UNAUTHORIZED, "missing Authorization");
    assert_eq!(c.headers["www-authenticate"], "Bearer");
    assert_error(
        &get(&h, "/jobs", Some("wrong")).await,
        StatusCode::UNAUTHORIZED,
        "invalid token",
    );
    let c = post(&h, &[("file", Some("d"), df)], Some("alice-secret-1")).await;
    assert_eq!(c.status, StatusCode::ACCEPTED);
    let id = c.json["id"].as_i64().unwrap();
    assert_eq!(
        get(&h, "/jobs", Some("bob-secret-22")).await.json["total"],
        0
    );
    assert_eq!(
        get(&h, "/job/1", Some("alice-secret-1")).await.json["owner"],
        "alice"
    );
    // The result, the audit and the receipt are the owner's alone.
    h.finish(id).await;
    for what in ["performance/{id}", "{id}/audit", "{id}/receipt"] {
        let path = format!("/job/{}", what.replace("{id}", &id.to_string()));
        assert_eq!(
            get(&h, &path, Some("alice-secret-1")).await.status,
            StatusCode::OK,
            "{path}"
        );
        assert_error(
            &get(&h, &path, Some("bob-secret-22")).await,
            StatusCode::NOT_FOUND,
            "no job",
        );
    }
    // /healthz and /receipt-key need no token; /metrics does.
    assert_eq!(get(&h, "/healthz", None).await.status, StatusCode::OK);
    assert_eq!(get(&h, "/receipt-key", None).await.status, StatusCode::OK);
    assert_eq!(
        get(&h, "/metrics", None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn audit_receipt_and_key_routes() {
    let h = fake_service(|_| {}).await;
    let id = submit(&h, "perf=0.25").await;
    let hung = submit(&h, "run-hangs").await;
    h.wait_for(hung, |s| s == JobStatus::Running).await;
    assert_error(
        &get(&h, &format!("/job/{hung}/receipt"), None).await,
        StatusCode::CONFLICT,
        "receipts are for finished jobs",
    );
    h.finish(id).await;

    let a = get(&h, &format!("/job/{id}/audit"), None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["job"], id);
    // The fake build daemon gives builds no cgroup of their own: that rule fails, with why.
    assert_eq!(a.json["ok"], false);
    let failed: Vec<&Value> = a.json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["ok"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["rule"], "build_cgroup");
    assert_eq!(failed[0]["evidence"][0]["path"], "/build/cgroup");

    let key = get(&h, "/receipt-key", None).await;
    assert_eq!(key.json["algorithm"], "ed25519");
    let r = get(&h, &format!("/job/{id}/receipt"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let key = crate::jobs::receipt::parse_public_key(&key.text).unwrap();
    let body = crate::jobs::receipt::verify(&r.json, &key).unwrap();
    assert_eq!(body["perf"], 0.25);

    assert_error(
        &get(&h, "/job/999/audit", None).await,
        StatusCode::NOT_FOUND,
        "no job 999",
    );
    assert_error(
        &get(&h, "/job/x/receipt", None).await,
        StatusCode::BAD_REQUEST,
        "",
    );
    h.svc.cancel(hung, &None).await.unwrap();
}

#[tokio::test]
async fn quotas_answer_429_saying_which_with_retry_after() {
    let h = fake_service(|c| {
        c.quotas.submissions_per_minute = 3;
        c.quotas.queued_per_owner = 2;
        c.max_concurrent_builds = 1;
    })
    .await;
    // The first build hangs in the only build slot: the others stay queued behind it.
    let df: &[u8] = b"# fake: build-hangs\nFROM busybox\n";
    let mut codes = vec![];
    let mut refusals = vec![];
    for _ in 0..5 {
        let c = post(&h, &[("file", Some("d"), df)], None).await;
        codes.push(c.status);
        if c.status == StatusCode::TOO_MANY_REQUESTS {
            refusals.push((
                c.json["error"].as_str().unwrap().to_owned(),
                c.headers.get("retry-after").cloned(),
            ));
        }
    }
    let accepted = codes.iter().filter(|c| **c == StatusCode::ACCEPTED).count();
    assert!(accepted <= 3, "{codes:?}");
    assert!(
        refusals
            .iter()
            .any(|(m, r)| m.contains("submissions_per_minute") && r.is_some()),
        "{refusals:?}"
    );
    assert!(
        refusals
            .iter()
            .all(|(m, _)| m.contains("submissions_per_minute") || m.contains("queued_per_owner")),
        "{refusals:?}"
    );
}

#[tokio::test]
async fn a_job_cancelled_while_queued_still_calls_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = fake_service(|c| {
        c.max_concurrent_builds = 1;
        c.callbacks.allowed_hosts = vec![addr.to_string()];
        c.callbacks.secret = Some("a-secret-of-16-chars".into());
    })
    .await;
    // The only build slot hangs: the next job stays queued.
    let _blocker = submit(&h, "build-hangs").await;
    let url = format!("http://{addr}/hook");
    let c = post(
        &h,
        &[
            ("file", Some("d"), b"# fake: perf=1\nFROM busybox\n"),
            ("callback_url", None, url.as_bytes()),
        ],
        None,
    )
    .await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.text);
    let id = c.json["id"].as_i64().unwrap();
    let req = Request::delete(format!("/job/{id}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&h, req).await.status, StatusCode::OK);
    let (mut conn, _) = tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept())
        .await
        .expect("the callback came")
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let n = conn.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    assert!(text.contains("\"status\":\"cancelled\""), "{text}");
    assert!(text.contains(&format!("\"job\":{id}")), "{text}");
}

async fn post_named(h: &FakeService, filename: &str, script: &str, token: &str) -> JobId {
    let df = format!("# fake: {script}\nFROM busybox\n");
    let c = post(h, &[("file", Some(filename), df.as_bytes())], Some(token)).await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.text);
    let id = c.json["id"].as_i64().unwrap();
    h.finish(id).await;
    id
}

fn two_owners(c: &mut crate::config::Config) {
    c.tokens = vec![
        crate::config::Token::clear("alice", "alice-secret-1"),
        crate::config::Token::clear("bob", "bob-secret-22"),
    ];
}

#[tokio::test]
async fn pages_show_a_caller_what_the_api_shows_and_nothing_before_a_token() {
    let h = fake_service(two_owners).await;
    let alice = "alice-secret-1";
    let a = post_named(&h, "alice-<i id=x>.Dockerfile", "perf=0.7", alice).await;
    let b = post_named(
        &h,
        "bob-secret-plan.Dockerfile",
        "perf=0.9",
        "bob-secret-22",
    )
    .await;
    for path in ["/", "/board", "/submit", &format!("/job/{a}/view")] {
        // No token: a page that asks for one and holds no job.
        let c = get(&h, path, None).await;
        assert_eq!(c.status, StatusCode::OK, "{path}");
        assert_eq!(c.headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let csp = c.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert_eq!(c.headers[header::CACHE_CONTROL], "no-store");
        assert!(
            c.text.contains("Token needed") && c.text.contains("token-form"),
            "{path}"
        );
        for secret in ["alice-", "bob-secret-plan", "0.7", "0.9"] {
            assert!(
                !c.text.contains(secret),
                "{path} without a token shows {secret:?}"
            );
        }
        // A wrong token: 401, still nothing.
        let c = get(&h, path, Some("wrong")).await;
        assert_eq!(c.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(c.text.contains("invalid token") && !c.text.contains("bob-secret-plan"));
    }
    // alice sees her job, escaped, and never bob's.
    let c = get(&h, "/", Some(alice)).await;
    assert_eq!(c.status, StatusCode::OK);
    assert!(
        c.text.contains("alice-&lt;i id=x&gt;.Dockerfile"),
        "{}",
        c.text
    );
    assert!(!c.text.contains("<i id=x") && !c.text.contains("bob-secret-plan"));
    assert!(c.text.contains(&format!("data-job=\"{a}\"")) && c.text.contains("0.7"));
    let c = get(&h, &format!("/job/{b}/view"), Some(alice)).await;
    assert_eq!(c.status, StatusCode::NOT_FOUND);
    assert!(c.text.contains(&format!("no job {b}")) && !c.text.contains("bob-secret-plan"));
    let c = get(&h, &format!("/job/{a}/view"), Some(alice)).await;
    assert_eq!(c.status, StatusCode::OK);
    assert!(c.text.contains("Succeeded") && c.text.contains("0.7"));
    assert!(c.text.contains(&format!("/job/{a}/logs?follow=1")));
    let c = get(&h, "/board", Some(alice)).await;
    assert!(
        c.text.contains("0.7") && !c.text.contains("0.9"),
        "{}",
        c.text
    );
    // Bad queries are pages with the API's message.
    let c = get(&h, "/?status=bogus", Some(alice)).await;
    assert_eq!(c.status, StatusCode::BAD_REQUEST);
    assert!(c.text.contains("unknown status"));
    assert_eq!(
        get(&h, "/job/0/view", Some(alice)).await.status,
        StatusCode::BAD_REQUEST
    );
    // The assets come from the binary.
    let c = get(&h, "/assets/app.js", None).await;
    assert_eq!(c.status, StatusCode::OK);
    assert!(
        c.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(c.text.contains("sessionStorage"));
}

#[tokio::test]
async fn lists_filter_by_status_and_the_leaderboard_ranks_with_ties() {
    let h = fake_service(|_| {}).await;
    let mut ids = vec![];
    for script in [
        "perf=0.5",
        "build-fails",
        "perf=0.9",
        "perf=0.5",
        "run-no-perf",
    ] {
        let id = submit(&h, script).await;
        h.finish(id).await;
        ids.push(id);
    }
    let c = get(&h, "/jobs?status=failed", None).await;
    let listed: Vec<i64> = c.json["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, vec![ids[4], ids[1]]);
    assert_eq!(c.json["total"], 2);
    let c = get(&h, "/jobs?status=succeeded,build_failed&limit=2", None).await;
    assert_eq!(c.json["total"], 4);
    assert_eq!(
        c.json["next"],
        format!(
            "/jobs?limit=2&before={}&status=succeeded,build_failed",
            ids[2]
        )
    );
    assert_error(
        &get(&h, "/jobs?status=done", None).await,
        StatusCode::BAD_REQUEST,
        "unknown status \"done\"",
    );

    let c = get(&h, "/leaderboard?per=job", None).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.text);
    assert_eq!(c.json["direction"], "higher");
    let entries = c.json["entries"].as_array().unwrap();
    let ranks: Vec<(i64, i64)> = entries
        .iter()
        .map(|e| (e["rank"].as_i64().unwrap(), e["job"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        ranks,
        vec![(1, ids[2]), (2, ids[0]), (2, ids[3])],
        "ties share a rank"
    );
    assert!(
        entries[0]["times"]["finished_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_error(
        &get(&h, "/leaderboard?per=team", None).await,
        StatusCode::BAD_REQUEST,
        "per must be",
    );
}

#[tokio::test]
async fn a_public_leaderboard_shows_every_owner_but_not_their_jobs() {
    let h = fake_service(|c| {
        two_owners(c);
        c.leaderboard.public = true;
        c.leaderboard.direction = crate::config::Direction::Lower;
    })
    .await;
    let a = post_named(&h, "a.Dockerfile", "perf=0.7", "alice-secret-1").await;
    post_named(&h, "b-plan.Dockerfile", "perf=0.2", "bob-secret-22").await;
    post_named(&h, "b2.Dockerfile", "perf=0.4", "bob-secret-22").await;
    let c = get(&h, "/leaderboard", Some("alice-secret-1")).await;
    assert_eq!(c.json["direction"], "lower");
    assert_eq!(c.json["public"], true);
    let e = c.json["entries"].as_array().unwrap();
    assert_eq!(e.len(), 2, "best per owner: {e:?}");
    assert_eq!(
        (e[0]["owner"].as_str(), e[0]["perf"].as_f64()),
        (Some("bob"), Some(0.2))
    );
    assert!(
        e[0].get("job").is_none() && e[0].get("filename").is_none(),
        "{e:?}"
    );
    assert_eq!(e[1]["job"], a);
    let page = get(&h, "/board", Some("alice-secret-1")).await.text;
    assert!(page.contains("bob") && page.contains("0.2") && !page.contains("b-plan"));
    assert!(page.contains("lower"));
    // A public board needs a token all the same.
    assert_eq!(
        get(&h, "/leaderboard", None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_jobs_page_pages_and_keeps_its_filter() {
    let h = fake_service(|_| {}).await;
    let mut ids = vec![];
    for i in 0..(super::web::PAGE_SIZE + 5) {
        let id = submit(&h, if i % 2 == 0 { "perf=1" } else { "build-fails" }).await;
        h.finish(id).await;
        ids.push(id);
    }
    let rows = |text: &str| text.matches("<tr data-job=").count();
    let first = get(&h, "/", None).await.text;
    assert_eq!(rows(&first), super::web::PAGE_SIZE);
    let oldest_shown = ids[ids.len() - super::web::PAGE_SIZE];
    let older = format!("href=\"/?before={oldest_shown}\"");
    assert!(first.contains(&older), "no link to older jobs: {first}");
    let second = get(&h, &format!("/?before={oldest_shown}"), None)
        .await
        .text;
    assert_eq!(rows(&second), 5);
    assert!(second.contains("Newest") && !second.contains("Older"));
    // A filter stays on through the pages; 15 failed jobs fit on one page.
    let failed = get(&h, "/?status=failed", None).await.text;
    assert_eq!(rows(&failed), 15);
    assert!(!failed.contains("data-status=\"succeeded\""));
    assert!(failed.contains("aria-current=\"page\">Failed"));
}
