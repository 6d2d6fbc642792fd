//! Flotilla's store: an etcd-shaped key-value interface.
//!
//! Keys are ordered byte strings (ASCII here), every write bumps one global revision, reads can be
//! taken at a past revision, writes are transactions guarded by compare-and-swap on a key's mod
//! revision, watches stream every change from a revision on, and leases expire keys attached to
//! them. [`SqliteStore`] is the embedded backend, [`EtcdStore`] the one for several servers; both
//! pass the same `conformance` suite.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

#[cfg(feature = "conformance")]
pub mod conformance;
mod dry_run;
mod etcd;
#[cfg(feature = "conformance")]
pub mod etcd_cluster;
mod fence;
mod sqlite;

pub use dry_run::DryRunStore;
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use fence::FencedStore;
pub use sqlite::{SqliteOptions, SqliteStore};

/// A global store revision. Revision 0 means "none" (a key that does not exist has mod revision 0).
pub type Revision = i64;
/// A lease identifier. 0 means "no lease".
pub type LeaseId = i64;

/// One key and its value at some revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after create).
    pub version: i64,
    pub lease: LeaseId,
}

/// A range read: a single key (`end == None`) or the half-open interval `[start, end)`.
#[derive(Clone, Debug, Default)]
pub struct RangeRequest {
    pub start: String,
    pub end: Option<String>,
    /// At most this many keys; 0 means no limit.
    pub limit: usize,
    /// Read at this revision; 0 means the current one.
    pub revision: Revision,
}

impl RangeRequest {
    pub fn key(key: impl Into<String>) -> Self {
        RangeRequest {
            start: key.into(),
            ..Default::default()
        }
    }

    pub fn prefix(prefix: &str) -> Self {
        RangeRequest {
            start: prefix.to_string(),
            end: Some(prefix_end(prefix)),
            ..Default::default()
        }
    }

    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    pub fn at_revision(mut self, revision: Revision) -> Self {
        self.revision = revision;
        self
    }
}

#[derive(Clone, Debug, Default)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// The revision the read was served at.
    pub revision: Revision,
}

/// A guard of a transaction: the key's mod revision must equal `mod_revision`
/// (0 = the key must not exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub mod_revision: Revision,
}

impl Compare {
    pub fn mod_revision(key: impl Into<String>, mod_revision: Revision) -> Self {
        Compare {
            key: key.into(),
            mod_revision,
        }
    }

    pub fn absent(key: impl Into<String>) -> Self {
        Compare {
            key: key.into(),
            mod_revision: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
    Get {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    pub fn put_with_lease(
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    pub fn get(key: impl Into<String>) -> Self {
        Op::Get { key: key.into() }
    }

    fn write_key(&self) -> Option<&str> {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => Some(key),
            Op::Get { .. } => None,
        }
    }
}

/// If every compare holds, apply `success`, else apply `failure`; atomically, at one revision.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }

    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    pub fn and_then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }

    pub fn or_else(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// The previous value of the key, if there was one.
    Put {
        prev: Option<KeyValue>,
    },
    /// The deleted value, if the key existed.
    Delete {
        prev: Option<KeyValue>,
    },
    Get {
        kv: Option<KeyValue>,
    },
}

#[derive(Clone, Debug)]
pub struct TxnResponse {
    pub succeeded: bool,
    /// The store revision after the transaction (its own revision if it wrote anything).
    pub revision: Revision,
    pub results: Vec<OpResult>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For a delete, `kv` has the key, an empty value and the deletion's revision as
/// `mod_revision`; `prev_kv` holds the value as it was before the change (if it existed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("revision {requested} has been compacted; the oldest revision still available is {compacted}")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is in the future; the current revision is {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("lease {0} does not exist or has expired")]
    LeaseNotFound(LeaseId),
    #[error("key {0:?} is written twice in one transaction")]
    DuplicateKey(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("store backend failed: {0}")]
    Backend(String),
    /// The store did not answer (no leader, member unreachable, connection lost): the request
    /// may be sent again later; a write's outcome is unknown (read before writing again).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("this server no longer holds the leader key; the write was refused")]
    Fenced,
}

/// The store interface every backend implements (see the crate docs).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError>;

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Streams every change to keys starting with `prefix` whose revision is `>= start_revision`
    /// (0 = only changes after the call), in revision order. Fails with `Compacted` when history
    /// from `start_revision` is no longer kept; the stream ends with that error if the watcher
    /// falls so far behind that its next event has been compacted meanwhile.
    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError>;

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews the lease for another full TTL.
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError>;

    /// Revokes the lease and deletes every key attached to it.
    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError>;

    /// Drops history older than `revision`: reads and watches below it fail with `Compacted`.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    async fn current_revision(&self) -> Result<Revision, StoreError>;

    async fn compacted_revision(&self) -> Result<Revision, StoreError>;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.range(RangeRequest::key(key)).await?.kvs.pop())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        Ok(self
            .txn(Txn::new().and_then(Op::put(key, value)))
            .await?
            .revision)
    }

    async fn delete(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self.txn(Txn::new().and_then(Op::delete(key))).await?;
        match resp.results.into_iter().next() {
            Some(OpResult::Delete { prev }) => Ok(prev),
            _ => Ok(None),
        }
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's "prefix end").
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).expect("ASCII stays valid UTF-8");
        }
    }
    // Everything: "\u{7f}" is above every ASCII key.
    "\u{7f}".to_string()
}

pub(crate) fn validate_txn(txn: &Txn) -> Result<(), StoreError> {
    for ops in [&txn.success, &txn.failure] {
        let mut seen = std::collections::HashSet::new();
        for op in ops.iter() {
            if let Some(key) = op.write_key() {
                if !seen.insert(key) {
                    return Err(StoreError::DuplicateKey(key.to_string()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/registry/vms/"), "/registry/vms0");
        assert_eq!(prefix_end("a"), "b");
        assert!(prefix_end("/x/").as_str() > "/x/zzzz");
    }

    #[test]
    fn duplicate_write_keys_are_rejected() {
        let txn = Txn::new()
            .and_then(Op::put("a", "1"))
            .and_then(Op::delete("a"));
        assert_eq!(
            validate_txn(&txn),
            Err(StoreError::DuplicateKey("a".into()))
        );
        let ok = Txn::new()
            .and_then(Op::put("a", "1"))
            .and_then(Op::get("a"));
        assert!(validate_txn(&ok).is_ok());
    }
}
