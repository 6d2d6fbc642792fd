//! Domain XML: golden files, well-formedness with hostile strings, and libvirt accepting it.

use std::path::PathBuf;

use flotilla_agent::domain::{
    disk_target, flotilla_uid, owner, DomainSpec, KernelBoot, NetworkSource, Nic, Owner, VirtType,
    VolumeDisk,
};
use flotilla_agent::libvirt::Libvirt;

fn spec(virt_type: VirtType, hostile: bool) -> DomainSpec {
    let evil = "x'\"></name><devices><disk type='file'><source file='/etc/shadow'/></disk>&\u{1}";
    DomainSpec {
        virt_type,
        name: if hostile {
            format!("default_{evil}")
        } else {
            "default_web".into()
        },
        uuid: "6f1c2a9e-3b7d-4c1e-9a55-2d0f6b8e4c11".into(),
        project: "default".into(),
        vm_name: if hostile { evil.into() } else { "web".into() },
        cluster_id: "0c1a55e5-9d7b-4f3e-8a21-5b6c7d8e9f00".into(),
        node: "node-1".into(),
        cpus: 2,
        memory_bytes: 2 << 30,
        boot: Some(KernelBoot {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: Some(if hostile {
                format!("console=ttyS0 {evil}")
            } else {
                "console=ttyS0".into()
            }),
        }),
        root_disk: Some(PathBuf::from("/var/lib/flotilla/vms/6f1c2a9e/root.qcow2")),
        disks: vec![
            VolumeDisk {
                volume: "data".into(),
                path: PathBuf::from("/var/lib/flotilla/pools/default/0b7e2f4c-1d3a.qcow2"),
                format: "qcow2",
                virtio: true,
                target: disk_target("vd", 1),
                serial: flotilla_types::kinds::disk_serial("0b7e2f4c-1d3a-4e5f-8a9b-0c1d2e3f4a5b"),
                read_only: false,
                shareable: false,
                network: None,
            },
            VolumeDisk {
                volume: "ceph".into(),
                path: PathBuf::new(),
                format: "raw",
                virtio: true,
                target: disk_target("vd", 2),
                serial: flotilla_types::kinds::disk_serial("5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9"),
                read_only: false,
                shareable: false,
                network: Some(NetworkSource {
                    protocol: "rbd",
                    name: "flotilla/5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9".into(),
                    hosts: vec![
                        "10.0.0.1:6789".into(),
                        "mon2".into(),
                        "[fd00::3]:3300".into(),
                    ],
                    auth: Some((
                        "flotilla".into(),
                        "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d".into(),
                    )),
                    initiator: None,
                    identity: None,
                }),
            },
            VolumeDisk {
                volume: "lun".into(),
                path: PathBuf::new(),
                format: "raw",
                virtio: true,
                target: disk_target("vd", 3),
                serial: flotilla_types::kinds::disk_serial("9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"),
                read_only: false,
                shareable: false,
                network: Some(NetworkSource {
                    protocol: "iscsi",
                    name: "iqn.2026-12.dev.flotilla:array/3".into(),
                    hosts: vec!["10.0.0.9:3260".into()],
                    auth: None,
                    initiator: Some("iqn.2026-12.dev.flotilla:nodes".into()),
                    identity: None,
                }),
            },
            VolumeDisk {
                volume: "nfs".into(),
                path: PathBuf::new(),
                format: "qcow2",
                virtio: true,
                target: disk_target("vd", 4),
                serial: flotilla_types::kinds::disk_serial("3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f"),
                read_only: false,
                shareable: false,
                network: Some(NetworkSource {
                    protocol: "nfs",
                    name: "/srv/vms/3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f.qcow2".into(),
                    hosts: vec!["nfs1".into()],
                    auth: None,
                    initiator: None,
                    identity: Some(("+64055".into(), "+64055".into())),
                }),
            },
            VolumeDisk {
                volume: "shared".into(),
                path: PathBuf::from("/var/lib/flotilla/pools/default/7c8d9e0f-2a3b.raw"),
                format: "raw",
                virtio: false,
                target: disk_target("sd", 1),
                serial: "7c8d9e0f-2a3b-4c5d-9".into(),
                read_only: true,
                shareable: true,
                network: None,
            },
        ],
        seed_iso: Some(PathBuf::from("/var/lib/flotilla/vms/6f1c2a9e/seed.iso")),
        openstack_sysinfo: false,
        nics: vec![
            Nic {
                mac: "02:46:4c:0a:0b:0c".into(),
                bridge: "fb-4096".into(),
                tap: Some("ft0123456789ab".into()),
                mtu: 1450,
                vlan: None,
            },
            Nic {
                mac: "52:54:00:12:34:56".into(),
                bridge: "br0".into(),
                tap: None,
                mtu: 1500,
                vlan: Some(42),
            },
        ],
        console_log: PathBuf::from("/var/lib/flotilla/vms/6f1c2a9e/console.log"),
        serial_socket: PathBuf::from("/var/lib/flotilla/vms/6f1c2a9e/serial.sock"),
    }
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("FLOTILLA_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs; FLOTILLA_UPDATE_GOLDEN=1 rewrites it. Got:\n{actual}",
        path.display()
    );
}

#[test]
fn qemu_domain_matches_the_golden_file() {
    golden("qemu-domain.xml", &spec(VirtType::Qemu, false).to_xml());
    golden("kvm-domain.xml", &spec(VirtType::Kvm, false).to_xml());
}

#[test]
fn hostile_strings_stay_text() {
    let xml = spec(VirtType::Qemu, true).to_xml();
    golden("hostile-domain.xml", &xml);
    let doc = roxmltree::Document::parse(&xml).expect("well-formed XML");
    let root = doc.root_element();
    let devices = root.children().find(|n| n.has_tag_name("devices")).unwrap();
    let disks: Vec<_> = devices
        .children()
        .filter(|n| n.has_tag_name("disk"))
        .collect();
    assert_eq!(disks.len(), 7, "no disk was injected");
    assert!(
        !xml.contains("/etc/shadow'/>"),
        "the injected element is text, not markup"
    );
    let name = root
        .children()
        .find(|n| n.has_tag_name("name"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        name.starts_with("default_x'\"></name>"),
        "the name survives as text: {name}"
    );
    assert_eq!(
        flotilla_uid(&xml).as_deref(),
        Some("6f1c2a9e-3b7d-4c1e-9a55-2d0f6b8e4c11")
    );
}

/// The metadata names the cluster and node that own the domain; domains written before it did
/// name only the VM.
#[test]
fn ownership_is_read_back_from_the_metadata() {
    let xml = spec(VirtType::Qemu, false).to_xml();
    assert_eq!(
        owner(&xml),
        Some(Owner {
            uid: "6f1c2a9e-3b7d-4c1e-9a55-2d0f6b8e4c11".into(),
            cluster: Some("0c1a55e5-9d7b-4f3e-8a21-5b6c7d8e9f00".into()),
            node: Some("node-1".into()),
        })
    );
    let legacy =
        "<domain><metadata><flotilla:vm xmlns:flotilla=\"https://flotilla.dev/xmlns/domain/1\">\
                  <flotilla:uid>u-1</flotilla:uid></flotilla:vm></metadata></domain>";
    assert_eq!(
        owner(legacy),
        Some(Owner {
            uid: "u-1".into(),
            cluster: None,
            node: None
        })
    );
    // Another prefix for the same namespace is the same metadata.
    let other_prefix = legacy
        .replace("flotilla:", "f:")
        .replace("xmlns:flotilla", "xmlns:f");
    assert_eq!(owner(&other_prefix).map(|o| o.uid).as_deref(), Some("u-1"));
    assert_eq!(owner("<domain><name>x</name></domain>"), None);
}

/// libvirt's own parser accepts the domain and keeps the name and metadata intact.
#[tokio::test]
async fn libvirt_accepts_the_domain() {
    let lv = Libvirt::open("test:///default").await.unwrap();
    let mut s = spec(VirtType::Test, false);
    s.name = "default_odd-<&>-name".into();
    lv.define(s.to_xml()).await.unwrap();
    let listed = lv.list().await.unwrap();
    let d = listed.iter().find(|d| d.uuid == s.uuid).expect("defined");
    assert_eq!(d.name, "default_odd-<&>-name");
    let owner = d.owner.as_ref().expect("libvirt keeps Flotilla's metadata");
    assert_eq!(owner.uid, s.uuid);
    assert_eq!(owner.cluster.as_deref(), Some(s.cluster_id.as_str()));
    assert_eq!(owner.node.as_deref(), Some("node-1"));
    assert_eq!((d.cpus, d.memory_kib), (2, 2 << 20));
    lv.start(&s.uuid).await.unwrap();
    assert_eq!(
        lv.state(&s.uuid).await.unwrap(),
        Some(flotilla_agent::libvirt::DomainState::Running)
    );
    lv.remove(&s.uuid).await.unwrap();
    assert_eq!(lv.state(&s.uuid).await.unwrap(), None);
}

/// A VM whose cloud-init reads the metadata service has no seed disk and presents itself as
/// OpenStack Nova (what cloud-init's ds-identify looks for), with its uid as the SMBIOS UUID.
#[test]
fn a_metadata_vm_presents_itself_as_openstack_without_a_seed() {
    let mut spec = spec(VirtType::Qemu, false);
    spec.seed_iso = None;
    spec.openstack_sysinfo = true;
    let xml = spec.to_xml();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let entry = |name: &str| {
        doc.descendants()
            .find(|n| n.has_tag_name("entry") && n.attribute("name") == Some(name))
            .and_then(|n| n.text())
            .map(str::to_string)
    };
    assert_eq!(entry("product").as_deref(), Some("OpenStack Nova"));
    assert_eq!(entry("uuid"), Some(spec.uuid.clone()));
    assert!(doc
        .descendants()
        .any(|n| n.has_tag_name("smbios") && n.attribute("mode") == Some("sysinfo")));
    assert!(!xml.contains("seed.iso") && !xml.contains("cdrom"), "{xml}");
}

/// Volumes are disks with the volume's serial and an alias naming the volume, which the agent
/// reads back from the live XML; a q35 domain has spare PCIe root ports to plug disks into.
/// libvirt's QEMU driver keeps all of it (the test driver ignores most of it).
#[tokio::test]
async fn qemu_libvirt_keeps_volume_disks_and_spare_root_ports() {
    use flotilla_agent::libvirt::{disks_of, LiveDisk};
    let lv = Libvirt::open("qemu:///system")
        .await
        .expect("libvirtd is running (make test starts it)");
    let mut s = spec(VirtType::Qemu, false);
    s.uuid = uuid::Uuid::new_v4().to_string();
    s.name = format!("default_xml-{}", &s.uuid[..8]);
    lv.define(s.to_xml()).await.unwrap();
    let xml = lv.xml(&s.uuid).await.unwrap().unwrap();
    lv.remove(&s.uuid).await.unwrap();
    let disks = disks_of(&xml);
    let volumes: Vec<_> = disks.iter().filter(|d| d.volume.is_some()).collect();
    assert_eq!(
        volumes,
        vec![
            &LiveDisk {
                target: "vdb".into(),
                bus: "virtio".into(),
                source: Some("/var/lib/flotilla/pools/default/0b7e2f4c-1d3a.qcow2".into()),
                serial: Some("0b7e2f4c-1d3a-4e5f-8".into()),
                volume: Some("data".into()),
            },
            // An RBD volume's source is the image's name: what growing it looks for.
            &LiveDisk {
                target: "vdc".into(),
                bus: "virtio".into(),
                source: Some("flotilla/5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9".into()),
                serial: Some("5e6f7a8b-9c0d-4e1f-a".into()),
                volume: Some("ceph".into()),
            },
            &LiveDisk {
                target: "vdd".into(),
                bus: "virtio".into(),
                source: Some("iqn.2026-12.dev.flotilla:array/3".into()),
                serial: Some("9a8b7c6d-5e4f-4a3b-9".into()),
                volume: Some("lun".into()),
            },
            &LiveDisk {
                target: "vde".into(),
                bus: "virtio".into(),
                source: Some("/srv/vms/3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f.qcow2".into()),
                serial: Some("3c4d5e6f-7a8b-4c9d-8".into()),
                volume: Some("nfs".into()),
            },
            &LiveDisk {
                target: "sdb".into(),
                bus: "scsi".into(),
                source: Some("/var/lib/flotilla/pools/default/7c8d9e0f-2a3b.raw".into()),
                serial: Some("7c8d9e0f-2a3b-4c5d-9".into()),
                volume: Some("shared".into()),
            },
        ],
        "{xml}"
    );
    // Every device's port is taken, and eight stay free.
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let ports: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("controller") && n.attribute("model") == Some("pcie-root-port"))
        .filter_map(|n| n.attribute("index").map(str::to_string))
        .collect();
    let used: std::collections::HashSet<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("address") && n.attribute("type") == Some("pci"))
        .filter_map(|n| {
            let bus = n.attribute("bus")?;
            u32::from_str_radix(bus.trim_start_matches("0x"), 16)
                .ok()
                .map(|b| b.to_string())
        })
        .collect();
    let free = ports.iter().filter(|p| !used.contains(*p)).count();
    assert!(
        free >= flotilla_agent::domain::SPARE_ROOT_PORTS,
        "{free} free root ports of {}: {xml}",
        ports.len()
    );
}

/// The consoles listen on unix sockets only: no VNC port, no address, no password on the wire,
/// and the serial console is a socket the agent shares (not a pty anyone on the host opens).
#[test]
fn consoles_are_unix_sockets_only() {
    let xml = spec(VirtType::Qemu, false).to_xml();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let graphics: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("graphics"))
        .collect();
    assert_eq!(graphics.len(), 1);
    for attr in ["port", "autoport", "listen", "passwd", "websocket"] {
        assert_eq!(graphics[0].attribute(attr), None, "graphics has no {attr}");
    }
    let listens: Vec<_> = graphics[0]
        .children()
        .filter(|n| n.has_tag_name("listen"))
        .map(|n| n.attribute("type"))
        .collect();
    assert_eq!(listens, vec![Some("socket")]);
    for device in ["serial", "console"] {
        let node = doc
            .descendants()
            .find(|n| n.has_tag_name(device) && n.parent().unwrap().has_tag_name("devices"))
            .unwrap();
        assert_eq!(node.attribute("type"), Some("unix"), "{device}");
        let source = node.children().find(|n| n.has_tag_name("source")).unwrap();
        assert_eq!(source.attribute("mode"), Some("bind"));
        assert!(source.attribute("path").unwrap().ends_with("/serial.sock"));
    }
    assert_eq!(
        flotilla_agent::consoles::vnc_socket_of(
            "<domain><devices><graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-3-x/vnc.sock'><listen type='socket'/></graphics></devices></domain>"
        ),
        Some("/var/lib/libvirt/qemu/domain-3-x/vnc.sock".into())
    );
}
