//! Throughput through a router namespace against a plain path (`make bench-router`): in
//! namespaces this bench makes, a guest on an overlay bridge sends TCP (iperf3, 5 s) to a peer
//! on the same bridge (veth, bridge, veth: the plain path), then to an upstream host on an
//! external bridge through a router (veth, bridge, the router's veth pair, forwarding and SNAT,
//! its external veth pair, bridge, veth) — in one run, on the same kernel. With
//! FLOTILLA_BENCH_FIREWALL=1 both paths carry Flotilla's security group tables too. Prints one
//! JSON line. Root only; needs iperf3.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use flotilla_dataplane::namespace::ensure_namespace;
use flotilla_dataplane::testkit::{run, Eth0, Namespaces};
use flotilla_dataplane::{
    bridge_name, External, ExternalPort, Netlink, Overlay, Router, RouterNetwork,
};

/// iperf3 from `client` to `server` (already listening): Gbit/s.
fn throughput(client: &str, server_address: &str) -> f64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            client,
            "iperf3",
            "-c",
            server_address,
            "-t",
            "5",
            "-J",
        ])
        .output()
        .expect("iperf3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3's JSON");
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("a received rate")
        / 1e9
}

fn listen(namespace: &str) -> std::process::Child {
    let child = Command::new("ip")
        .args(["netns", "exec", namespace, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(std::time::Duration::from_millis(300));
    child
}

#[tokio::main]
async fn main() {
    let mut ns = Namespaces::new("bench-rt");
    let node = ns.node("node");
    run(&["ip", "-n", &node, "link", "add", "br-ex", "type", "bridge"]);
    run(&["ip", "-n", &node, "link", "set", "br-ex", "up"]);
    let netlink = Netlink::in_namespace(&PathBuf::from("/run/netns").join(&node)).unwrap();
    let vni = 4200;
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
    let bridge = bridge_name(vni);
    let host =
        |ns: &mut Namespaces, bridge: &str, short: &str, address: &str, via: Option<&str>| {
            ns.guest(
                &node,
                bridge,
                short,
                Eth0 {
                    address: Some(address),
                    via,
                    mtu: Some(if bridge.starts_with("fb-") {
                        1450
                    } else {
                        1500
                    }),
                    ..Default::default()
                },
            )
        };
    let guest = host(&mut ns, &bridge, "g", "10.0.0.11/24", Some("10.0.0.1"));
    let peer = host(&mut ns, &bridge, "p", "10.0.0.12/24", None);
    let upstream = host(&mut ns, "br-ex", "up", "203.0.113.1/24", None);
    let namespace = ensure_namespace(&format!("{}-router", ns.prefix)).unwrap();
    netlink
        .ensure_router(&Router {
            id: 1,
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
                address: "203.0.113.2".parse().unwrap(),
                prefix_len: 24,
                gateway: "203.0.113.1".parse().unwrap(),
                mtu: 1500,
                mac: None,
            })),
            floating: Vec::new(),
            routes: Vec::new(),
        })
        .await
        .unwrap();
    let firewall = std::env::var_os("FLOTILLA_BENCH_FIREWALL").is_some();
    if firewall {
        // Every port of the guest's bridge filtered, allowing all egress and TCP 5201 in.
        let rule = |ports| flotilla_dataplane::Rule {
            protocol: flotilla_dataplane::Protocol::Tcp,
            ports,
            remote: Vec::new(),
            remote_set: None,
        };
        let port = |name: &str, id: u16, ip: &str| flotilla_dataplane::PortPolicy {
            port: name.into(),
            bridge: bridge.clone(),
            id,
            zone: vni as u16,
            mac: [0; 6],
            addresses: vec![(ip.parse().unwrap(), 32)],
            ingress: vec![rule(Some((5201, 5201)))],
            egress: vec![rule(None)],
        };
        // Anti-spoofing compares MACs: take the guests' own.
        let mac_of = |namespace: &str| -> [u8; 6] {
            let text = run(&[
                "ip",
                "netns",
                "exec",
                namespace,
                "cat",
                "/sys/class/net/eth0/address",
            ]);
            let bytes: Vec<u8> = text
                .trim()
                .split(':')
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect();
            bytes.try_into().unwrap()
        };
        let mut ports = vec![port("pg", 1, "10.0.0.11"), port("pp", 2, "10.0.0.12")];
        ports[0].mac = mac_of(&guest);
        ports[1].mac = mac_of(&peer);
        flotilla_dataplane::apply_firewall(&PathBuf::from("/run/netns").join(&node), &ports, &[])
            .await
            .unwrap();
    }

    let mut server = listen(&peer);
    let plain = throughput(&guest, "10.0.0.12");
    let _ = server.wait();
    let mut server = listen(&upstream);
    let routed = throughput(&guest, "203.0.113.1");
    let _ = server.wait();
    println!(
        "{}",
        serde_json::json!({
            "plain_gbit_s": (plain * 100.0).round() / 100.0,
            "through_router_gbit_s": (routed * 100.0).round() / 100.0,
            "router_vs_plain": (routed / plain * 100.0).round() / 100.0,
            "security_groups": firewall,
        })
    );
}
