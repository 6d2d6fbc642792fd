//! End to end on a real libvirtd with real QEMU guests (TCG): the tiny kernel+initramfs guest
//! boots through Flotilla, mounts its cidata seed and prints the user data's marker.
//!
//! Needs libvirtd and the tiny guest (`scripts/build-tiny-guest.sh`); `make test` provides both.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_agent::domain::VirtType;
use flotilla_agent::libvirt::Libvirt;
use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;

fn tiny_guest() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guests/tiny");
    if !dir.join("initramfs.gz").exists() {
        let status = std::process::Command::new(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-tiny-guest.sh"),
        )
        .status()
        .unwrap();
        assert!(status.success(), "building the tiny guest failed");
    }
    dir.canonicalize().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_guest_boots_and_reads_its_seed() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    let token = cluster.join_token().await;
    let agent_dir = tmp.path().join("agent");
    let mut agent = AgentConfig::new(vec![server.url.clone()], "e2e-node", &agent_dir);
    agent.join_token = Some(token);
    agent.libvirt_uri = "qemu:///system".into();
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(5);
    // Often, so that the unused overlay is seen to go soon after the VM.
    agent.resync = Duration::from_secs(3);
    let libvirt = Libvirt::open("qemu:///system")
        .await
        .expect("libvirtd is running (make test starts it)");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt.clone(), rx));

    let vms = lookup("vm").unwrap();
    // An overlay network: the agent makes its bridge and VXLAN device on this host.
    let net = admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "back"}, "spec": {"cidr": "10.0.0.0/24"}}),
        )
        .await
        .unwrap();
    let vni = net["status"]["vni"].as_u64().unwrap();
    let (bridge, vxlan) = (
        std::path::PathBuf::from(format!("/sys/class/net/fb-{vni}")),
        std::path::PathBuf::from(format!("/sys/class/net/fx-{vni}")),
    );
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let (name, marker) = (format!("tiny-{suffix}"), format!("hello-{suffix}"));
    let vm = json!({"metadata": {"name": name}, "spec": {
        "resources": {"cpus": 1, "memory": "256Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
        "userData": format!("#cloud-config\nflotilla_test_marker: {marker}\n"),
        "networks": [{"network": "back"}],
    }});
    admin.create(vms, Some("default"), &vm).await.unwrap();
    let running = eventually("the VM is Running", 60, async || {
        let v = admin.get(vms, Some("default"), &name).await.ok()?;
        (v["status"]["phase"] == "Running").then_some(v)
    })
    .await;
    let uid = running["metadata"]["uid"].as_str().unwrap().to_string();
    // Its NIC is plugged into the overlay's bridge, which carries the VXLAN device.
    let ports: Vec<String> = std::fs::read_dir(bridge.join("brif"))
        .expect("the overlay's bridge exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(ports.contains(&format!("fx-{vni}")), "{ports:?}");
    assert!(
        ports.contains(&flotilla_agent::firewall::tap_name(&uid, 0)),
        "the guest's tap, named by the agent: {ports:?}"
    );
    // One MTU for the guest's NIC, the bridge and the VXLAN device: 1450 over a 1500-byte
    // underlay, less where the host's uplink is smaller (this machine's is 1400).
    let mtu = |device: &std::path::Path| {
        std::fs::read_to_string(device.join("mtu"))
            .unwrap()
            .trim()
            .to_string()
    };
    let xml = libvirt.xml(&uid).await.unwrap().unwrap();
    assert!(
        xml.contains(&format!("<mtu size='{}'/>", mtu(&bridge))),
        "{xml}"
    );
    assert_eq!(mtu(&bridge), mtu(&vxlan));
    assert!(mtu(&bridge).parse::<u32>().unwrap() <= 1450);
    // Through the log API: the server proxies the agent's copy of the serial console.
    let log = eventually("the guest prints its marker", 90, async || {
        let mut stream = Box::pin(admin.vm_log("default", &name, false).await.ok()?);
        let mut text = Vec::new();
        while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
            text.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        // The seed listing is the last line the guest's init prints: wait for it, not only the marker.
        (text.contains(&format!("FLOTILLA-MARKER {marker}"))
            && text.contains("FLOTILLA-SEED-FILES"))
        .then_some(text)
    })
    .await;
    // Following streams output as it appears; a node's credentials cannot read logs.
    let mut follow = Box::pin(admin.vm_log("default", &name, true).await.unwrap());
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut follow),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert!(!first.is_empty());
    drop(follow);
    assert!(
        log.contains(&format!("FLOTILLA-HOSTNAME {name}")),
        "meta-data carries the hostname:\n{log}"
    );
    assert!(
        log.contains("network-config"),
        "the seed has network-config:\n{log}"
    );

    // Stopping: ACPI shutdown first; this guest ignores it, so after the timeout it is powered off.
    admin
        .patch(
            vms,
            Some("default"),
            &name,
            &json!({"spec": {"powerState": "Stopped"}}),
            false,
        )
        .await
        .unwrap();
    eventually("the VM is Stopped", 60, async || {
        (admin.get(vms, Some("default"), &name).await.ok()?["status"]["phase"] == "Stopped")
            .then_some(())
    })
    .await;
    assert_eq!(
        libvirt.state(&uid).await.unwrap(),
        Some(flotilla_agent::libvirt::DomainState::Stopped)
    );

    admin.delete(vms, Some("default"), &name).await.unwrap();
    eventually("the VM is gone", 60, async || {
        admin
            .get(vms, Some("default"), &name)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert_eq!(
        libvirt.state(&uid).await.unwrap(),
        None,
        "the domain is undefined"
    );
    assert!(
        !agent_dir.join("vms").join(&uid).exists(),
        "the VM's files are removed"
    );
    // No VM uses the overlay any more: its devices go.
    eventually("the unused overlay is removed", 20, async || {
        (!bridge.exists() && !vxlan.exists()).then_some(())
    })
    .await;
}

/// The serial log of `name` through the API, once it contains every one of `wanted`.
async fn log_with(
    admin: &flotilla_client::Client,
    name: &str,
    wanted: &[String],
    seconds: u64,
) -> String {
    eventually(&format!("{name} prints {wanted:?}"), seconds, async || {
        let mut stream = Box::pin(admin.vm_log("default", name, false).await.ok()?);
        let mut text = Vec::new();
        while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
            text.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        wanted.iter().all(|w| text.contains(w)).then_some(text)
    })
    .await
}

/// Two tiny guests on one overlay network: one takes its address over DHCP from this node's
/// dnsmasq (and its VM reports the lease), the other from cloud-init's network-config; both get
/// the network's MTU, and each pings the other. Deleting them leaves no device, namespace or
/// dnsmasq behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tiny_guests_get_their_addresses_and_reach_each_other() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    let mut agent = AgentConfig::new(
        vec![server.url.clone()],
        "e2e-net",
        tmp.path().join("agent"),
    );
    agent.join_token = Some(cluster.join_token().await);
    agent.libvirt_uri = "qemu:///system".into();
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(1);
    agent.resync = Duration::from_secs(3);
    let libvirt = Libvirt::open("qemu:///system").await.unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt, rx));

    let vms = lookup("vm").unwrap();
    let net = admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.7.0.0/24"}}),
        )
        .await
        .unwrap();
    let vni = net["status"]["vni"].as_u64().unwrap();
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let (dhcp, fixed) = (format!("dhcp-{suffix}"), format!("fixed-{suffix}"));
    let tiny = |name: &str, ip: &str, peer: &str, cmdline: &str| {
        json!({"metadata": {"name": name}, "spec": {
            "resources": {"cpus": 1, "memory": "256Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": cmdline},
            "userData": format!("#cloud-config\nflotilla_test_ping: {peer}\n"),
            "networks": [{"network": "lan", "ip": ip}],
        }})
    };
    let accepted = std::time::Instant::now();
    admin
        .create(
            vms,
            Some("default"),
            &tiny(
                &dhcp,
                "10.7.0.10",
                "10.7.0.11",
                "console=ttyS0 panic=-1 flotilla.dhcp",
            ),
        )
        .await
        .unwrap();
    admin
        .create(
            vms,
            Some("default"),
            &tiny(&fixed, "10.7.0.11", "10.7.0.10", "console=ttyS0 panic=-1"),
        )
        .await
        .unwrap();

    // The DHCP guest's lease is seen by the agent: its NIC's address is confirmed.
    let confirmed = eventually("the DHCP guest's lease is reported", 120, async || {
        let v = admin.get(vms, Some("default"), &dhcp).await.ok()?;
        (v["status"]["interfaces"][0]["source"] == "dhcp").then_some(v)
    })
    .await;
    eprintln!(
        "API accepted -> tiny guest holds its DHCP lease (reported in status): {:.1} s",
        accepted.elapsed().as_secs_f64()
    );
    assert_eq!(confirmed["status"]["ips"], json!(["10.7.0.10"]));
    let mtu = std::fs::read_to_string(format!("/sys/class/net/fb-{vni}/mtu"))
        .unwrap()
        .trim()
        .to_string();
    // The network's MTU reached both guests: over DHCP (option 26) and over network-config.
    log_with(
        admin,
        &dhcp,
        &[
            format!("FLOTILLA-IP 10.7.0.10/24 MTU {mtu} VIA dhcp"),
            "FLOTILLA-PING 10.7.0.11 ok".into(),
        ],
        120,
    )
    .await;
    log_with(
        admin,
        &fixed,
        &[
            format!("FLOTILLA-IP 10.7.0.11/24 MTU {mtu} VIA static"),
            "FLOTILLA-PING 10.7.0.10 ok".into(),
        ],
        120,
    )
    .await;
    let fixed_vm = admin.get(vms, Some("default"), &fixed).await.unwrap();
    assert_eq!(fixed_vm["status"]["interfaces"][0]["source"], "ipam");

    let namespace = PathBuf::from(format!("/run/netns/flotilla-dhcp-{vni}"));
    assert!(namespace.exists());
    for name in [&dhcp, &fixed] {
        admin.delete(vms, Some("default"), name).await.unwrap();
    }
    // Nothing of the network stays on the node once no VM uses it.
    let dnsmasq_of_network = || {
        std::fs::read_dir("/proc").unwrap().any(|e| {
            std::fs::read(e.unwrap().path().join("cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&format!("--interface=fdn-{vni}\0"))
            })
        })
    };
    eventually("the network's dataplane is removed", 30, async || {
        let gone = !namespace.exists()
            && !dnsmasq_of_network()
            && ["fb", "fx", "fd"]
                .iter()
                .all(|p| !PathBuf::from(format!("/sys/class/net/{p}-{vni}")).exists());
        gone.then_some(())
    })
    .await;
}

/// A bridged network with a VLAN: the NIC's port must carry only that VLAN, so on a bridge that
/// does not filter VLANs (this machine's kernel has no 802.1Q at all) the VM is not started,
/// and its condition says why and what to fix. (The `<vlan>` libvirt gets otherwise is checked
/// in the domain XML golden files: configuration level only here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vlan_on_a_bridge_that_cannot_filter_is_refused_before_the_guest_starts() {
    let guest = tiny_guest();
    let bridge = format!("fltvl{}", std::process::id() % 100_000);
    let made = std::process::Command::new("ip")
        .args(["link", "add", &bridge, "type", "bridge"])
        .status()
        .unwrap();
    assert!(made.success());
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }
    let _gone = Gone(bridge.clone());
    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let mut agent = AgentConfig::new(
        vec![cluster.server.url.clone()],
        "e2e-vlan",
        cluster.dir.path().join("agent"),
    );
    agent.join_token = Some(cluster.join_token().await);
    agent.virt_type = VirtType::Qemu;
    let libvirt = Libvirt::open("qemu:///system").await.unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt.clone(), rx));
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "office"}, "spec": {"type": "bridged", "bridge": bridge, "vlan": 42}}),
        )
        .await
        .unwrap();
    let name = format!("vlan-{}", rand::random::<u32>() % 100_000);
    let vm = json!({"metadata": {"name": name}, "spec": {
        "resources": {"cpus": 1, "memory": "128Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0"},
        "networks": [{"network": "office"}],
    }});
    let vms = lookup("vm").unwrap();
    let made = admin.create(vms, Some("default"), &vm).await.unwrap();
    let uid = made["metadata"]["uid"].as_str().unwrap().to_string();
    let message = eventually("the VM says why it cannot start", 30, async || {
        let v = admin.get(vms, Some("default"), &name).await.ok()?;
        let conditions = v["status"]["conditions"].as_array()?.clone();
        conditions
            .iter()
            .find(|c| c["type"] == "Ready" && c["reason"] == "ReconcileFailed")
            .and_then(|c| c["message"].as_str().map(str::to_string))
    })
    .await;
    assert!(
        message.contains("VLAN 42")
            && message.contains(&format!("bridge {bridge}"))
            && message.contains("vlan_filtering 1"),
        "{message}"
    );
    assert_eq!(
        libvirt.state(&uid).await.unwrap(),
        None,
        "no domain was made"
    );
    admin.delete(vms, Some("default"), &name).await.unwrap();
    eventually("the VM is gone", 30, async || {
        admin
            .get(vms, Some("default"), &name)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

/// Security groups on real guests: `client` pings `server` every half second and prints each
/// change. Both start in the project's default group (ingress from its members: the ping
/// passes); moving `server` into a group without rules cuts it off; a rule letting in ICMP from
/// the members of `clients` changes nothing until `client` joins that group, and then the ping
/// passes again. The rules are in Flotilla's own nftables tables, keyed on taps the agent
/// names. A change made while the agent is dead is applied by the next one; deleting the VMs
/// takes their rules away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_group_changes_block_and_unblock_a_guest() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let mut agent = AgentConfig::new(
        vec![cluster.server.url.clone()],
        "e2e-sg",
        cluster.dir.path().join("agent"),
    );
    agent.join_token = Some(cluster.join_token().await);
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(1);
    let libvirt = Libvirt::open("qemu:///system").await.unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let first_agent = tokio::spawn(flotilla_agent::run_with(
        agent.clone(),
        libvirt.clone(),
        rx.clone(),
    ));
    let (vms, sgs) = (lookup("vm").unwrap(), lookup("securitygroup").unwrap());
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "sgnet"}, "spec": {"cidr": "10.8.0.0/24"}}),
        )
        .await
        .unwrap();
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let (client, server) = (format!("client-{suffix}"), format!("server-{suffix}"));
    let tiny = |name: &str, ip: &str, peer: &str| {
        json!({"metadata": {"name": name}, "spec": {
            "resources": {"cpus": 1, "memory": "256Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
            "userData": format!("#cloud-config\nflotilla_test_ping: {peer}\n"),
            "networks": [{"network": "sgnet", "ip": ip}],
        }})
    };
    let mut uids = Vec::new();
    for (name, ip, peer) in [
        (&client, "10.8.0.10", "10.8.0.11"),
        (&server, "10.8.0.11", "10.8.0.10"),
    ] {
        let made = admin
            .create(vms, Some("default"), &tiny(name, ip, peer))
            .await
            .unwrap();
        uids.push(made["metadata"]["uid"].as_str().unwrap().to_string());
    }
    let ok = "FLOTILLA-PING 10.8.0.11 ok".to_string();
    let lost = "FLOTILLA-PING 10.8.0.11 lost".to_string();
    let count = |text: &str, line: &str| text.lines().filter(|l| l.contains(line)).count();
    log_with(admin, &client, std::slice::from_ref(&ok), 120).await;
    // The rules name the agent's taps.
    let table = || {
        let out = std::process::Command::new("nft")
            .args(["list", "table", "inet", "flotilla"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bridge_table = || {
        let out = std::process::Command::new("nft")
            .args(["list", "table", "bridge", "flotilla"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let taps: Vec<String> = uids
        .iter()
        .map(|uid| flotilla_agent::firewall::tap_name(uid, 0))
        .collect();
    for tap in &taps {
        assert!(PathBuf::from("/sys/class/net").join(tap).exists(), "{tap}");
        assert!(bridge_table().contains(tap.as_str()), "{tap}");
    }

    // The server leaves the default group for one without rules: nothing reaches it.
    admin
        .create(
            sgs,
            Some("default"),
            &json!({"metadata": {"name": format!("closed-{suffix}")}}),
        )
        .await
        .unwrap();
    admin
        .create(
            sgs,
            Some("default"),
            &json!({"metadata": {"name": format!("clients-{suffix}")}}),
        )
        .await
        .unwrap();
    let nics = |ip: &str, groups: Vec<String>| json!({"spec": {"networks": [{"network": "sgnet", "ip": ip, "securityGroups": groups}]}});
    let changed = std::time::Instant::now();
    admin
        .patch(
            vms,
            Some("default"),
            &server,
            &nics("10.8.0.11", vec![format!("closed-{suffix}")]),
            false,
        )
        .await
        .unwrap();
    if std::env::var_os("DEBUG_SG").is_some() {
        eprintln!("DEBUG PAUSE");
        tokio::time::sleep(Duration::from_secs(300)).await;
    }
    log_with(admin, &client, std::slice::from_ref(&lost), 30).await;
    eprintln!(
        "group change -> the guest's pings are lost (2 misses at 0.5 s, log polling included): {:.1} s",
        changed.elapsed().as_secs_f64()
    );

    // ICMP from the members of `clients`: the client is not one yet.
    admin
        .patch(
            sgs,
            Some("default"),
            &format!("closed-{suffix}"),
            &json!({"spec": {"rules": [{"protocol": "icmp", "remote": {"securityGroup": format!("clients-{suffix}")}}]}}),
            false,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A rule whose remote group has no members matches nothing: it is left out, never
    // widened to "anywhere".
    assert!(!table().contains("meta l4proto icmp"), "{}", table());
    let text = log_with(admin, &client, std::slice::from_ref(&lost), 10).await;
    assert_eq!(
        count(&text, &ok),
        1,
        "no answer while the client is not a member:\n{text}"
    );

    // The client joins `clients`: its address becomes the rule's remote, and the ping passes.
    let joined = std::time::Instant::now();
    admin
        .patch(
            vms,
            Some("default"),
            &client,
            &nics(
                "10.8.0.10",
                vec!["default".into(), format!("clients-{suffix}")],
            ),
            false,
        )
        .await
        .unwrap();
    eventually(
        "the rule's set holds the client's address",
        10,
        async || {
            let t = table();
            let rule = t.contains("ip saddr @sg") && t.contains("meta l4proto icmp return");
            (rule && t.contains("elements = { 10.8.0.10 }")).then_some(())
        },
    )
    .await;
    eventually("the client's pings pass again", 30, async || {
        let text = log_with(admin, &client, std::slice::from_ref(&ok), 5).await;
        (count(&text, &ok) == 2).then_some(())
    })
    .await;
    eprintln!(
        "joining a remote group -> the guest's pings pass again: {:.1} s",
        joined.elapsed().as_secs_f64()
    );

    // The agent dies (its task dropped mid-flight, like a kill -9: nothing of it runs again)
    // and the client leaves `clients` meanwhile. The kernel keeps the last rules, so the ping
    // still passes; the next agent, once it has listed everything, applies the change.
    first_agent.abort();
    let _ = first_agent.await;
    admin
        .patch(
            vms,
            Some("default"),
            &client,
            &nics("10.8.0.10", vec!["default".into()]),
            false,
        )
        .await
        .unwrap();
    // (Its console log, read where QEMU writes it: the agent serves logs, and it is down.)
    let console = cluster
        .dir
        .path()
        .join("agent/vms")
        .join(&uids[0])
        .join("console.log");
    let console = || std::fs::read_to_string(&console).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = console();
    assert_eq!(
        (count(&text, &ok), count(&text, &lost)),
        (2, 1),
        "the rules stay while no agent runs:\n{text}"
    );
    let restarted = std::time::Instant::now();
    tokio::spawn(flotilla_agent::run_with(agent, libvirt, rx));
    eventually("the restarted agent applies the change", 60, async || {
        (count(&console(), &lost) == 2).then_some(())
    })
    .await;
    eprintln!(
        "agent restarted -> a change made while it was down is enforced: {:.1} s",
        restarted.elapsed().as_secs_f64()
    );

    for name in [&client, &server] {
        admin.delete(vms, Some("default"), name).await.unwrap();
    }
    eventually("the VMs' rules are gone", 30, async || {
        let (inet, bridge) = (table(), bridge_table());
        taps.iter()
            .all(|t| !bridge.contains(t.as_str()) && !inet.contains(t.as_str()))
            .then_some(())
    })
    .await;
    for group in [format!("closed-{suffix}"), format!("clients-{suffix}")] {
        eventually(
            "the group can be deleted once no VM uses it",
            30,
            async || {
                admin
                    .delete(sgs, Some("default"), &group)
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }
}

/// A router between an overlay network and an "external" LAN (a bridge on this host with an
/// upstream namespace holding its gateway, which has no route back to the overlay): a tiny
/// guest reaches the upstream through the router (SNAT); a floating IP makes the guest
/// reachable from upstream (DNAT), and rebinding it to a second guest moves the forwarding
/// without restarting anything. Each guest reads its own instance from the metadata service.
/// A third guest, on another network whose router leaves through the node's own uplink,
/// reaches a host that knows only the node's address. Deleting the routers, the floating IP and
/// the VMs leaves no namespace and no masquerade table behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reaches_the_outside_through_its_router_and_is_reached_on_a_floating_ip() {
    use flotilla_dataplane::testkit::{pings, run};
    let guest = tiny_guest();
    let tag = std::process::id() % 100_000;
    let (lan, upstream) = (format!("fltex{tag}"), format!("fltup{tag}"));
    const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";
    struct Gone(String, String, String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.1])
                .status();
            // The uplink router turned the host's forwarding on; as it was.
            let _ = std::fs::write(FORWARDING, &self.2);
        }
    }
    let _gone = Gone(
        lan.clone(),
        upstream.clone(),
        std::fs::read_to_string(FORWARDING).unwrap(),
    );
    // The LAN: a bridge here, and the upstream router's namespace on it at 203.0.113.1.
    run(&["ip", "link", "add", &lan, "type", "bridge"]);
    run(&["ip", "link", "set", &lan, "up"]);
    run(&["ip", "netns", "add", &upstream]);
    let veth = format!("fltuv{tag}");
    run(&[
        "ip", "link", "add", &veth, "type", "veth", "peer", "name", "up0", "netns", &upstream,
    ]);
    run(&["ip", "link", "set", &veth, "master", &lan, "up"]);
    run(&[
        "ip",
        "-n",
        &upstream,
        "addr",
        "add",
        "203.0.113.1/24",
        "dev",
        "up0",
    ]);
    run(&["ip", "-n", &upstream, "link", "set", "up0", "up"]);
    run(&["ip", "-n", &upstream, "link", "set", "lo", "up"]);
    // And a link from this host to upstream (198.18.77.1 here, .254 there; the veth goes with
    // the namespace): what the node's uplink router leaves through. A benchmarking range, which
    // no real network of this host uses.
    let routes = run(&["ip", "route"]);
    assert!(
        !routes.contains("198.18."),
        "this host routes 198.18/15 already: {routes}"
    );
    run(&[
        "ip",
        "link",
        "add",
        &format!("fltul{tag}"),
        "type",
        "veth",
        "peer",
        "name",
        "up1",
        "netns",
        &upstream,
    ]);
    run(&[
        "ip",
        "addr",
        "add",
        "198.18.77.1/24",
        "dev",
        &format!("fltul{tag}"),
    ]);
    run(&["ip", "link", "set", &format!("fltul{tag}"), "up"]);
    run(&[
        "ip",
        "-n",
        &upstream,
        "addr",
        "add",
        "198.18.77.254/24",
        "dev",
        "up1",
    ]);
    run(&["ip", "-n", &upstream, "link", "set", "up1", "up"]);

    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let mut agent = AgentConfig::new(
        vec![cluster.server.url.clone()],
        "e2e-router",
        cluster.dir.path().join("agent"),
    );
    agent.join_token = Some(cluster.join_token().await);
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(1);
    let libvirt = Libvirt::open("qemu:///system").await.unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt, rx));
    let (nets, vms, sgs) = (
        lookup("network").unwrap(),
        lookup("vm").unwrap(),
        lookup("securitygroup").unwrap(),
    );
    let (routers, fips) = (lookup("router").unwrap(), lookup("floatingip").unwrap());
    let create = |kind, body: serde_json::Value| async move {
        admin.create(kind, Some("default"), &body).await.unwrap()
    };
    create(nets, json!({"metadata": {"name": "ext"}, "spec": {"type": "bridged", "bridge": lan,
        "cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "ranges": [{"start": "203.0.113.10", "end": "203.0.113.50"}]}})).await;
    create(
        nets,
        json!({"metadata": {"name": "inside"}, "spec": {"cidr": "10.9.0.0/24"}}),
    )
    .await;
    // ICMP from anywhere, so upstream can ping a floating IP.
    create(
        sgs,
        json!({"metadata": {"name": "pingable"}, "spec": {"rules": [{"protocol": "icmp"}]}}),
    )
    .await;
    let router = create(
        routers,
        json!({"metadata": {"name": "gw"}, "spec": {
        "external": {"network": "ext"}, "networks": ["inside"]}}),
    )
    .await;
    create(
        nets,
        json!({"metadata": {"name": "home"}, "spec": {"cidr": "10.8.0.0/24"}}),
    )
    .await;
    create(
        routers,
        json!({"metadata": {"name": "out"}, "spec": {"external": {"uplink": true}, "networks": ["home"]}}),
    )
    .await;
    let external = router["status"]["externalAddress"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        external, "203.0.113.10",
        "the first address of the ext network's range"
    );

    let suffix: u32 = rand::random::<u32>() % 100_000;
    let (one, two, three) = (
        format!("one-{suffix}"),
        format!("two-{suffix}"),
        format!("three-{suffix}"),
    );
    let tiny_on = |name: &str, network: &str, ip: &str, pinging: &str| {
        json!({"metadata": {"name": name}, "spec": {
            "resources": {"cpus": 1, "memory": "256Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
            "userData": format!("#cloud-config\nflotilla_test_ping: {pinging}\nflotilla_test_metadata: yes\n"),
            "networks": [{"network": network, "ip": ip, "securityGroups": ["default", "pingable"]}],
        }})
    };
    let tiny = |name: &str, ip: &str| tiny_on(name, "inside", ip, "203.0.113.1");
    let started = std::time::Instant::now();
    let one_uid = create(vms, tiny(&one, "10.9.0.10")).await["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let two_uid = create(vms, tiny(&two, "10.9.0.11")).await["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    create(vms, tiny_on(&three, "home", "10.8.0.10", "198.18.77.254")).await;
    // Upstream has no route to 10.9.0.0/24: the guest's pings are answered only because the
    // router translates them to its external address.
    log_with(
        admin,
        &one,
        &["FLOTILLA-PING 203.0.113.1 ok".to_string()],
        120,
    )
    .await;
    eprintln!(
        "router created -> a guest behind it reaches upstream: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Upstream knows only this host's 198.18.77.1: the third guest's pings are answered because
    // its router translates them to its link address and the host to its own.
    log_with(
        admin,
        &three,
        &["FLOTILLA-PING 198.18.77.254 ok".to_string()],
        120,
    )
    .await;
    let tables = run(&["nft", "list", "tables"]);
    assert!(tables.contains("table ip flotilla-uplink"), "{tables}");
    let neighbours = run(&["ip", "-n", &upstream, "neigh", "show", "dev", "up1"]);
    assert!(
        neighbours.contains("198.18.77.1 ") && !neighbours.contains("169.254"),
        "{neighbours}"
    );
    // Each guest read its own instance from the metadata service (OpenStack's and EC2's
    // layouts), reached through the network's DHCP server; by source address, so never the
    // other's.
    for (name, uid) in [(&one, &one_uid), (&two, &two_uid)] {
        let text = log_with(admin, name, &[format!("FLOTILLA-EC2 {uid}")], 60).await;
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("FLOTILLA-METADATA "))
            .unwrap_or_else(|| panic!("{name} printed no metadata:\n{text}"));
        let meta: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            (meta["uuid"].as_str(), meta["name"].as_str()),
            (Some(uid.as_str()), Some(name.as_str()))
        );
    }
    // An address no VM holds (the DHCP server's own, inside its namespace) gets nothing.
    let vni = admin.get(nets, Some("default"), "inside").await.unwrap()["status"]["vni"]
        .as_u64()
        .unwrap();
    let asked = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("flotilla-dhcp-{vni}"),
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            "http://169.254.169.254/openstack/latest/meta_data.json",
        ])
        .output()
        .unwrap();
    assert!(
        !asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stdout)
    );
    assert!(
        String::from_utf8_lossy(&asked.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&asked.stderr)
    );
    let placed = admin.get(routers, Some("default"), "gw").await.unwrap();
    assert_eq!(placed["status"]["nodeName"], "e2e-router");
    assert!(
        !pings(&upstream, "10.9.0.10", None),
        "no route to the inside from upstream"
    );

    // A floating IP for `one`: upstream reaches the guest on it.
    let fip = create(
        fips,
        json!({"metadata": {"name": "web"}, "spec": {"network": "ext", "vm": one}}),
    )
    .await;
    let address = fip["status"]["address"].as_str().unwrap().to_string();
    assert_eq!(address, "203.0.113.11");
    let bound = std::time::Instant::now();
    eventually(
        "upstream reaches the guest on its floating IP",
        30,
        async || pings(&upstream, &address, None).then_some(()),
    )
    .await;
    eprintln!(
        "floating IP created -> reachable from upstream: {:.1} s",
        bound.elapsed().as_secs_f64()
    );
    let fip = admin.get(fips, Some("default"), "web").await.unwrap();
    assert_eq!(fip["status"]["fixedAddress"], "10.9.0.10");
    assert_eq!(fip["status"]["router"], "gw");
    let router_ns = format!(
        "flotilla-router-{}",
        flotilla_agent::routers::router_id(router["metadata"]["uid"].as_str().unwrap())
    );
    let nat = || {
        run(&[
            "ip",
            "netns",
            "exec",
            &router_ns,
            "nft",
            "list",
            "table",
            "ip",
            "flotilla-router",
        ])
    };
    assert!(
        nat().contains(&format!("ip daddr {address} dnat to 10.9.0.10")),
        "{}",
        nat()
    );

    // Rebound to `two`: the DNAT follows, nothing restarts.
    let rebound = std::time::Instant::now();
    admin
        .patch(
            fips,
            Some("default"),
            "web",
            &json!({"spec": {"vm": two}}),
            false,
        )
        .await
        .unwrap();
    eventually(
        "the floating IP forwards to the second guest",
        30,
        async || {
            nat()
                .contains(&format!("ip daddr {address} dnat to 10.9.0.11"))
                .then_some(())
        },
    )
    .await;
    eventually("upstream reaches the second guest on it", 30, async || {
        pings(&upstream, &address, None).then_some(())
    })
    .await;
    eprintln!(
        "floating IP rebound -> forwarding to the other guest: {:.1} s",
        rebound.elapsed().as_secs_f64()
    );

    // Nothing stays: the floating IP's and the router's addresses are free again.
    admin.delete(fips, Some("default"), "web").await.unwrap();
    for name in [&one, &two, &three] {
        admin.delete(vms, Some("default"), name).await.unwrap();
    }
    admin.delete(routers, Some("default"), "gw").await.unwrap();
    admin.delete(routers, Some("default"), "out").await.unwrap();
    eventually("the router's namespace is gone", 30, async || {
        (!std::path::Path::new("/run/netns").join(&router_ns).exists()).then_some(())
    })
    .await;
    eventually(
        "the masquerade table is gone with the last uplink router",
        30,
        async || (!run(&["nft", "list", "tables"]).contains("flotilla-uplink")).then_some(()),
    )
    .await;
    eventually("the networks can be deleted", 60, async || {
        let mut gone = true;
        for name in ["inside", "ext", "home"] {
            let _ = admin.delete(nets, Some("default"), name).await;
            gone &= admin.get(nets, Some("default"), name).await.is_err();
        }
        gone.then_some(())
    })
    .await;
}
