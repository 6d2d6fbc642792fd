//! Volumes in an `nfs` pool, managed by this node (`status.node`): a file on the export named by
//! the volume's uid (`<uid>.qcow2|raw`), made as the pool's user once this agent holds the
//! finalizer, grown — through the QEMU that has it open, so the guest sees the size, else
//! directly — and removed before the finalizer goes. Every step reads the file's state from the
//! server.

use flotilla_storage::{NfsPool, NfsSource, StorageError};
use flotilla_types::kinds::{StoragePool, Volume};
use flotilla_types::registry::lookup;
use serde_json::json;

use crate::vm::Context;
use crate::volumes::{edit_finalizers, format, image_file, report, FINALIZER};

/// The volume's file name on the export.
pub fn file_name(volume: &Volume) -> String {
    format!(
        "{}.{}",
        volume.metadata.uid.as_deref().unwrap_or_default(),
        format(volume).as_str()
    )
}

pub async fn reconcile(ctx: &Context, volume: &Volume, pool: &StoragePool) -> Result<(), String> {
    let held = volume.metadata.finalizers.iter().any(|f| f == FINALIZER);
    let kind = lookup("volume").expect("registered");
    let nfs = crate::pools::nfs_pool(pool)?;
    let file = file_name(volume);
    if volume.metadata.deletion_timestamp.is_some() {
        if !held {
            return Ok(());
        }
        nfs.delete(&file).await.map_err(|e| e.to_string())?;
        tracing::info!(volume = %volume.metadata.name, "removed a volume's file from its NFS export");
        return edit_finalizers(ctx, kind, &volume.metadata, false).await;
    }
    if !held {
        return edit_finalizers(ctx, kind, &volume.metadata, true).await;
    }
    let status = volume.status.clone().unwrap_or_default();
    let wanted = u64::try_from(volume.spec.size.value()).unwrap_or(u64::MAX);
    let made = match nfs.info(&file, format(volume)).await {
        Ok(made) => made,
        Err(StorageError::NotFound(_)) if status.phase == "Available" => {
            return Err(format!("its file {} is missing", nfs.path(&file)));
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
            let made = nfs
                .create(&file, format(volume), wanted, &source)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(volume = %volume.metadata.name, ms = started.elapsed().as_millis() as u64, "made a volume's file on its NFS export");
            made
        }
        Err(e) => return Err(e.to_string()),
    };
    let made = if wanted > made.virtual_size {
        grow(ctx, volume, &nfs, &file, wanted).await?
    } else {
        made
    };
    let path = format!("nfs://{}{}", nfs.config().server, nfs.path(&file));
    if status.phase == "Available" && status.path == path && status.capacity == made.virtual_size {
        return Ok(());
    }
    report(
        ctx,
        volume,
        json!({"phase": "Available", "path": path, "capacity": made.virtual_size,
               "allocation": made.allocation, "message": ""}),
    )
    .await;
    Ok(())
}

/// Grows the file: through the running domains of this node that have it open, else directly.
async fn grow(
    ctx: &Context,
    volume: &Volume,
    nfs: &NfsPool,
    file: &str,
    wanted: u64,
) -> Result<flotilla_storage::NfsVolume, String> {
    let users = ctx
        .libvirt
        .disk_users(&nfs.path(file))
        .await
        .map_err(|e| e.to_string())?;
    for (domain, target) in &users {
        ctx.libvirt
            .block_resize(domain, target, wanted)
            .await
            .map_err(|e| format!("cannot grow it in the running domain {domain}: {e}"))?;
    }
    let grown = nfs
        .resize(file, format(volume), wanted)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(volume = %volume.metadata.name, to = grown.virtual_size, online = !users.is_empty(), "grew a volume's file on its NFS export");
    Ok(grown)
}

/// What the file starts as: blank, an image of the project (from the node's cache), or a full
/// copy of another volume of the pool; None while that is not made.
async fn source(ctx: &Context, volume: &Volume) -> Result<Option<NfsSource>, String> {
    let Some(from) = &volume.spec.source else {
        return Ok(Some(NfsSource::Blank));
    };
    if let Some(image) = &from.image {
        let file = image_file(ctx, volume, image).await?;
        return Ok(Some(NfsSource::File {
            from: file,
            format: flotilla_storage::Format::Qcow2,
        }));
    }
    let Some(name) = &from.volume else {
        return Err(
            "a volume in an nfs pool is copied from a volume or an image, not a snapshot".into(),
        );
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
    let source: Volume = serde_json::from_value(source).map_err(|e| e.to_string())?;
    Ok(Some(NfsSource::Volume {
        name: file_name(&source),
        format: format(&source),
    }))
}
