//! perfbox nodes sharing one PostgreSQL, for real: each trial starts its own cluster with
//! `scripts/cluster up 3` (Debian's PostgreSQL as the perfbox user, three `perfbox serve` nodes
//! of this build, each with its own rootless buildkitd and state dir), drives it over HTTP, and
//! takes it down (`down --purge`). Leases are 6 s so that a dead node's jobs move quickly.
//!
//! Trials: 60 jobs across the three URLs; `kill -9` of a node with running jobs (they finish
//! elsewhere; the node started again afterwards changes nothing); a node frozen past its lease
//! (SIGSTOP) that wakes up after its job ran again elsewhere (its late writes are refused); a
//! cancel through a node that does not hold the job; PostgreSQL restarted under load.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

const LEASE_SECS: u64 = 6;
/// A trial's body.
type Body = fn() -> Result<(), Failed>;
static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// A cluster of this test's own (name, ports, directories), down and purged on drop.
struct Cluster {
    env: Vec<(String, String)>,
    http: reqwest::Client,
    urls: Vec<String>,
}

fn free_base(n: u16) -> u16 {
    // A base port with base+1..base+n all free.
    loop {
        let base = common::service::free_port();
        if base > 60000 {
            continue;
        }
        if (1..=n).all(|k| std::net::TcpListener::bind(("127.0.0.1", base + k)).is_ok()) {
            return base;
        }
    }
}

impl Cluster {
    fn up(n: u16) -> Cluster {
        let name = format!(
            "cluster-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::SeqCst)
        );
        let exe = common::service::reachable_copy(env!("CARGO_BIN_EXE_perfbox").as_ref());
        let base = free_base(n);
        let env = vec![
            ("PERFBOX_CLUSTER_NAME".to_string(), name),
            ("PERFBOX_CLUSTER_PORT".into(), base.to_string()),
            (
                "PERFBOX_CLUSTER_DB_PORT".into(),
                common::service::free_port().to_string(),
            ),
            ("PERFBOX_CLUSTER_LEASE_SECS".into(), LEASE_SECS.to_string()),
            ("PERFBOX_EXE".into(), exe.display().to_string()),
        ];
        let c = Cluster {
            env,
            http: reqwest::Client::new(),
            urls: (1..=n)
                .map(|k| format!("http://127.0.0.1:{}", base + k))
                .collect(),
        };
        let out = c.script(&["up", &n.to_string()]);
        assert!(
            out.status.success(),
            "scripts/cluster up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }

    /// The end of node k's log (1-based k).
    fn log_tail(&self, k: usize) -> String {
        let log = std::fs::read_to_string(
            common::state()
                .join(&self.env[0].1)
                .join(format!("node{k}/logs/perfbox.log")),
        )
        .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Node k's perfbox pid (from `scripts/cluster status`), if it runs.
    fn pid(&self, k: usize) -> Option<i32> {
        let out = String::from_utf8(self.script(&["status"]).stdout).unwrap();
        out.lines()
            .find(|l| l.starts_with(&format!("node {k} ")))
            .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
    }

    async fn submit(&self, node: usize, perf: &str, sleep: u32) -> i64 {
        self.submit_dockerfile(
            node,
            &format!(
                "FROM alpine\nCMD sleep {sleep}; echo '{{\"perf\": {perf}}}' > /data/perf.json\n"
            ),
        )
        .await
    }

    async fn submit_dockerfile(&self, node: usize, dockerfile: &str) -> i64 {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(dockerfile.as_bytes().to_vec())
                .file_name("job.Dockerfile"),
        );
        let r: Value = self
            .http
            .post(format!("{}/job/build", self.urls[node]))
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["id"].as_i64().unwrap_or_else(|| panic!("no id: {r}"))
    }

    /// Once job `id` runs: the index of the node running it, and of another one.
    async fn running_on(&self, id: i64) -> (usize, usize) {
        let t0 = Instant::now();
        let node = loop {
            let r = self.get(0, &format!("/job/{id}")).await;
            if r["status"] == "running" {
                break r["node"].as_str().unwrap().to_owned();
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "never ran: {r}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut names = vec![];
        for k in 0..self.urls.len() {
            names.push(self.name(k).await);
        }
        (
            names.iter().position(|n| *n == node).unwrap(),
            names.iter().position(|n| *n != node).unwrap(),
        )
    }

    async fn get(&self, node: usize, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.urls[node]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn text(&self, node: usize, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.urls[node]))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The record of every job in `ids` once all are final (asked of `node`), or a failure
    /// naming the ones still moving after `limit`.
    async fn wait_final(&self, node: usize, ids: &[i64], limit: Duration) -> HashMap<i64, Value> {
        let t0 = Instant::now();
        loop {
            let mut done = HashMap::new();
            let mut moving = vec![];
            for &id in ids {
                let r = self.get(node, &format!("/job/{id}")).await;
                match r["status"].as_str() {
                    Some("queued" | "building" | "running") | None => {
                        moving.push((id, r["status"].clone()))
                    }
                    _ => {
                        done.insert(id, r);
                    }
                }
            }
            if moving.is_empty() {
                return done;
            }
            assert!(
                t0.elapsed() < limit,
                "still not final after {limit:?}: {moving:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The node name (instance id) of node k.
    async fn name(&self, k: usize) -> String {
        let nodes = self.get(k, "/nodes").await;
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["this"] == true)
            .map(|n| n["name"].as_str().unwrap().to_owned())
            .unwrap()
    }

    /// Every live node answers the same for every job (what a user sees does not depend on the
    /// node asked).
    async fn same_everywhere(&self, live: &[usize], ids: &[i64]) {
        for &id in ids {
            let mut answers = vec![];
            for &k in live {
                let r = self.get(k, &format!("/job/performance/{id}")).await;
                let full = self.get(k, &format!("/job/{id}")).await;
                answers.push((
                    r,
                    full["node"].clone(),
                    full["attempt"].clone(),
                    full["finished_at"].clone(),
                ));
            }
            assert!(
                answers.windows(2).all(|w| w[0] == w[1]),
                "job {id}: nodes disagree: {answers:?}"
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes frozen by a trial that failed must be thawed before they can be stopped.
        for k in 1..=self.urls.len() {
            if let Some(pid) = self.pid(k) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
        }
        let out = self.script(&["down", "--purge"]);
        if !out.status.success() {
            eprintln!(
                "scripts/cluster down: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn perf_of(i: usize) -> String {
    format!("0.{:04}", 1000 + i)
}

fn assert_succeeded_with(records: &HashMap<i64, Value>, expected: &HashMap<i64, String>) {
    for (id, want) in expected {
        let r = &records[id];
        assert_eq!(r["status"], "succeeded", "job {id}: {r}");
        let got = r["perf"].as_f64().unwrap();
        assert!(
            (got - want.parse::<f64>().unwrap()).abs() < 1e-9,
            "job {id}: perf {got}, wrote {want}"
        );
    }
}

/// 60 jobs submitted round-robin to three nodes: each ends `succeeded` with its own perf, the
/// work spreads over the nodes, and every node shows the same record, logs, spec and a passing
/// audit for every job, whichever node ran it.
fn sixty_jobs_over_three_nodes() -> Result<(), Failed> {
    common::block_on(async {
        let c = Cluster::up(3);
        let mut expected = HashMap::new();
        for i in 0..60 {
            let perf = perf_of(i);
            let id = c.submit(i % 3, &perf, 0).await;
            expected.insert(id, perf);
        }
        let ids: Vec<i64> = expected.keys().copied().collect();
        let t0 = Instant::now();
        let records = c.wait_final(0, &ids, Duration::from_secs(300)).await;
        eprintln!("60 jobs over 3 nodes: all final in {:?}", t0.elapsed());
        assert_succeeded_with(&records, &expected);
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for r in records.values() {
            *per_node
                .entry(r["node"].as_str().unwrap().to_owned())
                .or_default() += 1;
            assert_eq!(r["attempt"], 1);
        }
        eprintln!("jobs per node: {per_node:?}");
        assert_eq!(per_node.len(), 3, "every node ran jobs: {per_node:?}");
        c.same_everywhere(&[0, 1, 2], &ids).await;
        // A job's logs, spec and audit from a node that did not run it.
        let names = [c.name(0).await, c.name(1).await, c.name(2).await];
        for id in ids.iter().take(6) {
            let ran_on = records[id]["node"].as_str().unwrap();
            let other = names.iter().position(|n| n != ran_on).unwrap();
            let logs = c.text(other, &format!("/job/{id}/logs")).await;
            assert!(
                logs.contains("===== build log =====") && logs.contains("load build definition"),
                "job {id} logs on another node: {logs}"
            );
            let spec = c.get(other, &format!("/job/{id}/spec")).await;
            assert!(
                spec["process"]["args"].to_string().contains(&expected[id]),
                "job {id} spec: {spec}"
            );
            let audit = c.get(other, &format!("/job/{id}/audit")).await;
            assert_eq!(audit["ok"], true, "job {id} audit on another node: {audit}");
        }
    })
}

/// Acceptance: 30 jobs over three nodes, one node `kill -9`ed while it runs some: all 30 end
/// `succeeded` with their own perf, the dead node's jobs on their second attempt elsewhere;
/// every surviving node gives the same answer; the node started again later changes nothing.
fn a_killed_node_loses_nothing() -> Result<(), Failed> {
    common::block_on(async {
        let c = Cluster::up(3);
        let mut expected = HashMap::new();
        for i in 0..30 {
            let perf = perf_of(i);
            let id = c.submit(i % 3, &perf, 4).await;
            expected.insert(id, perf);
        }
        let ids: Vec<i64> = expected.keys().copied().collect();
        let victim = c.name(1).await;
        // Kill node 2 once it runs something.
        let t0 = Instant::now();
        loop {
            let jobs = c.get(0, "/jobs?limit=100").await;
            let running = jobs["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["node"] == victim.as_str() && j["status"] == "running");
            if running {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "node 2 never ran a job"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = c.pid(2).expect("node 2 runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let killed_at = Instant::now();
        let held: Vec<i64> = c.get(0, "/jobs?limit=100").await["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| {
                j["node"] == victim.as_str()
                    && matches!(j["status"].as_str(), Some("building" | "running"))
            })
            .map(|j| j["id"].as_i64().unwrap())
            .collect();
        eprintln!("killed node 2 ({victim}) holding jobs {held:?}");
        assert!(!held.is_empty());
        let records = c.wait_final(0, &ids, Duration::from_secs(300)).await;
        eprintln!("all 30 final {:?} after the kill", killed_at.elapsed());
        assert_succeeded_with(&records, &expected);
        for id in &held {
            let r = &records[id];
            assert_eq!(r["attempt"], 2, "job {id} ran again: {r}");
            assert_ne!(r["node"], victim.as_str(), "job {id} finished elsewhere");
        }
        c.same_everywhere(&[0, 2], &ids).await;
        // The dead node comes back: it finds nothing of its own to take back or overwrite.
        let out = c.script(&["start-node", "2"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_secs(LEASE_SECS)).await;
        let after = c.wait_final(1, &ids, Duration::from_secs(5)).await;
        for id in &ids {
            assert_eq!(
                after[id], records[id],
                "job {id} changed after the node came back"
            );
        }
        c.same_everywhere(&[0, 1, 2], &ids).await;
    })
}

/// A node frozen (SIGSTOP) past its lease while running a job: the job runs again elsewhere and
/// succeeds; when the frozen node wakes, its late result is refused (fenced), the record stays
/// the second attempt's, and the node stops nothing else.
fn a_late_node_cannot_overwrite() -> Result<(), Failed> {
    common::block_on(async {
        let c = Cluster::up(3);
        let frozen = c.name(0).await;
        // Jobs until node 1 runs one (it claims what it can; others may take some).
        let mut mine = None;
        let t0 = Instant::now();
        let mut ids = vec![];
        while mine.is_none() {
            ids.push(c.submit(0, "0.5", 8).await);
            tokio::time::sleep(Duration::from_millis(500)).await;
            for &id in &ids {
                let r = c.get(1, &format!("/job/{id}")).await;
                if r["node"] == frozen.as_str() && r["status"] == "running" {
                    mine = Some(id);
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "node 1 never ran a job"
            );
        }
        let id = mine.unwrap();
        let pid = nix::unistd::Pid::from_raw(c.pid(1).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let r = c
            .wait_final(1, &[id], Duration::from_secs(120))
            .await
            .remove(&id)
            .unwrap();
        assert_eq!(
            (r["status"].as_str(), r["attempt"].as_i64()),
            (Some("succeeded"), Some(2)),
            "{r}"
        );
        assert_ne!(r["node"], frozen.as_str());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        // Its own run of the job ends (or is stopped) within the sleep; then it tries to write.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let after = c.get(1, &format!("/job/{id}")).await;
        assert_eq!(after, r, "the woken node changed the record");
        let log = c.log_tail(1);
        assert!(
            log.contains("no longer holds") || log.contains("lost this job's lease"),
            "the woken node noticed it lost the job: {}",
            log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
        let all = c.wait_final(1, &ids, Duration::from_secs(120)).await;
        assert!(all.values().all(|r| r["status"] == "succeeded"), "{all:?}");
    })
}

/// DELETE through a node that does not run the job: the node running it stops it.
fn cancel_through_another_node() -> Result<(), Failed> {
    common::block_on(async {
        let c = Cluster::up(3);
        let id = c.submit(0, "0.5", 60).await;
        let (holder, other) = c.running_on(id).await;
        let node = c.name(holder).await;
        let t = Instant::now();
        let r: Value = c
            .http
            .delete(format!("{}/job/{id}", c.urls[other]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        eprintln!(
            "cancel through another node answered in {:?}: {}",
            t.elapsed(),
            r["status"]
        );
        assert_eq!(r["status"], "cancelled", "{r}");
        assert!(
            t.elapsed() < Duration::from_secs(LEASE_SECS),
            "the holder stopped it itself, before any lease ran out: {r}\nholder's log:\n{}\nasked node's log:\n{}",
            c.log_tail(holder + 1),
            c.log_tail(other + 1)
        );
        let seen = c.get(holder, &format!("/job/{id}")).await;
        assert_eq!(seen["status"], "cancelled");
        assert_eq!(seen["node"], node.as_str());
    })
}

/// `GET /job/{id}/logs?follow=1` on a node that does not run the job streams the holder's log
/// live (lines arrive while the job runs, not only when it ends), and the whole log after.
fn logs_follow_live_from_any_node() -> Result<(), Failed> {
    common::block_on(async {
        let c = Cluster::up(3);
        let dockerfile = "FROM alpine\nCMD for i in 1 2 3 4 5 6; do echo tick-$i; sleep 1; done; \
                          echo '{\"perf\": 0.5}' > /data/perf.json\n";
        let id = c.submit_dockerfile(0, dockerfile).await;
        let (_, other) = c.running_on(id).await;
        let mut resp = c
            .http
            .get(format!("{}/job/{id}/logs?follow=1", c.urls[other]))
            .send()
            .await
            .unwrap();
        let (mut text, mut first_tick) = (String::new(), None);
        let started = Instant::now();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if first_tick.is_none() && text.contains("tick-1") {
                first_tick = Some(started.elapsed());
            }
        }
        let ended = started.elapsed();
        let first = first_tick.unwrap_or_else(|| panic!("no tick in the followed log: {text}"));
        eprintln!(
            "followed through another node: tick-1 after {first:?}, stream ended after {ended:?}"
        );
        assert!(
            ended - first > Duration::from_secs(3),
            "the log arrived only at the end ({first:?} of {ended:?})"
        );
        for i in 1..=6 {
            assert!(
                text.contains(&format!("tick-{i}")),
                "tick-{i} missing: {text}"
            );
        }
        assert!(
            text.contains("===== build log =====") && text.contains("===== run log ====="),
            "{text}"
        );
        let done = c.get(other, &format!("/job/{id}")).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        // After the end, from any node, without following: the same run log.
        let again = c.text(other, &format!("/job/{id}/logs")).await;
        assert!(again.contains("tick-6"), "{again}");
    })
}

/// PostgreSQL down for 3 s while 20 jobs are under way: nodes reconnect, every job ends
/// `succeeded` with its own perf (a write that meets the outage waits for the database rather
/// than failing the job), none is stuck or lost.
fn postgres_restart_under_load() -> Result<(), Failed> {
    common::block_on(async {
        let c = Cluster::up(3);
        let mut expected = HashMap::new();
        for i in 0..20 {
            let perf = perf_of(i);
            expected.insert(c.submit(i % 3, &perf, 2).await, perf);
        }
        // Down for 3 s (less than a lease) once jobs are building and running: their moves to
        // `running`, specs and ends meet the outage and must wait for the database, not fail.
        let t0 = Instant::now();
        loop {
            let jobs = c.get(0, "/jobs?limit=100").await;
            let busy = jobs["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|j| matches!(j["status"].as_str(), Some("building" | "running")))
                .count();
            if busy >= 3 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "jobs never started");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = c.script(&["restart-db", "3"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: Vec<i64> = expected.keys().copied().collect();
        let records = c.wait_final(2, &ids, Duration::from_secs(300)).await;
        assert_succeeded_with(&records, &expected);
        c.same_everywhere(&[0, 1, 2], &ids).await;
    })
}

fn main() {
    let args = Arguments::from_args();
    let why_not = common::pg::pg_bin().err().or_else(|| {
        (!std::path::Path::new(&common::buildkit_socket()).exists())
            .then(|| format!("no buildkitd at {} (scripts/up)", common::buildkit_socket()))
    });
    let trials: [(&str, Body); 6] = [
        (
            "logs_follow_live_from_any_node",
            logs_follow_live_from_any_node,
        ),
        ("sixty_jobs_over_three_nodes", sixty_jobs_over_three_nodes),
        ("a_killed_node_loses_nothing", a_killed_node_loses_nothing),
        ("a_late_node_cannot_overwrite", a_late_node_cannot_overwrite),
        ("cancel_through_another_node", cancel_through_another_node),
        ("postgres_restart_under_load", postgres_restart_under_load),
    ];
    let trials: Vec<Trial> = trials
        .into_iter()
        .map(|(name, f)| match &why_not {
            Some(why) => common::skipped(name, why),
            None => Trial::test(name, f),
        })
        .collect();
    // Each trial runs three nodes and their build daemons: one at a time.
    let mut args = args;
    args.test_threads = Some(1);
    libtest_mimic::run(&args, trials).exit();
}
