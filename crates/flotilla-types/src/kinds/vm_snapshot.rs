//! VMSnapshot: a VM as it was at one moment — every disk (the root disk and the attached
//! volumes), and the guest's memory when it was running. External, as libvirt calls it: each
//! disk's current file freezes and a new overlay takes the writes; the memory goes to a file
//! beside the VM's disks. Reverting (the VM's `flotilla.dev/revert-to` annotation) puts fresh
//! overlays on the frozen files and, with memory, resumes the guest where it was; deleting one
//! merges its files into what came after.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VMSnapshotSpec {
    /// The VM (of the project) it is a snapshot of.
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub vm: String,
    /// Whether to keep the guest's memory too, when the VM is running (default true): a revert
    /// then resumes the guest where it was, instead of booting it from its disks.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub memory: bool,
}

/// One disk of a VM snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VMSnapshotDisk {
    /// `root`, or the name of the disk in `spec.disks`.
    pub name: String,
    /// The volume, for an attached one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The device in the domain (vda, vdb, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// The frozen file holding its content.
    pub path: String,
    /// Its size then, in bytes.
    #[serde(default)]
    pub size: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VMSnapshotStatus {
    /// `Pending`, `Ready` or `Failed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// The node its VM runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The uid of its VM (a VM made again under the name is another VM).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vm_uid: String,
    /// Whether the guest was running (its memory kept, if `memory`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vm_state: String,
    /// The file holding the guest's memory, when kept.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub memory_path: String,
    /// Every disk of the VM then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<VMSnapshotDisk>,
    /// Why it is pending or failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Validate for VMSnapshotSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        validation::dns_label(errs, &format!("{path}.vm"), &self.vm);
    }
}

impl Validate for VMSnapshotStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// A VM as it was at one moment: its disks, and its memory when running.
    VMSnapshot {
        spec: VMSnapshotSpec,
        status: VMSnapshotStatus,
        plural: "vmsnapshots",
        singular: "vmsnapshot",
        short_names: ["vmsnap"],
        namespaced: true,
        field_selectors: ["status.node", "spec.vm"],
        columns: [
            "VM" => "spec.vm",
            "PHASE" => "status.phase",
            "STATE" => "status.vmState",
            "NODE" => "status.node"
        ],
        set_once: ["spec.vm", "spec.memory"],
    }
}
