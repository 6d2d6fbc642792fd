//! Project: the namespace every project-scoped object lives in. `default` always exists.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;
use crate::resource::Validate;
use crate::validation::FieldErrors;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectSpec {
    /// What the project is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Limits on what the project may hold; an absent field is no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<ProjectQuota>,
}

/// How much a project holds or may hold: VMs count their CPUs and memory (a VM's class is
/// resolved when it is created), storage is the sum of volume sizes and VM root disks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectQuota {
    /// Virtual CPUs of all VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u64>,
    /// Memory of all VMs (e.g. 64Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Number of VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u64>,
    /// Number of volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u64>,
    /// Volume sizes plus VM root disk sizes (e.g. 1Ti).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Quantity>,
    /// Number of floating IPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "floatingIPs")]
    pub floating_ips: Option<u64>,
    /// Number of networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectStatus {
    /// Active, or Terminating while it is being deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// What the project holds, counted in the same units as `spec.quota` (kept by the server
    /// in the same transaction as every create, resize and delete it counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<ProjectQuota>,
}

impl Validate for ProjectSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if self
            .description
            .as_ref()
            .is_some_and(|d| d.chars().count() > 1024)
        {
            errs.push(
                format!("{path}.description"),
                "must be at most 1024 characters",
            );
        }
    }
}

impl Validate for ProjectStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// A project (namespace) that groups VMs, images and other project-scoped objects.
    Project {
        spec: ProjectSpec, spec_default: true,
        status: ProjectStatus,
        plural: "projects",
        singular: "project",
        short_names: ["proj"],
        namespaced: false,
        field_selectors: [],
        columns: ["DESCRIPTION" => "spec.description"],
    }
}
