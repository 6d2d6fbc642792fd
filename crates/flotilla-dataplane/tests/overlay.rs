//! The overlay dataplane in network namespaces this test makes: two "nodes" joined by a veth
//! underlay, each carrying two overlay networks whose guests (namespaces on veths into the
//! bridges) use the same addresses. Guests of one network reach each other across the VXLAN;
//! the other network's guests are out of reach; ensuring again changes nothing; removal leaves no
//! device behind. Needs root (it makes namespaces); it touches nothing outside them.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use flotilla_dataplane::testkit::{pings, run, Eth0, Namespaces};
use flotilla_dataplane::{bridge_name, vxlan_name, Netlink, Overlay};

/// `bridge fdb show dev <device>` in `ns`.
fn fdb(ns: &str, device: &str) -> String {
    run(&["bridge", "-n", ns, "fdb", "show", "dev", device])
}

fn links(ns: &str) -> String {
    run(&["ip", "-n", ns, "-br", "link"])
}

/// A guest on overlay `vni` of `node`, MTU 1450, with `address`.
fn guest(ns: &mut Namespaces, node: &str, vni: u32, short: &str, address: &str) -> String {
    let eth0 = Eth0 {
        mtu: Some(1450),
        address: Some(address),
        ..Default::default()
    };
    ns.guest(node, &bridge_name(vni), short, eth0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_networks_connect_their_guests_across_nodes_and_nothing_else() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making network namespaces needs root");
        return;
    }
    let mut ns = Namespaces::new("dp");
    let (h1, h2) = ns.two_nodes();
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
    let ga1 = guest(&mut ns, &h1, 4096, "ga1", "10.0.0.11/24");
    let _ga2 = guest(&mut ns, &h2, 4096, "ga2", "10.0.0.12/24");
    let gb1 = guest(&mut ns, &h1, 4097, "gb1", "10.0.0.11/24");
    let _gb2 = guest(&mut ns, &h2, 4097, "gb2", "10.0.0.12/24");
    let _gb3 = guest(&mut ns, &h2, 4097, "gb3", "10.0.0.13/24");
    assert!(pings(&ga1, "10.0.0.12", None), "tenant A crosses the VXLAN");
    assert!(pings(&gb1, "10.0.0.12", None), "tenant B crosses the VXLAN");
    assert!(pings(&gb1, "10.0.0.13", None));
    assert!(
        !pings(&ga1, "10.0.0.13", None),
        "tenant A must not reach tenant B's guest"
    );

    // Ensuring again changes nothing; a device taken down comes back up; the flood list follows
    // the remotes.
    n1.ensure_overlay(&overlay(4096, a1, a2)).await.unwrap();
    run(&["ip", "-n", &h1, "link", "set", &vxlan_name(4096), "down"]);
    n1.ensure_overlay(&overlay(4096, a1, a2)).await.unwrap();
    assert!(pings(&ga1, "10.0.0.12", None), "repaired");
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
