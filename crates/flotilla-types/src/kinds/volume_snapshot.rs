//! VolumeSnapshot: the content of a volume at one moment, kept while the volume goes on
//! changing. External, as libvirt calls it: the volume's current file is frozen as the
//! snapshot and a new overlay on top of it takes the volume's writes (also on a running VM: the
//! guest does not notice). A volume can be reverted to any of its snapshots, and new volumes
//! cloned from one; deleting a snapshot merges its file into the one above it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

/// The annotation whose new value asks a volume's agent to revert it to a snapshot:
/// `<snapshot>` or `<snapshot> <anything unique>` (e.g. a timestamp, to revert to the same
/// snapshot again). `flotilla volume revert` sets it.
pub const REVERT_ANNOTATION: &str = "flotilla.dev/revert-to";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSnapshotSpec {
    /// The volume (of the project) it is a snapshot of: qcow2, not shareable.
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub volume: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSnapshotStatus {
    /// `Pending`, `Ready` or `Failed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// The node its volume lives on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The frozen file holding its content.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// The volume's size when it was taken, in bytes.
    #[serde(default)]
    pub size: u64,
    /// Why it is pending or failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Validate for VolumeSnapshotSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        validation::dns_label(errs, &format!("{path}.volume"), &self.volume);
    }
}

impl Validate for VolumeSnapshotStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// The content of a volume at one moment.
    VolumeSnapshot {
        spec: VolumeSnapshotSpec,
        status: VolumeSnapshotStatus,
        plural: "volumesnapshots",
        singular: "volumesnapshot",
        short_names: ["vs", "snapshot", "snapshots"],
        namespaced: true,
        field_selectors: ["status.node", "spec.volume"],
        columns: [
            "VOLUME" => "spec.volume",
            "PHASE" => "status.phase",
            "SIZE" => "status.size",
            "NODE" => "status.node"
        ],
        set_once: ["spec.volume"],
    }
}
