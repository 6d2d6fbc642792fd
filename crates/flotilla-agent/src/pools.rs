//! The storage pools this node serves: every StoragePool whose `nodeSelector` matches this
//! node's labels is opened here (a `dir` pool's directory made if missing and checked for
//! QEMU's reach; an `rbd` pool's cluster asked, and its key given to libvirtd as a secret)
//! and its space reported in this node's entry of `status.nodes`; a pool that
//! stops matching loses this node's entry. On every change of a pool or of this node's labels,
//! and every `every` (space changes without anyone saying so).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_storage::{
    keyring_key, DirPool, IscsiConfig, IscsiPool, NfsConfig, NfsPool, RbdConfig, RbdPool,
};
use flotilla_types::kinds::{PoolNodeStatus, PoolType, StoragePool};
use flotilla_types::registry::lookup;
use serde_json::json;

use crate::follow::{follow, Mirror};
use crate::vm::Context;

/// Where pool `pool` lives on this node.
pub fn pool_dir(data_dir: &std::path::Path, pool: &StoragePool) -> PathBuf {
    match &pool.spec.path {
        Some(path) => PathBuf::from(path),
        None => data_dir.join("pools").join(&pool.metadata.name),
    }
}

/// This node's entry for an `lvm` pool: its volume group's size and free space, or why it
/// cannot be used (no device-mapper in the kernel, no lvm2, no such group).
async fn inspect_lvm(vg: &str) -> PoolNodeStatus {
    let failed = |message: String| PoolNodeStatus {
        phase: "Failed".into(),
        path: vg.to_string(),
        message,
        ..Default::default()
    };
    if !std::path::Path::new("/dev/mapper/control").exists() {
        return failed(
            "this node's kernel has no device-mapper (/dev/mapper/control is missing): LVM volumes cannot be made here".into(),
        );
    }
    let out = tokio::process::Command::new("vgs")
        .args([
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_size,vg_free",
            "--",
        ])
        .arg(vg)
        .output()
        .await;
    let out = match out {
        Ok(out) => out,
        Err(e) => return failed(format!("cannot run vgs (is lvm2 installed?): {e}")),
    };
    if !out.status.success() {
        return failed(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match numbers.as_slice() {
        [size, free] => PoolNodeStatus {
            phase: "Ready".into(),
            path: vg.to_string(),
            capacity: *size,
            allocation: size.saturating_sub(*free),
            available: *free,
            volumes: 0,
            message: String::new(),
        },
        _ => failed(format!("vgs answered {:?}", text.trim())),
    }
}

/// The RBD pool of StoragePool `pool` as this node reaches it (its keyring file checked).
pub fn rbd_pool(pool: &StoragePool) -> Result<RbdPool, String> {
    let spec = pool
        .spec
        .rbd
        .as_ref()
        .ok_or_else(|| format!("StoragePool {:?} has no spec.rbd", pool.metadata.name))?;
    RbdPool::new(RbdConfig {
        monitors: spec.monitors.clone(),
        pool: spec.pool.clone(),
        user: spec.user.clone(),
        keyring: spec.keyring_path().into(),
    })
    .map_err(|e| e.to_string())
}

/// The libvirt secret holding the pool's Ceph key on this node: named by the pool's uid, its
/// value (re)set from the node's keyring file, so a key rotated in the file is taken up.
pub async fn rbd_secret(
    ctx: &Context,
    pool: &StoragePool,
    rbd: &RbdPool,
) -> Result<String, String> {
    let uuid = pool.metadata.uid.clone().unwrap_or_default();
    let config = rbd.config().clone();
    let key = tokio::task::spawn_blocking(move || keyring_key(&config.keyring, &config.user))
        .await
        .expect("reading a keyring does not panic")
        .map_err(|e| e.to_string())?;
    let usage = format!("{}{uuid}", secret_prefix(ctx));
    ctx.libvirt
        .ceph_secret(&uuid, &usage, &key)
        .await
        .map_err(|e| format!("cannot give libvirtd the pool's key: {e}"))?;
    Ok(uuid)
}

/// The start of the usage of this cluster's Ceph secrets in libvirtd (another cluster's agent
/// may share the libvirtd).
fn secret_prefix(ctx: &Context) -> String {
    format!("flotilla-{}-storagepool-", ctx.cluster_id)
}

/// Whether this node's QEMU has block driver `driver` (rbd and iscsi come with
/// `qemu-block-extra` on Debian).
/// QEMU's drivers are asked once per agent life (`qemu-img --help`) while every driver a pool
/// needs is there; a missing one is asked again, so installing it needs no restart.
async fn qemu_has_driver(driver: &str) -> bool {
    static FORMATS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let has = |formats: &[String]| formats.iter().any(|f| f == driver);
    if FORMATS.get().is_some_and(|f| has(f)) {
        return true;
    }
    let Ok(out) = tokio::process::Command::new("qemu-img")
        .arg("--help")
        .output()
        .await
    else {
        return false;
    };
    let formats: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("Supported formats:"))
        .flat_map(|l| l.split_whitespace().map(str::to_string))
        .collect();
    let found = has(&formats);
    if found && FORMATS.get().is_none_or(|f| !has(f)) {
        let _ = FORMATS.set(formats);
    }
    found
}

/// This node's entry for an `rbd` pool: the Ceph pool's space, or why this node cannot use it
/// (no tools, no keyring, the cluster unreachable, QEMU without RBD).
async fn inspect_rbd(ctx: &Context, pool: &StoragePool) -> PoolNodeStatus {
    let name = pool
        .spec
        .rbd
        .as_ref()
        .map(|r| r.pool.clone())
        .unwrap_or_default();
    let failed = |message: String| PoolNodeStatus {
        phase: "Failed".into(),
        path: format!("rbd:{name}"),
        message,
        ..Default::default()
    };
    let rbd = match rbd_pool(pool) {
        Ok(rbd) => rbd,
        Err(e) => return failed(e),
    };
    if !qemu_has_driver("rbd").await {
        return failed(
            "this node's QEMU cannot open RBD images (install its rbd block driver: qemu-block-extra on Debian)".into(),
        );
    }
    let space = match rbd.capacity().await {
        Ok(space) => space,
        Err(flotilla_storage::StorageError::Tool { program, source }) => {
            return failed(format!(
                "cannot run {program} ({source}): install the Ceph client tools (ceph-common)"
            ))
        }
        Err(e) => return failed(e.to_string()),
    };
    if let Err(e) = rbd_secret(ctx, pool, &rbd).await {
        return failed(e);
    }
    match rbd.list().await {
        Ok(images) => PoolNodeStatus {
            phase: "Ready".into(),
            path: format!("rbd:{name}"),
            capacity: space.capacity,
            allocation: space.allocation,
            available: space.available,
            volumes: images.len() as u32,
            message: String::new(),
        },
        Err(e) => failed(e.to_string()),
    }
}

/// The iSCSI target of StoragePool `pool`.
pub fn iscsi_pool(pool: &StoragePool) -> Result<IscsiPool, String> {
    let spec = pool
        .spec
        .iscsi
        .as_ref()
        .ok_or_else(|| format!("StoragePool {:?} has no spec.iscsi", pool.metadata.name))?;
    IscsiPool::new(IscsiConfig {
        portal: spec.portal.clone(),
        target: spec.target.clone(),
        initiator: spec.initiator.clone(),
    })
    .map_err(|e| e.to_string())
}

/// This node's entry for an `iscsi` pool: the target's LUNs (their number and total size), or
/// why this node cannot reach it (no tools, QEMU without iSCSI, no such target).
async fn inspect_iscsi(pool: &StoragePool) -> PoolNodeStatus {
    let target = pool
        .spec
        .iscsi
        .as_ref()
        .map(|i| i.target.clone())
        .unwrap_or_default();
    let failed = |message: String| PoolNodeStatus {
        phase: "Failed".into(),
        path: target.clone(),
        message,
        ..Default::default()
    };
    let iscsi = match iscsi_pool(pool) {
        Ok(iscsi) => iscsi,
        Err(e) => return failed(e),
    };
    if !qemu_has_driver("iscsi").await {
        return failed(
            "this node's QEMU cannot open iSCSI LUNs (install its iscsi block driver: qemu-block-extra on Debian)".into(),
        );
    }
    match iscsi.luns().await {
        Ok(luns) => {
            let total = luns.iter().map(|l| l.size).sum();
            PoolNodeStatus {
                phase: "Ready".into(),
                path: format!("iscsi://{}/{}", iscsi.portal(), target),
                capacity: total,
                allocation: 0,
                available: total,
                volumes: luns.len() as u32,
                message: String::new(),
            }
        }
        Err(flotilla_storage::StorageError::Tool { program, source }) => failed(format!(
            "cannot run {program} ({source}): install the iSCSI tools (libiscsi-bin)"
        )),
        Err(e) => failed(e.to_string()),
    }
}

/// The NFS export of StoragePool `pool`.
pub fn nfs_pool(pool: &StoragePool) -> Result<NfsPool, String> {
    let spec = pool
        .spec
        .nfs
        .as_ref()
        .ok_or_else(|| format!("StoragePool {:?} has no spec.nfs", pool.metadata.name))?;
    NfsPool::new(NfsConfig {
        server: spec.server.clone(),
        export: spec.export.clone(),
        uid: spec.uid.unwrap_or(QEMU_ID),
        gid: spec.gid.unwrap_or(QEMU_ID),
    })
    .map_err(|e| e.to_string())
}

/// Debian's libvirt-qemu user and group: whom QEMU runs as, so whom NFS volume files belong to
/// unless the pool says otherwise.
pub const QEMU_ID: u32 = 64055;

/// This node's entry for an `nfs` pool: the export's space and files, or why this node cannot
/// reach it (QEMU without NFS, the server not answering within seconds, the export refused).
async fn inspect_nfs(pool: &StoragePool) -> PoolNodeStatus {
    let name = pool
        .spec
        .nfs
        .as_ref()
        .map(|n| format!("nfs://{}{}", n.server, n.export))
        .unwrap_or_default();
    let failed = |message: String| PoolNodeStatus {
        phase: "Failed".into(),
        path: name.clone(),
        message,
        ..Default::default()
    };
    let nfs = match nfs_pool(pool) {
        Ok(nfs) => nfs,
        Err(e) => return failed(e),
    };
    if !qemu_has_driver("nfs").await {
        return failed(
            "this node's QEMU cannot open NFS files (install its nfs block driver: qemu-block-extra on Debian)".into(),
        );
    }
    match (nfs.capacity().await, nfs.list().await) {
        (Ok(space), Ok(files)) => PoolNodeStatus {
            phase: "Ready".into(),
            path: name.clone(),
            capacity: space.capacity,
            allocation: space.allocation,
            available: space.available,
            volumes: files
                .iter()
                .filter(|f| f.ends_with(".qcow2") || f.ends_with(".raw"))
                .count() as u32,
            message: String::new(),
        },
        (Err(e), _) | (_, Err(e)) => failed(e.to_string()),
    }
}

/// This node's entry for `pool`: opened, with its space, or why it cannot be used.
pub async fn inspect(ctx: &Context, pool: &StoragePool) -> PoolNodeStatus {
    match pool.spec.pool_type {
        PoolType::Lvm => {
            return inspect_lvm(pool.spec.volume_group.as_deref().unwrap_or_default()).await
        }
        PoolType::Rbd => return inspect_rbd(ctx, pool).await,
        PoolType::Iscsi => return inspect_iscsi(pool).await,
        PoolType::Nfs => return inspect_nfs(pool).await,
        PoolType::Dir => {}
    }
    let dir = pool_dir(&ctx.data_dir, pool);
    let failed = |message: String| PoolNodeStatus {
        phase: "Failed".into(),
        path: dir.display().to_string(),
        message,
        ..Default::default()
    };
    let opened = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || DirPool::open(&dir))
            .await
            .expect("opening a pool does not panic")
    };
    let pool = match opened {
        Ok(pool) => pool,
        Err(e) => return failed(e.to_string()),
    };
    match (pool.capacity().await, pool.list().await) {
        (Ok(space), Ok(volumes)) => PoolNodeStatus {
            phase: "Ready".into(),
            path: dir.display().to_string(),
            capacity: space.capacity,
            allocation: space.allocation,
            available: space.available,
            volumes: volumes.len() as u32,
            message: String::new(),
        },
        (Err(e), _) | (_, Err(e)) => failed(e.to_string()),
    }
}

/// Whether `a` and `b` say the same: space within 1% or 16 MiB counts as the same (free space
/// moves all the time, and every write of the entry wakes every follower of the pool).
fn same(a: &PoolNodeStatus, b: &PoolNodeStatus) -> bool {
    let close = |x: u64, y: u64| x.abs_diff(y) <= (x.max(y) / 100).max(16 << 20);
    a.phase == b.phase
        && a.path == b.path
        && a.message == b.message
        && a.volumes == b.volumes
        && close(a.capacity, b.capacity)
        && close(a.allocation, b.allocation)
        && close(a.available, b.available)
}

/// Whether a node with `labels` serves a pool with `selector`.
fn serves(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// How soon a network pool this node could not use is asked again the first time (a target
/// still starting, a portal briefly refusing): seconds, not the next resync. Each further
/// failure doubles it, up to the resync.
const RETRY_FAILED: Duration = Duration::from_secs(2);

/// How long one pool's inspection may take: a cluster or portal that does not answer is
/// reported as such instead of holding up the pools that follow.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(20);

/// [`inspect`], or a Failed entry saying the pool did not answer in time.
async fn inspect_in_time(ctx: &Context, pool: &StoragePool) -> PoolNodeStatus {
    match tokio::time::timeout(INSPECT_TIMEOUT, inspect(ctx, pool)).await {
        Ok(entry) => entry,
        Err(_) => PoolNodeStatus {
            phase: "Failed".into(),
            message: format!(
                "the pool did not answer within {} s",
                INSPECT_TIMEOUT.as_secs()
            ),
            ..Default::default()
        },
    }
}

/// What this node last found of a network pool (asked at most every resync: other pools'
/// events do not wait on its cluster).
struct Asked {
    at: std::time::Instant,
    entry: PoolNodeStatus,
    /// Failed answers in a row.
    failures: u32,
}

impl Asked {
    /// When to ask again: a Ready pool at the next resync (a tenth early, so the resync's own
    /// tick asks), a failed one after [`RETRY_FAILED`], doubled per failure.
    fn due(&self, every: Duration) -> std::time::Instant {
        let wait = if self.failures == 0 {
            every - every / 10
        } else {
            (RETRY_FAILED * 2u32.pow(self.failures.min(8) - 1)).min(every)
        };
        self.at + wait
    }
}

/// Follows the StoragePools and this node's labels until the task is aborted.
pub async fn run(ctx: Arc<Context>, every: Duration) {
    let kind = lookup("storagepool").expect("registered");
    let node_kind = lookup("node").expect("registered");
    let mut seen = follow(ctx.client.clone(), kind);
    let mut pools = Mirror::<StoragePool>::new(|p: &StoragePool| Some(p.metadata.name.clone()));
    let mut tick = tokio::time::interval(every);
    let mut secrets_kept: Option<Vec<String>> = None;
    let mut asked: std::collections::HashMap<_, Asked> = Default::default();
    // When a network pool this node could not use is to be asked again.
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        let retry_due = async {
            match retry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = seen.recv() => {
                let Some(got) = got else { return };
                pools.apply(got);
            }
            _ = tick.tick() => {}
            _ = retry_due => retry = None,
        }
        if !pools.listed {
            continue;
        }
        let labels: BTreeMap<String, String> =
            match ctx.client.get(node_kind, None, &ctx.node).await {
                Ok(node) => {
                    serde_json::from_value(node["metadata"]["labels"].clone()).unwrap_or_default()
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read this node's labels; pools wait");
                    continue;
                }
            };
        // libvirtd's secrets are listed when the set of rbd pools changed (and at the first
        // pass, for what an earlier life left), not on every pool event.
        let rbd_pools: Vec<String> = pools
            .items
            .values()
            .filter(|p| p.spec.pool_type == PoolType::Rbd)
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        if secrets_kept.as_ref() != Some(&rbd_pools) {
            match ctx
                .libvirt
                .remove_ceph_secrets(&secret_prefix(&ctx), rbd_pools.clone())
                .await
            {
                Ok(removed) => {
                    if !removed.is_empty() {
                        tracing::info!(?removed, "removed the Ceph secrets of deleted pools");
                    }
                    secrets_kept = Some(rbd_pools);
                }
                Err(e) => tracing::warn!(error = %e, "cannot list libvirt's secrets"),
            }
        }
        // All at once: a cluster that does not answer (seconds) holds up no other pool.
        let served = |pool: &StoragePool| {
            serves(&pool.spec.node_selector, &labels) && pool.metadata.deletion_timestamp.is_none()
        };
        let entries = futures::future::join_all(pools.items.values().map(|pool| async {
            if !served(pool) {
                return None;
            }
            // A network pool is asked again only when its spec changed or it is due.
            let key = (pool.metadata.uid.clone(), pool.metadata.generation);
            if let Some(last) = asked.get(&key) {
                if pool.spec.shared() && std::time::Instant::now() < last.due(every) {
                    return Some((last.entry.clone(), false));
                }
            }
            Some((inspect_in_time(&ctx, pool).await, true))
        }))
        .await;
        asked.retain(|(uid, generation), _| {
            pools
                .items
                .values()
                .any(|p| p.metadata.uid == *uid && p.metadata.generation == *generation)
        });
        for (pool, entry) in pools.items.values().zip(&entries) {
            if let Some((entry, true)) = entry.as_ref().filter(|_| pool.spec.shared()) {
                let key = (pool.metadata.uid.clone(), pool.metadata.generation);
                let failures = match (&*entry.phase, asked.get(&key)) {
                    ("Ready", _) => 0,
                    (_, Some(last)) => last.failures + 1,
                    (_, None) => 1,
                };
                let at = std::time::Instant::now();
                let entry = entry.clone();
                asked.insert(
                    key,
                    Asked {
                        at,
                        entry,
                        failures,
                    },
                );
            }
        }
        // (A due entry is of a pool this node no longer serves: it was asked otherwise.)
        let now = std::time::Instant::now();
        retry = asked
            .values()
            .filter(|a| a.failures > 0 && a.due(every) > now)
            .map(|a| tokio::time::Instant::from_std(a.due(every)))
            .min();
        let entries = entries.into_iter().map(|e| e.map(|(entry, _)| entry));
        for (pool, entry) in pools.items.values().zip(entries) {
            let current = pool.status.as_ref().and_then(|s| s.nodes.get(&ctx.node));
            let entry = if let Some(entry) = entry {
                if current.is_some_and(|c| same(c, &entry)) {
                    continue;
                }
                if entry.phase != "Ready" && current.is_none_or(|c| c.message != entry.message) {
                    tracing::warn!(pool = %pool.metadata.name, message = %entry.message, "a storage pool cannot be used here");
                }
                serde_json::to_value(&entry).expect("serialises")
            } else if current.is_some() {
                serde_json::Value::Null
            } else {
                continue;
            };
            let patch = json!({"status": {"nodes": {ctx.node.clone(): entry}}});
            if let Err(e) = ctx
                .client
                .patch(kind, None, &pool.metadata.name, &patch, true)
                .await
            {
                tracing::warn!(pool = %pool.metadata.name, error = %e, "cannot report the pool's state on this node");
            }
        }
    }
}
