//! The scheduling controller: binds VMs without `spec.nodeName` to a node chosen by the
//! [`crate::placement`] engine (readiness, cordon, CPU and memory against allocatable,
//! `nodeSelector`, VM affinity and anti-affinity from `spec.affinity` and the VM's
//! PlacementPolicy; spread or pack), and otherwise says why in the `Scheduled` condition, e.g.
//! `0/12 nodes are available: 5 insufficient memory, 7 not ready`. Binding writes
//! `spec.nodeName` guarded by the VM's resourceVersion. One pass sees a fresh snapshot and
//! accounts for its own placements, so one scheduler never over-commits. Still to come (issue 4):
//! claims made by compare-and-swap so that several schedulers cannot over-commit a node between
//! them, and an incremental cache instead of re-listing everything per pass.

use std::collections::HashMap;
use std::time::Duration;

use flotilla_server::objects::{ListOptions, Objects, PatchBody};
use flotilla_server::Subresource;
use flotilla_types::meta::now;
use flotilla_types::registry;
use flotilla_types::Quantity;

use crate::placement::{self, Candidate, Placed, Request, Rules, Term, Used};
use flotilla_types::selector::FieldSelector;
use flotilla_types::selector::LabelSelector;
use serde_json::{json, Value};

fn items(raw: Vec<Vec<u8>>) -> Vec<Value> {
    raw.into_iter()
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

fn is_ready(node: &Value) -> bool {
    node["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn quantity(v: &Value) -> u128 {
    match v {
        Value::String(s) => Quantity::parse(s).map(|q| q.value()).unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0) as u128,
        _ => 0,
    }
}

fn candidate(node: &Value) -> Candidate {
    let alloc = &node["status"]["allocatable"];
    Candidate {
        name: node["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        ready: is_ready(node),
        schedulable: node["spec"]["unschedulable"] != true,
        labels: serde_json::from_value(node["metadata"]["labels"].clone()).unwrap_or_default(),
        cpus: alloc["cpus"].as_u64().unwrap_or(0),
        memory: quantity(&alloc["memory"]),
    }
}

fn term(t: &Value) -> Option<Term> {
    let selector = LabelSelector::parse(t["labelSelector"].as_str()?).ok()?;
    Some(Term {
        selector,
        key: t["topologyKey"].as_str()?.to_string(),
    })
}

fn terms(rules: &Value) -> Vec<Term> {
    rules["required"]
        .as_array()
        .map(|ts| ts.iter().filter_map(term).collect())
        .unwrap_or_default()
}

fn weighted(rules: &Value) -> Vec<(u32, Term)> {
    let weighted = |t: &Value| Some((t["weight"].as_u64()? as u32, term(t)?));
    rules["preferred"]
        .as_array()
        .map(|ts| ts.iter().filter_map(weighted).collect())
        .unwrap_or_default()
}

/// Adds the rules of an `affinity` object (from the VM or its PlacementPolicy).
fn add_rules(rules: &mut Rules, affinity: &Value) {
    let (near, apart) = (&affinity["vmAffinity"], &affinity["vmAntiAffinity"]);
    rules.required_affinity.extend(terms(near));
    rules.required_anti_affinity.extend(terms(apart));
    rules.preferred_affinity.extend(weighted(near));
    rules.preferred_anti_affinity.extend(weighted(apart));
}

/// What a VM asks for, resolving its VMClass and PlacementPolicy; Err says what is missing.
fn request(
    vm: &Value,
    classes: &HashMap<String, Value>,
    policies: &HashMap<(String, String), Value>,
) -> Result<Request, String> {
    let spec = &vm["spec"];
    let (cpus, memory) = match (spec.get("resources"), spec["class"].as_str()) {
        (Some(r), _) => (r["cpus"].as_u64().unwrap_or(0), quantity(&r["memory"])),
        (None, Some(class)) => {
            let c = classes
                .get(class)
                .ok_or_else(|| format!("VMClass {class:?} does not exist"))?;
            (
                c["spec"]["cpus"].as_u64().unwrap_or(0),
                quantity(&c["spec"]["memory"]),
            )
        }
        (None, None) => (0, 0),
    };
    let node_selector = serde_json::from_value(spec["nodeSelector"].clone()).unwrap_or_default();
    let project = vm["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut rules = Rules::default();
    add_rules(&mut rules, &spec["affinity"]);
    if let Some(policy) = spec["placementPolicy"].as_str() {
        let p = policies
            .get(&(project.clone(), policy.to_string()))
            .ok_or_else(|| {
                format!("PlacementPolicy {policy:?} does not exist in project {project:?}")
            })?;
        add_rules(&mut rules, &p["spec"]["affinity"]);
    }
    let labels = serde_json::from_value(vm["metadata"]["labels"].clone()).unwrap_or_default();
    Ok(Request {
        cpus,
        memory,
        node_selector,
        project,
        labels,
        rules,
        strategy: placement::Strategy::default(),
    })
}

/// Marks a VM unschedulable with `message`, unless it already says so.
async fn unschedulable(objects: &Objects, vm: &Value, message: String) {
    let vms_kind = registry::by_kind("VirtualMachine").expect("registered");
    let already = vm["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Scheduled" && c["message"] == message.as_str())
    });
    if already {
        return;
    }
    let (ns, name) = (
        vm["metadata"]["namespace"].as_str(),
        vm["metadata"]["name"].as_str().unwrap_or_default(),
    );
    let status = json!({"status": {"phase": "Pending", "conditions": [
        {"type": "Scheduled", "status": "False", "reason": "Unschedulable", "message": message, "lastTransitionTime": now()}]}});
    let _ = objects
        .patch(
            vms_kind,
            ns,
            name,
            PatchBody::Merge(status),
            Subresource::Status,
        )
        .await;
}

/// One pass: binds every unbound VM it can; returns how many.
pub async fn schedule_pending(
    objects: &Objects,
    strategy: placement::Strategy,
) -> Result<usize, flotilla_server::ApiError> {
    let kind = |k: &str| registry::by_kind(k).expect("registered");
    let (vms_kind, nodes_kind, classes_kind) =
        (kind("VirtualMachine"), kind("Node"), kind("VMClass"));
    let policies: HashMap<(String, String), Value> = items(
        objects
            .list(kind("PlacementPolicy"), None, &ListOptions::default())
            .await?
            .items,
    )
    .into_iter()
    .map(|p| {
        let key = (
            p["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        (key, p)
    })
    .collect();
    let vms = items(
        objects
            .list(vms_kind, None, &ListOptions::default())
            .await?
            .items,
    );
    let nodes: Vec<Candidate> = items(
        objects
            .list(nodes_kind, None, &ListOptions::default())
            .await?
            .items,
    )
    .iter()
    .map(candidate)
    .collect();
    let classes: HashMap<String, Value> = items(
        objects
            .list(classes_kind, None, &ListOptions::default())
            .await?
            .items,
    )
    .into_iter()
    .map(|c| {
        (
            c["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            c,
        )
    })
    .collect();
    // What is already claimed on each node: every VM bound to it.
    let mut used: HashMap<String, Used> = HashMap::new();
    let mut placed: Vec<Placed> = Vec::new();
    for vm in &vms {
        if let (Some(node), Ok(r)) = (
            vm["spec"]["nodeName"].as_str(),
            request(vm, &classes, &policies),
        ) {
            let u = used.entry(node.to_string()).or_default();
            u.cpus += r.cpus;
            u.memory += r.memory;
            placed.push(Placed {
                project: r.project,
                labels: r.labels,
                node: node.to_string(),
            });
        }
    }
    let unbound =
        FieldSelector::parse("spec.nodeName=", &["spec.nodeName"]).expect("valid selector");
    let mut bound = 0;
    for vm in vms
        .iter()
        .filter(|v| unbound.matches(v) && v["metadata"].get("deletionTimestamp").is_none())
    {
        let (ns, name) = (
            vm["metadata"]["namespace"].as_str(),
            vm["metadata"]["name"].as_str().unwrap_or_default(),
        );
        let req = match request(vm, &classes, &policies) {
            Ok(r) => Request { strategy, ..r },
            Err(message) => {
                unschedulable(objects, vm, message).await;
                continue;
            }
        };
        let node = match placement::place(&req, &nodes, &used, &placed) {
            Ok(node) => node,
            Err(why) => {
                unschedulable(objects, vm, why.to_string()).await;
                continue;
            }
        };
        // Guarded by the VM's resourceVersion: a VM changed meanwhile is looked at again next pass.
        let bind = PatchBody::Merge(
            json!({"metadata": {"resourceVersion": vm["metadata"]["resourceVersion"]}, "spec": {"nodeName": node}}),
        );
        match objects
            .patch(vms_kind, ns, name, bind, Subresource::Main)
            .await
        {
            Ok(_) => {
                let u = used.entry(node.clone()).or_default();
                u.cpus += req.cpus;
                u.memory += req.memory;
                placed.push(Placed {
                    project: req.project.clone(),
                    labels: req.labels.clone(),
                    node: node.clone(),
                });
                bound += 1;
                let status = json!({"status": {"phase": "Scheduled", "nodeName": node, "conditions": [
                    {"type": "Scheduled", "status": "True", "reason": "Scheduled", "message": format!("placed on {node}"), "lastTransitionTime": now()}]}});
                let _ = objects
                    .patch(
                        vms_kind,
                        ns,
                        name,
                        PatchBody::Merge(status),
                        Subresource::Status,
                    )
                    .await;
                tracing::debug!(vm = name, node = %node, "scheduled");
            }
            Err(e) if e.code() == 409 || e.code() == 404 => {}
            Err(e) => tracing::warn!(vm = name, error = %e, "could not bind"),
        }
    }
    Ok(bound)
}

pub async fn run(objects: Objects, resync: Duration, strategy: placement::Strategy) {
    // One watch for the controller's lifetime: a change between two passes is never missed.
    let mut events = None;
    loop {
        if events.is_none() {
            events = objects.store().watch("/registry/", 0).await.ok();
        }
        if let Err(e) = schedule_pending(&objects, strategy).await {
            tracing::warn!(error = %e, "scheduling pass failed");
        }
        let relevant = |ev: &flotilla_store::WatchEvent| {
            ev.kv.key.starts_with("/registry/virtualmachines/")
                || ev.kv.key.starts_with("/registry/nodes/")
        };
        match events.as_mut() {
            Some(stream) => {
                if !crate::wait_for_change(stream, resync, relevant).await {
                    events = None;
                }
            }
            None => tokio::time::sleep(resync).await,
        }
    }
}
