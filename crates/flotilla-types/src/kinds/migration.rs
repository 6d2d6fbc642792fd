//! Migration: moves one VM to another node. Live (the guest keeps running; libvirt's
//! peer-to-peer migration between the two nodes' libvirt daemons) or cold (the VM is stopped,
//! its disks copied, and it starts on the target). The migration controller picks the target
//! when none is named (with the scheduler's rules), the target's agent prepares the VM's disks,
//! seed and networks there, and the source's agent runs the copy and reports its progress.
//! Deleting a Migration that has not finished aborts it: the VM keeps running on the source.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::Time;
use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

/// The finalizer the migration controller keeps on a Migration until its outcome is settled
/// (the VM bound to the node it runs on), so that deleting one never leaves a VM running on a
/// node it is not bound to.
pub const MIGRATION_FINALIZER: &str = "flotilla.dev/migration";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MigrationMode {
    /// The guest keeps running while its memory (and local disks) are copied.
    #[default]
    Live,
    /// The VM is stopped (cleanly, then forcibly after the shutdown timeout), its disks copied,
    /// and it is started on the target: for when live migration is impossible.
    Cold,
}

impl MigrationMode {
    pub fn is_live(&self) -> bool {
        *self == MigrationMode::Live
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationSpec {
    /// The VM (of the project) to move.
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub vm: String,
    /// The node to move it to; absent: the scheduler picks one with its placement rules
    /// (fit, node selector, affinity, spread; never a cordoned or unready node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub target_node: Option<String>,
    /// `Live` (default) or `Cold`.
    #[serde(default, skip_serializing_if = "MigrationMode::is_live")]
    pub mode: MigrationMode,
    /// Live only: suspend the guest for the whole copy and resume it on the target. The
    /// blackout is then the copy's length, but a guest that writes memory fast always moves.
    /// (Also the safe choice under QEMU's TCG before QEMU 9, which can corrupt busy guests.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Live only: the longest pause of the guest when it switches over, in milliseconds
    /// (default: libvirt's, 300 ms). Smaller takes more iterations to converge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth limit of the copy, MiB/s (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub bandwidth_mib: Option<u64>,
    /// Live only: throttle the guest's CPUs when it dirties memory faster than it is copied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_converge: bool,
    /// Live only: switch to post-copy when pre-copy does not converge (the guest runs on the
    /// target at once and fetches its remaining memory; if the network fails then, it is lost).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub post_copy: bool,
    /// Give up (and leave the VM on the source) after this many seconds of copying; default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: Option<u32>,
}

/// How far the copy is, as libvirt counts it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationProgress {
    /// Bytes copied so far (memory and disks).
    #[serde(default)]
    pub data_processed: u64,
    /// Bytes left to copy (memory pages dirtied again count again).
    #[serde(default)]
    pub data_remaining: u64,
    /// Bytes in all.
    #[serde(default)]
    pub data_total: u64,
    /// Disk bytes copied so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_processed: u64,
    /// Pre-copy passes over the guest's memory.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iteration: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationStatus {
    /// Pending, Preparing, Migrating, Succeeded, Failed or Aborted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// The uid of the VM moved (a VM made again under the name is another VM).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vm_uid: String,
    /// Where the VM was when the migration began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// Where it goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// The target's libvirt, as the source's libvirt connects to it (the target Node's
    /// `nodeInfo.migrationUri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_uri: Option<String>,
    /// The address QEMU's migration stream goes to (the target Node's `addresses.migration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_address: Option<String>,
    /// Set by the target's agent once the VM's disks, seed and networks are ready there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub target_ready: bool,
    /// The target's directory for the VM's files (the source rewrites its paths to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_vm_dir: Option<String>,
    /// Set by the target's agent when the VM's domain runs there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub target_running: bool,
    /// What the disks needed: `shared` (nothing copied), `incremental` (only the VM's own
    /// overlay; its image was cached on the target), `full`, or `cold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// How far the copy is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    /// How long the guest was paused at the switch-over, as QEMU measured it (live), or how long
    /// the VM was down (cold, suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// How long the copy took, from its start to the guest running on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When the copy began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the migration ended (succeeded, failed or aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// A word for why it is where it is (e.g. `NoTarget`, `SourceNotReady`, `Aborted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What happened, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl MigrationStatus {
    /// Whether the migration has ended.
    pub fn finished(&self) -> bool {
        matches!(self.phase.as_str(), "Succeeded" | "Failed" | "Aborted")
    }
}

impl Validate for MigrationSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        validation::dns_label(errs, &format!("{path}.vm"), &self.vm);
        if let Some(node) = &self.target_node {
            validation::dns_label(errs, &format!("{path}.targetNode"), node);
        }
        if self.mode == MigrationMode::Cold {
            for (set, field) in [
                (self.suspend, "suspend"),
                (self.max_downtime_ms.is_some(), "maxDowntimeMs"),
                (self.auto_converge, "autoConverge"),
                (self.post_copy, "postCopy"),
            ] {
                if set {
                    errs.push(
                        format!("{path}.{field}"),
                        "applies to live migrations only (mode is Cold)",
                    );
                }
            }
        }
        if self.suspend && self.post_copy {
            errs.push(
                format!("{path}.postCopy"),
                "a suspended guest is copied in one pass: post-copy does not apply",
            );
        }
        if self.max_downtime_ms == Some(0) {
            errs.push(format!("{path}.maxDowntimeMs"), "must be at least 1");
        }
        if self.bandwidth_mib == Some(0) {
            errs.push(format!("{path}.bandwidthMib"), "must be at least 1");
        }
        if self.timeout_seconds == Some(0) {
            errs.push(format!("{path}.timeoutSeconds"), "must be at least 1");
        }
    }
}

impl Validate for MigrationStatus {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        const PHASES: [&str; 7] = [
            "",
            "Pending",
            "Preparing",
            "Migrating",
            "Succeeded",
            "Failed",
            "Aborted",
        ];
        if !PHASES.contains(&self.phase.as_str()) {
            errs.push(
                format!("{path}.phase"),
                format!(
                    "{:?} is not a phase (Pending, Preparing, Migrating, Succeeded, Failed, Aborted)",
                    self.phase
                ),
            );
        }
    }
}

crate::define_kind! {
    /// A move of one VM to another node, live or cold.
    Migration {
        spec: MigrationSpec,
        status: MigrationStatus,
        plural: "migrations",
        singular: "migration",
        short_names: ["mig"],
        namespaced: true,
        field_selectors: ["spec.vm", "status.sourceNode", "status.targetNode", "status.phase"],
        columns: [
            "VM" => "spec.vm",
            "PHASE" => "status.phase",
            "SOURCE" => "status.sourceNode",
            "TARGET" => "status.targetNode",
            "DOWNTIME-MS" => "status.downtimeMs",
            "MODE" => "spec.mode" (wide),
            "STORAGE" => "status.storage" (wide),
            "REASON" => "status.reason" (wide)
        ],
        set_once: ["spec.vm", "spec.targetNode", "spec.mode", "spec.suspend", "spec.maxDowntimeMs", "spec.bandwidthMib", "spec.autoConverge", "spec.postCopy", "spec.timeoutSeconds"],
    }
}
