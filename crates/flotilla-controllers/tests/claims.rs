//! Claims: bindings made at the same moment from the same view of a node can never over-commit
//! it. Several schedulers (as an old and a new leader would be) place the same pending VMs in
//! different orders, in parallel, against one store.

use std::sync::Arc;

use flotilla_controllers::placement::Strategy;
use flotilla_controllers::scheduler::Scheduler;
use flotilla_server::binding::Binding;
use flotilla_server::objects::{ListOptions, Objects, PatchBody};
use flotilla_server::Subresource;
use flotilla_store::{SqliteStore, Store};
use flotilla_types::registry::lookup;
use futures::{FutureExt, StreamExt};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

const NODES: usize = 10;
const NODE_CPUS: u64 = 4;
const VMS: usize = 60;

async fn fleet() -> (tempfile::TempDir, Objects) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("s.db")).await.unwrap());
    let objects = Objects::new(store);
    objects.ensure_default_project().await.unwrap();
    let (nodes, vms) = (lookup("node").unwrap(), lookup("vm").unwrap());
    for i in 0..NODES {
        let name = format!("node-{i}");
        objects
            .create(nodes, None, json!({"metadata": {"name": name}}))
            .await
            .unwrap();
        let status = json!({"status": {
            "capacity": {"cpus": NODE_CPUS, "memory": "64Gi"},
            "allocatable": {"cpus": NODE_CPUS, "memory": "64Gi"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        objects
            .patch(
                nodes,
                None,
                &name,
                PatchBody::Merge(status),
                Subresource::Status,
            )
            .await
            .unwrap();
    }
    for i in 0..VMS {
        let vm = json!({"metadata": {"name": format!("vm-{i:02}")}, "spec": {"resources": {"cpus": 1, "memory": "1Gi"}, "boot": {"kernel": "/k"}}});
        objects.create(vms, Some("default"), vm).await.unwrap();
    }
    (dir, objects)
}

fn bound_cpus(vms: &[Value]) -> std::collections::BTreeMap<String, u64> {
    let mut used = std::collections::BTreeMap::new();
    for vm in vms {
        if let Some(node) = vm["spec"]["nodeName"].as_str() {
            *used.entry(node.to_string()).or_default() +=
                vm["spec"]["resources"]["cpus"].as_u64().unwrap();
        }
    }
    used
}

/// The CPUs bound per node, as the store has them.
async fn bound(objects: &Objects) -> std::collections::BTreeMap<String, u64> {
    let list = objects
        .list(lookup("vm").unwrap(), None, &ListOptions::default())
        .await
        .unwrap();
    let vms: Vec<Value> = list
        .items
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    bound_cpus(&vms)
}

/// Whether every node's CPUs are all bound.
async fn full(objects: &Objects) -> bool {
    bound(objects).await.values().sum::<u64>() == NODES as u64 * NODE_CPUS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_schedulers_never_overcommit_a_node() {
    let (_dir, objects) = fleet().await;
    let mut tasks = Vec::new();
    for seed in 0..4u64 {
        let objects = objects.clone();
        tasks.push(tokio::spawn(async move {
            // Every scheduler starts from the same view: ten empty nodes, sixty pending VMs.
            let (mut scheduler, from) = Scheduler::load(objects.clone(), Strategy::Spread)
                .await
                .unwrap();
            let mut events = objects.store().watch("/registry/", from).await.unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            // Forty rounds, and more while the fleet is not full (a loaded machine runs fewer
            // passes in the same time), for at most 30 s.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            for round in 0.. {
                if round >= 40 && (full(&objects).await || std::time::Instant::now() > deadline) {
                    break;
                }
                while let Some(Some(Ok(ev))) = events.next().now_or_never() {
                    scheduler.apply(&ev).await;
                }
                scheduler.cache.unpark();
                let mut keys: Vec<String> = scheduler
                    .cache
                    .queue
                    .iter()
                    .map(|(_, k)| k.clone())
                    .collect();
                keys.shuffle(&mut rng);
                scheduler.place(&keys).await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            scheduler.claims_lost
        }));
    }
    let mut lost = 0;
    for t in tasks {
        lost += t.await.unwrap();
    }
    let used = bound(&objects).await;
    for (node, cpus) in &used {
        assert!(
            *cpus <= NODE_CPUS,
            "{node} is over-committed: {cpus} CPUs bound, {NODE_CPUS} allocatable"
        );
    }
    assert_eq!(
        used.values().sum::<u64>(),
        NODES as u64 * NODE_CPUS,
        "every CPU is used once: {used:?}"
    );
    assert!(
        lost > 0,
        "the schedulers raced for claims (else this test shows nothing)"
    );
}

#[tokio::test]
async fn the_second_of_two_bindings_from_one_view_loses_its_claim() {
    let (_dir, objects) = fleet().await;
    let vms = lookup("vm").unwrap();
    let rv = |name: &'static str| {
        let objects = objects.clone();
        async move {
            let kv = objects
                .store()
                .get(&format!("/registry/virtualmachines/default/{name}"))
                .await
                .unwrap()
                .unwrap();
            kv.mod_revision
        }
    };
    let (a, b) = (rv("vm-00").await, rv("vm-01").await);
    let status = json!({"phase": "Scheduled"});
    // Both saw node-0 unclaimed (claim revision 0).
    let first = objects
        .bind(
            vms,
            Some("default"),
            "vm-00",
            a,
            "node-0",
            status.clone(),
            0,
        )
        .await
        .unwrap();
    let Binding::Bound { revision } = first else {
        panic!("{first:?}")
    };
    let second = objects
        .bind(
            vms,
            Some("default"),
            "vm-01",
            b,
            "node-0",
            status.clone(),
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        second,
        Binding::ClaimLost {
            claim_revision: revision
        }
    );
    // With the claim's new revision it lands; a stale VM revision does not.
    let third = objects
        .bind(
            vms,
            Some("default"),
            "vm-01",
            b,
            "node-0",
            status.clone(),
            revision,
        )
        .await
        .unwrap();
    assert!(matches!(third, Binding::Bound { .. }), "{third:?}");
    let again = objects
        .bind(vms, Some("default"), "vm-00", a, "node-1", status, 0)
        .await
        .unwrap();
    assert_eq!(again, Binding::Changed, "a bound VM cannot be bound again");
    let bound = objects
        .get(vms, Some("default"), "vm-00")
        .await
        .unwrap()
        .to_value();
    assert_eq!(bound["spec"]["nodeName"], "node-0");
    assert_eq!(
        bound["metadata"]["finalizers"],
        json!(["flotilla.dev/agent"])
    );
    assert_eq!(bound["status"]["phase"], "Scheduled");
}

/// A scheduler writes its bindings to one node in order and stops at the first lost claim: the
/// VMs it had not tried yet must go back to its queue (not stay counted on the node, unplaced).
#[tokio::test]
async fn vms_behind_a_lost_claim_are_placed_again() {
    let (_dir, objects) = fleet().await;
    let vms = lookup("vm").unwrap();
    let bind = |name: &'static str, claim| {
        let objects = objects.clone();
        async move {
            let key = format!("/registry/virtualmachines/default/{name}");
            let kv = objects.store().get(&key).await.unwrap().unwrap();
            let status = json!({"phase": "Scheduled"});
            let bound = objects
                .bind(
                    vms,
                    Some("default"),
                    name,
                    kv.mod_revision,
                    "node-0",
                    status,
                    claim,
                )
                .await
                .unwrap();
            let Binding::Bound { revision } = bound else {
                panic!("{bound:?}")
            };
            revision
        }
    };
    // node-0 holds a VM when this scheduler starts: it knows the node's claim.
    let first = bind("vm-58", 0).await;
    let (mut scheduler, from) = Scheduler::load(objects.clone(), Strategy::Pack)
        .await
        .unwrap();
    let mut events = objects.store().watch("/registry/", from).await.unwrap();
    // Another scheduler binds vm-59 to node-0 behind its back.
    let other = bind("vm-59", first).await;
    // Packing puts both on node-0: the first loses the claim, the second is never tried.
    let keys: Vec<String> = ["vm-00", "vm-01"]
        .iter()
        .map(|n| format!("/registry/virtualmachines/default/{n}"))
        .collect();
    assert_eq!(scheduler.place(&keys).await, 0);
    assert_eq!(scheduler.claims_lost, 2, "both VMs lost the claim");
    // Once caught up, the queue places both.
    while scheduler.cache.revision < other {
        let ev = events.next().await.unwrap().unwrap();
        scheduler.apply(&ev).await;
    }
    let queued: Vec<String> = scheduler
        .cache
        .queue
        .iter()
        .map(|(_, k)| k.clone())
        .collect();
    for key in &keys {
        assert!(queued.contains(key), "{key} is queued again: {queued:?}");
    }
    scheduler.place(&queued).await;
    for name in ["vm-00", "vm-01"] {
        let vm = objects
            .get(vms, Some("default"), name)
            .await
            .unwrap()
            .to_value();
        assert!(vm["spec"]["nodeName"].is_string(), "{name} is bound: {vm}");
    }
}
