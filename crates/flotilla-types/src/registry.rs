//! The table of kinds the API serves, for code that handles objects without knowing their type
//! (the API server, the CLI's generic verbs, the OpenAPI document).

use serde_json::Value;

use crate::kinds::{
    ClusterRole, ClusterRoleBinding, Event, FloatingIP, Image, Lease, Migration, Network, Node,
    PlacementPolicy, Project, Role, RoleBinding, Router, SecurityGroup, ServiceAccount,
    StoragePool, VMClass, VMSnapshot, VirtualMachine, Volume, VolumeSnapshot,
};
use crate::resource::{decode, Column, Resource};
use crate::validation::FieldErrors;

pub struct KindInfo {
    pub kind: &'static str,
    /// `flotilla.dev/v1alpha1`, or `v1` for the kinds served in Kubernetes' core group.
    pub api_version: &'static str,
    /// Whether it has a `/status` subresource.
    pub has_status: bool,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// The kind's own fields usable in a field selector (besides `selector::METADATA_FIELDS`).
    pub field_selectors: &'static [&'static str],
    pub columns: &'static [Column],
    /// See [`Resource::SET_ONCE`].
    pub set_once: &'static [&'static str],
    /// Strict decode plus every semantic check; returns the object in canonical form.
    pub validate: fn(&Value) -> Result<Value, FieldErrors>,
    pub schema: fn(&mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema,
}

fn validate<T: Resource>(value: &Value) -> Result<Value, FieldErrors> {
    let object = decode::<T>(value)?;
    Ok(serde_json::to_value(object).expect("a decoded object serialises"))
}

fn schema<T: Resource>(gen: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
    gen.subschema_for::<T>()
}

macro_rules! kind_info {
    ($t:ty) => {
        KindInfo {
            kind: <$t>::KIND,
            api_version: <$t as Resource>::API_VERSION,
            has_status: <$t as Resource>::HAS_STATUS,
            plural: <$t>::PLURAL,
            singular: <$t>::SINGULAR,
            short_names: <$t>::SHORT_NAMES,
            namespaced: <$t>::NAMESPACED,
            field_selectors: <$t as Resource>::FIELD_SELECTORS,
            columns: <$t>::COLUMNS,
            set_once: <$t>::SET_ONCE,
            validate: validate::<$t>,
            schema: schema::<$t>,
        }
    };
}

/// Every kind served, in the order discovery lists them.
pub static KINDS: &[KindInfo] = &[
    kind_info!(Project),
    kind_info!(Node),
    kind_info!(VirtualMachine),
    kind_info!(VMClass),
    kind_info!(Image),
    kind_info!(Lease),
    kind_info!(PlacementPolicy),
    kind_info!(Network),
    kind_info!(SecurityGroup),
    kind_info!(Router),
    kind_info!(FloatingIP),
    kind_info!(StoragePool),
    kind_info!(Volume),
    kind_info!(VolumeSnapshot),
    kind_info!(VMSnapshot),
    kind_info!(Migration),
    kind_info!(Event),
    kind_info!(ServiceAccount),
    kind_info!(Role),
    kind_info!(ClusterRole),
    kind_info!(RoleBinding),
    kind_info!(ClusterRoleBinding),
];

/// Finds a kind by plural (`virtualmachines`), singular, kind (`VirtualMachine`) or short name
/// (`vm`), ignoring case.
pub fn lookup(name: &str) -> Option<&'static KindInfo> {
    let n = name.to_ascii_lowercase();
    KINDS.iter().find(|k| {
        k.plural == n
            || k.singular == n
            || k.kind.to_ascii_lowercase() == n
            || k.short_names.contains(&n.as_str())
    })
}

pub fn by_plural(plural: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.plural == plural)
}

impl KindInfo {
    /// The path prefix the kind is served under: `/apis/flotilla.dev/v1alpha1` or `/api/v1`.
    pub fn api_root(&self) -> String {
        if self.api_version.contains('/') {
            format!("/apis/{}", self.api_version)
        } else {
            format!("/api/{}", self.api_version)
        }
    }
}

pub fn by_kind(kind: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve() {
        for alias in [
            "vm",
            "vms",
            "VirtualMachine",
            "virtualmachines",
            "virtualmachine",
        ] {
            assert_eq!(lookup(alias).unwrap().kind, "VirtualMachine", "{alias}");
        }
        assert_eq!(lookup("no").unwrap().kind, "Node");
        assert_eq!(lookup("img").unwrap().kind, "Image");
        assert!(lookup("pods").is_none());
    }
}
