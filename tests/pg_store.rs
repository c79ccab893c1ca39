//! The PostgreSQL store against a real server (a throwaway cluster run as the perfbox user on a
//! loopback port): every store conformance test (the same list the SQLite store passes, see
//! src/jobs/store_conformance.rs), then what only a shared store does: notices between two
//! stores (nodes) on one database, and a server restart under use.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::pg::Postgres;
use libtest_mimic::{Arguments, Failed, Trial};
use perfbox::jobs::JobStatus;
use perfbox::jobs::pg_store::PgStore;
use perfbox::jobs::store::{Claim, NewJob, Notice, Patch, Store};
use perfbox::jobs::store_conformance;

/// A trial's body.
type Body = fn() -> Result<(), Failed>;

static SERVER: OnceLock<Result<Postgres, String>> = OnceLock::new();
static DBS: AtomicUsize = AtomicUsize::new(0);

fn server() -> &'static Postgres {
    SERVER
        .get()
        .unwrap()
        .as_ref()
        .expect("checked before the trials were made")
}

/// A store on a fresh database.
fn fresh() -> PgStore {
    let db = format!(
        "t{}_{}",
        std::process::id(),
        DBS.fetch_add(1, Ordering::SeqCst)
    );
    server().create_db(&db);
    PgStore::open(&server().url(&db)).unwrap()
}

fn job() -> NewJob<'static> {
    NewJob {
        filename: "a.Dockerfile",
        owner: None,
        submitter: "a",
        dockerfile_sha256: "abc",
        idempotency_key: None,
        files: &[("Dockerfile", b"FROM scratch\n")],
    }
}

fn wait_notice(rx: &mut tokio::sync::broadcast::Receiver<Notice>, want: &Notice) -> Duration {
    let t0 = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(n) if &n == want => return t0.elapsed(),
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no {want:?} within 5 s"
        );
    }
}

/// One node submits, the other hears of it at once; a cancel asked through one reaches the
/// other.
fn notices_reach_other_nodes() -> Result<(), Failed> {
    let db = format!("t{}_n", std::process::id());
    server().create_db(&db);
    let a = PgStore::open(&server().url(&db)).unwrap();
    let b = PgStore::open(&server().url(&db)).unwrap();
    let mut heard = b.notices().unwrap();
    std::thread::sleep(Duration::from_millis(300)); // b's LISTEN is in place
    while heard.try_recv().is_ok() {}
    let id = a.insert(&job(), 10.into(), &mut |_| Ok(())).unwrap().id;
    let took = wait_notice(&mut heard, &Notice::Work);
    eprintln!("a submission on node a woke node b in {took:?}");
    a.request_cancel(id).unwrap();
    wait_notice(&mut heard, &Notice::Cancel(id));
    Ok(())
}

/// The server restarts while a node uses it: calls after the restart succeed (pooled
/// connections are verified and replaced), notices resume, nothing recorded is lost.
fn a_restarted_server_loses_nothing() -> Result<(), Failed> {
    let store = fresh();
    let mut heard = store.notices().unwrap();
    let before: Vec<i64> = (0..5)
        .map(|_| {
            store
                .insert(&job(), 100.into(), &mut |_| Ok(()))
                .unwrap()
                .id
        })
        .collect();
    let c = Claim {
        node: "n1",
        build_slots: 1,
        per_owner: 1,
        lease: Duration::from_secs(60),
    };
    let claimed = store.claim(&c).unwrap().unwrap();
    server().restart();
    // The first calls after a restart may meet the server still starting: retried as the
    // worker does (transient errors only).
    let t0 = Instant::now();
    let rec = loop {
        match store.get(claimed.id) {
            Ok(r) => break r.unwrap(),
            Err(e) if e.is_transient() && t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("{e}"),
        }
    };
    eprintln!("answering again {:?} after the restart", t0.elapsed());
    assert_eq!((rec.status, rec.attempt), (JobStatus::Building, 1));
    assert_eq!(store.count(perfbox::jobs::Listing::default()).unwrap(), 5);
    assert_eq!(store.queue_depth().unwrap(), 4);
    store
        .transition(
            claimed.id,
            JobStatus::Running,
            Patch {
                holder: perfbox::jobs::store::Holder::of(&claimed),
                ..Default::default()
            },
        )
        .unwrap();
    while heard.try_recv().is_ok() {}
    let id = store
        .insert(&job(), 100.into(), &mut |_| Ok(()))
        .unwrap()
        .id;
    wait_notice(&mut heard, &Notice::Work);
    assert_eq!(id, before[4] + 1, "one id sequence, no reuse");
    Ok(())
}

/// A bigger race than the conformance test's: 4 stores (as 4 nodes, each with its own pool)
/// and 16 threads claim 400 jobs; each job is claimed exactly once.
fn many_nodes_never_claim_a_job_twice() -> Result<(), Failed> {
    let db = format!("t{}_race", std::process::id());
    server().create_db(&db);
    let stores: Vec<Arc<PgStore>> = (0..4)
        .map(|_| Arc::new(PgStore::open(&server().url(&db)).unwrap()))
        .collect();
    for _ in 0..400 {
        stores[0]
            .insert(&job(), 1000.into(), &mut |_| Ok(()))
            .unwrap();
    }
    let claimed: Vec<i64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..16)
            .map(|k| {
                let store = stores[k % 4].clone();
                s.spawn(move || {
                    let node = format!("n{k}");
                    let mut mine = vec![];
                    let c = Claim {
                        node: &node,
                        build_slots: 1000,
                        per_owner: 1000,
                        lease: Duration::from_secs(60),
                    };
                    while let Some(r) = store.claim(&c).unwrap() {
                        mine.push(r.id);
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut unique = claimed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((claimed.len(), unique.len()), (400, 400));
    Ok(())
}

/// A node starting while others use the database takes no lock on their tables: the schema's
/// DDL (ALTER TABLE locks `jobs` exclusively) runs only when the database is behind.
fn a_starting_node_takes_no_table_lock() -> Result<(), Failed> {
    let db = format!("t{}_lock", std::process::id());
    server().create_db(&db);
    drop(PgStore::open(&server().url(&db)).unwrap()); // the schema is made
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={} dbname={db}",
                server().port,
                common::user()
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        // Another node mid-transaction, holding a lock on jobs.
        client
            .batch_execute("BEGIN; SELECT count(*) FROM jobs")
            .await
            .unwrap();
        let url = server().url(&db);
        let t0 = Instant::now();
        let opened = tokio::task::spawn_blocking(move || PgStore::open(&url).map(drop));
        let r = tokio::time::timeout(Duration::from_secs(5), opened).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "opening blocked behind another node's transaction ({:?})",
            t0.elapsed()
        );
        client.batch_execute("COMMIT").await.unwrap();
    });
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let started = SERVER.get_or_init(|| Postgres::start("pg-store"));
    let mut trials = vec![];
    let extra: [(&str, Body); 4] = [
        (
            "a_starting_node_takes_no_table_lock",
            a_starting_node_takes_no_table_lock,
        ),
        ("notices_reach_other_nodes", notices_reach_other_nodes),
        (
            "a_restarted_server_loses_nothing",
            a_restarted_server_loses_nothing,
        ),
        (
            "many_nodes_never_claim_a_job_twice",
            many_nodes_never_claim_a_job_twice,
        ),
    ];
    match started {
        Err(why) => {
            for (name, _) in store_conformance::ALL {
                trials.push(common::skipped(&format!("conformance::{name}"), why));
            }
            for (name, _) in extra {
                trials.push(common::skipped(name, why));
            }
        }
        Ok(_) => {
            for (name, test) in store_conformance::ALL {
                let test = *test;
                trials.push(Trial::test(format!("conformance::{name}"), move || {
                    let new = || -> Box<dyn Store> { Box::new(fresh()) };
                    test(&new);
                    Ok(())
                }));
            }
            for (name, f) in extra {
                trials.push(Trial::test(name, f));
            }
        }
    }
    // The restart trial would disturb the others: one at a time.
    let mut args = args;
    args.test_threads = Some(1);
    let conclusion = libtest_mimic::run(&args, trials);
    // Statics are not dropped: the server is stopped here, before the process exits.
    if let Some(Ok(_)) = SERVER.get() {
        stop_server();
    }
    conclusion.exit();
}

fn stop_server() {
    let pg = server();
    let _ = common::as_perfbox(&[
        common::pg::pg_bin()
            .unwrap()
            .join("pg_ctl")
            .to_str()
            .unwrap(),
        "-D",
        pg.dir.path().join("data").to_str().unwrap(),
        "stop",
        "-m",
        "immediate",
    ])
    .output();
    let _ = std::fs::remove_dir_all(pg.dir.path());
}
