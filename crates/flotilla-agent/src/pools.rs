//! The storage pools this node serves: every StoragePool whose `nodeSelector` matches this
//! node's labels is opened here (a `dir` pool's directory made if missing and checked for
//! QEMU's reach) and its space reported in this node's entry of `status.nodes`; a pool that
//! stops matching loses this node's entry. On every change of a pool or of this node's labels,
//! and every `every` (space changes without anyone saying so).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_storage::DirPool;
use flotilla_types::kinds::{PoolNodeStatus, StoragePool};
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

/// This node's entry for `pool`: opened, with its space, or why it cannot be used.
pub async fn inspect(data_dir: &std::path::Path, pool: &StoragePool) -> PoolNodeStatus {
    if pool.spec.pool_type == flotilla_types::kinds::PoolType::Lvm {
        return inspect_lvm(pool.spec.volume_group.as_deref().unwrap_or_default()).await;
    }
    let dir = pool_dir(data_dir, pool);
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

/// Follows the StoragePools and this node's labels until the task is aborted.
pub async fn run(ctx: Arc<Context>, every: Duration) {
    let kind = lookup("storagepool").expect("registered");
    let node_kind = lookup("node").expect("registered");
    let mut seen = follow(ctx.client.clone(), kind);
    let mut pools = Mirror::<StoragePool>::new(|p: &StoragePool| Some(p.metadata.name.clone()));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            got = seen.recv() => {
                let Some(got) = got else { return };
                pools.apply(got);
            }
            _ = tick.tick() => {}
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
        for pool in pools.items.values() {
            let current = pool.status.as_ref().and_then(|s| s.nodes.get(&ctx.node));
            let entry = if serves(&pool.spec.node_selector, &labels)
                && pool.metadata.deletion_timestamp.is_none()
            {
                let entry = inspect(&ctx.data_dir, pool).await;
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
