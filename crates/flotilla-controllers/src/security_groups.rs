//! Security group status: which NICs are in each group, with their addresses (what rules naming
//! the group as their remote match; agents read them here, since a node sees only its own VMs),
//! and a `Ready` condition that names rules whose remote group does not exist. Also makes a
//! project's `default` group when it lacks one (projects made before groups existed, or a
//! group lost some other way). Runs on every change of a VM, group or project (a burst costs
//! one pass), and every `resync`.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_server::objects::{ListOptions, Objects};
use flotilla_server::ApiError;
use flotilla_types::kinds::security_group::DEFAULT_GROUP;
use flotilla_types::kinds::{SecurityGroup, SecurityGroupMember, SecurityGroupSpec};
use flotilla_types::meta::{Condition, ConditionStatus};
use flotilla_types::registry::by_kind;
use flotilla_types::VirtualMachine;
use serde_json::json;

pub async fn run(objects: Objects, resync: Duration) {
    let kinds = ["VirtualMachine", "SecurityGroup", "Project"];
    crate::on_changes(
        objects,
        &kinds,
        resync,
        "update security group status",
        |o| async move { sweep(&o).await },
    )
    .await
}

/// One pass; returns how many groups were written (made or their status changed).
pub async fn sweep(objects: &Objects) -> Result<usize, ApiError> {
    let (vm_kind, sg_kind, project_kind) = (
        by_kind("VirtualMachine").expect("registered"),
        by_kind("SecurityGroup").expect("registered"),
        by_kind("Project").expect("registered"),
    );
    let mut members: BTreeMap<(String, String), Vec<SecurityGroupMember>> = BTreeMap::new();
    for raw in objects
        .list(vm_kind, None, &ListOptions::default())
        .await?
        .items
    {
        let Ok(vm) = serde_json::from_slice::<VirtualMachine>(&raw) else {
            continue;
        };
        let project = vm.metadata.namespace.clone().unwrap_or_default();
        let interfaces = vm.status.map(|s| s.interfaces).unwrap_or_default();
        for (i, nic) in vm.spec.networks.iter().enumerate() {
            let name = nic.nic_name(i);
            let mut addresses: Vec<String> = interfaces
                .iter()
                .find(|n| n.name == name)
                .map(|n| {
                    n.ips
                        .iter()
                        .filter_map(|ip| ip.split('/').next())
                        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            addresses.extend(nic.allowed_address_pairs.iter().cloned());
            for group in nic.groups() {
                members
                    .entry((project.clone(), group))
                    .or_default()
                    .push(SecurityGroupMember {
                        vm: vm.metadata.name.clone(),
                        nic: name.clone(),
                        addresses: addresses.clone(),
                    });
            }
        }
    }
    let mut groups: BTreeMap<(String, String), SecurityGroup> = BTreeMap::new();
    for raw in objects
        .list(sg_kind, None, &ListOptions::default())
        .await?
        .items
    {
        if let Ok(sg) = serde_json::from_slice::<SecurityGroup>(&raw) {
            let project = sg.metadata.namespace.clone().unwrap_or_default();
            groups.insert((project, sg.metadata.name.clone()), sg);
        }
    }
    let mut written = 0;
    for raw in objects
        .list(project_kind, None, &ListOptions::default())
        .await?
        .items
    {
        let Ok(project) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            continue;
        };
        let name = project["metadata"]["name"].as_str().unwrap_or_default();
        if project["metadata"].get("deletionTimestamp").is_some()
            || groups.contains_key(&(name.to_string(), DEFAULT_GROUP.to_string()))
        {
            continue;
        }
        let body = json!({"metadata": {"name": DEFAULT_GROUP}, "spec": SecurityGroupSpec::default_group()});
        match objects.create(sg_kind, Some(name), body).await {
            Ok(_) => {
                tracing::info!(project = name, "made the project's default security group");
                written += 1;
            }
            Err(e) if e.code() == 409 || e.code() == 403 || e.code() == 404 => {}
            Err(e) => return Err(e),
        }
    }
    for ((project, name), group) in &groups {
        let mut now = members
            .remove(&(project.clone(), name.clone()))
            .unwrap_or_default();
        now.sort_by(|a, b| (&a.vm, &a.nic).cmp(&(&b.vm, &b.nic)));
        let missing: Vec<&str> = group
            .spec
            .rules
            .iter()
            .filter_map(|r| r.remote.as_ref()?.security_group.as_deref())
            .filter(|g| !groups.contains_key(&(project.clone(), g.to_string())))
            .collect();
        let status = group.status.clone().unwrap_or_default();
        let conditions = vec![ready(&status.conditions, &missing)];
        if status.members == now
            && status.member_count as usize == now.len()
            && status.conditions == conditions
        {
            continue;
        }
        let patch =
            json!({"status": {"members": now, "memberCount": now.len(), "conditions": conditions}});
        written += crate::write_status(objects, "SecurityGroup", project, name, patch).await?;
    }
    Ok(written)
}

/// `Ready`, or not (naming the remote groups that do not exist: their rules match nothing),
/// keeping the transition time while it stays the same.
fn ready(before: &[Condition], missing: &[&str]) -> Condition {
    if missing.is_empty() {
        return crate::condition(
            before,
            "Ready",
            ConditionStatus::True,
            "Ready",
            "every rule's remote exists".to_string(),
        );
    }
    crate::condition(
        before,
        "Ready",
        ConditionStatus::False,
        "UnknownRemoteGroup",
        format!(
            "rules name security group{} {} that the project does not have: they match nothing",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", ")
        ),
    )
}
