//! Admission for SecurityGroups: every project is made with its `default` group (in the same
//! transaction), a VM may name only groups that exist in its project, and a group NICs are in
//! cannot be deleted (nor `default`, which goes with its project).

use flotilla_store::{RangeRequest, Store};
use flotilla_types::kinds::security_group::DEFAULT_GROUP;
use flotilla_types::kinds::{SecurityGroupSpec, VirtualMachineSpec};
use flotilla_types::registry;
use flotilla_types::validation::FieldErrors;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::objects::{list_prefix, object_key, parse_stored};

/// The key and stored form of `project`'s `default` group, as made with the project.
pub fn default_group(project: &str) -> (String, Value) {
    let kind = registry::by_kind("SecurityGroup").expect("registered");
    let object = json!({
        "apiVersion": kind.api_version,
        "kind": kind.kind,
        "metadata": {
            "name": DEFAULT_GROUP,
            "namespace": project,
            "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": flotilla_types::meta::now(),
            "generation": 1,
        },
        "spec": SecurityGroupSpec::default_group(),
    });
    (object_key(kind, Some(project), DEFAULT_GROUP), object)
}

/// Refuses (422, naming the field) a VM whose NICs name groups its project does not have.
/// `before` is the VM as stored, on an update: groups it already names are not looked up again.
pub async fn check_references(
    store: &dyn Store,
    project: &str,
    vm: &Value,
    before: Option<&Value>,
) -> Result<(), ApiError> {
    let groups = |v: &Value| -> Vec<Vec<String>> {
        serde_json::from_value::<VirtualMachineSpec>(v["spec"].clone())
            .map(|s| {
                s.networks
                    .iter()
                    .map(|n| n.security_groups.clone().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    };
    let known: Vec<String> = before.map(groups).unwrap_or_default().concat();
    let kind = registry::by_kind("SecurityGroup").expect("registered");
    let mut errs = FieldErrors::default();
    for (i, nic) in groups(vm).iter().enumerate() {
        for (j, group) in nic.iter().enumerate() {
            if known.contains(group) {
                continue;
            }
            if store
                .get(&object_key(kind, Some(project), group))
                .await?
                .is_none()
            {
                errs.push(
                    format!("spec.networks[{i}].securityGroups[{j}]"),
                    format!("no security group {group:?} in project {project:?}"),
                );
            }
        }
    }
    errs.into_result().map_err(|errs| {
        ApiError::invalid(
            "VirtualMachine",
            vm["metadata"]["name"].as_str().unwrap_or_default(),
            &errs,
        )
    })
}

/// Refuses (409) deleting a group that NICs are in (naming their VMs), or a project's `default`.
pub async fn check_delete(store: &dyn Store, project: &str, group: &str) -> Result<(), ApiError> {
    if group == DEFAULT_GROUP {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("the default security group goes with its project {project:?}; change its rules instead"),
        ));
    }
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    let resp = store
        .range(RangeRequest::prefix(&list_prefix(vms, Some(project))))
        .await?;
    let mut users = Vec::new();
    for kv in &resp.kvs {
        let vm = parse_stored(kv)?;
        let Ok(spec) = serde_json::from_value::<VirtualMachineSpec>(vm["spec"].clone()) else {
            continue;
        };
        if spec
            .networks
            .iter()
            .any(|n| n.groups().iter().any(|g| g == group))
        {
            users.push(
                vm["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    if users.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "security group {group:?} is used by VirtualMachine{} {}: take it out of their spec.networks[].securityGroups first",
            if users.len() == 1 { "" } else { "s" },
            users.join(", ")
        ),
    ))
}
