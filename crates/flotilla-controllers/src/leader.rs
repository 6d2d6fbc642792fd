//! Leader election for the controllers when several servers share one store (etcd): exactly one
//! server runs them. The leader holds `/flotilla/leader/controllers`, attached to a store lease
//! it keeps alive; when it dies the lease expires, the key goes, and another server takes over.
//! The controllers of a leader write through a [`FencedStore`]: once the key has changed hands,
//! their writes fail instead of landing after the new leader's.
//!
//! The key lives outside `/registry/`, so it cannot clash with the nodes' heartbeat Leases.

use std::sync::Arc;
use std::time::Duration;

use flotilla_server::Objects;
use flotilla_store::{Compare, EventKind, FencedStore, Op, Store, StoreError, Txn};
use futures::StreamExt;

use crate::ControllerConfig;

pub const LEADER_KEY: &str = "/flotilla/leader/controllers";

/// Holding the leader key: the lease it hangs on and the revision it was created at (the fence).
#[derive(Clone, Copy, Debug)]
pub struct Leadership {
    pub lease: i64,
    pub revision: i64,
}

/// Waits until this server holds the leader key.
pub async fn campaign(store: &Arc<dyn Store>, identity: &str, ttl: Duration) -> Leadership {
    loop {
        match try_acquire(store, identity, ttl).await {
            Ok(Some(leadership)) => return leadership,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "leader election: the store failed; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// One attempt: takes the key if it is free, else waits (at most one TTL) for it to go.
async fn try_acquire(
    store: &Arc<dyn Store>,
    identity: &str,
    ttl: Duration,
) -> Result<Option<Leadership>, StoreError> {
    let lease = store.lease_grant(ttl).await?;
    let resp = store
        .txn(
            Txn::new()
                .when(Compare::absent(LEADER_KEY))
                .and_then(Op::put_with_lease(LEADER_KEY, identity, lease)),
        )
        .await?;
    if resp.succeeded {
        return Ok(Some(Leadership {
            lease,
            revision: resp.revision,
        }));
    }
    let _ = store.lease_revoke(lease).await;
    let mut events = store.watch(LEADER_KEY, resp.revision + 1).await?;
    let gone = async {
        while let Some(Ok(ev)) = events.next().await {
            if ev.kind == EventKind::Delete {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(ttl, gone).await;
    Ok(None)
}

/// Keeps the lease alive (every third of the TTL) until it cannot: leadership is lost.
pub async fn hold(store: &Arc<dyn Store>, leadership: Leadership, ttl: Duration) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        if let Err(e) = store.lease_keep_alive(leadership.lease).await {
            tracing::warn!(error = %e, "leader election: lost the lease; stepping down");
            return;
        }
    }
}

/// Runs the controllers only while this server is the leader, fenced by the leader key.
pub async fn run_elected(
    objects: Objects,
    config: ControllerConfig,
    identity: String,
    ttl: Duration,
) {
    let store = objects.store().clone();
    loop {
        let leadership = campaign(&store, &identity, ttl).await;
        tracing::info!(identity, "leading the controllers");
        let fenced: Arc<dyn Store> = Arc::new(FencedStore::new(
            store.clone(),
            LEADER_KEY,
            leadership.revision,
        ));
        let tasks = crate::spawn_all(Objects::new(fenced), config.clone());
        hold(&store, leadership, ttl).await;
        for t in tasks {
            t.abort();
        }
        tracing::info!(identity, "no longer leading the controllers");
    }
}
