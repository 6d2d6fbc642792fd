//! Security groups and anti-spoofing for the VMs' ports on a node, as two nftables tables that
//! Flotilla owns (`bridge flotilla` and `inet flotilla`), each replaced whole in one batch; no
//! other table is read or touched.
//!
//! The kernel here has no conntrack in the bridge family, so (as measured in the networking
//! recipe, B4) the bridge table only marks packets by port — bits 0–15 the port they go to,
//! bits 16–31 the port they come from — and drops spoofed frames (a source MAC, ARP sender or
//! IPv4 source that is not the port's, and DHCP answers from a VM); br_netfilter then hands
//! bridged IPv4 to the `inet` table, which keeps state (a conntrack zone per bridge, so
//! overlapping tenants never share it) and applies each port's rules by its marks. A packet from
//! one VM to another passes the sender's egress rules and then the receiver's ingress rules.
//! IPv6 is not filtered yet (it passes).

use std::fmt::Write;
use std::net::Ipv4Addr;

/// What a rule lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Any,
    Icmp,
    Tcp,
    Udp,
}

/// One allow rule of a port, in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub protocol: Protocol,
    /// For TCP and UDP: the destination ports (inclusive), None: all.
    pub ports: Option<(u16, u16)>,
    /// The other end: these networks (address, prefix length); empty: anywhere (unless
    /// `remote_set` names a set).
    pub remote: Vec<(Ipv4Addr, u8)>,
    /// The other end is a named set of the table instead (a security group's members: one
    /// set shared by every rule that names the group, however many ports have them).
    pub remote_set: Option<String>,
}

/// A named set of addresses that rules refer to by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressSet {
    /// Letters, digits and `_` only (checked: others are left out with the rules using them).
    pub name: String,
    pub members: Vec<(Ipv4Addr, u8)>,
}

/// One VM port (its tap on a bridge) and what it may send and receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicy {
    /// The bridge port (the tap), and the bridge it is on.
    pub port: String,
    pub bridge: String,
    /// 1 to 65,535, unique on the node: the port's mark.
    pub id: u16,
    pub mac: [u8; 6],
    /// The conntrack zone of its bridge (1 to 65,535; ports of one bridge share it, and it must
    /// stay the same while connections last: tracked state lives in the zone).
    pub zone: u16,
    /// The IPv4 addresses it may send from: its own, and networks of its allowed address pairs.
    pub addresses: Vec<(Ipv4Addr, u8)>,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn set<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Interface names reach the rules only when they are names (no quote can end the string).
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The matches of one rule (`remote` on the given side), or None when it allows everything.
fn matches(rule: &Rule, remote_side: &str) -> String {
    let mut m = String::new();
    if let Some(name) = &rule.remote_set {
        let _ = write!(m, "ip {remote_side} @{name} ");
    } else if !rule.remote.is_empty() {
        let nets = set(rule.remote.iter().map(|(a, l)| format!("{a}/{l}")));
        let _ = write!(m, "ip {remote_side} {nets} ");
    }
    match rule.protocol {
        Protocol::Any => m.push_str("meta nfproto ipv4 "),
        Protocol::Icmp => m.push_str("meta l4proto icmp "),
        Protocol::Tcp | Protocol::Udp => {
            let p = if rule.protocol == Protocol::Tcp {
                "tcp"
            } else {
                "udp"
            };
            match rule.ports {
                Some((a, b)) if a == b => {
                    let _ = write!(m, "{p} dport {a} ");
                }
                Some((a, b)) => {
                    let _ = write!(m, "{p} dport {a}-{b} ");
                }
                None => {
                    let _ = write!(m, "meta l4proto {p} ");
                }
            }
        }
    }
    m
}

/// Replaces Flotilla's two tables in `namespace` (`/proc/self/ns/net` for the caller's own)
/// with those for `ports`, atomically (one batch).
pub async fn apply_firewall(
    namespace: &std::path::Path,
    ports: &[PortPolicy],
    sets: &[AddressSet],
) -> Result<(), crate::DataplaneError> {
    let rules = firewall_rules(ports, sets);
    crate::namespace::run_in("nft", &["-f", "-"], namespace, Some(&rules)).await
}

fn set_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn cidr(a: &Ipv4Addr, l: u8) -> String {
    if l == 32 {
        a.to_string()
    } else {
        format!("{a}/{l}")
    }
}

/// Both tables for `ports` (their rules may name `sets`), as one `nft -f` batch that replaces
/// them.
pub fn firewall_rules(ports: &[PortPolicy], sets: &[AddressSet]) -> String {
    let sets: Vec<&AddressSet> = sets.iter().filter(|s| set_name_ok(&s.name)).collect();
    let known = |r: &Rule| {
        r.remote_set
            .as_ref()
            .is_none_or(|n| sets.iter().any(|s| &s.name == n))
    };
    let owned: Vec<PortPolicy> = ports
        .iter()
        .filter(|p| name_ok(&p.port) && name_ok(&p.bridge) && p.id != 0)
        .map(|p| PortPolicy {
            ingress: p.ingress.iter().filter(|r| known(r)).cloned().collect(),
            egress: p.egress.iter().filter(|r| known(r)).cloned().collect(),
            ..p.clone()
        })
        .collect();
    let ports: Vec<&PortPolicy> = owned.iter().collect();
    let mut out = String::new();
    // The bridge table: marks, and anti-spoofing.
    out.push_str(
        "table bridge flotilla {}\ndelete table bridge flotilla\ntable bridge flotilla {\n",
    );
    out.push_str("  chain forward {\n    type filter hook forward priority -200; policy accept;\n");
    for p in &ports {
        let _ = writeln!(out, "    iifname \"{}\" jump from-{}", p.port, p.id);
        let _ = writeln!(
            out,
            "    oifname \"{}\" meta mark set meta mark | 0x{:x}",
            p.port, p.id
        );
        let _ = writeln!(
            out,
            "    iifname \"{}\" meta mark set meta mark | 0x{:x}",
            p.port,
            u32::from(p.id) << 16
        );
    }
    out.push_str("  }\n");
    for p in &ports {
        let own = set(p.addresses.iter().map(|(a, l)| cidr(a, *l)));
        let _ = write!(
            out,
            "  chain from-{id} {{\n    ether saddr != {mac} drop\n    arp saddr ether != {mac} drop\n",
            id = p.id,
            mac = mac(&p.mac)
        );
        if p.addresses.is_empty() {
            out.push_str("    meta protocol arp drop\n");
        } else {
            let _ = writeln!(out, "    arp saddr ip != {own} drop");
        }
        out.push_str("    ip saddr 0.0.0.0 udp sport 68 udp dport 67 return\n");
        out.push_str("    udp sport 67 drop\n");
        if p.addresses.is_empty() {
            out.push_str("    meta protocol ip drop\n");
        } else {
            let _ = writeln!(out, "    ip saddr != {own} drop");
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");

    // The inet table: state per bridge, and each port's rules.
    out.push_str("table inet flotilla {}\ndelete table inet flotilla\ntable inet flotilla {\n");
    for s in &sets {
        let _ = write!(
            out,
            "  set {} {{\n    type ipv4_addr\n    flags interval\n",
            s.name
        );
        if !s.members.is_empty() {
            let _ = writeln!(
                out,
                "    auto-merge\n    elements = {}",
                set(s.members.iter().map(|(a, l)| cidr(a, *l)))
            );
        }
        out.push_str("  }\n");
    }
    out.push_str("  chain zones {\n    type filter hook prerouting priority raw; policy accept;\n");
    let mut zones: Vec<(&str, u16)> = ports.iter().map(|p| (p.bridge.as_str(), p.zone)).collect();
    zones.sort();
    zones.dedup_by(|a, b| a.0 == b.0);
    for (bridge, zone) in zones.iter().filter(|(_, zone)| *zone != 0) {
        let _ = writeln!(out, "    iifname \"{bridge}\" ct zone set {zone}");
    }
    out.push_str("  }\n");
    out.push_str(
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n",
    );
    for p in &ports {
        let _ = writeln!(
            out,
            "    meta mark & 0xffff0000 == 0x{:x} jump out-{}",
            u32::from(p.id) << 16,
            p.id
        );
    }
    for p in &ports {
        let _ = writeln!(
            out,
            "    meta mark & 0xffff == 0x{:x} jump in-{}",
            p.id, p.id
        );
    }
    out.push_str("  }\n");
    for p in &ports {
        for (direction, rules, remote_side) in
            [("out", &p.egress, "daddr"), ("in", &p.ingress, "saddr")]
        {
            let _ = writeln!(out, "  chain {direction}-{} {{", p.id);
            out.push_str("    meta nfproto ipv6 return\n");
            out.push_str("    ct state established,related return\n    ct state invalid drop\n");
            if direction == "in" {
                // The network's DHCP server answers (VMs cannot send from port 67).
                out.push_str("    udp sport 67 udp dport 68 return\n");
            } else {
                // A VM may always ask for its address, as in OpenStack.
                out.push_str("    udp sport 68 udp dport 67 return\n");
            }
            for rule in rules.iter() {
                let _ = writeln!(out, "    {}return", matches(rule, remote_side));
            }
            out.push_str("    drop\n  }\n");
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_gets_marks_anti_spoofing_and_its_rules() {
        let port = PortPolicy {
            port: "vnet3".into(),
            bridge: "fb-4096".into(),
            id: 3,
            zone: 4096,
            mac: [2, 0x46, 0x4c, 0, 0, 3],
            addresses: vec![
                ("10.0.0.3".parse().unwrap(), 32),
                ("10.0.0.128".parse().unwrap(), 25),
            ],
            ingress: vec![Rule {
                protocol: Protocol::Tcp,
                ports: Some((22, 22)),
                remote: vec![("192.168.0.0".parse().unwrap(), 16)],
                remote_set: None,
            }],
            egress: vec![
                Rule {
                    protocol: Protocol::Any,
                    ports: None,
                    remote: Vec::new(),
                    remote_set: None,
                },
                Rule {
                    protocol: Protocol::Udp,
                    ports: Some((53, 53)),
                    remote: Vec::new(),
                    remote_set: Some("sg0".into()),
                },
                Rule {
                    protocol: Protocol::Udp,
                    ports: Some((54, 54)),
                    remote: Vec::new(),
                    remote_set: Some("missing".into()),
                },
            ],
        };
        let sets = [AddressSet {
            name: "sg0".into(),
            members: vec![("10.0.0.7".parse().unwrap(), 32)],
        }];
        let rules = firewall_rules(&[port], &sets);
        // A rule naming a set the batch does not define is left out (it would fail the batch).
        assert!(!rules.contains("@missing"), "{rules}");
        for line in [
            "    iifname \"vnet3\" jump from-3",
            "    oifname \"vnet3\" meta mark set meta mark | 0x3",
            "    iifname \"vnet3\" meta mark set meta mark | 0x30000",
            "    ether saddr != 02:46:4c:00:00:03 drop",
            "    arp saddr ip != { 10.0.0.3, 10.0.0.128/25 } drop",
            "    ip saddr != { 10.0.0.3, 10.0.0.128/25 } drop",
            "    iifname \"fb-4096\" ct zone set 4096",
            "    meta mark & 0xffff0000 == 0x30000 jump out-3",
            "    meta mark & 0xffff == 0x3 jump in-3",
            "    ip saddr { 192.168.0.0/16 } tcp dport 22 return",
            "    meta nfproto ipv4 return",
            "    ip daddr @sg0 udp dport 53 return",
            "    elements = { 10.0.0.7 }",
        ] {
            assert!(rules.lines().any(|l| l == line), "{line:?} in:\n{rules}");
        }
    }

    #[test]
    fn a_name_that_could_break_out_of_its_string_is_left_out() {
        let port = PortPolicy {
            port: "x\" accept #".into(),
            bridge: "br0".into(),
            id: 1,
            zone: 1,
            mac: [2, 0, 0, 0, 0, 1],
            addresses: Vec::new(),
            ingress: Vec::new(),
            egress: Vec::new(),
        };
        assert!(!firewall_rules(&[port], &[]).contains("accept #"));
    }
}
