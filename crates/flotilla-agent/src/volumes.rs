//! The volumes (and their snapshots: [`crate::snapshots`]) placed on this node
//! (`status.node`): each is made in its pool's directory
//! (named by its uid, so a name reused after a delete never meets an old file) once this agent
//! holds its finalizer, reported `Available` with its path and size, and removed from the pool
//! before the finalizer goes when the volume is deleted. Idempotent: a crash at any point
//! converges at the next pass (a volume whose file is there is not made again; one already gone
//! is removed without a word).

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use flotilla_client::ListParams;
use flotilla_storage::{DirPool, Format, NewVolume, Source};
use flotilla_types::kinds::{
    CloneMode, ImageFormat, PoolType, StoragePool, Volume, VolumeSnapshot,
};
use flotilla_types::registry::lookup;
use serde_json::json;

use crate::follow::{follow_selected, Mirror};
use crate::vm::Context;

/// This agent's finalizer on the volumes it made.
pub const FINALIZER: &str = "flotilla.dev/volume";

/// Follows the volumes and snapshots placed here until the task is aborted. One task does all
/// of this node's volume work, one step at a time: no two steps ever touch one file at once.
pub async fn run(ctx: Arc<Context>, every: Duration) {
    let params = ListParams {
        field_selector: Some(format!("status.node={}", ctx.node)),
        ..Default::default()
    };
    let (volume_kind, snapshot_kind) = (
        lookup("volume").expect("registered"),
        lookup("volumesnapshot").expect("registered"),
    );
    let mut seen = follow_selected(ctx.client.clone(), volume_kind, params.clone());
    let mut seen_snapshots = follow_selected(ctx.client.clone(), snapshot_kind, params);
    let mut volumes = Mirror::<Volume>::new(|v: &Volume| v.metadata.uid.clone());
    let mut snapshots = Mirror::<VolumeSnapshot>::new(|s: &VolumeSnapshot| s.metadata.uid.clone());
    let mut swept = std::collections::BTreeSet::new();
    let mut tick = tokio::time::interval(every);
    loop {
        // An event re-reconciles only volumes with something to do; a tick looks at every
        // file too (one gone behind the agent's back is made again, strays are swept).
        let every_file = tokio::select! {
            got = seen.recv() => {
                let Some(got) = got else { return };
                volumes.apply(got);
                false
            }
            got = seen_snapshots.recv() => {
                let Some(got) = got else { return };
                snapshots.apply(got);
                false
            }
            _ = tick.tick() => true,
        };
        if !volumes.listed || !snapshots.listed {
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
            // Every step works from the object as it is now: the mirror may lag behind what
            // the last step wrote, and a step taken twice on an old view could drop a file.
            let Some(volume) = fresh::<Volume>(&ctx, volume_kind, &volume.metadata).await else {
                continue;
            };
            let volume = &volume;
            let span = crate::agent::request_span(&volume.metadata);
            let result = reconcile(&ctx, volume, &snapshots.items, &mut swept, every_file)
                .instrument(span)
                .await;
            if let Err(message) = result {
                // Written once per new reason: each write wakes this loop again.
                let status = volume.status.clone().unwrap_or_default();
                if status.message != message {
                    tracing::warn!(volume = %volume.metadata.name, %message, "cannot reconcile a volume; retrying");
                    // A volume that exists stays Available (its guest may be using it).
                    let phase = if status.phase == "Available" {
                        "Available"
                    } else {
                        "Failed"
                    };
                    report(&ctx, volume, json!({"phase": phase, "message": message})).await;
                }
            }
        }
        for snapshot in snapshots.items.values() {
            if snapshot.status.as_ref().and_then(|s| s.node.as_deref()) != Some(ctx.node.as_str()) {
                continue;
            }
            if !every_file && snapshot_settled(snapshot) {
                continue;
            }
            let Some(snapshot) =
                fresh::<VolumeSnapshot>(&ctx, snapshot_kind, &snapshot.metadata).await
            else {
                continue;
            };
            let snapshot = &snapshot;
            let volume = match volumes.items.values().find(|v| {
                v.metadata.namespace == snapshot.metadata.namespace
                    && v.metadata.name == snapshot.spec.volume
            }) {
                Some(v) => fresh::<Volume>(&ctx, volume_kind, &v.metadata).await,
                None => None,
            };
            if let Err(message) = reconcile_snapshot(&ctx, snapshot, volume.as_ref(), &mut swept)
                .instrument(crate::agent::request_span(&snapshot.metadata))
                .await
            {
                let status = snapshot.status.clone().unwrap_or_default();
                if status.message != message {
                    tracing::warn!(snapshot = %snapshot.metadata.name, %message, "cannot reconcile a snapshot; retrying");
                    let ns = snapshot.metadata.namespace.clone().unwrap_or_default();
                    let patch = json!({"status": {"message": message}});
                    let _ = ctx
                        .client
                        .patch(
                            snapshot_kind,
                            Some(&ns),
                            &snapshot.metadata.name,
                            &patch,
                            true,
                        )
                        .await;
                }
            }
        }
    }
}

/// The object as the API has it now (same uid), or None when it is gone or unreadable.
async fn fresh<T: serde::de::DeserializeOwned>(
    ctx: &Context,
    kind: &'static flotilla_types::KindInfo,
    meta: &flotilla_types::ObjectMeta,
) -> Option<T> {
    let now = ctx
        .client
        .get(kind, meta.namespace.as_deref(), &meta.name)
        .await
        .ok()?;
    if now["metadata"]["uid"].as_str() != meta.uid.as_deref() {
        return None;
    }
    serde_json::from_value(now).ok()
}

fn snapshot_settled(snapshot: &VolumeSnapshot) -> bool {
    snapshot.metadata.deletion_timestamp.is_none()
        && snapshot.metadata.finalizers.iter().any(|f| f == FINALIZER)
        && snapshot.status.as_ref().is_some_and(|s| s.phase == "Ready")
}

async fn reconcile_snapshot(
    ctx: &Context,
    snapshot: &VolumeSnapshot,
    volume: Option<&Volume>,
    swept: &mut std::collections::BTreeSet<std::path::PathBuf>,
) -> Result<(), String> {
    let held = snapshot.metadata.finalizers.iter().any(|f| f == FINALIZER);
    let kind = lookup("volumesnapshot").expect("registered");
    let project = snapshot.metadata.namespace.clone().unwrap_or_default();
    let _moving = ctx
        .volumes
        .lock(&project, [snapshot.spec.volume.clone()])
        .await;
    if snapshot.metadata.deletion_timestamp.is_some() {
        if !held {
            return Ok(());
        }
        let pool_name = volume.map(|v| v.spec.pool.clone()).unwrap_or_default();
        let pool = open_pool_named(ctx, &pool_name, swept).await?;
        crate::snapshots::delete(ctx, &pool, volume, snapshot).await?;
        return edit_finalizers(ctx, kind, &snapshot.metadata, false).await;
    }
    if !held {
        return edit_finalizers(ctx, kind, &snapshot.metadata, true).await;
    }
    if snapshot.status.as_ref().is_some_and(|s| s.phase == "Ready") {
        return Ok(());
    }
    let Some(volume) = volume.filter(|v| {
        v.status
            .as_ref()
            .is_some_and(|s| s.phase == "Available" && !s.path.is_empty())
    }) else {
        return Err(format!(
            "waiting for volume {:?} to be made",
            snapshot.spec.volume
        ));
    };
    let pool = open_pool(ctx, volume, swept).await?;
    let active = active_file(&pool, volume).await?;
    crate::snapshots::take(ctx, &pool, volume, &active, snapshot).await
}

/// The volume's current file: the one its status names (an overlay once it has snapshots),
/// else the one named by its uid.
async fn active_file(
    pool: &DirPool,
    volume: &Volume,
) -> Result<flotilla_storage::VolumeInfo, String> {
    let path = volume
        .status
        .as_ref()
        .map(|s| s.path.clone())
        .unwrap_or_default();
    let name = match flotilla_storage::volume_name(std::path::Path::new(&path)) {
        name if name.is_empty() => volume.metadata.uid.clone().unwrap_or_default(),
        name => name,
    };
    pool.info(&name).await.map_err(|e| e.to_string())
}

/// Whether `volume` is as its spec asks, as far as its object says: made, held, its size
/// reached, not being deleted.
fn settled(volume: &Volume) -> bool {
    let status = volume.status.clone().unwrap_or_default();
    let revert = volume
        .metadata
        .annotations
        .get(flotilla_types::kinds::volume_snapshot::REVERT_ANNOTATION);
    volume.metadata.deletion_timestamp.is_none()
        && (revert.is_none() || revert == status.last_revert.as_ref())
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
    open_pool_named(ctx, &volume.spec.pool, swept).await
}

/// StoragePool `name` as the API has it now.
async fn storage_pool(ctx: &Context, name: &str) -> Result<StoragePool, String> {
    let pools = lookup("storagepool").expect("registered");
    ctx.client
        .get(pools, None, name)
        .await
        .map_err(|e| format!("StoragePool {name:?}: {e}"))
        .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
}

async fn open_pool_named(
    ctx: &Context,
    name: &str,
    swept: &mut std::collections::BTreeSet<std::path::PathBuf>,
) -> Result<DirPool, String> {
    let pool = storage_pool(ctx, name).await?;
    match pool.spec.pool_type {
        PoolType::Dir => {}
        PoolType::Lvm => return Err(format!(
            "StoragePool {name:?} is an lvm pool: making volumes in LVM is not done yet (only dir pools hold volumes)"
        )),
        PoolType::Rbd | PoolType::Iscsi | PoolType::Nfs => return Err(format!(
            "StoragePool {name:?} is a shared pool: snapshots are offered in dir pools only"
        )),
    }
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
    snapshots: &std::collections::BTreeMap<String, VolumeSnapshot>,
    swept: &mut std::collections::BTreeSet<std::path::PathBuf>,
    sweep: bool,
) -> Result<(), String> {
    let uid = volume.metadata.uid.clone().unwrap_or_default();
    let held = volume.metadata.finalizers.iter().any(|f| f == FINALIZER);
    let kind = lookup("volume").expect("registered");
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    let _moving = ctx
        .volumes
        .lock(&project, [volume.metadata.name.clone()])
        .await;
    if volume.status.as_ref().is_some_and(|s| s.shared) {
        let pool = storage_pool(ctx, &volume.spec.pool).await?;
        return match pool.spec.pool_type {
            PoolType::Iscsi => crate::iscsi_volumes::reconcile(ctx, volume, &pool).await,
            PoolType::Nfs => {
                let nfs = crate::pools::nfs_pool(&pool)?;
                crate::shared_volumes::reconcile(ctx, volume, &nfs).await
            }
            _ => {
                let rbd = crate::pools::rbd_pool(&pool)?;
                crate::shared_volumes::reconcile(ctx, volume, &rbd).await
            }
        };
    }
    if volume.metadata.deletion_timestamp.is_some() {
        if !held {
            return Ok(());
        }
        let pool = open_pool(ctx, volume, swept).await?;
        // Its file and whatever else of its uid is left (its snapshots went first).
        let mut gone = volume.clone();
        gone.status = None;
        crate::snapshots::sweep(ctx, &pool, &gone, &Default::default()).await?;
        pool.delete(&uid).await.map_err(|e| e.to_string())?;
        return edit_finalizers(ctx, kind, &volume.metadata, false).await;
    }
    let status = volume.status.clone().unwrap_or_default();
    if !held {
        // Held before the file exists, so a delete always waits for the file to go.
        return edit_finalizers(ctx, kind, &volume.metadata, true).await;
    }
    let pool = open_pool(ctx, volume, swept).await?;
    let found = if status.path.is_empty() {
        pool.info(&uid).await
    } else {
        active_file(&pool, volume)
            .await
            .map_err(|_| flotilla_storage::StorageError::NotFound(status.path.clone()))
    };
    let info = match found {
        Ok(info) => info,
        Err(flotilla_storage::StorageError::NotFound(_))
            if !status.path.is_empty()
                && status.path != pool.path(&uid, format(volume)).display().to_string() =>
        {
            // Its file is an overlay that is gone: never made again blank behind its back.
            return Err(format!("its file {} is missing", status.path));
        }
        Err(flotilla_storage::StorageError::NotFound(_)) => {
            let source = match &volume.spec.source {
                None => Source::Blank,
                // Fetched (or found) in the node's image cache before the copy takes its place
                // in the disk queue (the fetch takes one of its own).
                Some(from) if from.image.is_some() => Source::Clone {
                    from: image_file(ctx, volume, from.image.as_deref().unwrap_or_default())
                        .await?,
                    format: Format::Qcow2,
                    linked: false,
                },
                Some(from) => match source_file(ctx, volume, from, &pool).await? {
                    Some((path, format)) => Source::Clone {
                        from: path,
                        format,
                        linked: from.mode == CloneMode::Linked,
                    },
                    None => {
                        let what = from.volume.as_ref().or(from.snapshot.as_ref());
                        let message = format!("waiting for its source {what:?} to be made");
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
                    format: format(volume),
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
    if crate::snapshots::revert(ctx, &pool, volume, &info, snapshots).await? {
        // Its status names the new file; the next pass takes it from there.
        return Ok(());
    }
    let wanted = u64::try_from(volume.spec.size.value()).unwrap_or(u64::MAX);
    let info = if wanted > info.virtual_size {
        grow(ctx, volume, &pool, &info, wanted).await?
    } else {
        info
    };
    if sweep {
        for stray in crate::snapshots::sweep(ctx, &pool, volume, snapshots).await? {
            tracing::info!(volume = %volume.metadata.name, file = %stray, "removed a file of the volume nothing needs");
        }
    }
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
    let users = ctx
        .libvirt
        .disk_users(&info.path.display().to_string())
        .await
        .map_err(|e| e.to_string())?;
    let grown = if users.is_empty() {
        pool.resize(&info.name, wanted)
            .await
            .map_err(|e| e.to_string())?
    } else {
        for (domain, target) in &users {
            ctx.libvirt
                .block_resize(domain, target, wanted)
                .await
                .map_err(|e| format!("cannot grow it in the running domain {domain}: {e}"))?;
        }
        pool.info(&info.name).await.map_err(|e| e.to_string())?
    };
    tracing::info!(volume = %volume.metadata.name, from = info.virtual_size, to = grown.virtual_size, online = !users.is_empty(), "grew a volume");
    Ok(grown)
}

/// The node's cached copy (qcow2) of Image `name` of the volume's project, fetched if need be.
pub(crate) async fn image_file(
    ctx: &Context,
    volume: &Volume,
    name: &str,
) -> Result<std::path::PathBuf, String> {
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    let image: flotilla_types::Image = serde_json::from_value(
        ctx.client
            .get(lookup("image").expect("registered"), Some(&project), name)
            .await
            .map_err(|e| format!("cannot read image {name:?}: {e}"))?,
    )
    .map_err(|e| format!("cannot read image {name:?}: {e}"))?;
    let spec = crate::vm::fetchable(name, &image).map_err(|e| e.to_string())?;
    ctx.disks
        .cached_image(&project, name, &spec)
        .await
        .map_err(|e| e.to_string())
}

/// The file and format a clone copies: the source volume's current file, or the snapshot's
/// frozen one, once made here; None while it is not.
async fn source_file(
    ctx: &Context,
    volume: &Volume,
    source: &flotilla_types::kinds::VolumeSource,
    pool: &DirPool,
) -> Result<Option<(std::path::PathBuf, Format)>, String> {
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    let (kind, name) = match (&source.volume, &source.snapshot) {
        (Some(v), _) => (lookup("volume").expect("registered"), v),
        (None, Some(s)) => (lookup("volumesnapshot").expect("registered"), s),
        (None, None) => return Ok(None),
    };
    let from = match ctx.client.get(kind, Some(&project), name).await {
        Ok(v) => v,
        // Not here (yet), or gone: nothing to copy from.
        Err(e) if matches!(e.code(), Some(403) | Some(404)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let ready = matches!(
        from["status"]["phase"].as_str(),
        Some("Available" | "Ready")
    );
    let path = from["status"]["path"].as_str().unwrap_or_default();
    if !ready || path.is_empty() {
        return Ok(None);
    }
    match pool
        .info(&flotilla_storage::volume_name(std::path::Path::new(path)))
        .await
    {
        Ok(info) => Ok(Some((info.path, info.format))),
        Err(flotilla_storage::StorageError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The format a volume is made in.
pub(crate) fn format(volume: &Volume) -> Format {
    match volume.spec.format {
        ImageFormat::Qcow2 => Format::Qcow2,
        ImageFormat::Raw => Format::Raw,
    }
}

pub(crate) async fn report(ctx: &Context, volume: &Volume, status: serde_json::Value) {
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

/// Adds or removes this agent's finalizer on a volume or snapshot, guarded by the
/// resourceVersion it read.
pub(crate) async fn edit_finalizers(
    ctx: &Context,
    kind: &'static flotilla_types::KindInfo,
    meta: &flotilla_types::ObjectMeta,
    hold: bool,
) -> Result<(), String> {
    let project = meta.namespace.clone().unwrap_or_default();
    let mut finalizers = meta.finalizers.clone();
    finalizers.retain(|f| f != FINALIZER);
    if hold {
        finalizers.push(FINALIZER.to_string());
    }
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": meta.resource_version}});
    match ctx
        .client
        .patch(kind, Some(&project), &meta.name, &patch, false)
        .await
    {
        // A conflict or a volume gone: the next pass reads it afresh.
        Ok(_) => Ok(()),
        Err(e) if matches!(e.code(), Some(404) | Some(409)) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
