//! Two real hosts on one machine (`../shared/recipes/two-hosts.md`): each is its own libvirtd,
//! virtlogd and `flotilla agent` in network, mount, UTS and PID namespaces of their own, with
//! private libvirt directories, on an underlay bridge in this test's namespace where the API
//! server listens. A tiny guest on host A (address from network-config) and one on host B
//! (address over DHCP from host B's dnsmasq) share an overlay network: each pings the other
//! across the VXLAN between the hosts. Then a router with an external LAN (a bridge on each host
//! joined to one "upstream" namespace) is placed on host A; a guest on host B reaches upstream
//! through it; host A dies (its PID namespace killed, its links down), and the router is placed
//! again on host B and rebuilt there from the API: the outage is measured.
//!
//! Needs root, libvirtd's binaries and the tiny guest; `make test` provides them.

mod support;

use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;

use support::hosts::{console, run, Fabric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_on_two_hosts_reach_each_other_over_the_overlay() {
    let guest = support::tiny_guest();
    let mut fabric = Fabric::new("f2h", 77);
    let tag = fabric.tag.clone();
    // The external LAN, with an upstream host that has no route to any overlay network.
    let external = format!("{tag}ex");
    run(&["ip", "link", "add", &external, "type", "bridge"]);
    fabric.links.push(external.clone());
    run(&["ip", "link", "set", &external, "up"]);
    let upstream = format!("{tag}-up");
    run(&["ip", "netns", "add", &upstream]);
    fabric.namespaces.push(upstream.clone());
    let up_port = format!("{tag}up");
    run(&[
        "ip", "link", "add", &up_port, "type", "veth", "peer", "name", "eth0", "netns", &upstream,
    ]);
    run(&["ip", "link", "set", &up_port, "master", &external, "up"]);
    run(&[
        "ip",
        "-n",
        &upstream,
        "addr",
        "add",
        "203.0.113.1/24",
        "dev",
        "eth0",
    ]);
    run(&["ip", "-n", &upstream, "link", "set", "eth0", "up"]);
    let cluster =
        TestCluster::start_on(format!("{}:0", fabric.server_address()).parse().unwrap()).await;
    let admin = &cluster.admin;

    let mut agent_dirs = Vec::new();
    for host in ["a", "b"] {
        let i = fabric
            .add_host(&cluster, &format!("host-{host}"), &[])
            .await;
        agent_dirs.push(fabric.agent_dir(i));
        // The host's bridge on the external LAN.
        let ns = fabric.namespace(i);
        let ex_port = format!("{tag}x{host}");
        run(&[
            "ip", "link", "add", &ex_port, "type", "veth", "peer", "name", "exv", "netns", &ns,
        ]);
        run(&["ip", "link", "set", &ex_port, "master", &external, "up"]);
        run(&["ip", "-n", &ns, "link", "add", "br-ex", "type", "bridge"]);
        run(&[
            "ip", "-n", &ns, "link", "set", "exv", "master", "br-ex", "up",
        ]);
        run(&["ip", "-n", &ns, "link", "set", "br-ex", "up"]);
    }
    fabric.wait_ready(admin).await;

    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.7.0.0/24"}}),
        )
        .await
        .unwrap();
    let vms = lookup("vm").unwrap();
    let mut uids = Vec::new();
    for (host, ip, peer, cmdline) in [
        ("a", "10.7.0.10", "10.7.0.11", "console=ttyS0 panic=-1"),
        (
            "b",
            "10.7.0.11",
            "10.7.0.10",
            "console=ttyS0 panic=-1 flotilla.dhcp",
        ),
    ] {
        let vm = json!({"metadata": {"name": format!("on-{host}")}, "spec": {
            "nodeName": format!("host-{host}"),
            "resources": {"cpus": 1, "memory": "256Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": cmdline},
            "userData": format!("#cloud-config\nflotilla_test_ping: {peer}\n"),
            "networks": [{"network": "lan", "ip": ip}],
        }});
        let made = admin.create(vms, Some("default"), &vm).await.unwrap();
        uids.push(made["metadata"]["uid"].as_str().unwrap().to_string());
    }
    // Each guest reaches the other through the tunnel between the hosts.
    for (i, (own, peer, via)) in [
        ("10.7.0.10", "10.7.0.11", "static"),
        ("10.7.0.11", "10.7.0.10", "dhcp"),
    ]
    .into_iter()
    .enumerate()
    {
        let (dir, uid) = (&agent_dirs[i], &uids[i]);
        let log = eventually(
            &format!("the guest on host {i} pings {peer}"),
            120,
            async || {
                let log = console(dir, uid);
                log.contains(&format!("FLOTILLA-PING {peer} ok"))
                    .then_some(log)
            },
        )
        .await;
        assert!(
            log.contains(&format!("FLOTILLA-IP {own}/24 MTU 1450 VIA {via}")),
            "{log}"
        );
    }
    // The serial logs of guests on other hosts come through the API too.
    let log = admin.vm_log("default", "on-b", false).await.unwrap();
    let mut log = Box::pin(log);
    let mut text = Vec::new();
    while let Some(Ok(chunk)) = futures::StreamExt::next(&mut log).await {
        text.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8_lossy(&text).contains("FLOTILLA-PING 10.7.0.10 ok"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    // Host B's agent saw the lease its dnsmasq gave.
    eventually("on-b reports its DHCP lease", 10, async || {
        let b = admin.get(vms, Some("default"), "on-b").await.ok()?;
        (b["status"]["interfaces"][0]["source"] == "dhcp").then_some(())
    })
    .await;
    // A VM made on host B later: host A's DNS server knows its name within seconds (its agent
    // follows the network), not at its next resync.
    let late = json!({"metadata": {"name": "late"}, "spec": {
        "nodeName": "host-b", "resources": {"cpus": 1, "memory": "128Mi"}, "powerState": "Stopped",
        "boot": {"kernel": guest.join("vmlinuz")}, "networks": [{"network": "lan"}]}});
    let late = admin.create(vms, Some("default"), &late).await.unwrap();
    let late_ip = late["status"]["ips"][0].as_str().unwrap().to_string();
    let names = agent_dirs[0].join("networks/4096/names");
    eventually("host A's DNS server knows the new VM", 10, async || {
        let text = std::fs::read_to_string(&names).ok()?;
        text.contains(&format!(
            "{late_ip} late.lan.default.flotilla.internal late"
        ))
        .then_some(())
    })
    .await;
    let network = admin
        .get(lookup("network").unwrap(), Some("default"), "lan")
        .await
        .unwrap();
    assert_eq!(network["status"]["nodes"], json!(["host-a", "host-b"]));

    // A router to the external LAN, placed on host A (the least loaded, first by name).
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "ext"}, "spec": {"type": "bridged", "bridge": "br-ex",
                "cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "ranges": [{"start": "203.0.113.10", "end": "203.0.113.20"}]}}),
        )
        .await
        .unwrap();
    let routers = lookup("router").unwrap();
    admin
        .create(
            routers,
            Some("default"),
            &json!({"metadata": {"name": "gw"}, "spec": {"external": {"network": "ext"}, "networks": ["lan"]}}),
        )
        .await
        .unwrap();
    eventually("the router is placed on host A", 10, async || {
        let r = admin.get(routers, Some("default"), "gw").await.ok()?;
        (r["status"]["nodeName"] == "host-a").then_some(())
    })
    .await;
    // A guest on host B reaches upstream through it, across the tunnel to host A.
    let watcher = json!({"metadata": {"name": "watcher"}, "spec": {
        "nodeName": "host-b", "resources": {"cpus": 1, "memory": "256Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
        "userData": "#cloud-config\nflotilla_test_ping: 203.0.113.1\n",
        "networks": [{"network": "lan", "ip": "10.7.0.30"}]}});
    let watcher_uid = admin.create(vms, Some("default"), &watcher).await.unwrap()["metadata"]
        ["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, lost) = (
        "FLOTILLA-PING 203.0.113.1 ok",
        "FLOTILLA-PING 203.0.113.1 lost",
    );
    let b_dir = agent_dirs[1].clone();
    let count = |line: &str| console(&b_dir, &watcher_uid).matches(line).count();
    eventually(
        "the guest on host B reaches upstream through the router on host A",
        120,
        async || (count(ok) == 1).then_some(()),
    )
    .await;

    // Host A dies: everything in its PID namespace (agent, libvirtd, QEMU, the router's
    // namespace with it), and its links.
    let died = std::time::Instant::now();
    fabric.kill_host(0);
    run(&[
        "ip",
        "-n",
        &fabric.namespace(0),
        "link",
        "set",
        "exv",
        "down",
    ]);
    eventually("the guest loses upstream", 30, async || {
        (count(lost) == 1).then_some(())
    })
    .await;
    eventually("the router is placed again on host B", 60, async || {
        let r = admin.get(routers, Some("default"), "gw").await.ok()?;
        (r["status"]["nodeName"] == "host-b").then_some(())
    })
    .await;
    let placed = died.elapsed();
    eventually("the guest reaches upstream again", 60, async || {
        (count(ok) == 2).then_some(())
    })
    .await;
    eprintln!(
        "router failover: host A dies -> placed on host B {:.1} s -> the guest reaches upstream again {:.1} s (node grace 10 s)",
        placed.as_secs_f64(),
        died.elapsed().as_secs_f64()
    );
    drop(fabric);
}
