//! One request id from the user to the node: the id of a request that creates or deletes a VM
//! appears in the server's audit log and in the agent's log lines about that work, and the id of
//! a request the server forwards to the agent (a VM's log) in the agent's log too. Real server
//! and agent binaries, real libvirtd (a VM with a blank disk, running under TCG).

mod support;

use flotilla_types::registry::lookup;
use serde_json::json;
use support::{agent, join_token, traversable_tempdir, DomainSweeper, Server};

fn eventually_in(what: &str, secs: u64, read: impl Fn() -> String, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !read().contains(needle) {
        if std::time::Instant::now() > deadline {
            let log = read();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "timed out after {secs}s waiting until {what}; the agent's log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_id_reaches_the_agents_log() {
    let dir = traversable_tempdir();
    let tag = format!("q{:04x}", rand::random::<u16>());
    let _sweeper = DomainSweeper(format!("_{tag}-"));
    let server = Server::start(dir.path());
    let admin = server.admin().await;
    let token = join_token(&admin).await;
    let node = format!("trace-{tag}");
    let agent = agent(&server.url(), &token, &node, dir.path());
    let image = dir.path().join("blank.qcow2");
    flotilla_controllers::testkit::blank_qcow2(&image, "64M");
    admin
        .create(
            lookup("image").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "blank"}, "spec": {"source": {"path": image}}}),
        )
        .await
        .unwrap();
    let http = server.http();
    let vms = format!(
        "{}/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines",
        server.url()
    );
    let name = format!("{tag}-vm");
    let send = |method: reqwest::Method, url: String, id: &str| {
        http.request(method, url)
            .bearer_auth(server.admin_token())
            .header("x-request-id", id)
    };
    let created = send(reqwest::Method::POST, vms.clone(), &format!("{tag}-create"))
        .header("content-type", "application/json")
        .body(
            json!({"metadata": {"name": name}, "spec": {"powerState": "Running",
                   "resources": {"cpus": 1, "memory": "64Mi"}, "image": "blank"}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let agent_log = || {
        std::fs::read_to_string(dir.path().join(format!("agent-{node}.log"))).unwrap_or_default()
    };
    // The agent's work on the VM is logged under the request that asked for it.
    eventually_in(
        "the start is logged with the request's id",
        45,
        agent_log,
        &format!("request{{id={tag}-create}}"),
    );
    assert!(
        agent_log()
            .lines()
            .any(|l| l.contains(&format!("request{{id={tag}-create}}")) && l.contains("started")),
        "{}",
        agent.tail(30)
    );
    // A request the server forwards to the agent carries its id there.
    let log = send(
        reqwest::Method::GET,
        format!("{vms}/{name}/log"),
        &format!("{tag}-log"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(log.status(), 200);
    drop(log);
    eventually_in(
        "the forwarded request is logged with its id",
        30,
        agent_log,
        &format!("request_id={tag}-log"),
    );
    let deleted = send(
        reqwest::Method::DELETE,
        format!("{vms}/{name}?gracePeriodSeconds=0"),
        &format!("{tag}-delete"),
    )
    .send()
    .await
    .unwrap();
    assert!(deleted.status().is_success());
    eventually_in(
        "the deletion is logged with the request's id",
        45,
        agent_log,
        &format!("request{{id={tag}-delete}}"),
    );
    // And the audit log has the same ids.
    let audit = std::fs::read_to_string(dir.path().join("server/audit.log")).unwrap_or_default();
    for step in ["create", "delete"] {
        assert!(
            audit.contains(&format!("\"requestID\":\"{tag}-{step}\"")),
            "{step} in the audit log:\n{audit}"
        );
    }
}
