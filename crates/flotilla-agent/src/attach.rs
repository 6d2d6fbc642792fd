//! A VM's volumes (`spec.disks`): found as files on this node, written into the domain's
//! definition, plugged into and unplugged from the running domain, reported in `status.disks`,
//! and let go of — taken off the volume's `status.attachedTo` — once the domain no longer has
//! them. A disk carries the volume's name in its alias (`ua-<volume>`), so the live XML says
//! which volume each plugged disk is, also after a crash of the agent.

use std::collections::BTreeMap;
use std::sync::Mutex;

use flotilla_types::kinds::{disk_serial, DiskBus, DiskStatus, ImageFormat, PoolType, StoragePool};
use flotilla_types::registry::lookup;
use flotilla_types::{EventType, VirtualMachine, Volume};
use serde_json::json;

use crate::domain::{disk_target, NetworkSource, VolumeDisk};
use crate::error::AgentError;
use crate::libvirt::LiveDisk;
use crate::vm::Context;

/// The volumes placed on this node as the volumes task last heard them (by uid), and a way to
/// wake the actors of the VMs a changed volume is attached to.
pub struct NodeVolumes {
    items: Mutex<BTreeMap<String, Volume>>,
    wake: tokio::sync::mpsc::UnboundedSender<String>,
    /// One lock per volume (by project and name): a VM reads a volume's file and starts its
    /// domain on it under the lock, and a snapshot, revert or merge moves the file under it, so
    /// a guest never starts on a file that has just been frozen.
    locks: Mutex<BTreeMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

/// What holds volumes' locks until dropped.
pub type Held = Vec<tokio::sync::OwnedMutexGuard<()>>;

impl NodeVolumes {
    pub fn new(wake: tokio::sync::mpsc::UnboundedSender<String>) -> Self {
        NodeVolumes {
            items: Default::default(),
            wake,
            locks: Default::default(),
        }
    }

    /// Takes the locks of the named volumes of `project`, in one order (no two holders wait
    /// on each other).
    pub async fn lock(&self, project: &str, names: impl IntoIterator<Item = String>) -> Held {
        let mut keys: Vec<String> = names
            .into_iter()
            .map(|n| format!("{project}/{n}"))
            .collect();
        keys.sort();
        keys.dedup();
        let mut held = Vec::new();
        for key in keys {
            let lock = {
                let mut locks = self.locks.lock().expect("locks lock");
                // Locks nobody holds or waits for are dropped as others are made.
                locks.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
                locks.entry(key).or_default().clone()
            };
            held.push(lock.lock_owned().await);
        }
        held
    }

    /// Takes in the volumes now known; wakes the VMs attached to those that changed.
    pub fn update(&self, volumes: &BTreeMap<String, Volume>) {
        let mut items = self.items.lock().expect("volumes lock");
        for (uid, volume) in volumes {
            if items.get(uid) != Some(volume) {
                let attached = volume.status.iter().flat_map(|s| &s.attached_to);
                for holder in attached {
                    let _ = self.wake.send(holder.uid.clone());
                }
            }
        }
        *items = volumes.clone();
    }

    /// The volume with `uid` placed on this node, as last heard.
    pub fn by_uid(&self, uid: &str) -> Option<Volume> {
        self.items.lock().expect("volumes lock").get(uid).cloned()
    }

    /// The names of the volumes (of `project`) whose attachments list the VM `uid`.
    fn held_by(&self, project: &str, uid: &str) -> Vec<String> {
        let items = self.items.lock().expect("volumes lock");
        items
            .values()
            .filter(|v| v.metadata.namespace.as_deref() == Some(project))
            .filter(|v| {
                v.status
                    .iter()
                    .flat_map(|s| &s.attached_to)
                    .any(|h| h.uid == uid)
            })
            .map(|v| v.metadata.name.clone())
            .collect()
    }
}

/// The VM's volumes as disks of its definition, in `spec.disks` order (virtio disks from vdb,
/// SCSI disks from sdb: vda is the root disk, sda the seed); Err while one is not ready here.
pub async fn resolve(ctx: &Context, vm: &VirtualMachine) -> Result<Vec<VolumeDisk>, AgentError> {
    let kind = lookup("volume").expect("registered");
    let project = vm.metadata.namespace.as_deref().unwrap_or("default");
    let uid = vm.metadata.uid.as_deref().unwrap_or_default();
    let (mut virtio, mut scsi) = (0, 0);
    let mut disks = Vec::new();
    for disk in &vm.spec.disks {
        let not_here = || {
            AgentError::Config(format!(
                "volume {:?} of disk {:?} is not on node {}",
                disk.volume, disk.name, ctx.node
            ))
        };
        let volume: Volume = match ctx.client.get(kind, Some(project), &disk.volume).await {
            Ok(v) => serde_json::from_value(v)
                .map_err(|e| AgentError::Config(format!("the Volume cannot be read: {e}")))?,
            // A node reads only the volumes placed on it.
            Err(e) if matches!(e.code(), Some(403) | Some(404)) => return Err(not_here()),
            Err(e) => return Err(e.into()),
        };
        let status = volume.status.clone().unwrap_or_default();
        if status.node.as_deref() != Some(ctx.node.as_str()) {
            return Err(not_here());
        }
        if status.phase != "Available" || status.path.is_empty() {
            let why = if status.message.is_empty() {
                String::new()
            } else {
                format!(": {}", status.message)
            };
            return Err(AgentError::Config(format!(
                "volume {:?} is not available yet ({}{why})",
                disk.volume,
                if status.phase.is_empty() {
                    "Pending"
                } else {
                    &status.phase
                }
            )));
        }
        if !status.attached_to.iter().any(|h| h.uid == uid) {
            return Err(AgentError::Config(format!(
                "volume {:?} does not list this VM in status.attachedTo",
                disk.volume
            )));
        }
        let network = match status.shared {
            true => Some(network_source(ctx, &volume, &status.path).await?),
            false => None,
        };
        let is_virtio = disk.bus == DiskBus::Virtio;
        let target = if is_virtio {
            virtio += 1;
            disk_target("vd", virtio)
        } else {
            scsi += 1;
            disk_target("sd", scsi)
        };
        disks.push(VolumeDisk {
            volume: disk.volume.clone(),
            path: status.path.clone().into(),
            format: match volume.spec.format {
                ImageFormat::Qcow2 => "qcow2",
                ImageFormat::Raw => "raw",
            },
            virtio: is_virtio,
            target,
            serial: disk
                .serial
                .clone()
                .unwrap_or_else(|| disk_serial(volume.metadata.uid.as_deref().unwrap_or_default())),
            read_only: disk.read_only,
            shareable: volume.spec.shareable,
            network,
        });
    }
    Ok(disks)
}

/// The network disk of a volume in a shared pool, by the pool's type: an RBD image
/// (`path` is `rbd:pool/name`; the pool's monitors and user, and the libvirt secret with this
/// node's key, defined now if it is not yet), an iSCSI LUN (the pool's target, with its
/// initiator name), or a file on an NFS export (opened as the pool's user and group).
async fn network_source(
    ctx: &Context,
    volume: &Volume,
    path: &str,
) -> Result<NetworkSource, AgentError> {
    let pools = lookup("storagepool").expect("registered");
    let pool: StoragePool = ctx
        .client
        .get(pools, None, &volume.spec.pool)
        .await
        .map_err(AgentError::from)
        .and_then(|v| serde_json::from_value(v).map_err(|e| AgentError::Config(e.to_string())))?;
    let source = |protocol, name, hosts| NetworkSource {
        protocol,
        name,
        hosts,
        auth: None,
        initiator: None,
        identity: None,
    };
    match pool.spec.pool_type {
        PoolType::Rbd => {
            let rbd = crate::pools::rbd_pool(&pool).map_err(AgentError::Config)?;
            let secret = crate::pools::rbd_secret(ctx, &pool, &rbd)
                .await
                .map_err(AgentError::Config)?;
            let image = path.strip_prefix("rbd:").unwrap_or(path).to_string();
            Ok(NetworkSource {
                auth: Some((rbd.config().user.clone(), secret)),
                ..source("rbd", image, rbd.config().monitors.clone())
            })
        }
        PoolType::Iscsi => {
            let iscsi = crate::pools::iscsi_pool(&pool).map_err(AgentError::Config)?;
            let lun = volume.spec.lun.unwrap_or_default();
            let name = format!("{}/{lun}", iscsi.config().target);
            Ok(NetworkSource {
                initiator: iscsi.config().initiator.clone(),
                ..source("iscsi", name, vec![iscsi.portal()])
            })
        }
        PoolType::Nfs => {
            let nfs = crate::pools::nfs_pool(&pool).map_err(AgentError::Config)?;
            let file = nfs.path(&crate::shared_volumes::file_name(volume));
            let (uid, gid) = (nfs.config().uid, nfs.config().gid);
            Ok(NetworkSource {
                identity: Some((format!("+{uid}"), format!("+{gid}"))),
                ..source("nfs", file, vec![nfs.config().server.clone()])
            })
        }
        PoolType::Dir | PoolType::Lvm => Err(AgentError::Config(format!(
            "volume {:?} says it is shared, but pool {:?} is node-local",
            volume.metadata.name, volume.spec.pool
        ))),
    }
}

/// Plugs the wanted volumes the running domain lacks and asks it to unplug those it has but
/// should not; nothing when it is not running (its definition has the wanted ones).
pub async fn plug(
    ctx: &Context,
    vm: &VirtualMachine,
    domain: &str,
    wanted: &[VolumeDisk],
) -> Result<(), AgentError> {
    let Some(live) = ctx.libvirt.live_disks(domain).await? else {
        return Ok(());
    };
    let has = |volume: &str| live.iter().any(|d| d.volume.as_deref() == Some(volume));
    let mut taken: Vec<String> = live.iter().map(|d| d.target.clone()).collect();
    for disk in wanted.iter().filter(|d| !has(&d.volume)) {
        // The definition's name may be taken in the running domain: the first free one.
        let prefix = if disk.virtio { "vd" } else { "sd" };
        let target = (1..)
            .map(|i| disk_target(prefix, i))
            .find(|t| !taken.contains(t))
            .expect("an unbounded search finds a name");
        taken.push(target.clone());
        let plugged = VolumeDisk {
            target,
            ..disk.clone()
        };
        ctx.libvirt
            .attach_live(domain, plugged.to_xml())
            .await
            .map_err(|e| {
                let hint = if e.to_string().contains("PCI") {
                    " (no free PCIe slot: stop and start the VM to get more)"
                } else {
                    ""
                };
                AgentError::Libvirt(format!("cannot plug volume {:?}: {e}{hint}", disk.volume))
            })?;
        tracing::info!(vm = %vm.metadata.name, volume = %disk.volume, target = %plugged.target, "plugged a volume");
        let message = format!("volume {:?} plugged in as {}", disk.volume, plugged.target);
        crate::vm::event(ctx, vm, EventType::Normal, "DiskAttached", &message).await;
    }
    for disk in live.iter().filter(|d| {
        d.volume
            .as_deref()
            .is_some_and(|v| !wanted.iter().any(|w| w.volume == v))
    }) {
        ctx.libvirt.detach_live(domain, unplug_xml(disk)).await?;
        tracing::info!(vm = %vm.metadata.name, volume = ?disk.volume, "asked the guest to let go of a volume");
    }
    Ok(())
}

/// The XML that names a plugged disk for libvirt to unplug.
fn unplug_xml(disk: &LiveDisk) -> String {
    use crate::xml::Element;
    Element::new("disk")
        .attr("type", "file")
        .attr("device", "disk")
        // libvirt finds the disk by its target; a network disk's name is no file to name.
        .children(
            disk.source
                .as_ref()
                .filter(|s| s.starts_with('/'))
                .map(|s| Element::new("source").attr("file", s)),
        )
        .child(
            Element::new("target")
                .attr("dev", &disk.target)
                .attr("bus", &disk.bus),
        )
        .render()
}

/// The volumes the domain has (live when it runs, else defined), for `status.disks`.
pub async fn status(
    ctx: &Context,
    vm: &VirtualMachine,
    domain: &str,
    running: bool,
) -> Result<Vec<DiskStatus>, AgentError> {
    let Some(xml) = ctx.libvirt.xml(domain).await? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for disk in crate::libvirt::disks_of(&xml) {
        let Some(volume) = disk.volume else { continue };
        let entry = vm.spec.disks.iter().find(|d| d.volume == volume);
        let state = match (running, entry) {
            (false, _) => "Defined",
            (true, Some(_)) => "Attached",
            (true, None) => "Detaching",
        };
        out.push(DiskStatus {
            name: entry.map(|e| e.name.clone()).unwrap_or_default(),
            volume,
            serial: disk.serial.unwrap_or_default(),
            target: disk.target,
            state: state.to_string(),
        });
    }
    Ok(out)
}

/// Lets go of the volumes (of this node) that list the VM but that it neither names nor has:
/// takes it off their `status.attachedTo`, guarded by their resourceVersion. With `all`
/// (the VM is being deleted and its domain is gone), of every volume that lists it.
pub async fn release(
    ctx: &Context,
    vm: &VirtualMachine,
    has: &[DiskStatus],
    all: bool,
) -> Result<(), AgentError> {
    let project = vm.metadata.namespace.as_deref().unwrap_or("default");
    let uid = vm.metadata.uid.as_deref().unwrap_or_default();
    let mut names = ctx.volumes.held_by(project, uid);
    // Also those the last status listed: the volumes task may not have heard of them yet.
    for d in vm.status.iter().flat_map(|s| &s.disks) {
        if !names.contains(&d.volume) {
            names.push(d.volume.clone());
        }
    }
    if !all {
        names.retain(|name| {
            !vm.spec.disks.iter().any(|d| d.volume == *name)
                && !has.iter().any(|d| d.volume == *name)
        });
        if names.is_empty() {
            // The common case, every resync of every VM: nothing to let go of, nothing to read.
            return Ok(());
        }
        // The VM as it is now: one that names a volume again since this reconcile began keeps it.
        let vms = lookup("vm").expect("registered");
        let now = match ctx.client.get(vms, Some(project), &vm.metadata.name).await {
            Ok(v) if v["metadata"]["uid"].as_str() == Some(uid) => Some(v),
            Ok(_) => None,
            Err(e) if e.code() == Some(404) => None,
            Err(e) => return Err(e.into()),
        };
        let disks = now.as_ref().and_then(|v| v["spec"]["disks"].as_array());
        names.retain(|name| {
            !disks.is_some_and(|ds| ds.iter().any(|d| d["volume"] == name.as_str()))
        });
    }
    let kind = lookup("volume").expect("registered");
    for name in names {
        for _ in 0..5 {
            let volume = match ctx.client.get(kind, Some(project), &name).await {
                Ok(v) => v,
                Err(e) if matches!(e.code(), Some(403) | Some(404)) => break,
                Err(e) => return Err(e.into()),
            };
            let holders = volume["status"]["attachedTo"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let kept: Vec<_> = holders.iter().filter(|h| h["uid"] != uid).collect();
            if kept.len() == holders.len() {
                break;
            }
            let patch = json!({"metadata": {"resourceVersion": volume["metadata"]["resourceVersion"]},
                               "status": {"attachedTo": kept}});
            match ctx
                .client
                .patch(kind, Some(project), &name, &patch, true)
                .await
            {
                Ok(_) => {
                    tracing::info!(vm = %vm.metadata.name, volume = %name, "let go of a volume");
                    let message = format!("volume {name:?} is detached");
                    crate::vm::event(ctx, vm, EventType::Normal, "DiskDetached", &message).await;
                    break;
                }
                Err(e) if e.code() == Some(409) => continue,
                Err(e) if e.code() == Some(404) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
