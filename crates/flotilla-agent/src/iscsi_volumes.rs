//! Volumes in an `iscsi` pool, managed by this node (`status.node`): each is one LUN of the
//! target (`spec.lun`), which the target's administrator made and sized. Claimed once this agent
//! holds the finalizer; written from an image if the volume starts as one; reported with the
//! LUN's size; zeroed before the finalizer goes, so whoever is given the LUN next reads nothing
//! of it. A LUN cannot grow from here (QEMU: "Cannot grow iSCSI devices"): a volume asking for
//! more than its LUN holds says so.

use flotilla_types::kinds::{StoragePool, Volume};
use flotilla_types::registry::lookup;
use serde_json::json;

use crate::vm::Context;
use crate::volumes::{edit_finalizers, image_file, report, FINALIZER};

pub async fn reconcile(ctx: &Context, volume: &Volume, pool: &StoragePool) -> Result<(), String> {
    let held = volume.metadata.finalizers.iter().any(|f| f == FINALIZER);
    let kind = lookup("volume").expect("registered");
    let iscsi = crate::pools::iscsi_pool(pool)?;
    let Some(lun) = volume.spec.lun else {
        return Err("a volume in an iscsi pool names its LUN (spec.lun)".into());
    };
    if volume.metadata.deletion_timestamp.is_some() {
        if !held {
            return Ok(());
        }
        // A volume never made (its LUN never written) has nothing to zero.
        if volume.status.as_ref().is_some_and(|s| !s.path.is_empty()) {
            let _queued = ctx.disks.queued().await;
            iscsi.zero(lun).await.map_err(|e| e.to_string())?;
            tracing::info!(volume = %volume.metadata.name, lun, "zeroed a volume's LUN");
        }
        return edit_finalizers(ctx, kind, &volume.metadata, false).await;
    }
    if !held {
        return edit_finalizers(ctx, kind, &volume.metadata, true).await;
    }
    let status = volume.status.clone().unwrap_or_default();
    let size = iscsi
        .size(lun)
        .await
        .map_err(|e| format!("LUN {lun} of {} cannot be read: {e}", iscsi.config().target))?;
    let wanted = u64::try_from(volume.spec.size.value()).unwrap_or(u64::MAX);
    if wanted > size {
        let message = format!(
            "LUN {lun} holds {size} bytes, less than the volume's size ({wanted}): iSCSI LUNs are sized on the target and cannot grow from here; grow the LUN there (a running guest sees it after a restart)"
        );
        if status.message != message {
            let phase = if status.phase == "Available" {
                "Available"
            } else {
                "Failed"
            };
            report(ctx, volume, json!({"phase": phase, "message": message})).await;
        }
        return Ok(());
    }
    let path = format!("iscsi://{}/{}/{lun}", iscsi.portal(), iscsi.config().target);
    if status.path.is_empty() {
        // Written from its image before it is first reported: a crash rewrites it.
        if let Some(image) = volume.spec.source.as_ref().and_then(|s| s.image.clone()) {
            let file = image_file(ctx, volume, &image).await?;
            let _queued = ctx.disks.queued().await;
            iscsi
                .write(lun, &file, flotilla_storage::Format::Qcow2)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    if status.phase == "Available"
        && status.path == path
        && status.capacity == size
        && status.message.is_empty()
    {
        return Ok(());
    }
    report(
        ctx,
        volume,
        json!({"phase": "Available", "path": path, "capacity": size, "allocation": size, "message": ""}),
    )
    .await;
    Ok(())
}
