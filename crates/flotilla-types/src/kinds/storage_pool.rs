//! StoragePool: where volumes live. Cluster-scoped. A `dir` pool is a directory on each node its
//! `nodeSelector` picks (made there if missing); every node also serves the `default` pool, a
//! directory in its data directory. Each node's agent reports its own entry of `status.nodes`:
//! whether the pool is usable there and its space. (Network backends come with volumes.)

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

/// The pool every node serves from its data directory, made by the server at start.
pub const DEFAULT_POOL: &str = "default";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    /// A directory on each selected node.
    #[default]
    Dir,
    /// An LVM volume group on each selected node. Its nodes report the group's size and free
    /// space; making volumes in it is not done yet (the development machines have no
    /// device-mapper to test it on), so its volumes are refused with that reason.
    Lvm,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolSpec {
    /// The backend: `dir` or `lvm`.
    #[serde(rename = "type", default)]
    pub pool_type: PoolType,
    /// For `dir`: an absolute directory on each node (made if missing; every directory above it
    /// must let QEMU through). Absent: `pools/<name>` in each node's data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::HOST_PATH_PATTERN", length(max = 4096))]
    pub path: Option<String>,
    /// For `lvm`: the volume group on each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$"))]
    pub volume_group: Option<String>,
    /// Labels a node must have to serve the pool; empty: every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::validation::labels_schema")]
    pub node_selector: BTreeMap<String, String>,
    /// How far the sizes of the volumes on a node may add up, in percent of the pool's capacity
    /// there (and a new volume's size of its free space). 100 (the default): never more than
    /// the disk holds; more over-commits thin volumes, as Cinder's
    /// `max_over_subscription_ratio` does (2000 is its 20.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub allocation_limit_percent: Option<u32>,
}

impl StoragePoolSpec {
    /// [`Self::allocation_limit_percent`] or its default.
    pub fn allocation_limit(&self) -> u32 {
        self.allocation_limit_percent.unwrap_or(100)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolStatus {
    /// Per node (by name), as its agent last saw the pool; a map, so that each agent writes
    /// only its own entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, PoolNodeStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolNodeStatus {
    /// `Ready` (usable) or `Failed` (see `message`).
    pub phase: String,
    /// The directory on this node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Bytes of the filesystem holding it.
    #[serde(default)]
    pub capacity: u64,
    /// Bytes its volumes take.
    #[serde(default)]
    pub allocation: u64,
    /// Bytes free for new data.
    #[serde(default)]
    pub available: u64,
    /// How many volumes it holds.
    #[serde(default)]
    pub volumes: u32,
    /// Why it is not usable, and what to do.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Validate for StoragePoolSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if let Some(dir) = &self.path {
            validation::host_path(errs, &format!("{path}.path"), dir);
        }
        match (self.pool_type, &self.volume_group) {
            (PoolType::Lvm, None) => errs.push(
                format!("{path}.volumeGroup"),
                "is required for an lvm pool: the volume group on each node",
            ),
            (PoolType::Lvm, Some(vg)) => {
                let ok = vg.len() <= 127
                    && !vg.starts_with('-')
                    && vg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b));
                if !ok {
                    errs.push(
                        format!("{path}.volumeGroup"),
                        format!("{vg:?} is not a volume group name (letters, digits, + _ . -)"),
                    );
                }
                if self.path.is_some() {
                    errs.push(format!("{path}.path"), "is for dir pools, not lvm ones");
                }
            }
            (PoolType::Dir, Some(_)) => errs.push(
                format!("{path}.volumeGroup"),
                "is for lvm pools, not dir ones",
            ),
            (PoolType::Dir, None) => {}
        }
        validation::labels(errs, &format!("{path}.nodeSelector"), &self.node_selector);
        if let Some(pct) = self.allocation_limit_percent {
            if !(1..=100_000).contains(&pct) {
                errs.push(
                    format!("{path}.allocationLimitPercent"),
                    format!("{pct} is not between 1 and 100000"),
                );
            }
        }
    }
}

impl Validate for StoragePoolStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// Where volumes live: a directory on each selected node.
    StoragePool {
        spec: StoragePoolSpec, spec_default: true,
        status: StoragePoolStatus,
        plural: "storagepools",
        singular: "storagepool",
        short_names: ["pool", "pools", "sp"],
        namespaced: false,
        field_selectors: [],
        columns: ["TYPE" => "spec.type", "PATH" => "spec.path", "VG" => "spec.volumeGroup"],
        set_once: ["spec.type", "spec.path", "spec.volumeGroup"],
    }
}
