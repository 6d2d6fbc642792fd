//! The volumes placed on this node (`status.node`): each is made in its pool's directory
//! (named by its uid, so a name reused after a delete never meets an old file) once this agent
//! holds its finalizer, reported `Available` with its path and size, and removed from the pool
//! before the finalizer goes when the volume is deleted. Idempotent: a crash at any point
//! converges at the next pass (a volume whose file is there is not made again; one already gone
//! is removed without a word).

use std::sync::Arc;
use std::time::Duration;

use flotilla_client::ListParams;
use flotilla_storage::{DirPool, Format, NewVolume, Source};
use flotilla_types::kinds::{CloneMode, ImageFormat, StoragePool, Volume};
use flotilla_types::registry::lookup;
use serde_json::json;

use crate::follow::{follow_selected, Mirror};
use crate::vm::Context;

/// This agent's finalizer on the volumes it made.
pub const FINALIZER: &str = "flotilla.dev/volume";

/// Follows the volumes placed here until the task is aborted.
pub async fn run(ctx: Arc<Context>, every: Duration) {
    let kind = lookup("volume").expect("registered");
    let params = ListParams {
        field_selector: Some(format!("status.node={}", ctx.node)),
        ..Default::default()
    };
    let mut seen = follow_selected(ctx.client.clone(), kind, params);
    let mut volumes = Mirror::<Volume>::new(|v: &Volume| v.metadata.uid.clone());
    let mut swept = std::collections::BTreeSet::new();
    let mut tick = tokio::time::interval(every);
    loop {
        // An event re-reconciles only volumes with something to do; a tick looks at every
        // file too (one gone behind the agent's back is made again).
        let every_file = tokio::select! {
            got = seen.recv() => {
                let Some(got) = got else { return };
                volumes.apply(got);
                false
            }
            _ = tick.tick() => true,
        };
        if !volumes.listed {
            continue;
        }
        ctx.volumes.update(&volumes.items);
        for volume in volumes.items.values() {
            if volume.status.as_ref().and_then(|s| s.node.as_deref()) != Some(ctx.node.as_str()) {
                continue;
            }
            if !every_file && settled(volume) {
                continue;
            }
            if let Err(message) = reconcile(&ctx, volume, &mut swept).await {
                // Written once per new reason: each write wakes this loop again.
                let status = volume.status.clone().unwrap_or_default();
                if status.phase != "Failed" || status.message != message {
                    tracing::warn!(volume = %volume.metadata.name, %message, "cannot reconcile a volume; retrying");
                    report(&ctx, volume, json!({"phase": "Failed", "message": message})).await;
                }
            }
        }
    }
}

/// Whether `volume` is as its spec asks, as far as its object says: made, held, its size
/// reached, not being deleted.
fn settled(volume: &Volume) -> bool {
    let status = volume.status.clone().unwrap_or_default();
    volume.metadata.deletion_timestamp.is_none()
        && volume.metadata.finalizers.iter().any(|f| f == FINALIZER)
        && status.phase == "Available"
        && u128::from(status.capacity) >= volume.spec.size.value()
}

/// The pool directory of `volume` on this node; the first time in this agent's life, with what
/// a crash left in it removed (no create runs then: this task is the pool's only writer).
async fn open_pool(
    ctx: &Context,
    volume: &Volume,
    swept: &mut std::collections::BTreeSet<std::path::PathBuf>,
) -> Result<DirPool, String> {
    let pools = lookup("storagepool").expect("registered");
    let pool: StoragePool = ctx
        .client
        .get(pools, None, &volume.spec.pool)
        .await
        .map_err(|e| format!("StoragePool {:?}: {e}", volume.spec.pool))
        .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))?;
    let dir = crate::pools::pool_dir(&ctx.data_dir, &pool);
    let first = swept.insert(dir.clone());
    tokio::task::spawn_blocking(move || {
        let pool = DirPool::open(&dir)?;
        if first {
            for left in pool.sweep_temporaries()? {
                tracing::info!(file = %left.display(), "removed what an interrupted volume create left");
            }
        }
        Ok::<_, flotilla_storage::StorageError>(pool)
    })
    .await
    .expect("opening a pool does not panic")
    .map_err(|e| e.to_string())
}

async fn reconcile(
    ctx: &Context,
    volume: &Volume,
    swept: &mut std::collections::BTreeSet<std::path::PathBuf>,
) -> Result<(), String> {
    let uid = volume.metadata.uid.clone().unwrap_or_default();
    let held = volume.metadata.finalizers.iter().any(|f| f == FINALIZER);
    if volume.metadata.deletion_timestamp.is_some() {
        if !held {
            return Ok(());
        }
        let pool = open_pool(ctx, volume, swept).await?;
        pool.delete(&uid).await.map_err(|e| e.to_string())?;
        return edit_finalizers(ctx, volume, false).await;
    }
    let status = volume.status.clone().unwrap_or_default();
    if !held {
        // Held before the file exists, so a delete always waits for the file to go.
        return edit_finalizers(ctx, volume, true).await;
    }
    let pool = open_pool(ctx, volume, swept).await?;
    let info = match pool.info(&uid).await {
        Ok(info) => info,
        Err(flotilla_storage::StorageError::NotFound(_)) => {
            let source = match &volume.spec.source {
                None => Source::Blank,
                Some(from) => match source_file(ctx, volume, &from.volume, &pool).await? {
                    Some((path, format)) => Source::Clone {
                        from: path,
                        format,
                        linked: from.mode == CloneMode::Linked,
                    },
                    None => {
                        let message =
                            format!("waiting for its source {:?} to be made", from.volume);
                        if status.message != message {
                            report(ctx, volume, json!({"phase": "Pending", "message": message}))
                                .await;
                        }
                        return Ok(());
                    }
                },
            };
            // Copies wait their turn in the node's disk queue, with image downloads.
            let _queued = ctx.disks.queued().await;
            let started = std::time::Instant::now();
            let made = pool
                .create(&NewVolume {
                    name: uid.clone(),
                    format: match volume.spec.format {
                        ImageFormat::Qcow2 => Format::Qcow2,
                        ImageFormat::Raw => Format::Raw,
                    },
                    size: u64::try_from(volume.spec.size.value()).unwrap_or(u64::MAX),
                    source,
                })
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(volume = %volume.metadata.name, ms = started.elapsed().as_millis() as u64, "made a volume");
            made
        }
        Err(e) => return Err(e.to_string()),
    };
    let wanted = u64::try_from(volume.spec.size.value()).unwrap_or(u64::MAX);
    let info = if wanted > info.virtual_size {
        grow(ctx, volume, &pool, &info, wanted).await?
    } else {
        info
    };
    let path = info.path.display().to_string();
    if status.phase == "Available" && status.path == path && status.capacity == info.virtual_size {
        return Ok(());
    }
    report(
        ctx,
        volume,
        json!({"phase": "Available", "path": path, "capacity": info.virtual_size,
               "allocation": info.allocation, "message": ""}),
    )
    .await;
    Ok(())
}

/// Grows a volume to `wanted` bytes: through the running domains that have it open (QEMU
/// holds the file; each guest sees the new size at once), else the file itself.
async fn grow(
    ctx: &Context,
    volume: &Volume,
    pool: &DirPool,
    info: &flotilla_storage::VolumeInfo,
    wanted: u64,
) -> Result<flotilla_storage::VolumeInfo, String> {
    let uid = volume.metadata.uid.clone().unwrap_or_default();
    let users = ctx
        .libvirt
        .disk_users(&info.path.display().to_string())
        .await
        .map_err(|e| e.to_string())?;
    let grown = if users.is_empty() {
        pool.resize(&uid, wanted).await.map_err(|e| e.to_string())?
    } else {
        for (domain, target) in &users {
            ctx.libvirt
                .block_resize(domain, target, wanted)
                .await
                .map_err(|e| format!("cannot grow it in the running domain {domain}: {e}"))?;
        }
        pool.info(&uid).await.map_err(|e| e.to_string())?
    };
    tracing::info!(volume = %volume.metadata.name, from = info.virtual_size, to = grown.virtual_size, online = !users.is_empty(), "grew a volume");
    Ok(grown)
}

/// The file and format of the volume `name` (of `volume`'s project) a clone copies, once it is
/// made here; None while it is not.
async fn source_file(
    ctx: &Context,
    volume: &Volume,
    name: &str,
    pool: &DirPool,
) -> Result<Option<(std::path::PathBuf, Format)>, String> {
    let kind = lookup("volume").expect("registered");
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    let from: Volume = match ctx.client.get(kind, Some(&project), name).await {
        Ok(v) => serde_json::from_value(v).map_err(|e| e.to_string())?,
        // Not here (yet), or gone: nothing to copy from.
        Err(e) if matches!(e.code(), Some(403) | Some(404)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if from.status.as_ref().map(|s| s.phase.as_str()) != Some("Available") {
        return Ok(None);
    }
    let uid = from.metadata.uid.unwrap_or_default();
    match pool.info(&uid).await {
        Ok(info) => Ok(Some((info.path, info.format))),
        Err(flotilla_storage::StorageError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

async fn report(ctx: &Context, volume: &Volume, status: serde_json::Value) {
    let kind = lookup("volume").expect("registered");
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    if let Err(e) = ctx
        .client
        .patch(
            kind,
            Some(&project),
            &volume.metadata.name,
            &json!({"status": status}),
            true,
        )
        .await
    {
        tracing::debug!(volume = %volume.metadata.name, error = %e, "cannot report the volume's state");
    }
}

/// Adds or removes this agent's finalizer, guarded by the resourceVersion it read.
async fn edit_finalizers(ctx: &Context, volume: &Volume, hold: bool) -> Result<(), String> {
    let kind = lookup("volume").expect("registered");
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    let mut finalizers = volume.metadata.finalizers.clone();
    finalizers.retain(|f| f != FINALIZER);
    if hold {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": volume.metadata.resource_version}});
    match ctx
        .client
        .patch(kind, Some(&project), &volume.metadata.name, &patch, false)
        .await
    {
        // A conflict or a volume gone: the next pass reads it afresh.
        Ok(_) => Ok(()),
        Err(e) if matches!(e.code(), Some(404) | Some(409)) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
