//! The etcd backend: the store interface is etcd's own (revisions, transactions guarded by mod
//! revision, watches with previous values, leases, compaction), so this is a thin mapping.
//!
//! What etcd does not report, this backend keeps: the compacted revision (etcd's errors do not
//! carry it). It is what this process compacted, or what it found out when etcd refused a read,
//! by a binary search over revisions.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client as etcd;
use futures::StreamExt;

use crate::{
    KeyValue, LeaseId, OpResult, RangeRequest, RangeResponse, Revision, Store, StoreError, Txn,
    TxnResponse, WatchEvent, WatchStream,
};

/// Where to find etcd and how to talk to it.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// Client URLs (`http://127.0.0.1:2379`, or https with `tls`).
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
}

/// PEM files for etcd's client TLS.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca_pem: String,
    /// Client certificate and key, when etcd asks for one.
    pub client: Option<(String, String)>,
}

pub struct EtcdStore {
    client: etcd::Client,
    compacted: AtomicI64,
}

fn backend(e: etcd::Error) -> StoreError {
    if unavailable(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

fn kv(k: &etcd::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
        version: k.version(),
        lease: k.lease(),
    }
}

/// etcd did not take the request (no leader, leader changed, member unreachable): safe to send
/// again, also for writes.
fn not_applied(e: &etcd::Error) -> bool {
    let s = e.to_string();
    s.contains("Unavailable")
        || s.contains("leader changed")
        || s.contains("no leader")
        || s.contains("tcp connect error")
}

/// A failure of the connection by its message. A request on a connection to a member that
/// just died comes back Cancelled ("operation was canceled").
fn lost_connection(e: &etcd::Error) -> bool {
    let s = e.to_string();
    not_applied(e) || s.contains("transport error") || s.contains("operation was canceled")
}

/// The store did not answer: the connection failed, or etcd gave up on the request (no
/// leader, timed out, cancelled). Reads may be sent again; a write's outcome is unknown.
fn unavailable(e: &etcd::Error) -> bool {
    match e {
        etcd::Error::TransportError(_) | etcd::Error::IoError(_) => true,
        // tonic's Code by its Debug name (this crate does not depend on tonic itself).
        etcd::Error::GRpcStatus(status) => {
            matches!(
                format!("{:?}", status.code()).as_str(),
                "Unavailable" | "Cancelled" | "DeadlineExceeded"
            ) || lost_connection(e)
        }
        _ => lost_connection(e),
    }
}

/// Sends again while `retry` says the failure was transient, for up to 10 s (an etcd leader
/// election takes a few seconds).
async fn again<T, F, Fut>(retry: fn(&etcd::Error) -> bool, mut call: F) -> Result<T, etcd::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd::Error>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_millis(50);
    loop {
        match call().await {
            Err(e) if retry(&e) && tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(error = %e, "etcd request failed; sending it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            result => return result,
        }
    }
}

fn is_compacted(e: &etcd::Error) -> bool {
    e.to_string()
        .contains("required revision has been compacted")
}

fn is_future(e: &etcd::Error) -> bool {
    e.to_string()
        .contains("required revision is a future revision")
}

impl EtcdStore {
    pub async fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        let mut connect = etcd::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        if let Some(tls) = &opts.tls {
            let mut t = etcd::TlsOptions::new()
                .ca_certificate(etcd::Certificate::from_pem(tls.ca_pem.as_bytes()));
            if let Some((cert, key)) = &tls.client {
                t = t.identity(etcd::Identity::from_pem(cert.as_bytes(), key.as_bytes()));
            }
            connect = connect.with_tls(t);
        }
        let client = etcd::Client::connect(&opts.endpoints, Some(connect))
            .await
            .map_err(backend)?;
        let store = EtcdStore {
            client,
            compacted: AtomicI64::new(0),
        };
        store.learn_compaction().await?;
        Ok(store)
    }

    /// Finds the oldest revision etcd still serves (after compaction at R, reads at R still work:
    /// R is the compacted revision) by a binary search, and remembers it.
    async fn learn_compaction(&self) -> Result<Revision, StoreError> {
        let known = self.compacted.load(Ordering::SeqCst);
        let current = self.current_revision().await?;
        let readable = |rev: Revision| {
            let mut c = self.client.clone();
            async move {
                let opts = etcd::GetOptions::new().with_revision(rev).with_limit(1);
                match c.get("\0", Some(opts)).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_compacted(&e) => Ok(false),
                    Err(e) => Err(backend(e)),
                }
            }
        };
        let (mut lo, mut hi) = (known.max(1), current.max(1));
        if readable(lo).await? {
            return Ok(known);
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if readable(mid).await? {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        self.compacted.fetch_max(lo, Ordering::SeqCst);
        Ok(self.compacted.load(Ordering::SeqCst))
    }

    async fn compacted_error(&self, requested: Revision) -> StoreError {
        let compacted = self
            .learn_compaction()
            .await
            .unwrap_or_else(|_| self.compacted.load(Ordering::SeqCst));
        StoreError::Compacted {
            requested,
            compacted,
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        let mut opts = etcd::GetOptions::new();
        if let Some(end) = &req.end {
            opts = opts.with_range(end.as_bytes());
        }
        if req.limit > 0 {
            opts = opts.with_limit(req.limit as i64);
        }
        if req.revision > 0 {
            opts = opts.with_revision(req.revision);
        }
        let get = || {
            let (mut c, opts) = (self.client.clone(), opts.clone());
            let start = req.start.clone();
            async move { c.get(start, Some(opts)).await }
        };
        match again(unavailable, get).await {
            Ok(resp) => Ok(RangeResponse {
                kvs: resp.kvs().iter().map(kv).collect(),
                more: resp.more(),
                revision: if req.revision > 0 {
                    req.revision
                } else {
                    resp.header().map_or(0, |h| h.revision())
                },
            }),
            Err(e) if is_compacted(&e) => Err(self.compacted_error(req.revision).await),
            Err(e) if is_future(&e) => Err(StoreError::FutureRevision {
                requested: req.revision,
                current: self.current_revision().await?,
            }),
            Err(e) => Err(backend(e)),
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        crate::validate_txn(&txn)?;
        let op = |op: &crate::Op| match op {
            crate::Op::Put { key, value, lease } => {
                let mut o = etcd::PutOptions::new().with_prev_key();
                if *lease != 0 {
                    o = o.with_lease(*lease);
                }
                etcd::TxnOp::put(key.as_bytes(), value.clone(), Some(o))
            }
            crate::Op::Delete { key } => etcd::TxnOp::delete(
                key.as_bytes(),
                Some(etcd::DeleteOptions::new().with_prev_key()),
            ),
            crate::Op::Get { key } => etcd::TxnOp::get(key.as_bytes(), None),
        };
        let compares: Vec<etcd::Compare> = txn
            .compares
            .iter()
            .map(|c| {
                etcd::Compare::mod_revision(
                    c.key.as_bytes(),
                    etcd::CompareOp::Equal,
                    c.mod_revision,
                )
            })
            .collect();
        let request = etcd::Txn::new()
            .when(compares)
            .and_then(txn.success.iter().map(op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(op).collect::<Vec<_>>());
        let send = || {
            let (mut c, request) = (self.client.clone(), request.clone());
            async move { c.txn(request).await }
        };
        let resp = again(not_applied, send).await.map_err(|e| {
            if e.to_string().contains("requested lease not found") {
                let lease = txn
                    .success
                    .iter()
                    .chain(&txn.failure)
                    .find_map(|o| match o {
                        crate::Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                        _ => None,
                    })
                    .unwrap_or(0);
                StoreError::LeaseNotFound(lease)
            } else {
                backend(e)
            }
        })?;
        let results = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                etcd::TxnOpResponse::Put(p) => OpResult::Put {
                    prev: p.prev_key().map(kv),
                },
                etcd::TxnOpResponse::Delete(d) => OpResult::Delete {
                    prev: d.prev_kvs().first().map(kv),
                },
                etcd::TxnOpResponse::Get(g) => OpResult::Get {
                    kv: g.kvs().first().map(kv),
                },
                etcd::TxnOpResponse::Txn(_) => OpResult::Get { kv: None },
            })
            .collect();
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
            results,
        })
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        if start_revision > 0 && start_revision <= self.compacted.load(Ordering::SeqCst) {
            return Err(self.compacted_error(start_revision).await);
        }
        let end = crate::prefix_end(prefix);
        let opts = etcd::WatchOptions::new()
            .with_range(end.as_bytes())
            .with_prev_key();
        // "From now" must mean after every write already acknowledged: a follower would start
        // at the revision it has applied, which can be older. A (linearizable) read says where.
        let start = if start_revision > 0 {
            start_revision
        } else {
            self.current_revision().await? + 1
        };
        let open = {
            let (client, key) = (self.client.clone(), prefix.to_string());
            move |from: Revision| {
                let (client, key) = (client.clone(), key.clone());
                let opts = opts.clone().with_start_revision(from);
                async move {
                    let start = || {
                        let (mut c, key, opts) = (client.clone(), key.clone(), opts.clone());
                        async move { c.watch(key, Some(opts)).await }
                    };
                    again(not_applied, start).await
                }
            }
        };
        let (watcher, stream) = open(start).await.map_err(backend)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<WatchEvent, StoreError>>(256);
        tokio::spawn(async move {
            // Dropping the watcher cancels the watch; keep it as long as the stream is read.
            let (mut _watcher, mut stream) = (watcher, stream);
            // The next revision the reader has not seen: where a lost watch resumes.
            let mut next = start;
            // Resumptions since the last message the stream brought.
            let mut resumed = 0u32;
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    m = stream.message() => m,
                };
                let resp = match message {
                    Ok(Some(resp)) => {
                        resumed = 0;
                        resp
                    }
                    // A connection lost (a member died: "h2 protocol error"; a keepalive
                    // missed under load) ends the stream, not the watch: as etcd's own client
                    // does, it resumes from the next revision on another connection, and the
                    // reader sees nothing. A stream that keeps failing at once is an error.
                    Err(e) if resumed >= 5 => {
                        let _ = tx.send(Err(backend(e))).await;
                        return;
                    }
                    lost => {
                        let why = lost
                            .err()
                            .map_or("the stream ended".into(), |e| e.to_string());
                        tracing::debug!(error = %why, next, "an etcd watch was lost; resuming it");
                        resumed += 1;
                        tokio::time::sleep(Duration::from_millis(100) * resumed).await;
                        match open(next).await {
                            Ok(again) => (_watcher, stream) = again,
                            Err(e) => {
                                let _ = tx.send(Err(backend(e))).await;
                                return;
                            }
                        }
                        continue;
                    }
                };
                if resp.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: next,
                            compacted: resp.compact_revision(),
                        }))
                        .await;
                    return;
                }
                if resp.canceled() {
                    let reason = resp.cancel_reason().to_string();
                    let _ = tx.send(Err(StoreError::Backend(reason))).await;
                    return;
                }
                for ev in resp.events() {
                    let Some(k) = ev.kv() else { continue };
                    let event = WatchEvent {
                        kind: match ev.event_type() {
                            etcd::EventType::Put => crate::EventKind::Put,
                            etcd::EventType::Delete => crate::EventKind::Delete,
                        },
                        kv: kv(k),
                        prev_kv: ev.prev_kv().map(kv),
                    };
                    next = event.kv.mod_revision + 1;
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
                .boxed(),
        ))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let grant = || {
            let mut c = self.client.clone();
            async move { c.lease_grant(ttl.as_secs().max(1) as i64, None).await }
        };
        Ok(again(not_applied, grant).await.map_err(backend)?.id())
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        let lease_error = |e: etcd::Error| {
            if e.to_string().contains("lease not found") {
                StoreError::LeaseNotFound(id)
            } else {
                backend(e)
            }
        };
        let renew = || {
            let mut c = self.client.clone();
            async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                keeper.keep_alive().await?;
                stream.message().await
            }
        };
        match again(not_applied, renew).await.map_err(lease_error)? {
            Some(resp) if resp.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(id)),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        match c.lease_revoke(id).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("requested lease not found") => {
                Err(StoreError::LeaseNotFound(id))
            }
            Err(e) => Err(backend(e)),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        if revision <= self.compacted.load(Ordering::SeqCst) {
            return Err(self.compacted_error(revision).await);
        }
        let mut c = self.client.clone();
        match c
            .compact(
                revision,
                Some(etcd::CompactionOptions::new().with_physical()),
            )
            .await
        {
            Ok(_) => {}
            // Someone else compacted as far or further already.
            Err(e) if is_compacted(&e) => return Err(self.compacted_error(revision).await),
            Err(e) if is_future(&e) => {
                return Err(StoreError::FutureRevision {
                    requested: revision,
                    current: self.current_revision().await?,
                })
            }
            Err(e) => return Err(backend(e)),
        }
        self.compacted.fetch_max(revision, Ordering::SeqCst);
        Ok(())
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let get = || {
            let mut c = self.client.clone();
            async move {
                c.get("\0", Some(etcd::GetOptions::new().with_count_only()))
                    .await
            }
        };
        let resp = again(unavailable, get).await.map_err(backend)?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.compacted.load(Ordering::SeqCst))
    }
}
