//! What tenancy costs (`make bench-tenancy`): a real server (TLS, SQLite with fsync, the audit
//! log on) on loopback, driven by the real client in the same process.
//!
//! Measures: GET latency and throughput as the admin (no RBAC) and as a project member (RBAC
//! read from the store per request); creates that count against a quota (the project's total
//! moves in the same transaction) against creates that do not; SelfSubjectAccessReview latency.
//! Prints a summary line of JSON at the end. FLOTILLA_BENCH_REQUESTS sets the request count.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{env_usize, percentile};
use flotilla_client::Client;
use flotilla_types::registry::lookup;
use reqwest::Method;
use serde_json::json;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

/// `n` GETs of one VM from 8 concurrent readers: (p50 ms, p99 ms, requests/s).
async fn gets(client: Arc<Client>, n: usize) -> (f64, f64, f64) {
    let vms = lookup("vm").unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..n / 8 {
                let t = Instant::now();
                client.get(vms, Some("bench"), "vm-00000").await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len() as f64 / secs,
    )
}

/// `n` creates of `plural` objects from 8 concurrent writers: creates/s.
async fn creates(client: Arc<Client>, plural: &str, n: usize) -> f64 {
    let kind = lookup(plural).unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 8 {
                let name = format!("c-{w}-{i:05}");
                let body = match kind.kind {
                    "VirtualMachine" => json!({"metadata": {"name": name}, "spec": {"resources": {"cpus": 1, "memory": "64Mi"}, "image": "img", "powerState": "Stopped"}}),
                    _ => json!({"metadata": {"name": name}, "spec": {}}),
                };
                client.create(kind, Some("bench"), &body).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (n / 8 * 8) as f64 / started.elapsed().as_secs_f64()
}

async fn run() {
    let n = env_usize("FLOTILLA_BENCH_REQUESTS", 4000);
    let dir = tempfile::tempdir().unwrap();
    let mut config = flotilla_server::ServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = flotilla_server::start(config).await.unwrap();
    let client = |token: &str| {
        Arc::new(
            Client::new(
                vec![server.url.clone()],
                Some(&server.ca_pem),
                Some(token.to_string()),
            )
            .unwrap(),
        )
    };
    let admin = client(&server.admin_token);
    let send = |c: &Arc<Client>, method: Method, path: String, body: serde_json::Value| {
        let c = c.clone();
        async move {
            c.request_json(
                method,
                &path,
                &[],
                Some(("application/json", serde_json::to_vec(&body).unwrap())),
            )
            .await
            .unwrap()
        }
    };
    send(&admin, Method::POST, "/apis/flotilla.dev/v1alpha1/projects".into(),
        json!({"metadata": {"name": "bench"}, "spec": {"quota": {"vms": 1_000_000, "cpus": 1_000_000}}})).await;
    send(
        &admin,
        Method::POST,
        "/api/v1/namespaces/bench/serviceaccounts".into(),
        json!({"metadata": {"name": "dev"}}),
    )
    .await;
    send(&admin, Method::POST, "/apis/rbac.authorization.k8s.io/v1/namespaces/bench/rolebindings".into(),
        json!({"metadata": {"name": "dev"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "member"},
               "subjects": [{"kind": "ServiceAccount", "name": "dev"}]})).await;
    // A few more bindings, as a real project has.
    for i in 0..10 {
        send(&admin, Method::POST, "/apis/rbac.authorization.k8s.io/v1/namespaces/bench/rolebindings".into(),
            json!({"metadata": {"name": format!("other-{i}")}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "viewer"},
                   "subjects": [{"kind": "Group", "name": format!("group-{i}")}]})).await;
    }
    let token = send(
        &admin,
        Method::POST,
        "/api/v1/namespaces/bench/serviceaccounts/dev/token".into(),
        json!({}),
    )
    .await;
    let member = client(token["status"]["token"].as_str().unwrap());
    send(&admin, Method::POST, "/apis/flotilla.dev/v1alpha1/namespaces/bench/virtualmachines".into(),
        json!({"metadata": {"name": "vm-00000"}, "spec": {"resources": {"cpus": 1, "memory": "64Mi"}, "image": "img", "powerState": "Stopped"}})).await;
    println!("flotilla tenancy benchmark: {n} requests per figure, 8 concurrent clients, SQLite with fsync, audit log on, TLS on loopback");

    let (a50, a99, arps) = gets(admin.clone(), n).await;
    let (m50, m99, mrps) = gets(member.clone(), n).await;
    println!("get as admin (no RBAC): p50 {a50:.2} ms, p99 {a99:.2} ms, {arps:.0} req/s");
    println!(
        "get as member (RBAC, 11 bindings): p50 {m50:.2} ms, p99 {m99:.2} ms, {mrps:.0} req/s"
    );

    let counted = creates(member.clone(), "vm", n / 4).await;
    let uncounted = creates(member.clone(), "securitygroup", n / 4).await;
    println!("creates as member: {counted:.0}/s of VMs (counted against the quota), {uncounted:.0}/s of security groups (not counted)");

    let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": "bench", "verb": "create", "group": "flotilla.dev", "resource": "virtualmachines"}}});
    let mut lat = Vec::new();
    for _ in 0..n / 8 {
        let t = Instant::now();
        send(
            &member,
            Method::POST,
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews".into(),
            review.clone(),
        )
        .await;
        lat.push(t.elapsed());
    }
    lat.sort();
    let (s50, s99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!("selfsubjectaccessreview: p50 {s50:.2} ms, p99 {s99:.2} ms");
    let used = send(
        &admin,
        Method::GET,
        "/apis/flotilla.dev/v1alpha1/projects/bench".into(),
        json!(null),
    )
    .await;
    assert_eq!(
        used["status"]["used"]["vms"],
        (n / 4 / 8 * 8 + 1) as u64,
        "the quota total counts every VM"
    );
    let summary = json!({"get_admin_p50_ms": a50, "get_admin_rps": arps, "get_member_p50_ms": m50, "get_member_rps": mrps,
        "create_counted_per_s": counted, "create_uncounted_per_s": uncounted, "ssar_p50_ms": s50, "ssar_p99_ms": s99});
    println!("{summary}");
    server.shutdown().await;
}
