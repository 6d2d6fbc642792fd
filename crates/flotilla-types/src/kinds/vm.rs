//! VirtualMachine: the user's VM, placed on a node and run there by the node's agent.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::vmclass::{check_cpus, check_memory};
use crate::meta::Condition;
use crate::quantity::Quantity;
use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

/// Largest `userData` accepted (the NoCloud seed and the store both want it small).
pub const MAX_USER_DATA: usize = 64 * 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSpec {
    /// Running (default) or Stopped.
    #[serde(default)]
    pub power_state: PowerState,
    /// A VMClass name; set this or `resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub class: Option<String>,
    /// CPUs and memory (or name a VMClass in class instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// An Image in the same project: the root disk is a linked clone of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub image: Option<String>,
    /// Direct kernel boot from files on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<KernelBoot>,
    /// The root disk: a linked clone of the image grown to size, or a blank disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<RootDisk>,
    /// The networks the VM is attached to, one NIC each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkAttachment>,
    /// Volumes of the project attached as further disks. May change while the VM runs: a new
    /// entry is hot-plugged, a removed one unplugged (the volume stays attached until the guest
    /// lets go of it). A volume in a node-local pool pins the VM to its node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub disks: Vec<DiskAttachment>,
    /// Where the guest's cloud-init finds its instance data: `seed` (the default: a NoCloud
    /// seed disk with meta-data, user-data and network-config), `metadata` (no disk: the
    /// metadata service at 169.254.169.254 on the VM's overlay network, in OpenStack's and EC2's
    /// layouts; the VM presents itself as OpenStack Nova, as cloud-init's OpenStack datasource
    /// looks for) or `configDrive` (an OpenStack config drive: a read-only ISO 9660 disk
    /// labelled `config-2` with `openstack/latest/` (meta_data.json, user_data,
    /// network_data.json) and `ec2/latest/` (meta-data.json, user-data); `userData` is written
    /// as given, as BOSH's agent and cloud-init's ConfigDrive source read it).
    #[serde(default, skip_serializing_if = "CloudInit::is_seed")]
    pub cloud_init: CloudInit,
    /// SSH public keys cloud-init installs for the default user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex = "SSH_KEY_PATTERN", length(max = 16384)))]
    pub ssh_authorized_keys: Vec<String>,
    /// cloud-init user data (a `#cloud-config` document or a script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub user_data: Option<String>,
    /// Pin to a node; otherwise the scheduler picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub node_name: Option<String>,
    /// Labels a node must have to run the VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::validation::labels_schema")]
    pub node_selector: BTreeMap<String, String>,
    /// UUID of an existing libvirt domain on `nodeName` that this VM represents (`flotilla vm
    /// adopt`). Flotilla then manages its power state only: it never redefines the domain or
    /// touches its disks, and deleting the VM releases the domain instead of destroying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F-]{36}$"))]
    pub adopted_domain: Option<String>,
    /// Placement rules relative to other VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<crate::kinds::placement::Affinity>,
    /// A PlacementPolicy in the same project whose rules apply too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub placement_policy: Option<String>,
    /// What happens when the VM's node fails (its agent stops renewing its lease): `Never`
    /// (the default: the VM is reported `NodeLost` and keeps running if the node is only cut
    /// off) or `Restart` (high availability: the node's agent destroys the VM once it has been
    /// cut off from the control plane for most of its lease, and the VM is started on another
    /// node once the lease has expired; it needs all its disks on shared storage, else it is
    /// reported `NodeLost` too).
    #[serde(default, skip_serializing_if = "Evacuation::is_never")]
    pub evacuation: Evacuation,
}

/// What happens to a VM when its node fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Evacuation {
    /// Reported NodeLost; never fenced, never started elsewhere.
    #[default]
    Never,
    /// Fenced by its node's agent and restarted on another node.
    Restart,
}

impl Evacuation {
    pub fn is_never(&self) -> bool {
        *self == Evacuation::Never
    }
}

/// Where cloud-init finds its instance data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloudInit {
    /// A NoCloud seed disk.
    #[default]
    Seed,
    /// The metadata service (169.254.169.254).
    Metadata,
    /// An OpenStack config drive (label `config-2`).
    #[serde(rename = "configDrive")]
    ConfigDrive,
}

impl CloudInit {
    pub fn is_seed(&self) -> bool {
        *self == CloudInit::Seed
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PowerState {
    #[default]
    Running,
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs (at least 1).
    #[schemars(range(min = 1, max = 512))]
    pub cpus: u32,
    /// Memory, as a quantity (e.g. 2Gi; at least 16Mi).
    pub memory: Quantity,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KernelBoot {
    /// A kernel on the node to boot directly (absolute path).
    #[schemars(regex = "crate::validation::HOST_PATH_PATTERN", length(max = 4096))]
    pub kernel: String,
    /// An initramfs on the node to boot with (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::HOST_PATH_PATTERN", length(max = 4096))]
    pub initrd: Option<String>,
    /// The kernel command line (one line, at most 4096 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::ONE_LINE_PATTERN", length(max = 4096))]
    pub cmdline: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootDisk {
    /// The root disk's size, as a quantity (e.g. 20Gi); at least the image's (or the source's).
    pub size: Quantity,
    /// Start from another VM's root disk instead of an image (the VM is then made on that
    /// VM's node). Set once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RootDiskSource>,
}

/// Where a cloned root disk comes from: one of `vmSnapshot` and `vm`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootDiskSource {
    /// A VMSnapshot of the project: its root disk as it was then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub vm_snapshot: Option<String>,
    /// A stopped VM of the project: a full copy of its root disk as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub vm: Option<String>,
    /// `full` (the default: a copy of every byte) or `linked` (an overlay of the snapshot's
    /// frozen file, made at once; the snapshot then stays while the VM does). A VM can only be
    /// copied: its disk goes on changing.
    #[serde(default)]
    pub mode: crate::kinds::volume::CloneMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkAttachment {
    /// The NIC's name (default: nic0, nic1, ... by position). NICs appear in the guest in
    /// list order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub name: Option<String>,
    /// The Network to attach to (in the VM's project).
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub network: String,
    /// A fixed IPv4 address inside the network's cidr; absent: IPAM gives the lowest free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::kinds::network::IPV4_PATTERN")]
    pub ip: Option<String>,
    /// A fixed MAC address; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "UNICAST_MAC_PATTERN")]
    pub mac_address: Option<String>,
    /// The SecurityGroups (of the VM's project) the NIC is in: it may receive and send what
    /// one of their rules allows, and the answers. Absent: the project's `default` group;
    /// empty: no group, so nothing but DHCP passes. May change while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 16),
        inner(regex = "crate::validation::DNS_LABEL_PATTERN")
    )]
    pub security_groups: Option<Vec<String>>,
    /// Further IPv4 or IPv6 addresses or networks the NIC may send from (a VIP that moves
    /// between VMs, e.g. with keepalived); its own addresses always. May change while the VM
    /// runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(regex = "crate::kinds::security_group::IP_CIDR_PATTERN")
    )]
    pub allowed_address_pairs: Vec<String>,
}

/// At most this many volumes attach to one VM.
pub const MAX_DISKS: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskAttachment {
    /// The disk's name in the VM (unique among its disks).
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub name: String,
    /// The Volume (in the VM's project). The guest finds it as
    /// `/dev/disk/by-id/virtio-<the first 20 characters of the volume's uid>` (virtio), as
    /// OpenStack's guests find Cinder volumes.
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub volume: String,
    /// `virtio` (the default: virtio-blk, one PCIe slot each) or `scsi` (virtio-scsi).
    #[serde(default)]
    pub bus: DiskBus,
    /// Whether the guest may only read it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// The serial the guest sees (at most 20 letters, digits, `-`, `_` or `.`; virtio-blk
    /// serials hold 20 bytes): the guest finds the disk as `/dev/disk/by-id/virtio-<serial>`.
    /// Absent: the first 20 characters of the volume's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "SERIAL_PATTERN", length(max = 20))]
    pub serial: Option<String>,
}

/// What a disk serial may hold.
pub const SERIAL_PATTERN: &str = "^[A-Za-z0-9._-]{1,20}$";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    Scsi,
}

/// The disk serial a guest sees for a volume: the first 20 characters of its uid (virtio-blk
/// serials hold 20 bytes).
pub fn disk_serial(volume_uid: &str) -> String {
    volume_uid.chars().take(20).collect()
}

/// A volume attached to a VM, as its status reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskStatus {
    /// `spec.disks[].name` (empty for a disk being unplugged after its entry went).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The Volume.
    pub volume: String,
    /// The serial the guest sees.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub serial: String,
    /// The domain's device name (vdb, sdb, ...): a hint only; guests name disks themselves.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// `Attached`, `Detaching` (asked to unplug; the guest has not let go yet) or `Defined`
    /// (in the definition; the domain is not running).
    pub state: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    #[default]
    Pending,
    Scheduled,
    Provisioning,
    Running,
    Stopped,
    Failed,
    Deleting,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineStatus {
    /// Pending, Scheduled, Provisioning, Running, Stopped or Failed.
    #[serde(default)]
    pub phase: Phase,
    /// The node the VM runs on, as its agent reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub node_name: Option<String>,
    /// The VM's conditions: Scheduled, Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The VM's IP addresses: its NICs' (the first NIC's first), then the floating IPs that
    /// forward to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::validation::ip_list_schema")]
    pub ips: Vec<String>,
    /// The VM's NICs, in `spec.networks` order: MAC and addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last restart request (annotation `flotilla.dev/restart-requested-at`) carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_request: Option<String>,
    /// The volumes the domain has, and those it is letting go of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskStatus>,
    /// The last revert to a VMSnapshot (annotation `flotilla.dev/revert-to`) carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_revert: Option<String>,
    /// The migration under way, set by the migration controller while one is (the target's
    /// agent may read the VM then, to prepare it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<VmMigration>,
}

/// A VM's migration under way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmMigration {
    /// The Migration (in the VM's project).
    pub name: String,
    /// The node it moves to.
    pub target_node: String,
}

/// One NIC of a VM, as its status reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InterfaceStatus {
    /// The NIC's name (`spec.networks[].name`, or nic0, nic1, ...).
    pub name: String,
    /// The Network it is attached to.
    pub network: String,
    /// Its MAC address (the one asked for, or the one Flotilla generated).
    pub mac_address: String,
    /// Its addresses, with their prefix length (e.g. 10.0.0.3/24).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Where the addresses come from: `ipam` (given by the control plane), `dhcp` (the guest
    /// took its lease) or `guest-agent` (the guest reports them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl NetworkAttachment {
    /// The groups the NIC is in: its own list, or the project's `default` group.
    pub fn groups(&self) -> Vec<String> {
        self.security_groups
            .clone()
            .unwrap_or_else(|| vec![crate::kinds::security_group::DEFAULT_GROUP.to_string()])
    }

    /// The NIC's name: its own, or nic<position>.
    pub fn nic_name(&self, position: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("nic{position}"))
    }
}

/// The finalizer of the node agent: a bound VM keeps it until its node has removed the domain and
/// every file. The scheduler adds it with the binding; an agent adds it to VMs created already
/// bound (`spec.nodeName`) before it creates anything.
pub const AGENT_FINALIZER: &str = "flotilla.dev/agent";

/// Annotation whose new value asks the agent to restart the VM (`flotilla vm restart`).
pub const RESTART_ANNOTATION: &str = "flotilla.dev/restart-requested-at";

/// What [`is_ssh_key`] accepts (with a maximum length of 16 KiB).
const SSH_KEY_PATTERN: &str = r"^(ssh-rsa|ssh-ed25519|ssh-dss|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com|ssh-rsa-cert-v01@openssh\.com) [^\x00\n\r]*$";
/// What [`is_mac`] accepts and is not multicast (the first octet's lowest bit clear).
const UNICAST_MAC_PATTERN: &str = r"^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$";

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_ssh_key(s: &str) -> bool {
    const TYPES: [&str; 9] = [
        "ssh-rsa ",
        "ssh-ed25519 ",
        "ssh-dss ",
        "ecdsa-sha2-nistp256 ",
        "ecdsa-sha2-nistp384 ",
        "ecdsa-sha2-nistp521 ",
        "sk-ssh-ed25519@openssh.com ",
        "sk-ecdsa-sha2-nistp256@openssh.com ",
        "ssh-rsa-cert-v01@openssh.com ",
    ];
    s.chars().count() <= 16 * 1024
        && !s.contains(['\n', '\r', '\0'])
        && TYPES.iter().any(|t| s.starts_with(t))
}

impl Validate for VirtualMachineSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        match (&self.class, &self.resources) {
            (Some(c), None) => validation::dns_label(errs, &format!("{path}.class"), c),
            (None, Some(r)) => {
                check_cpus(errs, format!("{path}.resources.cpus"), r.cpus);
                check_memory(errs, format!("{path}.resources.memory"), &r.memory);
            }
            (Some(_), Some(_)) => errs.push(
                format!("{path}.resources"),
                "set either class or resources, not both",
            ),
            (None, None) => errs.push(
                format!("{path}.resources"),
                "is required: set resources {cpus, memory} or name a VMClass in class",
            ),
        }
        if let Some(image) = &self.image {
            validation::dns_label(errs, &format!("{path}.image"), image);
        }
        if let Some(boot) = &self.boot {
            validation::host_path(errs, &format!("{path}.boot.kernel"), &boot.kernel);
            if let Some(initrd) = &boot.initrd {
                validation::host_path(errs, &format!("{path}.boot.initrd"), initrd);
            }
            if let Some(cmdline) = &boot.cmdline {
                if cmdline.chars().count() > 4096 || cmdline.contains(['\0', '\n', '\r']) {
                    errs.push(
                        format!("{path}.boot.cmdline"),
                        "must be one line of at most 4096 characters",
                    );
                }
            }
        }
        if let Some(uuid) = &self.adopted_domain {
            if uuid.len() != 36 || !uuid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                errs.push(
                    format!("{path}.adoptedDomain"),
                    format!("{uuid:?} must be a domain UUID"),
                );
            }
            if self.node_name.is_none() {
                errs.push(
                    format!("{path}.nodeName"),
                    "is required for an adopted domain: the node it runs on",
                );
            }
        }
        let source = self.root_disk.as_ref().and_then(|d| d.source.as_ref());
        if self.image.is_none()
            && self.boot.is_none()
            && self.adopted_domain.is_none()
            && source.is_none()
        {
            errs.push(
                format!("{path}.image"),
                "is required: name an Image, or set boot {kernel, initrd, cmdline}",
            );
        }
        if let Some(disk) = &self.root_disk {
            validation::disk_size(errs, &format!("{path}.rootDisk.size"), &disk.size);
        }
        if let Some(source) = source {
            let at = format!("{path}.rootDisk.source");
            match (&source.vm_snapshot, &source.vm) {
                (Some(s), None) => validation::dns_label(errs, &format!("{at}.vmSnapshot"), s),
                (None, Some(vm)) => {
                    validation::dns_label(errs, &format!("{at}.vm"), vm);
                    if source.mode == crate::kinds::volume::CloneMode::Linked {
                        errs.push(
                            format!("{at}.mode"),
                            "a VM's disk can only be copied (full): it goes on changing; snapshot it and clone the snapshot linked",
                        );
                    }
                }
                _ => errs.push(at.clone(), "name one of vmSnapshot and vm"),
            }
            if self.image.is_some() {
                errs.push(
                    format!("{path}.image"),
                    "cannot be set with rootDisk.source: the cloned disk is the VM's system",
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for (i, n) in self.networks.iter().enumerate() {
            validation::dns_label(errs, &format!("{path}.networks[{i}].network"), &n.network);
            let name = n.nic_name(i);
            if n.name.is_some() {
                validation::dns_label(errs, &format!("{path}.networks[{i}].name"), &name);
            }
            if !names.insert(name.clone()) {
                errs.push(
                    format!("{path}.networks[{i}].name"),
                    format!("{name:?} names two NICs"),
                );
            }
            if let Some(ip) = &n.ip {
                if ip.parse::<std::net::Ipv4Addr>().is_err() {
                    errs.push(
                        format!("{path}.networks[{i}].ip"),
                        format!("{ip:?} is not an IPv4 address such as 10.0.0.5"),
                    );
                }
            }
            let groups = n.security_groups.as_deref().unwrap_or_default();
            if groups.len() > 16 {
                errs.push(
                    format!("{path}.networks[{i}].securityGroups"),
                    format!("{} groups: at most 16", groups.len()),
                );
            }
            for (j, group) in groups.iter().enumerate() {
                validation::dns_label(
                    errs,
                    &format!("{path}.networks[{i}].securityGroups[{j}]"),
                    group,
                );
                if groups[..j].contains(group) {
                    errs.push(
                        format!("{path}.networks[{i}].securityGroups[{j}]"),
                        format!("{group:?} is named twice"),
                    );
                }
            }
            if n.allowed_address_pairs.len() > 32 {
                errs.push(
                    format!("{path}.networks[{i}].allowedAddressPairs"),
                    format!("{} pairs: at most 32", n.allowed_address_pairs.len()),
                );
            }
            for (j, pair) in n.allowed_address_pairs.iter().enumerate() {
                if crate::kinds::security_group::parse_ip_cidr(pair).is_none() {
                    errs.push(
                        format!("{path}.networks[{i}].allowedAddressPairs[{j}]"),
                        format!("{pair:?} is not an IPv4 or IPv6 address or network (host bits zero), e.g. 10.0.0.100, 10.0.0.128/25 or fd00:1::100"),
                    );
                }
            }
            if let Some(mac) = &n.mac_address {
                if !is_mac(mac) {
                    errs.push(
                        format!("{path}.networks[{i}].macAddress"),
                        format!("{mac:?} must look like 52:54:00:12:34:56"),
                    );
                } else if u8::from_str_radix(&mac[..2], 16).is_ok_and(|b| b & 1 == 1) {
                    errs.push(
                        format!("{path}.networks[{i}].macAddress"),
                        format!("{mac:?} is a multicast address"),
                    );
                } else if !seen.insert(mac.to_ascii_lowercase()) {
                    errs.push(
                        format!("{path}.networks[{i}].macAddress"),
                        format!("{mac:?} is used twice"),
                    );
                }
            }
        }
        if self.disks.len() > MAX_DISKS {
            errs.push(
                format!("{path}.disks"),
                format!("{} disks: at most {MAX_DISKS}", self.disks.len()),
            );
        }
        for (i, d) in self.disks.iter().enumerate() {
            validation::dns_label(errs, &format!("{path}.disks[{i}].name"), &d.name);
            validation::dns_label(errs, &format!("{path}.disks[{i}].volume"), &d.volume);
            if self.disks[..i].iter().any(|e| e.name == d.name) {
                errs.push(
                    format!("{path}.disks[{i}].name"),
                    format!("{:?} names two disks", d.name),
                );
            }
            if let Some(serial) = &d.serial {
                let fine = (1..=20).contains(&serial.len())
                    && serial
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                if !fine {
                    errs.push(
                        format!("{path}.disks[{i}].serial"),
                        "must be 1 to 20 letters, digits, '.', '_' or '-'",
                    );
                } else if self.disks[..i].iter().any(|e| e.serial == d.serial) {
                    errs.push(
                        format!("{path}.disks[{i}].serial"),
                        format!("{serial:?} is the serial of two disks"),
                    );
                }
            }
            if self.disks[..i].iter().any(|e| e.volume == d.volume) {
                errs.push(
                    format!("{path}.disks[{i}].volume"),
                    format!("volume {:?} is attached twice", d.volume),
                );
            }
        }
        if self.cloud_init == CloudInit::Metadata && self.networks.is_empty() {
            errs.push(
                format!("{path}.cloudInit"),
                "the metadata service is on the VM's overlay networks: attach one in spec.networks, or use the seed",
            );
        }
        for (i, key) in self.ssh_authorized_keys.iter().enumerate() {
            if !is_ssh_key(key) {
                errs.push(
                    format!("{path}.sshAuthorizedKeys[{i}]"),
                    "must be one OpenSSH public key line, such as \"ssh-ed25519 AAAA... user@host\"",
                );
            }
        }
        if let Some(data) = &self.user_data {
            if data.len() > MAX_USER_DATA {
                errs.push(
                    format!("{path}.userData"),
                    format!(
                        "is {} bytes; at most {MAX_USER_DATA} are allowed",
                        data.len()
                    ),
                );
            }
        }
        if let Some(node) = &self.node_name {
            validation::dns_label(errs, &format!("{path}.nodeName"), node);
        }
        validation::labels(errs, &format!("{path}.nodeSelector"), &self.node_selector);
        if let Some(a) = &self.affinity {
            a.validate(&format!("{path}.affinity"), errs);
        }
        if let Some(p) = &self.placement_policy {
            validation::dns_label(errs, &format!("{path}.placementPolicy"), p);
        }
    }
}

impl Validate for VirtualMachineStatus {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if let Some(node) = &self.node_name {
            validation::dns_label(errs, &format!("{path}.nodeName"), node);
        }
        for (i, ip) in self.ips.iter().enumerate() {
            if ip.parse::<std::net::IpAddr>().is_err() {
                errs.push(
                    format!("{path}.ips[{i}]"),
                    format!("{ip:?} is not an IP address"),
                );
            }
        }
    }
}

crate::define_kind! {
    /// A virtual machine.
    VirtualMachine {
        spec: VirtualMachineSpec,
        status: VirtualMachineStatus,
        plural: "virtualmachines",
        singular: "virtualmachine",
        short_names: ["vm", "vms"],
        namespaced: true,
        field_selectors: ["spec.nodeName", "status.phase", "status.nodeName", "status.migration.targetNode"],
        columns: [
            "PHASE" => "status.phase",
            "NODE" => "status.nodeName",
            "IP" => "status.ips[0]",
            "POWER" => "spec.powerState" (wide),
            "CLASS" => "spec.class" (wide),
            "CPUS" => "spec.resources.cpus" (wide),
            "MEMORY" => "spec.resources.memory" (wide),
            "IMAGE" => "spec.image" (wide),
            "IPS" => "status.ips" (wide)
        ],
        set_once: ["spec.nodeName", "spec.adoptedDomain", "spec.rootDisk.source"],
    }
}
