//! Security groups and anti-spoofing with real nftables and br_netfilter, in network namespaces
//! this test makes: a "node" with a bridge and two guests on it. The server guest lets in TCP 22
//! and ICMP only; its replies and the client's return traffic pass by state; a rule naming the
//! client's address (as a remote group resolves to its members) opens TCP 80 and closes it again
//! when the membership changes; a guest sending from an address or MAC not its own is dropped;
//! another table in the node's ruleset is untouched. Also prints the size and apply time of the
//! tables for 1,000 ports with 10 rules each. Needs root.

use std::net::{IpAddr, Ipv4Addr};
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

fn tcp(port: u16, remote: Vec<(IpAddr, u8)>) -> Rule {
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
    let group = |members: Vec<(IpAddr, u8)>| {
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
                        vec![(IpAddr::V4(Ipv4Addr::new(10, (r % 250) as u8, 0, 0)), 16)],
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

/// Sends one ICMPv6 message (hop limit 255, as neighbour discovery needs) from `guest`'s eth0
/// to all nodes: `kind` is `na <target>` (an unsolicited, overriding neighbour advertisement
/// naming this guest's MAC) or `ra` (a router advertisement offering a default route).
fn send_nd(guest: &str, kind: &str) {
    let script = r#"
import socket, struct, sys
mac = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))
if sys.argv[1] == 'na':
    body = struct.pack('!BBHI', 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, sys.argv[2]) + bytes([2, 1]) + mac
else:
    body = struct.pack('!BBHBBHII', 134, 0, 0, 64, 0, 1800, 0, 0) + bytes([1, 1]) + mac
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
s.sendto(body, ('ff02::1', 0, 0, socket.if_nametoindex('eth0')))
"#;
    let mut args = vec!["netns", "exec", guest, "python3", "-c", script];
    args.extend(kind.split(' '));
    let status = Command::new("ip").args(&args).status().unwrap();
    assert!(status.success(), "sending {kind} from {guest}");
}

/// IPv6 through the same tables: rules apply to it (a CIDR rule to its own family only, a
/// remote group through its IPv6 set), neighbour discovery works with no rule for it, and a VM
/// can neither send from an address not its own, nor claim another's address in a neighbour
/// advertisement, nor advertise itself as a router — each shown to work without the port's
/// policy and to be stopped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_follows_the_rules_and_cannot_be_spoofed() {
    let mut ns = Namespaces::new("f6");
    let node = ns.add("node");
    let node_path = PathBuf::from("/run/netns").join(&node);
    run(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
    run(&["ip", "-n", &node, "link", "set", "br0", "up"]);
    let server = guest(&mut ns, &node, "s", "10.0.0.60/24", "02:46:4c:00:00:60");
    let client = guest(&mut ns, &node, "c", "10.0.0.50/24", "02:46:4c:00:00:50");
    let victim = guest(&mut ns, &node, "v", "10.0.0.70/24", "02:46:4c:00:00:70");
    for (g, ip) in [
        (&server, "fd00:10::60/64"),
        (&client, "fd00:10::50/64"),
        (&victim, "fd00:10::70/64"),
    ] {
        run(&["ip", "-n", g, "addr", "add", ip, "dev", "eth0", "nodad"]);
    }
    // Link-local addresses finish duplicate address detection.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let v6 = |ip: &str| -> Vec<(std::net::IpAddr, u8)> { vec![(ip.parse().unwrap(), 128)] };
    let with6 = |mut p: PortPolicy, ip: &str| {
        p.addresses.extend(v6(ip));
        p
    };
    let icmp = Rule {
        protocol: Protocol::Icmp,
        ports: None,
        remote: Vec::new(),
        remote_set: None,
    };
    let server_port = |set_members: &[&str]| {
        let ingress = vec![
            tcp(22, Vec::new()),
            icmp.clone(),
            // TCP 80 from an IPv4 network only: not over IPv6.
            tcp(80, vec![("10.0.0.0".parse().unwrap(), 24)]),
            Rule {
                remote_set: Some("sg0".into()),
                ..tcp(8080, Vec::new())
            },
        ];
        let port = with6(
            port("ps", 1, [2, 0x46, 0x4c, 0, 0, 0x60], "10.0.0.60", ingress),
            "fd00:10::60",
        );
        let sets = [flotilla_dataplane::AddressSet {
            name: "sg0".into(),
            members: set_members
                .iter()
                .map(|m| (m.parse().unwrap(), 128))
                .collect(),
        }];
        (port, sets)
    };
    let client_port = with6(
        port(
            "pc",
            2,
            [2, 0x46, 0x4c, 0, 0, 0x50],
            "10.0.0.50",
            vec![icmp.clone()],
        ),
        "fd00:10::50",
    );
    let victim_port = with6(
        port(
            "pv",
            3,
            [2, 0x46, 0x4c, 0, 0, 0x70],
            "10.0.0.70",
            vec![icmp.clone()],
        ),
        "fd00:10::70",
    );
    let apply = |client: Option<PortPolicy>, members: &'static [&'static str]| {
        let node_path = node_path.clone();
        let (server, sets) = server_port(members);
        let mut ports = vec![server, victim_port.clone()];
        ports.extend(client);
        async move { apply_firewall(&node_path, &ports, &sets).await.unwrap() }
    };
    apply(Some(client_port.clone()), &["fd00:10::50"]).await;

    assert!(
        connects(&server, &client, "fd00:10::60", 22),
        "TCP 22 over IPv6"
    );
    assert!(
        !connects(&server, &client, "fd00:10::60", 80),
        "a rule for an IPv4 network does not open IPv6"
    );
    assert!(connects(&server, &client, "10.0.0.60", 80), "but IPv4");
    assert!(
        connects(&server, &client, "fd00:10::60", 8080),
        "a member's IPv6 address is in the group's set"
    );
    apply(Some(client_port.clone()), &["fd00:10::99"]).await;
    assert!(
        !connects(&server, &client, "fd00:10::60", 8080),
        "and leaves it"
    );
    assert!(
        pings(&client, "fd00:10::60", None),
        "ICMPv6 echo, and neighbour discovery with no rule for it"
    );
    assert!(
        pings(&client, "fe80::46:4cff:fe00:60%eth0", None),
        "link-local addresses work"
    );

    // A source address not its own.
    run(&[
        "ip",
        "-n",
        &client,
        "addr",
        "add",
        "fd00:10::99/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    assert!(
        !pings(&client, "fd00:10::60", Some("fd00:10::99")),
        "a spoofed IPv6 source is dropped"
    );
    assert!(pings(&client, "fd00:10::60", Some("fd00:10::50")));

    // Claiming the server's address: the victim knows the server's MAC, the client says it
    // is its own. Without the client's policy the victim believes it; with it, never.
    let server_mac = |victim: &str| {
        assert!(pings(victim, "fd00:10::60", None));
        run(&["ip", "-n", victim, "-6", "neigh", "show", "fd00:10::60"])
    };
    assert!(server_mac(&victim).contains("02:46:4c:00:00:60"));
    apply(None, &[]).await;
    let poisoned = (0..3).any(|_| {
        run(&["ip", "-n", &victim, "-6", "neigh", "flush", "dev", "eth0"]);
        assert!(server_mac(&victim).contains("02:46:4c:00:00:60"));
        send_nd(&client, "na fd00:10::60");
        std::thread::sleep(std::time::Duration::from_millis(200));
        run(&["ip", "-n", &victim, "-6", "neigh", "show", "fd00:10::60"])
            .contains("02:46:4c:00:00:50")
    });
    assert!(
        poisoned,
        "without its policy the client can claim the address"
    );
    apply(Some(client_port.clone()), &[]).await;
    run(&["ip", "-n", &victim, "-6", "neigh", "flush", "dev", "eth0"]);
    assert!(server_mac(&victim).contains("02:46:4c:00:00:60"));
    send_nd(&client, "na fd00:10::60");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = run(&["ip", "-n", &victim, "-6", "neigh", "show", "fd00:10::60"]);
    assert!(
        after.contains("02:46:4c:00:00:60"),
        "with it the claim is dropped: {after}"
    );

    // Router advertisements from a VM: without the policy the victim takes a default route
    // from it; with it, none.
    let default_route = || run(&["ip", "-n", &victim, "-6", "route", "show", "default"]);
    apply(Some(client_port.clone()), &[]).await;
    send_nd(&client, "ra");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        default_route().trim(),
        "",
        "a VM's advertisement is dropped"
    );
    apply(None, &[]).await;
    send_nd(&client, "ra");
    let mut learned = String::new();
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        learned = default_route();
        if !learned.trim().is_empty() {
            break;
        }
    }
    assert!(
        learned.contains("fe80::46:4cff:fe00:50"),
        "without the policy it is believed: {learned:?}"
    );
}
