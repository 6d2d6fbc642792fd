//! Fleet-scale benchmark (`make bench-scale`): the real server binary on SQLite and a simulated
//! fleet (`flotilla agent --simulate N`, the real agent code on one libvirt test:///default
//! hypervisor per node) in a second process; this process creates the VMs through the API and
//! watches them until every one is Running.
//!
//! The VM mix: plain VMs; VMs pinned to a zone by `nodeSelector`; anti-affinity groups of 5 (at
//! most one per node); database trios spread over zones (required zone anti-affinity); web groups
//! of 8 (one per node, preferring distinct zones); cache pairs that must share a zone with their
//! app (required affinity).
//!
//! When all are Running it reads every VM and node back and counts constraint violations
//! independently of the scheduler's code (over-committed CPU or memory, a selector or an affinity
//! rule broken, a VM on a node that is not Ready). Prints one JSON line.
//! Every VM has a NIC on one of FLOTILLA_BENCH_NETWORKS (100) overlay networks: the server's
//! IPAM gives each its address at create; the check also counts addresses given twice on a
//! network and VMs left without one. Simulated nodes keep their dataplane simulated (libvirt's
//! test driver has no host devices: no bridge, VXLAN device or dnsmasq is made for them).
//! Sizes: FLOTILLA_BENCH_NODES (1000), FLOTILLA_BENCH_VMS (10000), FLOTILLA_BENCH_ZONES (4).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_usize, percentile};

use flotilla_client::{Client, ListParams};
use flotilla_store::etcd_cluster::{free_port, KillOnDrop};
use flotilla_types::clientconfig::ClientConfig;
use flotilla_types::registry::lookup;
use flotilla_types::Quantity;
use futures::StreamExt;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const ZONE: &str = "topology.flotilla.dev/zone";
const NODE_CPUS: u64 = 32;
const NODE_MEMORY: &str = "128Gi";

/// Resident memory of a process in bytes: `VmHWM` (peak) or `VmRSS` (now).
fn memory_of(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.env(
        "FLOTILLA_LOG",
        std::env::var("FLOTILLA_LOG").unwrap_or("warn".into()),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::inherit())
}

fn network_name(i: usize) -> String {
    format!("net-{i:03}")
}

/// The i-th VM of the mix, with the rules the checker verifies, on one of `networks` networks.
fn vm(i: usize, zones: usize, networks: usize) -> Value {
    let size = [(1, "1Gi"), (2, "2Gi"), (2, "4Gi"), (4, "8Gi")][i % 4];
    let mut spec = json!({"resources": {"cpus": size.0, "memory": size.1}, "boot": {"kernel": "/boot/vmlinuz"}});
    let mut labels = json!({"bench": "scale"});
    let required = |selector: String, key: &str| json!({"required": [{"labelSelector": selector, "topologyKey": key}]});
    match i % 10 {
        // Pinned to a zone.
        2 | 3 => {
            spec["nodeSelector"] = json!({ZONE: format!("zone-{}", i % zones)});
        }
        // Anti-affinity groups of 5: at most one member per node.
        4 | 5 => {
            let group = format!("aa-{}", i / 50);
            labels["group"] = json!(group);
            spec["affinity"] =
                json!({"vmAntiAffinity": required(format!("group={group}"), "flotilla.dev/node")});
        }
        // Database trios: each member in its own zone.
        6 => {
            let group = format!("db-{}", i / 30);
            labels["db"] = json!(group);
            spec["affinity"] = json!({"vmAntiAffinity": required(format!("db={group}"), ZONE)});
        }
        // Web groups of 8: one per node, preferably spread over zones.
        7 => {
            let group = format!("web-{}", i / 80);
            labels["web"] = json!(group);
            spec["affinity"] = json!({"vmAntiAffinity": {
                "required": [{"labelSelector": format!("web={group}"), "topologyKey": "flotilla.dev/node"}],
                "preferred": [{"weight": 100, "labelSelector": format!("web={group}"), "topologyKey": ZONE}]}});
        }
        // Cache pairs: the cache (i % 20 == 18) must share a zone with its app (i % 20 == 8).
        8 => {
            let pair = format!("pair-{}", i / 20);
            labels["pair"] = json!(pair);
            if i % 20 == 18 {
                labels["role"] = json!("cache");
                spec["affinity"] =
                    json!({"vmAffinity": required(format!("pair={pair},role=app"), ZONE)});
            } else {
                labels["role"] = json!("app");
            }
        }
        _ => {}
    }
    if networks > 0 {
        spec["networks"] = json!([{"network": network_name(i % networks)}]);
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

async fn wait_for<T>(what: &str, secs: u64, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn admin_client(dir: &Path) -> Option<Client> {
    let raw = std::fs::read_to_string(dir.join("admin.yaml")).ok()?;
    let config: ClientConfig = serde_yaml::from_str(&raw).ok()?;
    Client::from_context(config.context(None)?).ok()
}

fn is_ready(node: &Value) -> bool {
    node["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

async fn run() {
    let nodes_n = env_usize("FLOTILLA_BENCH_NODES", 1000);
    let vms_n = env_usize("FLOTILLA_BENCH_VMS", 10_000);
    let zones = env_usize("FLOTILLA_BENCH_ZONES", 4);
    let networks = env_usize("FLOTILLA_BENCH_NETWORKS", 100).min(256);
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let url = format!("https://127.0.0.1:{}", free_port());
    println!("flotilla scale benchmark: {nodes_n} simulated nodes in {zones} zones, {vms_n} VMs on {networks} overlay networks; server on SQLite with fsync");

    let server = KillOnDrop(
        quiet(Command::new(BIN).args(["server", "--listen", &url["https://".len()..]]))
            .arg("--data-dir")
            .arg(&server_dir)
            .spawn()
            .unwrap(),
    );
    let admin = Arc::new(
        wait_for("the server writes admin.yaml and answers", 60, async || {
            let client = admin_client(&server_dir)?;
            let nodes = lookup("node").unwrap();
            client
                .list(nodes, None, &ListParams::default())
                .await
                .ok()?;
            Some(client)
        })
        .await,
    );
    let token = admin
        .request_json(
            reqwest::Method::POST,
            "/flotilla/v1/join-tokens",
            &[],
            Some(("application/json", br#"{"ttlSeconds": 3600}"#.to_vec())),
        )
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();

    let started = Instant::now();
    let fleet = KillOnDrop(
        quiet(Command::new(BIN).args(["agent", "--server", &url, "--join-token", &token]))
            .arg("--data-dir")
            .arg(dir.path().join("fleet"))
            .args(["--simulate", &nodes_n.to_string()])
            .args(["--simulate-zones", &zones.to_string()])
            .args(["--simulate-cpus", &NODE_CPUS.to_string()])
            .args(["--simulate-memory", NODE_MEMORY])
            .spawn()
            .unwrap(),
    );
    let (nodes_kind, vms_kind) = (lookup("node").unwrap(), lookup("vm").unwrap());
    wait_for("every simulated node is Ready", 600, async || {
        let list = admin
            .list(nodes_kind, None, &ListParams::default())
            .await
            .ok()?;
        let ready = list["items"]
            .as_array()?
            .iter()
            .filter(|n| is_ready(n))
            .count();
        (ready == nodes_n).then_some(())
    })
    .await;
    let fleet_ready = started.elapsed();
    println!(
        "{nodes_n} nodes Ready after {:.1} s",
        fleet_ready.as_secs_f64()
    );

    let nets_kind = lookup("network").unwrap();
    for i in 0..networks {
        let body = json!({"metadata": {"name": network_name(i)}, "spec": {"cidr": format!("10.100.{i}.0/24")}});
        admin
            .create(nets_kind, Some("default"), &body)
            .await
            .unwrap();
    }

    // Watch every VM from before the first create: when each is bound and when it is Running.
    let list = admin
        .list(vms_kind, None, &ListParams::default())
        .await
        .unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let events = admin
        .watch(vms_kind, None, &ListParams::default(), Some(&rv))
        .await
        .unwrap();
    let observer = tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        let mut bound: HashMap<String, Instant> = HashMap::new();
        let mut running: HashMap<String, Instant> = HashMap::new();
        while running.len() < vms_n {
            let Some(Ok(ev)) = events.next().await else {
                panic!("the VM watch ended early");
            };
            let name = ev.object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if ev.object["spec"]["nodeName"].is_string() {
                bound.entry(name.clone()).or_insert_with(Instant::now);
            }
            if ev.object["status"]["phase"] == "Running" {
                running.entry(name).or_insert_with(Instant::now);
            }
        }
        (bound, running)
    });

    // Create with 32 requests in flight; remember when each was accepted.
    let begin = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut creators = Vec::new();
    for _ in 0..32 {
        let (admin, next) = (admin.clone(), next.clone());
        creators.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= vms_n {
                    return accepted;
                }
                let body = vm(i, zones, networks);
                admin
                    .create(vms_kind, Some("default"), &body)
                    .await
                    .unwrap();
                accepted.push((
                    body["metadata"]["name"].as_str().unwrap().to_string(),
                    Instant::now(),
                ));
            }
        }));
    }
    let mut accepted: HashMap<String, Instant> = HashMap::new();
    for c in creators {
        accepted.extend(c.await.unwrap());
    }
    let created = begin.elapsed();
    let (bound, running) = tokio::time::timeout(Duration::from_secs(1800), observer)
        .await
        .expect("every VM Running within 30 minutes")
        .unwrap();
    let wall = begin.elapsed();
    let server_peak = memory_of(server.0.id(), "VmHWM");
    let fleet_rss = memory_of(fleet.0.id(), "VmRSS");

    let mut latencies: Vec<Duration> = running
        .iter()
        .map(|(name, at)| at.saturating_duration_since(accepted[name]))
        .collect();
    latencies.sort();
    let mut to_bound: Vec<Duration> = bound
        .iter()
        .map(|(name, at)| at.saturating_duration_since(accepted[name]))
        .collect();
    to_bound.sort();
    let first_bound = bound.values().min().copied().unwrap_or(begin);
    let last_bound = bound.values().max().copied().unwrap_or(begin);
    let placing = last_bound.saturating_duration_since(begin.min(first_bound));

    let vms = admin
        .list(vms_kind, None, &ListParams::default())
        .await
        .unwrap();
    let nodes = admin
        .list(nodes_kind, None, &ListParams::default())
        .await
        .unwrap();
    let violations = check(
        vms["items"].as_array().unwrap(),
        nodes["items"].as_array().unwrap(),
    );
    for v in violations.iter().take(10) {
        eprintln!("violation: {v}");
    }
    println!(
        "{}",
        json!({
            "benchmark": "scale",
            "nodes": nodes_n,
            "vms": vms_n,
            "fleet_ready_s": round(fleet_ready.as_secs_f64()),
            "create_s": round(created.as_secs_f64()),
            "wall_s": round(wall.as_secs_f64()),
            "vms_per_s": round(vms_n as f64 / wall.as_secs_f64()),
            "accepted_to_running_p50_ms": round(percentile(&latencies, 0.5)),
            "accepted_to_running_p99_ms": round(percentile(&latencies, 0.99)),
            "accepted_to_bound_p50_ms": round(percentile(&to_bound, 0.5)),
            "accepted_to_bound_p99_ms": round(percentile(&to_bound, 0.99)),
            "placements_per_s": round(bound.len() as f64 / placing.as_secs_f64()),
            "server_peak_rss_mib": round(server_peak as f64 / (1 << 20) as f64),
            "fleet_rss_mib": round(fleet_rss as f64 / (1 << 20) as f64),
            "memory_per_node_kib": round(fleet_rss as f64 / nodes_n as f64 / 1024.0),
            "networks": networks,
            "violations": violations.len(),
        })
    );
    drop(fleet);
    drop(server);
    assert!(violations.is_empty(), "placements broke constraints");
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn quantity(v: &Value) -> u128 {
    v.as_str()
        .and_then(|s| Quantity::parse(s).ok())
        .map(|q| q.value())
        .unwrap_or(0)
}

/// A selector of the mix (`k=v` or `k=v,k2=v2`) against labels.
fn selects(selector: &str, labels: &Value) -> bool {
    selector.split(',').all(|req| {
        let (k, v) = req.split_once('=').unwrap();
        labels[k] == v
    })
}

/// Every rule of the mix, checked from what the API returns.
fn check(vms: &[Value], nodes: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let nodes: HashMap<&str, &Value> = nodes
        .iter()
        .map(|n| (n["metadata"]["name"].as_str().unwrap(), n))
        .collect();
    let topology = |node: &str, key: &str| -> String {
        if key == "flotilla.dev/node" {
            node.to_string()
        } else {
            nodes[node]["metadata"]["labels"][key]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
    };
    // Placed VMs by each of their labels (`k=v`): name, labels, node.
    let mut by_label: HashMap<String, Vec<(&str, &Value, &str)>> = HashMap::new();
    for vm in vms {
        let (Some(name), Some(node), Some(labels)) = (
            vm["metadata"]["name"].as_str(),
            vm["spec"]["nodeName"].as_str(),
            vm["metadata"]["labels"].as_object(),
        ) else {
            continue;
        };
        for (k, v) in labels {
            let entry = by_label.entry(format!("{k}={}", v.as_str().unwrap_or_default()));
            entry
                .or_default()
                .push((name, &vm["metadata"]["labels"], node));
        }
    }
    // Every NIC has an address, never one another NIC of its network holds.
    let mut addresses: HashMap<(String, String), &str> = HashMap::new();
    for vm in vms {
        let name = vm["metadata"]["name"].as_str().unwrap();
        let wanted = vm["spec"]["networks"].as_array().map_or(0, Vec::len);
        let nics = vm["status"]["interfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if nics.len() != wanted {
            problems.push(format!("{name} has {} of its {wanted} NICs", nics.len()));
        }
        for nic in &nics {
            let network = nic["network"].as_str().unwrap_or_default().to_string();
            let Some(ip) = nic["ips"][0].as_str() else {
                problems.push(format!("{name}'s NIC on {network} has no address"));
                continue;
            };
            if let Some(other) = addresses.insert((network.clone(), ip.to_string()), name) {
                problems.push(format!("{name} and {other} both hold {ip} on {network}"));
            }
        }
    }
    let mut used: BTreeMap<&str, (u64, u128)> = BTreeMap::new();
    for vm in vms {
        let name = vm["metadata"]["name"].as_str().unwrap();
        let Some(node) = vm["spec"]["nodeName"].as_str() else {
            problems.push(format!("{name} is not placed"));
            continue;
        };
        let Some(n) = nodes.get(node) else {
            problems.push(format!("{name} is on {node}, which does not exist"));
            continue;
        };
        if !is_ready(n) {
            problems.push(format!("{name} is on {node}, which is not Ready"));
        }
        if vm["status"]["phase"] != "Running" {
            problems.push(format!("{name} is {}", vm["status"]["phase"]));
        }
        let u = used.entry(node).or_default();
        u.0 += vm["spec"]["resources"]["cpus"].as_u64().unwrap();
        u.1 += quantity(&vm["spec"]["resources"]["memory"]);
        if let Some(sel) = vm["spec"]["nodeSelector"].as_object() {
            for (k, v) in sel {
                if n["metadata"]["labels"][k] != *v {
                    problems.push(format!("{name} on {node} breaks nodeSelector {k}={v}"));
                }
            }
        }
        let rules = |which: &str| -> Vec<(String, String)> {
            vm["spec"]["affinity"][which]["required"]
                .as_array()
                .map(|ts| {
                    ts.iter()
                        .map(|t| {
                            (
                                t["labelSelector"].as_str().unwrap().to_string(),
                                t["topologyKey"].as_str().unwrap().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let here = |key: &str| topology(node, key);
        // Other VMs matching `selector` that share this VM's value of `key`.
        let neighbours = |selector: &str, key: &str| {
            let first = selector.split(',').next().unwrap();
            by_label.get(first).map_or(0, |members| {
                members
                    .iter()
                    .filter(|(other, labels, on)| {
                        *other != name
                            && selects(selector, labels)
                            && topology(on, key) == here(key)
                    })
                    .count()
            })
        };
        for (selector, key) in rules("vmAntiAffinity") {
            if neighbours(&selector, &key) > 0 {
                problems.push(format!(
                    "{name} on {node} breaks anti-affinity {selector} by {key}"
                ));
            }
        }
        for (selector, key) in rules("vmAffinity") {
            if neighbours(&selector, &key) == 0 {
                problems.push(format!(
                    "{name} on {node} breaks affinity {selector} by {key}"
                ));
            }
        }
    }
    for (node, (cpus, memory)) in used {
        let alloc = &nodes[node]["status"]["allocatable"];
        if cpus > alloc["cpus"].as_u64().unwrap() || memory > quantity(&alloc["memory"]) {
            problems.push(format!(
                "{node} is over-committed: {cpus} CPUs, {memory} bytes"
            ));
        }
    }
    let names: HashSet<&str> = vms
        .iter()
        .filter_map(|v| v["metadata"]["name"].as_str())
        .collect();
    if names.len() != vms.len() {
        problems.push("duplicate VM names".into());
    }
    problems
}
