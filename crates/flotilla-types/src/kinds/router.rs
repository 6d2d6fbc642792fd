//! Router: connects a project's overlay networks to each other and, through SNAT, to an external
//! (bridged) network, as Neutron's L3 routers. It holds each network's gateway address, runs on
//! one node (placed by the control plane, moved when that node fails) in a network namespace of
//! its own, and carries the floating IPs of the VMs behind it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::security_group::parse_cidr;
use crate::kinds::vm::InterfaceStatus;
use crate::meta::Condition;
use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

/// The router's way out: a bridged external network (`network`, with an address of its own and
/// floating IPs), or the node's own uplink (`uplink: true`, with SNAT to the node's address).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterExternal {
    /// A bridged Network of the project with a cidr (the LAN or provider network): the router
    /// takes an address of it and sends its networks' traffic out through it with SNAT.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub network: String,
    /// A fixed address on it; absent: IPAM picks one from the network's ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::kinds::network::IPV4_PATTERN")]
    pub ip: Option<String>,
    /// Instead of a network: out through the node's own uplink (its default route), translated
    /// twice — to a link address between the router and the node, then to the node's address
    /// (the node's IPv4 forwarding is turned on). For homelabs and nodes without a provider
    /// network; no floating IPs (the router has no public address of its own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uplink: bool,
}

/// A static route: traffic to `destination` goes to `via` (on one of the router's networks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticRoute {
    /// An IPv4 network, e.g. 192.168.50.0/24.
    #[schemars(regex = "crate::kinds::security_group::IPV4_CIDR_PATTERN")]
    pub destination: String,
    /// The next hop's address.
    #[schemars(regex = "crate::kinds::network::IPV4_PATTERN")]
    pub via: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterSpec {
    /// Where the networks' traffic leaves (with SNAT to the router's address); absent: the
    /// router only routes between its networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<RouterExternal>,
    /// Overlay networks of the project the router connects (at most 32); it takes each one's
    /// gateway address, so a network has at most one router.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(regex = "crate::validation::DNS_LABEL_PATTERN")
    )]
    pub networks: Vec<String>,
    /// Static routes (at most 64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub routes: Vec<StaticRoute>,
    /// Labels a node must have to run the router (e.g. network nodes with the external LAN).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::validation::labels_schema")]
    pub node_selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterStatus {
    /// The node that runs the router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Its address on the external network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_address: Option<String>,
    /// Its ports, as IPAM gave them: `external`, and one per network (holding its gateway).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
    /// Floating IPs the router carries: public address -> the VM's address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub floating_ips: Vec<FloatingMapping>,
    /// `Placed` (on a Ready node) and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One floating IP a router carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FloatingMapping {
    /// The public address (on the external network).
    pub address: String,
    /// The VM's address behind it.
    pub fixed_address: String,
}

impl Validate for RouterSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if let Some(external) = &self.external {
            if external.uplink {
                if !external.network.is_empty() || external.ip.is_some() {
                    errs.push(
                        format!("{path}.external.uplink"),
                        "a router out through the node's uplink has no external network or address: leave out network and ip",
                    );
                }
            } else if external.network.is_empty() {
                errs.push(
                    format!("{path}.external.network"),
                    "name a bridged network, or set uplink: true to leave through the node's own uplink",
                );
            } else {
                validation::dns_label(errs, &format!("{path}.external.network"), &external.network);
            }
            if let Some(ip) = &external.ip {
                if ip.parse::<std::net::Ipv4Addr>().is_err() {
                    errs.push(
                        format!("{path}.external.ip"),
                        format!("{ip:?} is not an IPv4 address"),
                    );
                }
            }
        }
        if self.networks.len() > 32 {
            errs.push(
                format!("{path}.networks"),
                format!("{} networks: at most 32", self.networks.len()),
            );
        }
        for (i, network) in self.networks.iter().enumerate() {
            validation::dns_label(errs, &format!("{path}.networks[{i}]"), network);
            if self.networks[..i].contains(network) {
                errs.push(
                    format!("{path}.networks[{i}]"),
                    format!("{network:?} is named twice"),
                );
            }
            if self
                .external
                .as_ref()
                .is_some_and(|e| !e.uplink && &e.network == network)
            {
                errs.push(
                    format!("{path}.networks[{i}]"),
                    format!("{network:?} is the external network"),
                );
            }
        }
        if self.routes.len() > 64 {
            errs.push(
                format!("{path}.routes"),
                format!("{} routes: at most 64", self.routes.len()),
            );
        }
        for (i, route) in self.routes.iter().enumerate() {
            if parse_cidr(&route.destination).is_some_and(|(_, len)| len == 0) {
                errs.push(
                    format!("{path}.routes[{i}].destination"),
                    "the default route goes to the external network's gateway; name a narrower destination",
                );
            } else if parse_cidr(&route.destination).is_none() {
                errs.push(
                    format!("{path}.routes[{i}].destination"),
                    format!(
                        "{:?} is not an IPv4 network with its host bits zero, e.g. 192.168.50.0/24",
                        route.destination
                    ),
                );
            }
            if route.via.parse::<std::net::Ipv4Addr>().is_err() {
                errs.push(
                    format!("{path}.routes[{i}].via"),
                    format!("{:?} is not an IPv4 address", route.via),
                );
            }
        }
        validation::labels(errs, &format!("{path}.nodeSelector"), &self.node_selector);
    }
}

impl Validate for RouterStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// A router between a project's overlay networks and an external network (SNAT, floating IPs).
    Router {
        spec: RouterSpec, spec_default: true,
        status: RouterStatus,
        plural: "routers",
        singular: "router",
        short_names: ["rt"],
        namespaced: true,
        field_selectors: ["status.nodeName"],
        columns: [
            "NODE" => "status.nodeName",
            "EXTERNAL-IP" => "status.externalAddress",
            "NETWORKS" => "spec.networks" (wide)
        ],
        set_once: ["spec.external", "spec.networks"],
    }
}
