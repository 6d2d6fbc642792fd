//! Network: an L2 segment VMs attach to (project-scoped). `overlay` networks are isolated
//! segments carried over VXLAN between the nodes that run their VMs, with addresses from the
//! control plane's IPAM; `bridged` networks attach NICs to an existing host bridge (the LAN),
//! with IPAM or without (the LAN's own DHCP serves).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::Condition;
use crate::resource::Validate;
use crate::validation::FieldErrors;

/// A Linux interface name (at most 15 bytes).
pub const INTERFACE_NAME_PATTERN: &str = r"^[A-Za-z0-9_.-]{1,15}$";
/// An IPv4 CIDR as the server reads it (prefix /16 to /29; host bits zero is checked too).
pub const CIDR_PATTERN: &str = r"^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}/(1[6-9]|2[0-9])$";
/// An IPv6 /64 prefix as the server reads it: up to four groups, then `::` (so its host bits
/// are zero by construction), or eight groups ending in four zero groups.
pub const CIDR6_PATTERN: &str = r"^(([0-9a-fA-F]{1,4}:){1,4}:|([0-9a-fA-F]{1,4}:){4}0:0:0:0)/64$";
/// An IPv4 address in dotted decimal.
pub const IPV4_PATTERN: &str = r"^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkType {
    /// An isolated segment over VXLAN between the nodes that run its VMs.
    #[default]
    Overlay,
    /// NICs on an existing bridge of each node (a provider network: the LAN).
    Bridged,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// `overlay` (the default) or `bridged`.
    #[serde(default, rename = "type")]
    pub network_type: NetworkType,
    /// The IPv4 addresses of the network, e.g. 10.0.0.0/24 (/16 to /29). Required for overlay
    /// networks; for a bridged network, the range Flotilla gives static addresses from (absent:
    /// no IPAM, the LAN's DHCP serves). The gateway and the DHCP/DNS server addresses are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "CIDR_PATTERN")]
    pub cidr: Option<String>,
    /// The network's IPv6 prefix, optional (a /64, e.g. fd00:10::/64; needs `cidr`): each NIC
    /// also gets the address SLAAC derives from its MAC, in `status.interfaces[].ips`, in
    /// cloud-init's network-config and in DNS, and overlay networks send router advertisements
    /// for it (no default route: routers come later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "CIDR6_PATTERN")]
    pub cidr6: Option<String>,
    /// The gateway address inside `cidr` (default: its first host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "IPV4_PATTERN")]
    pub gateway: Option<String>,
    /// Where addresses are picked from for NICs that ask for none (inclusive ranges inside
    /// `cidr`, e.g. the part of a LAN its own DHCP server leaves alone); default: all of `cidr`.
    /// A NIC's `ip` may still be any free address of `cidr`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<AddressRange>,
    /// The MTU of the VMs' NICs (default: the underlay's less 50 for overlay networks, 1500 for
    /// bridged ones); 576 to 9000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 9000))]
    pub mtu: Option<u32>,
    /// Whether Flotilla's DHCP server answers on the network (only the addresses IPAM gave).
    #[serde(default = "yes")]
    pub dhcp: bool,
    /// DNS for the network's VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<NetworkDns>,
    /// For bridged networks: the bridge on each node to attach NICs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "INTERFACE_NAME_PATTERN")]
    pub bridge: Option<String>,
    /// For bridged networks: the 802.1Q VLAN of the NICs (1 to 4094).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4094))]
    pub vlan: Option<u16>,
}

fn yes() -> bool {
    true
}

/// An inclusive range of IPv4 addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressRange {
    /// The first address.
    #[schemars(regex = "IPV4_PATTERN")]
    pub start: String,
    /// The last address (not below `start`).
    #[schemars(regex = "IPV4_PATTERN")]
    pub end: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkDns {
    /// The domain of the VMs' names: `<vm>.<network>.<project>.<domain>` (default: flotilla.internal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_SUBDOMAIN_PATTERN", length(max = 253))]
    pub domain: Option<String>,
    /// The DNS servers guests are told to use (IPv4 addresses, at most 3): a bridged network's
    /// LAN resolvers. Default: on overlay networks with DHCP, the network's own server (the
    /// DHCP-server address); none otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3), inner(regex = "IPV4_PATTERN"))]
    pub nameservers: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkStatus {
    /// The VXLAN network identifier of an overlay network, unique in the cluster (set by the
    /// server when the network is made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// The nodes the network spans (those its VMs are bound to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Where the network's tunnels end on the nodes it spans (each node's
    /// `status.addresses.tunnel`): the flood list of its VXLAN devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<TunnelEndpoint>,
    /// For networks with a cidr: how many addresses NICs hold, of how many they may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<AddressUsage>,
    /// The network's conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The MTU NICs get on overlay networks without `spec.mtu`: a 1500-byte underlay less VXLAN's
/// 50 bytes of headers.
pub const OVERLAY_MTU: u32 = 1450;
/// The MTU NICs get on bridged networks without `spec.mtu`.
pub const BRIDGED_MTU: u32 = 1500;
/// The DNS domain of networks without `spec.dns.domain`.
pub const DEFAULT_DOMAIN: &str = "flotilla.internal";

impl Network {
    /// The host bridge the network's NICs attach to on a node: its own `fb-<vni>` for an overlay
    /// network (None until it has a VNI), `spec.bridge` for a bridged one.
    pub fn bridge_name(&self) -> Option<String> {
        match self.spec.network_type {
            NetworkType::Overlay => self
                .status
                .as_ref()
                .and_then(|s| s.vni)
                .map(|vni| format!("fb-{vni}")),
            NetworkType::Bridged => self.spec.bridge.clone(),
        }
    }

    /// The MTU of the network's NICs.
    pub fn nic_mtu(&self) -> u32 {
        self.spec.mtu.unwrap_or(match self.spec.network_type {
            NetworkType::Overlay => OVERLAY_MTU,
            NetworkType::Bridged => BRIDGED_MTU,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelEndpoint {
    /// The node.
    pub node: String,
    /// Its tunnel address.
    #[schemars(regex = "IPV4_PATTERN")]
    pub address: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressUsage {
    /// Addresses held by NICs.
    pub used: u32,
    /// Addresses NICs may hold (the cidr less the network, broadcast, gateway and DHCP-server
    /// addresses).
    pub total: u32,
}

/// The addresses NICs hold on a network, as `GET .../networks/<name>/addresses` answers
/// (kind `NetworkAddressList`): what each node's DHCP and DNS server serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkAddressList {
    /// The addresses, in address order.
    pub items: Vec<NetworkAddress>,
}

/// One address a NIC holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkAddress {
    /// The IPv4 address.
    pub address: String,
    /// The VM whose NIC holds it (`Router/<name>` or `FloatingIP/<name>` for theirs).
    pub vm: String,
    /// The VM's uid.
    pub uid: String,
    /// The NIC's MAC address.
    pub mac_address: String,
}

/// The network's subnet as IPAM reads it, when it has a `cidr`.
impl NetworkSpec {
    /// The network's IPv6 prefix, when it has one that reads.
    pub fn prefix6(&self) -> Option<flotilla_ipam::Ipv6Prefix> {
        self.cidr6.as_ref()?.parse().ok()
    }

    pub fn subnet(&self) -> Result<Option<flotilla_ipam::Subnet>, flotilla_ipam::IpamError> {
        let Some(cidr) = &self.cidr else {
            return Ok(None);
        };
        let cidr: flotilla_ipam::Ipv4Cidr = cidr.parse()?;
        let gateway = match &self.gateway {
            None => None,
            Some(g) => Some(
                g.parse()
                    .map_err(|_| flotilla_ipam::IpamError::BadAddress(g.clone()))?,
            ),
        };
        let address = |a: &String| {
            a.parse::<std::net::Ipv4Addr>()
                .map_err(|_| flotilla_ipam::IpamError::BadAddress(a.clone()))
        };
        let pool = self
            .ranges
            .iter()
            .map(|r| Ok((address(&r.start)?, address(&r.end)?)))
            .collect::<Result<Vec<_>, _>>()?;
        flotilla_ipam::Subnet::new(cidr, gateway)?
            .with_pool(pool)
            .map(Some)
    }
}

impl Validate for NetworkSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        match self.network_type {
            NetworkType::Overlay => {
                if self.cidr.is_none() {
                    errs.push(
                        format!("{path}.cidr"),
                        "an overlay network needs a cidr, e.g. 10.0.0.0/24",
                    );
                }
                if self.bridge.is_some() {
                    errs.push(
                        format!("{path}.bridge"),
                        "only bridged networks name a host bridge; overlay networks get their own",
                    );
                }
                if self.vlan.is_some() {
                    errs.push(
                        format!("{path}.vlan"),
                        "only bridged networks have a VLAN; overlay networks are told apart by their VNI",
                    );
                }
            }
            NetworkType::Bridged => match &self.bridge {
                None => errs.push(
                    format!("{path}.bridge"),
                    "a bridged network names the bridge on each node to attach to, e.g. br0",
                ),
                Some(b) if !is_interface_name(b) => errs.push(
                    format!("{path}.bridge"),
                    format!(
                        "{b:?} is not an interface name: 1 to 15 letters, digits, '_', '.' or '-'"
                    ),
                ),
                Some(_) => {}
            },
        }
        if self.gateway.is_some() && self.cidr.is_none() {
            errs.push(
                format!("{path}.gateway"),
                "a gateway needs a cidr to be inside of",
            );
        }
        if let Some(prefix) = &self.cidr6 {
            if self.cidr.is_none() {
                errs.push(
                    format!("{path}.cidr6"),
                    "an IPv6 prefix needs an IPv4 cidr beside it",
                );
            }
            if !is_cidr6(prefix) {
                errs.push(
                    format!("{path}.cidr6"),
                    flotilla_ipam::IpamError::BadPrefix6(prefix.clone()).to_string(),
                );
            }
        }
        if !self.ranges.is_empty() && self.cidr.is_none() {
            errs.push(
                format!("{path}.ranges"),
                "ranges need a cidr to be inside of",
            );
        }
        if let Some(cidr) = &self.cidr {
            match cidr.parse::<flotilla_ipam::Ipv4Cidr>() {
                Err(e) => errs.push(format!("{path}.cidr"), e.to_string()),
                Ok(cidr) => {
                    let without_ranges = NetworkSpec {
                        ranges: Vec::new(),
                        ..self.clone()
                    };
                    match without_ranges.subnet() {
                        Err(e) => errs.push(format!("{path}.gateway"), e.to_string()),
                        Ok(Some(subnet)) => {
                            for (i, range) in self.ranges.iter().enumerate() {
                                let ends = (range.start.parse(), range.end.parse());
                                let fits = match ends {
                                    (Ok(a), Ok(b)) => {
                                        subnet.clone().with_pool(vec![(a, b)]).is_ok()
                                    }
                                    _ => false,
                                };
                                if !fits {
                                    errs.push(
                                        format!("{path}.ranges[{i}]"),
                                        format!(
                                            "{}-{} is not a range inside {cidr}: two addresses of it, start first",
                                            range.start, range.end
                                        ),
                                    );
                                }
                            }
                        }
                        Ok(None) => {}
                    }
                }
            }
        }
        if let Some(mtu) = self.mtu {
            if !(576..=9000).contains(&mtu) {
                errs.push(
                    format!("{path}.mtu"),
                    format!("{mtu} must be between 576 and 9000"),
                );
            }
        }
        if let Some(vlan) = self.vlan {
            if !(1..=4094).contains(&vlan) {
                errs.push(
                    format!("{path}.vlan"),
                    format!("{vlan} must be between 1 and 4094"),
                );
            }
        }
        let nameservers = self.dns.as_ref().map_or(&[][..], |d| &d.nameservers[..]);
        if nameservers.len() > 3 {
            errs.push(
                format!("{path}.dns.nameservers"),
                format!(
                    "{} servers: at most 3 (what resolv.conf uses)",
                    nameservers.len()
                ),
            );
        }
        for (i, server) in nameservers.iter().enumerate() {
            if server.parse::<std::net::Ipv4Addr>().is_err() {
                errs.push(
                    format!("{path}.dns.nameservers[{i}]"),
                    format!("{server:?} is not an IPv4 address"),
                );
            }
        }
        if let Some(domain) = self.dns.as_ref().and_then(|d| d.domain.as_ref()) {
            if !crate::validation::is_dns_subdomain(domain) {
                errs.push(
                    format!("{path}.dns.domain"),
                    format!("{domain:?} is not a DNS domain: lowercase labels separated by dots"),
                );
            }
        }
    }
}

/// Whether `prefix` is a /64 the way [`CIDR6_PATTERN`] writes it (and IPAM reads it).
pub fn is_cidr6(prefix: &str) -> bool {
    static PATTERN: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(CIDR6_PATTERN).expect("a valid pattern"));
    PATTERN.is_match(prefix) && prefix.parse::<flotilla_ipam::Ipv6Prefix>().is_ok()
}

fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Validate for NetworkStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// A network VMs attach to: an overlay segment across nodes or a host bridge.
    Network {
        spec: NetworkSpec,
        status: NetworkStatus,
        plural: "networks",
        singular: "network",
        short_names: ["net"],
        namespaced: true,
        field_selectors: ["spec.type"],
        columns: [
            "TYPE" => "spec.type",
            "CIDR" => "spec.cidr",
            "VNI" => "status.vni",
            "USED" => "status.addresses.used",
            "TOTAL" => "status.addresses.total",
            "NODES" => "status.nodes" (wide),
            "BRIDGE" => "spec.bridge" (wide),
            "MTU" => "spec.mtu" (wide)
        ],
        set_once: ["spec.type", "spec.cidr", "spec.cidr6", "spec.gateway", "spec.bridge"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every prefix the document's pattern admits, the server accepts (and IPAM reads).
        #[test]
        fn a_prefix_drawn_from_the_pattern_is_accepted(
            prefix in CIDR6_PATTERN.trim_matches(['^', '$'])
        ) {
            prop_assert!(is_cidr6(&prefix), "{prefix:?}");
        }
    }

    #[test]
    fn prefixes_the_pattern_leaves_out_are_refused() {
        for bad in [
            "",
            "fd00::1/64",
            "fd00:10::/48",
            "fd00::5:0:0:0:0/64",
            "10.0.0.0/64",
        ] {
            assert!(!is_cidr6(bad), "{bad:?}");
        }
        assert!(is_cidr6("fd00:10::/64") && is_cidr6("fd00:0:0:0:0:0:0:0/64"));
    }
}
