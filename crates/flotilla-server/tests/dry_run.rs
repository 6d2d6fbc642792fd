//! `?dryRun=All` on every write: the full path runs (validation, conflicts, guards) and the
//! answer is what would have been stored, but the store's revision does not move and no watcher
//! sees anything. `kubectl diff` and `--dry-run=server` rely on it.

mod common;

use std::time::Duration;

use common::{kind, start, vm};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn dry_runs_answer_fully_and_store_nothing() {
    let t = start().await;
    let vms = kind("vm");
    let base = t.url("/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines");
    let http = t.http();
    let created = t
        .client
        .create(vms, Some("default"), &vm("web"))
        .await
        .unwrap();
    let mut held = vm("held");
    held["metadata"]["finalizers"] = json!(["example.com/hold"]);
    t.client.create(vms, Some("default"), &held).await.unwrap();
    let store = t.server.objects.store().clone();
    let revision = store.current_revision().await.unwrap();
    let mut watch = Box::pin(
        t.client
            .watch(
                vms,
                Some("default"),
                &Default::default(),
                Some(&revision.to_string()),
            )
            .await
            .unwrap(),
    );
    let send = |method: reqwest::Method, url: String, body: Option<(&str, Value)>| {
        let mut req = http.request(method, url).bearer_auth(t.token());
        if let Some((ct, b)) = body {
            req = req.header("content-type", ct).body(b.to_string());
        }
        async move {
            let resp = req.send().await.unwrap();
            let code = resp.status().as_u16();
            (code, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let json_ct = "application/json";

    // Create: the answer is the object with its defaults and a uid.
    let (code, body) = send(
        reqwest::Method::POST,
        format!("{base}?dryRun=All"),
        Some((json_ct, vm("new"))),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        body["spec"]["powerState"], "Running",
        "defaults are filled in"
    );
    assert!(body["metadata"]["uid"].is_string());
    // ... and what a real create would refuse is refused.
    let (code, _) = send(
        reqwest::Method::POST,
        format!("{base}?dryRun=All"),
        Some((json_ct, vm("web"))),
    )
    .await;
    assert_eq!(code, 409, "the name is taken");
    let mut bad = vm("bad");
    bad["spec"]["resources"]["cpus"] = json!(0);
    let (code, _) = send(
        reqwest::Method::POST,
        format!("{base}?dryRun=All"),
        Some((json_ct, bad)),
    )
    .await;
    assert_eq!(code, 422);

    // Replace, merge patch, status patch.
    let mut replaced = created.clone();
    replaced["spec"]["powerState"] = json!("Stopped");
    let (code, body) = send(
        reqwest::Method::PUT,
        format!("{base}/web?dryRun=All"),
        Some((json_ct, replaced.clone())),
    )
    .await;
    assert_eq!(
        (code, body["spec"]["powerState"].clone()),
        (200, json!("Stopped")),
        "{body}"
    );
    assert_eq!(body["metadata"]["generation"], 2);
    let mut stale = replaced.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    let (code, _) = send(
        reqwest::Method::PUT,
        format!("{base}/web?dryRun=All"),
        Some((json_ct, stale)),
    )
    .await;
    assert_eq!(code, 409, "a stale resourceVersion conflicts");
    let (code, body) = send(
        reqwest::Method::PATCH,
        format!("{base}/web?dryRun=All"),
        Some((
            "application/merge-patch+json",
            json!({"metadata": {"labels": {"tier": "web"}}}),
        )),
    )
    .await;
    assert_eq!(
        (code, body["metadata"]["labels"]["tier"].clone()),
        (200, json!("web"))
    );
    let (code, body) = send(
        reqwest::Method::PATCH,
        format!("{base}/web/status?dryRun=All"),
        Some((
            "application/merge-patch+json",
            json!({"status": {"phase": "Running"}}),
        )),
    )
    .await;
    assert_eq!(
        (code, body["status"]["phase"].clone()),
        (200, json!("Running"))
    );

    // Delete: without finalizers it would be gone; with them, marked.
    let (code, _) = send(
        reqwest::Method::DELETE,
        format!("{base}/web?dryRun=All"),
        None,
    )
    .await;
    assert_eq!(code, 200);
    let (code, body) = send(
        reqwest::Method::DELETE,
        format!("{base}/held?dryRun=All"),
        None,
    )
    .await;
    assert_eq!(code, 202);
    assert!(body["metadata"]["deletionTimestamp"].is_string());
    let (code, _) = send(
        reqwest::Method::DELETE,
        format!(
            "{}?dryRun=All",
            t.url("/apis/flotilla.dev/v1alpha1/projects/default")
        ),
        None,
    )
    .await;
    assert_eq!(
        code, 403,
        "what is refused for real is refused in a dry run"
    );

    // Unknown values are refused.
    let (code, body) = send(
        reqwest::Method::DELETE,
        format!("{base}/web?dryRun=Yes"),
        None,
    )
    .await;
    assert_eq!(code, 400, "{body}");

    assert_eq!(
        store.current_revision().await.unwrap(),
        revision,
        "nothing was written"
    );
    assert!(t.client.get(vms, Some("default"), "web").await.is_ok());
    assert!(t.client.get(vms, Some("default"), "new").await.is_err());
    let held_now = t.client.get(vms, Some("default"), "held").await.unwrap();
    assert!(held_now["metadata"].get("deletionTimestamp").is_none());
    let quiet = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
    assert!(
        quiet.is_err() || quiet.unwrap().unwrap().unwrap().type_ == "BOOKMARK",
        "no watch event"
    );
}
