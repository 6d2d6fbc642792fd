//! The node's security groups and anti-spoofing: one nftables rule set (Flotilla's own tables,
//! `flotilla-dataplane::firewall`) for the NICs of every VM bound to this node, rendered from
//! what the agent knows — its VMs (their NICs, groups, addresses and allowed address pairs),
//! the networks (their bridges) and the security groups (their rules, and the members a rule
//! naming a group follows) — and replaced whole whenever any of it changes, in one batch.
//!
//! Each NIC's tap is named by the agent (`ft` and a hash of the VM's uid and the NIC's position),
//! so its rules exist before QEMU opens it: a VM's domain starts only after a rule set that
//! includes it has been applied ([`Firewall::sync`]). Nothing is applied until the VMs,
//! networks and groups have all been listed once, so an agent that restarts never replaces the
//! rules its running VMs have with a partial set.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use flotilla_dataplane::{AddressSet, PortPolicy, Protocol, Rule};
use flotilla_types::kinds::security_group::{parse_ip_cidr, parse_ports};
use flotilla_types::kinds::{Direction, RuleProtocol, SecurityGroup};
use flotilla_types::{Network, NetworkType, VirtualMachine};
use tokio::sync::{watch, Notify};

use crate::error::AgentError;

/// The name of the tap of NIC `index` of the VM with `uid`: stable, at most 15 bytes, and not
/// one of libvirt's own (`vnet*`), so rules can name it before the domain starts.
pub fn tap_name(uid: &str, index: usize) -> String {
    // FNV-1a: stable across builds (unlike std's hasher), 48 of its bits kept.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{uid}/{index}").bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("ft{:012x}", hash & 0xffff_ffff_ffff)
}

/// The conntrack zone of a network's bridge: its VNI for overlay networks (VNIs are unique and
/// start at 4096; above 65,535 they wrap into 4096..65,535), and for bridged networks a hash of
/// the bridge's name below 4096, so that a zone never changes while connections last.
pub fn zone(network: &Network) -> u16 {
    match (
        network.spec.network_type,
        network.status.as_ref().and_then(|s| s.vni),
    ) {
        (NetworkType::Overlay, Some(vni)) => {
            if vni <= 65_535 {
                vni as u16
            } else {
                (4096 + (vni - 4096) % (65_536 - 4096)) as u16
            }
        }
        _ => {
            let name = network.bridge_name().unwrap_or_default();
            let sum = name
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            (1 + sum % 4095) as u16
        }
    }
}

/// What the rule set is made from.
#[derive(Default)]
pub struct Known {
    /// The VMs bound to this node, by uid.
    pub vms: BTreeMap<String, VirtualMachine>,
    /// Networks and groups by (project, name).
    pub networks: BTreeMap<(String, String), Network>,
    pub groups: BTreeMap<(String, String), SecurityGroup>,
}

/// The named sets rules refer to: one per security group named as a remote, holding its
/// members' addresses (`sg0`, `sg1`, ... in order of first use).
#[derive(Default)]
struct Sets {
    names: BTreeMap<(String, String), String>,
    sets: Vec<AddressSet>,
}

impl Sets {
    /// The set of `group`'s members, or None when it has none (or does not exist).
    fn of(&mut self, known: &Known, project: &str, group: &str) -> Option<String> {
        let key = (project.to_string(), group.to_string());
        if let Some(name) = self.names.get(&key) {
            return Some(name.clone());
        }
        let members = known
            .groups
            .get(&key)?
            .status
            .as_ref()
            .map(|s| s.members.as_slice())
            .unwrap_or_default();
        let mut nets: Vec<(IpAddr, u8)> = members
            .iter()
            .flat_map(|m| m.addresses.iter().filter_map(|a| parse_ip_cidr(a)))
            .collect();
        nets.sort();
        nets.dedup();
        if nets.is_empty() {
            return None;
        }
        let name = format!("sg{}", self.sets.len());
        self.sets.push(AddressSet {
            name: name.clone(),
            members: nets,
        });
        self.names.insert(key, name.clone());
        Some(name)
    }
}

/// Every NIC's policy, in a stable order (ids by position), and the sets their rules name.
pub fn policies(known: &Known) -> (Vec<PortPolicy>, Vec<AddressSet>) {
    let mut sets = Sets::default();
    let mut out = Vec::new();
    for (uid, vm) in &known.vms {
        let project = vm.metadata.namespace.clone().unwrap_or_default();
        let interfaces = vm
            .status
            .as_ref()
            .map(|s| s.interfaces.as_slice())
            .unwrap_or_default();
        for (i, nic) in vm.spec.networks.iter().enumerate() {
            let name = nic.nic_name(i);
            let Some(interface) = interfaces.iter().find(|n| n.name == name) else {
                continue;
            };
            let Some(network) = known.networks.get(&(project.clone(), nic.network.clone())) else {
                continue;
            };
            let (Some(bridge), Some(mac)) =
                (network.bridge_name(), parse_mac(&interface.mac_address))
            else {
                continue;
            };
            let own: Vec<IpAddr> = interface
                .ips
                .iter()
                .filter_map(|ip| ip.split('/').next()?.parse().ok())
                .collect();
            let mut addresses: Vec<(IpAddr, u8)> = own
                .iter()
                .map(|ip| (*ip, if ip.is_ipv4() { 32 } else { 128 }))
                .collect();
            if !own.iter().any(IpAddr::is_ipv4) {
                // Flotilla did not give this NIC its address (a LAN's own DHCP serves it), so
                // it cannot know which sources are the guest's: only its MAC is checked.
                addresses.push((Ipv4Addr::UNSPECIFIED.into(), 0));
            }
            if !own.iter().any(IpAddr::is_ipv6) {
                if network.spec.network_type == NetworkType::Overlay {
                    // No prefix, no advertisements on it: link-local addresses only.
                    addresses.push((flotilla_dataplane::link_local(&mac).into(), 128));
                } else {
                    // A LAN may advertise prefixes of its own: IPv6 sources go unchecked.
                    addresses.push((Ipv6Addr::UNSPECIFIED.into(), 0));
                }
            }
            addresses.extend(
                nic.allowed_address_pairs
                    .iter()
                    .filter_map(|p| parse_ip_cidr(p)),
            );
            let (mut ingress, mut egress) = (Vec::new(), Vec::new());
            for group in nic.groups() {
                let Some(group) = known.groups.get(&(project.clone(), group)) else {
                    continue;
                };
                for rule in &group.spec.rules {
                    if let Some(rendered) = render_rule(&mut sets, known, &project, rule) {
                        match rule.direction {
                            Direction::Ingress => ingress.push(rendered),
                            Direction::Egress => egress.push(rendered),
                        }
                    }
                }
            }
            dedup(&mut ingress);
            dedup(&mut egress);
            out.push(PortPolicy {
                port: tap_name(uid, i),
                bridge,
                id: 0,
                zone: zone(network),
                mac,
                addresses,
                ingress,
                egress,
            });
        }
    }
    out.truncate(u16::MAX as usize);
    for (i, p) in out.iter_mut().enumerate() {
        p.id = (i + 1) as u16;
    }
    (out, sets.sets)
}

/// A rule as the dataplane takes it, or None when it can match nothing (it names a group with
/// no members, or one the project lacks).
fn render_rule(
    sets: &mut Sets,
    known: &Known,
    project: &str,
    rule: &flotilla_types::kinds::SecurityGroupRule,
) -> Option<Rule> {
    let protocol = match rule.protocol {
        RuleProtocol::Any => Protocol::Any,
        RuleProtocol::Tcp => Protocol::Tcp,
        RuleProtocol::Udp => Protocol::Udp,
        RuleProtocol::Icmp => Protocol::Icmp,
    };
    let ports = rule.ports.as_deref().and_then(parse_ports);
    let (remote, remote_set) = match &rule.remote {
        None => (Vec::new(), None),
        Some(r) => match (&r.cidr, &r.security_group) {
            (Some(cidr), _) => (vec![parse_ip_cidr(cidr)?], None),
            (None, Some(group)) => (Vec::new(), Some(sets.of(known, project, group)?)),
            (None, None) => return None,
        },
    };
    Some(Rule {
        protocol,
        ports,
        remote,
        remote_set,
    })
}

fn dedup(rules: &mut Vec<Rule>) {
    let mut seen = BTreeSet::new();
    rules.retain(|r| seen.insert(format!("{r:?}")));
}

/// `02:46:4c:00:00:01` as bytes.
pub(crate) fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

#[derive(Default)]
struct State {
    known: Known,
    /// Which of VMs, networks and groups have been listed since the agent started.
    listed: [bool; 3],
    /// Bumped by every change: an apply takes everything up to the generation it read.
    generation: u64,
}

/// The node's rule set, kept applied.
pub struct Firewall {
    state: Mutex<State>,
    wake: Notify,
    applied: watch::Sender<u64>,
    namespace: std::path::PathBuf,
}

pub enum Listed {
    Vms,
    Networks,
    Groups,
}

impl Firewall {
    /// A firewall for the network namespace at `namespace` (`/proc/self/ns/net`: the agent's,
    /// where libvirt plugs the taps).
    pub fn new(namespace: &Path) -> Self {
        Firewall {
            state: Mutex::default(),
            wake: Notify::new(),
            applied: watch::channel(0).0,
            namespace: namespace.to_path_buf(),
        }
    }

    fn change(&self, f: impl FnOnce(&mut State)) -> u64 {
        let mut state = self.state.lock().expect("firewall lock");
        f(&mut state);
        state.generation += 1;
        self.wake.notify_one();
        state.generation
    }

    pub fn set_vm(&self, vm: VirtualMachine) {
        let Some(uid) = vm.metadata.uid.clone() else {
            return;
        };
        let unchanged = self
            .state
            .lock()
            .expect("firewall lock")
            .known
            .vms
            .get(&uid)
            .is_some_and(|v| {
                v.spec.networks == vm.spec.networks
                    && v.status.as_ref().map(|s| &s.interfaces)
                        == vm.status.as_ref().map(|s| &s.interfaces)
            });
        if !unchanged {
            self.change(|s| {
                s.known.vms.insert(uid, vm);
            });
        }
    }

    pub fn remove_vm(&self, uid: &str) {
        if self
            .state
            .lock()
            .expect("firewall lock")
            .known
            .vms
            .contains_key(uid)
        {
            self.change(|s| {
                s.known.vms.remove(uid);
            });
        }
    }

    /// Keeps only the VMs with these uids (after a relist).
    pub fn retain_vms(&self, uids: &BTreeSet<String>) {
        self.change(|s| s.known.vms.retain(|uid, _| uids.contains(uid)));
    }

    pub fn set_network(&self, network: &Network) {
        let key = (
            network.metadata.namespace.clone().unwrap_or_default(),
            network.metadata.name.clone(),
        );
        let same = self
            .state
            .lock()
            .expect("firewall lock")
            .known
            .networks
            .get(&key)
            .is_some_and(|n| n.bridge_name() == network.bridge_name() && zone(n) == zone(network));
        if !same {
            self.change(|s| {
                s.known.networks.insert(key, network.clone());
            });
        }
    }

    pub fn set_group(&self, group: SecurityGroup) {
        let key = (
            group.metadata.namespace.clone().unwrap_or_default(),
            group.metadata.name.clone(),
        );
        self.change(|s| {
            s.known.groups.insert(key, group);
        });
    }

    pub fn remove_group(&self, project: &str, name: &str) {
        self.change(|s| {
            s.known
                .groups
                .remove(&(project.to_string(), name.to_string()));
        });
    }

    /// Keeps only these groups (after a relist).
    pub fn retain_groups(&self, keys: &BTreeSet<(String, String)>) {
        self.change(|s| s.known.groups.retain(|k, _| keys.contains(k)));
    }

    pub fn listed(&self, what: Listed) {
        self.change(|s| s.listed[what as usize] = true);
    }

    /// Waits until a rule set with everything known now is applied (a VM's domain starts after
    /// this), at most `timeout`.
    pub async fn sync(&self, timeout: Duration) -> Result<(), AgentError> {
        let wanted = self.change(|_| {});
        let mut applied = self.applied.subscribe();
        let waited = tokio::time::timeout(timeout, applied.wait_for(|g| *g >= wanted)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(AgentError::Config(format!(
                "the node's security group rules were not applied within {} s (see the agent's log and the node's events)",
                timeout.as_secs()
            ))),
        }
    }

    /// Applies the rule set whenever something changed, and every `resync` (repairing a table
    /// that someone else changed). `failed` is told why an apply failed (at most once a minute
    /// for the same error).
    pub async fn run(&self, resync: Duration, failed: impl Fn(String)) {
        let mut tick = tokio::time::interval(resync);
        let mut last_error: Option<(String, std::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            // Let a burst of changes (a relist, many VMs at once) settle into one apply.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let (ports, generation) = {
                let state = self.state.lock().expect("firewall lock");
                if !state.listed.iter().all(|l| *l) {
                    continue;
                }
                (policies(&state.known), state.generation)
            };
            let (ports, sets) = ports;
            let started = std::time::Instant::now();
            match flotilla_dataplane::apply_firewall(&self.namespace, &ports, &sets).await {
                Ok(()) => {
                    tracing::debug!(
                        ports = ports.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "security group rules applied"
                    );
                    self.applied.send_replace(generation);
                    last_error = None;
                }
                Err(e) => {
                    let message = e.to_string();
                    let repeat = last_error.as_ref().is_some_and(|(m, at)| {
                        *m == message && at.elapsed() < Duration::from_secs(60)
                    });
                    if !repeat {
                        tracing::warn!(error = %message, "cannot apply the security group rules; retrying");
                        failed(message.clone());
                        last_error = Some((message, std::time::Instant::now()));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    self.wake.notify_one();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn known() -> Known {
        let vm: VirtualMachine = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "p", "uid": "u-1"},
            "spec": {"resources": {"cpus": 1, "memory": "64Mi"}, "networks": [
                {"network": "net"},
                {"network": "net", "securityGroups": ["ssh", "gone"], "allowedAddressPairs": ["10.0.0.128/25"]},
            ]},
            "status": {"interfaces": [
                {"name": "nic0", "network": "net", "macAddress": "02:46:4c:00:00:01", "ips": ["10.0.0.2/24", "fd00::1/64"]},
                {"name": "nic1", "network": "net", "macAddress": "02:46:4c:00:00:02", "ips": ["10.0.0.3/24"]},
            ]}
        }))
        .unwrap();
        let network: Network = serde_json::from_value(json!({
            "metadata": {"name": "net", "namespace": "p"},
            "spec": {"cidr": "10.0.0.0/24"}, "status": {"vni": 4100}
        }))
        .unwrap();
        let group = |name: &str, spec: serde_json::Value, members: serde_json::Value| {
            serde_json::from_value::<SecurityGroup>(json!({
                "metadata": {"name": name, "namespace": "p"}, "spec": spec,
                "status": {"members": members, "memberCount": 0}
            }))
            .unwrap()
        };
        let mut k = Known::default();
        k.vms.insert("u-1".into(), vm);
        k.networks.insert(("p".into(), "net".into()), network);
        k.groups.insert(
            ("p".into(), "default".into()),
            group(
                "default",
                serde_json::to_value(flotilla_types::SecurityGroupSpec::default_group()).unwrap(),
                json!([{"vm": "web", "nic": "nic0", "addresses": ["10.0.0.2", "fd00::1"]},
                       {"vm": "db", "nic": "nic0", "addresses": ["10.0.0.9"]}]),
            ),
        );
        k.groups.insert(
            ("p".into(), "ssh".into()),
            group(
                "ssh",
                json!({"rules": [
                    {"protocol": "tcp", "ports": "22", "remote": {"cidr": "192.0.2.0/24"}},
                    {"protocol": "tcp", "ports": "22", "remote": {"cidr": "192.0.2.0/24"}},
                    {"protocol": "udp", "remote": {"securityGroup": "empty"}},
                ]}),
                json!([]),
            ),
        );
        k.groups.insert(
            ("p".into(), "empty".into()),
            group("empty", json!({}), json!([])),
        );
        k
    }

    #[test]
    fn each_nic_gets_its_groups_rules_addresses_and_a_stable_tap() {
        let (ports, sets) = policies(&known());
        assert_eq!(ports.len(), 2);
        let (a, b) = (&ports[0], &ports[1]);
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(a.port, tap_name("u-1", 0));
        assert_ne!(a.port, b.port);
        assert!(a.port.len() <= 15 && a.port.starts_with("ft"));
        assert_eq!((a.bridge.as_str(), a.zone), ("fb-4100", 4100));
        assert_eq!(a.mac, [2, 0x46, 0x4c, 0, 0, 1]);
        // Its addresses as /32s and /128s; the pairs as networks; a NIC without an IPv6
        // address on an overlay network may send from its link-local address only.
        assert_eq!(
            a.addresses,
            vec![
                ("10.0.0.2".parse().unwrap(), 32),
                ("fd00::1".parse().unwrap(), 128)
            ]
        );
        assert_eq!(
            b.addresses,
            vec![
                ("10.0.0.3".parse().unwrap(), 32),
                ("fe80::46:4cff:fe00:2".parse().unwrap(), 128),
                ("10.0.0.128".parse().unwrap(), 25)
            ]
        );
        // default: all egress; ingress from the group's members, a set of their addresses.
        assert_eq!(
            a.egress,
            vec![Rule {
                protocol: Protocol::Any,
                ports: None,
                remote: vec![],
                remote_set: None
            }]
        );
        assert_eq!(
            a.ingress,
            vec![Rule {
                protocol: Protocol::Any,
                ports: None,
                remote: vec![],
                remote_set: Some("sg0".into()),
            }]
        );
        assert_eq!(
            sets,
            vec![AddressSet {
                name: "sg0".into(),
                members: vec![
                    ("10.0.0.2".parse().unwrap(), 32),
                    ("10.0.0.9".parse().unwrap(), 32),
                    ("fd00::1".parse().unwrap(), 128)
                ],
            }]
        );
        // ssh: one rule (the duplicate folded); a group with no members and a missing group
        // add nothing (never "anywhere"); no egress at all.
        assert_eq!(
            b.ingress,
            vec![Rule {
                protocol: Protocol::Tcp,
                ports: Some((22, 22)),
                remote: vec![("192.0.2.0".parse().unwrap(), 24)],
                remote_set: None,
            }]
        );
        assert!(b.egress.is_empty());
    }

    #[test]
    fn a_nic_without_an_address_from_ipam_is_checked_by_its_mac_only() {
        let mut k = known();
        for vm in k.vms.values_mut() {
            for i in &mut vm.status.as_mut().unwrap().interfaces {
                i.ips.clear();
            }
        }
        let (ports, _) = policies(&k);
        assert_eq!(
            ports[0].addresses,
            vec![
                (Ipv4Addr::UNSPECIFIED.into(), 0),
                ("fe80::46:4cff:fe00:1".parse().unwrap(), 128)
            ]
        );
        assert_eq!(ports[0].mac, [2, 0x46, 0x4c, 0, 0, 1]);
        // On a LAN, which may advertise prefixes of its own, IPv6 sources are not checked.
        for network in k.networks.values_mut() {
            network.spec.network_type = NetworkType::Bridged;
            network.spec.bridge = Some("br0".into());
        }
        let (ports, _) = policies(&k);
        assert_eq!(
            ports[0].addresses,
            vec![
                (Ipv4Addr::UNSPECIFIED.into(), 0),
                (Ipv6Addr::UNSPECIFIED.into(), 0)
            ]
        );
    }

    #[test]
    fn a_nic_whose_network_is_unknown_is_left_out_until_it_is_known() {
        let mut k = known();
        k.networks.clear();
        assert!(policies(&k).0.is_empty());
    }

    #[test]
    fn zones_are_stable_and_in_range() {
        let net = |vni: u32| -> Network {
            serde_json::from_value(json!({"metadata": {"name": "n"}, "spec": {"cidr": "10.0.0.0/24"}, "status": {"vni": vni}})).unwrap()
        };
        assert_eq!(zone(&net(4096)), 4096);
        assert_eq!(zone(&net(65_535)), 65_535);
        assert_eq!(zone(&net(65_536)), 4096);
        let bridged: Network = serde_json::from_value(
            json!({"metadata": {"name": "n"}, "spec": {"type": "bridged", "bridge": "br0"}}),
        )
        .unwrap();
        let z = zone(&bridged);
        assert!((1..4096).contains(&z) && z == zone(&bridged));
    }
}
