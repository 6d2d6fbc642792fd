//! The libvirt domain of a VM, as typed values serialised through [`crate::xml`].

use std::path::PathBuf;

use crate::xml::Element;

/// The XML namespace of Flotilla's metadata element in domain XML.
pub const METADATA_NS: &str = "https://flotilla.dev/xmlns/domain/1";

/// `kvm` (hardware virtualisation) or `qemu` (TCG emulation); `test` for libvirt's test driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtType {
    Kvm,
    Qemu,
    Test,
}

impl VirtType {
    pub fn as_str(self) -> &'static str {
        match self {
            VirtType::Kvm => "kvm",
            VirtType::Qemu => "qemu",
            VirtType::Test => "test",
        }
    }
}

#[derive(Clone, Debug)]
pub struct KernelBoot {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

/// A NIC: virtio on a host bridge, in `spec.networks` order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub mac: String,
    pub bridge: String,
    /// The tap's name, when the agent names it (its security group rules name it too).
    pub tap: Option<String>,
    pub mtu: u32,
    /// The 802.1Q VLAN the NIC's port carries untagged (bridged networks with `spec.vlan`):
    /// libvirt sets it on a Linux bridge that filters VLANs (libvirt 11.1 and later).
    pub vlan: Option<u16>,
}

/// A volume attached as a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeDisk {
    /// The Volume's name: the disk's alias is `ua-<volume>`, so the agent knows it in live XML.
    pub volume: String,
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// virtio-blk (`true`) or virtio-scsi.
    pub virtio: bool,
    /// The device name in the domain (vdb, sdb, ...).
    pub target: String,
    /// What the guest reads as the disk's serial (`/dev/disk/by-id/virtio-<serial>`).
    pub serial: String,
    pub read_only: bool,
    /// Attached to several VMs: QEMU must not lock it for itself.
    pub shareable: bool,
    /// Set when QEMU opens the volume over the network (RBD) instead of the file `path`.
    pub network: Option<NetworkSource>,
}

/// A volume QEMU opens itself over the network: an RBD image through librbd, an iSCSI LUN
/// through libiscsi, a file on an NFS export through libnfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSource {
    /// `rbd`, `iscsi` or `nfs`.
    pub protocol: &'static str,
    /// What the protocol calls the volume (`pool/image` for RBD, `target/lun` for iSCSI, the
    /// file's path on the server for NFS).
    pub name: String,
    /// The servers to ask (Ceph monitors), `host` or `host:port` (`[v6]:port`).
    pub hosts: Vec<String>,
    /// The user and the libvirt secret (by UUID) holding its key.
    pub auth: Option<(String, String)>,
    /// The iSCSI initiator name QEMU logs in as.
    pub initiator: Option<String>,
    /// The user and group QEMU acts as on an NFS server (`+uid`, `+gid`).
    pub identity: Option<(String, String)>,
}

impl NetworkSource {
    fn host_element(host: &str) -> Element {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port))
                if port.bytes().all(|b| b.is_ascii_digit())
                    && (!name.contains(':') || name.starts_with('[')) =>
            {
                (name, Some(port))
            }
            _ => (host, None),
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let host = Element::new("host").attr("name", name);
        match port {
            Some(port) => host.attr("port", port),
            None => host,
        }
    }

    fn source(&self) -> Element {
        Element::new("source")
            .attr("protocol", self.protocol)
            .attr("name", &self.name)
            .children(self.hosts.iter().map(|h| Self::host_element(h)))
            .children(
                self.initiator.as_ref().map(|iqn| {
                    Element::new("initiator").child(Element::new("iqn").attr("name", iqn))
                }),
            )
            .children(self.identity.as_ref().map(|(user, group)| {
                Element::new("identity")
                    .attr("user", user)
                    .attr("group", group)
            }))
    }

    fn auth(&self) -> Option<Element> {
        let (user, secret) = self.auth.as_ref()?;
        Some(
            Element::new("auth").attr("username", user).child(
                Element::new("secret")
                    .attr("type", "ceph")
                    .attr("uuid", secret),
            ),
        )
    }
}

impl VolumeDisk {
    pub fn to_element(&self) -> Element {
        let bus = if self.virtio { "virtio" } else { "scsi" };
        let source = match &self.network {
            Some(net) => net.source(),
            None => Element::new("source").attr("file", self.path.display()),
        };
        Element::new("disk")
            .attr(
                "type",
                if self.network.is_some() {
                    "network"
                } else {
                    "file"
                },
            )
            .attr("device", "disk")
            .child(
                Element::new("driver")
                    .attr("name", "qemu")
                    .attr("type", self.format)
                    .attr("discard", "unmap"),
            )
            .children(self.network.as_ref().and_then(NetworkSource::auth))
            .child(source)
            .child(
                Element::new("target")
                    .attr("dev", &self.target)
                    .attr("bus", bus),
            )
            .child(Element::leaf("serial", &self.serial))
            .children(self.read_only.then(|| Element::new("readonly")))
            .children(self.shareable.then(|| Element::new("shareable")))
            .child(Element::new("alias").attr(
                "name",
                format!("{}{}", crate::libvirt::VOLUME_ALIAS, self.volume),
            ))
    }

    /// The XML libvirt takes to plug or unplug it.
    pub fn to_xml(&self) -> String {
        self.to_element().render()
    }
}

/// The device name of the `index`th disk on a bus: `prefix` a, b, ..., z, aa, ab, ...
pub fn disk_target(prefix: &str, index: usize) -> String {
    let mut name = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        name.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    name.reverse();
    format!("{prefix}{}", String::from_utf8(name).expect("ASCII"))
}

/// PCIe root ports a q35 domain gets beyond those its devices take, so that this many virtio
/// disks can be plugged while it runs (each takes a port of its own; more need a restart).
pub const SPARE_ROOT_PORTS: usize = 8;

#[derive(Clone, Debug)]
pub struct DomainSpec {
    pub virt_type: VirtType,
    /// The libvirt name: `<project>_<vm>` (`_` cannot occur in either, so it is unambiguous).
    pub name: String,
    pub uuid: String,
    pub project: String,
    pub vm_name: String,
    /// The cluster and node that own the domain, recorded in its metadata: an agent removes only
    /// domains of its own cluster and node.
    pub cluster_id: String,
    pub node: String,
    pub cpus: u32,
    pub memory_bytes: u128,
    pub boot: Option<KernelBoot>,
    pub root_disk: Option<PathBuf>,
    /// Volumes, after the root disk.
    pub disks: Vec<VolumeDisk>,
    pub seed_iso: Option<PathBuf>,
    /// Present the machine as OpenStack Nova (SMBIOS), so cloud-init's OpenStack datasource
    /// reads the metadata service.
    pub openstack_sysinfo: bool,
    pub nics: Vec<Nic>,
    pub console_log: PathBuf,
    /// The unix socket QEMU serves the serial console on; VNC is on a unix socket too, in
    /// libvirt's directory for the domain ([`crate::consoles`]). No TCP port: nothing but
    /// the agent reaches them.
    pub serial_socket: PathBuf,
}

pub fn domain_name(project: &str, vm: &str) -> String {
    format!("{project}_{vm}")
}

impl DomainSpec {
    pub fn to_xml(&self) -> String {
        let mut os = Element::new("os").child(
            Element::leaf("type", "hvm")
                .attr("arch", "x86_64")
                .attr("machine", "q35"),
        );
        if let Some(boot) = &self.boot {
            os = os.child(Element::leaf("kernel", &boot.kernel));
            if let Some(initrd) = &boot.initrd {
                os = os.child(Element::leaf("initrd", initrd));
            }
            if let Some(cmdline) = &boot.cmdline {
                os = os.child(Element::leaf("cmdline", cmdline));
            }
        }
        os = os.child(Element::new("boot").attr("dev", "hd"));
        if self.openstack_sysinfo {
            os = os.child(Element::new("smbios").attr("mode", "sysinfo"));
        }

        let mut devices = Vec::new();
        if let Some(disk) = &self.root_disk {
            devices.push(
                Element::new("disk")
                    .attr("type", "file")
                    .attr("device", "disk")
                    .child(
                        Element::new("driver")
                            .attr("name", "qemu")
                            .attr("type", "qcow2")
                            .attr("discard", "unmap"),
                    )
                    .child(Element::new("source").attr("file", disk.display()))
                    .child(
                        Element::new("target")
                            .attr("dev", "vda")
                            .attr("bus", "virtio"),
                    ),
            );
        }
        devices.extend(self.disks.iter().map(VolumeDisk::to_element));
        if let Some(seed) = &self.seed_iso {
            devices.push(
                Element::new("disk")
                    .attr("type", "file")
                    .attr("device", "cdrom")
                    .child(
                        Element::new("driver")
                            .attr("name", "qemu")
                            .attr("type", "raw"),
                    )
                    .child(Element::new("source").attr("file", seed.display()))
                    .child(
                        Element::new("target")
                            .attr("dev", "sda")
                            .attr("bus", "scsi"),
                    )
                    .child(Element::new("readonly")),
            );
        }
        if self.seed_iso.is_some() || self.disks.iter().any(|d| !d.virtio) {
            // virtio-scsi rather than SATA: cloud kernels (Debian's included) ship no AHCI driver.
            devices.push(
                Element::new("controller")
                    .attr("type", "scsi")
                    .attr("index", 0)
                    .attr("model", "virtio-scsi"),
            );
        }
        for nic in &self.nics {
            // No <bandwidth>: tc police is missing on kernels like CI's, and libvirt fails then.
            let mut interface = Element::new("interface")
                .attr("type", "bridge")
                .child(Element::new("mac").attr("address", &nic.mac))
                .child(Element::new("source").attr("bridge", &nic.bridge));
            if let Some(tap) = &nic.tap {
                interface = interface.child(Element::new("target").attr("dev", tap));
            }
            interface = interface
                .child(Element::new("model").attr("type", "virtio"))
                .child(Element::new("mtu").attr("size", nic.mtu));
            if let Some(vlan) = nic.vlan {
                interface = interface
                    .child(Element::new("vlan").child(Element::new("tag").attr("id", vlan)));
            }
            devices.push(interface);
        }
        if self.virt_type != VirtType::Test {
            // Ports for disks plugged while it runs. libvirt gives its devices the explicit
            // ports first, so these count them in: one each for the root disk, the SCSI, USB and
            // virtio-serial controllers, the RNG, the balloon, each NIC and virtio disk.
            let taken = 6 + self.nics.len() + self.disks.iter().filter(|d| d.virtio).count();
            devices.push(
                Element::new("controller")
                    .attr("type", "pci")
                    .attr("index", 0)
                    .attr("model", "pcie-root"),
            );
            for _ in 0..taken + SPARE_ROOT_PORTS {
                devices.push(
                    Element::new("controller")
                        .attr("type", "pci")
                        .attr("model", "pcie-root-port"),
                );
            }
            // The serial console on a unix socket, with everything also written to the log file.
            let serial_source = || {
                Element::new("source")
                    .attr("mode", "bind")
                    .attr("path", self.serial_socket.display())
            };
            devices.push(
                Element::new("serial")
                    .attr("type", "unix")
                    .child(serial_source())
                    .child(
                        Element::new("log")
                            .attr("file", self.console_log.display())
                            .attr("append", "on"),
                    )
                    .child(Element::new("target").attr("port", 0)),
            );
            devices.push(
                Element::new("console")
                    .attr("type", "unix")
                    .child(serial_source())
                    .child(
                        Element::new("target")
                            .attr("type", "serial")
                            .attr("port", 0),
                    ),
            );
            devices.push(
                Element::new("graphics")
                    .attr("type", "vnc")
                    .child(Element::new("listen").attr("type", "socket")),
            );
            devices.push(
                Element::new("rng")
                    .attr("model", "virtio")
                    .child(Element::leaf("backend", "/dev/urandom").attr("model", "random")),
            );
            devices.push(Element::new("memballoon").attr("model", "virtio"));
            // The guest agent's channel: guests running qemu-guest-agent report their addresses.
            devices.push(
                Element::new("channel").attr("type", "unix").child(
                    Element::new("target")
                        .attr("type", "virtio")
                        .attr("name", "org.qemu.guest_agent.0"),
                ),
            );
        }

        let metadata = Element::new("metadata").child(
            Element::new("flotilla:vm")
                .attr("xmlns:flotilla", METADATA_NS)
                .child(Element::leaf("flotilla:uid", &self.uuid))
                .child(Element::leaf("flotilla:project", &self.project))
                .child(Element::leaf("flotilla:name", &self.vm_name))
                .child(Element::leaf("flotilla:cluster", &self.cluster_id))
                .child(Element::leaf("flotilla:node", &self.node)),
        );
        let mut domain = Element::new("domain")
            .attr("type", self.virt_type.as_str())
            .child(Element::leaf("name", &self.name))
            .child(Element::leaf("uuid", &self.uuid))
            .child(metadata)
            .child(Element::leaf("memory", (self.memory_bytes / 1024).max(1)).attr("unit", "KiB"))
            .child(Element::leaf("vcpu", self.cpus))
            .children(self.openstack_sysinfo.then(|| {
                Element::new("sysinfo").attr("type", "smbios").child(
                    Element::new("system")
                        .child(Element::leaf("entry", "Flotilla").attr("name", "manufacturer"))
                        .child(Element::leaf("entry", "OpenStack Nova").attr("name", "product"))
                        .child(Element::leaf("entry", &self.uuid).attr("name", "serial"))
                        .child(Element::leaf("entry", &self.uuid).attr("name", "uuid")),
                )
            }))
            .child(os)
            .child(
                Element::new("features")
                    .child(Element::new("acpi"))
                    .child(Element::new("apic")),
            );
        if self.virt_type == VirtType::Kvm {
            domain = domain.child(Element::new("cpu").attr("mode", "host-passthrough"));
        }
        domain
            .child(Element::leaf("on_poweroff", "destroy"))
            .child(Element::leaf("on_reboot", "restart"))
            .child(Element::leaf("on_crash", "destroy"))
            .child(Element::new("devices").children(devices))
            .render()
    }
}

/// Who made a domain, from the Flotilla metadata in its XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The VM's uid.
    pub uid: String,
    /// The cluster and node that created it; None on domains made before Flotilla recorded them.
    pub cluster: Option<String>,
    pub node: Option<String>,
}

/// The Flotilla metadata of a domain's XML, if Flotilla created it.
pub fn owner(xml: &str) -> Option<Owner> {
    if !xml.contains(METADATA_NS) {
        return None;
    }
    let doc = roxmltree::Document::parse(xml).ok()?;
    let vm = doc
        .descendants()
        .find(|n| n.tag_name().namespace() == Some(METADATA_NS) && n.tag_name().name() == "vm")?;
    let text = |name: &str| {
        vm.children()
            .find(|n| n.tag_name().namespace() == Some(METADATA_NS) && n.tag_name().name() == name)
            .and_then(|n| n.text())
            .map(str::to_string)
            .filter(|t| !t.is_empty())
    };
    Some(Owner {
        uid: text("uid")?,
        cluster: text("cluster"),
        node: text("node"),
    })
}

/// The Flotilla uid in a domain's XML, if Flotilla created it.
pub fn flotilla_uid(xml: &str) -> Option<String> {
    owner(xml).map(|o| o.uid)
}
