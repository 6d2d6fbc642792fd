//! Volume: a disk of a project, in a storage pool, that outlives VMs. A volume in a node-local
//! pool (`dir`) lives on one node, which the control plane picks among the nodes where the pool
//! is Ready with room (`status.node`); that node's agent makes it, and removes it before the
//! object goes (a finalizer). A volume in a shared pool (rbd) is managed by one node too, the
//! node of the VM using it once attached, but any node of the pool can open it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::image::ImageFormat;
use crate::quantity::Quantity;
use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// The StoragePool it lives in (default: `default`, each node's data directory).
    #[serde(default = "default_pool")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub pool: String,
    /// Its size, as a quantity (e.g. 10Gi): 1Mi to 64Ti. It may grow, never shrink.
    pub size: Quantity,
    /// `qcow2` (the default: thin, snapshots) or `raw`.
    #[serde(default)]
    pub format: ImageFormat,
    /// Whether several VMs may attach it at once (raw only: qcow2 metadata cannot be written
    /// by two guests).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shareable: bool,
    /// For an iscsi pool: the target's LUN this volume is (made by the target's administrator;
    /// its size is the volume's, at least `size`). Zeroed when the volume is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16383))]
    pub lun: Option<u32>,
    /// What it starts as: empty (absent), or a clone of another volume or of a snapshot of the
    /// project in the same pool (made on its node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// For a node-local pool: the node to make it on, e.g. beside the VM that will use it
    /// (absent: the Ready node with the most free space). It waits Pending, saying why, while
    /// that node does not serve the pool or lacks room. Set once; ignored by shared pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSource {
    /// The volume to clone (or set `snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub volume: Option<String>,
    /// The VolumeSnapshot to clone: the volume as it was then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub snapshot: Option<String>,
    /// The Image (of the project) to copy: a volume that starts as the image (full only: the
    /// node's cached copy of an image is not kept for clones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub image: Option<String>,
    /// `full` (the default: every byte copied, independent) or `linked` (copy-on-write over the
    /// source: qcow2 in a dir pool, RBD's own clone in an rbd pool; the source cannot be
    /// deleted while the clone exists).
    #[serde(default)]
    pub mode: CloneMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    #[default]
    Full,
    Linked,
}

fn default_pool() -> String {
    crate::kinds::storage_pool::DEFAULT_POOL.to_string()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeStatus {
    /// `Pending` (waiting for a node with room, or to be made), `Available`, or `Failed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// The node it lives on (node-local pools); in a shared pool, the node that manages it
    /// (the node of the VM using it, once attached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// In a pool every node reaches (rbd): not tied to `node`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Its file on that node, or `rbd:<ceph pool>/<image>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Its size in bytes, as made.
    #[serde(default)]
    pub capacity: u64,
    /// Bytes it takes in the pool.
    #[serde(default)]
    pub allocation: u64,
    /// Why it is pending or failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The last revert carried out (the value of the `flotilla.dev/revert-to` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_revert: Option<String>,
    /// The VMs it is attached to (the control plane adds a VM when it asks for the volume;
    /// the VM's agent removes it once the domain has let go of it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached_to: Vec<Attachment>,
}

/// A VM a volume is attached to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attachment {
    /// The VM's name (in the volume's project).
    pub vm: String,
    /// The VM's uid (a VM made again under the same name is another VM).
    pub uid: String,
}

impl Validate for VolumeSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        validation::dns_label(errs, &format!("{path}.pool"), &self.pool);
        validation::disk_size(errs, &format!("{path}.size"), &self.size);
        if let Some(node) = &self.node_name {
            validation::dns_label(errs, &format!("{path}.nodeName"), node);
            if self.source.as_ref().is_some_and(|s| s.image.is_none()) {
                errs.push(
                    format!("{path}.nodeName"),
                    "a clone is made on its source's node: leave nodeName out",
                );
            }
        }
        if self.lun.is_some_and(|l| l > 16383) {
            errs.push(format!("{path}.lun"), "is a LUN number, 0 to 16383");
        }
        if let Some(source) = &self.source {
            match (&source.volume, &source.snapshot, &source.image) {
                (Some(v), None, None) => {
                    validation::dns_label(errs, &format!("{path}.source.volume"), v)
                }
                (None, Some(s), None) => {
                    validation::dns_label(errs, &format!("{path}.source.snapshot"), s)
                }
                (None, None, Some(i)) => {
                    validation::dns_label(errs, &format!("{path}.source.image"), i);
                    if source.mode == CloneMode::Linked {
                        errs.push(
                            format!("{path}.source.mode"),
                            "an image is copied (full): the node's cached copy of it is not kept for clones",
                        );
                    }
                }
                _ => errs.push(
                    format!("{path}.source"),
                    "set one of volume, snapshot and image: what to start from",
                ),
            }
        }
        if self.shareable && self.format != ImageFormat::Raw {
            errs.push(
                format!("{path}.shareable"),
                "a shareable volume must be raw: qcow2 metadata cannot be written by two guests",
            );
        }
    }
}

impl Validate for VolumeStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// A disk in a storage pool that outlives VMs.
    Volume {
        spec: VolumeSpec,
        status: VolumeStatus,
        plural: "volumes",
        singular: "volume",
        short_names: ["vol"],
        namespaced: true,
        field_selectors: ["status.node"],
        columns: [
            "POOL" => "spec.pool",
            "SIZE" => "spec.size",
            "PHASE" => "status.phase",
            "NODE" => "status.node"
        ],
        set_once: ["spec.pool", "spec.format", "spec.shareable", "spec.source", "spec.lun", "spec.nodeName"],
    }
}
