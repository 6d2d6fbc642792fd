//! The object envelope: metadata, owner references and conditions, as Kubernetes defines them.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{self, FieldErrors};

/// RFC 3339 time with second precision, as Kubernetes writes it.
pub type Time = DateTime<Utc>;

pub fn now() -> Time {
    Utc::now().trunc_subsecs(0)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// The object's name: a DNS-1123 label (at most 63 lowercase letters, digits and '-'), unique in its project.
    #[schemars(regex = "crate::validation::NAME_PATTERN", length(max = 63))]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// When `name` is empty, the server appends five random characters to this prefix.
    #[schemars(regex = "crate::validation::GENERATE_NAME_PATTERN", length(max = 57))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    /// The project of a project-scoped object (empty: the project in the path).
    #[schemars(regex = "crate::validation::NAME_PATTERN", length(max = 63))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The object's unique id, set by the server; a recreated object gets a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Opaque; pass it back on update to guard against concurrent writes (409 when stale).
    #[schemars(regex(pattern = r"^[0-9]{0,18}$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Increments whenever the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// When the object was created (set by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Time>,
    /// When deletion was asked for, while finalizers hold the object (set by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Time>,
    /// Set with `deletionTimestamp` when the deletion asked for a grace period (for a VM: how
    /// long its guest may take to shut down; 0 or absent: the domain is destroyed at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_grace_period_seconds: Option<i64>,
    /// Identifying key/value pairs that selectors match: keys are [prefix/]name, values at most 63 characters.
    #[schemars(schema_with = "crate::validation::labels_schema")]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Non-identifying metadata: keys are [prefix/]name, at most 256 KiB in all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// While non-empty, a deleted object stays (with `deletionTimestamp`) until its owners clean up.
    #[schemars(inner(regex = "crate::validation::QUALIFIED_NAME_PATTERN", length(max = 317)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    /// Objects this one belongs to: when every owner is gone, the garbage collector deletes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    /// Who set which fields (server-side apply), kept by the server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub managed_fields: Vec<ManagedFieldsEntry>,
}

/// One writer's fields, as Kubernetes records them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManagedFieldsEntry {
    /// The field manager (`fieldManager` of its requests).
    pub manager: String,
    /// Apply (server-side apply) or Update (any other write).
    pub operation: String,
    /// The apiVersion the fields were written in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    /// When it last wrote.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub time: String,
    /// FieldsV1.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fields_type: String,
    /// The fields it owns: `f:<field>`, `k:<key>`, `v:<value>` and `.` entries.
    #[serde(default)]
    #[schemars(with = "Option<FieldsV1>")]
    pub fields_v1: serde_json::Value,
    /// `status` when the writes were to the status subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
}

fn is_fields_v1(v: &serde_json::Value) -> bool {
    v.as_object().is_some_and(|m| m.values().all(is_fields_v1))
}

/// The schema of `fieldsV1`: objects of objects, each key a field (`f:name`), list key
/// (`k:{...}`), value (`v:...`) or the field itself (`.`).
pub struct FieldsV1;

impl JsonSchema for FieldsV1 {
    fn schema_name() -> String {
        "FieldsV1".into()
    }

    fn json_schema(gen: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        schemars::schema::SchemaObject {
            instance_type: Some(schemars::schema::InstanceType::Object.into()),
            metadata: Some(Box::new(schemars::schema::Metadata {
                description: Some("Fields, each an object of the fields below it.".into()),
                ..Default::default()
            })),
            object: Some(Box::new(schemars::schema::ObjectValidation {
                additional_properties: Some(Box::new(gen.subschema_for::<FieldsV1>())),
                ..Default::default()
            })),
            ..Default::default()
        }
        .into()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnerReference {
    /// The owner's apiVersion.
    pub api_version: String,
    /// The owner's kind.
    #[schemars(length(min = 1))]
    pub kind: String,
    /// The owner's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The owner's uid.
    #[schemars(length(min = 1))]
    pub uid: String,
    /// Whether the owner is the managing controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
    /// With Foreground deletion of the owner: it waits for this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_owner_deletion: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// What the condition is about, e.g. `Ready` or `Scheduled`.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A CamelCase word saying why, e.g. DomainRunning, Unschedulable.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// What the condition means now, for a person.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The metadata.generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ObjectMeta {
    /// Checks what a user may write; server-set fields are overwritten by the server anyway.
    pub fn validate(&self, errs: &mut FieldErrors) {
        // A generateName is checked whenever it is set, as Kubernetes does, used or not.
        if let Some(prefix) = &self.generate_name {
            let usable = prefix.len() <= 57
                && (prefix.is_empty() || crate::validation::is_dns_label(&format!("{prefix}a")));
            if !usable {
                errs.push(
                    "metadata.generateName",
                    format!("{prefix:?} must be a DNS-1123 label prefix of at most 57 characters"),
                );
            }
        }
        if !self.name.is_empty() {
            validation::dns_label(errs, "metadata.name", &self.name);
        } else if self.generate_name.is_none() {
            errs.push(
                "metadata.name",
                "is required (or set metadata.generateName)",
            );
        }
        validation::labels(errs, "metadata.labels", &self.labels);
        for k in self.annotations.keys() {
            if !validation::is_qualified_name(k) {
                errs.push(
                    format!("metadata.annotations[{k:?}]"),
                    "annotation keys are [prefix/]name like label keys",
                );
            }
        }
        let size: usize = self
            .annotations
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if size > 256 * 1024 {
            errs.push(
                "metadata.annotations",
                "annotations may hold at most 256 KiB in total",
            );
        }
        for (i, f) in self.finalizers.iter().enumerate() {
            if !validation::is_qualified_name(f) {
                errs.push(
                    format!("metadata.finalizers[{i}]"),
                    format!("{f:?} must be a qualified name such as flotilla.dev/agent"),
                );
            }
        }
        for (i, m) in self.managed_fields.iter().enumerate() {
            if !m.fields_v1.is_null() && !is_fields_v1(&m.fields_v1) {
                errs.push(
                    format!("metadata.managedFields[{i}].fieldsV1"),
                    "must be objects of objects, as in f:spec: {f:cpus: {}}",
                );
            }
        }
        for (i, o) in self.owner_references.iter().enumerate() {
            if o.uid.is_empty() || o.name.is_empty() || o.kind.is_empty() {
                errs.push(
                    format!("metadata.ownerReferences[{i}]"),
                    "an owner reference needs kind, name and uid",
                );
            }
        }
    }
}

/// The metadata only the server sets: a create drops them (and a client preparing a create from
/// a saved object leaves them out).
pub const SERVER_SET_FIELDS: [&str; 7] = [
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
];
