//! The BOSH agent's settings, as the agent reads them from the config drive's
//! `ec2/latest/user-data` (a mirror of bosh-agent's `settings.Settings`, with the traps its code
//! sets: `disks.system` is a plain string, each network names its lowercase `mac` when there
//! is more than one, `env` passes through unchanged).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentSettings {
    pub agent_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blobstore: Option<Value>,
    pub disks: Disks,
    #[serde(default)]
    pub env: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbus: Option<String>,
    pub networks: BTreeMap<String, Network>,
    #[serde(default)]
    pub ntp: Vec<String>,
    pub vm: Vm,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Disks {
    /// The root disk's device: a plain string (the agent's type).
    pub system: String,
    /// The ephemeral disk's hint, when the VM has one (else the agent uses the root disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<Value>,
    /// Persistent disks by CID (the director tells the agent of attached ones itself).
    #[serde(default)]
    pub persistent: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Network {
    /// `manual`, `dynamic` or `vip`.
    #[serde(rename = "type")]
    pub network_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netmask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// What this network is the default for (`dns`, `gateway`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default: Vec<String>,
    /// The NIC's MAC, lowercase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Whether the agent configures the address itself (`false` for DHCP).
    #[serde(default)]
    pub preconfigured: bool,
    #[serde(default)]
    pub cloud_properties: Value,
}
