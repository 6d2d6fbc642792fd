//! Volumes in an `rbd` pool, managed by this node (`status.node`): the RBD image (named by the
//! volume's uid) made once this agent holds the finalizer, grown — through the QEMU that has it
//! open, so the guest sees the size, else directly — and removed before the finalizer goes.
//! Idempotent as the dir pool's volumes are: every step reads the image's state from Ceph.

use flotilla_storage::{RbdPool, RbdSource, StorageError};
use flotilla_types::kinds::{CloneMode, StoragePool, Volume};
use flotilla_types::registry::lookup;
use serde_json::json;

use crate::vm::Context;
use crate::volumes::{edit_finalizers, image_file, report, FINALIZER};

pub async fn reconcile(ctx: &Context, volume: &Volume, pool: &StoragePool) -> Result<(), String> {
    let uid = volume.metadata.uid.clone().unwrap_or_default();
    let held = volume.metadata.finalizers.iter().any(|f| f == FINALIZER);
    let kind = lookup("volume").expect("registered");
    let rbd = crate::pools::rbd_pool(pool)?;
    if volume.metadata.deletion_timestamp.is_some() {
        if !held {
            return Ok(());
        }
        rbd.delete(&uid).await.map_err(|e| e.to_string())?;
        tracing::info!(volume = %volume.metadata.name, "removed a volume's RBD image");
        return edit_finalizers(ctx, kind, &volume.metadata, false).await;
    }
    if !held {
        // Held before the image exists, so a delete always waits for the image to go.
        return edit_finalizers(ctx, kind, &volume.metadata, true).await;
    }
    let status = volume.status.clone().unwrap_or_default();
    let wanted = u64::try_from(volume.spec.size.value()).unwrap_or(u64::MAX);
    let image = match rbd.info(&uid).await {
        Ok(image) => image,
        Err(StorageError::NotFound(_)) if status.phase == "Available" => {
            // Made once and gone behind Flotilla's back: never made again blank.
            return Err(format!(
                "its RBD image {}/{uid} is missing",
                rbd.config().pool
            ));
        }
        Err(StorageError::NotFound(_)) => {
            let Some(source) = source(ctx, volume).await? else {
                let message = "waiting for its source to be made".to_string();
                if status.message != message {
                    report(ctx, volume, json!({"phase": "Pending", "message": message})).await;
                }
                return Ok(());
            };
            let _queued = ctx.disks.queued().await;
            let started = std::time::Instant::now();
            let made = rbd
                .create(&uid, wanted, &source)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(volume = %volume.metadata.name, ms = started.elapsed().as_millis() as u64, "made a volume's RBD image");
            made
        }
        Err(e) => return Err(e.to_string()),
    };
    let size = if wanted > image.size {
        grow(ctx, volume, &rbd, wanted).await?
    } else {
        image.size
    };
    let path = format!("rbd:{}/{uid}", rbd.config().pool);
    if status.phase == "Available" && status.path == path && status.capacity == size {
        return Ok(());
    }
    let allocation = rbd.used(&uid).await.unwrap_or(0);
    report(
        ctx,
        volume,
        json!({"phase": "Available", "path": path, "capacity": size,
               "allocation": allocation, "message": ""}),
    )
    .await;
    Ok(())
}

/// Grows the image: through the running domains of this node that have it open (each guest sees
/// the new size at once), else the image itself.
async fn grow(ctx: &Context, volume: &Volume, rbd: &RbdPool, wanted: u64) -> Result<u64, String> {
    let uid = volume.metadata.uid.clone().unwrap_or_default();
    let name = format!("{}/{uid}", rbd.config().pool);
    let users = ctx
        .libvirt
        .disk_users(&name)
        .await
        .map_err(|e| e.to_string())?;
    for (domain, target) in &users {
        ctx.libvirt
            .block_resize(domain, target, wanted)
            .await
            .map_err(|e| format!("cannot grow it in the running domain {domain}: {e}"))?;
    }
    let grown = rbd.resize(&uid, wanted).await.map_err(|e| e.to_string())?;
    tracing::info!(volume = %volume.metadata.name, to = grown.size, online = !users.is_empty(), "grew a volume's RBD image");
    Ok(grown.size)
}

/// What the image starts as: blank, an image of the project (copied from the node's cache),
/// or another volume of the pool (cloned or copied by Ceph); None while that is not made.
async fn source(ctx: &Context, volume: &Volume) -> Result<Option<RbdSource>, String> {
    let Some(from) = &volume.spec.source else {
        return Ok(Some(RbdSource::Blank));
    };
    if let Some(image) = &from.image {
        let file = image_file(ctx, volume, image).await?;
        return Ok(Some(RbdSource::File {
            from: file,
            format: flotilla_storage::Format::Qcow2,
        }));
    }
    let Some(name) = &from.volume else {
        return Err("an rbd volume is cloned from a volume or an image, not a snapshot".into());
    };
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    let kind = lookup("volume").expect("registered");
    let source = match ctx.client.get(kind, Some(&project), name).await {
        Ok(v) => v,
        Err(e) if matches!(e.code(), Some(403) | Some(404)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if source["status"]["phase"] != "Available" {
        return Ok(None);
    }
    Ok(Some(RbdSource::Image {
        name: source["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        linked: from.mode == CloneMode::Linked,
    }))
}
