//! IPAM benchmark (`make bench-ipam`): VM creates through the object API on a SQLite store
//! (fsync on every commit), 32 in flight, first without NICs, then each with a NIC on one /16
//! overlay network (its address taken by compare-and-swap on the network's record in the
//! create's transaction). Prints one JSON line: creates/s both ways, allocations/s, and the
//! number of addresses handed out twice (must be 0).
//! Size: FLOTILLA_BENCH_VMS (2000).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use flotilla_server::objects::Objects;
use flotilla_store::{SqliteStore, Store};
use flotilla_types::registry::lookup;
use futures::StreamExt;
use serde_json::{json, Value};

async fn create_all(objects: &Objects, prefix: &str, n: usize, nic: bool) -> (f64, Vec<Value>) {
    let vms = lookup("vm").unwrap();
    let started = Instant::now();
    let made: Vec<Value> = futures::stream::iter(0..n)
        .map(|i| {
            let mut vm = json!({"metadata": {"name": format!("{prefix}-{i}")}, "spec": {
                "resources": {"cpus": 1, "memory": "64Mi"}, "boot": {"kernel": "/k"}}});
            if nic {
                vm["spec"]["networks"] = json!([{"network": "bench"}]);
            }
            let objects = objects.clone();
            async move {
                let stored = objects
                    .create(vms, Some("default"), vm)
                    .await
                    .expect("create");
                serde_json::from_slice::<Value>(&stored.to_bytes()).unwrap()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    (n as f64 / started.elapsed().as_secs_f64(), made)
}

fn main() {
    let n: usize = std::env::var("FLOTILLA_BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(dir.path().join("store.db"))
                .await
                .unwrap(),
        );
        let objects = Objects::new(store);
        objects.ensure_default_project().await.unwrap();
        let net = json!({"metadata": {"name": "bench"}, "spec": {"cidr": "10.64.0.0/16"}});
        objects
            .create(lookup("network").unwrap(), Some("default"), net)
            .await
            .unwrap();
        let (plain, _) = create_all(&objects, "plain", n, false).await;
        let (with_nic, made) = create_all(&objects, "nic", n, true).await;
        let ips: HashSet<String> = made
            .iter()
            .map(|v| v["status"]["ips"][0].as_str().unwrap().to_string())
            .collect();
        println!(
            "{}",
            json!({
                "vms": n, "in_flight": 32,
                "creates_per_s_without_nic": plain.round(),
                "creates_per_s_with_nic": with_nic.round(),
                "allocations_per_s": with_nic.round(),
                "addresses_handed_out_twice": n - ips.len(),
            })
        );
    });
}
