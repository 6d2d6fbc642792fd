//! Fencing: a view of a store whose writes succeed only while a key (the leader key) is still at
//! the revision its holder created it at. A deposed leader's late writes fail with
//! [`StoreError::Fenced`] instead of landing after a new leader has taken over.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Compare, LeaseId, Op, RangeRequest, RangeResponse, Revision, Store, StoreError, Txn,
    TxnResponse, WatchStream,
};

pub struct FencedStore {
    inner: Arc<dyn Store>,
    key: String,
    revision: Revision,
}

impl FencedStore {
    /// Writes through this store require `key` to be at mod revision `revision`.
    pub fn new(inner: Arc<dyn Store>, key: &str, revision: Revision) -> Self {
        FencedStore {
            inner,
            key: key.to_string(),
            revision,
        }
    }
}

fn writes(ops: &[Op]) -> bool {
    ops.iter().any(|op| !matches!(op, Op::Get { .. }))
}

#[async_trait]
impl Store for FencedStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        self.inner.range(req).await
    }

    async fn txn(&self, mut txn: Txn) -> Result<TxnResponse, StoreError> {
        if !writes(&txn.success) && !writes(&txn.failure) {
            return self.inner.txn(txn).await;
        }
        txn.compares
            .push(Compare::mod_revision(&self.key, self.revision));
        let resp = self.inner.txn(txn).await?;
        if !resp.succeeded {
            let holder = self.inner.get(&self.key).await?;
            if holder.map_or(0, |kv| kv.mod_revision) != self.revision {
                return Err(StoreError::Fenced);
            }
        }
        Ok(resp)
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, start).await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.lease_grant(ttl).await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        self.inner.lease_keep_alive(id).await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.inner.lease_revoke(id).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.inner.current_revision().await
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        self.inner.compacted_revision().await
    }
}
