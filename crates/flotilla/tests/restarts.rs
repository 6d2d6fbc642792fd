//! No missed bindings: `kill -9` of the only server (SQLite) in the middle of a burst of creates
//! and bindings, a restart a second later, and the manifest applied again as a user would after
//! an error; every VM must reach the agent and converge within 10 s of the restart. Three such
//! rounds. Real server and agent binaries, real libvirtd (VMs from a cached image, left stopped).

mod support;

use std::time::{Duration, Instant};

use flotilla_client::Client;
use flotilla_types::registry::lookup;
use serde_json::{json, Value};
use support::{agent, join_token, traversable_tempdir, DomainSweeper, Server};

const VMS: usize = 16;

const ROUNDS: usize = 3;

fn manifest(name: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {
        "powerState": "Stopped", "resources": {"cpus": 1, "memory": "64Mi"}, "image": "base"}})
}

fn converged(vm: &Value) -> bool {
    vm["status"]["phase"] == "Stopped"
        && vm["status"]["observedGeneration"] == vm["metadata"]["generation"]
        && vm["spec"]["nodeName"].is_string()
}

/// `flotilla apply`: create, or replace the spec with the file's (read again on a conflict: the
/// agent and the scheduler write the VM meanwhile).
async fn apply(admin: &Client, name: &str) -> Result<(), flotilla_client::ClientError> {
    let vms = lookup("vm").unwrap();
    loop {
        let result = match admin.get(vms, Some("default"), name).await {
            Ok(mut current) => {
                current["spec"] = manifest(name)["spec"].clone();
                admin
                    .replace(vms, Some("default"), name, &current)
                    .await
                    .map(|_| ())
            }
            Err(e) if e.code() == Some(404) => admin
                .create(vms, Some("default"), &manifest(name))
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.code() == Some(409) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_server_during_a_burst_misses_no_binding() {
    let dir = traversable_tempdir();
    let tag = format!("r{:04x}", rand::random::<u16>());
    let _sweeper = DomainSweeper(format!("_{tag}-"));
    let mut server = Server::start(dir.path());
    let admin = server.admin().await;
    let token = join_token(&admin).await;
    let node = format!("restart-{tag}");
    let agent = agent(&server.url(), &token, &node, dir.path());
    let nodes = lookup("node").unwrap();
    flotilla_controllers::testkit::eventually("the node is Ready", 60, async || {
        let n = admin.get(nodes, None, &node).await.ok()?;
        let ready = n["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        (ready["status"] == "True").then_some(())
    })
    .await;

    // The image is cached first (the finding was made with a cached image).
    let image = dir.path().join("base.qcow2");
    flotilla_controllers::testkit::blank_qcow2(&image, "64M");
    let (images, vms) = (lookup("image").unwrap(), lookup("vm").unwrap());
    admin
        .create(
            images,
            Some("default"),
            &json!({"metadata": {"name": "base"}, "spec": {"source": {"path": image}}}),
        )
        .await
        .unwrap();
    let warm = format!("{tag}-warm");
    apply(&admin, &warm).await.unwrap();
    flotilla_controllers::testkit::eventually("the image is cached", 60, async || {
        converged(&admin.get(vms, Some("default"), &warm).await.ok()?).then_some(())
    })
    .await;

    let mut uids = Vec::new();
    for round in 0..ROUNDS {
        let names: Vec<String> = (0..VMS).map(|i| format!("{tag}-{round}-{i}")).collect();
        let burst = {
            let names = names.clone();
            let admin = server.admin().await;
            tokio::spawn(async move {
                futures::future::join_all(names.iter().map(|n| apply(&admin, n))).await
            })
        };
        // Somewhere in the burst: creates and bindings under way.
        tokio::time::sleep(Duration::from_millis(5 + rand::random::<u64>() % 40)).await;
        server.process.kill9();
        let accepted = burst.await.unwrap().iter().filter(|r| r.is_ok()).count();
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.process.start();
        let admin = server.admin().await;
        let restarted = Instant::now();
        // The user applies the file again: what failed is created, the rest left as it is.
        for n in &names {
            apply(&admin, n).await.unwrap();
        }
        let mut pending = names.clone();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for n in pending {
                let vm = admin.get(vms, Some("default"), &n).await.unwrap();
                if !converged(&vm) {
                    still.push(n);
                }
            }
            pending = still;
            let first = match pending.first() {
                Some(n) => admin
                    .get(vms, Some("default"), n)
                    .await
                    .unwrap()
                    .to_string(),
                None => String::new(),
            };
            assert!(
                restarted.elapsed() < Duration::from_secs(10) || pending.is_empty(),
                "round {round}: {} VMs did not converge within 10 s of the restart ({accepted} creates were accepted before the kill): {pending:?}\nthe first: {first}\nserver log:\n{}\nagent log:\n{}",
                pending.len(),
                server.process.tail(15),
                agent.tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "{{\"round\":{round},\"vms\":{VMS},\"accepted_before_kill\":{accepted},\"converged_after_restart_ms\":{}}}",
            restarted.elapsed().as_millis()
        );
        for n in &names {
            uids.push(
                admin.get(vms, Some("default"), n).await.unwrap()["metadata"]["uid"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    let admin = server.admin().await;
    let domains = support::domain_uuids();
    assert!(
        uids.iter().all(|u| domains.contains(u)),
        "every VM has its domain"
    );
    let list = admin
        .list(vms, Some("default"), &Default::default())
        .await
        .unwrap();
    for vm in list["items"].as_array().unwrap() {
        let name = vm["metadata"]["name"].as_str().unwrap();
        admin.delete(vms, Some("default"), name).await.unwrap();
    }
    flotilla_controllers::testkit::eventually("every VM is deleted", 60, async || {
        let list = admin
            .list(vms, Some("default"), &Default::default())
            .await
            .ok()?;
        list["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    let domains = support::domain_uuids();
    assert!(
        uids.iter().all(|u| !domains.contains(u)),
        "no domain is left"
    );
}

/// An agent started while its server is down (restarting, or not up yet) waits for it and
/// joins once it answers, instead of exiting: nodes come up in any order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_once_its_server_comes_back() {
    let dir = traversable_tempdir();
    let mut server = Server::start(dir.path());
    let admin = server.admin().await;
    let token = join_token(&admin).await;
    server.process.kill9();
    let node = format!("late-{:04x}", rand::random::<u16>());
    let mut agent = agent(&server.url(), &token, &node, dir.path());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.running(), "the agent waits:\n{}", agent.tail(20));
    server.process.start();
    let admin = server.admin().await;
    let nodes = lookup("node").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = admin.get(nodes, None, &node).await.ok().is_some_and(|n| {
            n["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never became Ready; the agent's log ends:\n{}",
            agent.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.kill9();
}
