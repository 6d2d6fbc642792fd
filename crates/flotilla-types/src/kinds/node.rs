//! Node: a hypervisor host running the Flotilla agent. Cluster-scoped.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::Condition;
use crate::quantity::Quantity;
use crate::resource::Validate;
use crate::validation::FieldErrors;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// Cordoned: no new VMs are placed here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeResources {
    /// CPUs (for allocatable: vCPUs the scheduler may place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory (for allocatable: what the scheduler may place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Disk space of the node's data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Quantity>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeInfo {
    /// The host's name as libvirt reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The Flotilla agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The libvirt library's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_version: Option<String>,
    /// The hypervisor's (QEMU's) version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// `kvm` or `qemu` (TCG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(kvm|qemu)$"))]
    pub virt_type: Option<String>,
    /// Where the agent serves VM logs to the API server (HTTPS, client certificates only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_endpoint: Option<String>,
    /// SHA-256 of the agent's serving certificate, pinned by the API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cert_sha256: Option<String>,
    /// The libvirt URI other nodes' libvirt daemons migrate VMs to (e.g.
    /// `qemu+tls://host-b.example/system`); absent: the node takes no migrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_uri: Option<String>,
    /// libvirt's host UUID (two hosts with the same one cannot migrate to each other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_uuid: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeStatus {
    /// What the host has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeResources>,
    /// What the scheduler may place: capacity times the overcommit ratios.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<NodeResources>,
    /// Versions and endpoints of the node's agent and hypervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_info: Option<NodeInfo>,
    /// The node's conditions; Ready says whether its agent renews its heartbeat lease.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Addresses the node is reached at.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addresses: BTreeMap<String, String>,
    /// Domains on this host that Flotilla did not create (`flotilla vm adopt` can take them over).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmanaged_domains: Vec<UnmanagedDomain>,
    /// How many times the node's DHCP servers (one per overlay network it carries) exited and
    /// were started again by its agent, since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_server_restarts: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UnmanagedDomain {
    /// The libvirt domain's name.
    pub name: String,
    /// The libvirt domain's UUID (what flotilla vm adopt takes).
    pub uuid: String,
    /// Its virtual CPUs.
    pub cpus: u32,
    /// Its memory.
    pub memory: Quantity,
    /// Whether it is running.
    #[serde(default)]
    pub running: bool,
    /// Set when another Flotilla cluster created the domain: that cluster's ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flotilla_cluster: Option<String>,
}

impl Validate for NodeSpec {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

impl Validate for NodeStatus {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if let Some(v) = self.node_info.as_ref().and_then(|i| i.virt_type.as_deref()) {
            if v != "kvm" && v != "qemu" {
                errs.push(
                    format!("{path}.nodeInfo.virtType"),
                    format!("{v:?} must be kvm or qemu"),
                );
            }
        }
    }
}

crate::define_kind! {
    /// A hypervisor host. Agents register their Node and keep its status current.
    Node {
        spec: NodeSpec, spec_default: true,
        status: NodeStatus,
        plural: "nodes",
        singular: "node",
        short_names: ["no"],
        namespaced: false,
        field_selectors: ["spec.unschedulable"],
                columns: [
            "READY" => "status.conditions[type=Ready].status",
            "CPUS" => "status.capacity.cpus",
            "MEMORY" => "status.capacity.memory",
            "VIRT" => "status.nodeInfo.virtType" (wide),
            "LIBVIRT" => "status.nodeInfo.libvirtVersion" (wide)
        ],
    }
}
