//! The overlay dataplane in network namespaces this test makes: two "nodes" joined by a veth
//! underlay, each carrying two overlay networks whose guests (namespaces on veths into the
//! bridges) use the same addresses. Guests of one network reach each other across the VXLAN;
//! the other network's guests are out of reach; ensuring again changes nothing; removal leaves no
//! device behind. Needs root (it makes namespaces); it touches nothing outside them.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use flotilla_dataplane::{bridge_name, vxlan_name, Netlink, Overlay};

/// Namespaces named with this test's prefix, deleted however the test ends.
struct Namespaces {
    prefix: String,
    made: Vec<String>,
}

impl Namespaces {
    fn new() -> Self {
        Namespaces {
            prefix: format!("fltdp{}", std::process::id()),
            made: Vec::new(),
        }
    }

    fn add(&mut self, short: &str) -> String {
        let name = format!("{}-{short}", self.prefix);
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        self.made.push(name.clone());
        name
    }

    fn path(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.made {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A guest: a namespace with `eth0` (address `ip`/24, MTU 1450) on a veth into `bridge` of `node`.
fn guest(ns: &mut Namespaces, node: &str, bridge: &str, short: &str, ip: &str) -> String {
    let name = ns.add(short);
    let port = format!("p{short}");
    run(&[
        "ip", "-n", node, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
        &name,
    ]);
    run(&[
        "ip", "-n", node, "link", "set", &port, "master", bridge, "mtu", "1450", "up",
    ]);
    run(&[
        "ip", "-n", &name, "link", "set", "eth0", "mtu", "1450", "up",
    ]);
    run(&[
        "ip",
        "-n",
        &name,
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        "eth0",
    ]);
    name
}

fn pings(from: &str, to: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", from, "busybox", "ping", "-c", "2", "-W", "2", to,
        ])
        .output()
        .unwrap()
        .status
        .success()
}

/// `bridge fdb show dev <device>` in `ns`.
fn fdb(ns: &str, device: &str) -> String {
    let out = Command::new("bridge")
        .args(["-n", ns, "fdb", "show", "dev", device])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn links(ns: &str) -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["-n", ns, "-br", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_networks_connect_their_guests_across_nodes_and_nothing_else() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making network namespaces needs root");
        return;
    }
    let mut ns = Namespaces::new();
    let (h1, h2) = (ns.add("h1"), ns.add("h2"));
    run(&[
        "ip", "-n", &h1, "link", "add", "ul", "type", "veth", "peer", "name", "ul", "netns", &h2,
    ]);
    for (node, address) in [(&h1, "198.51.100.1/24"), (&h2, "198.51.100.2/24")] {
        run(&["ip", "-n", node, "addr", "add", address, "dev", "ul"]);
        run(&["ip", "-n", node, "link", "set", "ul", "up"]);
    }
    let (a1, a2): (Ipv4Addr, Ipv4Addr) = (
        "198.51.100.1".parse().unwrap(),
        "198.51.100.2".parse().unwrap(),
    );
    let overlay = |vni, local, remote| Overlay {
        vni,
        mtu: 1450,
        local,
        underlay: "ul".into(),
        remotes: BTreeSet::from([remote]),
    };
    run(&[
        "ip",
        "-n",
        &h1,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.2",
        "dev",
        "ul",
    ]);
    let started = std::time::Instant::now();
    let n1 = Netlink::in_namespace(&Namespaces::path(&h1)).unwrap();
    // The tunnel's default end: the default route's interface and its address.
    assert_eq!(
        n1.default_route().await.unwrap(),
        Some(("ul".to_string(), "198.51.100.1".parse().unwrap()))
    );
    let n2 = Netlink::in_namespace(&Namespaces::path(&h2)).unwrap();
    for vni in [4096, 4097] {
        n1.ensure_overlay(&overlay(vni, a1, a2)).await.unwrap();
        n2.ensure_overlay(&overlay(vni, a2, a1)).await.unwrap();
    }
    let set_up = started.elapsed();
    assert_eq!(n1.overlays().await.unwrap(), BTreeSet::from([4096, 4097]));

    // Tenant A on 4096 and tenant B on 4097 use the same addresses; B has one more guest.
    let ga1 = guest(&mut ns, &h1, &bridge_name(4096), "ga1", "10.0.0.11");
    let _ga2 = guest(&mut ns, &h2, &bridge_name(4096), "ga2", "10.0.0.12");
    let gb1 = guest(&mut ns, &h1, &bridge_name(4097), "gb1", "10.0.0.11");
    let _gb2 = guest(&mut ns, &h2, &bridge_name(4097), "gb2", "10.0.0.12");
    let _gb3 = guest(&mut ns, &h2, &bridge_name(4097), "gb3", "10.0.0.13");
    assert!(pings(&ga1, "10.0.0.12"), "tenant A crosses the VXLAN");
    assert!(pings(&gb1, "10.0.0.12"), "tenant B crosses the VXLAN");
    assert!(pings(&gb1, "10.0.0.13"));
    assert!(
        !pings(&ga1, "10.0.0.13"),
        "tenant A must not reach tenant B's guest"
    );

    // Ensuring again changes nothing; a device taken down comes back up; the flood list follows
    // the remotes.
    n1.ensure_overlay(&overlay(4096, a1, a2)).await.unwrap();
    run(&["ip", "-n", &h1, "link", "set", &vxlan_name(4096), "down"]);
    n1.ensure_overlay(&overlay(4096, a1, a2)).await.unwrap();
    assert!(pings(&ga1, "10.0.0.12"), "repaired");
    let mut two = overlay(4096, a1, a2);
    two.remotes.insert("198.51.100.3".parse().unwrap());
    n1.ensure_overlay(&two).await.unwrap();
    let entries = fdb(&h1, &vxlan_name(4096));
    assert_eq!(entries.matches("00:00:00:00:00:00").count(), 2, "{entries}");
    n1.ensure_overlay(&overlay(4096, a1, a2)).await.unwrap();
    let entries = fdb(&h1, &vxlan_name(4096));
    assert!(!entries.contains("198.51.100.3"), "{entries}");

    // Removal leaves none of the overlay's devices.
    let started = std::time::Instant::now();
    for vni in [4096, 4097] {
        n1.remove_overlay(vni).await.unwrap();
    }
    let torn_down = started.elapsed();
    let left = links(&h1);
    assert!(!left.contains("fb-") && !left.contains("fx-"), "{left}");
    assert!(n1.overlays().await.unwrap().is_empty());
    n1.remove_overlay(4096).await.unwrap();
    eprintln!(
        "two overlays on two nodes set up in {:.1} ms, torn down on one node in {:.1} ms",
        set_up.as_secs_f64() * 1000.0,
        torn_down.as_secs_f64() * 1000.0
    );
}
