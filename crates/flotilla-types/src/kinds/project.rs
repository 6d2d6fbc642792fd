//! Project: the namespace every project-scoped object lives in. `default` always exists.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::resource::Validate;
use crate::validation::FieldErrors;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectSpec {
    /// What the project is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectStatus {
    /// Active, or Terminating while it is being deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
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
