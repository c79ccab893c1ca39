//! What every [`Store`] must do, as test bodies any store can be run through: the SQLite unit
//! tests ([`super::store`]) and the PostgreSQL integration test (`tests/pg_store.rs`, a real
//! server) run the same list, [`ALL`]. Each takes a maker of fresh, empty stores.
#![doc(hidden)]

use std::time::Duration;

use super::JobStatus;
use super::store::{
    Board, Claim, Holder, JobId, Listing, NewJob, NodeInfo, Patch, QueueCaps, Store, StoreError,
};

/// Makes a fresh, empty store.
pub type Maker<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// One conformance test.
pub type Test = fn(Maker<'_>);

/// Every conformance test, by name.
pub const ALL: &[(&str, Test)] = &[
    (
        "a_failed_prepare_records_nothing",
        a_failed_prepare_records_nothing,
    ),
    ("lifecycle_guards_transitions", lifecycle_guards_transitions),
    (
        "listings_filter_by_status_and_boards_rank_by_perf",
        listings_and_boards,
    ),
    ("a_full_queue_refuses_inserts", a_full_queue_refuses_inserts),
    (
        "claims_respect_slots_and_owner_shares",
        claims_respect_slots_and_owner_shares,
    ),
    (
        "a_submitters_queue_share_refuses_its_inserts_only",
        a_submitters_queue_share_is_capped,
    ),
    (
        "claims_take_turns_between_owners",
        claims_take_turns_between_owners,
    ),
    (
        "an_idempotency_key_makes_one_job_per_submitter",
        idempotency_keys,
    ),
    (
        "stale_jobs_are_the_restarted_nodes_and_expired_leases",
        stale_jobs,
    ),
    (
        "a_lost_job_is_queued_again_and_its_old_holder_fenced",
        fencing,
    ),
    ("give_up_interrupts_or_cancels_as_asked", give_up_ends),
    (
        "renew_answers_what_the_node_still_holds",
        renew_answers_held,
    ),
    ("nodes_register_and_heartbeat", nodes_register),
    ("files_are_kept_and_fenced_where_shared", files_kept),
    (
        "concurrent_claims_never_take_a_job_twice",
        concurrent_claims,
    ),
];

fn job<'a>(owner: Option<&'a str>, submitter: &'a str) -> NewJob<'a> {
    NewJob {
        filename: "a.Dockerfile",
        owner,
        submitter,
        dockerfile_sha256: "abc",
        idempotency_key: None,
        files: &[("Dockerfile", b"FROM scratch\n")],
    }
}

/// One queued job for each of `owners` (owner and submitter alike), in order.
fn queue_for(store: &dyn Store, owners: &[&'static str]) -> Vec<JobId> {
    owners
        .iter()
        .map(|who| {
            store
                .insert(&job(Some(who), who), 100.into(), &mut ok)
                .unwrap()
                .id
        })
        .collect()
}

fn ok(_: JobId) -> std::io::Result<()> {
    Ok(())
}

fn claim(node: &str, slots: usize, per_owner: usize) -> Claim<'_> {
    Claim {
        node,
        build_slots: slots,
        per_owner,
        lease: Duration::from_secs(60),
    }
}

fn held(node: &str, attempt: i64) -> Option<Holder> {
    Some(Holder {
        node: node.into(),
        attempt,
    })
}

/// A failed `prepare` leaves no job; a good one sees the new id.
pub fn a_failed_prepare_records_nothing(new: Maker<'_>) {
    let store = new();
    let mut fail = |_| Err(std::io::Error::other("disk full"));
    assert!(matches!(
        store.insert(&job(None, "a"), 10.into(), &mut fail),
        Err(StoreError::Prepare(_))
    ));
    assert_eq!(store.count(Listing::of(None)).unwrap(), 0);
    let mut seen = None;
    let rec = store
        .insert(&job(None, "a"), 10.into(), &mut |id| {
            seen = Some(id);
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, Some(rec.id));
    assert_eq!(store.count(Listing::of(None)).unwrap(), 1);
}

/// The state machine, phase timestamps, patches and reads.
pub fn lifecycle_guards_transitions(new: Maker<'_>) {
    let store = new();
    let a = store
        .insert(&job(None, "addr:127.0.0.1"), 10.into(), &mut ok)
        .unwrap();
    let b = store
        .insert(&job(Some("alice"), "alice"), 10.into(), &mut ok)
        .unwrap();
    assert_eq!(b.submitter.as_deref(), Some("alice"));
    assert_eq!(b.id, a.id + 1);
    assert_eq!(
        (a.status, a.attempt, a.claimed_by.as_deref()),
        (JobStatus::Queued, 0, None)
    );
    assert_eq!(store.queue_position(b.id).unwrap(), 1);
    assert_eq!(store.queue_depth().unwrap(), 2);
    let claimed = store.claim(&claim("n1", 2, 2)).unwrap().unwrap();
    assert_eq!((claimed.id, claimed.status), (a.id, JobStatus::Building));
    assert_eq!(
        (claimed.attempt, claimed.claimed_by.as_deref()),
        (1, Some("n1"))
    );
    assert!(claimed.build_started_at.is_some());
    let r = store
        .transition(
            a.id,
            JobStatus::Running,
            Patch {
                image_digest: Some("sha256:x".into()),
                build: Some(serde_json::json!({"scope": "job-1"})),
                holder: held("n1", 1),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(r.build_finished_at.is_some() && r.run_started_at.is_some());
    assert_eq!(r.build_json(), Some(serde_json::json!({"scope": "job-1"})));
    store
        .annotate(
            a.id,
            JobStatus::Running,
            Patch {
                spec_sha256: Some("abc".into()),
                limits: Some(serde_json::json!({"memory": 1})),
                oom_killed: Some(false),
                holder: held("n1", 1),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(matches!(
        store.annotate(
            a.id,
            JobStatus::Building,
            Patch {
                cgroup: Some("v1".into()),
                ..Default::default()
            }
        ),
        Err(StoreError::IncorrectStatus {
            from: JobStatus::Running,
            ..
        })
    ));
    let done = store
        .transition(
            a.id,
            JobStatus::Succeeded,
            Patch {
                perf: Some(0.5),
                exit_code: Some(0),
                oom_killed: Some(false),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(done.perf, Some(0.5));
    assert_eq!(done.image_digest.as_deref(), Some("sha256:x"), "kept");
    assert_eq!(done.spec_sha256.as_deref(), Some("abc"));
    assert_eq!(
        done.limits.as_ref().map(|l| l.get().replace(' ', "")),
        Some(r#"{"memory":1}"#.into())
    );
    assert_eq!(done.oom_killed, Some(false));
    assert!(done.finished_at.is_some());
    assert!(matches!(
        store.transition(a.id, JobStatus::Cancelled, Patch::default()),
        Err(StoreError::IncorrectStatus {
            from: JobStatus::Succeeded,
            ..
        })
    ));
    assert!(matches!(
        store.transition(9999, JobStatus::Cancelled, Patch::default()),
        Err(StoreError::NotFound(9999))
    ));
    assert_eq!(store.get(a.id).unwrap().unwrap().perf, Some(0.5));
    assert!(store.get(9999).unwrap().is_none());
    assert_eq!(
        store
            .list(Listing::of(Some("alice")), None, 10)
            .unwrap()
            .len(),
        1
    );
    let all = store.list(Listing::of(None), None, 10).unwrap();
    assert_eq!(
        all.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![b.id, a.id]
    );
    assert_eq!(
        store.list(Listing::of(None), Some(b.id), 10).unwrap().len(),
        1
    );
    assert_eq!(store.count(Listing::of(Some("alice"))).unwrap(), 1);
    assert_eq!(store.count(Listing::of(None)).unwrap(), 2);
    let counts = store.counts().unwrap();
    assert!(
        counts.contains(&(JobStatus::Succeeded, 1)) && counts.contains(&(JobStatus::Queued, 1))
    );
}

/// Take `id` from queued to `to` (a final status), with `perf` when it succeeded.
fn finish(store: &dyn Store, id: JobId, to: JobStatus, perf: Option<f64>) {
    for step in [JobStatus::Building, JobStatus::Running] {
        if step == JobStatus::Running && to == JobStatus::BuildFailed {
            break;
        }
        store.transition(id, step, Patch::default()).unwrap();
    }
    let patch = Patch {
        perf,
        ..Default::default()
    };
    store.transition(id, to, patch).unwrap();
}

/// Listings filter by owner and status; a board ranks succeeded jobs by perf either way, ties in
/// the order they finished, one per owner when asked, never a job without a perf.
pub fn listings_and_boards(new: Maker<'_>) {
    let store = new();
    let ids = queue_for(&*store, &["alice", "bob", "alice", "carol", "bob", "alice"]);
    finish(&*store, ids[0], JobStatus::Succeeded, Some(0.5));
    finish(&*store, ids[1], JobStatus::Succeeded, Some(0.9));
    finish(&*store, ids[2], JobStatus::Succeeded, Some(0.7));
    finish(&*store, ids[3], JobStatus::BuildFailed, None);
    finish(&*store, ids[4], JobStatus::Succeeded, Some(0.5));
    // ids[5] stays queued.
    let ok = [JobStatus::Succeeded];
    let which = |owner, statuses| Listing { owner, statuses };
    let page = store.list(which(None, &ok), None, 10).unwrap();
    assert_eq!(
        page.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![ids[4], ids[2], ids[1], ids[0]]
    );
    assert_eq!(store.count(which(None, &ok)).unwrap(), 4);
    let failed_or_waiting = [JobStatus::BuildFailed, JobStatus::Queued];
    let page = store
        .list(which(None, &failed_or_waiting), None, 10)
        .unwrap();
    assert_eq!(
        page.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![ids[5], ids[3]]
    );
    assert_eq!(store.count(which(Some("alice"), &ok)).unwrap(), 2);
    let page = store.list(which(Some("alice"), &ok), Some(ids[2]), 10);
    assert_eq!(
        page.unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![ids[0]]
    );

    let board = |owner, higher_is_better, best_per_owner| {
        let b = Board {
            owner,
            higher_is_better,
            best_per_owner,
            limit: 10,
        };
        let entries = store.leaderboard(&b).unwrap();
        entries.iter().map(|r| r.id).collect::<Vec<_>>()
    };
    // 0.9 (bob), 0.7 (alice), then the tie at 0.5: alice's finished first.
    assert_eq!(
        board(None, true, false),
        vec![ids[1], ids[2], ids[0], ids[4]]
    );
    assert_eq!(
        board(None, false, false),
        vec![ids[0], ids[4], ids[2], ids[1]]
    );
    assert_eq!(board(None, true, true), vec![ids[1], ids[2]]);
    assert_eq!(board(None, false, true), vec![ids[0], ids[4]]);
    assert_eq!(board(Some("alice"), true, false), vec![ids[2], ids[0]]);
    assert_eq!(board(Some("carol"), true, false), Vec::<JobId>::new());
}

/// `max_queued` waiting jobs refuse another.
pub fn a_full_queue_refuses_inserts(new: Maker<'_>) {
    let store = new();
    store.insert(&job(None, "a"), 2.into(), &mut ok).unwrap();
    store.insert(&job(None, "a"), 2.into(), &mut ok).unwrap();
    assert!(matches!(
        store.insert(&job(None, "a"), 2.into(), &mut ok),
        Err(StoreError::QueueFull(2))
    ));
    assert_eq!(store.count(Listing::of(None)).unwrap(), 2);
}

/// One submitter's share of the queue is full: its next insert is refused, another's is not.
pub fn a_submitters_queue_share_is_capped(new: Maker<'_>) {
    let store = new();
    let caps = QueueCaps {
        total: 10,
        per_submitter: 2,
    };
    store.insert(&job(Some("a"), "a"), caps, &mut ok).unwrap();
    store.insert(&job(Some("a"), "a"), caps, &mut ok).unwrap();
    assert!(matches!(
        store.insert(&job(Some("a"), "a"), caps, &mut ok),
        Err(StoreError::OwnerQueueFull(2))
    ));
    store.insert(&job(Some("b"), "b"), caps, &mut ok).unwrap();
    // A claimed job no longer waits: the share has room again.
    store.claim(&claim("n1", 1, 1)).unwrap().unwrap();
    store.insert(&job(Some("a"), "a"), caps, &mut ok).unwrap();
    assert_eq!(store.count(Listing::of(None)).unwrap(), 4);
}

/// A submitter's second insert with a key it used is refused (before its files are written),
/// and the first job is found by the key; another submitter may use the same key.
pub fn idempotency_keys(new: Maker<'_>) {
    let store = new();
    let keyed = |who: &'static str| NewJob {
        idempotency_key: Some("k-1"),
        ..job(Some(who), who)
    };
    let first = store.insert(&keyed("a"), 10.into(), &mut ok).unwrap();
    let mut prepared = false;
    assert!(matches!(
        store.insert(&keyed("a"), 10.into(), &mut |_| {
            prepared = true;
            Ok(())
        }),
        Err(StoreError::DuplicateKey)
    ));
    assert!(!prepared, "a refused insert writes no files");
    let found = store.by_idempotency_key("a", "k-1").unwrap().unwrap();
    assert_eq!(found.id, first.id);
    assert_eq!(found.idempotency_key.as_deref(), Some("k-1"));
    let other = store.insert(&keyed("b"), 10.into(), &mut ok).unwrap();
    assert_ne!(other.id, first.id);
    assert!(store.by_idempotency_key("a", "k-2").unwrap().is_none());
    assert_eq!(store.count(Listing::of(None)).unwrap(), 2);
}

/// The owner with the fewest jobs building or running goes first (FIFO among equals): a flood
/// from one owner delays another's next job by one turn at most.
pub fn claims_take_turns_between_owners(new: Maker<'_>) {
    let store = new();
    let ids = queue_for(&*store, &["flood", "flood", "flood", "other", "other"]);
    let next = || store.claim(&claim("n1", 10, 10)).unwrap().map(|r| r.id);
    assert_eq!(next(), Some(ids[0]), "the oldest first");
    assert_eq!(next(), Some(ids[3]), "then the owner with nothing active");
    assert_eq!(next(), Some(ids[1]), "equal (one each): the oldest");
    assert_eq!(next(), Some(ids[4]));
    // flood's first job ends: it has one active, other two.
    store
        .transition(ids[0], JobStatus::BuildFailed, Patch::default())
        .unwrap();
    assert_eq!(next(), Some(ids[2]));
}

/// Node build slots, owner shares over all nodes, FIFO otherwise.
pub fn claims_respect_slots_and_owner_shares(new: Maker<'_>) {
    let store = new();
    let ids = queue_for(&*store, &["slow", "slow", "slow", "other"]);
    let next = |node, slots, per_owner| {
        store
            .claim(&claim(node, slots, per_owner))
            .unwrap()
            .map(|r| r.id)
    };
    assert_eq!(next("n1", 2, 1), Some(ids[0]));
    // Job 2 is older, but its owner holds its share: job 4 takes the other slot.
    assert_eq!(next("n1", 2, 1), Some(ids[3]));
    assert_eq!(next("n1", 2, 1), None, "both slots are taken");
    // Job 4's build is over (it waits to run): its slot is free, but only "slow" waits.
    store.release_build_slot(ids[3]).unwrap();
    assert_eq!(
        next("n1", 2, 1),
        None,
        "the free slot stays free rather than go to slow"
    );
    let third = store
        .insert(&job(Some("third"), "third"), 10.into(), &mut ok)
        .unwrap()
        .id;
    assert_eq!(next("n1", 2, 1), Some(third));
    // Another node has slots of its own; the owner's share counts over all nodes.
    assert_eq!(next("n2", 2, 1), None);
    store
        .transition(ids[0], JobStatus::BuildFailed, Patch::default())
        .unwrap();
    assert_eq!(next("n2", 2, 1), Some(ids[1]));
    // A cancelled queued job is never claimed.
    store
        .transition(ids[2], JobStatus::Cancelled, Patch::default())
        .unwrap();
    assert_eq!(next("n3", 3, 3), None);
}

/// What a restarted node, or anyone, finds abandoned.
pub fn stale_jobs(new: Maker<'_>) {
    let store = new();
    let ids: Vec<JobId> = (0..3)
        .map(|_| {
            store
                .insert(&job(None, "a"), 10.into(), &mut ok)
                .unwrap()
                .id
        })
        .collect();
    let mut short = claim("n1", 3, 3);
    store.claim(&short).unwrap();
    short.node = "n2";
    store.claim(&short).unwrap();
    short.lease = Duration::ZERO;
    short.node = "n3";
    store.claim(&short).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        store.stale("n1").unwrap(),
        vec![ids[0], ids[2]],
        "n1's own and n3's expired one"
    );
    assert_eq!(
        store.stale("").unwrap(),
        vec![ids[2]],
        "expired leases only"
    );
    assert_eq!(
        store
            .renew("n3", &[ids[2]], Duration::from_secs(60))
            .unwrap(),
        vec![ids[2]]
    );
    assert_eq!(store.stale("n1").unwrap(), vec![ids[0]]);
    assert_eq!(store.stale("nobody").unwrap(), Vec::<JobId>::new());
}

/// The heart of "nothing lost, nothing written twice".
pub fn fencing(new: Maker<'_>) {
    let store = new();
    let id = store
        .insert(&job(None, "a"), 10.into(), &mut ok)
        .unwrap()
        .id;
    let mut c = claim("n1", 1, 1);
    c.lease = Duration::ZERO;
    assert_eq!(store.claim(&c).unwrap().unwrap().attempt, 1);
    std::thread::sleep(Duration::from_millis(20));
    // n1 stopped answering: another node queues its job again.
    assert_eq!(store.stale("").unwrap(), vec![id]);
    let back = store.give_up(id, 1, true, "unused").unwrap();
    assert_eq!(
        (back.status, back.attempt, back.claimed_by.as_deref()),
        (JobStatus::Queued, 1, None)
    );
    assert_eq!(back.error, None);
    assert_eq!(store.queue_depth().unwrap(), 1);
    // A second give_up of the same attempt (another node raced) does nothing.
    assert!(matches!(
        store.give_up(id, 1, true, "x"),
        Err(StoreError::Fenced { .. })
    ));
    let again = store.claim(&claim("n2", 1, 1)).unwrap().unwrap();
    assert_eq!(
        (again.id, again.attempt, again.claimed_by.as_deref()),
        (id, 2, Some("n2"))
    );
    // n1 comes back and tries to write: every write is refused, nothing changes.
    let late = Patch {
        perf: Some(0.1),
        holder: held("n1", 1),
        ..Default::default()
    };
    assert!(matches!(
        store.transition(id, JobStatus::Succeeded, late.clone()),
        Err(StoreError::Fenced { attempt: 1, .. })
    ));
    assert!(matches!(
        store.annotate(id, JobStatus::Building, late),
        Err(StoreError::Fenced { .. })
    ));
    assert!(
        store
            .renew("n1", &[id], Duration::from_secs(60))
            .unwrap()
            .is_empty()
    );
    let now = store.get(id).unwrap().unwrap();
    assert_eq!(
        (now.status, now.perf, now.claimed_by.as_deref()),
        (JobStatus::Building, None, Some("n2"))
    );
    // n2's writes go through.
    store
        .transition(
            id,
            JobStatus::Running,
            Patch {
                holder: held("n2", 2),
                ..Default::default()
            },
        )
        .unwrap();
    let done = store
        .transition(
            id,
            JobStatus::Succeeded,
            Patch {
                perf: Some(0.7),
                holder: held("n2", 2),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((done.perf, done.attempt), (Some(0.7), 2));
    // A finished job is never given up.
    assert!(matches!(
        store.give_up(id, 2, true, "x"),
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(store.get(id).unwrap().unwrap().status, JobStatus::Succeeded);
}

/// The last attempt ends `interrupted` with the reason; a cancel asked for ends `cancelled`.
pub fn give_up_ends(new: Maker<'_>) {
    let store = new();
    let a = store
        .insert(&job(None, "a"), 10.into(), &mut ok)
        .unwrap()
        .id;
    let b = store
        .insert(&job(None, "a"), 10.into(), &mut ok)
        .unwrap()
        .id;
    store.claim(&claim("n1", 2, 2)).unwrap();
    store.claim(&claim("n1", 2, 2)).unwrap();
    let end = store
        .give_up(a, 1, false, "its node stopped; attempt 1 of 1")
        .unwrap();
    assert_eq!(end.status, JobStatus::Interrupted);
    assert_eq!(
        end.error.as_deref(),
        Some("its node stopped; attempt 1 of 1")
    );
    assert!(end.finished_at.is_some());
    store.request_cancel(b).unwrap();
    let end = store.give_up(b, 1, true, "x").unwrap();
    assert_eq!(
        end.status,
        JobStatus::Cancelled,
        "a cancel asked for is not re-run"
    );
    assert!(end.finished_at.is_some());
    assert_eq!(store.queue_depth().unwrap(), 0);
}

/// `renew` extends only the node's own live claims and says which they are.
pub fn renew_answers_held(new: Maker<'_>) {
    let store = new();
    let a = store
        .insert(&job(None, "a"), 10.into(), &mut ok)
        .unwrap()
        .id;
    let b = store
        .insert(&job(None, "b"), 10.into(), &mut ok)
        .unwrap()
        .id;
    let mut c = claim("n1", 2, 2);
    c.lease = Duration::ZERO;
    store.claim(&c).unwrap();
    store.claim(&claim("n2", 2, 2)).unwrap();
    assert_eq!(
        store.renew("n1", &[a, b], Duration::from_secs(60)).unwrap(),
        vec![a]
    );
    std::thread::sleep(Duration::from_millis(20));
    assert!(store.stale("").unwrap().is_empty(), "a's lease was renewed");
}

/// Nodes are recorded once each and refreshed.
pub fn nodes_register(new: Maker<'_>) {
    let store = new();
    let mut n = NodeInfo {
        name: "n1".into(),
        url: "http://127.0.0.1:8081".into(),
        capacity: 2,
        pid: 42,
        started_at: 1.0,
        heartbeat_at: 1.0,
    };
    store.register_node(&n).unwrap();
    n.pid = 43;
    store.register_node(&n).unwrap();
    store.renew("n1", &[], Duration::from_secs(1)).unwrap();
    let nodes = store.nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0].pid, nodes[0].url.as_str()),
        (43, "http://127.0.0.1:8081")
    );
    assert!(nodes[0].heartbeat_at > 1.0, "renew is the heartbeat");
}

/// A shared store keeps the submission's files and a holder's, fenced; others keep none.
pub fn files_kept(new: Maker<'_>) {
    let store = new();
    let id = store
        .insert(&job(None, "a"), 10.into(), &mut ok)
        .unwrap()
        .id;
    if !store.shared() {
        assert!(store.files(id).unwrap().is_empty());
        return;
    }
    assert_eq!(
        store.files(id).unwrap(),
        vec![("Dockerfile".to_string(), b"FROM scratch\n".to_vec())]
    );
    store.claim(&claim("n1", 1, 1)).unwrap();
    store
        .put_files(
            id,
            held("n1", 1).as_ref(),
            &[("run.log", b"one"), ("build.log", b"")],
        )
        .unwrap();
    store
        .put_files(id, held("n1", 1).as_ref(), &[("run.log", b"two")])
        .unwrap();
    assert!(matches!(
        store.put_files(id, held("n9", 1).as_ref(), &[("run.log", b"late")]),
        Err(StoreError::Fenced { .. })
    ));
    let mut files = store.files(id).unwrap();
    files.sort();
    let names: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("Dockerfile", &b"FROM scratch\n"[..]),
            ("build.log", b""),
            ("run.log", b"two")
        ]
    );
}

/// Eight claimers on their own threads, 40 jobs: each job claimed exactly once.
pub fn concurrent_claims(new: Maker<'_>) {
    let store: std::sync::Arc<dyn Store> = new().into();
    for _ in 0..40 {
        store.insert(&job(None, "a"), 100.into(), &mut ok).unwrap();
    }
    let claimed: Vec<JobId> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|k| {
                let store = store.clone();
                s.spawn(move || {
                    let node = format!("n{k}");
                    let mut mine = vec![];
                    while let Some(r) = store.claim(&claim(&node, 100, 100)).unwrap() {
                        assert_eq!(r.claimed_by.as_deref(), Some(node.as_str()));
                        mine.push(r.id);
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut sorted = claimed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((claimed.len(), sorted.len()), (40, 40), "every job once");
    assert_eq!(store.queue_depth().unwrap(), 0);
}
