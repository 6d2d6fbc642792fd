//! Volume snapshots on this node, external as libvirt calls them: taking one freezes the
//! volume's current file as the snapshot and puts a new overlay on top of it
//! (`<volume uid>.<snapshot uid>`), which takes the volume's writes — through libvirt when a
//! running guest has the volume (it does not notice), else with qemu-img. Deleting one merges
//! the overlay above it back into its file (a block commit: live through libvirt, else
//! qemu-img); reverting puts a fresh overlay on the snapshot's file and drops the old one.
//!
//! Each step can be cut short by a crash and run again: the overlay's name is fixed by the
//! snapshot, a switch already made is seen in where the guest's disk points, and a file left
//! over is swept with the volume's other strays (anything of its uid neither its file, a
//! snapshot's, nor under them).

use std::collections::BTreeMap;
use std::path::Path;

use flotilla_storage::{volume_name, DirPool, Format, NewVolume, Source, VolumeInfo};
use flotilla_types::kinds::volume_snapshot::REVERT_ANNOTATION;
use flotilla_types::kinds::{Volume, VolumeSnapshot};
use flotilla_types::registry::lookup;
use serde_json::json;

use crate::vm::Context;

/// The agent's finalizer, as on volumes: the snapshot's file goes before the object.
pub use crate::volumes::FINALIZER;

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Whether a running guest has the file open.
async fn in_use(ctx: &Context, path: &str) -> Result<bool, String> {
    Ok(!ctx.libvirt.disk_users(path).await.map_err(text)?.is_empty())
}

/// The overlay a snapshot puts on its volume.
pub fn overlay_name(volume_uid: &str, snapshot_uid: &str) -> String {
    format!("{volume_uid}.{snapshot_uid}")
}

/// The snapshots of `volume` among `snapshots`.
fn of<'a>(
    volume: &'a Volume,
    snapshots: &'a BTreeMap<String, VolumeSnapshot>,
) -> impl Iterator<Item = &'a VolumeSnapshot> + 'a {
    snapshots.values().filter(move |s| {
        s.metadata.namespace == volume.metadata.namespace && s.spec.volume == volume.metadata.name
    })
}

/// Writes a status; the step stops here when it cannot (it is taken again from the start).
async fn report(
    ctx: &Context,
    kind: &str,
    ns: &str,
    name: &str,
    status: serde_json::Value,
) -> Result<(), String> {
    let kind = lookup(kind).expect("registered");
    let patch = json!({"status": status});
    ctx.client
        .patch(kind, Some(ns), name, &patch, true)
        .await
        .map(drop)
        .map_err(|e| format!("cannot record the step: {e}"))
}

/// Records the volume's new file (its path, and what it now holds) before anything else moves:
/// the snapshot is not Ready, nor the old file removed, before the volume names its new file.
pub(crate) async fn switch_volume(
    ctx: &Context,
    volume: &Volume,
    file: &VolumeInfo,
    extra: serde_json::Value,
) -> Result<(), String> {
    let ns = volume.metadata.namespace.clone().unwrap_or_default();
    let mut status = json!({"path": file.path.display().to_string(), "capacity": file.virtual_size,
                            "allocation": file.allocation});
    if let (Some(status), Some(extra)) = (status.as_object_mut(), extra.as_object()) {
        status.extend(extra.clone());
    }
    report(ctx, "volume", &ns, &volume.metadata.name, status).await
}

/// Takes snapshot `snapshot` of `volume` (whose current file is `active`), or finishes taking
/// it; returns the frozen file.
pub async fn take(
    ctx: &Context,
    pool: &DirPool,
    volume: &Volume,
    active: &VolumeInfo,
    snapshot: &VolumeSnapshot,
) -> Result<(), String> {
    let (vuid, suid) = (
        volume.metadata.uid.clone().unwrap_or_default(),
        snapshot.metadata.uid.clone().unwrap_or_default(),
    );
    let name = overlay_name(&vuid, &suid);
    let frozen = if active.name == name {
        // Switched already (a crash came before the snapshot said so).
        let Some(backing) = active.backing.clone() else {
            return Err(format!("the overlay {name} has no backing file"));
        };
        pool.info(&volume_name(&backing)).await.map_err(text)?
    } else {
        let overlay = match pool.info(&name).await {
            Ok(made) => made,
            Err(flotilla_storage::StorageError::NotFound(_)) => pool
                .create(&NewVolume {
                    name: name.clone(),
                    format: Format::Qcow2,
                    size: active.virtual_size,
                    source: Source::Clone {
                        from: active.path.clone(),
                        format: active.format,
                        linked: true,
                    },
                })
                .await
                .map_err(text)?,
            Err(e) => return Err(text(e)),
        };
        let path = active.path.display().to_string();
        let users = ctx.libvirt.disk_users(&path).await.map_err(text)?;
        for (domain, target) in &users {
            let overlay_path = overlay.path.display().to_string();
            ctx.libvirt
                .snapshot_disk(domain, target, &overlay_path)
                .await
                .map_err(|e| format!("the running guest's disk could not be switched: {e}"))?;
        }
        tracing::info!(volume = %volume.metadata.name, snapshot = %snapshot.metadata.name, online = !users.is_empty(), "took a snapshot");
        switch_volume(ctx, volume, &overlay, json!({})).await?;
        active.clone()
    };
    let ns = snapshot.metadata.namespace.clone().unwrap_or_default();
    let status = json!({"phase": "Ready", "path": frozen.path.display().to_string(),
                        "size": frozen.virtual_size, "message": ""});
    report(ctx, "volumesnapshot", &ns, &snapshot.metadata.name, status).await
}

/// Deletes `snapshot`'s file: gone when nothing sits on it; merged with the volume's current
/// file when that is the only overlay on it (the volume then uses the snapshot's file). Err
/// says why it must wait.
pub async fn delete(
    ctx: &Context,
    pool: &DirPool,
    volume: Option<&Volume>,
    snapshot: &VolumeSnapshot,
) -> Result<(), String> {
    let path = snapshot
        .status
        .as_ref()
        .map(|s| s.path.clone())
        .unwrap_or_default();
    let active_path = volume
        .and_then(|v| v.status.as_ref())
        .map(|s| s.path.clone())
        .unwrap_or_default();
    if let Some(base) = merge_away(ctx, pool, &path, &active_path).await? {
        let volume = volume.expect("the active file is a volume's");
        switch_volume(ctx, volume, &base, json!({})).await?;
        pool.delete(&volume_name(Path::new(&active_path)))
            .await
            .map_err(text)?;
        tracing::info!(volume = %volume.metadata.name, snapshot = %snapshot.metadata.name, "merged a deleted snapshot into its volume");
    }
    Ok(())
}

/// Removes the frozen file `frozen` of a snapshot from a disk whose current file is `active`:
/// deleted when nothing sits on it; when `active` is the only overlay on it, `active` is merged
/// into it (a block commit: live through libvirt when a guest has the disk open, else
/// qemu-img) and the frozen file is returned — the disk's file from now on, which the caller
/// records before deleting `active`. Err says why it must wait (newer snapshots sit on it).
pub async fn merge_away(
    ctx: &Context,
    pool: &DirPool,
    frozen: &str,
    active: &str,
) -> Result<Option<VolumeInfo>, String> {
    if frozen.is_empty() {
        // Never taken: nothing to remove.
        return Ok(None);
    }
    if frozen == active {
        // Merged already; the caller recorded it, and may not have deleted the old top.
        return Ok(None);
    }
    let frozen = match pool.info(&volume_name(Path::new(frozen))).await {
        Ok(info) => info,
        Err(flotilla_storage::StorageError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(text(e)),
    };
    let children: Vec<VolumeInfo> = pool
        .list()
        .await
        .map_err(text)?
        .into_iter()
        .filter(|v| v.backing.as_deref() == Some(frozen.path.as_path()))
        .collect();
    match children.as_slice() {
        [] => pool.delete(&frozen.name).await.map(|()| None).map_err(text),
        [top] if top.path.display().to_string() == active => {
            let frozen_text = frozen.path.display().to_string();
            // A guest already switched back to the frozen file (a crash after the pivot)
            // holds it open: the merge is done.
            let merged = in_use(ctx, &frozen_text).await?;
            if !merged {
                let users = ctx.libvirt.disk_users(active).await.map_err(text)?;
                if users.is_empty() {
                    pool.commit(&top.name).await.map_err(text)?;
                } else {
                    for (domain, target) in &users {
                        ctx.libvirt
                            .commit_active(domain, target, &frozen_text)
                            .await
                            .map_err(|e| format!("merging into the snapshot's file: {e}"))?;
                    }
                }
            }
            pool.info(&frozen.name).await.map(Some).map_err(text)
        }
        others => Err(format!(
            "its file is the base of {} other file(s) ({}): newer snapshots go first",
            others.len(),
            others
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Carries out a revert the volume's annotation asks for and its status has not recorded:
/// a fresh overlay on the snapshot's file becomes the volume's file, and the old one goes.
/// Ok(false) when there is none to do.
pub async fn revert(
    ctx: &Context,
    pool: &DirPool,
    volume: &Volume,
    active: &VolumeInfo,
    snapshots: &BTreeMap<String, VolumeSnapshot>,
) -> Result<bool, String> {
    let Some(request) = volume.metadata.annotations.get(REVERT_ANNOTATION) else {
        return Ok(false);
    };
    let status = volume.status.clone().unwrap_or_default();
    if status.last_revert.as_deref() == Some(request.as_str()) {
        return Ok(false);
    }
    let wanted = request.split_whitespace().next().unwrap_or_default();
    let Some(snapshot) = of(volume, snapshots).find(|s| s.metadata.name == wanted) else {
        return Err(format!(
            "cannot revert to {wanted:?}: the volume has no such snapshot"
        ));
    };
    let frozen = snapshot
        .status
        .as_ref()
        .map(|s| s.path.clone())
        .unwrap_or_default();
    if snapshot.status.as_ref().map(|s| s.phase.as_str()) != Some("Ready") || frozen.is_empty() {
        return Err(format!(
            "cannot revert to {wanted:?} yet: the snapshot is not Ready"
        ));
    }
    let path = active.path.display().to_string();
    if in_use(ctx, &path).await? {
        return Err(format!(
            "cannot revert to {wanted:?} while a running VM has the volume: stop the VM (or detach the volume) first"
        ));
    }
    // Named by the request, so a second try finds the first one's overlay.
    let digest = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(request.as_bytes())[..6])
    };
    let vuid = volume.metadata.uid.clone().unwrap_or_default();
    let name = format!("{vuid}.r{digest}");
    let fresh = match pool.info(&name).await {
        Ok(made) => made,
        Err(flotilla_storage::StorageError::NotFound(_)) => {
            let base = pool
                .info(&volume_name(Path::new(&frozen)))
                .await
                .map_err(text)?;
            pool.create(&NewVolume {
                name: name.clone(),
                format: Format::Qcow2,
                size: base.virtual_size,
                source: Source::Clone {
                    from: base.path.clone(),
                    format: base.format,
                    linked: true,
                },
            })
            .await
            .map_err(text)?
        }
        Err(e) => return Err(text(e)),
    };
    switch_volume(
        ctx,
        volume,
        &fresh,
        json!({"lastRevert": request, "message": ""}),
    )
    .await?;
    tracing::info!(volume = %volume.metadata.name, snapshot = wanted, "reverted a volume to a snapshot");
    // The old file, unless it is a snapshot's (the sweep takes it otherwise, after a crash).
    let keep = of(volume, snapshots).any(|s| s.status.as_ref().is_some_and(|st| st.path == path))
        || ctx.vm_snapshots.keeps(&path) != Some(false);
    if !keep && active.name != name {
        pool.delete(&active.name).await.map_err(text)?;
    }
    Ok(true)
}

/// Removes the files of `volume`'s uid that nothing needs: not its file, not a snapshot's,
/// not a pending snapshot's overlay, not under any of those, not open in a running guest;
/// returns what went. `volume` must be as the API has it now.
pub async fn sweep(
    ctx: &Context,
    pool: &DirPool,
    volume: &Volume,
    snapshots: &BTreeMap<String, VolumeSnapshot>,
) -> Result<Vec<String>, String> {
    let vuid = volume.metadata.uid.clone().unwrap_or_default();
    if vuid.is_empty() {
        return Ok(Vec::new());
    }
    let family = pool.family(&vuid).await.map_err(text)?;
    let by_path: BTreeMap<String, &VolumeInfo> = family
        .iter()
        .map(|f| (f.path.display().to_string(), f))
        .collect();
    let mut keep: Vec<String> = Vec::new();
    let status = volume.status.clone().unwrap_or_default();
    if !status.path.is_empty() {
        keep.push(status.path.clone());
    } else {
        // Not made yet, or made and not reported: its own file stays.
        keep.extend(
            family
                .iter()
                .filter(|f| f.name == vuid)
                .map(|f| f.path.display().to_string()),
        );
    }
    for s in of(volume, snapshots) {
        let st = s.status.clone().unwrap_or_default();
        if !st.path.is_empty() {
            keep.push(st.path);
        }
        let overlay = overlay_name(&vuid, s.metadata.uid.as_deref().unwrap_or_default());
        keep.extend(
            family
                .iter()
                .filter(|f| f.name == overlay)
                .map(|f| f.path.display().to_string()),
        );
    }
    // Frozen files of VM snapshots (the sweep waits until they are known).
    let Some(()) = family.iter().try_for_each(|f| {
        let path = f.path.display().to_string();
        ctx.vm_snapshots.keeps(&path).map(|kept| {
            if kept {
                keep.push(path);
            }
        })
    }) else {
        return Ok(Vec::new());
    };
    // Under what stays: its backing chain.
    let mut i = 0;
    while i < keep.len() {
        if let Some(backing) = by_path.get(&keep[i]).and_then(|f| f.backing.clone()) {
            let b = backing.display().to_string();
            if !keep.contains(&b) {
                keep.push(b);
            }
        }
        i += 1;
    }
    let mut gone = Vec::new();
    // Overlays before what they sit on: the pool refuses to delete a file something backs on.
    let mut strays: Vec<&VolumeInfo> = family
        .iter()
        .filter(|f| !keep.contains(&f.path.display().to_string()))
        .collect();
    strays.sort_by_key(|f| std::cmp::Reverse(chain_depth(f, &by_path)));
    for stray in strays {
        let path = stray.path.display().to_string();
        if in_use(ctx, &path).await? {
            tracing::warn!(file = %path, "a running guest has a file its volume does not name; keeping it");
            continue;
        }
        pool.delete(&stray.name).await.map_err(text)?;
        gone.push(stray.name.clone());
    }
    Ok(gone)
}

fn chain_depth(file: &VolumeInfo, by_path: &BTreeMap<String, &VolumeInfo>) -> usize {
    let mut depth = 0;
    let mut next = file.backing.clone();
    while let Some(b) = next {
        depth += 1;
        next = by_path
            .get(&b.display().to_string())
            .and_then(|f| f.backing.clone());
        if depth > 1000 {
            break;
        }
    }
    depth
}
