//! Leader election: one leader at a time, a successor once the leader's lease is gone, and a
//! deposed leader's writes refused (fenced).

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_controllers::leader::{campaign, LEADER_KEY};
use flotilla_store::{FencedStore, SqliteStore, Store, StoreError};

async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(dir.path().join("s.db")).await.unwrap();
    (dir, Arc::new(s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_then_a_successor_and_the_old_one_is_fenced() {
    let (_dir, s) = store().await;
    let ttl = Duration::from_secs(2);
    let first = campaign(&s, "first", ttl).await;
    assert_eq!(s.get(LEADER_KEY).await.unwrap().unwrap().value, b"first");

    // The second waits while the first holds the key.
    let s2 = s.clone();
    let second = tokio::spawn(async move { campaign(&s2, "second", ttl).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "only one leader at a time");

    // The first's controllers write through the fence, as long as they lead.
    let fenced = FencedStore::new(s.clone(), LEADER_KEY, first.revision);
    fenced.put("/registry/x", b"1".to_vec()).await.unwrap();

    // The first dies (its lease is not renewed): the second takes over within about one TTL.
    let gone = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap();
    println!("successor after {} ms", gone.elapsed().as_millis());
    assert!(second.revision > first.revision);
    assert_eq!(s.get(LEADER_KEY).await.unwrap().unwrap().value, b"second");

    // The deposed leader's late write is refused; reads still work.
    assert_eq!(
        fenced.put("/registry/x", b"late".to_vec()).await,
        Err(StoreError::Fenced)
    );
    assert_eq!(
        fenced.get("/registry/x").await.unwrap().unwrap().value,
        b"1"
    );
    let new = FencedStore::new(s.clone(), LEADER_KEY, second.revision);
    new.put("/registry/x", b"2".to_vec()).await.unwrap();
}
