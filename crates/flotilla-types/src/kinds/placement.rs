//! Placement rules: VM affinity and anti-affinity, inline (`spec.affinity`) or through a reusable
//! PlacementPolicy named by `spec.placementPolicy`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::resource::Validate;
use crate::selector::LabelSelector;
use crate::validation::{self, FieldErrors};

/// The topology key that means "the node itself" (every node has its own value: its name).
pub const NODE_TOPOLOGY_KEY: &str = "flotilla.dev/node";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Affinity {
    /// Place near VMs matching these terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_affinity: Option<AffinityRules>,
    /// Place away from VMs matching these terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_anti_affinity: Option<AffinityRules>,
    /// Spread VMs matching each term evenly over the values of its topology key (e.g. zones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread: Vec<SpreadTerm>,
}

/// Counts VMs of the same project matching `labelSelector` per value of `topologyKey` and
/// prefers the values with the fewest; with `maxSkew`, a value may hold at most that many more
/// than the emptiest one (a hard rule).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpreadTerm {
    /// Which VMs are spread, as a label selector.
    pub label_selector: String,
    /// The node label whose values make the domains to spread over (e.g. topology.flotilla.dev/zone).
    #[schemars(regex = "crate::validation::QUALIFIED_NAME_PATTERN", length(max = 317))]
    pub topology_key: String,
    /// With it, a hard rule: no domain may have more than this many matching VMs above the emptiest one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_skew: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AffinityRules {
    /// Hard rules: a node that breaks one is not a candidate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<AffinityTerm>,
    /// Soft rules: honoured when possible, by weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred: Vec<WeightedAffinityTerm>,
}

/// VMs of the same project matching `labelSelector`, counted per value of the node label
/// `topologyKey` (`flotilla.dev/node` for the node itself, or e.g. `topology.flotilla.dev/zone`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AffinityTerm {
    /// Which VMs the rule is about, as a label selector (e.g. app=web).
    pub label_selector: String,
    /// The node label whose values make the domains (flotilla.dev/node: each node; topology.flotilla.dev/zone: each zone).
    #[schemars(regex = "crate::validation::QUALIFIED_NAME_PATTERN", length(max = 317))]
    pub topology_key: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedAffinityTerm {
    /// 1 to 100.
    #[schemars(range(min = 1, max = 100))]
    pub weight: u32,
    /// Which VMs the rule is about, as a label selector (e.g. app=web).
    pub label_selector: String,
    /// The node label whose values make the domains (flotilla.dev/node: each node; topology.flotilla.dev/zone: each zone).
    #[schemars(regex = "crate::validation::QUALIFIED_NAME_PATTERN", length(max = 317))]
    pub topology_key: String,
}

impl WeightedAffinityTerm {
    pub fn term(&self) -> AffinityTerm {
        AffinityTerm {
            label_selector: self.label_selector.clone(),
            topology_key: self.topology_key.clone(),
        }
    }
}

impl AffinityTerm {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if let Err(e) = LabelSelector::parse(&self.label_selector) {
            errs.push(format!("{path}.labelSelector"), e.to_string());
        }
        if !validation::is_qualified_name(&self.topology_key) {
            errs.push(
                format!("{path}.topologyKey"),
                format!(
                    "{:?} must be a node label key such as {NODE_TOPOLOGY_KEY}",
                    self.topology_key
                ),
            );
        }
    }
}

impl Affinity {
    pub fn validate(&self, path: &str, errs: &mut FieldErrors) {
        for (i, s) in self.topology_spread.iter().enumerate() {
            let at = format!("{path}.topologySpread[{i}]");
            AffinityTerm {
                label_selector: s.label_selector.clone(),
                topology_key: s.topology_key.clone(),
            }
            .validate(&at, errs);
            if s.max_skew == Some(0) {
                errs.push(
                    format!("{at}.maxSkew"),
                    "0 must be at least 1 (or leave it out for a soft rule)".to_string(),
                );
            }
        }
        for (name, rules) in [
            ("vmAffinity", &self.vm_affinity),
            ("vmAntiAffinity", &self.vm_anti_affinity),
        ] {
            let Some(rules) = rules else { continue };
            for (i, t) in rules.required.iter().enumerate() {
                t.validate(&format!("{path}.{name}.required[{i}]"), errs);
            }
            for (i, w) in rules.preferred.iter().enumerate() {
                if !(1..=100).contains(&w.weight) {
                    errs.push(
                        format!("{path}.{name}.preferred[{i}].weight"),
                        format!("{} must be between 1 and 100", w.weight),
                    );
                }
                w.term()
                    .validate(&format!("{path}.{name}.preferred[{i}]"), errs);
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementPolicySpec {
    /// The placement rules VMs naming this policy follow.
    #[serde(default)]
    pub affinity: Affinity,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementPolicyStatus {}

impl Validate for PlacementPolicySpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        self.affinity.validate(&format!("{path}.affinity"), errs);
    }
}

impl Validate for PlacementPolicyStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// Reusable placement rules; VMs name one in `spec.placementPolicy`.
    PlacementPolicy {
        spec: PlacementPolicySpec, spec_default: true,
        status: PlacementPolicyStatus,
        plural: "placementpolicies",
        singular: "placementpolicy",
        short_names: ["pp"],
        namespaced: true,
        field_selectors: [],
        columns: [],
    }
}
