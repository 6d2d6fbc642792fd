//! Discovery documents, the OpenAPI document (and its checked-in copy), metrics.

mod common;

use common::start;
use serde_json::Value;

async fn get(t: &common::TestServer, path: &str) -> Value {
    let resp = t
        .http()
        .get(t.url(path))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn discovery_lists_every_kind_for_kubernetes_tooling() {
    let t = start().await;
    let groups = get(&t, "/apis").await;
    assert_eq!(groups["kind"], "APIGroupList");
    assert_eq!(
        groups["groups"][0]["preferredVersion"]["groupVersion"],
        "flotilla.dev/v1alpha1"
    );
    let resources = get(&t, "/apis/flotilla.dev/v1alpha1").await;
    let names: Vec<&str> = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for n in [
        "projects",
        "nodes",
        "virtualmachines",
        "virtualmachines/status",
        "vmclasses",
        "images",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(!names.contains(&"events"), "Event lives in the core group");
    // Kubernetes' core group, where kubectl and the Python client look for events.
    let core = get(&t, "/api").await;
    assert_eq!(
        (core["kind"].as_str(), core["versions"][0].as_str()),
        (Some("APIVersions"), Some("v1"))
    );
    let v1 = get(&t, "/api/v1").await;
    let events = &v1["resources"][0];
    assert_eq!(
        (events["name"].as_str(), events["kind"].as_str()),
        (Some("events"), Some("Event"))
    );
    assert_eq!(
        v1["resources"].as_array().unwrap().len(),
        1,
        "no events/status: {v1}"
    );
    let list = get(&t, "/api/v1/namespaces/default/events").await;
    assert_eq!(
        (list["apiVersion"].as_str(), list["kind"].as_str()),
        (Some("v1"), Some("EventList"))
    );
    let wrong = t
        .http()
        .get(t.url("/apis/flotilla.dev/v1alpha1/namespaces/default/events"))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(
        wrong.status(),
        404,
        "events are not served in Flotilla's group"
    );
    let vm = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "virtualmachines")
        .unwrap();
    assert_eq!(vm["namespaced"], true);
    assert_eq!(vm["shortNames"][0], "vm");
    assert!(vm["verbs"].as_array().unwrap().iter().any(|v| v == "watch"));
}

#[tokio::test]
async fn the_served_openapi_document_matches_the_checked_in_copy() {
    let t = start().await;
    let served = get(&t, "/openapi/v3").await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/flotilla.json");
    let rendered = serde_json::to_string_pretty(&served).unwrap() + "\n";
    if std::env::var_os("FLOTILLA_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &rendered).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == rendered,
        "openapi/flotilla.json is out of date: run `FLOTILLA_UPDATE_OPENAPI=1 cargo nextest run -p flotilla-server openapi` and commit it"
    );
    assert!(served["paths"]
        ["/apis/flotilla.dev/v1alpha1/namespaces/{project}/virtualmachines/{name}/status"]
        .is_object());
    assert!(served["components"]["schemas"]["VirtualMachine"].is_object());
}

#[tokio::test]
async fn metrics_count_requests_with_latency() {
    let t = start().await;
    for _ in 0..3 {
        get(
            &t,
            "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines",
        )
        .await;
    }
    let resp = t
        .http()
        .get(t.url("/metrics"))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("flotilla_http_requests_total")
                && l.contains("namespaces/{ns}/{plural}")
                && l.contains("code=\"200\"")
        })
        .unwrap_or_else(|| panic!("no request counter in:\n{text}"));
    assert!(line.ends_with(" 3"), "{line}");
    assert!(text.contains("flotilla_http_request_duration_seconds_bucket"));
}
