//! The backend-generic conformance suite. Every backend runs it through [`crate::conformance_suite!`]:
//!
//! ```ignore
//! flotilla_store::conformance_suite!(async { MyBackend::open_for_test().await });
//! ```
//!
//! The factory yields a [`TestStore`]: a fresh, empty store plus whatever must live as long as it
//! (a temporary directory, a cluster handle). Each case is an ordinary `#[tokio::test]`.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::{
    Compare, EventKind, Op, OpResult, RangeRequest, Store, StoreError, Txn, WatchEvent, WatchStream,
};

/// A store under test and what keeps it alive.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub guard: Box<dyn Any + Send>,
}

/// A fresh SQLite store in a temporary directory.
pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = crate::SqliteStore::open(dir.path().join("store.db"))
        .await
        .expect("open store");
    TestStore {
        store: Arc::new(store),
        guard: Box::new(dir),
    }
}

/// A fresh three-member etcd cluster on loopback, and the etcd backend on it. The health probe
/// the cluster writes is deleted first, so the store starts empty.
pub async fn etcd() -> TestStore {
    let cluster = crate::etcd_cluster::EtcdCluster::start(3).await;
    let store = crate::EtcdStore::connect(crate::EtcdOptions {
        endpoints: cluster.endpoints.clone(),
        tls: None,
    })
    .await
    .expect("connect to etcd");
    store.delete("/health-probe").await.expect("clean up");
    TestStore {
        store: Arc::new(store),
        guard: Box::new(cluster),
    }
}

/// Generates one `#[tokio::test]` per conformance case for the backend the factory opens.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@cases $factory;
            put_then_get_returns_revisions, range_orders_keys_and_honours_limit,
            txn_compare_and_swap, txn_failure_branch_and_reads, create_only_if_absent,
            delete_and_recreate_resets_version, read_at_past_revision, watch_sees_changes_in_order,
            watch_resumes_from_revision, watch_filters_by_prefix, slow_watcher_loses_nothing,
            compaction_makes_old_revisions_too_old, compaction_keeps_latest_values,
            lease_expiry_deletes_attached_keys, lease_keep_alive_and_revoke,
            concurrent_read_modify_write_loses_no_update);
    };
    (@cases $factory:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let test_store: $crate::conformance::TestStore = $factory.await;
                $crate::conformance::$case(test_store.store.clone()).await;
                drop(test_store);
            }
        )*
    };
}

type S = Arc<dyn Store>;

async fn next_event(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch stream stays open")
        .expect("a watch event, not an error")
}

async fn assert_no_event(w: &mut WatchStream) {
    if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), w.next()).await {
        panic!("unexpected watch event {ev:?}");
    }
}

pub async fn put_then_get_returns_revisions(s: S) {
    let r0 = s.current_revision().await.unwrap();
    let r1 = s.put("/a", b"one".to_vec()).await.unwrap();
    assert_eq!(r1, r0 + 1, "each write bumps the global revision by one");
    let r2 = s.put("/a", b"two".to_vec()).await.unwrap();
    assert_eq!(r2, r1 + 1);
    let kv = s.get("/a").await.unwrap().expect("key exists");
    assert_eq!(kv.value, b"two");
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r2);
    assert_eq!(kv.version, 2);
    assert_eq!(s.get("/missing").await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), r2);
}

pub async fn range_orders_keys_and_honours_limit(s: S) {
    for k in ["/p/c", "/p/a", "/p/b", "/q/a", "/p"] {
        s.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let all = s.range(RangeRequest::prefix("/p/")).await.unwrap();
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b", "/p/c"]);
    assert!(!all.more);
    let page = s
        .range(RangeRequest::prefix("/p/").with_limit(2))
        .await
        .unwrap();
    assert_eq!(page.kvs.len(), 2);
    assert!(page.more, "a limited range says more keys follow");
    let rest = s
        .range(RangeRequest {
            start: "/p/b\0".into(),
            end: Some(crate::prefix_end("/p/")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.kvs.len(), 1);
    assert_eq!(rest.kvs[0].key, "/p/c");
    assert_eq!(page.revision, s.current_revision().await.unwrap());
}

pub async fn txn_compare_and_swap(s: S) {
    let rev = s.put("/cas", b"v1".to_vec()).await.unwrap();
    let stale = rev - 1;
    let lost = s
        .txn(
            Txn::new()
                .when(Compare::mod_revision("/cas", stale))
                .and_then(Op::put("/cas", "stale")),
        )
        .await
        .unwrap();
    assert!(
        !lost.succeeded,
        "a stale mod revision must fail the compare"
    );
    assert_eq!(lost.revision, rev, "a failed compare writes nothing");
    assert_eq!(s.get("/cas").await.unwrap().unwrap().value, b"v1");
    let won = s
        .txn(
            Txn::new()
                .when(Compare::mod_revision("/cas", rev))
                .and_then(Op::put("/cas", "v2")),
        )
        .await
        .unwrap();
    assert!(won.succeeded);
    assert_eq!(won.revision, rev + 1);
    match &won.results[0] {
        OpResult::Put { prev: Some(prev) } => assert_eq!(prev.value, b"v1"),
        other => panic!("expected the previous value, got {other:?}"),
    }
}

pub async fn txn_failure_branch_and_reads(s: S) {
    s.put("/x", b"x".to_vec()).await.unwrap();
    let resp = s
        .txn(
            Txn::new()
                .when(Compare::absent("/x"))
                .and_then(Op::put("/x", "never"))
                .or_else(Op::get("/x"))
                .or_else(Op::put("/y", "else-branch")),
        )
        .await
        .unwrap();
    assert!(!resp.succeeded);
    match &resp.results[0] {
        OpResult::Get { kv: Some(kv) } => assert_eq!(kv.value, b"x"),
        other => panic!("expected a read of /x, got {other:?}"),
    }
    assert_eq!(s.get("/y").await.unwrap().unwrap().value, b"else-branch");
    let dup = s
        .txn(
            Txn::new()
                .and_then(Op::put("/d", "1"))
                .and_then(Op::put("/d", "2")),
        )
        .await;
    assert_eq!(dup.unwrap_err(), StoreError::DuplicateKey("/d".into()));
    // Two keys in one transaction share one revision.
    let r = s
        .txn(
            Txn::new()
                .and_then(Op::put("/m1", "1"))
                .and_then(Op::put("/m2", "2")),
        )
        .await
        .unwrap();
    assert_eq!(
        s.get("/m1").await.unwrap().unwrap().mod_revision,
        r.revision
    );
    assert_eq!(
        s.get("/m2").await.unwrap().unwrap().mod_revision,
        r.revision
    );
}

pub async fn create_only_if_absent(s: S) {
    let create = || {
        Txn::new()
            .when(Compare::absent("/once"))
            .and_then(Op::put("/once", "v"))
    };
    assert!(s.txn(create()).await.unwrap().succeeded);
    assert!(
        !s.txn(create()).await.unwrap().succeeded,
        "the second create must see the key"
    );
}

pub async fn delete_and_recreate_resets_version(s: S) {
    s.put("/k", b"1".to_vec()).await.unwrap();
    s.put("/k", b"2".to_vec()).await.unwrap();
    let before = s.current_revision().await.unwrap();
    let prev = s
        .delete("/k")
        .await
        .unwrap()
        .expect("delete returns the old value");
    assert_eq!(prev.value, b"2");
    assert_eq!(s.current_revision().await.unwrap(), before + 1);
    assert_eq!(
        s.delete("/k").await.unwrap(),
        None,
        "deleting a missing key is a no-op"
    );
    assert_eq!(
        s.current_revision().await.unwrap(),
        before + 1,
        "and does not bump the revision"
    );
    let r = s.put("/k", b"3".to_vec()).await.unwrap();
    let kv = s.get("/k").await.unwrap().unwrap();
    assert_eq!((kv.version, kv.create_revision), (1, r));
}

pub async fn read_at_past_revision(s: S) {
    let r1 = s.put("/h/a", b"a1".to_vec()).await.unwrap();
    let r2 = s.put("/h/b", b"b1".to_vec()).await.unwrap();
    s.put("/h/a", b"a2".to_vec()).await.unwrap();
    s.delete("/h/b").await.unwrap();
    let at = |rev| s.range(RangeRequest::prefix("/h/").at_revision(rev));
    let v1 = at(r1).await.unwrap();
    assert_eq!(
        v1.kvs.iter().map(|kv| kv.value.clone()).collect::<Vec<_>>(),
        vec![b"a1".to_vec()]
    );
    let v2 = at(r2).await.unwrap();
    assert_eq!(v2.kvs.len(), 2);
    assert_eq!(v2.revision, r2);
    assert_eq!(v2.kvs[0].mod_revision, r1);
    let now = s.range(RangeRequest::prefix("/h/")).await.unwrap();
    assert_eq!(now.kvs.len(), 1);
    assert_eq!(now.kvs[0].value, b"a2");
    let future = s.current_revision().await.unwrap() + 10;
    assert!(matches!(
        at(future).await,
        Err(StoreError::FutureRevision { .. })
    ));
}

pub async fn watch_sees_changes_in_order(s: S) {
    let mut w = s.watch("/w/", 0).await.unwrap();
    let r1 = s.put("/w/a", b"1".to_vec()).await.unwrap();
    let r2 = s.put("/w/a", b"2".to_vec()).await.unwrap();
    s.delete("/w/a").await.unwrap();
    let e1 = next_event(&mut w).await;
    assert_eq!(
        (e1.kind, e1.kv.mod_revision, e1.prev_kv.is_none()),
        (EventKind::Put, r1, true)
    );
    let e2 = next_event(&mut w).await;
    assert_eq!(e2.kv.mod_revision, r2);
    assert_eq!(e2.prev_kv.as_ref().unwrap().value, b"1");
    let e3 = next_event(&mut w).await;
    assert_eq!(e3.kind, EventKind::Delete);
    assert_eq!(e3.kv.mod_revision, r2 + 1);
    assert_eq!(
        e3.prev_kv.unwrap().value,
        b"2",
        "a delete event carries the deleted value"
    );
}

pub async fn watch_resumes_from_revision(s: S) {
    let r1 = s.put("/r/a", b"1".to_vec()).await.unwrap();
    let r2 = s.put("/r/b", b"2".to_vec()).await.unwrap();
    let r3 = s.put("/r/a", b"3".to_vec()).await.unwrap();
    // A client that saw r1 resumes from r1 + 1 and must get exactly r2 and r3, then live events.
    let mut w = s.watch("/r/", r1 + 1).await.unwrap();
    assert_eq!(next_event(&mut w).await.kv.mod_revision, r2);
    assert_eq!(next_event(&mut w).await.kv.mod_revision, r3);
    let r4 = s.put("/r/c", b"4".to_vec()).await.unwrap();
    assert_eq!(next_event(&mut w).await.kv.mod_revision, r4);
    assert_no_event(&mut w).await;
}

pub async fn watch_filters_by_prefix(s: S) {
    let mut w = s.watch("/only/", 0).await.unwrap();
    s.put("/other/a", b"x".to_vec()).await.unwrap();
    s.put("/onlyx", b"x".to_vec()).await.unwrap();
    let r = s.put("/only/a", b"y".to_vec()).await.unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!((ev.kv.key.as_str(), ev.kv.mod_revision), ("/only/a", r));
    assert_no_event(&mut w).await;
}

pub async fn slow_watcher_loses_nothing(s: S) {
    let start = s.current_revision().await.unwrap() + 1;
    let mut w = s.watch("/slow/", start).await.unwrap();
    // Far more writes than any live buffer holds, while the watcher reads nothing.
    let n = 6000;
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..n / 4 {
                    s.put(&format!("/slow/{t}/{i}"), vec![1]).await.unwrap();
                }
            })
        })
        .collect();
    for h in writers {
        h.await.unwrap();
    }
    let mut last = 0;
    for _ in 0..n {
        let ev = next_event(&mut w).await;
        assert!(
            ev.kv.mod_revision > last,
            "events arrive in revision order without repeats"
        );
        last = ev.kv.mod_revision;
    }
    assert_no_event(&mut w).await;
}

pub async fn compaction_makes_old_revisions_too_old(s: S) {
    let r1 = s.put("/c/a", b"1".to_vec()).await.unwrap();
    let r2 = s.put("/c/a", b"2".to_vec()).await.unwrap();
    let r3 = s.put("/c/a", b"3".to_vec()).await.unwrap();
    s.compact(r2).await.unwrap();
    assert_eq!(s.compacted_revision().await.unwrap(), r2);
    assert!(
        matches!(s.watch("/c/", r1).await, Err(StoreError::Compacted { .. })),
        "watch before compaction"
    );
    assert!(matches!(
        s.watch("/c/", r2).await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(matches!(
        s.range(RangeRequest::prefix("/c/").at_revision(r1)).await,
        Err(StoreError::Compacted { .. })
    ));
    let mut w = s.watch("/c/", r2 + 1).await.unwrap();
    assert_eq!(next_event(&mut w).await.kv.mod_revision, r3);
    assert!(
        matches!(s.compact(r1).await, Err(StoreError::Compacted { .. })),
        "compacting backwards fails"
    );
}

pub async fn compaction_keeps_latest_values(s: S) {
    let r1 = s.put("/k/a", b"a".to_vec()).await.unwrap();
    s.put("/k/b", b"b1".to_vec()).await.unwrap();
    s.put("/k/b", b"b2".to_vec()).await.unwrap();
    s.put("/k/c", b"c".to_vec()).await.unwrap();
    let rdel = s
        .txn(Txn::new().and_then(Op::delete("/k/c")))
        .await
        .unwrap()
        .revision;
    s.compact(rdel).await.unwrap();
    let now = s.range(RangeRequest::prefix("/k/")).await.unwrap();
    let got: Vec<_> = now
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    assert_eq!(got, [("/k/a", b"a".as_slice()), ("/k/b", b"b2".as_slice())]);
    let at = s
        .range(RangeRequest::prefix("/k/").at_revision(rdel))
        .await
        .unwrap();
    assert_eq!(
        at.kvs.len(),
        2,
        "a read at the compaction revision still sees every live key"
    );
    assert_eq!(at.kvs[0].mod_revision, r1);
    s.put("/k/a", b"a2".to_vec()).await.unwrap();
    assert_eq!(
        s.range(RangeRequest::prefix("/k/").at_revision(rdel))
            .await
            .unwrap()
            .kvs[0]
            .value,
        b"a"
    );
}

pub async fn lease_expiry_deletes_attached_keys(s: S) {
    let lease = s.lease_grant(Duration::from_secs(1)).await.unwrap();
    s.txn(Txn::new().and_then(Op::put_with_lease("/l/held", "x", lease)))
        .await
        .unwrap();
    s.put("/l/free", b"y".to_vec()).await.unwrap();
    let mut w = s.watch("/l/", 0).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(8), w.next())
        .await
        .expect("expiry within 8 s");
    let ev = ev.unwrap().unwrap();
    assert_eq!(
        (ev.kind, ev.kv.key.as_str()),
        (EventKind::Delete, "/l/held")
    );
    assert!(s.get("/l/held").await.unwrap().is_none());
    assert!(
        s.get("/l/free").await.unwrap().is_some(),
        "keys without the lease stay"
    );
    assert_eq!(
        s.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    let attach = s
        .txn(Txn::new().and_then(Op::put_with_lease("/l/late", "z", lease)))
        .await;
    assert_eq!(attach.unwrap_err(), StoreError::LeaseNotFound(lease));
}

pub async fn lease_keep_alive_and_revoke(s: S) {
    let lease = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    s.txn(Txn::new().and_then(Op::put_with_lease("/ka/a", "x", lease)))
        .await
        .unwrap();
    // Renew well past the TTL: the key must survive.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.lease_keep_alive(lease).await.unwrap();
    }
    assert!(
        s.get("/ka/a").await.unwrap().is_some(),
        "a renewed lease keeps its keys"
    );
    s.lease_revoke(lease).await.unwrap();
    assert!(
        s.get("/ka/a").await.unwrap().is_none(),
        "revoking deletes the keys at once"
    );
    assert_eq!(
        s.lease_revoke(lease).await,
        Err(StoreError::LeaseNotFound(lease))
    );
}

/// Property: clients doing read-modify-write with compare-and-swap never lose an update.
pub async fn concurrent_read_modify_write_loses_no_update(s: S) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 6,
        ..Config::default()
    });
    let handle = tokio::runtime::Handle::current();
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&(2usize..10, 1usize..25), |(clients, increments)| {
        let key = format!(
            "/counter/{}",
            case.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let s = s.clone();
        let total = tokio::task::block_in_place(|| {
            handle.block_on(async move {
                let tasks: Vec<_> = (0..clients)
                    .map(|_| {
                        let (s, key) = (s.clone(), key.clone());
                        tokio::spawn(async move {
                            for _ in 0..increments {
                                loop {
                                    let cur = s.get(&key).await.unwrap();
                                    let (n, rev) = cur.map_or((0u64, 0), |kv| {
                                        (
                                            String::from_utf8(kv.value).unwrap().parse().unwrap(),
                                            kv.mod_revision,
                                        )
                                    });
                                    let txn = Txn::new()
                                        .when(Compare::mod_revision(key.as_str(), rev))
                                        .and_then(Op::put(key.as_str(), (n + 1).to_string()));
                                    if s.txn(txn).await.unwrap().succeeded {
                                        break;
                                    }
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                let kv = s.get(&key).await.unwrap().unwrap();
                String::from_utf8(kv.value)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            })
        });
        prop_assert_eq!(total, clients * increments);
        Ok(())
    });
    result.unwrap();
}
