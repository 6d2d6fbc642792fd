//! Several server replicas on one etcd cluster (three real members on loopback): a watch on one
//! replica sees writes made through another; clients move on when a replica is killed; the
//! cluster keeps serving with one etcd member down; without a quorum the API answers 503 with
//! Retry-After (an unavailable store, not a server bug) and serves again once it is back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_client::{Client, ListParams};
use flotilla_store::etcd_cluster::{free_port, EtcdCluster, KillOnDrop};
use flotilla_store::Store;
use flotilla_types::clientconfig::ClientConfig;
use flotilla_types::registry::lookup;
use futures::StreamExt;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn server(dir: &Path, port: u16, etcd: &[String]) -> KillOnDrop {
    let hosts: Vec<&str> = etcd
        .iter()
        .map(|e| e.trim_start_matches("http://"))
        .collect();
    Command::new(BIN)
        .args(["server", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .args(["--store", &format!("etcd://{}", hosts.join(","))])
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(KillOnDrop)
        .unwrap()
}

async fn wait_until_serving(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = client
        .list(
            lookup("vm").unwrap(),
            Some("default"),
            &ListParams::default(),
        )
        .await
    {
        assert!(Instant::now() < deadline, "the server did not come up: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_etcd_cluster_and_clients_fail_over() {
    let mut etcd = EtcdCluster::start(3).await;
    let tmp = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = server(&dir_a, port_a, &etcd.endpoints);
    // Replica B shares A's CA and admin credentials (pki/ and admin.yaml copied, as the HA guide
    // says); every other token lives in etcd.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir_a.join("admin.yaml").exists() {
        assert!(Instant::now() < deadline, "replica A writes admin.yaml");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    copy_dir(&dir_a.join("pki"), &dir_b.join("pki"));
    std::fs::copy(dir_a.join("admin.yaml"), dir_b.join("admin.yaml")).unwrap();
    let mut b = server(&dir_b, port_b, &etcd.endpoints);

    let config: ClientConfig =
        serde_yaml::from_str(&std::fs::read_to_string(dir_a.join("admin.yaml")).unwrap()).unwrap();
    let mut context = config.context(None).unwrap().clone();
    let (url_a, url_b) = (
        format!("https://127.0.0.1:{port_a}"),
        format!("https://127.0.0.1:{port_b}"),
    );
    context.server = Some(url_a.clone());
    context.servers = vec![];
    let only_a = Client::from_context(&context).unwrap();
    context.server = Some(url_b.clone());
    let only_b = Client::from_context(&context).unwrap();
    context.server = Some(url_a.clone());
    context.servers = vec![url_b.clone()];
    let both = Client::from_context(&context).unwrap();
    wait_until_serving(&only_a).await;
    wait_until_serving(&only_b).await;

    // A watch on A sees a VM created through B.
    let vms = lookup("vm").unwrap();
    let list = only_a
        .list(vms, Some("default"), &ListParams::default())
        .await
        .unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut watch = Box::pin(
        only_a
            .watch(vms, Some("default"), &ListParams::default(), Some(&rv))
            .await
            .unwrap(),
    );
    let vm = |name: &str| json!({"metadata": {"name": name}, "spec": {"resources": {"cpus": 1, "memory": "512Mi"}, "boot": {"kernel": "/k"}}});
    only_b
        .create(vms, Some("default"), &vm("via-b"))
        .await
        .unwrap();
    let ev = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("an event within 10 s")
            .expect("the watch stays open")
            .expect("a well-formed event");
        if ev.type_ != "BOOKMARK" {
            break ev;
        }
    };
    assert_eq!(
        (ev.type_.as_str(), ev.object["metadata"]["name"].as_str()),
        ("ADDED", Some("via-b"))
    );

    // IPAM across replicas: creates through A and B at once on one network, each server's own
    // queue no help against the other's; the store's compares keep every address unique.
    let nets = lookup("network").unwrap();
    only_a
        .create(
            nets,
            Some("default"),
            &json!({"metadata": {"name": "shared"}, "spec": {"cidr": "10.5.0.0/24"}}),
        )
        .await
        .unwrap();
    let creates = (0..60).map(|i| {
        let (client, mut vm) = (
            if i % 2 == 0 { &only_a } else { &only_b },
            vm(&format!("nic-{i}")),
        );
        vm["spec"]["networks"] = json!([{"network": "shared"}]);
        async move { client.create(vms, Some("default"), &vm).await }
    });
    let made: Vec<serde_json::Value> = futures::future::join_all(creates)
        .await
        .into_iter()
        .map(|r| r.expect("every create lands"))
        .collect();
    let ips: std::collections::HashSet<&str> = made
        .iter()
        .map(|v| v["status"]["ips"][0].as_str().unwrap())
        .collect();
    assert_eq!(
        ips.len(),
        60,
        "an address was handed out twice across replicas"
    );
    for i in 0..60 {
        both.delete(vms, Some("default"), &format!("nic-{i}"))
            .await
            .unwrap();
    }

    // A simulated fleet that knows both replicas, and a VM running on it.
    let token = both
        .request_json(
            reqwest::Method::POST,
            "/flotilla/v1/join-tokens",
            &[],
            Some(("application/json", br#"{"ttlSeconds": 600}"#.to_vec())),
        )
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let _fleet = KillOnDrop(
        Command::new(BIN)
            .args([
                "agent",
                "--server",
                &format!("{url_a},{url_b}"),
                "--join-token",
                &token,
            ])
            .arg("--data-dir")
            .arg(tmp.path().join("fleet"))
            .args([
                "--simulate",
                "3",
                "--simulate-cpus",
                "8",
                "--simulate-memory",
                "16Gi",
            ])
            .env("FLOTILLA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let running = |name: &'static str| {
        let both = &both;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(v) = both.get(vms, Some("default"), name).await {
                    if v["status"]["phase"] == "Running" {
                        return v;
                    }
                }
                assert!(Instant::now() < deadline, "{name} is Running within 60 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let before = running("via-b").await;

    // kill -9 the replica that leads the controllers; the other keeps serving and takes over.
    let etcd_store = flotilla_store::EtcdStore::connect(flotilla_store::EtcdOptions {
        endpoints: etcd.endpoints.clone(),
        tls: None,
    })
    .await
    .unwrap();
    let leader_key = flotilla_controllers::leader::LEADER_KEY;
    let holder = |kv: Option<flotilla_store::KeyValue>| {
        kv.map(|kv| String::from_utf8_lossy(&kv.value).to_string())
    };
    let first_leader = holder(etcd_store.get(leader_key).await.unwrap()).expect("a leader");
    let (leader, survivor_url) = if first_leader.ends_with(&url_a) {
        (&mut a, url_b.clone())
    } else {
        (&mut b, url_a.clone())
    };
    leader.0.kill().unwrap();
    leader.0.wait().unwrap();
    let killed = Instant::now();
    let mut unavailable = Duration::ZERO;
    loop {
        match both.create(vms, Some("default"), &vm("after-kill")).await {
            Ok(_) => break,
            Err(e) => {
                unavailable = killed.elapsed();
                assert!(
                    unavailable < Duration::from_secs(10),
                    "no replica answered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let takeover = loop {
        if holder(etcd_store.get(leader_key).await.unwrap())
            .is_some_and(|h| h.ends_with(&survivor_url))
        {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the other replica takes over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = running("after-kill").await;
    let to_running = killed.elapsed();
    println!(
        "kill -9 of the leading replica: API unavailable {} ms, controllers taken over after {} ms, a VM created after the kill Running after {} ms",
        unavailable.as_millis(),
        takeover.as_millis(),
        to_running.as_millis()
    );
    assert!(
        takeover < Duration::from_secs(5),
        "takeover within 5 s, took {takeover:?}"
    );
    assert!(after["spec"]["nodeName"].is_string());
    // Nothing lost or doubled: the first VM kept its node and its identity.
    let again = both.get(vms, Some("default"), "via-b").await.unwrap();
    assert_eq!(again["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(again["spec"]["nodeName"], before["spec"]["nodeName"]);

    // One etcd member down: writes and reads still work (quorum 2 of 3). A write sent to the
    // member as it died may come back 503 (its outcome unknown): read, and send it again only
    // if it was not applied — what the answer tells a client to do.
    etcd.kill(0);
    for i in 0..5 {
        let name = format!("quorum-{i}");
        loop {
            match both.create(vms, Some("default"), &vm(&name)).await {
                Ok(_) => break,
                Err(e) if e.code() == Some(503) => {
                    if both.get(vms, Some("default"), &name).await.is_ok() {
                        break;
                    }
                }
                Err(e) if e.code() == Some(409) => break,
                Err(e) => panic!("creating {name} with one etcd member down: {e}"),
            }
        }
    }
    let list = both
        .list(vms, Some("default"), &ListParams::default())
        .await
        .unwrap();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    let unique: std::collections::HashSet<&&str> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "no VM doubled: {names:?}");
    // ...and the controllers and agents still work: a VM created now runs.
    running("quorum-4").await;

    // A second member down: no quorum. Reads and writes are 503 with Retry-After, never 500.
    etcd.kill(1);
    let lost = Instant::now();
    for (what, answer) in [
        (
            "a write",
            both.create(vms, Some("default"), &vm("no-quorum"))
                .await
                .map(|_| ()),
        ),
        (
            "a read",
            both.get(vms, Some("default"), "quorum-0").await.map(|_| ()),
        ),
    ] {
        match answer {
            Err(flotilla_client::ClientError::Api(status)) => {
                assert_eq!(
                    status.code, 503,
                    "{what} without quorum: {}",
                    status.message
                );
                assert_eq!(status.reason, "ServiceUnavailable");
                assert!(
                    status
                        .message
                        .contains("read the object before writing it again"),
                    "{}",
                    status.message
                );
                assert_eq!(
                    status.details.as_ref().and_then(|d| d.retry_after_seconds),
                    Some(1)
                );
            }
            other => panic!("{what} without quorum: {other:?}"),
        }
    }
    eprintln!(
        "quorum lost -> a write and a read answered 503: {:.1} s",
        lost.elapsed().as_secs_f64()
    );
    // Back: the same write goes through (it was not applied: the store never took it).
    etcd.restart(1);
    let back = Instant::now();
    loop {
        match both.create(vms, Some("default"), &vm("no-quorum")).await {
            Ok(_) => break,
            Err(e) if e.code() == Some(503) && back.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("after quorum came back: {e}"),
        }
    }
}
