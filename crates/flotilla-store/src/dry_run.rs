//! Dry runs: a view of a store whose transactions are evaluated but never applied. The real
//! store checks every compare at one revision (so conflicts, existence and preconditions answer
//! exactly as they would), the writes are turned into reads of the same keys, and the answer is
//! what the transaction would have answered: the previous values of the keys it would have
//! written. Nothing is stored, the revision does not move, and no watcher sees anything.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    LeaseId, Op, OpResult, RangeRequest, RangeResponse, Revision, Store, StoreError, Txn,
    TxnResponse, WatchStream,
};

pub struct DryRunStore {
    inner: Arc<dyn Store>,
}

impl DryRunStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        DryRunStore { inner }
    }
}

fn as_read(op: &Op) -> Op {
    match op {
        Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => Op::get(key.clone()),
    }
}

/// What `op` would have answered, from the value its key has now.
fn would_answer(op: &Op, now: OpResult) -> OpResult {
    let prev = match now {
        OpResult::Get { kv } | OpResult::Put { prev: kv } | OpResult::Delete { prev: kv } => kv,
    };
    match op {
        Op::Put { .. } => OpResult::Put { prev },
        Op::Delete { .. } => OpResult::Delete { prev },
        Op::Get { .. } => OpResult::Get { kv: prev },
    }
}

fn refused() -> StoreError {
    StoreError::InvalidRequest(
        "a dry run changes nothing: leases and compaction are refused".into(),
    )
}

#[async_trait]
impl Store for DryRunStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        self.inner.range(req).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        crate::validate_txn(&txn)?;
        let probe = Txn {
            compares: txn.compares.clone(),
            success: txn.success.iter().map(as_read).collect(),
            failure: txn.failure.iter().map(as_read).collect(),
        };
        let resp = self.inner.txn(probe).await?;
        let ops = if resp.succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        Ok(TxnResponse {
            succeeded: resp.succeeded,
            revision: resp.revision,
            results: ops
                .iter()
                .zip(resp.results)
                .map(|(op, now)| would_answer(op, now))
                .collect(),
        })
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, start).await
    }

    async fn lease_grant(&self, _ttl: Duration) -> Result<LeaseId, StoreError> {
        Err(refused())
    }

    async fn lease_keep_alive(&self, _id: LeaseId) -> Result<(), StoreError> {
        Err(refused())
    }

    async fn lease_revoke(&self, _id: LeaseId) -> Result<(), StoreError> {
        Err(refused())
    }

    async fn compact(&self, _revision: Revision) -> Result<(), StoreError> {
        Err(refused())
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.inner.current_revision().await
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        self.inner.compacted_revision().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Compare, SqliteStore};

    #[tokio::test]
    async fn transactions_answer_as_they_would_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let real: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path().join("s.db")).await.unwrap());
        let rev = real.put("/a", b"1".to_vec()).await.unwrap();
        let dry = DryRunStore::new(real.clone());
        // A compare that holds: "succeeds", reporting the previous value, writing nothing.
        let resp = dry
            .txn(
                Txn::new()
                    .when(Compare::mod_revision("/a", rev))
                    .and_then(Op::put("/a", b"2".to_vec()))
                    .and_then(Op::delete("/b")),
            )
            .await
            .unwrap();
        assert!(resp.succeeded);
        assert!(matches!(&resp.results[0], OpResult::Put { prev: Some(kv) } if kv.value == b"1"));
        assert!(matches!(&resp.results[1], OpResult::Delete { prev: None }));
        assert_eq!(
            real.current_revision().await.unwrap(),
            rev,
            "nothing was written"
        );
        assert_eq!(real.get("/a").await.unwrap().unwrap().value, b"1");
        // A compare that fails: the failure branch answers, as for real.
        let resp = dry
            .txn(
                Txn::new()
                    .when(Compare::absent("/a"))
                    .and_then(Op::put("/a", b"3".to_vec()))
                    .or_else(Op::get("/a")),
            )
            .await
            .unwrap();
        assert!(!resp.succeeded);
        assert!(matches!(&resp.results[0], OpResult::Get { kv: Some(_) }));
        assert!(dry.lease_grant(Duration::from_secs(1)).await.is_err());
    }
}
