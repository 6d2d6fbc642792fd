//! Boot benchmark (`make bench-boot`): API-accepted -> domain running for 20 tiny VMs on real
//! QEMU (TCG), through the whole system (scheduler, agent, disks, seed, libvirt), beside raw
//! libvirt define+start of the same domain XML measured in the same run. Prints p50/p99 and the
//! ratio. Then, one at a time, API-accepted -> the guest holds its address (the guest's init
//! prints its DHCP lease; the VM's status confirms it) for tiny VMs with a NIC on an overlay
//! network, beside the same guest without a NIC (API-accepted -> its init has run). Ends with a
//! JSON summary line. Needs libvirtd and the tiny guest (`make bench-boot` builds it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use flotilla_agent::domain::{DomainSpec, KernelBoot, VirtType};
use flotilla_agent::libvirt::{DomainState, Libvirt};
use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::TestCluster;
use flotilla_types::registry::lookup;
use serde_json::json;

const N: usize = 20;
/// VMs per side in the address comparison.
const M: usize = 5;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    if let Ok(filter) = std::env::var("FLOTILLA_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    assert!(
        std::process::Command::new(repo.join("scripts/build-tiny-guest.sh"))
            .status()
            .unwrap()
            .success()
    );
    let guest = repo.join("target/guests/tiny");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let libvirt = Libvirt::open("qemu:///system")
        .await
        .expect("libvirtd is running");
    let tag = rand::random::<u32>() % 100_000;

    // Raw libvirt: the same kind of domain (kernel, initrd, a seed ISO, console log), define+start.
    let raw_dir = tmp.path().join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    std::fs::set_permissions(
        &raw_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let seed = raw_dir.join("seed.iso");
    let input = flotilla_agent::cloudinit::SeedInput {
        instance_id: "raw",
        nics: &[],
        hostname: "raw",
        ssh_authorized_keys: &[],
        user_data: None,
    };
    flotilla_agent::cloudinit::write_seed(&input, &seed)
        .await
        .unwrap();
    let mut raw = Vec::new();
    let mut raw_uuids = Vec::new();
    for i in 0..N {
        let uuid = format!(
            "00000000-0000-4000-8000-{:012}",
            tag as u64 * 100 + i as u64
        );
        let spec = DomainSpec {
            virt_type: VirtType::Qemu,
            name: format!("bench-raw-{tag}-{i}"),
            uuid: uuid.clone(),
            project: "bench".into(),
            vm_name: format!("raw-{i}"),
            // Not the cluster's: the agent beside it must leave these domains alone.
            cluster_id: "bench-raw".into(),
            node: "raw".into(),
            cpus: 1,
            memory_bytes: 128 << 20,
            boot: Some(KernelBoot {
                kernel: guest.join("vmlinuz").display().to_string(),
                initrd: Some(guest.join("initramfs.gz").display().to_string()),
                cmdline: Some("console=ttyS0".into()),
            }),
            root_disk: None,
            nics: Vec::new(),
            disks: Vec::new(),
            seed_iso: Some(seed.clone()),
            openstack_sysinfo: false,
            console_log: raw_dir.join(format!("console-{i}.log")),
            serial_socket: raw_dir.join(format!("serial-{i}.sock")),
        };
        let t = Instant::now();
        libvirt.define(spec.to_xml()).await.unwrap();
        libvirt.start(&uuid).await.unwrap();
        raw.push(t.elapsed());
        raw_uuids.push(uuid);
    }
    // Both sides keep their guests running until all are started: the same CPU contention.
    for uuid in &raw_uuids {
        libvirt.remove(uuid).await.unwrap();
    }

    // Flotilla: server, controllers and agent in this process; one VM at a time.
    let cluster = TestCluster::start().await;
    let (server, admin) = (&cluster.server, &cluster.admin);
    let token = cluster.join_token().await;
    let mut agent = AgentConfig::new(
        vec![server.url.clone()],
        "bench-node",
        tmp.path().join("agent"),
    );
    agent.join_token = Some(token);
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(1);
    // 20 one-CPU guests on a 2-CPU host: allow it, as raw libvirt does.
    agent.cpu_overcommit = 16.0;
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt.clone(), rx));
    let nodes = lookup("node").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = admin.get(nodes, None, "bench-node").await;
        if n.is_ok_and(|n| {
            n["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "the node became Ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vms = lookup("vm").unwrap();
    let mut flot = Vec::new();
    for i in 0..N {
        let name = format!("bench-{tag}-{i}");
        let vm = json!({"metadata": {"name": name}, "spec": {"resources": {"cpus": 1, "memory": "128Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0"}}});
        let created = admin.create(vms, Some("default"), &vm).await.unwrap();
        let accepted = Instant::now();
        let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
        loop {
            if libvirt.state(&uid).await.unwrap() == Some(DomainState::Running) {
                break;
            }
            assert!(
                accepted.elapsed() < Duration::from_secs(60),
                "{name} did not start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        flot.push(accepted.elapsed());
    }
    for i in 0..N {
        admin
            .delete(vms, Some("default"), &format!("bench-{tag}-{i}"))
            .await
            .unwrap();
    }
    for i in 0..N {
        let name = format!("bench-{tag}-{i}");
        while admin.get(vms, Some("default"), &name).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Addresses: the same guest with a NIC taking its lease over DHCP, beside it without a NIC.
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "bench"}, "spec": {"cidr": "10.66.0.0/24"}}),
        )
        .await
        .unwrap();
    let console = |uid: &str| {
        std::fs::read_to_string(tmp.path().join("agent/vms").join(uid).join("console.log"))
            .unwrap_or_default()
    };
    let (mut plain, mut to_lease, mut to_status) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..M {
        for with_nic in [false, true] {
            let name = format!("addr-{tag}-{i}-{with_nic}");
            let mut vm = json!({"metadata": {"name": name}, "spec": {"resources": {"cpus": 1, "memory": "128Mi"},
                "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 flotilla.dhcp"}}});
            if with_nic {
                vm["spec"]["networks"] = json!([{"network": "bench"}]);
            }
            let created = admin.create(vms, Some("default"), &vm).await.unwrap();
            let accepted = Instant::now();
            let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
            let marker = if with_nic {
                "FLOTILLA-IP"
            } else {
                "FLOTILLA-SEED-FILES"
            };
            let mut confirmed = None;
            while !console(&uid).contains(marker) {
                assert!(
                    accepted.elapsed() < Duration::from_secs(120),
                    "{name}: no {marker}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let seen = accepted.elapsed();
            if with_nic {
                while confirmed.is_none() {
                    let v = admin.get(vms, Some("default"), &name).await.unwrap();
                    if v["status"]["interfaces"][0]["source"] == "dhcp" {
                        confirmed = Some(accepted.elapsed());
                    }
                    assert!(
                        accepted.elapsed() < Duration::from_secs(120),
                        "{name}: no lease in status"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                to_lease.push(seen);
                to_status.push(confirmed.unwrap());
            } else {
                plain.push(seen);
            }
            admin.delete(vms, Some("default"), &name).await.unwrap();
            while admin.get(vms, Some("default"), &name).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    plain.sort();
    to_lease.sort();
    to_status.sort();
    let (p50, l50, s50) = (pct(&plain, 0.5), pct(&to_lease, 0.5), pct(&to_status, 0.5));
    println!("no NIC: API-accepted -> guest init done: {M} VMs, p50 {p50:.0} ms");
    println!("NIC on an overlay: API-accepted -> guest holds its DHCP lease: {M} VMs, p50 {l50:.0} ms; -> status says dhcp: p50 {s50:.0} ms");

    raw.sort();
    flot.sort();
    let (r50, r99, f50, f99) = (
        pct(&raw, 0.5),
        pct(&raw, 0.99),
        pct(&flot, 0.5),
        pct(&flot, 0.99),
    );
    println!("raw libvirt define+start: {N} VMs, p50 {r50:.0} ms, p99 {r99:.0} ms");
    println!("flotilla API-accepted -> domain running: {N} VMs, p50 {f50:.0} ms, p99 {f99:.0} ms");
    println!("ratio (p50): {:.2}x", f50 / r50);
    println!(
        "{}",
        json!({"vms": N, "raw_p50_ms": r50.round(), "raw_p99_ms": r99.round(), "flotilla_p50_ms": f50.round(),
        "flotilla_p99_ms": f99.round(), "ratio_p50": (f50 / r50 * 100.0).round() / 100.0,
        "no_nic_init_p50_ms": p50.round(), "nic_lease_p50_ms": l50.round(), "nic_lease_in_status_p50_ms": s50.round()})
    );
}
