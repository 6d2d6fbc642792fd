//! VM snapshots on this node (see `flotilla_types::kinds::vm_snapshot`), carried out by the
//! VM's own actor: it owns the domain and holds the locks of the VM's volumes, so nothing else
//! moves their files meanwhile.
//!
//! - **Take**: every disk's current file freezes and a new overlay takes the writes —
//!   `root.<snapshot uid>` beside the root disk (the VM's directory records which root file is
//!   current in `root.active`), `<volume uid>.<snapshot uid>` beside a volume (its
//!   `status.path` records it). A running guest switches in one libvirt call, its memory saved
//!   to `<snapshot uid>.mem` in the same pause; a stopped one only changes the records.
//! - **Revert** (the VM's `flotilla.dev/revert-to` annotation): the domain stops, fresh
//!   overlays on the frozen files become the disks' files, and with memory the guest resumes
//!   from the memory file with its disks pointed at them — every `<backingStore>` of the saved
//!   definition dropped, or libvirt would open the overlays without their chain and the guest
//!   would read zeros (libvirt 9.0 cannot revert external snapshots itself).
//! - **Delete**: each frozen file is merged with the one overlay above it (see
//!   [`crate::snapshots::merge_away`]), the memory file goes.
//!
//! Each step can be cut short by a crash and taken again: overlays are named by the snapshot
//! (or the revert request), a switch already made shows in the running domain's disks, and the
//! records are written after the switch and before anything is deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_client::ListParams;
use flotilla_storage::{volume_name, DirPool, Format, NewVolume, Source, StorageError, VolumeInfo};
use flotilla_types::kinds::volume_snapshot::REVERT_ANNOTATION;
use flotilla_types::kinds::{VMSnapshot, VMSnapshotDisk, Volume};
use flotilla_types::registry::lookup;
use flotilla_types::{EventType, VirtualMachine};
use serde_json::json;

use crate::domain::VolumeDisk;
use crate::error::AgentError;
use crate::follow::{follow_selected, Mirror};
use crate::libvirt::{DomainState, LiveDisk};
use crate::vm::Context;

/// The agent's finalizer: a snapshot's files go before the object.
pub use flotilla_types::kinds::vm::AGENT_FINALIZER as FINALIZER;

/// The root disk's name in the VM's directory before any snapshot.
pub const ROOT: &str = "root";
/// The file in the VM's directory naming its current root file.
const ROOT_RECORD: &str = "root.active";

/// The VM snapshots placed on this node, as the follower last heard them (by uid), and a way to
/// wake the actors of their VMs.
pub struct NodeSnapshots {
    items: Mutex<BTreeMap<String, VMSnapshot>>,
    listed: AtomicBool,
    wake: tokio::sync::mpsc::UnboundedSender<String>,
}

impl NodeSnapshots {
    pub fn new(wake: tokio::sync::mpsc::UnboundedSender<String>) -> Self {
        NodeSnapshots {
            items: Default::default(),
            listed: AtomicBool::new(false),
            wake,
        }
    }

    /// Takes in the snapshots now known; wakes the VMs of those that changed or went.
    pub fn update(&self, snapshots: &BTreeMap<String, VMSnapshot>) {
        let mut items = self.items.lock().expect("snapshots lock");
        let vm_of = |s: &VMSnapshot| s.status.as_ref().map(|s| s.vm_uid.clone());
        for (uid, snapshot) in snapshots {
            if items.get(uid) != Some(snapshot) {
                if let Some(vm) = vm_of(snapshot) {
                    let _ = self.wake.send(vm);
                }
            }
        }
        for (uid, gone) in items.iter() {
            if !snapshots.contains_key(uid) {
                if let Some(vm) = vm_of(gone) {
                    let _ = self.wake.send(vm);
                }
            }
        }
        *items = snapshots.clone();
        self.listed.store(true, Ordering::Release);
    }

    /// The snapshots of the VM `vm_uid`, oldest first.
    pub fn of_vm(&self, vm_uid: &str) -> Vec<VMSnapshot> {
        let items = self.items.lock().expect("snapshots lock");
        let mut of: Vec<VMSnapshot> = items
            .values()
            .filter(|s| s.status.as_ref().is_some_and(|st| st.vm_uid == vm_uid))
            .cloned()
            .collect();
        of.sort_by(|a, b| {
            (a.metadata.creation_timestamp, &a.metadata.name)
                .cmp(&(b.metadata.creation_timestamp, &b.metadata.name))
        });
        of
    }

    /// Whether a VM snapshot keeps the file `path` (a volume's frozen file); None until the
    /// snapshots have been listed (nothing may be concluded before).
    pub fn keeps(&self, path: &str) -> Option<bool> {
        if !self.listed.load(Ordering::Acquire) {
            return None;
        }
        let items = self.items.lock().expect("snapshots lock");
        Some(items.values().any(|s| {
            s.status
                .iter()
                .flat_map(|st| &st.disks)
                .any(|d| d.path == path)
        }))
    }
}

/// Follows the VM snapshots placed on this node until the task is aborted.
pub async fn follow(ctx: Arc<Context>) {
    let params = ListParams {
        field_selector: Some(format!("status.node={}", ctx.node)),
        ..Default::default()
    };
    let kind = lookup("vmsnapshot").expect("registered");
    let mut seen = follow_selected(ctx.client.clone(), kind, params);
    let mut mirror = Mirror::<VMSnapshot>::new(|s: &VMSnapshot| s.metadata.uid.clone());
    while let Some(got) = seen.recv().await {
        mirror.apply(got);
        if mirror.listed {
            ctx.vm_snapshots.update(&mirror.items);
        }
    }
}

/// The VM's current root file's name (in its directory).
pub async fn active_root(dir: &Path) -> String {
    match tokio::fs::read_to_string(dir.join(ROOT_RECORD)).await {
        Ok(name)
            if name.trim().starts_with(ROOT)
                && flotilla_storage::check_name(name.trim()).is_ok() =>
        {
            name.trim().to_string()
        }
        _ => ROOT.to_string(),
    }
}

async fn record_root(dir: &Path, name: &str) -> Result<(), String> {
    crate::datadir::write_file(&dir.join(ROOT_RECORD), name.as_bytes().to_vec(), 0o644)
        .await
        .map_err(|e| e.to_string())
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The VM a snapshot step works on: its object, its domain's uid, its directory, whether it
/// has a root disk, and its volumes as resolved for its definition.
pub struct Subject<'a> {
    pub vm: &'a VirtualMachine,
    pub uid: &'a str,
    pub dir: &'a Path,
    pub has_root: bool,
    pub volumes: &'a [VolumeDisk],
}

/// One disk of the VM, as a snapshot step sees it.
struct Part {
    /// `root` or the disk's name in `spec.disks`.
    name: String,
    /// The volume (None for the root disk).
    volume: Option<Volume>,
    pool: DirPool,
    /// Its current file.
    active: VolumeInfo,
    /// What names files of its own (`root`, or the volume's uid).
    stem: String,
}

impl Part {
    fn file(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.stem)
    }

    /// Records `file` as the disk's current file.
    async fn switch(&self, ctx: &Context, dir: &Path, file: &VolumeInfo) -> Result<(), String> {
        match &self.volume {
            None => record_root(dir, &file.name).await,
            Some(volume) => crate::snapshots::switch_volume(ctx, volume, file, json!({})).await,
        }
    }

    /// Where the running domain has this disk (its device name and file).
    fn live<'a>(&self, live: &'a [LiveDisk]) -> Option<&'a LiveDisk> {
        live.iter().find(|d| match &self.volume {
            Some(v) => d.volume.as_deref() == Some(v.metadata.name.as_str()),
            None => d.volume.is_none() && d.target == "vda",
        })
    }
}

/// The VM's disks: its root disk (if it has one) and its volumes, each with its current file.
async fn parts(ctx: &Context, subject: &Subject<'_>) -> Result<Vec<Part>, String> {
    let (vm, dir, has_root, volumes) = (subject.vm, subject.dir, subject.has_root, subject.volumes);
    let mut parts = Vec::new();
    if has_root {
        let pool = DirPool::open(dir).map_err(text)?;
        let active = pool.info(&active_root(dir).await).await.map_err(text)?;
        parts.push(Part {
            name: ROOT.into(),
            volume: None,
            pool,
            active,
            stem: ROOT.into(),
        });
    }
    let project = vm.metadata.namespace.as_deref().unwrap_or("default");
    for disk in volumes {
        let Some(volume) = volume(ctx, project, &disk.volume).await? else {
            return Err(format!("volume {:?} is gone", disk.volume));
        };
        let name = vm
            .spec
            .disks
            .iter()
            .find(|d| d.volume == disk.volume)
            .map(|d| d.name.clone())
            .unwrap_or_else(|| disk.volume.clone());
        parts.push(volume_part(volume, name).await?);
    }
    Ok(parts)
}

/// Volume `name` of `project` as the API has it now (None when it is gone).
async fn volume(ctx: &Context, project: &str, name: &str) -> Result<Option<Volume>, String> {
    let kind = lookup("volume").expect("registered");
    match ctx.client.get(kind, Some(project), name).await {
        Ok(v) => serde_json::from_value(v).map(Some).map_err(text),
        Err(e) if e.code() == Some(404) => Ok(None),
        Err(e) => Err(text(e)),
    }
}

async fn volume_part(volume: Volume, name: String) -> Result<Part, String> {
    let path = PathBuf::from(volume.status.clone().unwrap_or_default().path);
    let pool = DirPool::open(path.parent().unwrap_or(Path::new("/"))).map_err(text)?;
    let active = pool.info(&volume_name(&path)).await.map_err(text)?;
    Ok(Part {
        name,
        stem: volume.metadata.uid.clone().unwrap_or_default(),
        volume: Some(volume),
        pool,
        active,
    })
}

/// The file `name` of `pool` as a fresh overlay of `under` (made unless there).
async fn overlay(pool: &DirPool, name: &str, under: &VolumeInfo) -> Result<VolumeInfo, String> {
    match pool.info(name).await {
        Ok(made) => Ok(made),
        Err(StorageError::NotFound(_)) => pool
            .create(&NewVolume {
                name: name.to_string(),
                format: Format::Qcow2,
                size: under.virtual_size,
                source: Source::Clone {
                    from: under.path.clone(),
                    format: under.format,
                    linked: true,
                },
            })
            .await
            .map_err(text),
        Err(e) => Err(text(e)),
    }
}

async fn report(ctx: &Context, snapshot: &VMSnapshot, patch: serde_json::Value) {
    let kind = lookup("vmsnapshot").expect("registered");
    let ns = snapshot.metadata.namespace.clone().unwrap_or_default();
    if let Err(e) = ctx
        .client
        .patch(kind, Some(&ns), &snapshot.metadata.name, &patch, true)
        .await
    {
        tracing::warn!(snapshot = %snapshot.metadata.name, error = %e, "cannot report a VM snapshot");
    }
}

/// The snapshot as the API has it now (same uid), or None when it is gone.
async fn fresh(ctx: &Context, snapshot: &VMSnapshot) -> Option<VMSnapshot> {
    let kind = lookup("vmsnapshot").expect("registered");
    let now = ctx
        .client
        .get(
            kind,
            snapshot.metadata.namespace.as_deref(),
            &snapshot.metadata.name,
        )
        .await
        .ok()?;
    let now: VMSnapshot = serde_json::from_value(now).ok()?;
    (now.metadata.uid == snapshot.metadata.uid).then_some(now)
}

/// Carries out what the VM's snapshots ask (deletions newest first, then new ones oldest
/// first) and a revert its annotation asks for; returns whether a disk moved to another file
/// (the caller reads the disks again). A snapshot's own failure is reported on it; a revert's
/// fails the VM's reconcile.
pub async fn reconcile(ctx: &Context, subject: &Subject<'_>) -> Result<bool, AgentError> {
    let vm = subject.vm;
    let snapshots = ctx.vm_snapshots.of_vm(subject.uid);
    let mut moved = false;
    let deleting = snapshots
        .iter()
        .rev()
        .filter(|s| s.metadata.deletion_timestamp.is_some());
    let taking = snapshots.iter().filter(|s| {
        s.metadata.deletion_timestamp.is_none()
            && s.status.as_ref().is_none_or(|st| st.phase != "Ready")
    });
    for snapshot in deleting.chain(taking).cloned().collect::<Vec<_>>() {
        let Some(snapshot) = fresh(ctx, &snapshot).await else {
            continue;
        };
        let result = if snapshot.metadata.deletion_timestamp.is_some() {
            delete(ctx, subject, &snapshot).await
        } else {
            take(ctx, subject, &snapshot).await
        };
        match result {
            Ok(m) => moved |= m,
            Err(message) => {
                let status = snapshot.status.clone().unwrap_or_default();
                if status.message != message {
                    tracing::warn!(snapshot = %snapshot.metadata.name, %message, "cannot carry out a VM snapshot step; retrying");
                    report(ctx, &snapshot, json!({"status": {"message": message}})).await;
                }
            }
        }
    }
    // A revert that cannot be carried out says why and blocks nothing else of the VM.
    match revert(ctx, subject, &snapshots).await {
        Ok(m) => moved |= m,
        Err(AgentError::Config(message)) => {
            tracing::warn!(vm = %vm.metadata.name, %message, "cannot revert");
            crate::vm::event(ctx, vm, EventType::Warning, "RevertFailed", &message).await;
        }
        Err(e) => return Err(e),
    }
    Ok(moved)
}

/// Takes `snapshot` (or finishes taking it).
async fn take(ctx: &Context, subject: &Subject<'_>, snapshot: &VMSnapshot) -> Result<bool, String> {
    let (vm, uid, dir) = (subject.vm, subject.uid, subject.dir);
    if !snapshot.metadata.finalizers.iter().any(|f| f == FINALIZER) {
        // Before any file is made, so that a deletion cannot leave one behind.
        set_finalizer(ctx, snapshot, true).await?;
    }
    let suid = snapshot.metadata.uid.clone().unwrap_or_default();
    let parts = parts(ctx, subject).await?;
    if parts.is_empty() {
        return Err("the VM has no disk to snapshot".into());
    }
    let live = ctx.libvirt.live_disks(uid).await.map_err(text)?;
    let mut overlays = Vec::new();
    let mut disks = Vec::new();
    for part in &parts {
        let name = part.file(&suid);
        let recorded = part.active.name == name;
        let overlay_path = part.pool.path(&name, Format::Qcow2);
        let switched = recorded
            || live
                .as_deref()
                .and_then(|l| part.live(l))
                .and_then(|d| d.source.as_deref())
                == Some(overlay_path.to_str().unwrap_or_default());
        // What freezes: the file under the overlay once switched, else the current one.
        let frozen = if switched {
            let on = pool_info(&part.pool, &overlay_path).await?;
            let Some(backing) = on.backing else {
                return Err(format!("the overlay {name} has no backing file"));
            };
            pool_info(&part.pool, &backing).await?
        } else {
            part.active.clone()
        };
        let made = overlay(&part.pool, &name, &frozen).await?;
        overlays.push((part, made, recorded, switched));
        disks.push(VMSnapshotDisk {
            name: part.name.clone(),
            volume: part.volume.as_ref().map(|v| v.metadata.name.clone()),
            target: live
                .as_deref()
                .and_then(|l| part.live(l))
                .map(|d| d.target.clone())
                .unwrap_or_default(),
            path: frozen.path.display().to_string(),
            size: frozen.virtual_size,
        });
    }
    let memory_file = dir.join(format!("{suid}.mem"));
    let mut with_memory = false;
    if let Some(live) = &live {
        with_memory = snapshot.spec.memory;
        if overlays.iter().any(|(_, _, _, switched)| !switched) {
            let mut targets = Vec::new();
            for (part, made, _, _) in &overlays {
                let Some(disk) = part.live(live) else {
                    return Err(format!(
                        "disk {:?} is not in the running domain yet",
                        part.name
                    ));
                };
                targets.push((disk.target.clone(), made.path.display().to_string()));
            }
            // A memory file a cut-short attempt left is written again.
            let _ = tokio::fs::remove_file(&memory_file).await;
            ctx.libvirt
                .snapshot_domain(
                    uid,
                    targets,
                    with_memory.then(|| memory_file.display().to_string()),
                )
                .await
                .map_err(|e| format!("the running guest could not be snapshotted: {e}"))?;
        }
    }
    let mut moved = false;
    for (part, made, recorded, _) in &overlays {
        if !recorded {
            part.switch(ctx, dir, made).await?;
            moved = true;
        }
    }
    let state = if live.is_some() { "Running" } else { "Stopped" };
    tracing::info!(vm = %vm.metadata.name, snapshot = %snapshot.metadata.name, state, memory = with_memory, "took a VM snapshot");
    let memory_path = if with_memory {
        memory_file.display().to_string()
    } else {
        String::new()
    };
    report(
        ctx,
        snapshot,
        json!({"status": {"phase": "Ready", "vmState": state, "memoryPath": memory_path,
                          "disks": disks, "message": ""}}),
    )
    .await;
    let message = format!(
        "snapshot {:?} taken ({} disk(s){})",
        snapshot.metadata.name,
        disks.len(),
        if with_memory { " and memory" } else { "" }
    );
    crate::vm::event(ctx, vm, EventType::Normal, "Snapshotted", &message).await;
    Ok(moved)
}

async fn pool_info(pool: &DirPool, path: &Path) -> Result<VolumeInfo, String> {
    pool.info(&volume_name(path)).await.map_err(text)
}

/// Merges `snapshot`'s files away, removes its memory file, and lets the object go.
async fn delete(
    ctx: &Context,
    subject: &Subject<'_>,
    snapshot: &VMSnapshot,
) -> Result<bool, String> {
    let (vm, dir) = (subject.vm, subject.dir);
    if !snapshot.metadata.finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(false);
    }
    let status = snapshot.status.clone().unwrap_or_default();
    let suid = snapshot.metadata.uid.clone().unwrap_or_default();
    let parts = parts(ctx, subject).await?;
    let mut moved = false;
    for disk in &status.disks {
        let part = part_of(&parts, disk);
        // A volume detached since: its own lock (not the VM's to hold), not waited for long —
        // a VM attaching it may hold it while waiting for this VM's.
        let (_held, detached);
        let part = match (part, &disk.volume) {
            (Some(part), _) => part,
            (None, None) => continue,
            (None, Some(name)) => {
                let project = vm.metadata.namespace.as_deref().unwrap_or("default");
                let lock = ctx.volumes.lock(project, [name.clone()]);
                _held = tokio::time::timeout(std::time::Duration::from_secs(5), lock)
                    .await
                    .map_err(|_| format!("volume {name:?} is busy; trying again"))?;
                // Gone: its files went with it.
                let Some(v) = volume(ctx, project, name).await? else {
                    continue;
                };
                detached = volume_part(v, disk.name.clone()).await?;
                &detached
            }
        };
        let active = part.active.path.display().to_string();
        if let Some(base) =
            crate::snapshots::merge_away(ctx, &part.pool, &disk.path, &active).await?
        {
            part.switch(ctx, dir, &base).await?;
            part.pool.delete(&part.active.name).await.map_err(text)?;
            moved = true;
        }
    }
    // What a cut-short take left: its root overlay, never recorded, and its memory.
    if let Some(root) = parts.iter().find(|p| p.volume.is_none()) {
        let name = root.file(&suid);
        if root.active.name != name {
            root.pool.delete(&name).await.map_err(text)?;
        }
    }
    match tokio::fs::remove_file(dir.join(format!("{suid}.mem"))).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(text(e)),
        _ => {}
    }
    set_finalizer(ctx, snapshot, false).await?;
    tracing::info!(vm = %vm.metadata.name, snapshot = %snapshot.metadata.name, "deleted a VM snapshot");
    Ok(moved)
}

/// Adds the agent's finalizer to `snapshot`, or takes it off, on the version read (a newer
/// one makes this a conflict, and the step is taken again).
async fn set_finalizer(ctx: &Context, snapshot: &VMSnapshot, present: bool) -> Result<(), String> {
    let kind = lookup("vmsnapshot").expect("registered");
    let ns = snapshot.metadata.namespace.clone().unwrap_or_default();
    let mut finalizers: Vec<String> = snapshot
        .metadata
        .finalizers
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.into());
    }
    let patch = json!({"metadata": {"finalizers": finalizers,
                                    "resourceVersion": snapshot.metadata.resource_version}});
    ctx.client
        .patch(kind, Some(&ns), &snapshot.metadata.name, &patch, false)
        .await
        .map(drop)
        .map_err(|e| format!("cannot change the agent's finalizer: {e}"))
}

/// The part of `parts` that is the snapshot's `disk`: the root disk, or the same volume.
fn part_of<'p>(parts: &'p [Part], disk: &VMSnapshotDisk) -> Option<&'p Part> {
    parts.iter().find(|p| match (&p.volume, &disk.volume) {
        (None, None) => true,
        (Some(v), Some(name)) => v.metadata.name == *name,
        _ => false,
    })
}

/// Carries out a revert the VM's annotation asks for and its status has not recorded.
async fn revert(
    ctx: &Context,
    subject: &Subject<'_>,
    snapshots: &[VMSnapshot],
) -> Result<bool, AgentError> {
    let (vm, uid, dir) = (subject.vm, subject.uid, subject.dir);
    let Some(request) = vm.metadata.annotations.get(REVERT_ANNOTATION) else {
        return Ok(false);
    };
    let status = vm.status.clone().unwrap_or_default();
    if status.last_revert.as_deref() == Some(request.as_str()) {
        return Ok(false);
    }
    let fail = |m: String| AgentError::Config(m);
    let wanted = request.split_whitespace().next().unwrap_or_default();
    let Some(snapshot) = snapshots.iter().find(|s| s.metadata.name == wanted) else {
        return Err(fail(format!(
            "cannot revert to {wanted:?}: the VM has no such snapshot"
        )));
    };
    let taken = snapshot.status.clone().unwrap_or_default();
    if taken.phase != "Ready" {
        return Err(fail(format!(
            "cannot revert to {wanted:?} yet: the snapshot is not Ready"
        )));
    }
    // The declared power state wins: a VM meant to be stopped gets its disks back and stays
    // stopped (its guest is not resumed only to be shut down).
    let memory =
        !taken.memory_path.is_empty() && vm.spec.power_state == flotilla_types::PowerState::Running;
    let parts = parts(ctx, subject).await.map_err(fail)?;
    // Every disk of the snapshot must be a disk of the VM now (and, with memory, no other:
    // the guest resumes with the devices it had).
    let mut plan = Vec::new();
    for disk in &taken.disks {
        let part = part_of(&parts, disk);
        let Some(part) = part else {
            return Err(fail(format!(
                "cannot revert to {wanted:?}: its disk {:?} (volume {:?}) is not attached to the VM; attach it again first",
                disk.name,
                disk.volume.clone().unwrap_or_default()
            )));
        };
        plan.push((part, disk));
    }
    if memory && parts.len() != plan.len() {
        let extra: Vec<&str> = parts
            .iter()
            .filter(|p| !plan.iter().any(|(q, _)| std::ptr::eq(*q, *p)))
            .map(|p| p.name.as_str())
            .collect();
        return Err(fail(format!(
            "cannot revert to {wanted:?} with its memory: the VM has disks it did not have then ({}); detach them first",
            extra.join(", ")
        )));
    }
    let digest = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(request.as_bytes())[..6])
    };
    let fresh_name = |part: &Part| part.file(&format!("r{digest}"));
    let running = ctx.libvirt.state(uid).await? == Some(DomainState::Running);
    let switched = plan.iter().all(|(p, _)| p.active.name == fresh_name(p));
    if !(running && switched) {
        // Not reverted yet, or cut short before the guest ran again.
        if running {
            ctx.libvirt.destroy(uid).await?;
        }
        let mut files = Vec::new();
        for (part, disk) in &plan {
            let frozen = pool_info(&part.pool, Path::new(&disk.path))
                .await
                .map_err(fail)?;
            let made = overlay(&part.pool, &fresh_name(part), &frozen)
                .await
                .map_err(fail)?;
            part.switch(ctx, dir, &made).await.map_err(fail)?;
            files.push((disk.target.clone(), made.path.display().to_string()));
        }
        if memory {
            let saved = ctx.libvirt.saved_xml(&taken.memory_path).await?;
            let xml = retarget(&saved, &files)?;
            ctx.libvirt.restore(&taken.memory_path, &xml).await?;
        }
        // The files reverted away from, unless a snapshot holds them (the root's here; the
        // volumes' with their strays).
        for (part, _) in plan.iter().filter(|(p, _)| p.volume.is_none()) {
            let old = part.active.path.display().to_string();
            let held = taken.disks.iter().any(|d| d.path == old)
                || snapshots
                    .iter()
                    .flat_map(|s| s.status.iter().flat_map(|st| &st.disks))
                    .any(|d| d.path == old);
            if !held && part.active.name != fresh_name(part) {
                if let Err(e) = part.pool.delete(&part.active.name).await {
                    tracing::warn!(file = %old, error = %e, "cannot remove a root file reverted away from");
                }
            }
        }
    }
    let kind = lookup("vm").expect("registered");
    let ns = vm.metadata.namespace.clone().unwrap_or_default();
    ctx.client
        .patch(
            kind,
            Some(&ns),
            &vm.metadata.name,
            &json!({"status": {"lastRevert": request}}),
            true,
        )
        .await?;
    let message = format!(
        "reverted to snapshot {wanted:?}{}",
        if memory {
            ": the guest resumed where it was"
        } else {
            " (its disks; the guest boots from them)"
        }
    );
    tracing::info!(vm = %vm.metadata.name, snapshot = wanted, memory, "reverted a VM to a snapshot");
    crate::vm::event(ctx, vm, EventType::Normal, "Reverted", &message).await;
    Ok(true)
}

/// Makes the root disk `dest` of a VM cloned from another's (`spec.rootDisk.source`), unless
/// made already: an overlay of a snapshot's frozen root file (linked), or a copy of every byte
/// of it or of a stopped VM's current root (full, in the node's disk queue), grown to `size`.
pub async fn clone_root(
    ctx: &Context,
    vm: &VirtualMachine,
    source: &flotilla_types::kinds::RootDiskSource,
    dest: &Path,
    size: Option<u128>,
) -> Result<(), AgentError> {
    if tokio::fs::try_exists(dest).await.unwrap_or(false) {
        return Ok(());
    }
    let project = vm.metadata.namespace.as_deref().unwrap_or("default");
    let fail = AgentError::Config;
    let from = match (&source.vm_snapshot, &source.vm) {
        (Some(name), _) => {
            let kind = lookup("vmsnapshot").expect("registered");
            let snapshot: VMSnapshot =
                serde_json::from_value(ctx.client.get(kind, Some(project), name).await?)
                    .map_err(|e| fail(format!("the VMSnapshot cannot be read: {e}")))?;
            let status = snapshot.status.unwrap_or_default();
            let root = status.disks.iter().find(|d| d.volume.is_none());
            match root {
                Some(root) if status.phase == "Ready" => PathBuf::from(&root.path),
                _ => {
                    return Err(fail(format!(
                        "snapshot {name:?} has no root disk ready to clone"
                    )))
                }
            }
        }
        (None, Some(name)) => {
            let kind = lookup("vm").expect("registered");
            let other: VirtualMachine =
                serde_json::from_value(ctx.client.get(kind, Some(project), name).await?)
                    .map_err(|e| fail(format!("the VM cannot be read: {e}")))?;
            let other_uid = other.metadata.uid.clone().unwrap_or_default();
            if ctx
                .libvirt
                .state(&other_uid)
                .await?
                .is_some_and(|s| s != DomainState::Stopped)
            {
                return Err(fail(format!(
                    "VM {name:?} must be stopped for its root disk to be copied"
                )));
            }
            let dir = ctx.vm_dir(&other_uid);
            dir.join(format!("{}.qcow2", active_root(&dir).await))
        }
        (None, None) => return Err(fail("rootDisk.source names nothing".into())),
    };
    let storage = |e: StorageError| fail(e.to_string());
    if source.mode == flotilla_types::kinds::CloneMode::Linked {
        return ctx.disks.create_root_disk(Some(&from), dest, size).await;
    }
    let _permit = ctx.disks.queued().await;
    let tmp = flotilla_files::temp_path(dest);
    let copied = async {
        flotilla_storage::qemu_img::convert(&from, Format::Qcow2, &tmp, Format::Qcow2).await?;
        let info = flotilla_storage::qemu_img::info(&tmp).await?;
        match size.and_then(|s| u64::try_from(s).ok()) {
            Some(size) if size > info.virtual_size => {
                flotilla_storage::qemu_img::resize(&tmp, Format::Qcow2, size).await
            }
            _ => Ok(()),
        }
    };
    if let Err(e) = copied.await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(storage(e));
    }
    tokio::fs::rename(&tmp, dest)
        .await
        .map_err(crate::error::io(dest))?;
    tracing::info!(vm = %vm.metadata.name, from = %from.display(), "copied a root disk");
    Ok(())
}

/// The definition a memory image was saved with, its disks `files` (device name, file)
/// pointed at the files given, and every `<backingStore>` under them dropped: libvirt reads
/// the chain from the files (an empty `<backingStore/>` would mean "no backing file").
pub fn retarget(saved: &str, files: &[(String, String)]) -> Result<String, AgentError> {
    let doc = roxmltree::Document::parse(saved)
        .map_err(|e| AgentError::Libvirt(format!("the saved definition is not XML: {e}")))?;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for disk in doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some("disk"))
    {
        let target = disk
            .children()
            .find(|c| c.has_tag_name("target"))
            .and_then(|t| t.attribute("dev"))
            .unwrap_or_default();
        let Some((_, file)) = files.iter().find(|(t, _)| t == target) else {
            continue;
        };
        let Some(source) = disk
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(|s| s.attributes().find(|a| a.name() == "file"))
        else {
            return Err(AgentError::Libvirt(format!(
                "disk {target} of the saved definition has no file"
            )));
        };
        edits.push((source.range_value(), crate::xml::escape(file)));
        for store in disk.children().filter(|c| c.has_tag_name("backingStore")) {
            edits.push((store.range(), String::new()));
        }
    }
    if edits.len() < files.len() {
        return Err(AgentError::Libvirt(
            "the saved definition lacks a disk of the snapshot".into(),
        ));
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut xml = saved.to_string();
    for (range, with) in edits {
        xml.replace_range(range, &with);
    }
    Ok(xml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retarget_points_disks_at_new_files_and_drops_their_chains() {
        let saved = r#"<domain type='qemu'><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d/root.qcow2'/><backingStore type='file'><format type='qcow2'/><source file='/images/base.qcow2'/><backingStore/></backingStore><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><source file='/p/vol.qcow2'/><backingStore/><target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='/d/seed.iso'/><target dev='sda' bus='sata'/></disk>
</devices></domain>"#;
        let files = vec![
            ("vda".to_string(), "/d/root.rab&c.qcow2".to_string()),
            ("vdb".to_string(), "/p/vol.r1.qcow2".to_string()),
        ];
        let xml = retarget(saved, &files).unwrap();
        assert!(!xml.contains("backingStore"), "{xml}");
        assert!(xml.contains("file='/d/root.rab&amp;c.qcow2'"), "{xml}");
        assert!(xml.contains("file='/p/vol.r1.qcow2'"), "{xml}");
        assert!(
            xml.contains("file='/d/seed.iso'"),
            "the CD-ROM is left alone: {xml}"
        );
        // Still one document, with the disks where they were.
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let disks = crate::libvirt::disks_of(&xml);
        assert_eq!(disks.len(), 2, "{xml}");
        assert_eq!(
            doc.descendants()
                .filter(|n| n.has_tag_name("target"))
                .count(),
            3
        );
    }

    #[test]
    fn retarget_refuses_a_snapshot_disk_the_image_lacks() {
        let saved = "<domain><devices><disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk></devices></domain>";
        let files = vec![("vdb".to_string(), "/b".to_string())];
        assert!(retarget(saved, &files).is_err());
    }
}
