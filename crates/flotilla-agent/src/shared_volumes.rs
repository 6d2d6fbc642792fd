//! Volumes in a shared pool that the node makes itself — an `rbd` pool's images, an `nfs`
//! pool's files — managed by this node (`status.node`, which follows the VM using the volume).
//! One lifecycle for both backends: the volume is made once this agent holds its finalizer
//! (blank, from an image in the node's cache, or from another volume of the pool), grown —
//! through the QEMU that has it open, so the guest sees the size, else directly — and removed
//! before the finalizer goes. Every step reads the volume's state from the backend, so a crash
//! at any point converges at the next pass. (An `iscsi` pool's LUNs are not made by the node:
//! [`crate::iscsi_volumes`].)

use std::path::PathBuf;

use flotilla_storage::{Format, NfsPool, NfsSource, RbdPool, RbdSource, StorageError};
use flotilla_types::kinds::{CloneMode, Volume};
use flotilla_types::registry::lookup;
use serde_json::json;

use crate::vm::Context;
use crate::volumes::{edit_finalizers, format, image_file, report, FINALIZER};

/// What a new volume starts as, for any backend.
pub(crate) enum Start {
    Blank,
    /// A local file (an image from the node's cache, qcow2).
    File(PathBuf),
    /// Another volume of the pool, linked (copy-on-write) or copied.
    Volume {
        source: Box<Volume>,
        linked: bool,
    },
}

/// A shared pool as this lifecycle drives it.
pub(crate) trait Backend {
    /// The volume's name in the pool.
    fn name(&self, volume: &Volume) -> String;
    /// What libvirt calls its disk: how the running domains that have it open are found.
    fn disk_name(&self, name: &str) -> String;
    /// Its `status.path`.
    fn status_path(&self, name: &str) -> String;
    /// Its size; `NotFound` when it does not exist.
    async fn size(&self, volume: &Volume, name: &str) -> Result<u64, StorageError>;
    /// The bytes it takes in the pool (asked only when reported: it may cost a round trip).
    async fn allocation(&self, volume: &Volume, name: &str) -> u64;
    async fn create(
        &self,
        volume: &Volume,
        name: &str,
        size: u64,
        start: Start,
    ) -> Result<(), StorageError>;
    /// Grows it offline (or after its QEMU did), to `size`; its size now.
    async fn resize(&self, volume: &Volume, name: &str, size: u64) -> Result<u64, StorageError>;
    /// Removes it and whatever an interrupted create of it left; nothing when gone.
    async fn delete(&self, name: &str) -> Result<(), StorageError>;
}

pub(crate) async fn reconcile(
    ctx: &Context,
    volume: &Volume,
    pool: &impl Backend,
) -> Result<(), String> {
    let held = volume.metadata.finalizers.iter().any(|f| f == FINALIZER);
    let kind = lookup("volume").expect("registered");
    let name = pool.name(volume);
    if volume.metadata.deletion_timestamp.is_some() {
        if !held {
            return Ok(());
        }
        pool.delete(&name).await.map_err(|e| e.to_string())?;
        tracing::info!(volume = %volume.metadata.name, path = %pool.status_path(&name), "removed a volume from its shared pool");
        return edit_finalizers(ctx, kind, &volume.metadata, false).await;
    }
    if !held {
        // Held before the volume exists, so a delete always waits for it to go.
        return edit_finalizers(ctx, kind, &volume.metadata, true).await;
    }
    let status = volume.status.clone().unwrap_or_default();
    let wanted = u64::try_from(volume.spec.size.value()).unwrap_or(u64::MAX);
    let size = match pool.size(volume, &name).await {
        Ok(size) => size,
        Err(StorageError::NotFound(_)) if status.phase == "Available" => {
            // Made once and gone behind Flotilla's back: never made again blank.
            return Err(format!("{} is missing", pool.status_path(&name)));
        }
        Err(StorageError::NotFound(_)) => {
            let Some(start) = start(ctx, volume).await? else {
                let message = "waiting for its source to be made".to_string();
                if status.message != message {
                    report(ctx, volume, json!({"phase": "Pending", "message": message})).await;
                }
                return Ok(());
            };
            let _queued = ctx.disks.queued().await;
            let started = std::time::Instant::now();
            pool.create(volume, &name, wanted, start)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(volume = %volume.metadata.name, ms = started.elapsed().as_millis() as u64, "made a volume in its shared pool");
            pool.size(volume, &name).await.map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let size = if wanted > size {
        grow(ctx, volume, pool, &name, wanted).await?
    } else {
        size
    };
    let path = pool.status_path(&name);
    if status.phase == "Available" && status.path == path && status.capacity == size {
        return Ok(());
    }
    let allocation = pool.allocation(volume, &name).await;
    report(
        ctx,
        volume,
        json!({"phase": "Available", "path": path, "capacity": size,
               "allocation": allocation, "message": ""}),
    )
    .await;
    Ok(())
}

/// Grows the volume: through the running domains of this node that have it open (each guest
/// sees the new size at once), then the backend's own resize (nothing left to do if they did).
async fn grow(
    ctx: &Context,
    volume: &Volume,
    pool: &impl Backend,
    name: &str,
    wanted: u64,
) -> Result<u64, String> {
    let users = ctx
        .libvirt
        .disk_users(&pool.disk_name(name))
        .await
        .map_err(|e| e.to_string())?;
    for (domain, target) in &users {
        ctx.libvirt
            .block_resize(domain, target, wanted)
            .await
            .map_err(|e| format!("cannot grow it in the running domain {domain}: {e}"))?;
    }
    let size = pool
        .resize(volume, name, wanted)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(volume = %volume.metadata.name, to = size, online = !users.is_empty(), "grew a volume in its shared pool");
    Ok(size)
}

/// What the volume starts as; None while its source volume is not made (or not readable here).
async fn start(ctx: &Context, volume: &Volume) -> Result<Option<Start>, String> {
    let Some(from) = &volume.spec.source else {
        return Ok(Some(Start::Blank));
    };
    if let Some(image) = &from.image {
        return Ok(Some(Start::File(image_file(ctx, volume, image).await?)));
    }
    let Some(name) = &from.volume else {
        return Err(
            "a volume in a shared pool starts blank, from an image or from a volume".into(),
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
    Ok(Some(Start::Volume {
        source: Box::new(serde_json::from_value(source).map_err(|e| e.to_string())?),
        linked: from.mode == CloneMode::Linked,
    }))
}

/// An `rbd` pool: raw images named by the volume's uid.
impl Backend for RbdPool {
    fn name(&self, volume: &Volume) -> String {
        volume.metadata.uid.clone().unwrap_or_default()
    }

    fn disk_name(&self, name: &str) -> String {
        format!("{}/{name}", self.config().pool)
    }

    fn status_path(&self, name: &str) -> String {
        format!("rbd:{}", self.disk_name(name))
    }

    async fn size(&self, _: &Volume, name: &str) -> Result<u64, StorageError> {
        Ok(self.info(name).await?.size)
    }

    async fn allocation(&self, _: &Volume, name: &str) -> u64 {
        self.used(name).await.unwrap_or(0)
    }

    async fn create(
        &self,
        _: &Volume,
        name: &str,
        size: u64,
        start: Start,
    ) -> Result<(), StorageError> {
        let source = match start {
            Start::Blank => RbdSource::Blank,
            Start::File(from) => RbdSource::File {
                from,
                format: Format::Qcow2,
            },
            Start::Volume { source, linked } => RbdSource::Image {
                name: self.name(&source),
                linked,
            },
        };
        RbdPool::create(self, name, size, &source).await.map(drop)
    }

    async fn resize(&self, _: &Volume, name: &str, size: u64) -> Result<u64, StorageError> {
        Ok(RbdPool::resize(self, name, size).await?.size)
    }

    async fn delete(&self, name: &str) -> Result<(), StorageError> {
        RbdPool::delete(self, name).await
    }
}

/// An `nfs` pool: files named by the volume's uid and format, in the export's top directory.
impl Backend for NfsPool {
    fn name(&self, volume: &Volume) -> String {
        file_name(volume)
    }

    fn disk_name(&self, name: &str) -> String {
        self.path(name)
    }

    fn status_path(&self, name: &str) -> String {
        format!("nfs://{}{}", self.config().server, self.path(name))
    }

    async fn size(&self, volume: &Volume, name: &str) -> Result<u64, StorageError> {
        Ok(self.info(name, format(volume)).await?.virtual_size)
    }

    async fn allocation(&self, volume: &Volume, name: &str) -> u64 {
        self.info(name, format(volume))
            .await
            .map(|f| f.allocation)
            .unwrap_or(0)
    }

    async fn create(
        &self,
        volume: &Volume,
        name: &str,
        size: u64,
        start: Start,
    ) -> Result<(), StorageError> {
        let source = match start {
            Start::Blank => NfsSource::Blank,
            Start::File(from) => NfsSource::File {
                from,
                format: Format::Qcow2,
            },
            // Admission refuses linked clones in nfs pools: every copy is full.
            Start::Volume { source, .. } => NfsSource::Volume {
                name: file_name(&source),
                format: format(&source),
            },
        };
        NfsPool::create(self, name, format(volume), size, &source)
            .await
            .map(drop)
    }

    async fn resize(&self, volume: &Volume, name: &str, size: u64) -> Result<u64, StorageError> {
        Ok(NfsPool::resize(self, name, format(volume), size)
            .await?
            .virtual_size)
    }

    async fn delete(&self, name: &str) -> Result<(), StorageError> {
        NfsPool::delete(self, name).await
    }
}

/// A volume's file name on an NFS export.
pub fn file_name(volume: &Volume) -> String {
    format!(
        "{}.{}",
        volume.metadata.uid.as_deref().unwrap_or_default(),
        format(volume).as_str()
    )
}
