//! Compaction: drops store history older than one interval, like the Kubernetes apiserver's
//! periodic compaction. A watcher that falls further behind than that gets 410 Gone and relists.

use std::sync::Arc;
use std::time::Duration;

use flotilla_store::{Store, StoreError};

/// Every `interval`, compacts to the revision that was current one interval earlier.
pub async fn run(store: Arc<dyn Store>, interval: Duration) {
    let mut previous: Option<i64> = None;
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Some(rev) = previous {
            match store.compact(rev).await {
                Ok(()) => tracing::debug!(revision = rev, "compacted store history"),
                Err(StoreError::Compacted { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "compaction failed; trying again next interval")
                }
            }
        }
        previous = match store.current_revision().await {
            Ok(rev) if rev > 0 => Some(rev),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn compacts_what_is_older_than_one_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            flotilla_store::SqliteStore::open(dir.path().join("s.db"))
                .await
                .unwrap(),
        );
        let first = store.put("/a", b"1".to_vec()).await.unwrap();
        let task = tokio::spawn(run(store.clone(), Duration::from_millis(200)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = store.put("/a", b"2".to_vec()).await.unwrap();
        let mut compacted = 0;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            compacted = store.compacted_revision().await.unwrap();
            if compacted >= second {
                break;
            }
        }
        task.abort();
        assert!(
            compacted >= first,
            "history of the first interval is dropped"
        );
        assert_eq!(
            store.get("/a").await.unwrap().unwrap().value,
            b"2",
            "current data is untouched"
        );
    }
}
