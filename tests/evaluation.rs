//! What an evaluation service needs (issue 15), against the real `perfbox serve`: usage measured
//! by the host, a read-only dataset at /input, answers held until the job ends (`?wait=`),
//! signed callbacks to a loopback receiver, idempotent submits, RFC 3339 times. Traffic goes to
//! 127.0.0.1 only.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::Mac;
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

use common::service::{Service, stop_all};
use common::{TestDir, buildkit_socket, require_buildkitd, require_setup};

fn record(s: &Service, id: i64) -> Value {
    s.curl(&[&format!("/job/{id}")]).1
}

/// A CPU-bound job shows CPU time, one that holds 100 MB shows its peak memory, both read from
/// the job's cgroup by perfbox; the record's times are RFC 3339 too.
fn usage_is_measured_by_the_host() -> Result<(), Failed> {
    let s = Service::start("eval-usage", &[("PERFBOX_MEMORY_BYTES", "402653184")]);
    let cpu = s.submit(
        "FROM busybox\nCMD i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; echo '{\"perf\": 1}' > /data/perf.json\n",
    );
    // busybox tail -c N keeps the last N bytes in memory.
    let mem = s.submit(
        "FROM busybox\nCMD head -c 104857600 /dev/zero | tail -c 104857600 | wc -c > /tmp/n; echo '{\"perf\": 2}' > /data/perf.json\n",
    );
    assert_eq!(s.wait(cpu)["perf"], 1.0);
    assert_eq!(s.wait(mem)["perf"], 2.0);
    let rc = record(&s, cpu);
    let u = &rc["usage"];
    println!("  CPU-bound job: {u}");
    assert!(u["source"].as_str().unwrap().starts_with("cgroup"), "{rc}");
    let (cpu_s, user_s, wall) = (
        u["cpu_seconds"].as_f64().unwrap(),
        u["user_seconds"].as_f64().unwrap(),
        u["wall_seconds"].as_f64().unwrap(),
    );
    assert!(cpu_s > 0.2, "a busy loop used {cpu_s} s of CPU");
    assert!(user_s > 0.5 * cpu_s, "mostly user time: {u}");
    assert!(
        cpu_s <= wall * 1.5 + 0.1,
        "one CPU at most (cpu_millicores 1000): {u}"
    );
    let rm = record(&s, mem);
    let peak = rm["usage"]["peak_memory_bytes"].as_u64().unwrap();
    println!("  100 MB job: {}", rm["usage"]);
    assert!(peak >= 100 << 20, "peak {peak} under 100 MiB");
    assert!(
        rc["usage"]["peak_memory_bytes"].as_u64().unwrap() < 64 << 20,
        "the busy loop held little: {u}"
    );
    // Times: the numbers, and the same instants as RFC 3339.
    let created = rc["created_at"].as_f64().unwrap();
    let text = rc["times"]["created_at"].as_str().unwrap();
    let parsed = humantime::parse_rfc3339(text)?
        .duration_since(UNIX_EPOCH)?
        .as_secs_f64();
    assert!((parsed - created).abs() < 0.002, "{text} vs {created}");
    assert!(rc["times"]["finished_at"].is_string(), "{rc}");
    let (_, list) = s.curl(&["/jobs"]);
    assert!(list["jobs"][0]["times"]["created_at"].is_string(), "{list}");
    Ok(())
}

/// A job that asked for the dataset reads it at /input and cannot write it; its record and
/// spec say so, and its audit passes. An unknown dataset is a 400 that queues nothing.
fn a_dataset_is_read_only_at_input() -> Result<(), Failed> {
    let data = TestDir::new("dataset");
    std::fs::write(data.path().join("answer.txt"), "0.42\n")?;
    // World-writable on the host: only the read-only mount keeps the job from writing it.
    Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(data.path())
        .status()?;
    let config = format!(
        "[[datasets]]\nname = \"answers\"\npath = \"{}\"\n",
        data.path().display()
    );
    let s = Service::start_config("eval-dataset", &config, &[]);
    let job = "FROM busybox\nCMD if touch /input/written 2>/dev/null || rm /input/answer.txt 2>/dev/null; then echo '{\"perf\": -1}' > /data/perf.json; else echo \"{\\\"perf\\\": $(cat /input/answer.txt)}\" > /data/perf.json; fi\n";
    let (code, v, _) = s.post_dockerfile(job, &["-F", "dataset=answers"]);
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_i64().unwrap();
    // Images carry an empty /input mount point (made when they are cached, like /data), so the
    // runtime never writes into a shared image: a job without a dataset finds it empty.
    let beside = s.submit("FROM busybox\nCMD [ -n \"$(ls -A /input)\" ] && echo '{\"perf\": -1}' > /data/perf.json || echo '{\"perf\": 3}' > /data/perf.json\n");
    assert_eq!(s.wait(id)["perf"], 0.42, "{}", s.log());
    assert_eq!(
        s.wait(beside)["perf"],
        3.0,
        "a job without a dataset sees no dataset"
    );
    assert!(!data.path().join("written").exists());
    assert!(data.path().join("answer.txt").exists());
    let rec = record(&s, id);
    assert_eq!(rec["dataset"], "answers", "{rec}");
    let spec = s.curl(&[&format!("/job/{id}/spec")]).1;
    let input = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/input")
        .expect("an /input mount");
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(
            input["options"].as_array().unwrap().iter().any(|x| x == o),
            "{input}"
        );
    }
    let audit = s.curl(&[&format!("/job/{id}/audit")]).1;
    assert_eq!(audit["ok"], true, "{audit}");
    let before = s.total_jobs();
    let (code, v, _) = s.post_dockerfile("FROM busybox\n", &["-F", "dataset=secrets"]);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("answers"), "{v}");
    assert_eq!(s.total_jobs(), before, "nothing queued");
    Ok(())
}

/// `?wait=60` answers as the job ends (measured against the record's own end time); a short
/// wait on a long job answers with its state; a bad wait is a 400. `submit --wait` reports a
/// quick job without polling delays.
fn wait_answers_when_the_job_ends() -> Result<(), Failed> {
    let s = Service::start("eval-wait", &[]);
    let id = s.submit("FROM busybox\nCMD sleep 1; echo '{\"perf\": 5}' > /data/perf.json\n");
    let (code, v) = s.curl(&[&format!("/job/performance/{id}?wait=60")]);
    let answered = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    assert_eq!(code, 200);
    assert_eq!(v["perf"], 5.0, "{v}");
    let finished = record(&s, id)["finished_at"].as_f64().unwrap();
    let late = answered - finished;
    println!(
        "  answered {:.1} ms after the job's end (curl's own start-up included)",
        late * 1000.0
    );
    assert!(late < 0.5, "answered {late} s after the end");

    let long = s.submit("FROM busybox\nCMD sleep 5; echo '{\"perf\": 6}' > /data/perf.json\n");
    let t = Instant::now();
    let (_, v) = s.curl(&[&format!("/job/performance/{long}?wait=0.5")]);
    assert!(
        matches!(
            v["status"].as_str(),
            Some("queued" | "building" | "running")
        ),
        "{v}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
    let (code, v) = s.curl(&[&format!("/job/performance/{long}?wait=-1")]);
    assert_eq!(code, 400, "{v}");

    let path = s.dir.path().join("quick.Dockerfile");
    std::fs::write(
        &path,
        "FROM busybox\nCMD echo '{\"perf\": 7}' > /data/perf.json\n",
    )?;
    let started = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let out = Command::new(env!("CARGO_BIN_EXE_perfbox"))
        .args(["submit", "--wait"])
        .arg(&path)
        .env("PERFBOX_URL", s.url())
        .output()?;
    let done = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7.0");
    // How long after the job's end the CLI printed its perf (its start-up included).
    let quick = String::from_utf8_lossy(&out.stderr)
        .split_whitespace()
        .nth(1)
        .and_then(|id| id.parse::<i64>().ok())
        .ok_or("no job id in the CLI's progress")?;
    let r = record(&s, quick);
    let (created, finished) = (
        r["created_at"].as_f64().unwrap(),
        r["finished_at"].as_f64().unwrap(),
    );
    println!(
        "  submit --wait: {:.0} ms in all for a job of {:.0} ms (submit to end); perf printed {:.0} ms after the end",
        (done - started) * 1000.0,
        (finished - created) * 1000.0,
        (done - finished) * 1000.0
    );
    assert_eq!(s.wait(long)["perf"], 6.0);
    Ok(())
}

/// A loopback receiver gets the final answer once, signed with the configured secret; the
/// record says it was delivered. A host not allowed is a 400 that queues nothing.
fn callbacks_arrive_signed() -> Result<(), Failed> {
    let receiver = TcpListener::bind("127.0.0.1:0")?;
    let port = receiver.local_addr()?.port();
    let secret = "callback-secret-0123456789";
    let s = Service::start(
        "eval-callback",
        &[
            ("PERFBOX_CALLBACK_HOSTS", &format!("127.0.0.1:{port}")),
            ("PERFBOX_CALLBACK_SECRET", secret),
        ],
    );
    let url = format!("http://127.0.0.1:{port}/done");
    let (code, v, _) = s.post_dockerfile(
        "FROM busybox\nCMD echo '{\"perf\": 0.5}' > /data/perf.json\n",
        &["-F", &format!("callback_url={url}")],
    );
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_i64().unwrap();
    receiver.set_nonblocking(false)?;
    let (mut conn, _) = receiver.accept()?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut headers = vec![];
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        headers.push(line.trim().to_lowercase());
    }
    let len: usize = headers
        .iter()
        .find_map(|h| {
            h.strip_prefix("content-length: ")
                .map(|v| v.parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
    drop(conn);
    assert!(headers[0].starts_with("post /done "), "{headers:?}");
    let got = headers
        .iter()
        .find_map(|h| h.strip_prefix("x-perfbox-signature: sha256="))
        .expect("a signature")
        .to_owned();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())?;
    mac.update(&body);
    mac.verify_slice(&hex::decode(&got)?)
        .map_err(|_| "the signature does not verify")?;
    let answer: Value = serde_json::from_slice(&body)?;
    assert_eq!(
        answer,
        serde_json::json!({"job": id, "status": "succeeded", "perf": 0.5})
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rec = record(&s, id);
        if rec["callback"]["delivered"] == true {
            assert_eq!(rec["callback"]["attempts"], 1, "{rec}");
            break;
        }
        assert!(Instant::now() < deadline, "delivery never recorded: {rec}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = s.total_jobs();
    let (code, v, _) = s.post_dockerfile(
        "FROM busybox\n",
        &["-F", "callback_url=http://169.254.169.254/latest/meta-data"],
    );
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not allowed"), "{v}");
    assert_eq!(s.total_jobs(), before, "nothing queued");
    Ok(())
}

/// A repeated Idempotency-Key yields the first job (200, `Idempotent-Replayed`), even when the
/// repeats arrive at once; the same key for another Dockerfile is a 409.
fn idempotent_submits_make_one_job() -> Result<(), Failed> {
    let s = Service::start("eval-idem", &[]);
    let df = "FROM busybox\nCMD echo '{\"perf\": 8}' > /data/perf.json\n";
    let key = ["-H", "Idempotency-Key: run-2026-11-30-a"];
    let (code, first, _) = s.post_dockerfile(df, &key);
    assert_eq!(code, 202, "{first}");
    let (code, again, head) = s.post_dockerfile(df, &key);
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["id"], first["id"]);
    assert!(head.contains("idempotent-replayed: true"), "{head}");
    let (code, v, _) = s.post_dockerfile("FROM busybox\nCMD true\n", &key);
    assert_eq!(code, 409, "{v}");
    // Eight at once with a fresh key: one job.
    let ids: std::collections::BTreeSet<_> = std::thread::scope(|scope| {
        let burst: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let (_, v, _) = s.post_dockerfile(df, &["-H", "Idempotency-Key: burst-1"]);
                    v["id"].as_i64().ok_or(v.to_string())
                })
            })
            .collect();
        burst.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(ids.len() == 1 && ids.iter().all(Result::is_ok), "{ids:?}");
    assert_eq!(s.total_jobs(), 2);
    assert_eq!(s.wait(first["id"].as_i64().unwrap())["perf"], 8.0);
    Ok(())
}

/// A tar of `entries` (path, content), with raw names (hostile ones included).
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A context tar.gz whose Dockerfile COPYs a script and runs it: the job reports the script's
/// perf; `perfbox submit DIR` does the same from a directory; the build's record says it read
/// the context and its audit passes. Broken, escaping and oversized archives are 400s that
/// queue nothing.
fn a_context_archive_is_built_and_run() -> Result<(), Failed> {
    let s = Service::start(
        "eval-context",
        &[("PERFBOX_CONTEXT_MAX_ARCHIVE_BYTES", "1048576")],
    );
    let dockerfile =
        "FROM busybox\nCOPY score.sh /score.sh\nCOPY data/ /data-in/\nCMD sh /score.sh\n";
    let script = "echo \"{\\\"perf\\\": $(cat /data-in/value)}\" > /data/perf.json\n";
    let archive = tar_of(&[
        ("Dockerfile", dockerfile.as_bytes()),
        ("score.sh", script.as_bytes()),
        ("data/value", b"0.77"),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&archive)?;
    let path = s.dir.path().join("ctx.tar.gz");
    std::fs::write(&path, gz.finish()?)?;
    let (_, v, _) = s.post(&["-F", &format!("context=@{}", path.display())]);
    let id = v["id"].as_i64().ok_or(format!("no id: {v}"))?;
    let answer = s.wait(id);
    assert_eq!(answer["perf"], 0.77, "{answer}\n{}", s.log());
    let rec = record(&s, id);
    assert_eq!(rec["build"]["context"], true, "{rec}");
    let job_dir = s.state().join("jobs").join(id.to_string());
    assert!(
        job_dir.join("context.archive").is_file(),
        "the archive is kept"
    );
    assert!(
        !job_dir.join("context").exists(),
        "the unpacked context is removed after the build"
    );
    let audit = s.curl(&[&format!("/job/{id}/audit")]).1;
    assert_eq!(audit["ok"], true, "{audit}");

    // The CLI packs a directory.
    let dir = TestDir::new("ctx-dir");
    std::fs::create_dir_all(dir.path().join("data"))?;
    std::fs::write(dir.path().join("Dockerfile"), dockerfile)?;
    std::fs::write(dir.path().join("score.sh"), script)?;
    std::fs::write(dir.path().join("data/value"), "0.66")?;
    let out = Command::new(env!("CARGO_BIN_EXE_perfbox"))
        .args(["submit", "--wait"])
        .arg(dir.path())
        .env("PERFBOX_URL", s.url())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0.66");

    let before = s.total_jobs();
    let junk = s.dir.path().join("junk.tar");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"definitely not an archive".to_vec(), "not a readable"),
        (
            tar_of(&[("Dockerfile", b"FROM busybox\n"), ("../../escape", b"x")]),
            "climbs out",
        ),
        (
            tar_of(&[("Dockerfile", b"FROM busybox\n"), ("/etc/cron.d/x", b"x")]),
            "absolute",
        ),
        (tar_of(&[("big", &vec![0u8; 1 << 20])]), "limit"),
    ];
    for (bytes, want) in cases {
        std::fs::write(&junk, bytes)?;
        let (code, v, _) = s.post(&["-F", &format!("context=@{}", junk.display())]);
        assert!((400..500).contains(&code), "{want}: {code} {v}");
        assert!(v.to_string().contains(want), "{want}: {v}");
    }
    assert_eq!(s.total_jobs(), before, "no bad archive queued a job");
    Ok(())
}

fn main() {
    require_setup();
    require_buildkitd(&buildkit_socket());
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test(
            "usage_is_measured_by_the_host",
            usage_is_measured_by_the_host,
        ),
        Trial::test(
            "a_dataset_is_read_only_at_input",
            a_dataset_is_read_only_at_input,
        ),
        Trial::test(
            "wait_answers_when_the_job_ends",
            wait_answers_when_the_job_ends,
        ),
        Trial::test("callbacks_arrive_signed", callbacks_arrive_signed),
        Trial::test(
            "idempotent_submits_make_one_job",
            idempotent_submits_make_one_job,
        ),
        Trial::test(
            "a_context_archive_is_built_and_run",
            a_context_archive_is_built_and_run,
        ),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    stop_all();
    conclusion.exit();
}
