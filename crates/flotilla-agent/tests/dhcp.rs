//! The agent's DHCP and DNS servers (real dnsmasq) on overlay networks built in network
//! namespaces this test makes: two "nodes" joined by a veth underlay carry one network, each with
//! its own server on the same address; "guests" are namespaces on veths into the bridges, asking
//! with busybox's udhcpc. A guest gets exactly its reservation (address, gateway, DNS, MTU) from
//! its own node's server and never from the other's; a MAC without a reservation gets nothing; a
//! reservation added later is served without a restart; names resolve; a server that dies is
//! started again; removal leaves no device, namespace, process or file. Needs root.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_agent::dhcp::{DhcpServers, Service};
use flotilla_dataplane::testkit::{run, Eth0, Namespaces};
use flotilla_dataplane::{bridge_name, Netlink, Overlay};
use flotilla_ipam::Subnet;
use flotilla_types::NetworkAddress;

/// A guest on `bridge` of `node` whose `eth0` (MTU 1450) has `mac` and no address yet.
fn guest(ns: &mut Namespaces, node: &str, bridge: &str, short: &str, mac: &str) -> String {
    let eth0 = Eth0 {
        mac: Some(mac),
        mtu: Some(1450),
        ..Default::default()
    };
    ns.guest(node, bridge, short, eth0)
}

/// What udhcpc in `guest` was offered (`ip=.. mtu=.. router=.. dns=.. domain=..`), or None when
/// no server answered within about three seconds.
fn ask_dhcp(guest: &str, script: &Path) -> Option<String> {
    let out_file = script.with_file_name(format!("{guest}.lease"));
    let _ = std::fs::remove_file(&out_file);
    let status = Command::new("ip")
        .args(["netns", "exec", guest, "env"])
        .arg(format!("OUT={}", out_file.display()))
        .args([
            "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "3", "-T", "1", "-O", "mtu",
            "-O", "search", "-s",
        ])
        .arg(script)
        .output()
        .unwrap();
    status
        .status
        .success()
        .then(|| std::fs::read_to_string(&out_file).unwrap_or_default())
}

fn address(ip: &str, vm: &str, mac: &str) -> NetworkAddress {
    NetworkAddress {
        address: ip.into(),
        vm: vm.into(),
        uid: format!("uid-{vm}"),
        mac_address: mac.into(),
    }
}

fn service(addresses: &[NetworkAddress]) -> Service<'_> {
    Service {
        vni: 4242,
        project: "p",
        network: "net",
        domain: "net.p.flotilla.internal".into(),
        subnet: Subnet::new("10.0.0.0/24".parse().unwrap(), None).unwrap(),
        prefix6: Some(prefix6()),
        mtu: 1450,
        nameservers: vec!["10.0.0.2".into()],
        addresses,
    }
}

fn prefix6() -> flotilla_ipam::Ipv6Prefix {
    "fd00:42::/64".parse().unwrap()
}

fn pid_of(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("networks/4242/pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    PathBuf::from(format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_serves_its_guests_their_reservations_and_nothing_else() {
    let mut ns = Namespaces::new("dh");
    let (h1, h2) = ns.two_nodes();
    let mut reservations = vec![
        address("10.0.0.3", "web", "02:46:4c:00:00:03"),
        address("10.0.0.4", "db", "02:46:4c:00:00:04"),
    ];
    let dirs = [tempdir(), tempdir()];
    let mut nodes = Vec::new();
    for (i, node) in [&h1, &h2].into_iter().enumerate() {
        let netlink = Netlink::in_namespace(&PathBuf::from("/run/netns").join(node)).unwrap();
        let other: Ipv4Addr = format!("198.51.100.{}", 2 - i).parse().unwrap();
        let started = Instant::now();
        netlink
            .ensure_overlay(&Overlay {
                vni: 4242,
                mtu: 1450,
                local: format!("198.51.100.{}", i + 1).parse().unwrap(),
                underlay: "ul".into(),
                remotes: BTreeSet::from([other]),
            })
            .await
            .unwrap();
        let (servers, leased) =
            DhcpServers::new(dirs[i].path(), netlink, &format!("{}-dhcp{i}-", ns.prefix));
        servers.ensure(&service(&reservations)).await.unwrap();
        eprintln!(
            "one network's dataplane on a node (bridge, VXLAN, DHCP namespace, port, dnsmasq): {} ms",
            started.elapsed().as_millis()
        );
        nodes.push((servers, leased));
    }
    let script = dirs[0].path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip mtu=$mtu router=$router dns=$dns domain=$search\" > \"$OUT\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let bridge = bridge_name(4242);
    let web = guest(&mut ns, &h1, &bridge, "web", "02:46:4c:00:00:03");
    let db = guest(&mut ns, &h2, &bridge, "db", "02:46:4c:00:00:04");
    let stranger = guest(&mut ns, &h1, &bridge, "x", "02:46:4c:00:00:99");

    // Each guest gets its reservation with the network's gateway, DNS server and MTU.
    let offered = ask_dhcp(&web, &script).expect("web gets a lease");
    assert_eq!(
        offered.trim(),
        "ip=10.0.0.3 mtu=1450 router=10.0.0.1 dns=10.0.0.2 domain=net.p.flotilla.internal"
    );
    let offered = ask_dhcp(&db, &script).expect("db gets a lease");
    assert!(offered.starts_with("ip=10.0.0.4 mtu=1450"), "{offered}");
    // No pool: a MAC IPAM gave nothing gets nothing.
    assert_eq!(ask_dhcp(&stranger, &script), None);

    // Each node's server answered only its own guest: the other's server never heard it.
    let leases = |i: usize| {
        std::fs::read_to_string(dirs[i].path().join("networks/4242/leases")).unwrap_or_default()
    };
    assert!(
        leases(0).contains("10.0.0.3") && !leases(0).contains("10.0.0.4"),
        "{}",
        leases(0)
    );
    assert!(
        leases(1).contains("10.0.0.4") && !leases(1).contains("10.0.0.3"),
        "{}",
        leases(1)
    );

    // The lease is reported: the VM's uid comes out of the channel, and the address is known.
    nodes[0].0.read_leases().await;
    assert_eq!(nodes[0].1.try_recv().ok().as_deref(), Some("uid-web"));
    assert_eq!(
        nodes[0].0.leased("p", "net", "02:46:4c:00:00:03"),
        Some("10.0.0.3".parse().unwrap())
    );
    assert_eq!(nodes[0].0.leased("p", "net", "02:46:4c:00:00:04"), None);

    // Router advertisements give the guest the IPv6 address IPAM derived from its MAC.
    let v6 = prefix6().eui64("02:46:4c:00:00:03").unwrap().to_string();
    eventually("the guest's SLAAC address", || {
        let addrs = run(&["ip", "-n", &web, "-6", "addr", "show", "dev", "eth0"]);
        addrs.contains(&format!("inet6 {v6}/64")) && !addrs.contains("tentative")
    })
    .await;

    // Names of the network's VMs resolve, on any node, through the guest's DNS server.
    run(&[
        "ip",
        "-n",
        &web,
        "addr",
        "add",
        "10.0.0.3/24",
        "dev",
        "eth0",
    ]);
    let answer = run(&[
        "ip",
        "netns",
        "exec",
        &web,
        "busybox",
        "nslookup",
        "db.net.p.flotilla.internal",
        "10.0.0.2",
    ]);
    assert!(answer.contains("10.0.0.4"), "{answer}");
    let answer = run(&[
        "ip",
        "netns",
        "exec",
        &web,
        "busybox",
        "nslookup",
        "-type=AAAA",
        "db.net.p.flotilla.internal",
        "10.0.0.2",
    ]);
    let db6 = prefix6().eui64("02:46:4c:00:00:04").unwrap().to_string();
    assert!(answer.contains(&db6), "{answer}");
    // The server advertises the prefix, not itself as a router.
    let routes = run(&["ip", "-n", &web, "-6", "route"]);
    assert!(!routes.contains("default"), "{routes}");

    // A reservation added later is served by the running server (SIGHUP, same process).
    let pid = pid_of(dirs[0].path()).expect("dnsmasq runs");
    reservations.push(address("10.0.0.9", "late", "02:46:4c:00:00:99"));
    nodes[0].0.ensure(&service(&reservations)).await.unwrap();
    let offered = ask_dhcp(&stranger, &script).expect("the new reservation is served");
    assert!(offered.starts_with("ip=10.0.0.9 "), "{offered}");
    assert_eq!(pid_of(dirs[0].path()), Some(pid));

    // A server that dies is started again, and serves.
    // SAFETY: the test's own dnsmasq.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    eventually("dnsmasq to run again", || {
        pid_of(dirs[0].path()).is_some_and(|p| p != pid)
    })
    .await;
    assert_eq!(nodes[0].0.restarts(), 1);
    assert!(ask_dhcp(&web, &script).is_some());

    // A deleted VM's lease is released: its address goes to a new MAC at once.
    reservations.retain(|a| a.vm != "late");
    reservations.push(address("10.0.0.9", "newer", "02:46:4c:00:00:98"));
    nodes[0].0.ensure(&service(&reservations)).await.unwrap();
    eventually("the deleted VM's lease to be released", || {
        !leases(0).contains("02:46:4c:00:00:99")
    })
    .await;
    run(&[
        "ip",
        "-n",
        &stranger,
        "link",
        "set",
        "eth0",
        "address",
        "02:46:4c:00:00:98",
    ]);
    let offered = ask_dhcp(&stranger, &script).expect("the freed address is given again");
    assert!(offered.starts_with("ip=10.0.0.9 "), "{offered}");

    // Removal leaves nothing: no process, namespace, port or file.
    for (i, (servers, _)) in nodes.iter().enumerate() {
        let pid = pid_of(dirs[i].path()).expect("dnsmasq runs");
        let started = Instant::now();
        servers.remove(4242).await.unwrap();
        let node = [&h1, &h2][i];
        Netlink::in_namespace(&PathBuf::from("/run/netns").join(node))
            .unwrap()
            .remove_overlay(4242)
            .await
            .unwrap();
        eprintln!(
            "removing one network's dataplane from a node (dnsmasq, namespace, devices): {} ms",
            started.elapsed().as_millis()
        );
        assert!(!PathBuf::from(format!("/proc/{pid}")).exists());
        assert!(!dirs[i].path().join("networks/4242").exists());
        let links = run(&["ip", "-n", node, "-br", "link"]);
        assert!(!links.contains("-4242"), "{links}");
        assert!(
            flotilla_dataplane::namespace::namespaces_with_prefix(&format!(
                "{}-dhcp{i}-",
                ns.prefix
            ))
            .is_empty()
        );
    }
}

fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}
