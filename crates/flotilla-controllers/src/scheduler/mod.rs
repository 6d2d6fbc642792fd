//! The scheduling controller: binds VMs without `spec.nodeName` to a node chosen by the
//! [`crate::placement`] engine (readiness, cordon, CPU and memory against allocatable,
//! `nodeSelector`, VM affinity, anti-affinity and topology spread from `spec.affinity` and the
//! VM's PlacementPolicy; spread or pack), and otherwise says why in the `Scheduled` condition,
//! e.g. `0/12 nodes are available: 5 insufficient memory, 7 not ready`.
//!
//! It works from a [`cache::Cache`] fed by one watch, places the queue in batches in memory
//! (each placement counted at once), then writes the bindings concurrently, one transaction each
//! ([`Objects::bind`]): the VM must be unchanged and the node's claim key at the revision this
//! scheduler last saw, so that two schedulers (an old leader and a new one) never over-commit a
//! node between them. Bindings to one node are written one after another; a lost claim puts the
//! VM back in the queue once the cache has caught up with the winner's write. VMs that fit
//! nowhere are parked and tried again when nodes, VMs, classes or policies change.

pub mod cache;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cache::VolumePlace;

use flotilla_server::binding::{claim_key, Binding, CLAIMS_PREFIX};
use flotilla_server::objects::{Objects, PatchBody};
use flotilla_server::Subresource;
use flotilla_store::{RangeRequest, Revision, StoreError, WatchStream};
use flotilla_types::meta::now;
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::selector::LabelSelector;
use flotilla_types::{EventType, ObjectReference};
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};

use crate::placement::{self, Request, Rules, Spread, Term};
use cache::Cache;

/// How many VMs one batch places before writing their bindings.
const BATCH: usize = 512;
/// Bindings (to different nodes) written at once.
const IN_FLIGHT: usize = 32;
/// Parked VMs are tried again at most this often while the cluster keeps changing.
const RETRY_PARKED: Duration = Duration::from_millis(500);

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
    for s in affinity["topologySpread"].as_array().into_iter().flatten() {
        if let Some(term) = term(s) {
            let max_skew = s["maxSkew"].as_u64().map(|n| n as u32);
            rules.spread.push(Spread { term, max_skew });
        }
    }
}

/// The node a VM's volumes pin it to (volumes in node-local pools live on one node; a shared
/// volume pins only while other VMs hold it, to their node); Err when one is missing or not
/// placed yet, or two live on different nodes.
fn volume_node(
    vm: &Value,
    project: &str,
    volumes: &HashMap<(String, String), VolumePlace>,
) -> Result<Option<String>, String> {
    let uid = vm["metadata"]["uid"].as_str().unwrap_or_default();
    let mut pinned: Option<(String, &str)> = None;
    for disk in vm["spec"]["disks"].as_array().into_iter().flatten() {
        let name = disk["volume"].as_str().unwrap_or_default();
        let node = match volumes.get(&(project.to_string(), name.to_string())) {
            None => return Err(format!("volume {name:?} does not exist")),
            Some(VolumePlace::Unplaced) => {
                return Err(format!("volume {name:?} is not placed on a node yet"))
            }
            Some(VolumePlace::Node(node)) => node,
            Some(VolumePlace::Shared { node, holders }) => {
                match node.as_ref().filter(|_| holders.iter().any(|h| h != uid)) {
                    Some(node) => node,
                    None => continue,
                }
            }
        };
        match &pinned {
            Some((other, by)) if other != node => {
                return Err(format!(
                    "volumes {by:?} and {name:?} live on different nodes ({other}, {node})"
                ))
            }
            Some(_) => {}
            None => pinned = Some((node.clone(), name)),
        }
    }
    Ok(pinned.map(|(node, _)| node))
}

/// What a VM asks for, resolving its VMClass, PlacementPolicy and volumes; Err says what is
/// missing.
fn request(
    vm: &Value,
    classes: &HashMap<String, Value>,
    policies: &HashMap<(String, String), Value>,
    volumes: &HashMap<(String, String), VolumePlace>,
) -> Result<Request, String> {
    let spec = &vm["spec"];
    let (cpus, memory) = cache::resources(spec, classes)?;
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
    let node = volume_node(vm, &project, volumes)?;
    Ok(Request {
        cpus,
        memory,
        node,
        node_selector,
        project,
        labels,
        rules,
        strategy: placement::Strategy::default(),
    })
}

/// The outcome of one placement attempt, applied to the cache after the batch's writes.
enum Outcome {
    Bound(Revision),
    Changed,
    ClaimLost(Revision),
    Failed,
}

/// A node's claim revision, and whether this scheduler's own binding wrote it.
#[derive(Clone, Copy, Debug)]
struct Claim {
    revision: Revision,
    ours: bool,
}

/// What the writes to one node came to: the node, its claim afterwards (None: unknown) and
/// each VM's outcome.
type NodeWrites = (String, Option<Claim>, Vec<(String, Outcome)>);

pub struct Scheduler {
    objects: Objects,
    /// Records Scheduled and FailedScheduling events.
    recorder: crate::events::Recorder,
    strategy: placement::Strategy,
    pub cache: Cache,
    /// The claim revision of each node as this scheduler last saw it, and whether this scheduler
    /// wrote it (then every binding up to it is in the cache, assumed if not yet seen).
    claims: HashMap<String, Claim>,
    /// Do not place before the cache has seen this revision (a claim was lost to a later write).
    catch_up_to: Revision,
    kind: &'static KindInfo,
    /// Bindings that lost their node's claim to another writer (a measure of contention).
    pub claims_lost: usize,
    /// Time spent deciding placements (not writing them).
    deciding: Duration,
    /// Bindings of the last batch that failed for another reason than a conflict.
    failed_writes: usize,
}

impl Scheduler {
    /// Loads the cache from one consistent read of the store; returns it with the revision to
    /// watch from.
    pub async fn load(
        objects: Objects,
        strategy: placement::Strategy,
    ) -> Result<(Self, Revision), StoreError> {
        let store = objects.store().clone();
        let revision = store.current_revision().await?;
        let mut cache = Cache::default();
        // Classes and policies first: VMs are counted with their class's resources.
        for prefix in [
            cache::CLASSES,
            cache::POLICIES,
            cache::VOLUMES,
            cache::NODES,
            cache::VMS,
        ] {
            let resp = store
                .range(RangeRequest::prefix(prefix).at_revision(revision))
                .await?;
            for kv in &resp.kvs {
                cache.apply(kv, false);
            }
        }
        cache.revision = revision;
        let mut claims = HashMap::new();
        let resp = store
            .range(RangeRequest::prefix(CLAIMS_PREFIX).at_revision(revision))
            .await?;
        for kv in resp.kvs {
            let node = kv.key[CLAIMS_PREFIX.len()..].to_string();
            if cache.fleet.get(&node).is_none() {
                // The node is gone: so is its claim.
                let _ = store.delete(&kv.key).await;
            } else {
                let claim = Claim {
                    revision: kv.mod_revision,
                    ours: false,
                };
                claims.insert(node, claim);
            }
        }
        let scheduler = Scheduler {
            recorder: crate::events::Recorder::new(objects.clone()),
            objects,
            strategy,
            cache,
            claims,
            catch_up_to: 0,
            kind: registry::by_kind("VirtualMachine").expect("registered"),
            claims_lost: 0,
            deciding: Duration::ZERO,
            failed_writes: 0,
        };
        Ok((scheduler, revision + 1))
    }

    /// Applies a watch event to the cache; a deleted node's claim key goes too.
    pub async fn apply(&mut self, ev: &flotilla_store::WatchEvent) {
        self.cache.apply_event(ev);
        if ev.kind == flotilla_store::EventKind::Delete && ev.kv.key.starts_with(cache::NODES) {
            let node = &ev.kv.key[cache::NODES.len()..];
            self.claims.remove(node);
            let _ = self.objects.store().delete(&claim_key(node)).await;
        }
    }

    /// A node to move the placed VM `key` to: any but its own (with the same rules as a first
    /// placement), or `only`, if it fits there. The choice is counted at once (for the next
    /// call in the same pass); Err says why there is none.
    pub fn target_for(&mut self, key: &str, only: Option<&str>) -> Result<String, String> {
        let record = self.cache.vms.get(key).ok_or("the VM is not known")?;
        let source = record
            .node
            .clone()
            .ok_or("the VM is not placed on a node")?;
        let cache = &self.cache;
        let mut req = request(
            &record.object,
            &cache.classes,
            &cache.policies,
            &cache.volumes,
        )?;
        if let Some(pinned) = req.node.take() {
            return Err(format!(
                "its volumes live in a pool of node {pinned} only; detach them or move them to a shared pool"
            ));
        }
        if only == Some(source.as_str()) {
            return Err(format!("the VM is on {source} already"));
        }
        req.node = only.map(str::to_string);
        req.strategy = self.strategy;
        let mut fleet = self.cache.fleet.clone();
        if let Some(mut node) = fleet.get(&source).cloned() {
            node.schedulable = false;
            fleet.upsert(node);
        }
        let node = placement::place(&req, &fleet, &self.cache.placed).map_err(|why| {
            let why = why.to_string();
            match only {
                Some(target) => format!("it does not fit on {target}: {why}"),
                None => why,
            }
        })?;
        // Counted on the target too while it moves (the source keeps it until then).
        self.cache.fleet.charge(&node, req.cpus, req.memory, 1);
        Ok(node)
    }

    /// Whether the queue can be worked on now.
    pub fn ready_to_place(&self) -> bool {
        !self.cache.queue.is_empty() && self.cache.revision >= self.catch_up_to
    }

    /// Places up to [`BATCH`] queued VMs and writes the results; returns how many were bound.
    pub async fn place_batch(&mut self) -> usize {
        let keys: Vec<String> = self
            .cache
            .queue
            .iter()
            .take(BATCH)
            .map(|(_, k)| k.clone())
            .collect();
        self.place(&keys).await
    }

    /// Time spent deciding placements so far (not writing them).
    pub fn deciding(&self) -> Duration {
        self.deciding
    }

    /// Places the given VMs (in this order), then writes bindings and conditions.
    pub async fn place(&mut self, keys: &[String]) -> usize {
        // 1. Decide, counting each placement at once.
        let deciding = Instant::now();
        let mut per_node: HashMap<String, Vec<(String, Revision)>> = HashMap::new();
        let mut unschedulable: Vec<(String, String)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if i % 64 == 63 {
                tokio::task::yield_now().await;
            }
            let Some(record) = self.cache.vms.get(key) else {
                continue;
            };
            if record.node.is_some() || record.deleting {
                continue;
            }
            let cache = &self.cache;
            let decision = request(
                &record.object,
                &cache.classes,
                &cache.policies,
                &cache.volumes,
            )
            .and_then(|r| {
                let req = Request {
                    strategy: self.strategy,
                    ..r
                };
                placement::place(&req, &self.cache.fleet, &self.cache.placed)
                    .map_err(|why| why.to_string())
            });
            match decision {
                Ok(node) => {
                    let revision = record.revision;
                    self.cache.assume(key, &node);
                    per_node
                        .entry(node)
                        .or_default()
                        .push((key.clone(), revision));
                }
                Err(message) => {
                    self.cache.park(key);
                    unschedulable.push((key.clone(), message));
                }
            }
        }

        self.deciding += deciding.elapsed();

        // 2. Write: one task per node, its bindings in order; nodes in parallel.
        let view = self.cache.revision;
        let mut writes = Vec::new();
        for (node, vms) in per_node {
            let claim = self.claims.get(&node).copied();
            writes.push(self.bind_all(node, claim, view, vms));
        }
        let results: Vec<NodeWrites> = futures::stream::iter(writes)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut marks = Vec::with_capacity(unschedulable.len());
        for (key, message) in &unschedulable {
            marks.push(self.mark_unschedulable(key, message));
        }
        futures::stream::iter(marks)
            .buffer_unordered(IN_FLIGHT)
            .collect::<Vec<()>>()
            .await;

        // 3. Learn from the results.
        let mut bound = 0;
        self.failed_writes = 0;
        for (node, claim, outcomes) in results {
            if let Some(c) = claim {
                self.claims.insert(node.clone(), c);
            }
            for (key, outcome) in outcomes {
                match outcome {
                    Outcome::Bound(revision) => {
                        self.cache.confirm(&key, revision);
                        bound += 1;
                    }
                    Outcome::Changed => {
                        self.cache.unassume(&key, false);
                        self.cache.wait_for_event(&key);
                    }
                    Outcome::ClaimLost(revision) => {
                        tracing::debug!(vm = %key, node = %node, "claim lost; placing again");
                        self.claims_lost += 1;
                        self.cache.unassume(&key, true);
                        self.catch_up_to = self.catch_up_to.max(revision);
                    }
                    Outcome::Failed => {
                        self.failed_writes += 1;
                        self.cache.unassume(&key, true);
                    }
                }
            }
        }
        bound
    }

    /// Writes the bindings of `vms` to `node` one after another; stops at the first lost claim.
    ///
    /// The decisions were made from the cache at revision `view`. A claim revision is safe to
    /// compare against only if every binding up to it is counted in that view: it is no later
    /// than `view`, or this scheduler wrote it. Otherwise someone bound VMs to the node that the
    /// decisions did not count, and the VMs wait until the cache has caught up.
    fn bind_all(
        &self,
        node: String,
        claim: Option<Claim>,
        view: Revision,
        vms: Vec<(String, Revision)>,
    ) -> impl std::future::Future<Output = NodeWrites> + 'static {
        let (objects, kind) = (self.objects.clone(), self.kind);
        let uids: HashMap<String, Option<String>> = vms
            .iter()
            .map(|(key, _)| {
                let uid = self
                    .cache
                    .vms
                    .get(key)
                    .and_then(|r| r.object["metadata"]["uid"].as_str().map(str::to_string));
                (key.clone(), uid)
            })
            .collect();
        let recorder = self.recorder.clone();
        async move {
            let mut claim = match claim {
                Some(c) => Some(c),
                None => match objects.store().get(&claim_key(&node)).await {
                    Ok(kv) => Some(Claim {
                        revision: kv.map_or(0, |kv| kv.mod_revision),
                        ours: false,
                    }),
                    Err(_) => None,
                },
            };
            if let Some(c) = claim.filter(|c| !c.ours && c.revision > view) {
                let outcomes = vms
                    .into_iter()
                    .map(|(key, _)| (key, Outcome::ClaimLost(c.revision)))
                    .collect();
                return (node, claim, outcomes);
            }
            let mut outcomes = Vec::with_capacity(vms.len());
            let mut vms = vms.into_iter();
            for (key, revision) in vms.by_ref() {
                let Some(c) = claim.map(|c| c.revision) else {
                    outcomes.push((key, Outcome::Failed));
                    continue;
                };
                let (ns, name) = split_key(&key);
                let status = json!({"phase": "Scheduled", "nodeName": node, "conditions": [
                    {"type": "Scheduled", "status": "True", "reason": "Scheduled", "message": format!("placed on {node}"), "lastTransitionTime": now()}]});
                let outcome = match objects
                    .bind(kind, ns, name, revision, &node, status, c)
                    .await
                {
                    Ok(Binding::Bound { revision }) => {
                        claim = Some(Claim {
                            revision,
                            ours: true,
                        });
                        // Best effort, beside the bindings rather than between them.
                        let regarding = vm_reference(ns, name, uids.get(&key).cloned().flatten());
                        let (recorder, message) = (
                            recorder.clone(),
                            format!("Successfully assigned {key} to {node}"),
                        );
                        tokio::spawn(async move {
                            recorder
                                .record(&regarding, EventType::Normal, "Scheduled", &message)
                                .await
                        });
                        Outcome::Bound(revision)
                    }
                    Ok(Binding::Changed) => Outcome::Changed,
                    Ok(Binding::ClaimLost { claim_revision }) => {
                        claim = Some(Claim {
                            revision: claim_revision,
                            ours: false,
                        });
                        Outcome::ClaimLost(claim_revision)
                    }
                    Err(e) => {
                        tracing::warn!(vm = name, node = %node, error = %e, "could not bind");
                        claim = None;
                        Outcome::Failed
                    }
                };
                let lost = matches!(outcome, Outcome::ClaimLost(_));
                outcomes.push((key, outcome));
                if lost {
                    break;
                }
            }
            // VMs after a lost claim were not tried: they lost it too, and go back to the queue
            // (left out, they would stay counted on the node and never be placed again).
            if let Some(c) = claim {
                outcomes.extend(vms.map(|(key, _)| (key, Outcome::ClaimLost(c.revision))));
            }
            (node, claim, outcomes)
        }
    }

    /// Says why a VM fits nowhere, unless its condition already says so; guarded by its
    /// resourceVersion so that it never overwrites a binding made meanwhile.
    fn mark_unschedulable(
        &self,
        key: &str,
        message: &str,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let record = self.cache.vms.get(key);
        let current = record.and_then(|r| r.scheduled_message.clone());
        let revision = record.map_or(0, |r| r.revision);
        let uid = record.and_then(|r| r.object["metadata"]["uid"].as_str().map(str::to_string));
        let recorder = self.recorder.clone();
        let (objects, kind, key, message) = (
            self.objects.clone(),
            self.kind,
            key.to_string(),
            message.to_string(),
        );
        async move {
            if current.as_deref() == Some(message.as_str()) || revision == 0 {
                return;
            }
            let (ns, name) = split_key(&key);
            let status = json!({"metadata": {"resourceVersion": revision.to_string()}, "status": {"phase": "Pending", "conditions": [
                {"type": "Scheduled", "status": "False", "reason": "Unschedulable", "message": message, "lastTransitionTime": now()}]}});
            let written = objects
                .patch(
                    kind,
                    ns,
                    name,
                    PatchBody::Merge(status),
                    Subresource::Status,
                )
                .await;
            if written.is_ok() {
                recorder
                    .record(
                        &vm_reference(ns, name, uid),
                        EventType::Warning,
                        "FailedScheduling",
                        &message,
                    )
                    .await;
            }
        }
    }

    /// Runs until the watch ends (compaction, store failure); the caller loads a fresh cache.
    async fn serve(&mut self, mut events: WatchStream, resync: Duration) {
        let mut last_unpark = Instant::now();
        loop {
            // Everything that has arrived, in one go.
            while let Some(item) = events.next().now_or_never() {
                match item {
                    Some(Ok(ev)) => self.apply(&ev).await,
                    _ => return,
                }
            }
            if self.cache.changed && last_unpark.elapsed() >= RETRY_PARKED {
                self.cache.unpark();
                last_unpark = Instant::now();
            }
            if self.ready_to_place() {
                let bound = self.place_batch().await;
                if bound == 0 && self.failed_writes > 0 {
                    // The store refused every write: do not hammer it.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                continue;
            }
            let wait = if self.cache.changed && !self.cache.parked.is_empty() {
                RETRY_PARKED.saturating_sub(last_unpark.elapsed())
            } else {
                resync
            };
            match tokio::time::timeout(wait, events.next()).await {
                Ok(Some(Ok(ev))) => self.apply(&ev).await,
                Ok(_) => return,
                Err(_) if wait == resync => {
                    // Quiet for a while: try the parked ones again anyway.
                    self.cache.unpark();
                    last_unpark = Instant::now();
                }
                Err(_) => {}
            }
        }
    }
}

fn split_key(key: &str) -> (Option<&str>, &str) {
    let rest = &key[cache::VMS.len()..];
    match rest.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, rest),
    }
}

/// A reference to a VM, for the events about it.
fn vm_reference(ns: Option<&str>, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        kind: "VirtualMachine".into(),
        api_version: Some(flotilla_types::API_VERSION.into()),
        namespace: ns.map(str::to_string),
        name: name.to_string(),
        uid,
        ..Default::default()
    }
}

pub async fn run(objects: Objects, resync: Duration, strategy: placement::Strategy) {
    loop {
        let loaded = match Scheduler::load(objects.clone(), strategy).await {
            Ok((scheduler, from)) => objects
                .store()
                .watch("/registry/", from)
                .await
                .map(|events| (scheduler, events)),
            Err(e) => Err(e),
        };
        match loaded {
            Ok((mut scheduler, events)) => scheduler.serve(events, resync).await,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler could not load the cluster; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(uid: &str, volumes: &[&str]) -> Value {
        let disks: Vec<Value> = volumes
            .iter()
            .map(|v| json!({"name": v, "volume": v}))
            .collect();
        json!({"metadata": {"uid": uid}, "spec": {"disks": disks}})
    }

    fn place(volume: &str, status: Value) -> ((String, String), VolumePlace) {
        let id = ("p".to_string(), volume.to_string());
        (id, VolumePlace::of(&json!({ "status": status })))
    }

    #[test]
    fn node_local_volumes_pin_and_shared_ones_only_while_another_vm_holds_them() {
        let volumes: HashMap<_, _> = [
            place("local", json!({"node": "a"})),
            place("unplaced", json!({})),
            place("free", json!({"node": "b", "shared": true})),
            place(
                "mine",
                json!({"node": "b", "shared": true, "attachedTo": [{"vm": "v", "uid": "u1"}]}),
            ),
            place(
                "theirs",
                json!({"node": "c", "shared": true, "attachedTo": [{"vm": "w", "uid": "u2"}]}),
            ),
        ]
        .into_iter()
        .collect();
        let pin = |uid: &str, names: &[&str]| volume_node(&vm(uid, names), "p", &volumes);
        assert_eq!(pin("u1", &["local"]), Ok(Some("a".into())));
        assert!(pin("u1", &["unplaced"]).unwrap_err().contains("not placed"));
        // A shared volume goes where its VM goes, also when only this VM holds it...
        assert_eq!(pin("u1", &["free"]), Ok(None));
        assert_eq!(pin("u1", &["mine", "local"]), Ok(Some("a".into())));
        // ...but while another VM holds it (shareable), its VMs share that VM's node.
        assert_eq!(pin("u1", &["theirs"]), Ok(Some("c".into())));
        let split = pin("u1", &["theirs", "local"]).unwrap_err();
        assert!(split.contains("different nodes"), "{split}");
    }
}
