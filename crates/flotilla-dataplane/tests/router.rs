//! Routers in network namespaces this test makes: a "node" carries two overlay networks of two
//! projects with the same CIDR and an external bridge with an "upstream" host that has no route
//! back to either. Each project's router (its own namespace) takes its network's gateway address
//! and translates its guests to its own external address: both guests, with the same address,
//! reach upstream (ping and TCP) at once; a floating IP makes a guest reachable from upstream
//! and moves to another guest by changing nothing but the router's table; the NAT lives in the
//! routers' namespaces, never the node's; removal leaves no port behind. A second test runs
//! routers out through the node's own uplink instead. Needs root; touches nothing outside its
//! namespaces.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use flotilla_dataplane::namespace::{ensure_namespace, remove_namespace};
use flotilla_dataplane::testkit::{pings, run, Eth0, Namespaces};
use flotilla_dataplane::{
    bridge_name, External, ExternalPort, Netlink, Overlay, Router, RouterNetwork,
};

/// A host on `bridge` of `node` with `address` and a default route via `via`.
fn host(
    ns: &mut Namespaces,
    node: &str,
    bridge: &str,
    short: &str,
    address: &str,
    via: Option<&str>,
) -> String {
    let eth0 = Eth0 {
        address: Some(address),
        via,
        ..Default::default()
    };
    ns.guest(node, bridge, short, eth0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_translate_their_networks_to_the_outside_side_by_side() {
    let mut ns = Namespaces::new("dr");
    let node = ns.node("node");
    // The external bridge.
    run(&["ip", "-n", &node, "link", "add", "br-ex", "type", "bridge"]);
    run(&["ip", "-n", &node, "link", "set", "br-ex", "up"]);
    let netlink = Netlink::in_namespace(&PathBuf::from("/run/netns").join(&node)).unwrap();
    let upstream = host(&mut ns, &node, "br-ex", "up", "203.0.113.1/24", None);

    let mut routers: Vec<(Router, String)> = Vec::new();
    for (i, vni) in [4100u32, 4101].into_iter().enumerate() {
        netlink
            .ensure_overlay(&Overlay {
                vni,
                mtu: 1450,
                local: "198.51.100.1".parse().unwrap(),
                underlay: "ul".into(),
                remotes: BTreeSet::new(),
            })
            .await
            .unwrap();
        // Both projects' guests have the same address.
        let guest = host(
            &mut ns,
            &node,
            &bridge_name(vni),
            &format!("g{i}"),
            "10.0.0.11/24",
            Some("10.0.0.1"),
        );
        let namespace = ensure_namespace(&format!("{}-r{i}", ns.prefix)).unwrap();
        let router = Router {
            id: i as u32 + 1,
            namespace,
            networks: vec![RouterNetwork {
                vni,
                network: "10.0.0.0".parse().unwrap(),
                prefix_len: 24,
                gateway: "10.0.0.1".parse().unwrap(),
                mtu: 1450,
                mac: None,
            }],
            external: Some(External::Bridge(ExternalPort {
                bridge: "br-ex".into(),
                address: format!("203.0.113.{}", i + 2).parse().unwrap(),
                prefix_len: 24,
                gateway: "203.0.113.1".parse().unwrap(),
                mtu: 1500,
                mac: None,
            })),
            floating: Vec::new(),
            routes: vec![(
                "198.51.100.0".parse().unwrap(),
                24,
                "10.0.0.254".parse().unwrap(),
            )],
        };
        let started = std::time::Instant::now();
        netlink.ensure_router(&router).await.unwrap();
        eprintln!(
            "a router (namespace ports, route, forwarding, NAT): {} ms",
            started.elapsed().as_millis()
        );
        // Again: nothing to change, nothing breaks.
        netlink.ensure_router(&router).await.unwrap();
        // The static route is there, once.
        let routes = run(&[
            "ip",
            "-n",
            &format!("{}-r{i}", ns.prefix),
            "route",
            "show",
            "proto",
            "static",
        ]);
        // (The default route is `proto static` too.)
        let routes: Vec<&str> = routes
            .lines()
            .filter(|l| !l.starts_with("default"))
            .collect();
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert!(
            routes[0].starts_with("198.51.100.0/24 via 10.0.0.254"),
            "{routes:?}"
        );
        // A route no longer wanted goes (and comes back).
        let without = Router {
            routes: Vec::new(),
            ..router.clone()
        };
        netlink.ensure_router(&without).await.unwrap();
        let left = run(&[
            "ip",
            "-n",
            &format!("{}-r{i}", ns.prefix),
            "route",
            "show",
            "proto",
            "static",
        ]);
        assert!(
            left.lines()
                .all(|l| l.starts_with("default via 203.0.113.1")),
            "the route went, the default route stayed: {left}"
        );
        assert_eq!(left.lines().count(), 1, "{left}");
        netlink.ensure_router(&router).await.unwrap();
        routers.push((router, guest));
    }

    // Upstream has no route to 10.0.0.0/24: only translated traffic gets answers.
    for (_, guest) in &routers {
        assert!(
            pings(guest, "203.0.113.1", None),
            "{guest} reaches upstream through its router"
        );
    }
    let neighbours = run(&["ip", "-n", &upstream, "neigh"]);
    assert!(
        neighbours.contains("203.0.113.2") && neighbours.contains("203.0.113.3"),
        "upstream talked to both routers: {neighbours}"
    );
    // TCP too: upstream reads what the second project's guest sends.
    let listener = Command::new("ip")
        .args([
            "netns", "exec", &upstream, "busybox", "nc", "-l", "-p", "9000",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = Command::new("sh")
        .args([
            "-c",
            &format!(
                "echo hello-from-b | ip netns exec {} busybox nc -w 2 203.0.113.1 9000",
                routers[1].1
            ),
        ])
        .status()
        .unwrap();
    assert!(sent.success());
    let received = listener.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&received.stdout).trim(),
        "hello-from-b"
    );
    let translated = run(&[
        "ip",
        "netns",
        "exec",
        &format!("{}-r1", ns.prefix),
        "nft",
        "list",
        "table",
        "ip",
        "flotilla-router",
    ]);
    assert!(translated.contains("snat to 203.0.113.3"), "{translated}");
    // The node's own ruleset is untouched: the NAT lives in the routers' namespaces.
    let node_tables = run(&["ip", "netns", "exec", &node, "nft", "list", "tables"]);
    assert!(!node_tables.contains("flotilla"), "{node_tables}");

    // A floating IP: upstream reaches the first project's guest on 203.0.113.10 (TCP), and the
    // guest's own traffic leaves as that address.
    let second = host(
        &mut ns,
        &node,
        &bridge_name(4100),
        "g0b",
        "10.0.0.12/24",
        Some("10.0.0.1"),
    );
    let fip = "203.0.113.10".parse().unwrap();
    let serve = |guest: &str, says: &str| {
        // One connection, or gone after 5 s either way.
        let mut listener = Command::new("sh")
            .args([
                "-c",
                &format!("echo {says} | ip netns exec {guest} timeout 5 busybox nc -l -p 22"),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let answer = run(&[
            "ip",
            "netns",
            "exec",
            &upstream,
            "busybox",
            "nc",
            "-w",
            "2",
            "203.0.113.10",
            "22",
        ]);
        let _ = listener.wait();
        answer.trim().to_string()
    };
    routers[0].0.floating = vec![(fip, "10.0.0.11".parse().unwrap())];
    netlink.ensure_router(&routers[0].0).await.unwrap();
    assert_eq!(serve(&routers[0].1, "first"), "first");
    // Rebound to another guest: the table changes, nothing restarts.
    routers[0].0.floating = vec![(fip, "10.0.0.12".parse().unwrap())];
    let started = std::time::Instant::now();
    netlink.ensure_router(&routers[0].0).await.unwrap();
    eprintln!(
        "rebinding a floating IP: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(serve(&second, "second"), "second");
    // Unbound: the address leaves the router.
    routers[0].0.floating.clear();
    netlink.ensure_router(&routers[0].0).await.unwrap();
    let outside = run(&[
        "ip",
        "-n",
        &format!("{}-r0", ns.prefix),
        "-br",
        "addr",
        "show",
        "dev",
        "qg-1",
    ]);
    assert!(!outside.contains("203.0.113.10"), "{outside}");

    // Removal: the router's ports go with it.
    for (router, _) in &routers {
        let vnis: Vec<u32> = router.networks.iter().map(|n| n.vni).collect();
        netlink.remove_router_ports(router.id, &vnis).await.unwrap();
        remove_namespace(router.namespace.file_name().unwrap().to_str().unwrap()).unwrap();
    }
    let links = run(&["ip", "-n", &node, "-br", "link"]);
    assert!(
        !links.contains("fq-") && !links.contains("fg-"),
        "no router port is left: {links}"
    );
    assert!(
        !pings(&routers[0].1, "203.0.113.1", None),
        "without its router the guest is cut off"
    );
}

/// Two projects' routers (same tenant CIDR) leave through the node's own uplink: upstream
/// knows only the node's address, yet both guests reach it at once; the node's namespace gets
/// forwarding and the `ip flotilla-uplink` masquerade table and nothing else; a router whose
/// link address changes keeps working; removing the routers and the table leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_leave_through_the_nodes_own_uplink() {
    let mut ns = Namespaces::new("du");
    let node = ns.node("node");
    let upstream = ns.add("up");
    // The node's uplink: a veth to "upstream", which has no route to anything but 192.0.2.0/24.
    run(&[
        "ip", "-n", &node, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
        &upstream,
    ]);
    for (n, ip) in [(&node, "192.0.2.1/24"), (&upstream, "192.0.2.254/24")] {
        run(&["ip", "-n", n, "addr", "add", ip, "dev", "eth0"]);
        run(&["ip", "-n", n, "link", "set", "eth0", "up"]);
    }
    run(&[
        "ip",
        "-n",
        &node,
        "route",
        "add",
        "default",
        "via",
        "192.0.2.254",
    ]);
    let netlink = Netlink::in_namespace(&PathBuf::from("/run/netns").join(&node)).unwrap();
    let forwarding = || {
        run(&[
            "ip",
            "netns",
            "exec",
            &node,
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ])
        .trim()
        .to_string()
    };
    // (A new namespace copies the host's setting, which another test may have turned on.)
    run(&[
        "ip",
        "netns",
        "exec",
        &node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=0",
    ]);
    assert_eq!(forwarding(), "0");

    let mut routers = Vec::new();
    for (i, vni) in [4200u32, 4201].into_iter().enumerate() {
        netlink
            .ensure_overlay(&Overlay {
                vni,
                mtu: 1450,
                local: "198.51.100.1".parse().unwrap(),
                underlay: "ul".into(),
                remotes: BTreeSet::new(),
            })
            .await
            .unwrap();
        let guest = ns.guest(
            &node,
            &bridge_name(vni),
            &format!("g{i}"),
            Eth0 {
                address: Some("10.0.0.11/24"),
                via: Some("10.0.0.1"),
                ..Default::default()
            },
        );
        let router = Router {
            id: 20 + i as u32,
            namespace: ensure_namespace(&format!("{}-r{i}", ns.prefix)).unwrap(),
            networks: vec![RouterNetwork {
                vni,
                network: "10.0.0.0".parse().unwrap(),
                prefix_len: 24,
                gateway: "10.0.0.1".parse().unwrap(),
                mtu: 1450,
                mac: None,
            }],
            external: Some(External::Uplink(
                format!("169.254.64.{}", 10 + i).parse().unwrap(),
            )),
            floating: Vec::new(),
            routes: Vec::new(),
        };
        netlink.ensure_router(&router).await.unwrap();
        netlink.ensure_router(&router).await.unwrap();
        routers.push((router, guest));
    }
    assert_eq!(
        forwarding(),
        "1",
        "the node forwards for its uplink routers"
    );
    for (_, guest) in &routers {
        assert!(
            pings(guest, "192.0.2.254", None),
            "{guest} reaches upstream through the node's address"
        );
    }
    let neighbours = run(&["ip", "-n", &upstream, "neigh"]);
    assert!(
        neighbours.contains("192.0.2.1") && !neighbours.contains("169.254"),
        "upstream only ever talked to the node: {neighbours}"
    );
    let tables = run(&["ip", "netns", "exec", &node, "nft", "list", "tables"]);
    assert_eq!(tables.trim(), "table ip flotilla-uplink", "{tables}");

    // A new link address (another router took the old one): the old route goes, traffic flows.
    routers[0].0.external = Some(External::Uplink("169.254.64.30".parse().unwrap()));
    netlink.ensure_router(&routers[0].0).await.unwrap();
    let node_routes = run(&["ip", "-n", &node, "route", "show", "dev", "fg-20"]);
    assert_eq!(
        node_routes.trim(),
        "169.254.64.30 proto static scope link",
        "one route to the router's current address: {node_routes}"
    );
    assert!(pings(&routers[0].1, "192.0.2.254", None));

    for (router, _) in &routers {
        let vnis: Vec<u32> = router.networks.iter().map(|n| n.vni).collect();
        netlink.remove_router_ports(router.id, &vnis).await.unwrap();
        remove_namespace(router.namespace.file_name().unwrap().to_str().unwrap()).unwrap();
    }
    netlink.ensure_uplink_nat(false).await.unwrap();
    let links = run(&["ip", "-n", &node, "-br", "link"]);
    assert!(!links.contains("fg-"), "no link is left: {links}");
    let tables = run(&["ip", "netns", "exec", &node, "nft", "list", "tables"]);
    assert_eq!(tables.trim(), "", "the masquerade table is gone: {tables}");
    // Removing it again is fine.
    netlink.ensure_uplink_nat(false).await.unwrap();
}
