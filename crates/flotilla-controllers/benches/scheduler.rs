//! Scheduler-only benchmark (`make bench-scheduler`): 5,000 Ready nodes in 10 zones and 10,000
//! pending VMs with placement rules in a SQLite store (fsync on every commit), no agents. The
//! real scheduler loads its cache and places every VM; each placement is a real binding
//! transaction (claim compare-and-swap included).
//!
//! Prints one JSON line: placements/s end to end (decisions and binding writes), the time spent
//! deciding alone, and constraint violations found by reading the bindings back.
//! Sizes: FLOTILLA_BENCH_NODES (5000), FLOTILLA_BENCH_VMS (10000).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_controllers::placement::Strategy;
use flotilla_controllers::scheduler::Scheduler;
use flotilla_server::objects::{ListOptions, Objects, PatchBody};
use flotilla_server::Subresource;
use flotilla_store::{SqliteStore, Store};
use flotilla_types::registry::lookup;
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};

const ZONE: &str = "topology.flotilla.dev/zone";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The i-th VM: a fifth in anti-affinity groups of 5 (one per node), a tenth in trios spread
/// over zones, a tenth pinned to a zone, a tenth spread softly over zones by group.
fn vm(i: usize) -> Value {
    let mut spec = json!({"resources": {"cpus": 1 + i % 4, "memory": format!("{}Gi", 1 + i % 8)}, "boot": {"kernel": "/k"}});
    let mut labels = json!({"bench": "scheduler"});
    match i % 10 {
        0 | 1 => {
            let g = format!("aa-{}", i / 50);
            labels["group"] = json!(g);
            spec["affinity"] = json!({"vmAntiAffinity": {"required": [{"labelSelector": format!("group={g}"), "topologyKey": "flotilla.dev/node"}]}});
        }
        2 => {
            let g = format!("db-{}", i / 30);
            labels["db"] = json!(g);
            spec["affinity"] = json!({"vmAntiAffinity": {"required": [{"labelSelector": format!("db={g}"), "topologyKey": ZONE}]}});
        }
        3 => spec["nodeSelector"] = json!({ZONE: format!("zone-{}", i % 10)}),
        4 => {
            let g = format!("web-{}", i / 100);
            labels["web"] = json!(g);
            spec["affinity"] = json!({"topologySpread": [{"labelSelector": format!("web={g}"), "topologyKey": ZONE}]});
        }
        _ => {}
    }
    json!({"metadata": {"name": format!("vm-{i:05}"), "labels": labels}, "spec": spec})
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let nodes_n = env_usize("FLOTILLA_BENCH_NODES", 5000);
    let vms_n = env_usize("FLOTILLA_BENCH_VMS", 10_000);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("store.db"))
            .await
            .unwrap(),
    );
    let objects = Objects::new(store.clone());
    objects.ensure_default_project().await.unwrap();
    println!(
        "flotilla scheduler benchmark: {nodes_n} nodes, {vms_n} pending VMs; SQLite with fsync"
    );
    let (nodes, vms) = (lookup("node").unwrap(), lookup("vm").unwrap());
    let setup = Instant::now();
    let work: Vec<_> = (0..nodes_n)
        .map(|i| {
            let objects = objects.clone();
            async move {
                let name = format!("node-{i:04}");
                let node = json!({"metadata": {"name": name, "labels": {ZONE: format!("zone-{}", i % 10)}}});
                objects.create(nodes, None, node).await.unwrap();
                let status = json!({"status": {
                    "capacity": {"cpus": 32, "memory": "128Gi"}, "allocatable": {"cpus": 64, "memory": "128Gi"},
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                objects
                    .patch(nodes, None, &name, PatchBody::Merge(status), Subresource::Status)
                    .await
                    .unwrap();
            }
        })
        .collect();
    futures::stream::iter(work)
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let work: Vec<_> = (0..vms_n)
        .map(|i| {
            let objects = objects.clone();
            async move {
                objects.create(vms, Some("default"), vm(i)).await.unwrap();
            }
        })
        .collect();
    futures::stream::iter(work)
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    println!("set up in {:.1} s", setup.elapsed().as_secs_f64());

    let started = Instant::now();
    let (mut scheduler, from) = Scheduler::load(objects.clone(), Strategy::Spread)
        .await
        .unwrap();
    let loaded = started.elapsed();
    let mut events = store.watch("/registry/", from).await.unwrap();
    let mut bound = 0;
    while bound < vms_n && started.elapsed() < Duration::from_secs(600) {
        while let Some(Some(Ok(ev))) = events.next().now_or_never() {
            scheduler.apply(&ev).await;
        }
        if scheduler.cache.queue.is_empty() {
            scheduler.cache.unpark();
            if scheduler.cache.queue.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        }
        bound += scheduler.place_batch().await;
    }
    let deciding = scheduler.deciding();
    let wall = started.elapsed();

    let list = objects
        .list(vms, None, &ListOptions::default())
        .await
        .unwrap();
    let placed: Vec<Value> = list
        .items
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    let violations = check(&placed);
    println!(
        "{}",
        json!({
            "benchmark": "scheduler",
            "nodes": nodes_n,
            "vms": vms_n,
            "bound": bound,
            "load_ms": (loaded.as_secs_f64() * 1000.0).round(),
            "wall_s": (wall.as_secs_f64() * 10.0).round() / 10.0,
            "placements_per_s": (bound as f64 / wall.as_secs_f64()).round(),
            "decisions_per_s": (bound as f64 / deciding.as_secs_f64()).round(),
            "claims_lost": scheduler.claims_lost,
            "violations": violations,
        })
    );
    assert_eq!(violations, 0, "placements broke constraints");
    assert_eq!(bound, vms_n, "every VM placed");
}

/// Over-committed nodes and broken required anti-affinity, from the stored bindings.
fn check(vms: &[Value]) -> usize {
    let mut problems = 0;
    let mut cpus: HashMap<&str, u64> = HashMap::new();
    let mut groups: HashMap<(String, String), usize> = HashMap::new();
    for vm in vms {
        let Some(node) = vm["spec"]["nodeName"].as_str() else {
            problems += 1;
            continue;
        };
        *cpus.entry(node).or_default() += vm["spec"]["resources"]["cpus"].as_u64().unwrap();
        if let Some(g) = vm["metadata"]["labels"]["group"].as_str() {
            *groups.entry((g.to_string(), node.to_string())).or_default() += 1;
        }
    }
    problems += cpus.values().filter(|c| **c > 64).count();
    problems += groups.values().filter(|n| **n > 1).count();
    problems
}
