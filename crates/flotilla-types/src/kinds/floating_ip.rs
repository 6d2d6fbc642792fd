//! FloatingIP: an address of an external (bridged) network, bound to a VM's NIC behind a
//! Router: traffic to it is forwarded to the VM (DNAT), and the VM's own traffic leaves from it
//! (SNAT). Rebinding it to another VM takes effect without restarting anything.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::vm::InterfaceStatus;
use crate::meta::Condition;
use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FloatingIPSpec {
    /// The external network the address is taken from: a bridged Network of the project with
    /// a cidr (a router's external network).
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub network: String,
    /// A fixed address; absent: IPAM picks one from the network's ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::kinds::network::IPV4_PATTERN")]
    pub address: Option<String>,
    /// The VM it forwards to (absent: the address is held, unbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub vm: Option<String>,
    /// The VM's NIC (default: its first NIC on a network with a router to this network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub nic: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FloatingIPStatus {
    /// The address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The port IPAM gave it on the external network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
    /// The bound NIC's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_address: Option<String>,
    /// The router that carries it (the one on the NIC's network with this external network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// `Bound`: forwarding to the VM, or why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl Validate for FloatingIPSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        validation::dns_label(errs, &format!("{path}.network"), &self.network);
        if let Some(address) = &self.address {
            if address.parse::<std::net::Ipv4Addr>().is_err() {
                errs.push(
                    format!("{path}.address"),
                    format!("{address:?} is not an IPv4 address"),
                );
            }
        }
        if let Some(vm) = &self.vm {
            validation::dns_label(errs, &format!("{path}.vm"), vm);
        }
        if let Some(nic) = &self.nic {
            validation::dns_label(errs, &format!("{path}.nic"), nic);
            if self.vm.is_none() {
                errs.push(format!("{path}.nic"), "a NIC needs the vm it belongs to");
            }
        }
    }
}

impl Validate for FloatingIPStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// A public address forwarded to a VM's NIC through its router.
    FloatingIP {
        spec: FloatingIPSpec,
        status: FloatingIPStatus,
        plural: "floatingips",
        singular: "floatingip",
        short_names: ["fip"],
        namespaced: true,
        field_selectors: [],
        columns: [
            "ADDRESS" => "status.address",
            "VM" => "spec.vm",
            "FIXED-IP" => "status.fixedAddress",
            "ROUTER" => "status.router"
        ],
        set_once: ["spec.network", "spec.address"],
    }
}
