//! The details Kubernetes clients rely on, answered as a Kubernetes API server answers them:
//! booleans, creates carrying a resourceVersion, empty selector sets, concurrent patches without
//! a resourceVersion, lists of a missing project, 405 with Allow, DELETE preconditions and
//! options, deletecollection, and a resourceVersion from the future.

mod common;

use std::time::{Duration, Instant};

use common::{kind, start, vm, TestServer};
use serde_json::{json, Value};

async fn call(
    t: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = t.http().request(method, t.url(path)).bearer_auth(t.token());
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let (code, headers) = (resp.status().as_u16(), resp.headers().clone());
    (code, headers, resp.json().await.unwrap_or(Value::Null))
}

const VMS: &str = "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines";

#[tokio::test]
async fn query_parameters_and_bodies_as_kubernetes_reads_them() {
    let t = start().await;
    let get = reqwest::Method::GET;
    // Booleans as Go parses them.
    for v in ["True", "1", "t", "TRUE"] {
        let resp = t
            .http()
            .get(t.url(&format!("{VMS}?watch={v}&timeoutSeconds=1")))
            .bearer_auth(t.token())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "watch={v}");
        assert_eq!(resp.headers()["content-type"], "application/json");
    }
    let (code, _, _) = call(&t, get.clone(), &format!("{VMS}?watch=yes"), None).await;
    assert_eq!(code, 400);
    // A create carrying a resourceVersion is refused.
    let mut with_rv = vm("web");
    with_rv["metadata"]["resourceVersion"] = json!("12");
    let (code, _, body) = call(&t, reqwest::Method::POST, VMS, Some(with_rv)).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("resourceVersion"),
        "{body}"
    );
    // An empty set in a selector is an error.
    let (code, _, _) = call(
        &t,
        get.clone(),
        &format!("{VMS}?labelSelector=a%20in%20()"),
        None,
    )
    .await;
    assert_eq!(code, 400);
    // A project that does not exist lists as empty; getting something in it is 404.
    let (code, _, body) = call(
        &t,
        get.clone(),
        "/apis/flotilla.dev/v1alpha1/namespaces/nowhere/virtualmachines",
        None,
    )
    .await;
    assert_eq!((code, body["items"].clone()), (200, json!([])));
    let (code, _, body) = call(
        &t,
        get.clone(),
        "/apis/flotilla.dev/v1alpha1/namespaces/nowhere/virtualmachines/x",
        None,
    )
    .await;
    assert_eq!(code, 404, "{body}");
    // A name no project can have is an error, not an empty list.
    let (code, _, body) = call(
        &t,
        get.clone(),
        "/apis/flotilla.dev/v1alpha1/namespaces/null,null/virtualmachines",
        None,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("\"null,null\""),
        "{body}"
    );
    // The envelope as Kubernetes fills it: an empty (or null) namespace is the path's; a
    // cluster-scoped object's namespace is dropped, with a warning.
    for (name, ns) in [("empty-ns", json!("")), ("null-ns", Value::Null)] {
        let mut body = vm(name);
        body["metadata"]["namespace"] = ns;
        let (code, _, created) = call(&t, reqwest::Method::POST, VMS, Some(body)).await;
        assert_eq!(
            (code, created["metadata"]["namespace"].clone()),
            (201, json!("default")),
            "{created}"
        );
    }
    let class = json!({"metadata": {"name": "small", "namespace": "default"}, "spec": {"cpus": 1, "memory": "1Gi"}});
    let (code, headers, created) = call(
        &t,
        reqwest::Method::POST,
        "/apis/flotilla.dev/v1alpha1/vmclasses",
        Some(class),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["metadata"].get("namespace"), None, "{created}");
    let warning = headers["warning"].to_str().unwrap();
    assert!(warning.contains("cluster-scoped"), "{warning}");
    // The watch path of a collection is the collection with watch=true.
    let resp = t
        .http()
        .get(t.url(
            "/apis/flotilla.dev/v1alpha1/watch/namespaces/default/virtualmachines?timeoutSeconds=1&fieldSelector=metadata.name%3Dempty-ns",
        ))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events: Vec<Value> = resp
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (
            events[0]["type"].as_str(),
            events[0]["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("empty-ns"))
    );
    // Methods that make no sense: 405 with Allow.
    let (code, headers, _) = call(&t, reqwest::Method::PUT, VMS, Some(vm("x"))).await;
    assert_eq!(
        (code, headers["allow"].to_str().unwrap()),
        (405, "GET, POST, DELETE")
    );
    let (code, headers, _) = call(
        &t,
        reqwest::Method::POST,
        &format!("{VMS}/x"),
        Some(vm("x")),
    )
    .await;
    assert_eq!(
        (code, headers["allow"].to_str().unwrap()),
        (405, "GET, PUT, PATCH, DELETE")
    );
}

/// 100 merge patches without a resourceVersion on one object at once: every one lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_without_a_version_all_land() {
    let t = start().await;
    let vms = kind("vm");
    t.client
        .create(vms, Some("default"), &vm("hot"))
        .await
        .unwrap();
    let patches = (0..100).map(|i| {
        let client = &t.client;
        async move {
            let patch = json!({"metadata": {"labels": {format!("l{i}"): "x"}}});
            client
                .patch(vms, Some("default"), "hot", &patch, false)
                .await
        }
    });
    let results = futures::future::join_all(patches).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} patches failed: {:?}",
        failed.len(),
        failed.first()
    );
    let hot = t.client.get(vms, Some("default"), "hot").await.unwrap();
    assert_eq!(hot["metadata"]["labels"].as_object().unwrap().len(), 100);
}

/// A JSON patch sees the object as served, resourceVersion included, and a resourceVersion it
/// leaves different is a failed precondition: kubectl's migration of managed fields to
/// server-side apply patches this way.
#[tokio::test]
async fn json_patches_see_the_resource_version_as_a_precondition() {
    let t = start().await;
    let (_, _, made) = call(&t, reqwest::Method::POST, VMS, Some(vm("jp"))).await;
    let rv = made["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let patch = |ops: Value| {
        t.http()
            .patch(t.url(&format!("{VMS}/jp")))
            .bearer_auth(t.token())
            .header("content-type", "application/json-patch+json")
            .body(ops.to_string())
            .send()
    };
    let ok = patch(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "replace", "path": "/spec/resources/cpus", "value": 2},
        {"op": "replace", "path": "/metadata/resourceVersion", "value": rv}
    ]))
    .await
    .unwrap();
    assert_eq!(ok.status(), 200, "{}", ok.text().await.unwrap());
    // The object has moved on: the same resourceVersion is now stale.
    let stale = patch(json!([
        {"op": "replace", "path": "/spec/resources/cpus", "value": 3},
        {"op": "replace", "path": "/metadata/resourceVersion", "value": rv}
    ]))
    .await
    .unwrap();
    assert_eq!(stale.status(), 409);
    let now = t
        .client
        .get(kind("vm"), Some("default"), "jp")
        .await
        .unwrap();
    assert_eq!(now["spec"]["resources"]["cpus"], 2);
}

#[tokio::test]
async fn delete_with_preconditions_options_and_collections() {
    let t = start().await;
    let vms = kind("vm");
    let del = reqwest::Method::DELETE;
    let a = t
        .client
        .create(vms, Some("default"), &vm("a"))
        .await
        .unwrap();
    let (code, _, body) = call(&t, del.clone(), &format!("{VMS}/a"), Some(json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "not-its-uid"}}))).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("precondition"),
        "{body}"
    );
    let (code, _, _) = call(
        &t,
        del.clone(),
        &format!("{VMS}/a"),
        Some(json!({"preconditions": {"resourceVersion": "1"}})),
    )
    .await;
    assert_eq!(code, 409);
    // Compared as text, as Kubernetes does: a value this server never issued fails the same way.
    for rv in ["", "not-a-version"] {
        let (code, _, body) = call(
            &t,
            del.clone(),
            &format!("{VMS}/a"),
            Some(json!({"preconditions": {"resourceVersion": rv}})),
        )
        .await;
        assert_eq!(code, 409, "{rv:?}: {body}");
    }
    let resp = t
        .http()
        .delete(t.url(&format!("{VMS}/a")))
        .bearer_auth(t.token())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "a malformed body deletes nothing");
    assert!(t.client.get(vms, Some("default"), "a").await.is_ok());
    let uid = a["metadata"]["uid"].clone();
    let rv = a["metadata"]["resourceVersion"].clone();
    let (code, _, _) = call(
        &t,
        del.clone(),
        &format!("{VMS}/a"),
        Some(json!({"preconditions": {"uid": uid, "resourceVersion": rv}})),
    )
    .await;
    assert_eq!(code, 200);
    // A grace period is kept on an object that waits for finalizers.
    let mut held = vm("held");
    held["metadata"]["finalizers"] = json!(["example.com/hold"]);
    t.client.create(vms, Some("default"), &held).await.unwrap();
    let (code, _, body) = call(
        &t,
        del.clone(),
        &format!("{VMS}/held?gracePeriodSeconds=0"),
        None,
    )
    .await;
    assert_eq!(
        (code, body["metadata"]["deletionGracePeriodSeconds"].clone()),
        (202, json!(0))
    );
    let (code, _, _) = call(
        &t,
        del.clone(),
        &format!("{VMS}/held?propagationPolicy=Sideways"),
        None,
    )
    .await;
    assert_eq!(code, 400);
    // deletecollection deletes what the selector matches, nothing else.
    for (name, tier) in [("w1", "web"), ("w2", "web"), ("d1", "db")] {
        let mut v = vm(name);
        v["metadata"]["labels"] = json!({"tier": tier});
        t.client.create(vms, Some("default"), &v).await.unwrap();
    }
    let (code, _, body) = call(
        &t,
        del.clone(),
        &format!("{VMS}?labelSelector=tier%3Dweb"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 2);
    let left = t
        .client
        .list(vms, Some("default"), &Default::default())
        .await
        .unwrap();
    let mut names: Vec<&str> = left["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d1", "held"]);
}

#[tokio::test]
async fn a_resource_version_from_the_future_is_answered_not_hung() {
    let t = start().await;
    let current = t.server.objects.store().current_revision().await.unwrap();
    for watch in ["true", "false"] {
        let started = Instant::now();
        let (code, headers, body) = call(
            &t,
            reqwest::Method::GET,
            &format!("{VMS}?watch={watch}&resourceVersion={}", current + 1000),
            None,
        )
        .await;
        assert_eq!(code, 504, "{body}");
        assert_eq!(body["reason"], "Timeout");
        assert_eq!(
            body["details"]["causes"][0]["reason"],
            "ResourceVersionTooLarge"
        );
        assert_eq!(headers["retry-after"], "1");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

/// fieldValidation: Strict (the default) refuses unknown fields, Warn drops them with a
/// Warning header, Ignore drops them silently; unknown modes are 400.
#[tokio::test]
async fn unknown_fields_follow_field_validation() {
    let t = start().await;
    let mut body = vm("web");
    body["spec"]["colour"] = json!("red");
    body["metadata"]["mood"] = json!("calm");
    let post = |mode: &str, name: &str| {
        let mut b = body.clone();
        b["metadata"]["name"] = json!(name);
        let req = t
            .http()
            .post(t.url(&format!("{VMS}?fieldValidation={mode}")))
            .bearer_auth(t.token())
            .header("content-type", "application/json")
            .body(b.to_string());
        async move { req.send().await.unwrap() }
    };
    let strict = post("Strict", "a").await;
    assert_eq!(strict.status(), 422);
    let warn = post("Warn", "b").await;
    assert_eq!(warn.status(), 201);
    let warnings: Vec<String> = warn
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("299 - ") && w.contains("spec.colour")),
        "{warnings:?}"
    );
    let stored: Value = warn.json().await.unwrap();
    assert!(stored["spec"].get("colour").is_none());
    let ignore = post("Ignore", "c").await;
    assert_eq!(ignore.status(), 201);
    assert!(ignore.headers().get("warning").is_none());
    assert_eq!(post("Sometimes", "d").await.status(), 400);
}
