//! Bad input: each gets a clear 4xx naming the problem, never a 5xx, never a partial write.

mod common;

use common::{kind, start, TestServer};
use flotilla_client::ListParams;
use serde_json::Value;

const VMS: &str = "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines";

async fn send(
    t: &TestServer,
    method: reqwest::Method,
    path: &str,
    ct: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let resp = t
        .http()
        .request(method, t.url(path))
        .bearer_auth(t.token())
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let code = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (code, body)
}

async fn post(t: &TestServer, path: &str, ct: &str, body: &str) -> (u16, Value) {
    send(t, reqwest::Method::POST, path, ct, body.to_string()).await
}

async fn vm_count(t: &TestServer) -> usize {
    t.client
        .list(kind("vm"), None, &ListParams::default())
        .await
        .unwrap()["items"]
        .as_array()
        .unwrap()
        .len()
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn each_kind_of_bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let t = start().await;
    let good = r#"{"metadata":{"name":"web"},"spec":{"resources":{"cpus":1,"memory":"1Gi"},"image":"deb"}}"#;
    let cases: Vec<(&str, String, &str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            VMS.into(),
            "application/json",
            r#"{"metadata": {"name": "web""#.into(),
            400,
            "not valid JSON",
        ),
        (
            "malformed YAML",
            VMS.into(),
            "application/yaml",
            "metadata: [unclosed\n  name: x".into(),
            400,
            "not valid YAML",
        ),
        (
            "empty body",
            VMS.into(),
            "application/json",
            "".into(),
            400,
            "empty",
        ),
        (
            "not an object",
            VMS.into(),
            "application/json",
            "[1,2]".into(),
            400,
            "must be a VirtualMachine object",
        ),
        (
            "unknown kind",
            "/apis/flotilla.dev/v1alpha1/namespaces/default/pods".into(),
            "application/json",
            good.into(),
            404,
            "no resource \"pods\"",
        ),
        (
            "kind mismatch",
            VMS.into(),
            "application/json",
            good.replace("{\"metadata\"", "{\"kind\":\"Node\",\"metadata\"")
                .to_string(),
            400,
            "does not match the path",
        ),
        (
            "wrong apiVersion",
            VMS.into(),
            "application/json",
            good.replace("{\"metadata\"", "{\"apiVersion\":\"v1\",\"metadata\"")
                .to_string(),
            400,
            "not served here",
        ),
        (
            "unknown field",
            VMS.into(),
            "application/json",
            good.replace("\"image\"", "\"gpus\":1,\"image\"")
                .to_string(),
            422,
            "spec.gpus: unknown field `gpus`",
        ),
        (
            "mistyped field",
            VMS.into(),
            "application/json",
            good.replace("\"cpus\":1", "\"cpus\":\"one\"").to_string(),
            422,
            "spec.resources.cpus: invalid type",
        ),
        (
            "bad quantity",
            VMS.into(),
            "application/json",
            good.replace("1Gi", "1GB").to_string(),
            422,
            "spec.resources.memory: invalid quantity",
        ),
        (
            "invalid name",
            VMS.into(),
            "application/json",
            good.replace("\"web\"", "\"Web_1\"").to_string(),
            422,
            "metadata.name: \"Web_1\" must be a DNS-1123 label",
        ),
        (
            "missing spec",
            VMS.into(),
            "application/json",
            r#"{"metadata":{"name":"web"}}"#.into(),
            422,
            "spec: is required",
        ),
        (
            "wrong project",
            "/apis/flotilla.dev/v1alpha1/namespaces/nope/virtualmachines".into(),
            "application/json",
            good.into(),
            404,
            "Project \"nope\" not found",
        ),
        (
            "project mismatch",
            VMS.into(),
            "application/json",
            good.replace(
                "\"name\":\"web\"",
                "\"name\":\"web\",\"namespace\":\"other\"",
            )
            .to_string(),
            400,
            "does not match the project",
        ),
        (
            "unsupported content type",
            VMS.into(),
            "text/plain",
            good.into(),
            415,
            "application/json",
        ),
        (
            "unknown subresource",
            format!("{VMS}/web/frobnicate"),
            "application/json",
            good.into(),
            404,
            "subresource",
        ),
        (
            "cluster kind in a project",
            "/apis/flotilla.dev/v1alpha1/namespaces/default/nodes".into(),
            "application/json",
            r#"{"metadata":{"name":"n"}}"#.into(),
            404,
            "cluster-scoped",
        ),
    ];
    for (what, path, ct, body, code, needle) in cases {
        let (got, status) = post(&t, &path, ct, &body).await;
        assert_eq!(got, code, "{what}: {status}");
        assert_eq!(
            status["kind"], "Status",
            "{what}: errors are Status objects"
        );
        assert!(
            message(&status).contains(needle),
            "{what}: {:?} should mention {needle:?}",
            message(&status)
        );
    }
    assert_eq!(vm_count(&t).await, 0, "nothing was written");
    // Invalid objects list every cause with its field path.
    let (_, status) = post(
        &t,
        VMS,
        "application/json",
        &good
            .replace("\"cpus\":1", "\"cpus\":0")
            .replace("\"web\"", "\"Web\""),
    )
    .await;
    let causes: Vec<&str> = status["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(causes, ["metadata.name", "spec.resources.cpus"]);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let t = start().await;
    let big = format!(
        r#"{{"metadata":{{"name":"web","annotations":{{"a":"{}"}}}}}}"#,
        "x".repeat(4 << 20)
    );
    let (code, status) = post(&t, VMS, "application/json", &big).await;
    assert_eq!(code, 413);
    assert!(message(&status).contains("larger than"), "{status}");
    // Also when the client streams without announcing a length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b' '; 1 << 20])).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (code, _) = send(&t, reqwest::Method::POST, VMS, "application/json", body).await;
    assert_eq!(code, 413);
    assert_eq!(vm_count(&t).await, 0);
}

#[tokio::test]
async fn bad_updates_leave_the_object_as_it_was() {
    let t = start().await;
    let vms = kind("vm");
    let created = t
        .client
        .create(vms, Some("default"), &common::vm("web"))
        .await
        .unwrap();
    let path = format!("{VMS}/web");
    let (code, s) = send(
        &t,
        reqwest::Method::PUT,
        &path,
        "application/json",
        r#"{"metadata":{"name":"other"},"spec":{}}"#,
    )
    .await;
    assert_eq!(code, 400, "{s}");
    let (code, s) = send(
        &t,
        reqwest::Method::PATCH,
        &path,
        "application/merge-patch+json",
        r#"{"spec":{"resources":{"memory":"lots"}}}"#,
    )
    .await;
    assert_eq!(code, 422, "{s}");
    assert!(message(&s).contains("spec.resources.memory"));
    let (code, _) = send(
        &t,
        reqwest::Method::PATCH,
        &path,
        "application/json-patch+json",
        r#"[{"op":"remove","path":"/spec/nothing"}]"#,
    )
    .await;
    assert_eq!(code, 422);
    let (code, _) = send(
        &t,
        reqwest::Method::PATCH,
        &path,
        "application/merge-patch+json",
        "[]",
    )
    .await;
    assert_eq!(code, 400);
    // (DELETE on the collection is deletecollection, as in Kubernetes: not a bad request.)
    let (code, _) = send(&t, reqwest::Method::PUT, VMS, "application/json", "{}").await;
    assert_eq!(code, 405);
    let (code, s) = send(
        &t,
        reqwest::Method::GET,
        &format!("{VMS}?limit=ten"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 400);
    assert!(message(&s).contains("limit"));
    let (code, _) = send(
        &t,
        reqwest::Method::GET,
        &format!("{VMS}?labelSelector=a%20in%20b"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 400);
    let (code, _) = send(
        &t,
        reqwest::Method::GET,
        &format!("{VMS}?continue=garbage"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 400);
    let (code, _) = send(
        &t,
        reqwest::Method::GET,
        &format!("{VMS}?watch=true&resourceVersion=abc"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        t.client.get(vms, Some("default"), "web").await.unwrap(),
        created,
        "the object is unchanged"
    );
}
