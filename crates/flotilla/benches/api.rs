//! API benchmark (`make bench-api`): a real server (TLS, auth, SQLite with fsync) on loopback,
//! driven by the real client in the same process (both share this machine's cores).
//!
//! Measures: create throughput (writes/s), GET latency under concurrent load, LIST of 10,000 VMs,
//! and watch fan-out latency to 100 watchers. Prints a summary line of JSON at the end.
//! Sizes can be changed with FLOTILLA_BENCH_VMS, FLOTILLA_BENCH_WATCHERS.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_usize, percentile};
use flotilla_client::{Client, ListParams};
use flotilla_types::registry::lookup;
use futures::StreamExt;
use reqwest::Method;
use serde_json::json;

fn vm(i: usize) -> serde_json::Value {
    json!({
        "apiVersion": "flotilla.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": format!("vm-{i:05}"), "labels": {"app": format!("app-{}", i % 50), "tier": "web"}},
        "spec": {"resources": {"cpus": 2, "memory": "4Gi"}, "image": "debian-12", "rootDisk": {"size": "20Gi"},
                 "networks": [{"network": "lan"}], "sshAuthorizedKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBench bench@flotilla"],
                 "nodeSelector": {"zone": format!("z{}", i % 3)}}
    })
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let vms_n = env_usize("FLOTILLA_BENCH_VMS", 10_000);
    let watchers_n = env_usize("FLOTILLA_BENCH_WATCHERS", 100);
    let dir = tempfile::tempdir().unwrap();
    let mut config = flotilla_server::ServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = flotilla_server::start(config).await.unwrap();
    let client = Arc::new(
        Client::new(
            vec![server.url.clone()],
            Some(&server.ca_pem),
            Some(server.admin_token.clone()),
        )
        .unwrap(),
    );
    let vms = lookup("vm").unwrap();
    println!("flotilla API benchmark: {vms_n} VMs, {watchers_n} watchers, SQLite with fsync, TLS on loopback");

    // 1. Writes: create every VM with 32 requests in flight.
    let started = Instant::now();
    let concurrency = 32;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= vms_n {
                    return;
                }
                client.create(vms, Some("default"), &vm(i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let write_secs = started.elapsed().as_secs_f64();
    let writes_per_sec = vms_n as f64 / write_secs;
    println!(
        "create: {vms_n} VMs in {write_secs:.2} s = {writes_per_sec:.0} writes/s (32 in flight)"
    );

    // 2. GET latency with 16 concurrent clients.
    let (readers, per_reader) = (16, 1000);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for r in 0..readers {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_reader);
            for j in 0..per_reader {
                let i = (r * 7919 + j * 104_729) % vms_n;
                let path =
                    flotilla_client::path(vms, Some("default"), Some(&format!("vm-{i:05}")), false);
                let t = Instant::now();
                let resp = client.send(Method::GET, &path, &[], None).await.unwrap();
                resp.bytes().await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut get_lat = Vec::new();
    for t in tasks {
        get_lat.extend(t.await.unwrap());
    }
    let gets_per_sec = get_lat.len() as f64 / started.elapsed().as_secs_f64();
    get_lat.sort();
    let (get_p50, get_p99) = (percentile(&get_lat, 0.5), percentile(&get_lat, 0.99));
    println!("get: {} requests, {readers} concurrent: p50 {get_p50:.2} ms, p99 {get_p99:.2} ms, {gets_per_sec:.0} req/s", get_lat.len());

    // 3. LIST of every VM (server time plus transfer; the body is not parsed).
    let list_path = flotilla_client::path(vms, Some("default"), None, false);
    let mut list_lat = Vec::new();
    let mut bytes = 0;
    for _ in 0..10 {
        let t = Instant::now();
        let resp = client
            .send(Method::GET, &list_path, &[], None)
            .await
            .unwrap();
        bytes = resp.bytes().await.unwrap().len();
        list_lat.push(t.elapsed());
    }
    list_lat.sort();
    let (list_p50, list_max) = (percentile(&list_lat, 0.5), percentile(&list_lat, 1.0));
    let check = client
        .list(vms, Some("default"), &ListParams::default())
        .await
        .unwrap();
    assert_eq!(check["items"].as_array().unwrap().len(), vms_n);
    let sel = Instant::now();
    let selected = client
        .list(
            vms,
            Some("default"),
            &ListParams {
                label_selector: Some("app=app-7".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let list_selector_ms = sel.elapsed().as_secs_f64() * 1000.0;
    println!(
        "list: {vms_n} VMs ({:.1} MiB) p50 {list_p50:.1} ms, max {list_max:.1} ms; with a label selector ({} matches) {list_selector_ms:.1} ms",
        bytes as f64 / 1048576.0,
        selected["items"].as_array().unwrap().len()
    );

    // 4. Watch fan-out: every write must reach every watcher; latency from the write's start.
    let rv = check["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    for _ in 0..watchers_n {
        let mut stream = Box::pin(
            client
                .watch(vms, Some("default"), &ListParams::default(), Some(&rv))
                .await
                .unwrap(),
        );
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                if ev.type_ == "MODIFIED" {
                    let _ = tx.send((
                        ev.object["metadata"]["name"].as_str().unwrap().to_string(),
                        Instant::now(),
                    ));
                }
            }
        });
    }
    drop(tx);
    let writes = 100;
    let mut sent = std::collections::HashMap::new();
    let mut fanout_lat = Vec::new();
    let fan_started = Instant::now();
    for i in 0..writes {
        let name = format!("vm-{i:05}");
        sent.insert(name.clone(), Instant::now());
        client
            .patch(
                vms,
                Some("default"),
                &name,
                &json!({"metadata": {"labels": {"touched": "yes"}}}),
                false,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expected = writes * watchers_n;
    while fanout_lat.len() < expected {
        let (name, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("every watcher gets every event")
            .unwrap();
        fanout_lat.push(at - sent[&name]);
    }
    let fan_secs = fan_started.elapsed().as_secs_f64();
    fanout_lat.sort();
    let (fan_p50, fan_p99) = (percentile(&fanout_lat, 0.5), percentile(&fanout_lat, 0.99));
    println!(
        "watch fan-out: {writes} writes x {watchers_n} watchers = {expected} events delivered in {fan_secs:.1} s; write-to-delivery p50 {fan_p50:.2} ms, p99 {fan_p99:.2} ms"
    );

    let summary = json!({
        "vms": vms_n, "writes_per_sec": writes_per_sec.round(),
        "get_p50_ms": (get_p50 * 100.0).round() / 100.0, "get_p99_ms": (get_p99 * 100.0).round() / 100.0,
        "get_per_sec": gets_per_sec.round(),
        "list_10k_p50_ms": (list_p50 * 10.0).round() / 10.0, "list_10k_max_ms": (list_max * 10.0).round() / 10.0,
        "list_bytes": bytes, "list_selector_ms": (list_selector_ms * 10.0).round() / 10.0,
        "watchers": watchers_n, "fanout_events": expected,
        "fanout_p50_ms": (fan_p50 * 100.0).round() / 100.0, "fanout_p99_ms": (fan_p99 * 100.0).round() / 100.0,
    });
    println!("{summary}");
    server.shutdown().await;
}
