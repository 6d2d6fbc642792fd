//! VMClass: a named instance type (CPUs and memory), cluster-scoped.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;
use crate::resource::Validate;
use crate::validation::FieldErrors;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VMClassSpec {
    /// Virtual CPUs of VMs of this class (at least 1).
    #[schemars(range(min = 1, max = 512))]
    pub cpus: u32,
    /// Memory of VMs of this class, as a quantity (e.g. 4Gi).
    pub memory: Quantity,
    /// What the class is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VMClassStatus {}

pub(crate) fn check_cpus(errs: &mut FieldErrors, field: String, cpus: u32) {
    if !(1..=512).contains(&cpus) {
        errs.push(field, format!("{cpus} must be between 1 and 512"));
    }
}

pub(crate) fn check_memory(errs: &mut FieldErrors, field: String, memory: &Quantity) {
    if memory.value() < 16 << 20 {
        errs.push(
            field,
            format!("{memory} is too small: a VM needs at least 16Mi"),
        );
    } else if memory.value() > 16 << 40 {
        errs.push(
            field,
            format!("{memory} is more than the 16Ti a VM may have"),
        );
    }
}

impl Validate for VMClassSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        check_cpus(errs, format!("{path}.cpus"), self.cpus);
        check_memory(errs, format!("{path}.memory"), &self.memory);
    }
}

impl Validate for VMClassStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// An instance type: VMs name it in `spec.class` instead of spelling out resources.
    VMClass {
        spec: VMClassSpec,
        status: VMClassStatus,
        plural: "vmclasses",
        singular: "vmclass",
        short_names: ["vmc", "class"],
        namespaced: false,
        field_selectors: [],
        columns: ["CPUS" => "spec.cpus", "MEMORY" => "spec.memory", "DESCRIPTION" => "spec.description" (wide)],
    }
}
