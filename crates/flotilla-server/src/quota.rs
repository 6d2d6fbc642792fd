//! Project quotas. A project's `status.used` is its running total, changed in the same store
//! transaction as every create, resize and final removal it counts, and that transaction
//! compares the project's revision: two creates racing for the last unit through two replicas
//! cannot both commit (the loser retries, sees the new total and is refused).
//!
//! What counts: a VM its CPUs, memory (its own or its class's at the time) and root disk size;
//! a volume its size; networks and floating IPs one each. A VMClass edited after its VMs were
//! counted would leave the total off, so [`recount`] sets it from the objects themselves
//! (compared against the project's revision like any charge) when a quota is set and
//! periodically.

use std::sync::Arc;
use std::time::Duration;

use flotilla_store::{Compare, KeyValue, Op, RangeRequest, Store, Txn};
use flotilla_types::kinds::ProjectQuota;
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::Quantity;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::objects::{encode, list_prefix, object_key, parse_stored};

/// Kinds whose objects count against a quota.
pub fn counted(kind: &str) -> bool {
    matches!(kind, "VirtualMachine" | "Volume" | "Network" | "FloatingIP")
}

/// An amount of each quota resource (bytes for memory and storage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpus: u64,
    pub memory: u128,
    pub vms: u64,
    pub volumes: u64,
    pub storage: u128,
    pub floating_ips: u64,
    pub networks: u64,
}

fn bytes(v: &Value) -> u128 {
    v.as_str()
        .and_then(|s| Quantity::parse(s).ok())
        .map(|q| q.value())
        .unwrap_or(0)
}

impl Usage {
    fn from_record(q: &ProjectQuota) -> Usage {
        Usage {
            cpus: q.cpus.unwrap_or(0),
            memory: q.memory.as_ref().map_or(0, Quantity::value),
            vms: q.vms.unwrap_or(0),
            volumes: q.volumes.unwrap_or(0),
            storage: q.storage.as_ref().map_or(0, Quantity::value),
            floating_ips: q.floating_ips.unwrap_or(0),
            networks: q.networks.unwrap_or(0),
        }
    }

    fn to_record(self) -> ProjectQuota {
        ProjectQuota {
            cpus: Some(self.cpus),
            memory: Some(Quantity::from_bytes(self.memory)),
            vms: Some(self.vms),
            volumes: Some(self.volumes),
            storage: Some(Quantity::from_bytes(self.storage)),
            floating_ips: Some(self.floating_ips),
            networks: Some(self.networks),
        }
    }

    fn plus(self, o: Usage) -> Usage {
        Usage {
            cpus: self.cpus + o.cpus,
            memory: self.memory + o.memory,
            vms: self.vms + o.vms,
            volumes: self.volumes + o.volumes,
            storage: self.storage + o.storage,
            floating_ips: self.floating_ips + o.floating_ips,
            networks: self.networks + o.networks,
        }
    }

    fn minus(self, o: Usage) -> Usage {
        Usage {
            cpus: self.cpus.saturating_sub(o.cpus),
            memory: self.memory.saturating_sub(o.memory),
            vms: self.vms.saturating_sub(o.vms),
            volumes: self.volumes.saturating_sub(o.volumes),
            storage: self.storage.saturating_sub(o.storage),
            floating_ips: self.floating_ips.saturating_sub(o.floating_ips),
            networks: self.networks.saturating_sub(o.networks),
        }
    }
}

/// What `object` counts for.
pub async fn usage_of(store: &dyn Store, object: &Value) -> Result<Usage, ApiError> {
    let spec = &object["spec"];
    Ok(match object["kind"].as_str() {
        Some("VirtualMachine") => {
            let (cpus, memory) = match (spec.get("resources"), spec["class"].as_str()) {
                (Some(r), _) => (r["cpus"].as_u64().unwrap_or(0), bytes(&r["memory"])),
                (None, Some(class)) => {
                    let classes = registry::by_kind("VMClass").expect("registered");
                    match store.get(&object_key(classes, None, class)).await? {
                        Some(kv) => {
                            let c = parse_stored(&kv)?;
                            (
                                c["spec"]["cpus"].as_u64().unwrap_or(0),
                                bytes(&c["spec"]["memory"]),
                            )
                        }
                        None => (0, 0),
                    }
                }
                _ => (0, 0),
            };
            Usage {
                cpus,
                memory,
                vms: 1,
                storage: bytes(&spec["rootDisk"]["size"]),
                ..Default::default()
            }
        }
        Some("Volume") => Usage {
            volumes: 1,
            storage: bytes(&spec["size"]),
            ..Default::default()
        },
        Some("Network") => Usage {
            networks: 1,
            ..Default::default()
        },
        Some("FloatingIP") => Usage {
            floating_ips: 1,
            ..Default::default()
        },
        _ => Usage::default(),
    })
}

fn used_of(project: &Value) -> Usage {
    serde_json::from_value::<ProjectQuota>(project["status"]["used"].clone())
        .map(|q| Usage::from_record(&q))
        .unwrap_or_default()
}

/// The first quota `next` exceeds where it grew from `before`, as a refusal.
fn exceeded(project: &Value, before: Usage, next: Usage) -> Option<ApiError> {
    let quota: ProjectQuota = serde_json::from_value(project["spec"]["quota"].clone()).ok()?;
    let name = project["metadata"]["name"].as_str().unwrap_or_default();
    let q = |n: Option<u64>| n.map(u128::from);
    let bytes_q = |b: &Option<Quantity>| b.as_ref().map(Quantity::value);
    let checks: [(&str, Option<u128>, u128, u128, bool); 7] = [
        (
            "cpus",
            q(quota.cpus),
            u128::from(before.cpus),
            u128::from(next.cpus),
            false,
        ),
        (
            "memory",
            bytes_q(&quota.memory),
            before.memory,
            next.memory,
            true,
        ),
        (
            "vms",
            q(quota.vms),
            u128::from(before.vms),
            u128::from(next.vms),
            false,
        ),
        (
            "volumes",
            q(quota.volumes),
            u128::from(before.volumes),
            u128::from(next.volumes),
            false,
        ),
        (
            "storage",
            bytes_q(&quota.storage),
            before.storage,
            next.storage,
            true,
        ),
        (
            "floatingIPs",
            q(quota.floating_ips),
            u128::from(before.floating_ips),
            u128::from(next.floating_ips),
            false,
        ),
        (
            "networks",
            q(quota.networks),
            u128::from(before.networks),
            u128::from(next.networks),
            false,
        ),
    ];
    for (field, limit, was, now, in_bytes) in checks {
        let Some(limit) = limit else { continue };
        if now > was && now > limit {
            let show = |n: u128| match in_bytes {
                true => Quantity::from_bytes(n).to_string(),
                false => n.to_string(),
            };
            return Some(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "exceeded quota of project {name:?}: {field} would be {} (limit {}, used {}; this asks for {} more)",
                    show(now),
                    show(limit),
                    show(was),
                    show(now - was)
                ),
            ));
        }
    }
    None
}

/// The compare and write that move `project`'s total by `add - remove`, refusing growth past
/// a quota. None when the total does not move.
pub fn charge(
    project_kv: &KeyValue,
    add: Usage,
    remove: Usage,
) -> Result<Option<(Compare, Op)>, ApiError> {
    if add == remove {
        return Ok(None);
    }
    let mut project = parse_stored(project_kv)?;
    let before = used_of(&project);
    let next = before.plus(add).minus(remove);
    if let Some(refusal) = exceeded(&project, before, next) {
        return Err(refusal);
    }
    set_used(&mut project, next);
    Ok(Some((
        Compare::mod_revision(project_kv.key.clone(), project_kv.mod_revision),
        Op::put(project_kv.key.clone(), encode(&project)),
    )))
}

fn projects() -> &'static KindInfo {
    registry::by_kind("Project").expect("registered")
}

/// The stored project of a project-scoped object (None when it is gone).
pub async fn project_kv(store: &dyn Store, project: &str) -> Result<Option<KeyValue>, ApiError> {
    Ok(store.get(&object_key(projects(), None, project)).await?)
}

/// What the objects of `project` count for now.
pub async fn total(store: &dyn Store, project: &str) -> Result<Usage, ApiError> {
    let mut total = Usage::default();
    for kind in ["VirtualMachine", "Volume", "Network", "FloatingIP"] {
        let k = registry::by_kind(kind).expect("registered");
        let kvs = store
            .range(RangeRequest::prefix(&list_prefix(k, Some(project))))
            .await?
            .kvs;
        for o in kvs {
            total = total.plus(usage_of(store, &parse_stored(&o)?).await?);
        }
    }
    Ok(total)
}

/// Writes `used` into a project's `status.used`.
pub fn set_used(project: &mut Value, used: Usage) {
    if !project["status"].is_object() {
        project["status"] = json!({});
    }
    project["status"]["used"] = serde_json::to_value(used.to_record()).expect("serialises");
}

/// Sets a project's total from the objects it holds. The objects are read after the project,
/// and the write compares the project's revision: a create or removal counted meanwhile
/// (which writes the project) makes this try again, so the total is never off by a change.
pub async fn recount(store: &dyn Store, project: &str) -> Result<(), ApiError> {
    for _ in 0..10 {
        let Some(kv) = project_kv(store, project).await? else {
            return Ok(());
        };
        let total = total(store, project).await?;
        let mut current = parse_stored(&kv)?;
        if used_of(&current) == total && current["status"]["used"].is_object() {
            return Ok(());
        }
        set_used(&mut current, total);
        let txn = Txn::new()
            .when(Compare::mod_revision(kv.key.clone(), kv.mod_revision))
            .and_then(Op::put(kv.key.clone(), encode(&current)));
        if store.txn(txn).await?.succeeded {
            return Ok(());
        }
    }
    Err(ApiError::new(
        409,
        "Conflict",
        "the project changes too often to count; try again",
    ))
}

/// Recounts every project now and then (see [`recount`]).
pub async fn run_recounter(store: Arc<dyn Store>, every: Duration) {
    loop {
        let Ok(range) = store
            .range(RangeRequest::prefix(&list_prefix(projects(), None)))
            .await
        else {
            continue;
        };
        for kv in range.kvs {
            let Ok(p) = parse_stored(&kv) else { continue };
            let name = p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Err(e) = recount(store.as_ref(), &name).await {
                tracing::warn!(project = %name, error = %e.0.message, "cannot recount the project's quota use");
            }
        }
        tokio::time::sleep(every).await;
    }
}
