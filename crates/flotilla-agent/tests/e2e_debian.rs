//! End to end with a real Debian 12 guest and Debian's own cloud-init, booted through Flotilla
//! from an Image (cached on the node, root disk a linked clone): the hostname, the SSH key and a
//! runcmd marker must land, and its NIC on an overlay network must come up with the static
//! address and MTU of cloud-init's network-config, observed through the log API, and confirmed
//! by the guest's qemu-guest-agent in the VM's status; and again without a seed disk, from the
//! metadata service (cloud-init's OpenStack datasource). The guest is built by
//! `scripts/build-debian-guest.sh` (debootstrap, cached between runs). About a minute each.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_agent::domain::VirtType;
use flotilla_agent::libvirt::Libvirt;
use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::TestCluster;
use flotilla_types::registry::lookup;
use serde_json::json;

/// A cluster with one agent on this host's libvirt, and the Debian guest's files.
async fn start(
    node: &str,
) -> (
    TestCluster,
    PathBuf,
    Libvirt,
    tokio::sync::watch::Sender<bool>,
) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    let status = std::process::Command::new(repo.join("scripts/build-debian-guest.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "building the Debian guest failed");
    let guest = repo.join("target/guests/debian");
    let cluster = TestCluster::start().await;
    let token = cluster.join_token().await;
    let mut agent = AgentConfig::new(
        vec![cluster.server.url.clone()],
        node,
        cluster.dir.path().join("agent"),
    );
    agent.join_token = Some(token);
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(5);
    agent.resync = Duration::from_secs(3);
    let libvirt = Libvirt::open("qemu:///system")
        .await
        .expect("libvirtd is running");
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt.clone(), rx));
    (cluster, guest, libvirt, stop)
}

/// The VM's console through the log API once it holds every line of `wanted`.
async fn console_with(
    admin: &flotilla_client::Client,
    name: &str,
    wanted: &[String],
    seconds: u64,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let mut text = Vec::new();
        if let Ok(stream) = admin.vm_log("default", name, false).await {
            let mut stream = Box::pin(stream);
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
                text.extend_from_slice(&chunk);
            }
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        if wanted.iter().all(|w| text.contains(w.as_str())) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cloud-init did not finish in time; the console so far:\n{text}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// user-data whose runcmd prints the hostname, addresses, links and installed keys.
fn reporting_user_data(marker: &str) -> String {
    format!(
        "#cloud-config\nruncmd:\n  - echo FLOTILLA-RUNCMD {marker} > /dev/ttyS0\n  - echo FLOTILLA-HOSTNAME $(hostname) > /dev/ttyS0\n  - \
         ip -o addr show scope global | sed 's/^/FLOTILLA-ADDR /' > /dev/ttyS0\n  - \
         ip -o link show | sed 's/^/FLOTILLA-LINK /' > /dev/ttyS0\n  - \
         cat /home/*/.ssh/authorized_keys | sed 's/^/FLOTILLA-KEY /' > /dev/ttyS0\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_cloud_init_applies_hostname_key_runcmd_and_network_config() {
    let (cluster, guest, libvirt, _stop) = start("debian-node").await;
    let admin = &cluster.admin;
    let (vms, images) = (lookup("vm").unwrap(), lookup("image").unwrap());
    let net = admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.8.0.0/24", "cidr6": "fd00:8::/64"}}),
        )
        .await
        .unwrap();
    let vni = net["status"]["vni"].as_u64().unwrap();
    admin.create(images, Some("default"), &json!({"metadata": {"name": "debian-12"}, "spec": {"source": {"path": guest.join("debian.qcow2")}}})).await.unwrap();
    let n = rand::random::<u32>() % 100_000;
    let (name, marker) = (format!("deb-{n}"), format!("runcmd-{n}"));
    let key = format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFlotillaTestKey{n} test@flotilla");
    let user_data = reporting_user_data(&marker);
    let vm = json!({"metadata": {"name": name}, "spec": {
        "resources": {"cpus": 1, "memory": "1Gi"}, "image": "debian-12", "rootDisk": {"size": "4Gi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initrd.img"), "cmdline": "root=/dev/vda rw console=ttyS0"},
        "sshAuthorizedKeys": [key], "userData": user_data,
        "networks": [{"network": "lan", "ip": "10.8.0.20"}]}});
    admin.create(vms, Some("default"), &vm).await.unwrap();

    // The key line is the last thing runcmd prints: wait for all of it.
    let wanted = [
        format!("FLOTILLA-RUNCMD {marker}"),
        format!("FLOTILLA-KEY {key}"),
    ];
    let log = console_with(admin, &name, &wanted, 240).await;
    assert!(
        log.contains(&format!("FLOTILLA-HOSTNAME {name}")),
        "cloud-init set the hostname:\n{log}"
    );
    assert!(
        log.contains(&format!("FLOTILLA-KEY {key}")),
        "cloud-init installed the SSH key:\n{log}"
    );
    // network-config: the static address, on the NIC with the VM's MAC, with the network's MTU.
    let vm = admin.get(vms, Some("default"), &name).await.unwrap();
    let mac = vm["status"]["interfaces"][0]["macAddress"]
        .as_str()
        .unwrap();
    let mtu = std::fs::read_to_string(format!("/sys/class/net/fb-{vni}/mtu")).unwrap();
    let addr = log
        .lines()
        .find(|l| l.contains("FLOTILLA-ADDR") && l.contains("inet 10.8.0.20/24"))
        .unwrap_or_else(|| panic!("the NIC has its static address:\n{log}"));
    let nic = addr.split_whitespace().nth(2).unwrap();
    // And the IPv6 address IPAM derived from its MAC (the network has a /64).
    let v6 = vm["status"]["ips"][1].as_str().unwrap();
    assert!(v6.starts_with("fd00:8::"), "{}", vm["status"]);
    assert!(
        log.lines()
            .any(|l| l.contains("FLOTILLA-ADDR") && l.contains(&format!("inet6 {v6}/64"))),
        "the NIC has its IPv6 address {v6}:\n{log}"
    );
    let link = log
        .lines()
        .find(|l| l.contains("FLOTILLA-LINK") && l.contains(&format!(" {nic}:")))
        .unwrap_or_else(|| panic!("the NIC {nic} is listed:\n{log}"));
    assert!(
        link.contains(&format!("mtu {} ", mtu.trim())) && link.contains(mac),
        "the NIC has the network's MTU and the VM's MAC: {link}"
    );
    // The guest runs qemu-guest-agent: it confirms the NIC's address.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = admin.get(vms, Some("default"), &name).await.unwrap();
        if v["status"]["interfaces"][0]["source"] == "guest-agent" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the guest agent did not confirm the address: {}",
            v["status"]
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let uid = vm["metadata"]["uid"].as_str().unwrap().to_string();
    admin.delete(vms, Some("default"), &name).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while admin.get(vms, Some("default"), &name).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the VM was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(libvirt.state(&uid).await.unwrap(), None);
}

/// The same Debian image without a seed disk: its cloud-init finds OpenStack (the VM's SMBIOS
/// says OpenStack Nova), takes an address over DHCP, reads the metadata service at
/// 169.254.169.254 on its overlay network, and applies the hostname, the SSH key and the user
/// data from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_cloud_init_reads_the_openstack_metadata_service() {
    let (cluster, guest, _libvirt, _stop) = start("debian-meta").await;
    let admin = &cluster.admin;
    let (vms, images) = (lookup("vm").unwrap(), lookup("image").unwrap());
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.8.1.0/24"}}),
        )
        .await
        .unwrap();
    admin.create(images, Some("default"), &json!({"metadata": {"name": "debian-12"}, "spec": {"source": {"path": guest.join("debian.qcow2")}}})).await.unwrap();
    let n = rand::random::<u32>() % 100_000;
    let (name, marker) = (format!("deb-meta-{n}"), format!("runcmd-{n}"));
    let key = format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFlotillaMetaKey{n} test@flotilla");
    let vm = json!({"metadata": {"name": name}, "spec": {
        "resources": {"cpus": 1, "memory": "1Gi"}, "image": "debian-12", "rootDisk": {"size": "4Gi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initrd.img"), "cmdline": "root=/dev/vda rw console=ttyS0"},
        "cloudInit": "metadata",
        "sshAuthorizedKeys": [key], "userData": reporting_user_data(&marker),
        "networks": [{"network": "lan"}]}});
    let made = admin.create(vms, Some("default"), &vm).await.unwrap();
    let address = made["status"]["ips"][0].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let wanted = [
        format!("FLOTILLA-RUNCMD {marker}"),
        format!("FLOTILLA-KEY {key}"),
    ];
    let log = console_with(admin, &name, &wanted, 300).await;
    eprintln!(
        "created -> cloud-init ran from the metadata service: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        log.contains(&format!("FLOTILLA-HOSTNAME {name}")),
        "the hostname came from meta_data.json:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("FLOTILLA-ADDR") && l.contains(&format!("inet {address}/24"))),
        "the NIC took IPAM's address {address} over DHCP:\n{log}"
    );
    assert!(
        log.contains("OpenStack"),
        "cloud-init used its OpenStack datasource:\n{log}"
    );
    admin.delete(vms, Some("default"), &name).await.unwrap();
}
