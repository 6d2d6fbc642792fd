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
//!
//! IPv6 gets the same treatment (br_netfilter hands bridged IPv6 over too): a port's IPv6
//! sources are checked on the bridge (its own addresses, its modified-EUI-64 link-local address
//! and `::` for duplicate address detection), and so is the target of its neighbour
//! advertisements; a VM never sends router advertisements, redirects or DHCPv6 answers; the
//! neighbour discovery and multicast listener messages IPv6 cannot work without, and DHCPv6
//! asking, always pass the rules (as OpenStack lets them). A rule without a remote applies to
//! both families, a CIDR to its own, a remote group to its members' addresses of each family
//! (two sets: `<name>` and `<name>_6`); `icmp` means ICMP for IPv4 and ICMPv6 for IPv6.

use std::fmt::Write;
use std::net::{IpAddr, Ipv6Addr};

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
    /// The other end: these networks (address, prefix length; either family); empty:
    /// anywhere (unless `remote_set` names a set).
    pub remote: Vec<(IpAddr, u8)>,
    /// The other end is a named set of the table instead (a security group's members: one
    /// set shared by every rule that names the group, however many ports have them).
    pub remote_set: Option<String>,
}

/// A named set of addresses that rules refer to by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressSet {
    /// Letters, digits and `_` only (checked: others are left out with the rules using them).
    pub name: String,
    /// Networks of either family (the table holds an IPv4 and an IPv6 set of the name).
    pub members: Vec<(IpAddr, u8)>,
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
    /// The addresses it may send from: its own, and networks of its allowed address pairs.
    /// No IPv4 one: it sends no IPv4 (nor ARP); no IPv6 one: no IPv6 (`0.0.0.0/0` and `::/0`
    /// leave a family unchecked). For IPv6 its EUI-64 link-local address and `::` (for
    /// duplicate address detection) are added.
    pub addresses: Vec<(IpAddr, u8)>,
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

/// One item as itself, more as an anonymous set: every anonymous set is a kernel object of its
/// own, and a node's rule set has thousands of them (one item is the common case).
fn one_or_set<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    match items.as_slice() {
        [one] => one.clone(),
        _ => format!("{{ {} }}", items.join(", ")),
    }
}

/// Interface names reach the rules only when they are names (no quote can end the string).
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The matches of one rule (`remote` on the given side): one line per family it applies to.
/// `in_set` says which families a named set has members of (a rule needs no line for a family
/// its set has none of).
fn matches(rule: &Rule, remote_side: &str, in_set: &dyn Fn(&str) -> (bool, bool)) -> Vec<String> {
    let (v4, v6): (Vec<_>, Vec<_>) = rule.remote.iter().partition(|(a, _)| a.is_ipv4());
    // (the family's remote match, its ICMP) for each family the rule covers.
    let mut families: Vec<(String, &str)> = Vec::new();
    if let Some(name) = &rule.remote_set {
        let (has_v4, has_v6) = in_set(name);
        if has_v4 {
            families.push((format!("ip {remote_side} @{name} "), "icmp"));
        }
        if has_v6 {
            families.push((format!("ip6 {remote_side} @{name}_6 "), "ipv6-icmp"));
        }
    } else if rule.remote.is_empty() {
        families.push((String::new(), "{ icmp, ipv6-icmp }"));
    } else {
        if !v4.is_empty() {
            let nets = set(v4.iter().map(|(a, l)| cidr(a, *l)));
            families.push((format!("ip {remote_side} {nets} "), "icmp"));
        }
        if !v6.is_empty() {
            let nets = set(v6.iter().map(|(a, l)| cidr(a, *l)));
            families.push((format!("ip6 {remote_side} {nets} "), "ipv6-icmp"));
        }
    }
    families
        .into_iter()
        .map(|(mut m, icmp)| {
            match rule.protocol {
                Protocol::Any => {}
                Protocol::Icmp => {
                    let _ = write!(m, "meta l4proto {icmp} ");
                }
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
        })
        .collect()
}

/// The modified-EUI-64 link-local address of `mac` (what guests make by default).
pub fn link_local(mac: &[u8; 6]) -> Ipv6Addr {
    let id = [
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ];
    Ipv6Addr::from((0xfe80u128 << 112) | u128::from(u64::from_be_bytes(id)))
}

/// The neighbour discovery and multicast listener messages IPv6 needs: they pass all ports'
/// rules (their sources, and advertisements' targets, are checked on the bridge).
const ICMPV6_ESSENTIAL: &str = "{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, \
     nd-neighbor-advert, mld-listener-query, mld-listener-report, mld-listener-done, \
     mld2-listener-report }";

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

fn cidr(a: &IpAddr, l: u8) -> String {
    if (a.is_ipv4() && l == 32) || (a.is_ipv6() && l == 128) {
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
    // What may come from `::` (duplicate address detection, listener reports): one named set.
    out.push_str(
        "  set from_unspecified {\n    type icmpv6_type\n    elements = { nd-neighbor-solicit, \
         mld-listener-report, mld2-listener-report }\n  }\n",
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
        let (v4, v6): (Vec<_>, Vec<_>) = p.addresses.iter().partition(|(a, _)| a.is_ipv4());
        let own = one_or_set(v4.iter().map(|(a, l)| cidr(a, *l)));
        let _ = write!(
            out,
            "  chain from-{id} {{\n    ether saddr != {mac} drop\n    arp saddr ether != {mac} drop\n",
            id = p.id,
            mac = mac(&p.mac)
        );
        if v4.is_empty() {
            out.push_str("    meta protocol arp drop\n");
        } else {
            let _ = writeln!(out, "    arp saddr ip != {own} drop");
        }
        out.push_str("    ip saddr 0.0.0.0 udp sport 68 udp dport 67 return\n");
        out.push_str("    udp sport 67 drop\n");
        if v4.is_empty() {
            out.push_str("    meta protocol ip drop\n");
        } else {
            let _ = writeln!(out, "    ip saddr != {own} drop");
        }
        // IPv6: no router advertisements, redirects or DHCPv6 answers from a VM.
        out.push_str("    icmpv6 type nd-router-advert drop\n    icmpv6 type nd-redirect drop\n");
        out.push_str("    udp sport 547 drop\n");
        if v6.is_empty() {
            out.push_str("    meta protocol ip6 drop\n");
        } else if v6.iter().all(|(_, l)| *l != 0) {
            let link_local = IpAddr::V6(link_local(&p.mac));
            let mut own6: Vec<(IpAddr, u8)> = v6.iter().map(|(a, l)| (*a, *l)).collect();
            own6.push((link_local, 128));
            own6.sort();
            own6.dedup();
            let own6 = one_or_set(own6.iter().map(|(a, l)| cidr(a, *l)));
            // Duplicate address detection and listener reports come from `::`.
            out.push_str("    ip6 saddr :: icmpv6 type @from_unspecified return\n");
            let _ = writeln!(out, "    ip6 saddr != {own6} drop");
            // A neighbour advertisement's target must be one of its addresses (when its pairs
            // are whole networks they cannot be listed as targets: not checked then).
            if v6.iter().all(|(_, l)| *l == 128) {
                let mut targets: Vec<u128> = std::iter::once(link_local)
                    .chain(v6.iter().map(|(a, _)| *a))
                    .filter_map(|a| match a {
                        IpAddr::V6(a) => Some(u128::from(a)),
                        IpAddr::V4(_) => None,
                    })
                    .collect();
                targets.sort();
                targets.dedup();
                let targets = targets.iter().map(|t| format!("0x{t:032x}"));
                let _ = writeln!(
                    out,
                    "    icmpv6 type nd-neighbor-advert @th,64,128 != {} drop",
                    one_or_set(targets)
                );
            }
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");

    let in_set = |name: &str| {
        let members = sets
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.members.as_slice())
            .unwrap_or_default();
        (
            members.iter().any(|(a, _)| a.is_ipv4()),
            members.iter().any(|(a, _)| a.is_ipv6()),
        )
    };
    // The inet table: state per bridge, and each port's rules.
    out.push_str("table inet flotilla {}\ndelete table inet flotilla\ntable inet flotilla {\n");
    for s in &sets {
        for (suffix, family, v6) in [("", "ipv4_addr", false), ("_6", "ipv6_addr", true)] {
            let _ = write!(
                out,
                "  set {}{suffix} {{\n    type {family}\n    flags interval\n",
                s.name
            );
            let members: Vec<String> = s
                .members
                .iter()
                .filter(|(a, _)| a.is_ipv6() == v6)
                .map(|(a, l)| cidr(a, *l))
                .collect();
            if !members.is_empty() {
                let _ = writeln!(out, "    auto-merge\n    elements = {}", set(members));
            }
            out.push_str("  }\n");
            // (Sets of a family with no members stay, empty: cheap, and nothing names them.)
        }
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
    // Once for every port (their sources and targets were checked on the bridge): what IPv6
    // needs, a VM asking for its addresses (as in OpenStack) and the DHCP servers answering
    // (VMs cannot send from ports 67 and 547).
    let _ = writeln!(out, "    icmpv6 type {ICMPV6_ESSENTIAL} accept");
    out.push_str("    udp sport 68 udp dport 67 accept\n    udp sport 67 udp dport 68 accept\n");
    out.push_str(
        "    udp sport 546 udp dport 547 accept\n    udp sport 547 udp dport 546 accept\n",
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
            out.push_str("    ct state established,related return\n    ct state invalid drop\n");
            for rule in rules.iter() {
                for m in matches(rule, remote_side, &in_set) {
                    let _ = writeln!(out, "    {m}return");
                }
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
                ("fd00:10::46:4cff:fe00:3".parse().unwrap(), 128),
            ],
            ingress: vec![Rule {
                protocol: Protocol::Tcp,
                ports: Some((22, 22)),
                remote: vec![
                    ("192.168.0.0".parse().unwrap(), 16),
                    ("fd00:99::".parse().unwrap(), 64),
                ],
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
            members: vec![
                ("10.0.0.7".parse().unwrap(), 32),
                ("fd00:10::7".parse().unwrap(), 128),
            ],
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
            "    ip6 saddr :: icmpv6 type @from_unspecified return",
            "    ip saddr != { 10.0.0.3, 10.0.0.128/25 } drop",
            "    iifname \"fb-4096\" ct zone set 4096",
            "    meta mark & 0xffff0000 == 0x30000 jump out-3",
            "    meta mark & 0xffff == 0x3 jump in-3",
            "    ip saddr { 192.168.0.0/16 } tcp dport 22 return",
            "    ip6 saddr { fd00:99::/64 } tcp dport 22 return",
            "    return",
            "    ip daddr @sg0 udp dport 53 return",
            "    ip6 daddr @sg0_6 udp dport 53 return",
            "    elements = { 10.0.0.7 }",
            "    elements = { fd00:10::7 }",
            // IPv6 anti-spoofing: its address and EUI-64 link-local address, `::` for DAD.
            "    icmpv6 type nd-router-advert drop",
            "    icmpv6 type nd-redirect drop",
            "    udp sport 547 drop",
            "    ip6 saddr != { fd00:10::46:4cff:fe00:3, fe80::46:4cff:fe00:3 } drop",
            "    icmpv6 type nd-neighbor-advert @th,64,128 != { 0xfd0000100000000000464cfffe000003, 0xfe800000000000000046\
             4cfffe000003 } drop",
            "    udp sport 546 udp dport 547 accept",
            "    udp sport 547 udp dport 546 accept",
            "    udp sport 68 udp dport 67 accept",
        ] {
            assert!(rules.lines().any(|l| l == line), "{line:?} in:\n{rules}");
        }
    }

    #[test]
    fn a_family_without_addresses_is_dropped_and_one_without_checks_is_unchecked() {
        let port = |addresses: &[(&str, u8)]| PortPolicy {
            port: "vnet1".into(),
            bridge: "br0".into(),
            id: 1,
            zone: 1,
            mac: [2, 0, 0, 0, 0, 1],
            addresses: addresses
                .iter()
                .map(|(a, l)| (a.parse().unwrap(), *l))
                .collect(),
            ingress: Vec::new(),
            egress: Vec::new(),
        };
        let v4_only = firewall_rules(&[port(&[("10.0.0.1", 32)])], &[]);
        assert!(
            v4_only.contains("    meta protocol ip6 drop\n"),
            "{v4_only}"
        );
        let unchecked = firewall_rules(&[port(&[("10.0.0.1", 32), ("::", 0)])], &[]);
        assert!(!unchecked.contains("ip6 saddr !="), "{unchecked}");
        assert!(!unchecked.contains("meta protocol ip6 drop"), "{unchecked}");
        // Still no router advertisements from it.
        assert!(unchecked.contains("icmpv6 type nd-router-advert drop"));
        // One address: no anonymous set for it.
        assert!(
            v4_only.contains("    ip saddr != 10.0.0.1 drop\n"),
            "{v4_only}"
        );
        // A pair that is a whole network: sources checked, advertisement targets cannot be.
        let pair = firewall_rules(&[port(&[("fd00::1", 128), ("fd00:1::", 64)])], &[]);
        assert!(
            pair.contains("ip6 saddr != { fd00::1, fd00:1::/64, fe80::ff:fe00:1 } drop"),
            "{pair}"
        );
        assert!(!pair.contains("@th,64,128"), "{pair}");
        assert_eq!(
            link_local(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]).to_string(),
            "fe80::5054:ff:fe12:3456"
        );
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
