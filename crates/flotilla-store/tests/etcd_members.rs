//! The etcd backend while members of a real three-member cluster die and come back: a watch
//! is on one member's connection, and losing that member must not end it (as it does not with
//! etcd's own client), nor lose or repeat an event.

use std::time::Duration;

use flotilla_store::etcd_cluster::EtcdCluster;
use flotilla_store::{EtcdOptions, EtcdStore, Store, StoreError};
use futures::StreamExt;

/// Writes `key` once: a write whose answer is lost with its member has an unknown outcome, so
/// the key is read before it is written again (as the store's contract asks of callers).
async fn write_once(store: &EtcdStore, key: &str) -> i64 {
    for _ in 0..100 {
        match store.put(key, vec![1]).await {
            Ok(revision) => return revision,
            Err(StoreError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(Some(kv)) = store.get(key).await {
                    return kv.mod_revision;
                }
            }
            Err(e) => panic!("writing {key}: {e}"),
        }
    }
    panic!("{key} could not be written in 20 s with two of three members up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outlives_the_member_it_was_reading_from() {
    let mut cluster = EtcdCluster::start(3).await;
    let store = EtcdStore::connect(EtcdOptions {
        endpoints: cluster.endpoints.clone(),
        tls: None,
    })
    .await
    .expect("connect to etcd");
    let from = store.current_revision().await.unwrap() + 1;
    let mut watch = store.watch("/w/", from).await.unwrap();
    // Each member in turn dies and comes back, so whichever one the watch reads from is lost
    // once; two of three stay up, so writes go on throughout.
    let mut written = Vec::new();
    for member in 0..3 {
        let key = format!("/w/{member}/before");
        written.push((key.clone(), write_once(&store, &key).await));
        cluster.kill(member);
        let key = format!("/w/{member}/without");
        written.push((key.clone(), write_once(&store, &key).await));
        cluster.restart(member);
        cluster.wait_healthy().await;
    }
    for (key, revision) in &written {
        let event = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .unwrap_or_else(|_| panic!("the event of {key} within 20 s"))
            .expect("the watch stays open")
            .unwrap_or_else(|e| panic!("the event of {key}, not an error: {e}"));
        assert_eq!(
            (&event.kv.key, event.kv.mod_revision),
            (key, *revision),
            "every event once, in order"
        );
    }
}
