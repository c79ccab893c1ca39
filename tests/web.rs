//! The web page (issue 14) in a real browser: Debian's chromium, headless, driven over WebDriver
//! (chromedriver, with the fantoccini client) against the real `perfbox serve`, its real
//! BuildKit and runtime. Each trial starts its own service and browser. Screenshots of every
//! page land in `target/tmp/web-screenshots/`.
//!
//! The browser reaches 127.0.0.1 only: every other host name resolves to nothing
//! (`--host-resolver-rules`), and its background services are off.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::json;

use common::service::{Service, free_port, stop_all};
use common::{TestDir, block_on, buildkit_socket, require_buildkitd, require_setup, skipped, user};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ALICE: &str = "alice-web-token-1";
const BOB: &str = "bob-web-token-22";

/// A job that takes a few seconds (so that a page sees it move) and writes perf 0.8123.
const GOOD: &str = "FROM busybox\nRUN echo building-step && sleep 2\n\
                    CMD echo run-line; sleep 4; echo '{\"perf\": 0.8123}' > /data/perf.json\n";
const BROKEN: &str = "FROM busybox\nRUN echo about-to-fail; exit 3\n";
/// Builds for 3 s (a list sees it before it runs), then runs for a minute.
const LONG: &str = "FROM busybox\nRUN sleep 3\nCMD sleep 60\n";

/// A trial's body.
type Body = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let tests: [(&str, Body); 4] = [
        (
            "submit_watch_rank_and_fail_in_the_browser_with_two_tokens",
            two_tokens,
        ),
        ("dump_dom_shows_the_latest_job_and_its_perf", dump_dom),
        (
            "the_form_sends_a_context_and_build_args_and_shows_refusals",
            form_fields,
        ),
        ("pages_fit_a_phone_and_work_from_the_keyboard", phone),
    ];
    let missing = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .find(|p| !Path::new(p).exists());
    let trials = tests
        .into_iter()
        .map(|(name, f)| match missing {
            Some(p) => skipped(
                name,
                &format!("{p} is missing: scripts/setup installs chromium and chromium-driver"),
            ),
            None => Trial::test(name, f),
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    stop_all();
    conclusion.exit();
}

/// Where screenshots go.
fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a loopback port, and one headless chromium session through it.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: TestDir,
}

impl Browser {
    /// A desktop window of `width` × `height`, or with `phone`, a phone's screen of that size
    /// (chromium's device emulation: a headless window is never narrower than 500 px).
    async fn start(width: u32, height: u32, phone: bool) -> Browser {
        let port = free_port();
        let profile = TestDir::new("chromium-profile");
        // Its own process group: the browsers it starts go with it, even when a trial panics
        // before closing its session.
        let driver = Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let args = vec![
            "--headless=new".to_string(),
            // As root, chromium's own sandbox cannot start; the browser is test tooling here.
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-quic".into(),
            "--disable-extensions".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            // Nothing but loopback: any other host name resolves to nothing.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        let mut options = json!({ "binary": CHROMIUM, "args": args });
        if phone {
            options["mobileEmulation"] = json!({
                "deviceMetrics": { "width": width, "height": height, "pixelRatio": 2.0, "touch": true }
            });
        }
        caps.insert("goog:chromeOptions".into(), options);
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("no WebDriver session: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        Browser {
            driver,
            client: Some(client),
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn goto(&self, url: &str) {
        self.c().goto(url).await.unwrap();
    }

    /// The text of the first element matching `css`, or "" when there is none.
    async fn text(&self, css: &str) -> String {
        match self.c().find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Wait until `check` (JavaScript returning a value) returns something truthy; that value.
    async fn until(&self, what: &str, within: Duration, check: &str) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self
                .c()
                .execute(check, vec![])
                .await
                .unwrap_or(serde_json::Value::Null);
            let truthy = match &v {
                serde_json::Value::Null => false,
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.text("body").await;
                panic!("{what}: not within {within:?}; the page says:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Wait until the element `css` shows `want` in its text.
    async fn until_text(&self, css: &str, want: &str, within: Duration) {
        let check = format!(
            "const e = document.querySelector({css:?}); return !!e && e.textContent.includes({want:?});"
        );
        self.until(&format!("{css} shows {want:?}"), within, &check)
            .await;
    }

    async fn shot(&self, name: &str) {
        let png = self.c().screenshot().await.unwrap();
        let path = shots().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        println!("screenshot: {}", path.display());
    }

    /// Give the token in the page's token form.
    async fn use_token(&self, token: &str) {
        self.until(
            "the token form is shown",
            Duration::from_secs(10),
            "return !document.getElementById('token-form').hidden;",
        )
        .await;
        let input = self.c().find(Locator::Id("token")).await.unwrap();
        input.send_keys(token).await.unwrap();
        let form = self.c().find(Locator::Id("token-form")).await.unwrap();
        form.find(Locator::Css("button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// Click the element with this id.
    async fn click(&self, id: &str) {
        let e = self.c().find(Locator::Id(id)).await.unwrap();
        e.click().await.unwrap();
    }

    /// Wait until the job page shows `status`.
    async fn until_status(&self, status: &str, within: Duration) {
        let check = format!(
            "const e = document.querySelector('#summary [data-status]'); return !!e && e.dataset.status === {status:?};"
        );
        self.until(&format!("the job page shows {status}"), within, &check)
            .await;
    }

    /// Leave `n` in the page's window (a reload loses it); [`Self::marked`] reads it back.
    async fn mark(&self, n: i64) {
        let js = format!("window.__mark = {n}; return true;");
        self.c().execute(&js, vec![]).await.unwrap();
    }

    async fn marked(&self) -> serde_json::Value {
        self.c()
            .execute("return window.__mark;", vec![])
            .await
            .unwrap()
    }

    /// The status the job page shows.
    async fn status(&self) -> String {
        let v = self
            .c()
            .execute(
                "const e = document.querySelector('#summary [data-status]'); return e ? e.dataset.status : '';",
                vec![],
            )
            .await
            .unwrap();
        v.as_str().unwrap_or("").to_owned()
    }

    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

fn ready() {
    require_setup();
    require_buildkitd(&buildkit_socket());
}

/// Submit `dockerfile` as `filename` with curl (optionally with a token); the job id.
fn submit_as(s: &Service, token: Option<&str>, filename: &str, dockerfile: &str) -> i64 {
    let dir = TestDir::new("web-upload");
    let path = dir.path().join("upload");
    std::fs::write(&path, dockerfile).unwrap();
    let field = format!("file=@{};filename=\"{filename}\"", path.display());
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec!["-F", field.as_str()];
    if let Some(a) = &auth {
        args.extend(["-H", a.as_str()]);
    }
    let (code, body, _) = s.post(&args);
    assert_eq!(code, 202, "{body}");
    body["id"].as_i64().unwrap()
}

fn wait_running(s: &Service, id: i64, token: &str) {
    let auth = format!("Authorization: Bearer {token}");
    let path = format!("/job/performance/{id}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.curl(&["-H", &auth, &path]).1["status"] != "running" {
        assert!(Instant::now() < deadline, "job {id} never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_final(s: &Service, id: i64, token: Option<&str>) -> serde_json::Value {
    s.wait_with(id, token, Duration::from_secs(180))
}

/// With two tokens: the page asks for one; alice submits through the form, lands on her job's
/// page and watches it move to succeeded with its perf and logs, without a reload; the job is on
/// the leaderboard; a failed job shows its reason; a filename made of HTML stays text. Then bob
/// sees none of it (list, job page, leaderboard), and cancels his own job from its page.
fn two_tokens() -> Result<(), Failed> {
    ready();
    let tokens = format!("alice={ALICE},bob={BOB}");
    let s = Service::start("web-tokens", &[("PERFBOX_TOKENS", tokens.as_str())]);
    let base = s.url();
    block_on(async {
        let b = Browser::start(1280, 1000, false).await;
        // Without a token the page holds no data and asks for one.
        b.goto(&format!("{base}/")).await;
        b.use_token("not-a-token").await;
        b.until_text("#token-error", "invalid token", Duration::from_secs(10))
            .await;
        b.shot("token-refused").await;
        b.use_token(ALICE).await;
        b.until_text("#who", "alice", Duration::from_secs(10)).await;
        b.until_text("#content", "No jobs here yet", Duration::from_secs(10))
            .await;

        // Submit through the form; the page moves to the job's page.
        let upload = TestDir::new("web-form");
        let path = upload.path().join("alice-score.Dockerfile");
        std::fs::write(&path, GOOD).unwrap();
        b.goto(&format!("{base}/submit")).await;
        b.until(
            "the form is shown",
            Duration::from_secs(10),
            "return !!document.getElementById('submit-form');",
        )
        .await;
        b.shot("submit").await;
        let file = b.c().find(Locator::Id("file")).await.unwrap();
        file.send_keys(path.to_str().unwrap()).await.unwrap();
        b.click("submit").await;
        let url = b
            .until(
                "the job's page opens",
                Duration::from_secs(15),
                "return /\\/job\\/\\d+\\/view$/.test(location.pathname) && location.pathname;",
            )
            .await;
        let id: i64 = url
            .as_str()
            .unwrap()
            .split('/')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        // The page updates in place: a mark set now survives to the end (no reload).
        b.until_text("#summary", "Submitted", Duration::from_secs(10))
            .await;
        let first = b.status().await;
        assert!(
            ["queued", "building", "running"].contains(&first.as_str()),
            "the page should open on a job still going, saw {first:?}"
        );
        b.mark(42).await;
        // The run's first line shows while it still runs: the log streams.
        b.until(
            "the run's output shows while the job runs",
            Duration::from_secs(60),
            "const e = document.querySelector('#summary [data-status]'); return e && e.dataset.status === 'running' && document.getElementById('log').textContent.includes('run-line');",
        )
        .await;
        b.until_status("succeeded", Duration::from_secs(180)).await;
        b.until_text("#summary .big", "0.8123", Duration::from_secs(5))
            .await;
        b.until(
            "the log stream ends with the run's output",
            Duration::from_secs(20),
            "const l = document.getElementById('log'); return l.dataset.complete === '1' && l.textContent.includes('run-line') && l.textContent.includes('building-step');",
        )
        .await;
        let mark = b.marked().await;
        assert_eq!(
            mark,
            json!(42),
            "the page was reloaded instead of updated in place"
        );
        let facts = b.text("#facts").await;
        assert!(
            facts.contains("runc") && facts.contains("memory"),
            "facts: {facts}"
        );
        let sandbox = b.text("#sandbox").await;
        assert!(sandbox.contains("Audit passed"), "sandbox: {sandbox}");
        b.shot("job-succeeded").await;

        // The leaderboard.
        b.goto(&format!("{base}/board")).await;
        b.until_text("#board", "0.8123", Duration::from_secs(10))
            .await;
        let row = b.text(&format!("#board tr[data-job='{id}']")).await;
        assert!(row.starts_with('1') && row.contains("alice"), "row: {row}");
        b.shot("leaderboard").await;

        // A failed job shows its reason; an HTML filename stays text.
        let broken = submit_as(&s, Some(ALICE), "broken.Dockerfile", BROKEN);
        let html_name = "<img src=x id=injected>.Dockerfile";
        let odd = submit_as(&s, Some(ALICE), html_name, BROKEN);
        assert_eq!(
            wait_final(&s, broken, Some(ALICE))["status"],
            "build_failed"
        );
        wait_final(&s, odd, Some(ALICE));
        b.goto(&format!("{base}/job/{broken}/view")).await;
        b.until_text("#summary .reason", "exit code: 3", Duration::from_secs(10))
            .await;
        assert_eq!(b.status().await, "build_failed");
        b.until_text("#log", "about-to-fail", Duration::from_secs(10))
            .await;
        b.shot("job-failed").await;
        b.goto(&format!("{base}/?status=failed")).await;
        b.until_text("#jobs", "Build failed", Duration::from_secs(10))
            .await;
        let listed = b.text("#jobs").await;
        assert!(
            listed.contains(html_name),
            "the name is shown as text: {listed}"
        );
        assert!(
            !listed.contains("alice-score"),
            "the failed filter shows the succeeded job: {listed}"
        );
        let injected = b.c().find_all(Locator::Id("injected")).await.unwrap();
        assert!(injected.is_empty(), "the filename became an element");
        b.goto(&format!("{base}/")).await;
        b.until_text("#jobs", "alice-score", Duration::from_secs(10))
            .await;
        b.shot("jobs").await;

        // bob: none of alice's jobs anywhere.
        b.click("forget").await;
        b.use_token(BOB).await;
        b.until_text("#who", "bob", Duration::from_secs(10)).await;
        b.until_text("#content", "No jobs here yet", Duration::from_secs(10))
            .await;
        b.goto(&format!("{base}/job/{id}/view")).await;
        b.until_text("#content", &format!("no job {id}"), Duration::from_secs(10))
            .await;
        let page = b.text("main").await;
        assert!(
            !page.contains("alice-score") && !page.contains("0.8123"),
            "{page}"
        );
        b.goto(&format!("{base}/board")).await;
        b.until_text("#content", "No succeeded jobs yet", Duration::from_secs(10))
            .await;
        b.shot("other-token").await;

        // The list follows bob's new job as it starts, in place; bob cancels it from its page.
        let long = submit_as(&s, Some(BOB), "bob-long.Dockerfile", LONG);
        b.goto(&format!("{base}/")).await;
        let row = format!("#jobs tr[data-job='{long}'] [data-status]");
        let first = b
            .until(
                "bob's job is listed",
                Duration::from_secs(10),
                &format!(
                    "const e = document.querySelector({row:?}); return e && e.dataset.status;"
                ),
            )
            .await;
        assert_ne!(first, json!("running"), "listed before it runs");
        b.mark(7).await;
        b.until(
            "the list shows bob's job running",
            Duration::from_secs(60),
            &format!("const e = document.querySelector({row:?}); return e && e.dataset.status === 'running';"),
        )
        .await;
        let mark = b.marked().await;
        assert_eq!(
            mark,
            json!(7),
            "the list was reloaded instead of updated in place"
        );
        wait_running(&s, long, BOB);
        b.goto(&format!("{base}/job/{long}/view")).await;
        b.until(
            "the cancel button",
            Duration::from_secs(10),
            "return !!document.getElementById('cancel');",
        )
        .await;
        b.click("cancel").await;
        b.until_status("cancelled", Duration::from_secs(20)).await;
        assert_eq!(wait_final(&s, long, Some(BOB))["status"], "cancelled");
        b.close().await;
    })
}

/// The acceptance command: `chromium --headless --dump-dom http://127.0.0.1:PORT/`, run
/// as an unprivileged user with flags that keep it offline, shows the latest job and its perf.
/// Also without any script: the server renders the data itself when no token is needed.
fn dump_dom() -> Result<(), Failed> {
    ready();
    let s = Service::start("web-dump", &[]);
    let id = s.submit(GOOD);
    assert_eq!(wait_final(&s, id, None)["perf"], 0.8123);
    // As an unprivileged user (the perfbox user), so that chromium keeps its own sandbox: as
    // root it would need --no-sandbox. The flags after the command's own keep it on loopback.
    let home = TestDir::new("chromium-dump");
    let st = Command::new("chown")
        .arg(user())
        .arg(home.path())
        .status()?;
    assert!(st.success());
    let out = Command::new("setpriv")
        .args(["--reuid", user(), "--regid", user(), "--init-groups", "--"])
        .arg("env")
        .arg(format!("HOME={}", home.path().display()))
        .args([
            CHROMIUM,
            "--headless",
            "--dump-dom",
            &format!("{}/", s.url()),
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        ])
        .output()?;
    let dom = String::from_utf8_lossy(&out.stdout);
    let row = dom
        .split("<tr ")
        .find(|r| r.starts_with(&format!("data-job=\"{id}\"")))
        .unwrap_or_else(|| panic!("no row for job {id} in:\n{dom}"));
    assert!(row.contains("0.8123") && row.contains("Succeeded"), "{row}");
    let (code, html) = s.try_curl(&["/"]).unwrap();
    assert_eq!(code, 200);
    assert!(html.contains(&format!("data-job=\"{id}\"")) && html.contains("0.8123"));
    Ok(())
}

/// At a phone's width no page scrolls sideways, even with a 251-character filename and a log
/// line of 3000 characters without a space; every form field has a label; the keyboard alone
/// reaches the submit button, and the skip link comes first.
fn phone() -> Result<(), Failed> {
    ready();
    let s = Service::start("web-phone", &[]);
    // No hyphen or space: nothing but the style may break it.
    let name = format!("{}.Dockerfile", "verylongname".repeat(20));
    let wide = "x".repeat(3000);
    let job =
        format!("FROM busybox\nCMD echo {wide}; echo '{{\"perf\": 0.5}}' > /data/perf.json\n");
    let id = submit_as(&s, None, &name, &job);
    assert_eq!(wait_final(&s, id, None)["perf"], 0.5);
    let base = s.url();
    block_on(async {
        let b = Browser::start(390, 844, true).await;
        for (page, shot) in [
            (format!("/job/{id}/view"), "phone-job"),
            ("/".to_string(), "phone-jobs"),
            ("/board".to_string(), "phone-leaderboard"),
            ("/submit".to_string(), "phone-submit"),
        ] {
            b.goto(&format!("{base}{page}")).await;
            if page.ends_with("view") {
                b.until_text("#log", &wide[..100], Duration::from_secs(10))
                    .await;
            }
            let widths = b
                .c()
                .execute(
                    "return [document.documentElement.scrollWidth, window.innerWidth];",
                    vec![],
                )
                .await
                .unwrap();
            let (scroll, inner) = (widths[0].as_i64().unwrap(), widths[1].as_i64().unwrap());
            b.shot(shot).await;
            assert_eq!(
                inner, 390,
                "{page} does not fit the phone: the browser widened its viewport to {inner} px"
            );
            assert!(
                scroll <= inner,
                "{page} scrolls sideways: {scroll} > {inner}"
            );
        }
        // /submit is open: every field labelled; Tab alone reaches the button.
        let unlabelled = b
            .c()
            .execute(
                "return Array.from(document.querySelectorAll('#submit-form input, #submit-form select, #submit-form textarea')).filter(e => e.labels.length === 0).map(e => e.id);",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(unlabelled, json!([]), "fields without a label");
        let body = b.c().find(Locator::Css("body")).await.unwrap();
        let mut seen = vec![];
        for _ in 0..30 {
            body.send_keys("\u{e004}").await.unwrap(); // Tab
            let focused = b
                .c()
                .execute(
                    "const e = document.activeElement; return e.id || e.textContent.trim();",
                    vec![],
                )
                .await
                .unwrap();
            let focused = focused.as_str().unwrap_or("").to_owned();
            let done = focused == "submit";
            seen.push(focused);
            if done {
                break;
            }
        }
        assert_eq!(
            seen.first().map(String::as_str),
            Some("Skip to content"),
            "{seen:?}"
        );
        assert_eq!(
            seen.last().map(String::as_str),
            Some("submit"),
            "Tab order: {seen:?}"
        );
        b.close().await;
    })
}

/// The form sends what the API takes besides a Dockerfile: a context archive (its Dockerfile
/// COPYs a file from it) and build arguments, one per line; the job's perf comes from both. A
/// refusal by the API (a build argument without `=`) is shown on the form, and queues nothing; a
/// form without any file is stopped before it is sent.
fn form_fields() -> Result<(), Failed> {
    ready();
    let s = Service::start("web-form-fields", &[]);
    let dockerfile = "FROM busybox\nARG DIGITS\nCOPY prefix.txt /prefix.txt\n\
                      RUN echo \"{\\\"perf\\\": $(cat /prefix.txt)$DIGITS}\" > /perf.json\n\
                      CMD cp /perf.json /data/perf.json\n";
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in [("Dockerfile", dockerfile.as_bytes()), ("prefix.txt", b"0.")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    }
    let dir = TestDir::new("web-context");
    let archive = dir.path().join("context.tar");
    std::fs::write(&archive, tar.into_inner().unwrap())?;
    let base = s.url();
    block_on(async {
        let b = Browser::start(1280, 1000, false).await;
        b.goto(&format!("{base}/submit")).await;
        // Nothing chosen: stopped on the page.
        b.click("submit").await;
        b.until_text(
            "#submit-error",
            "Choose a Dockerfile",
            Duration::from_secs(5),
        )
        .await;
        // The API's refusal, shown as it says it.
        let context = b.c().find(Locator::Id("context")).await.unwrap();
        context.send_keys(archive.to_str().unwrap()).await.unwrap();
        let args = b.c().find(Locator::Id("build-args")).await.unwrap();
        args.send_keys("DIGITS").await.unwrap();
        b.click("submit").await;
        b.until_text(
            "#submit-error",
            "build_arg must be NAME=value",
            Duration::from_secs(10),
        )
        .await;
        b.shot("submit-refused").await;
        assert_eq!(s.total_jobs(), 0, "a refused form queued a job");
        // Fixed: the job runs with the context and the argument.
        args.clear().await.unwrap();
        args.send_keys("DIGITS=4242").await.unwrap();
        b.click("submit").await;
        b.until_status("succeeded", Duration::from_secs(180)).await;
        b.until_text("#summary .big", "0.4242", Duration::from_secs(5))
            .await;
        b.close().await;
    })
}
