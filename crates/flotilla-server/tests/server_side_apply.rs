//! Server-side apply over HTTP (`application/apply-patch+yaml`), as kubectl apply --server-side,
//! Flux and Argo CD use it: create by apply (201), ownership in managedFields, 409 naming the
//! fields and their managers, force, fields a manager stops applying removed, and the rules
//! (fieldManager required, force only for apply, managedFields not writable by clients).

mod common;

use common::{kind, start, TestServer};
use serde_json::{json, Value};

const VM: &str = "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines/web";

async fn apply(t: &TestServer, manager: Option<&str>, force: bool, yaml: &str) -> (u16, Value) {
    let mut url = format!("{VM}?");
    if let Some(m) = manager {
        url.push_str(&format!("fieldManager={m}&"));
    }
    if force {
        url.push_str("force=true");
    }
    let resp = t
        .http()
        .patch(t.url(&url))
        .bearer_auth(t.token())
        .header("content-type", "application/apply-patch+yaml")
        .body(yaml.to_string())
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

fn config(cpus: u32, labels: &str, networks: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: web\n  labels: {{{labels}}}\nspec:\n  image: base\n  resources: {{cpus: {cpus}, memory: 1Gi}}\n  networks: [{networks}]\n"
    )
}

#[tokio::test]
async fn apply_creates_owns_conflicts_forces_and_prunes() {
    let t = start().await;
    let (code, made) = apply(
        &t,
        Some("alice"),
        false,
        &config(2, "app: web, tier: front", "{network: a}, {network: b}"),
    )
    .await;
    assert_eq!(code, 201, "{made}");
    let managed = &made["metadata"]["managedFields"];
    assert_eq!(managed[0]["manager"], "alice");
    assert_eq!(managed[0]["operation"], "Apply");
    assert!(
        managed[0]["fieldsV1"]["f:spec"]["f:networks"]["k:{\"network\":\"a\"}"]["."].is_object(),
        "{managed}"
    );

    // Bob wants 4 CPUs: refused, naming the field and its manager.
    let (code, err) = apply(&t, Some("bob"), false, &config(4, "", "")).await;
    assert_eq!(code, 409, "{err}");
    assert_eq!(err["reason"], "Conflict");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("conflict with \"alice\""),
        "{err}"
    );
    assert_eq!(err["details"]["causes"][0]["field"], ".spec.resources.cpus");
    // With force he takes it; alice keeps her other fields, and the networks merge by name.
    let bob = "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web}\nspec:\n  resources: {cpus: 4}\n  networks: [{network: c}]\n";
    let (code, forced) = apply(&t, Some("bob"), true, bob).await;
    assert_eq!(code, 200, "{forced}");
    assert_eq!(forced["spec"]["resources"]["cpus"], 4);
    assert_eq!(forced["spec"]["resources"]["memory"], "1Gi");
    let names: Vec<&str> = forced["spec"]["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["network"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);

    // Alice stops applying network b and the tier label: they go; cpus stays bob's 4.
    let alice = "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  image: base\n  resources: {memory: 1Gi}\n  networks: [{network: a}]\n";
    let (code, pruned) = apply(&t, Some("alice"), false, alice).await;
    assert_eq!(code, 200, "{pruned}");
    let names: Vec<&str> = pruned["spec"]["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["network"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(pruned["metadata"]["labels"], json!({"app": "web"}));
    assert_eq!(pruned["spec"]["resources"]["cpus"], 4);

    // A merge patch is an Update: its manager takes over what it changed, so alice applying
    // her old image value back now conflicts with it.
    let resp = t
        .http()
        .patch(t.url(&format!("{VM}?fieldManager=editor")))
        .bearer_auth(t.token())
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"spec": {"image": "other"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (code, err) = apply(&t, Some("alice"), false, alice).await;
    assert_eq!(code, 409);
    assert!(
        err["message"].as_str().unwrap().contains("\"editor\""),
        "{err}"
    );

    // The rules.
    let (code, _) = apply(&t, None, false, alice).await;
    assert_eq!(code, 400, "fieldManager is required");
    let resp = t
        .http()
        .patch(t.url(&format!("{VM}?force=true")))
        .bearer_auth(t.token())
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"metadata": {"labels": {"x": "y"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "force is only for apply");
    let before = t
        .client
        .get(kind("vm"), Some("default"), "web")
        .await
        .unwrap();
    let forged = json!({"metadata": {"managedFields": [{"manager": "mallory", "operation": "Apply", "fieldsV1": {}}]}});
    let after = t
        .client
        .patch(kind("vm"), Some("default"), "web", &forged, false)
        .await
        .unwrap();
    assert_eq!(
        after["metadata"]["managedFields"], before["metadata"]["managedFields"],
        "managedFields are the server's"
    );
}
