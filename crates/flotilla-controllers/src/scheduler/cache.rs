//! The scheduler's view of the cluster, built from one list and kept current by one watch:
//! nodes with what is claimed on each ([`Fleet`]), placed VMs indexed for affinity terms
//! ([`PlacedIndex`]), VM classes and placement policies, and the queue of VMs to place.
//!
//! Placements the scheduler has made but not yet seen come back through the watch are
//! *assumed* (as in kube-scheduler): counted at once, and the VM's older events are ignored until
//! the watch delivers the binding, so the view never forgets capacity the scheduler just used.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_store::{EventKind, KeyValue, Revision, WatchEvent};
use flotilla_types::Quantity;
use serde_json::{json, Value};

use crate::placement::{Candidate, Fleet, Placed, PlacedIndex};

pub const VMS: &str = "/registry/virtualmachines/";
pub const NODES: &str = "/registry/nodes/";
pub const CLASSES: &str = "/registry/vmclasses/";
pub const POLICIES: &str = "/registry/placementpolicies/";
pub const VOLUMES: &str = "/registry/volumes/";

/// Where a volume is, as far as placing a VM goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumePlace {
    /// Not on a node yet.
    Unplaced,
    /// Lives on this node (node-local pools).
    Node(String),
    /// In a pool every node reaches; `holders` are the VMs (uids) attached to it, and `node`
    /// the node managing it (theirs, once attached).
    Shared {
        node: Option<String>,
        holders: Vec<String>,
    },
}

impl VolumePlace {
    pub fn of(volume: &Value) -> VolumePlace {
        let status = &volume["status"];
        let node = status["node"].as_str().map(str::to_string);
        if status["shared"] == true {
            let holders = status["attachedTo"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h["uid"].as_str().map(str::to_string))
                .collect();
            return VolumePlace::Shared { node, holders };
        }
        match node {
            Some(node) => VolumePlace::Node(node),
            None => VolumePlace::Unplaced,
        }
    }
}

/// What the scheduler keeps of a VM: its identity, labels and spec (not its status).
#[derive(Clone, Debug)]
pub struct VmRecord {
    /// `{"metadata": {namespace, name, labels}, "spec": ...}`: what placement reads.
    pub object: Value,
    pub revision: Revision,
    pub created: Revision,
    pub node: Option<String>,
    pub deleting: bool,
    /// The message of its `Scheduled` condition, if it has one.
    pub scheduled_message: Option<String>,
    /// What it is counted as on its node.
    charged: Option<(String, u64, u128)>,
    /// The node it is migrating to (`status.migration.targetNode`): it needs room there too
    /// until it is bound there.
    pub incoming: Option<String>,
    /// What it is counted as on that node.
    charged_incoming: Option<(String, u64, u128)>,
}

impl VmRecord {
    pub fn namespace(&self) -> Option<&str> {
        self.object["metadata"]["namespace"].as_str()
    }

    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }
}

#[derive(Debug, Default)]
pub struct Cache {
    /// The last revision applied.
    pub revision: Revision,
    pub fleet: Fleet,
    pub placed: PlacedIndex,
    pub vms: HashMap<String, VmRecord>,
    pub classes: HashMap<String, Value>,
    pub policies: HashMap<(String, String), Value>,
    /// The node each volume lives on (None: not placed yet), by (project, name).
    pub volumes: HashMap<(String, String), VolumePlace>,
    /// Unbound VMs to place, oldest first: (create revision, key).
    pub queue: BTreeSet<(Revision, String)>,
    /// VMs that fit nowhere at their last try, back in the queue when the cluster changes.
    pub parked: BTreeSet<(Revision, String)>,
    /// Set when something changed that could make a parked VM fit.
    pub changed: bool,
    /// Bindings made by this scheduler, by VM key: the revision the watch will confirm.
    assumed: HashMap<String, Revision>,
}

fn quantity(v: &Value) -> u128 {
    match v {
        Value::String(s) => Quantity::parse(s).map(|q| q.value()).unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0) as u128,
        _ => 0,
    }
}

fn is_ready(node: &Value) -> bool {
    node["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

pub fn candidate(node: &Value) -> Candidate {
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

/// CPUs and memory a VM spec asks for (its own `resources`, else its VMClass's).
pub fn resources(spec: &Value, classes: &HashMap<String, Value>) -> Result<(u64, u128), String> {
    match (spec.get("resources"), spec["class"].as_str()) {
        (Some(r), _) => Ok((r["cpus"].as_u64().unwrap_or(0), quantity(&r["memory"]))),
        (None, Some(class)) => {
            let c = classes
                .get(class)
                .ok_or_else(|| format!("VMClass {class:?} does not exist"))?;
            Ok((
                c["spec"]["cpus"].as_u64().unwrap_or(0),
                quantity(&c["spec"]["memory"]),
            ))
        }
        (None, None) => Ok((0, 0)),
    }
}

fn name_in(key: &str, prefix: &str) -> String {
    key[prefix.len()..].to_string()
}

impl Cache {
    /// Applies one stored object (or its deletion, `value == None`) at `revision`.
    pub fn apply(&mut self, kv: &KeyValue, deleted: bool) {
        let value: Option<Value> = if deleted {
            None
        } else {
            serde_json::from_slice(&kv.value).ok()
        };
        let key = kv.key.as_str();
        if key.starts_with(VMS) {
            self.apply_vm(key, kv.create_revision, kv.mod_revision, value);
        } else if key.starts_with(NODES) {
            match value {
                Some(node) => self.fleet.upsert(candidate(&node)),
                None => self.fleet.remove(&name_in(key, NODES)),
            }
            self.changed = true;
        } else if key.starts_with(CLASSES) {
            let name = name_in(key, CLASSES);
            match value {
                Some(class) => self.classes.insert(name, class),
                None => self.classes.remove(&name),
            };
            self.recharge();
        } else if key.starts_with(VOLUMES) {
            if let Some((ns, name)) = name_in(key, VOLUMES).split_once('/') {
                let id = (ns.to_string(), name.to_string());
                let node = value.map(|v| VolumePlace::of(&v));
                // Only a volume placed (or gone) can change where a VM fits.
                let before = match &node {
                    Some(n) => self.volumes.insert(id, n.clone()),
                    None => self.volumes.remove(&id),
                };
                if before != node {
                    self.changed = true;
                }
            }
        } else if key.starts_with(POLICIES) {
            let rest = name_in(key, POLICIES);
            if let Some((ns, name)) = rest.split_once('/') {
                let id = (ns.to_string(), name.to_string());
                match value {
                    Some(p) => self.policies.insert(id, p),
                    None => self.policies.remove(&id),
                };
                self.changed = true;
            }
        }
        self.revision = self.revision.max(kv.mod_revision);
    }

    /// Applies a watch event; events older than a binding this scheduler made are stale.
    pub fn apply_event(&mut self, ev: &WatchEvent) {
        if let Some(bound_at) = self.assumed.get(&ev.kv.key) {
            if ev.kv.mod_revision < *bound_at {
                self.revision = self.revision.max(ev.kv.mod_revision);
                return;
            }
            self.assumed.remove(&ev.kv.key);
        }
        self.apply(&ev.kv, ev.kind == EventKind::Delete);
    }

    fn apply_vm(&mut self, key: &str, created: Revision, revision: Revision, value: Option<Value>) {
        self.forget(key);
        let Some(vm) = value else {
            self.changed = true;
            return;
        };
        let meta = &vm["metadata"];
        let scheduled_message = vm["status"]["conditions"].as_array().and_then(|cs| {
            cs.iter()
                .find(|c| c["type"] == "Scheduled")
                .and_then(|c| c["message"].as_str().map(str::to_string))
        });
        let record = VmRecord {
            object: json!({"metadata": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"], "labels": meta["labels"]}, "spec": vm["spec"]}),
            revision,
            created,
            node: vm["spec"]["nodeName"].as_str().map(str::to_string),
            deleting: meta.get("deletionTimestamp").is_some(),
            scheduled_message,
            charged: None,
            incoming: vm["status"]["migration"]["targetNode"]
                .as_str()
                .map(str::to_string),
            charged_incoming: None,
        };
        self.vms.insert(key.to_string(), record);
        self.settle(key);
    }

    /// Counts a VM where it is, or queues it when it is unbound.
    fn settle(&mut self, key: &str) {
        let Some(record) = self.vms.get_mut(key) else {
            return;
        };
        match record.node.clone() {
            Some(node) => {
                let (cpus, memory) =
                    resources(&record.object["spec"], &self.classes).unwrap_or((0, 0));
                self.fleet.charge(&node, cpus, memory, 1);
                record.charged = Some((node.clone(), cpus, memory));
                if let Some(target) = record.incoming.clone().filter(|t| *t != node) {
                    self.fleet.charge(&target, cpus, memory, 1);
                    record.charged_incoming = Some((target, cpus, memory));
                }
                let labels: BTreeMap<String, String> =
                    serde_json::from_value(record.object["metadata"]["labels"].clone())
                        .unwrap_or_default();
                let project = record.namespace().unwrap_or_default().to_string();
                self.placed.insert(
                    key,
                    Placed {
                        project,
                        labels,
                        node,
                    },
                );
                self.changed = true;
            }
            None if !record.deleting => {
                self.queue.insert((record.created, key.to_string()));
            }
            None => {}
        }
    }

    /// Takes a VM out of every count and queue; its record stays.
    fn uncount(&mut self, key: &str) {
        let Some(record) = self.vms.get_mut(key) else {
            return;
        };
        if let Some((node, cpus, memory)) = record.charged.take() {
            self.fleet.charge(&node, cpus, memory, -1);
        }
        if let Some((node, cpus, memory)) = record.charged_incoming.take() {
            self.fleet.charge(&node, cpus, memory, -1);
        }
        let id = (record.created, key.to_string());
        self.queue.remove(&id);
        self.parked.remove(&id);
        self.placed.remove(key);
    }

    /// Forgets a VM (before its newer version is applied, or when it is gone).
    fn forget(&mut self, key: &str) {
        self.uncount(key);
        self.vms.remove(key);
    }

    /// Recounts every VM (a VMClass changed, so what they use may have too).
    fn recharge(&mut self) {
        let keys: Vec<String> = self.vms.keys().cloned().collect();
        for key in keys {
            self.uncount(&key);
            self.settle(&key);
        }
        self.changed = true;
    }

    /// Counts a placement this scheduler is about to write.
    pub fn assume(&mut self, key: &str, node: &str) {
        self.uncount(key);
        if let Some(record) = self.vms.get_mut(key) {
            record.node = Some(node.to_string());
        }
        self.settle(key);
    }

    /// The binding was written at `revision`: ignore the VM's older events.
    pub fn confirm(&mut self, key: &str, revision: Revision) {
        self.assumed.insert(key.to_string(), revision);
    }

    /// The binding failed: the VM is unbound again (and queued when `requeue`).
    pub fn unassume(&mut self, key: &str, requeue: bool) {
        self.uncount(key);
        let Some(record) = self.vms.get_mut(key) else {
            return;
        };
        record.node = None;
        if requeue {
            self.queue.insert((record.created, key.to_string()));
        }
    }

    /// Moves a VM that fits nowhere out of the queue until the cluster changes.
    pub fn park(&mut self, key: &str) {
        if let Some(record) = self.vms.get(key) {
            let id = (record.created, key.to_string());
            self.queue.remove(&id);
            self.parked.insert(id);
        }
    }

    /// Takes a VM out of the queue until its next event (it changed under the scheduler).
    pub fn wait_for_event(&mut self, key: &str) {
        if let Some(record) = self.vms.get(key) {
            let id = (record.created, key.to_string());
            self.queue.remove(&id);
            self.parked.remove(&id);
        }
    }

    /// Parked VMs go back to the queue.
    pub fn unpark(&mut self) {
        let parked = std::mem::take(&mut self.parked);
        self.queue.extend(parked);
        self.changed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: Value, revision: Revision) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: serde_json::to_vec(&value).unwrap(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn a_migrating_vm_counts_on_its_target_until_it_is_bound_there() {
        let mut cache = Cache::default();
        for (i, node) in ["a", "b"].into_iter().enumerate() {
            let n = json!({"metadata": {"name": node}, "status": {
                "allocatable": {"cpus": 8, "memory": "8Gi"},
                "conditions": [{"type": "Ready", "status": "True"}]}});
            cache.apply(&kv(&format!("{NODES}{node}"), n, i as i64 + 1), false);
        }
        let vm = |node: &str, target: Option<&str>| {
            let mut v = json!({"metadata": {"namespace": "p", "name": "web"},
                "spec": {"nodeName": node, "resources": {"cpus": 2, "memory": "1Gi"}}});
            if let Some(t) = target {
                v["status"] = json!({"migration": {"name": "m", "targetNode": t}});
            }
            v
        };
        let key = format!("{VMS}p/web");
        cache.apply(&kv(&key, vm("a", None), 3), false);
        assert_eq!(
            (cache.fleet.used("a").cpus, cache.fleet.used("b").cpus),
            (2, 0)
        );
        cache.apply(&kv(&key, vm("a", Some("b")), 4), false);
        assert_eq!(
            (cache.fleet.used("a").cpus, cache.fleet.used("b").cpus),
            (2, 2)
        );
        cache.apply(&kv(&key, vm("b", None), 5), false);
        assert_eq!(
            (cache.fleet.used("a").cpus, cache.fleet.used("b").cpus),
            (0, 2)
        );
        cache.apply(&kv(&key, Value::Null, 6), true);
        assert_eq!(
            (cache.fleet.used("a").cpus, cache.fleet.used("b").cpus),
            (0, 0)
        );
    }
}
