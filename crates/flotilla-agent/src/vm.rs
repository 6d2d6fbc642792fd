//! One VM's reconcile: make libvirt and the disk match the VM object, then report status.
//! Idempotent; safe to stop at any point and run again (crash safety rests on that).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::Client;
use flotilla_types::kinds::vm::RESTART_ANNOTATION;
use flotilla_types::registry::lookup;
use flotilla_types::{EventType, Image, Network, PowerState, VMClass, VirtualMachine};
use serde_json::{json, Value};

use crate::cloudinit::{self, SeedInput, SeedNic};
use crate::disks::Disks;
use crate::domain::{domain_name, DomainSpec, KernelBoot, Nic, VirtType};
use crate::error::{io, AgentError};
use crate::libvirt::{DomainState, Libvirt};

/// The finalizer that holds a VM object until its domain and files are gone.
pub use flotilla_types::kinds::vm::AGENT_FINALIZER as FINALIZER;

pub struct Context {
    pub client: Arc<Client>,
    pub libvirt: Libvirt,
    pub disks: Disks,
    pub node: String,
    /// The cluster's identity, written into every domain this agent defines.
    pub cluster_id: String,
    /// Records Events in the API.
    pub recorder: crate::recorder::Recorder,
    pub virt_type: VirtType,
    /// This node's overlay networks (None on the test driver, or without a tunnel address).
    pub overlays: Option<Arc<crate::overlays::Overlays>>,
    /// The DHCP and DNS servers of this node's overlay networks (with the overlays).
    pub dhcp: Option<Arc<crate::dhcp::DhcpServers>>,
    /// The metadata service of this node's overlay networks (with the DHCP servers).
    pub metadata: Option<Arc<crate::metadata::MetadataServers>>,
    /// The node's security group rules (None on the test driver, or when disabled).
    pub firewall: Option<Arc<crate::firewall::Firewall>>,
    /// Wakes the collector of unused overlays (a VM's domain was removed).
    pub unused_overlays: Arc<tokio::sync::Notify>,
    /// The volumes placed on this node, as the volumes task hears them.
    pub volumes: Arc<crate::attach::NodeVolumes>,
    /// The VM snapshots placed on this node, as their follower hears them.
    pub vm_snapshots: Arc<crate::vmsnapshots::NodeSnapshots>,
    pub data_dir: PathBuf,
    pub shutdown_timeout: Duration,
    /// The XML this agent last defined for each domain (by UUID): an unchanged definition of a
    /// domain that exists is not parsed by libvirt again on every reconcile.
    pub defined: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// The migrations from and to this node.
    pub migrations: Arc<crate::migrate::NodeMigrations>,
    /// VMs (by uid) this process is copying to another node right now.
    pub migrating: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Self-fencing (see [`crate::fence`]).
    pub fence: Arc<crate::fence::Fence>,
}

impl Context {
    pub fn vm_dir(&self, uid: &str) -> PathBuf {
        self.data_dir.join("vms").join(uid)
    }
}

/// What the caller should do next.
pub enum Outcome {
    /// Converged; look again at the next change or resync.
    Done,
    /// The object is gone (finalizer removed): stop this actor.
    Gone,
}

fn get<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, AgentError> {
    serde_json::from_value(v).map_err(|e| AgentError::Config(format!("{what} cannot be read: {e}")))
}

/// Removes the domain and every file of a VM. Safe to repeat.
pub async fn remove_everything(ctx: &Context, uid: &str) -> Result<(), AgentError> {
    ctx.libvirt.remove(uid).await?;
    ctx.defined.lock().expect("defined lock").remove(uid);
    let dir = ctx.vm_dir(uid);
    match tokio::fs::remove_dir_all(&dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::Io {
            path: dir,
            source: e,
        }),
    }
}

/// What a converge is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Run the VM here: everything, up to its power state and status.
    Run,
    /// Get ready to take the VM in a migration: its disks (an empty overlay on the cached
    /// image), seed, networks and security group rules, but no domain and no status.
    Prepare,
}

pub async fn reconcile(ctx: &Context, vm: &VirtualMachine) -> Result<Outcome, AgentError> {
    converge(ctx, vm, Mode::Run).await
}

/// Prepares this node to take `vm` in a migration (see [`crate::migrate`]).
pub async fn prepare_incoming(ctx: &Context, vm: &VirtualMachine) -> Result<(), AgentError> {
    converge(ctx, vm, Mode::Prepare).await.map(|_| ())
}

/// Shuts the guest down (powered off after the shutdown timeout).
pub async fn stop_domain(ctx: &Context, vm: &VirtualMachine, uid: &str) -> Result<(), AgentError> {
    stop(ctx, vm, uid, ctx.shutdown_timeout).await
}

async fn converge(ctx: &Context, vm: &VirtualMachine, mode: Mode) -> Result<Outcome, AgentError> {
    let started = std::time::Instant::now();
    let step = |what: &str| tracing::debug!(vm = %vm.metadata.name, ms = started.elapsed().as_millis() as u64, "{what}");
    let meta = &vm.metadata;
    let uid = meta
        .uid
        .clone()
        .ok_or_else(|| AgentError::Config("the VM has no uid".into()))?;
    let project = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone();

    // An adopted domain keeps its own UUID and definition; Flotilla only drives its power.
    let adopted = vm.spec.adopted_domain.clone();
    let domain = adopted.clone().unwrap_or_else(|| uid.clone());
    if mode == Mode::Prepare && (meta.deletion_timestamp.is_some() || adopted.is_some()) {
        return Err(AgentError::Config(
            "the VM is being deleted, or is an adopted domain: it does not move".into(),
        ));
    }
    if let Some(deleted_at) = meta.deletion_timestamp {
        if adopted.is_none() {
            // The disks die with the VM: no clean shutdown unless the deletion asked for a grace
            // period (`gracePeriodSeconds`), counted from the deletion, not from now.
            let grace = meta.deletion_grace_period_seconds.unwrap_or(0).max(0);
            let left = (deleted_at + chrono::Duration::seconds(grace)) - chrono::Utc::now();
            if let Ok(left) = left.to_std() {
                if ctx.libvirt.state(&uid).await? == Some(DomainState::Running) {
                    tracing::info!(vm = %name, seconds = left.as_secs(), "shutting the guest down before deleting it");
                    stop(ctx, vm, &uid, left).await?;
                }
            }
            remove_everything(ctx, &uid).await?;
            // Its networks may have no VM on this node any more: look now, not at the resync.
            ctx.unused_overlays.notify_one();
            crate::attach::release(ctx, vm, &[], true).await?;
        } else {
            tracing::info!(vm = %name, domain = %domain, "released the adopted domain");
        }
        if meta.finalizers.iter().any(|f| f == FINALIZER) {
            edit_finalizers(ctx, &project, &name, |f| f.retain(|x| x != FINALIZER)).await?;
            tracing::info!(vm = %name, "deleted: domain and files removed");
            let message = format!("the domain and its files are gone from {}", ctx.node);
            event(ctx, vm, EventType::Normal, "Deleted", &message).await;
        }
        return Ok(Outcome::Gone);
    }
    if mode == Mode::Run {
        // A migration under way decides what happens to the domain (see crate::migrate).
        let migration = vm.status.as_ref().and_then(|s| s.migration.as_ref());
        if let Some(m) = migration.and_then(|m| ctx.migrations.outgoing(vm, &m.name)) {
            if let Some(outcome) = crate::migrate::drive(ctx, vm, &m).await? {
                return Ok(outcome);
            }
        }
    }
    if mode == Mode::Run && !meta.finalizers.iter().any(|f| f == FINALIZER) {
        // Before creating anything, so that a deletion cannot leave it behind.
        edit_finalizers(ctx, &project, &name, |f| {
            if !f.iter().any(|x| x == FINALIZER) {
                f.push(FINALIZER.into())
            }
        })
        .await?;
        // The watch delivers the updated object; continue from there.
        return Ok(Outcome::Done);
    }

    if adopted.is_some() {
        if ctx.libvirt.state(&domain).await?.is_none() {
            return Err(AgentError::Libvirt(format!(
                "the adopted domain {domain} does not exist on {}",
                ctx.node
            )));
        }
        return apply_power(ctx, vm, &domain).await;
    }
    let dir = ctx.vm_dir(&uid);
    create_traversable_dir(&dir).await?;
    // Provisioning is worth a status write when disks must be prepared (a download, a copy);
    // without them the domain is defined and started within the same reconcile.
    let prepares_disks = vm.spec.image.is_some() || vm.spec.root_disk.is_some();
    if mode == Mode::Run && prepares_disks && ctx.libvirt.state(&uid).await?.is_none() {
        let disks = vm.status.iter().flat_map(|s| s.disks.clone()).collect();
        write_status(ctx, vm, "Provisioning", None, disks).await?;
    }
    step("provisioning reported");

    let (cpus, memory) = match (&vm.spec.resources, &vm.spec.class) {
        (Some(r), _) => (r.cpus, r.memory.value()),
        (None, Some(class)) => {
            let c: VMClass = get(
                ctx.client
                    .get(lookup("vmclass").unwrap(), None, class)
                    .await?,
                "the VMClass",
            )?;
            (c.spec.cpus, c.spec.memory.value())
        }
        (None, None) => {
            return Err(AgentError::Config(
                "the VM has neither resources nor class".into(),
            ))
        }
    };
    // The root disk's current file: `root`, or the overlay a snapshot or revert put on it.
    let root_name = crate::vmsnapshots::active_root(&dir).await;
    let mut root_disk = dir.join(format!("{root_name}.qcow2"));
    let backing = match &vm.spec.image {
        Some(image) => {
            let img: Image = get(
                ctx.client
                    .get(lookup("image").unwrap(), Some(&project), image)
                    .await?,
                "the Image",
            )?;
            let spec = fetchable(image, &img)?;
            let cached = ctx.disks.cached_image(&project, image, &spec).await;
            report_image(ctx, &project, image, &img, &cached).await;
            Some(cached?)
        }
        None => None,
    };
    let has_root = backing.is_some() || vm.spec.root_disk.is_some();
    if has_root {
        let size = vm.spec.root_disk.as_ref().map(|d| d.size.value());
        let source = vm.spec.root_disk.as_ref().and_then(|d| d.source.as_ref());
        match source {
            _ if root_name != crate::vmsnapshots::ROOT => {}
            Some(source) => {
                crate::vmsnapshots::clone_root(ctx, vm, source, &root_disk, size).await?;
            }
            None => {
                ctx.disks
                    .create_root_disk(backing.as_deref(), &root_disk, size)
                    .await?
            }
        }
        if let Some(size) = size {
            grow_root_disk(ctx, vm, &uid, &root_disk, size).await?;
        }
    }
    // Held until the domain runs on the files read here (see attach::NodeVolumes).
    let _volumes = ctx
        .volumes
        .lock(&project, vm.spec.disks.iter().map(|d| d.volume.clone()))
        .await;
    // A VM coming in a migration brings its volumes' definitions in its own XML: they are in
    // shared pools (the controller refuses node-local ones), placed on the source until the VM
    // is bound here, and so not readable by this node yet.
    let mut disks = match mode {
        Mode::Run => crate::attach::resolve(ctx, vm).await?,
        Mode::Prepare => Vec::new(),
    };
    // Snapshots taken, merged away or reverted to move the disks to other files.
    let subject = crate::vmsnapshots::Subject {
        vm,
        uid: &uid,
        dir: &dir,
        has_root,
        volumes: &disks,
    };
    if mode == Mode::Run && crate::vmsnapshots::reconcile(ctx, &subject).await? {
        disks = crate::attach::resolve(ctx, vm).await?;
        let root_name = crate::vmsnapshots::active_root(&dir).await;
        root_disk = dir.join(format!("{root_name}.qcow2"));
    }
    let (nics, seed_nics) = nics(ctx, &project, vm).await?;
    if let Some(firewall) = ctx.firewall.as_ref().filter(|_| !nics.is_empty()) {
        // Its NICs' rules are in place before QEMU opens their taps.
        if ctx.libvirt.state(&uid).await? != Some(DomainState::Running) {
            firewall.set_vm(vm.clone());
            firewall.sync(Duration::from_secs(10)).await?;
            step("security group rules applied");
        }
    }
    // A NoCloud seed or a config drive: one read-only disk, `seed.iso`, either way.
    let seeded = vm.spec.cloud_init != flotilla_types::CloudInit::Metadata;
    let drive = vm.spec.cloud_init == flotilla_types::CloudInit::ConfigDrive;
    let seed = dir.join("seed.iso");
    let input = SeedInput {
        instance_id: &uid,
        nics: &seed_nics,
        hostname: &name,
        ssh_authorized_keys: &vm.spec.ssh_authorized_keys,
        user_data: vm.spec.user_data.as_deref(),
    };
    let fingerprint = match drive {
        true => {
            use sha2::Digest;
            let mut hash = sha2::Sha256::new();
            for (name, data) in cloudinit::config_drive(&input) {
                hash.update(format!("{name} {}\n", data.len()));
                hash.update(data);
            }
            format!("config-2 {}", hex::encode(hash.finalize()))
        }
        false => format!(
            "{}\n{}\n{}",
            cloudinit::meta_data(&input),
            cloudinit::user_data(&input)?,
            cloudinit::network_config(&seed_nics)
        ),
    };
    let stamp = dir.join("seed.fingerprint");
    if seeded
        && (tokio::fs::read_to_string(&stamp).await.ok().as_deref() != Some(fingerprint.as_str())
            || !seed.exists())
    {
        match drive {
            true => cloudinit::write_config_drive(&input, &seed).await?,
            false => cloudinit::write_seed(&input, &seed).await?,
        }
        // After the seed: a crash in between leaves an old stamp, and the seed is written again.
        crate::datadir::write_file(&stamp, fingerprint.into_bytes(), 0o644).await?;
    }
    step("seed ready");
    if mode == Mode::Prepare {
        if let Some(overlays) = &ctx.overlays {
            overlays.keep_for_migration(&uid, nics.iter().map(|n| n.bridge.clone()).collect());
        }
        return Ok(Outcome::Done);
    }
    let spec = DomainSpec {
        virt_type: ctx.virt_type,
        name: domain_name(&project, &name),
        uuid: uid.clone(),
        project: project.clone(),
        vm_name: name.clone(),
        cluster_id: ctx.cluster_id.clone(),
        node: ctx.node.clone(),
        cpus,
        memory_bytes: memory,
        boot: vm.spec.boot.as_ref().map(|b| KernelBoot {
            kernel: b.kernel.clone(),
            initrd: b.initrd.clone(),
            cmdline: b.cmdline.clone(),
        }),
        root_disk: has_root.then_some(root_disk),
        disks: disks.clone(),
        seed_iso: seeded.then_some(seed),
        openstack_sysinfo: !seeded || drive,
        nics,
        console_log: dir.join("console.log"),
        serial_socket: crate::consoles::serial_socket(&dir),
    };
    // Redefining is idempotent; on a running domain the new definition applies at next boot.
    let xml = spec.to_xml();
    let same = ctx.defined.lock().expect("defined lock").get(&uid) == Some(&xml);
    if !same || ctx.libvirt.state(&uid).await?.is_none() {
        ctx.libvirt.define(xml.clone()).await?;
        ctx.defined
            .lock()
            .expect("defined lock")
            .insert(uid.clone(), xml);
        step("defined");
    }
    crate::attach::plug(ctx, vm, &uid, &disks).await?;

    step("disks and domain ready");
    apply_power(ctx, vm, &uid).await
}

/// The spec an image is fetched by: an uploaded one's once the upload is Ready, with the
/// SHA-256 the server found (the cache is keyed and checked by it).
pub(crate) fn fetchable(
    name: &str,
    image: &Image,
) -> Result<flotilla_types::ImageSpec, AgentError> {
    let mut spec = image.spec.clone();
    if spec.source.upload.is_none() {
        return Ok(spec);
    }
    let upload = image
        .status
        .as_ref()
        .and_then(|s| s.upload.clone())
        .unwrap_or_default();
    if upload.phase != "Ready" {
        return Err(AgentError::Image {
            image: name.to_string(),
            message: "is not uploaded yet (flotilla image upload)".into(),
        });
    }
    spec.sha256 = spec.sha256.or(Some(upload.sha256));
    Ok(spec)
}

/// Grows the root disk to `size` bytes when `spec.rootDisk.size` asks for more than it has:
/// through the running domain (the guest sees it at once), else the file.
async fn grow_root_disk(
    ctx: &Context,
    vm: &VirtualMachine,
    uid: &str,
    path: &std::path::Path,
    size: u128,
) -> Result<(), AgentError> {
    let size = u64::try_from(size).unwrap_or(u64::MAX);
    let storage = |e: flotilla_storage::StorageError| AgentError::Config(e.to_string());
    let info = flotilla_storage::qemu_img::info(path)
        .await
        .map_err(storage)?;
    if info.virtual_size >= size {
        return Ok(());
    }
    if ctx.libvirt.state(uid).await? == Some(DomainState::Running) {
        ctx.libvirt.block_resize(uid, "vda", size).await?;
    } else {
        flotilla_storage::qemu_img::resize(path, info.format, size)
            .await
            .map_err(storage)?;
    }
    let message = format!(
        "the root disk grew from {} to {size} bytes",
        info.virtual_size
    );
    tracing::info!(vm = %vm.metadata.name, from = info.virtual_size, to = size, "grew the root disk");
    event(ctx, vm, EventType::Normal, "DiskGrown", &message).await;
    Ok(())
}

/// The VM's NICs as the control plane gave them (`status.interfaces`, in `spec.networks` order)
/// on their networks' bridges, and what the guest is told about them.
async fn nics(
    ctx: &Context,
    project: &str,
    vm: &VirtualMachine,
) -> Result<(Vec<Nic>, Vec<SeedNic>), AgentError> {
    let interfaces = vm
        .status
        .as_ref()
        .map(|s| s.interfaces.clone())
        .unwrap_or_default();
    if interfaces.len() != vm.spec.networks.len() {
        return Err(AgentError::Config(format!(
            "the VM names {} networks but its status has {} NICs (made before networks existed?); recreate it",
            vm.spec.networks.len(),
            interfaces.len()
        )));
    }
    let kind = lookup("network").expect("registered");
    let (mut nics, mut seed) = (Vec::new(), Vec::new());
    // A VM whose domain does not exist yet: its networks must be ready for it now.
    let new_domain = match vm.metadata.uid.as_deref() {
        Some(uid) if !interfaces.is_empty() => ctx.libvirt.state(uid).await?.is_none(),
        _ => false,
    };
    for interface in interfaces {
        let network: Network = get(
            ctx.client
                .get(kind, Some(project), &interface.network)
                .await?,
            "the Network",
        )?;
        let bridge = network.bridge_name().ok_or_else(|| {
            AgentError::Config(format!(
                "network {:?} has no VNI yet, so no bridge",
                interface.network
            ))
        })?;
        if let Some(firewall) = &ctx.firewall {
            firewall.set_network(&network);
        }
        let mut mtu = network.nic_mtu();
        if network.spec.network_type == flotilla_types::NetworkType::Overlay {
            if let Some(overlays) = &ctx.overlays {
                mtu = overlays.mtu_for(&network)?;
                overlays.ensure(&ctx.node, &network, new_domain).await?;
                // Every VM of the network reconciles each resync; its DHCP server needs looking
                // at once in a while, and at once for a new VM (its reservation).
                if new_domain || ctx.dhcp.as_ref().is_some_and(|d| d.stale(&network)) {
                    serve_dhcp(ctx, project, &network, mtu).await?;
                }
            }
        }
        // libvirt plugs NICs into bridges of its own network namespace, the agent's: say which
        // bridge is missing rather than pass on libvirt's "Cannot get interface MTU".
        if ctx.virt_type != VirtType::Test
            && !std::path::Path::new("/sys/class/net")
                .join(&bridge)
                .exists()
        {
            return Err(AgentError::Config(format!(
                "the bridge {bridge} of network {:?} does not exist on node {}{}",
                interface.network,
                ctx.node,
                if network.spec.network_type == flotilla_types::NetworkType::Overlay {
                    " (this node has no tunnel address for overlay networks: run the agent with --tunnel-address)"
                } else {
                    " (a bridged network attaches to a bridge the node already has)"
                }
            )));
        }
        let subnet = network.spec.subnet().ok().flatten();
        let domain = network
            .spec
            .dns
            .as_ref()
            .and_then(|d| d.domain.clone())
            .unwrap_or_else(|| flotilla_types::kinds::network::DEFAULT_DOMAIN.to_string());
        seed.push(SeedNic {
            name: interface.name.clone(),
            mac: interface.mac_address.clone(),
            addresses: interface.ips.clone(),
            gateway: subnet.as_ref().map(|s| s.gateway.to_string()),
            nameservers: nameservers(&network, subnet.as_ref()),
            search: Some(format!("{}.{project}.{domain}", interface.network)),
            mtu,
            // Overlay networks with DHCP have a metadata service on this node.
            metadata_via: subnet
                .as_ref()
                .filter(|_| {
                    network.spec.dhcp
                        && network.spec.network_type == flotilla_types::NetworkType::Overlay
                        && ctx.metadata.is_some()
                })
                .map(|s| s.dhcp_server.to_string()),
        });
        let vlan = network.spec.vlan;
        if let Some(vlan) = vlan.filter(|_| ctx.virt_type != VirtType::Test) {
            // Without VLAN filtering the bridge would put the NIC on the LAN's native VLAN.
            let filtering =
                std::fs::read_to_string(format!("/sys/class/net/{bridge}/bridge/vlan_filtering"))
                    .is_ok_and(|v| v.trim() == "1");
            if !filtering {
                return Err(AgentError::Config(format!(
                    "network {:?} puts NICs on VLAN {vlan}, but bridge {bridge} on node {} does not filter VLANs (ip link set {bridge} type bridge vlan_filtering 1; the kernel needs 802.1Q and bridge VLAN filtering)",
                    interface.network, ctx.node
                )));
            }
        }
        nics.push(Nic {
            tap: Some(crate::firewall::tap_name(
                vm.metadata.uid.as_deref().unwrap_or_default(),
                nics.len(),
            )),
            mac: interface.mac_address,
            bridge,
            mtu,
            vlan,
        });
    }
    Ok((nics, seed))
}

/// The DNS servers a NIC's guest is told: the network's own list, else Flotilla's server on an
/// overlay network with DHCP (its DHCP-server address), else none.
fn nameservers(network: &Network, subnet: Option<&flotilla_ipam::Subnet>) -> Vec<String> {
    let given = network.spec.dns.as_ref().map(|d| d.nameservers.clone());
    match (given, subnet) {
        (Some(given), _) if !given.is_empty() => given,
        (_, Some(subnet))
            if network.spec.dhcp
                && network.spec.network_type == flotilla_types::NetworkType::Overlay =>
        {
            vec![subnet.dhcp_server.to_string()]
        }
        _ => Vec::new(),
    }
}

/// Makes this node's DHCP and DNS server of `network` serve every address IPAM gave on it
/// (before the VM's domain starts, so its guest finds its reservation).
pub(crate) async fn serve_dhcp(
    ctx: &Context,
    project: &str,
    network: &Network,
    mtu: u32,
) -> Result<(), AgentError> {
    let (Some(dhcp), Some(vni)) = (&ctx.dhcp, network.status.as_ref().and_then(|s| s.vni)) else {
        return Ok(());
    };
    let Some(subnet) = network
        .spec
        .subnet()
        .ok()
        .flatten()
        .filter(|_| network.spec.dhcp)
    else {
        return Ok(());
    };
    let name = &network.metadata.name;
    let list: flotilla_types::NetworkAddressList = get(
        ctx.client.network_addresses(project, name).await?,
        "the network's addresses",
    )?;
    let domain = network
        .spec
        .dns
        .as_ref()
        .and_then(|d| d.domain.clone())
        .unwrap_or_else(|| flotilla_types::kinds::network::DEFAULT_DOMAIN.to_string());
    let served = dhcp
        .ensure(&crate::dhcp::Service {
            vni,
            project,
            network: name,
            domain: format!("{name}.{project}.{domain}"),
            nameservers: nameservers(network, Some(&subnet)),
            prefix6: network.spec.prefix6(),
            subnet,
            mtu,
            addresses: &list.items,
        })
        .await;
    served?;
    // The metadata service lives in the DHCP server's namespace (its port holds the address).
    if let Some(metadata) = &ctx.metadata {
        metadata.ensure(vni, &dhcp.namespace_of(vni), project, name)?;
    }
    Ok(())
}

/// Drives the domain to `spec.powerState` (and carries out a restart request), then reports.
async fn apply_power(ctx: &Context, vm: &VirtualMachine, uid: &str) -> Result<Outcome, AgentError> {
    let (meta, name) = (&vm.metadata, &vm.metadata.name);
    let started = std::time::Instant::now();
    let step = |what: &str| tracing::debug!(vm = %name, ms = started.elapsed().as_millis() as u64, "{what}");
    let restart = meta.annotations.get(RESTART_ANNOTATION).cloned();
    let status = vm.status.clone().unwrap_or_default();
    let wants_restart = restart.is_some() && restart != status.last_restart_request;
    match vm.spec.power_state {
        PowerState::Running => {
            if wants_restart && ctx.libvirt.state(uid).await? == Some(DomainState::Running) {
                event(
                    ctx,
                    vm,
                    EventType::Normal,
                    "Restarting",
                    "restarting on request",
                )
                .await;
                stop(ctx, vm, uid, ctx.shutdown_timeout).await?;
                tracing::info!(vm = %name, "restarting on request");
            }
            if ctx.libvirt.state(uid).await? == Some(DomainState::Paused)
                && !ctx.migrating.lock().expect("migrating lock").contains(uid)
            {
                // Paused by a move that ended (or by hand): the guest goes on.
                ctx.libvirt.resume(uid).await?;
                tracing::info!(vm = %name, "resumed a paused guest");
            }
            if ctx.libvirt.state(uid).await? != Some(DomainState::Running) {
                if vm.spec.evacuation == flotilla_types::Evacuation::Restart
                    && ctx.fence.is_fenced()
                {
                    return Err(AgentError::Config(format!(
                        "node {} is fenced (no lease renewal acknowledged lately): a VM that restarts elsewhere when its node fails starts only once the lease is renewed",
                        ctx.node
                    )));
                }
                ctx.libvirt.start(uid).await?;
                tracing::info!(vm = %name, "started");
                let message = format!("started the domain on {}", ctx.node);
                event(ctx, vm, EventType::Normal, "Started", &message).await;
            }
        }
        PowerState::Stopped => {
            if ctx.libvirt.state(uid).await? != Some(DomainState::Stopped) {
                stop(ctx, vm, uid, ctx.shutdown_timeout).await?;
                tracing::info!(vm = %name, "stopped");
                event(
                    ctx,
                    vm,
                    EventType::Normal,
                    "Stopped",
                    "the domain is stopped",
                )
                .await;
            }
        }
    }
    step("power state applied");
    let phase = match ctx.libvirt.state(uid).await? {
        Some(DomainState::Running)
        | Some(DomainState::ShuttingDown)
        | Some(DomainState::Paused) => "Running",
        _ => "Stopped",
    };
    // Volumes the domain no longer has are let go of before the status stops listing them.
    let disks = crate::attach::status(ctx, vm, uid, phase == "Running").await?;
    if vm.spec.adopted_domain.is_none() {
        crate::attach::release(ctx, vm, &disks, false).await?;
    }
    write_status(
        ctx,
        vm,
        phase,
        if wants_restart {
            restart
        } else {
            status.last_restart_request.clone()
        },
        disks,
    )
    .await?;
    Ok(Outcome::Done)
}

/// Changes the finalizer list on the latest version of the VM, guarded by its resourceVersion
/// so that nobody else's finalizer is lost; a conflict (someone wrote in between) is retried at
/// once with the newer version. A VM that is already gone needs no change.
async fn edit_finalizers(
    ctx: &Context,
    project: &str,
    name: &str,
    edit: impl Fn(&mut Vec<String>),
) -> Result<(), AgentError> {
    let vms = lookup("vm").expect("registered");
    for _ in 0..10 {
        let current = match ctx.client.get(vms, Some(project), name).await {
            Ok(v) => v,
            Err(e) if e.code() == Some(404) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut finalizers: Vec<String> =
            serde_json::from_value(current["metadata"]["finalizers"].clone()).unwrap_or_default();
        let before = finalizers.clone();
        edit(&mut finalizers);
        if finalizers == before {
            return Ok(());
        }
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": current["metadata"]["resourceVersion"]}});
        match ctx
            .client
            .patch(vms, Some(project), name, &patch, false)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(409) => continue,
            Err(e) if e.code() == Some(404) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Err(AgentError::Config(format!(
        "the finalizers of {name} kept changing; will retry"
    )))
}

/// Records an event about `vm` (best effort).
pub(crate) async fn event(
    ctx: &Context,
    vm: &VirtualMachine,
    type_: EventType,
    reason: &str,
    message: &str,
) {
    ctx.recorder
        .record(&reference(vm), type_, reason, message)
        .await;
}

/// Graceful shutdown, then the domain is destroyed after `timeout` (and a ShutdownTimeout
/// event says so).
async fn stop(
    ctx: &Context,
    vm: &VirtualMachine,
    uid: &str,
    timeout: Duration,
) -> Result<(), AgentError> {
    ctx.libvirt.shutdown(uid).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if matches!(
            ctx.libvirt.state(uid).await?,
            Some(DomainState::Stopped) | None
        ) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::info!(uid, "the guest did not shut down in time; destroying it");
    ctx.libvirt.destroy(uid).await?;
    let message = format!(
        "the guest did not shut down within {} s of being asked (ACPI); it was powered off",
        timeout.as_secs()
    );
    event(ctx, vm, EventType::Warning, "ShutdownTimeout", &message).await;
    Ok(())
}

/// Creates `dir` and its missing parents as 0711: QEMU (another user under qemu:///system)
/// must reach the files inside, and nobody needs to list them.
async fn create_traversable_dir(dir: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&d)
    })
    .await
    .map_err(|e| AgentError::Config(e.to_string()))?
    .map_err(io(dir))
}

/// A reference to the VM, for the Events about it.
pub fn reference(vm: &VirtualMachine) -> flotilla_types::ObjectReference {
    flotilla_types::ObjectReference {
        kind: "VirtualMachine".into(),
        api_version: Some(flotilla_types::API_VERSION.into()),
        namespace: vm.metadata.namespace.clone(),
        name: vm.metadata.name.clone(),
        uid: vm.metadata.uid.clone(),
        resource_version: vm.metadata.resource_version.clone(),
        field_path: None,
    }
}

/// Writes status only when it changes, so that resyncs cost no writes.
/// The VM's NICs with where their addresses are confirmed: `guest-agent` when the guest's agent
/// reports the address IPAM gave on the NIC's MAC, `dhcp` when the guest holds its lease (this
/// node's DHCP server says so), else `ipam`.
fn confirmed_interfaces(
    ctx: &Context,
    vm: &VirtualMachine,
    guest: Option<&[(String, Vec<String>)]>,
) -> Vec<flotilla_types::kinds::vm::InterfaceStatus> {
    let project = vm.metadata.namespace.as_deref().unwrap_or_default();
    let mut interfaces = vm
        .status
        .as_ref()
        .map(|s| s.interfaces.clone())
        .unwrap_or_default();
    for interface in &mut interfaces {
        let Some(ip) = interface.ips.first().and_then(|a| a.split('/').next()) else {
            continue;
        };
        let leased = ctx.dhcp.as_ref().and_then(|d| {
            d.leased(
                project,
                &interface.network,
                &interface.mac_address.to_ascii_lowercase(),
            )
        });
        let mac = interface.mac_address.to_ascii_lowercase();
        let reported = guest.is_some_and(|g| {
            g.iter()
                .any(|(m, addrs)| *m == mac && addrs.iter().any(|a| a == ip))
        });
        let source = if reported {
            "guest-agent"
        } else if leased.is_some_and(|l| l.to_string() == ip) {
            "dhcp"
        } else {
            "ipam"
        };
        interface.source = Some(source.to_string());
    }
    interfaces
}

pub async fn write_status(
    ctx: &Context,
    vm: &VirtualMachine,
    phase: &str,
    restart: Option<String>,
    disks: Vec<flotilla_types::kinds::DiskStatus>,
) -> Result<(), AgentError> {
    let vms = lookup("vm").expect("registered");
    let current = vm.status.clone().unwrap_or_default();
    let ready = phase == "Running";
    let ready_cond = current.conditions.iter().find(|c| c.type_ == "Ready");
    let ready_same =
        ready_cond.is_some_and(|c| (c.status == flotilla_types::ConditionStatus::True) == ready);
    let guest = if phase == "Running" {
        let domain = vm
            .spec
            .adopted_domain
            .as_deref()
            .or(vm.metadata.uid.as_deref())
            .unwrap_or_default();
        ctx.libvirt.guest_addresses(domain).await.unwrap_or(None)
    } else {
        None
    };
    let interfaces = confirmed_interfaces(ctx, vm, guest.as_deref());
    let unchanged = serde_json::to_value(current.phase).ok() == Some(json!(phase))
        && interfaces == current.interfaces
        && current.node_name.as_deref() == Some(ctx.node.as_str())
        && current.observed_generation == vm.metadata.generation
        && current.last_restart_request == restart
        && current.disks == disks
        && ready_same;
    if unchanged {
        return Ok(());
    }
    let mut conditions: Vec<Value> = current
        .conditions
        .iter()
        .filter(|c| c.type_ != "Ready")
        .map(|c| serde_json::to_value(c).expect("serialises"))
        .collect();
    let (status, reason, message) = if ready {
        (
            "True",
            "DomainRunning",
            format!("the domain is running on {}", ctx.node),
        )
    } else {
        (
            "False",
            phase,
            format!("the domain is {} on {}", phase.to_lowercase(), ctx.node),
        )
    };
    conditions.push(json!({"type": "Ready", "status": status, "reason": reason, "message": message, "lastTransitionTime": flotilla_types::meta::now()}));
    let mut patch = json!({"status": {
        "phase": phase, "nodeName": ctx.node, "observedGeneration": vm.metadata.generation,
        "conditions": conditions, "lastRestartRequest": restart,
    }});
    if interfaces != current.interfaces {
        patch["status"]["interfaces"] = serde_json::to_value(&interfaces).expect("serialises");
    }
    if disks != current.disks {
        patch["status"]["disks"] = serde_json::to_value(&disks).expect("serialises");
    }
    let project = vm.metadata.namespace.as_deref();
    ctx.client
        .patch(vms, project, &vm.metadata.name, &patch, true)
        .await?;
    Ok(())
}

/// Reports a failed reconcile on the VM without changing its phase.
pub async fn report_error(ctx: &Context, vm: &VirtualMachine, error: &AgentError) {
    let vms = lookup("vm").expect("registered");
    let current = vm.status.clone().unwrap_or_default();
    let message = error.to_string();
    if current
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.message == message)
    {
        return;
    }
    let mut conditions: Vec<Value> = current
        .conditions
        .iter()
        .filter(|c| c.type_ != "Ready")
        .map(|c| serde_json::to_value(c).expect("serialises"))
        .collect();
    conditions.push(json!({"type": "Ready", "status": "False", "reason": "ReconcileFailed", "message": message, "lastTransitionTime": flotilla_types::meta::now()}));
    let phase = if vm.status.is_none() {
        json!("Provisioning")
    } else {
        serde_json::to_value(current.phase).unwrap_or(json!("Provisioning"))
    };
    let patch = json!({"status": {"phase": phase, "nodeName": ctx.node, "conditions": conditions}});
    if let Err(e) = ctx
        .client
        .patch(
            vms,
            vm.metadata.namespace.as_deref(),
            &vm.metadata.name,
            &patch,
            true,
        )
        .await
    {
        tracing::debug!(vm = %vm.metadata.name, error = %e, "could not report a reconcile error");
    }
}

/// This node's entry in the Image's `status.nodes`, written only when it changes.
async fn report_image(
    ctx: &Context,
    project: &str,
    name: &str,
    image: &Image,
    cached: &Result<PathBuf, AgentError>,
) {
    let (phase, message, size) = match cached {
        Ok(path) => (
            "Ready",
            String::new(),
            std::fs::metadata(path).ok().map(|m| m.len()),
        ),
        Err(e) => ("Failed", e.to_string(), None),
    };
    let current = image.status.as_ref().and_then(|s| s.nodes.get(&ctx.node));
    if current.is_some_and(|c| c.phase == phase && c.message == message) {
        return;
    }
    let entry = json!({"phase": phase, "message": message, "sizeBytes": size});
    let patch = json!({"status": {"nodes": {ctx.node.clone(): entry}}});
    if let Err(e) = ctx
        .client
        .patch(lookup("image").unwrap(), Some(project), name, &patch, true)
        .await
    {
        tracing::warn!(image = name, error = %e, "cannot report the image's state on this node");
    }
}
