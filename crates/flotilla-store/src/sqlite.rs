//! The embedded backend: SQLite in WAL mode.
//!
//! Two tables carry the data: `kv` holds the current value of every key, `log` holds every change
//! (with the value before it) by revision, for reads at a past revision and for watches. One writer
//! connection serialises transactions; a few reader connections serve ranges concurrently (WAL
//! readers see the last committed state). Watches get live events from an in-process broadcast
//! and fall back to the log when they lag behind, so a slow watcher never loses an event and
//! never slows the writer down.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{broadcast, mpsc};

use crate::{
    validate_txn, Compare, EventKind, KeyValue, LeaseId, Op, OpResult, RangeRequest, RangeResponse,
    Revision, Store, StoreError, Txn, TxnResponse, WatchEvent, WatchStream,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER NOT NULL, sub INTEGER NOT NULL, key TEXT NOT NULL, deleted INTEGER NOT NULL,
    value BLOB NOT NULL, create_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL,
    prev_value BLOB, prev_create_rev INTEGER, prev_mod_rev INTEGER, prev_version INTEGER, prev_lease INTEGER,
    PRIMARY KEY (rev, sub)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS log_by_key ON log(key, rev);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('schema_version', 1), ('current_rev', 0), ('compact_rev', 0), ('next_lease', 1);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl_ms INTEGER NOT NULL);
";

/// Tuning of the SQLite backend. The defaults suit a single server.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// Concurrent reader connections.
    pub readers: usize,
    /// How often expired leases are looked for.
    pub lease_check_interval: Duration,
    /// Change batches buffered for live watchers before a slow one falls back to the log.
    pub watch_buffer: usize,
    /// `synchronous=FULL` (fsync on every commit) when true; survives power loss, not only crashes.
    pub fsync: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            readers: 4,
            lease_check_interval: Duration::from_millis(250),
            watch_buffer: 4096,
            fsync: true,
        }
    }
}

struct Lease {
    ttl: Duration,
    expires: Instant,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    events: broadcast::Sender<Arc<Vec<WatchEvent>>>,
    leases: Mutex<HashMap<LeaseId, Lease>>,
    current: AtomicI64,
    compacted: AtomicI64,
}

/// The SQLite store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`. Must be called inside a Tokio runtime.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    pub async fn open_with(
        path: impl AsRef<Path>,
        opts: SqliteOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let opts2 = opts.clone();
        let inner = tokio::task::spawn_blocking(move || Self::open_blocking(path, &opts2))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))??;
        let inner = Arc::new(inner);
        tokio::spawn(expire_leases(
            Arc::downgrade(&inner),
            opts.lease_check_interval,
        ));
        Ok(SqliteStore { inner })
    }

    fn open_blocking(path: PathBuf, opts: &SqliteOptions) -> Result<Inner, StoreError> {
        let writer = Connection::open(&path).map_err(backend)?;
        writer
            .execute_batch(&format!(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous={}; PRAGMA busy_timeout=10000;",
                if opts.fsync { "FULL" } else { "NORMAL" }
            ))
            .map_err(backend)?;
        writer.execute_batch(SCHEMA).map_err(backend)?;
        let meta = |name: &str| -> Result<i64, StoreError> {
            writer
                .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .map_err(backend)
        };
        let current = meta("current_rev")?;
        let compacted = meta("compact_rev")?;
        // Like etcd after a leader change, a restart gives every lease its full TTL again.
        let now = Instant::now();
        let mut leases = HashMap::new();
        {
            let mut stmt = writer
                .prepare("SELECT id, ttl_ms FROM leases")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                .map_err(backend)?;
            for row in rows {
                let (id, ttl_ms) = row.map_err(backend)?;
                let ttl = Duration::from_millis(ttl_ms as u64);
                leases.insert(
                    id,
                    Lease {
                        ttl,
                        expires: now + ttl,
                    },
                );
            }
        }
        let mut readers = Vec::new();
        for _ in 0..opts.readers.max(1) {
            let conn = Connection::open(&path).map_err(backend)?;
            conn.execute_batch("PRAGMA busy_timeout=10000; PRAGMA query_only=ON;")
                .map_err(backend)?;
            readers.push(Mutex::new(conn));
        }
        let (events, _) = broadcast::channel(opts.watch_buffer.max(16));
        Ok(Inner {
            path,
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
            events,
            leases: Mutex::new(leases),
            current: AtomicI64::new(current),
            compacted: AtomicI64::new(compacted),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

impl Inner {
    fn reader(&self) -> MutexGuard<'_, Connection> {
        let n = self.readers.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(guard) = self.readers[(start + i) % n].try_lock() {
                return guard;
            }
        }
        lock(&self.readers[start])
    }

    fn lease_alive(&self, id: LeaseId) -> bool {
        lock(&self.leases)
            .get(&id)
            .is_some_and(|l| l.expires > Instant::now())
    }

    /// Runs a write transaction and publishes its events while still holding the writer, so that
    /// watchers receive batches in revision order.
    fn write(&self, txn: &Txn) -> Result<TxnResponse, StoreError> {
        let mut conn = lock(&self.writer);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let current: Revision = tx
            .query_row(
                "SELECT value FROM meta WHERE name = 'current_rev'",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        let mut succeeded = true;
        for Compare { key, mod_revision } in &txn.compares {
            let actual = get_kv(&tx, key)?.map_or(0, |kv| kv.mod_revision);
            if actual != *mod_revision {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let rev = current + 1;
        let mut results = Vec::with_capacity(ops.len());
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Get { key } => results.push(OpResult::Get {
                    kv: get_kv(&tx, key)?,
                }),
                Op::Put { key, value, lease } => {
                    if *lease != 0 && !self.lease_alive(*lease) {
                        return Err(StoreError::LeaseNotFound(*lease));
                    }
                    let prev = get_kv(&tx, key)?;
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: *lease,
                    };
                    tx.execute(
                        "INSERT OR REPLACE INTO kv (key, value, create_rev, mod_rev, version, lease) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease],
                    )
                    .map_err(backend)?;
                    insert_log(&tx, events.len() as i64, &kv, false, prev.as_ref())?;
                    results.push(OpResult::Put { prev: prev.clone() });
                    events.push(WatchEvent {
                        kind: EventKind::Put,
                        kv,
                        prev_kv: prev,
                    });
                }
                Op::Delete { key } => {
                    let prev = get_kv(&tx, key)?;
                    if let Some(p) = &prev {
                        tx.execute("DELETE FROM kv WHERE key = ?1", [key])
                            .map_err(backend)?;
                        let kv = tombstone(key, rev);
                        insert_log(&tx, events.len() as i64, &kv, true, Some(p))?;
                        events.push(WatchEvent {
                            kind: EventKind::Delete,
                            kv,
                            prev_kv: prev.clone(),
                        });
                    }
                    results.push(OpResult::Delete { prev });
                }
            }
        }
        let revision = if events.is_empty() {
            current
        } else {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE name = 'current_rev'",
                [rev],
            )
            .map_err(backend)?;
            rev
        };
        tx.commit().map_err(backend)?;
        if !events.is_empty() {
            self.current.store(rev, Ordering::SeqCst);
            let _ = self.events.send(Arc::new(events));
        }
        Ok(TxnResponse {
            succeeded,
            revision,
            results,
        })
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse, StoreError> {
        let mut conn = self.reader();
        let tx = conn.transaction().map_err(backend)?;
        let meta = |name: &str| -> Result<i64, StoreError> {
            tx.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .map_err(backend)
        };
        let current = meta("current_rev")?;
        let compacted = meta("compact_rev")?;
        let at = req.revision;
        if at > current {
            return Err(StoreError::FutureRevision {
                requested: at,
                current,
            });
        }
        if at != 0 && at < compacted {
            return Err(StoreError::Compacted {
                requested: at,
                compacted,
            });
        }
        let limit = if req.limit == 0 {
            -1
        } else {
            req.limit as i64 + 1
        };
        let end = req
            .end
            .clone()
            .unwrap_or_else(|| format!("{}\0", req.start));
        let mut kvs = if at == 0 || at == current {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT key, value, create_rev, mod_rev, version, lease FROM kv
                     WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![req.start, end, limit], row_to_kv)
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
        } else {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT key, value, create_rev, rev, version, lease FROM log AS l
                     WHERE key >= ?1 AND key < ?2 AND deleted = 0
                       AND rev = (SELECT MAX(rev) FROM log AS l2 WHERE l2.key = l.key AND l2.rev <= ?3)
                     ORDER BY key LIMIT ?4",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![req.start, end, at, limit], row_to_kv)
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
        };
        let more = req.limit != 0 && kvs.len() > req.limit;
        kvs.truncate(if req.limit == 0 { kvs.len() } else { req.limit });
        Ok(RangeResponse {
            kvs,
            more,
            revision: if at == 0 { current } else { at },
        })
    }

    /// Reads logged changes with `from <= rev <= to` under `prefix`, at most `limit`.
    fn read_log(
        &self,
        prefix: &str,
        from: Revision,
        to: Revision,
        limit: usize,
    ) -> Result<Vec<WatchEvent>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn
            .prepare_cached(
                "SELECT key, deleted, value, create_rev, rev, version, lease,
                        prev_value, prev_create_rev, prev_mod_rev, prev_version, prev_lease
                 FROM log WHERE rev >= ?1 AND rev <= ?2 AND key >= ?3 AND key < ?4
                 ORDER BY rev, sub LIMIT ?5",
            )
            .map_err(backend)?;
        let end = crate::prefix_end(prefix);
        let rows = stmt
            .query_map(params![from, to, prefix, end, limit as i64], |r| {
                let key: String = r.get(0)?;
                let deleted: bool = r.get(1)?;
                let kv = KeyValue {
                    key: key.clone(),
                    value: r.get(2)?,
                    create_revision: r.get(3)?,
                    mod_revision: r.get(4)?,
                    version: r.get(5)?,
                    lease: r.get(6)?,
                };
                let prev_value: Option<Vec<u8>> = r.get(7)?;
                let prev_kv = match prev_value {
                    Some(value) => Some(KeyValue {
                        key,
                        value,
                        create_revision: r.get(8)?,
                        mod_revision: r.get(9)?,
                        version: r.get(10)?,
                        lease: r.get(11)?,
                    }),
                    None => None,
                };
                Ok(WatchEvent {
                    kind: if deleted {
                        EventKind::Delete
                    } else {
                        EventKind::Put
                    },
                    kv,
                    prev_kv,
                })
            })
            .map_err(backend)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend)
    }

    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut conn = lock(&self.writer);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let current: Revision = tx
            .query_row(
                "SELECT value FROM meta WHERE name = 'current_rev'",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        let compacted: Revision = tx
            .query_row(
                "SELECT value FROM meta WHERE name = 'compact_rev'",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        if revision <= compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted,
            });
        }
        // Keep, for every key, its latest change at or below `revision` unless that is a deletion.
        tx.execute(
            "DELETE FROM log WHERE rev <= ?1 AND (deleted = 1 OR
                 rev < (SELECT MAX(l2.rev) FROM log AS l2 WHERE l2.key = log.key AND l2.rev <= ?1))",
            [revision],
        )
        .map_err(backend)?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE name = 'compact_rev'",
            [revision],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        self.compacted.store(revision, Ordering::SeqCst);
        Ok(())
    }

    fn revoke(&self, id: LeaseId) -> Result<bool, StoreError> {
        // Forget the lease first: a write checks liveness under the writer lock, so once it is gone
        // no key can attach to it and the query below sees every attached key.
        let existed = lock(&self.leases).remove(&id).is_some();
        let keys: Vec<String> = {
            let conn = lock(&self.writer);
            let mut stmt = conn
                .prepare_cached("SELECT key FROM kv WHERE lease = ?1")
                .map_err(backend)?;
            let rows = stmt.query_map([id], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)?
        };
        let mut txn = Txn::new();
        for key in keys {
            txn.success.push(Op::delete(key));
        }
        self.write(&txn)?;
        lock(&self.writer)
            .execute("DELETE FROM leases WHERE id = ?1", [id])
            .map_err(backend)?;
        Ok(existed)
    }
}

fn tombstone(key: &str, rev: Revision) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Vec::new(),
        create_revision: 0,
        mod_revision: rev,
        version: 0,
        lease: 0,
    }
}

fn row_to_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: r.get(0)?,
        value: r.get(1)?,
        create_revision: r.get(2)?,
        mod_revision: r.get(3)?,
        version: r.get(4)?,
        lease: r.get(5)?,
    })
}

fn get_kv(conn: &Connection, key: &str) -> Result<Option<KeyValue>, StoreError> {
    conn.prepare_cached(
        "SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE key = ?1",
    )
    .map_err(backend)?
    .query_row([key], row_to_kv)
    .optional()
    .map_err(backend)
}

fn insert_log(
    conn: &Connection,
    sub: i64,
    kv: &KeyValue,
    deleted: bool,
    prev: Option<&KeyValue>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO log (rev, sub, key, deleted, value, create_rev, version, lease,
                          prev_value, prev_create_rev, prev_mod_rev, prev_version, prev_lease)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )
    .map_err(backend)?
    .execute(params![
        kv.mod_revision,
        sub,
        kv.key,
        deleted,
        kv.value,
        kv.create_revision,
        kv.version,
        kv.lease,
        prev.map(|p| &p.value),
        prev.map(|p| p.create_revision),
        prev.map(|p| p.mod_revision),
        prev.map(|p| p.version),
        prev.map(|p| p.lease),
    ])
    .map_err(backend)?;
    Ok(())
}

async fn expire_leases(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> = lock(&inner.leases)
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let inner = inner.clone();
            let result = tokio::task::spawn_blocking(move || inner.revoke(id)).await;
            if let Ok(Err(e)) = result {
                tracing::warn!(lease = id, error = %e, "could not expire lease");
            }
        }
    }
}

/// Feeds one watcher: history from the log first, then live batches, back to the log on lag.
async fn run_watch(
    inner: Arc<Inner>,
    prefix: String,
    mut next: Revision,
    mut live: broadcast::Receiver<Arc<Vec<WatchEvent>>>,
    out: mpsc::Sender<Result<WatchEvent, StoreError>>,
) {
    const CHUNK: usize = 1000;
    // Catch up from the log until `next` passes the current revision.
    async fn catch_up(
        inner: &Arc<Inner>,
        prefix: &str,
        next: &mut Revision,
        out: &mpsc::Sender<Result<WatchEvent, StoreError>>,
    ) -> bool {
        loop {
            let current = inner.current.load(Ordering::SeqCst);
            if *next > current {
                return true;
            }
            let compacted = inner.compacted.load(Ordering::SeqCst);
            if *next <= compacted {
                let _ = out
                    .send(Err(StoreError::Compacted {
                        requested: *next,
                        compacted,
                    }))
                    .await;
                return false;
            }
            let (i, p, from) = (inner.clone(), prefix.to_string(), *next);
            let batch =
                match tokio::task::spawn_blocking(move || i.read_log(&p, from, current, CHUNK))
                    .await
                {
                    Ok(Ok(batch)) => batch,
                    Ok(Err(e)) => {
                        let _ = out.send(Err(e)).await;
                        return false;
                    }
                    Err(e) => {
                        let _ = out.send(Err(StoreError::Backend(e.to_string()))).await;
                        return false;
                    }
                };
            // A chunk may end in the middle of a revision; resume at the last one complete.
            let full = batch.len() == CHUNK;
            let last_rev = batch.last().map(|e| e.kv.mod_revision);
            let cutoff = match (full, last_rev) {
                (true, Some(r)) if r > from => r,
                _ => Revision::MAX,
            };
            for ev in batch.into_iter().filter(|e| e.kv.mod_revision < cutoff) {
                if out.send(Ok(ev)).await.is_err() {
                    return false;
                }
            }
            *next = if cutoff == Revision::MAX {
                current + 1
            } else {
                cutoff
            };
        }
    }

    if !catch_up(&inner, &prefix, &mut next, &out).await {
        return;
    }
    loop {
        let received = tokio::select! {
            _ = out.closed() => return,
            r = live.recv() => r,
        };
        match received {
            Ok(batch) => {
                let Some(rev) = batch.first().map(|e| e.kv.mod_revision) else {
                    continue;
                };
                if rev < next {
                    continue;
                }
                for ev in batch.iter().filter(|e| e.kv.key.starts_with(&prefix)) {
                    if out.send(Ok(ev.clone())).await.is_err() {
                        return;
                    }
                }
                next = rev + 1;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                if !catch_up(&inner, &prefix, &mut next, &out).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        self.blocking(move |inner| inner.range(&req)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        validate_txn(&txn)?;
        self.blocking(move |inner| inner.write(&txn)).await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        // Subscribe before reading the current revision: every later batch reaches us.
        let live = self.inner.events.subscribe();
        let current = self.inner.current.load(Ordering::SeqCst);
        let start = if start_revision == 0 {
            current + 1
        } else {
            start_revision
        };
        let compacted = self.inner.compacted.load(Ordering::SeqCst);
        if start <= compacted {
            return Err(StoreError::Compacted {
                requested: start,
                compacted,
            });
        }
        let (tx, mut rx) = mpsc::channel(256);
        tokio::spawn(run_watch(
            self.inner.clone(),
            prefix.to_string(),
            start,
            live,
            tx,
        ));
        Ok(Box::pin(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidRequest(
                "a lease needs a TTL above zero".into(),
            ));
        }
        self.blocking(move |inner| {
            let mut conn = lock(&inner.writer);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let id: i64 = tx
                .query_row(
                    "SELECT value FROM meta WHERE name = 'next_lease'",
                    [],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            tx.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'next_lease'",
                [],
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO leases (id, ttl_ms) VALUES (?1, ?2)",
                params![id, ttl.as_millis() as i64],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            lock(&inner.leases).insert(
                id,
                Lease {
                    ttl,
                    expires: Instant::now() + ttl,
                },
            );
            Ok(id)
        })
        .await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut leases = lock(&self.inner.leases);
        match leases.get_mut(&id) {
            Some(lease) if lease.expires > Instant::now() => {
                lease.expires = Instant::now() + lease.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(id)),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        if self.blocking(move |inner| inner.revoke(id)).await? {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(id))
        }
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.compact(revision)).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.current.load(Ordering::SeqCst))
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.compacted.load(Ordering::SeqCst))
    }
}
