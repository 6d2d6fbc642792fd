//! Security groups and anti-spoofing with real nftables and br_netfilter, in network namespaces
//! this test makes: a "node" with a bridge and two guests on it. The server guest lets in TCP 22
//! and ICMP only; its replies and the client's return traffic pass by state; a rule naming the
//! client's address (as a remote group resolves to its members) opens TCP 80 and closes it again
//! when the membership changes; a guest sending from an address or MAC not its own is dropped;
//! another table in the node's ruleset is untouched. Also prints the size and apply time of the
//! tables for 1,000 ports with 10 rules each. Needs root.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use flotilla_dataplane::testkit::{pings, run, Eth0, Namespaces};
use flotilla_dataplane::{apply_firewall, PortPolicy, Protocol, Rule};

/// A guest on `br0` of `node` with `address` and `mac`.
fn guest(ns: &mut Namespaces, node: &str, short: &str, address: &str, mac: &str) -> String {
    let eth0 = Eth0 {
        mac: Some(mac),
        address: Some(address),
        ..Default::default()
    };
    ns.guest(node, "br0", short, eth0)
}

/// Whether `client` reads what `server` serves on `port` (a listener for one connection).
fn connects(server: &str, client: &str, to: &str, port: u16) -> bool {
    let mut listener = Command::new("sh")
        .args([
            "-c",
            &format!("echo open | ip netns exec {server} timeout 4 busybox nc -l -p {port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            client,
            "busybox",
            "nc",
            "-w",
            "2",
            to,
            &port.to_string(),
        ])
        .output()
        .unwrap();
    let _ = listener.wait();
    String::from_utf8_lossy(&out.stdout).contains("open")
}

fn port(name: &str, id: u16, mac: [u8; 6], ip: &str, ingress: Vec<Rule>) -> PortPolicy {
    PortPolicy {
        port: name.into(),
        bridge: "br0".into(),
        id,
        zone: 1,
        mac,
        addresses: vec![(ip.parse().unwrap(), 32)],
        ingress,
        egress: vec![Rule {
            protocol: Protocol::Any,
            ports: None,
            remote: Vec::new(),
            remote_set: None,
        }],
    }
}

fn tcp(port: u16, remote: Vec<(Ipv4Addr, u8)>) -> Rule {
    Rule {
        protocol: Protocol::Tcp,
        ports: Some((port, port)),
        remote,
        remote_set: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_groups_and_anti_spoofing_hold_on_the_bridge() {
    let mut ns = Namespaces::new("fw");
    let node = ns.add("node");
    let node_path = PathBuf::from("/run/netns").join(&node);
    run(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
    run(&["ip", "-n", &node, "link", "set", "br0", "up"]);
    let server = guest(&mut ns, &node, "s", "10.0.0.60/24", "02:46:4c:00:00:60");
    let client = guest(&mut ns, &node, "c", "10.0.0.50/24", "02:46:4c:00:00:50");
    // Someone else's table in the node's ruleset.
    let other = "table inet someone-else {\n  chain c {\n    type filter hook input priority 0; policy accept;\n    tcp dport 9 counter accept\n  }\n}\n";
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &node, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(nft.stdin.as_mut().unwrap(), other.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success());
    let before = run(&[
        "ip",
        "netns",
        "exec",
        &node,
        "nft",
        "list",
        "table",
        "inet",
        "someone-else",
    ]);

    // Open before any rule.
    assert!(connects(&server, &client, "10.0.0.60", 80));

    let icmp = Rule {
        protocol: Protocol::Icmp,
        ports: None,
        remote: Vec::new(),
        remote_set: None,
    };
    let server_port = |extra: Vec<Rule>| {
        let mut ingress = vec![tcp(22, Vec::new()), icmp.clone()];
        ingress.extend(extra);
        port("ps", 1, [2, 0x46, 0x4c, 0, 0, 0x60], "10.0.0.60", ingress)
    };
    let client_port = port(
        "pc",
        2,
        [2, 0x46, 0x4c, 0, 0, 0x50],
        "10.0.0.50",
        Vec::new(),
    );
    apply_firewall(
        &node_path,
        &[server_port(Vec::new()), client_port.clone()],
        &[],
    )
    .await
    .unwrap();
    assert!(
        connects(&server, &client, "10.0.0.60", 22),
        "TCP 22 is let in"
    );
    assert!(
        !connects(&server, &client, "10.0.0.60", 80),
        "TCP 80 is not"
    );
    assert!(
        pings(&client, "10.0.0.60", None),
        "ICMP is let in, and its reply back"
    );
    assert!(
        !pings(&server, "10.0.0.50", None),
        "the client lets nothing in"
    );

    // A remote-group rule: TCP 80 from the group's members, here the client; then it leaves.
    // The group's members are a named set the rule refers to.
    let from_group = Rule {
        remote_set: Some("sg0".into()),
        ..tcp(80, Vec::new())
    };
    let group = |members: Vec<(Ipv4Addr, u8)>| {
        [flotilla_dataplane::AddressSet {
            name: "sg0".into(),
            members,
        }]
    };
    apply_firewall(
        &node_path,
        &[server_port(vec![from_group.clone()]), client_port.clone()],
        &group(vec![("10.0.0.50".parse().unwrap(), 32)]),
    )
    .await
    .unwrap();
    assert!(
        connects(&server, &client, "10.0.0.60", 80),
        "a member gets in"
    );
    let started = Instant::now();
    apply_firewall(
        &node_path,
        &[server_port(vec![from_group]), client_port.clone()],
        &group(vec![("10.0.0.99".parse().unwrap(), 32)]),
    )
    .await
    .unwrap();
    eprintln!(
        "a rule change applied in {} ms",
        started.elapsed().as_millis()
    );
    assert!(
        !connects(&server, &client, "10.0.0.60", 80),
        "a former member does not"
    );

    // Anti-spoofing: another source address, another MAC.
    run(&[
        "ip",
        "-n",
        &client,
        "addr",
        "add",
        "10.0.0.99/24",
        "dev",
        "eth0",
    ]);
    assert!(
        !pings(&client, "10.0.0.60", Some("10.0.0.99")),
        "a spoofed address is dropped"
    );
    assert!(pings(&client, "10.0.0.60", Some("10.0.0.50")));
    run(&[
        "ip",
        "-n",
        &client,
        "link",
        "set",
        "eth0",
        "address",
        "02:46:4c:00:00:51",
    ]);
    assert!(
        !pings(&client, "10.0.0.60", Some("10.0.0.50")),
        "a spoofed MAC is dropped"
    );

    // Nothing else in the node's ruleset changed; removing Flotilla's rules leaves it so.
    apply_firewall(&node_path, &[], &[]).await.unwrap();
    let after = run(&[
        "ip",
        "netns",
        "exec",
        &node,
        "nft",
        "list",
        "table",
        "inet",
        "someone-else",
    ]);
    assert_eq!(before, after);

    // Scale: 1,000 ports with 10 rules each, applied in one batch in a scratch namespace.
    let scratch = ns.add("scale");
    let ports: Vec<PortPolicy> = (1..=1000u16)
        .map(|i| {
            let rules = (0..10u16)
                .map(|r| {
                    tcp(
                        1000 + r,
                        vec![(Ipv4Addr::new(10, (r % 250) as u8, 0, 0), 16)],
                    )
                })
                .collect();
            let mut p = port(
                &format!("tap{i}"),
                i,
                [2, 0x46, 0x4c, 0, (i >> 8) as u8, i as u8],
                &format!("10.1.{}.{}", i / 250, i % 250 + 1),
                rules,
            );
            p.bridge = format!("fb-{}", 4096 + i % 10);
            p.zone = 4096 + i % 10;
            p
        })
        .collect();
    let size = flotilla_dataplane::firewall_rules(&ports, &[]).len();
    let scratch_path = PathBuf::from("/run/netns").join(&scratch);
    let started = Instant::now();
    apply_firewall(&scratch_path, &ports, &[]).await.unwrap();
    let first = started.elapsed();
    let started = Instant::now();
    apply_firewall(&scratch_path, &ports, &[]).await.unwrap();
    eprintln!(
        "1,000 ports x 10 rules: {} KiB of rules, applied in {} ms (replaced in {} ms)",
        size / 1024,
        first.as_millis(),
        started.elapsed().as_millis()
    );
}
