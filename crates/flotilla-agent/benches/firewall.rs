//! Security group rule propagation on one node (`make bench-firewall`): the agent's firewall
//! with 1,000 VM NICs (10 networks, 10 groups of 10 rules each, half of them naming a remote
//! group), applied into a scratch network namespace. Measures the first apply, then a rule
//! change (a group's rules edited, as the agent hears it from its watch) until the whole rule
//! set is replaced in the kernel: p50 and p99 over FLOTILLA_BENCH_CHANGES (50) changes, and
//! the rule set's size. Prints one JSON line. Root only (it makes a namespace).

use std::time::{Duration, Instant};

use flotilla_agent::firewall::{policies, Firewall, Known, Listed};
use flotilla_types::{Network, SecurityGroup, VirtualMachine};
use serde_json::json;

fn group(name: &str, version: u32, members: &serde_json::Value) -> SecurityGroup {
    let rules: Vec<serde_json::Value> = (0..10)
        .map(|r| {
            if r % 2 == 0 {
                json!({"protocol": "tcp", "ports": format!("{}", 1000 + r + version), "remote": {"cidr": format!("192.168.{r}.0/24")}})
            } else {
                json!({"protocol": "udp", "ports": format!("{}", 2000 + r), "remote": {"securityGroup": format!("g{}", r % 10)}})
            }
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"rules": rules},
        "status": {"members": members, "memberCount": 100}
    }))
    .unwrap()
}

#[tokio::main]
async fn main() {
    let changes: usize = std::env::var("FLOTILLA_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let ns = format!("fltbench-fw-{}", std::process::id());
    let path = flotilla_dataplane::namespace::ensure_namespace(&ns).unwrap();
    let firewall = std::sync::Arc::new(Firewall::new(&path));
    let mut known = Known::default();
    let mut members: Vec<Vec<serde_json::Value>> = vec![Vec::new(); 10];
    for n in 0..10u32 {
        let network: Network = serde_json::from_value(json!({
            "metadata": {"name": format!("net{n}"), "namespace": "bench"},
            "spec": {"cidr": format!("10.{n}.0.0/16")}, "status": {"vni": 4096 + n}
        }))
        .unwrap();
        firewall.set_network(&network);
        known
            .networks
            .insert(("bench".into(), format!("net{n}")), network);
    }
    for i in 0..1000u32 {
        let (net, g) = (i % 10, (i / 10) % 10);
        let ip = format!("10.{net}.{}.{}", i / 250, i % 250 + 2);
        let vm: VirtualMachine = serde_json::from_value(json!({
            "metadata": {"name": format!("vm{i}"), "namespace": "bench", "uid": format!("uid-{i}")},
            "spec": {"resources": {"cpus": 1, "memory": "64Mi"},
                     "networks": [{"network": format!("net{net}"), "securityGroups": [format!("g{g}")]}]},
            "status": {"interfaces": [{"name": "nic0", "network": format!("net{net}"),
                        "macAddress": format!("02:46:4c:00:{:02x}:{:02x}", i >> 8, i & 0xff), "ips": [format!("{ip}/16")]}]}
        }))
        .unwrap();
        members[g as usize].push(json!({"vm": format!("vm{i}"), "nic": "nic0", "addresses": [ip]}));
        firewall.set_vm(vm.clone());
        known.vms.insert(format!("uid-{i}"), vm);
    }
    for (g, group_members) in members.iter().enumerate() {
        let sg = group(&format!("g{g}"), 0, &json!(group_members));
        firewall.set_group(sg.clone());
        known.groups.insert(("bench".into(), format!("g{g}")), sg);
    }
    let (ports, sets) = policies(&known);
    let size = flotilla_dataplane::firewall_rules(&ports, &sets).len();
    let rules: usize = ports.iter().map(|p| p.ingress.len() + p.egress.len()).sum();
    let running = firewall.clone();
    tokio::spawn(async move { running.run(Duration::from_secs(3600), |_| {}).await });
    for what in [Listed::Vms, Listed::Networks, Listed::Groups] {
        firewall.listed(what);
    }
    let started = Instant::now();
    firewall.sync(Duration::from_secs(60)).await.unwrap();
    let first = started.elapsed();
    let mut took = Vec::new();
    for c in 0..changes {
        let g = c % 10;
        let started = Instant::now();
        firewall.set_group(group(&format!("g{g}"), c as u32 + 1, &json!(members[g])));
        firewall.sync(Duration::from_secs(60)).await.unwrap();
        took.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    took.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| took[((took.len() as f64 * p).ceil() as usize).clamp(1, took.len()) - 1];
    println!(
        "{}",
        json!({
            "nics": ports.len(),
            "rules": rules,
            "ruleset_kib": size / 1024,
            "first_apply_ms": first.as_millis(),
            "changes": changes,
            "change_p50_ms": (pct(0.5) * 10.0).round() / 10.0,
            "change_p99_ms": (pct(0.99) * 10.0).round() / 10.0,
        })
    );
    flotilla_dataplane::namespace::remove_namespace(&ns).unwrap();
}
