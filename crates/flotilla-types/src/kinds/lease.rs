//! Lease: a heartbeat or lock renewed by its holder (node agents renew one named after their node).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::Time;
use crate::resource::Validate;
use crate::validation::FieldErrors;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseSpec {
    /// Who holds the lease (a node agent names its node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,
    /// How long after `renewTime` the holder is presumed gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub lease_duration_seconds: Option<u32>,
    /// When the holder last renewed the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<Time>,
    /// When the holder took the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<Time>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseStatus {}

impl Validate for LeaseSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if self.lease_duration_seconds == Some(0) {
            errs.push(format!("{path}.leaseDurationSeconds"), "must be at least 1");
        }
    }
}

impl Validate for LeaseStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// A lease. Node agents renew the one named after their node every few seconds.
    Lease {
        spec: LeaseSpec, spec_default: true,
        status: LeaseStatus,
        plural: "leases",
        singular: "lease",
        short_names: [],
        namespaced: false,
        field_selectors: [],
        columns: ["HOLDER" => "spec.holderIdentity", "RENEWED" => "spec.renewTime"],
    }
}
