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

/// A VM configuration; `finalizers` (a set: merged by value) stands for the lists that merge
/// item by item (a VM's networks are fixed at create, so they cannot show merging here).
fn config(cpus: u32, labels: &str, finalizers: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: web\n  labels: {{{labels}}}\n  finalizers: [{finalizers}]\nspec:\n  image: base\n  resources: {{cpus: {cpus}, memory: 1Gi}}\n"
    )
}

fn finalizers(object: &Value) -> Vec<&str> {
    object["metadata"]["finalizers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn apply_creates_owns_conflicts_forces_and_prunes() {
    let t = start().await;
    let (code, made) = apply(
        &t,
        Some("alice"),
        false,
        &config(2, "app: web, tier: front", "example.com/a, example.com/b"),
    )
    .await;
    assert_eq!(code, 201, "{made}");
    let managed = &made["metadata"]["managedFields"];
    assert_eq!(managed[0]["manager"], "alice");
    assert_eq!(managed[0]["operation"], "Apply");
    assert!(
        managed[0]["fieldsV1"]["f:metadata"]["f:finalizers"]["v:\"example.com/a\""].is_object(),
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
    // With force he takes it; alice keeps her other fields, and the finalizers merge by value.
    let bob = "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web, finalizers: [example.com/c]}\nspec:\n  resources: {cpus: 4}\n";
    let (code, forced) = apply(&t, Some("bob"), true, bob).await;
    assert_eq!(code, 200, "{forced}");
    assert_eq!(forced["spec"]["resources"]["cpus"], 4);
    assert_eq!(forced["spec"]["resources"]["memory"], "1Gi");
    assert_eq!(
        finalizers(&forced),
        ["example.com/a", "example.com/b", "example.com/c"]
    );

    // Alice stops applying finalizer b and the tier label: they go; cpus stays bob's 4.
    let alice = "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: web\n  labels: {app: web}\n  finalizers: [example.com/a]\nspec:\n  image: base\n  resources: {memory: 1Gi}\n";
    let (code, pruned) = apply(&t, Some("alice"), false, alice).await;
    assert_eq!(code, 200, "{pruned}");
    assert_eq!(finalizers(&pruned), ["example.com/a", "example.com/c"]);
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
