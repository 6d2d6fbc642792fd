//! Watch over HTTP: events, resume from a resourceVersion, 410 after compaction, bookmarks,
//! selector transitions.

mod common;

use std::time::Duration;

use common::{kind, start, start_with, vm};
use flotilla_client::{ListParams, WatchEvent};
use futures::{Stream, StreamExt};
use serde_json::json;

async fn next<S: Stream<Item = Result<WatchEvent, flotilla_client::ClientError>> + Unpin>(
    w: &mut S,
) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap()
}

async fn next_non_bookmark<
    S: Stream<Item = Result<WatchEvent, flotilla_client::ClientError>> + Unpin,
>(
    w: &mut S,
) -> WatchEvent {
    loop {
        let ev = next(w).await;
        if ev.type_ != "BOOKMARK" {
            return ev;
        }
    }
}

fn name(ev: &WatchEvent) -> &str {
    ev.object["metadata"]["name"].as_str().unwrap()
}

#[tokio::test]
async fn watch_lists_then_streams_changes() {
    let t = start().await;
    let vms = kind("vm");
    t.client
        .create(vms, Some("default"), &vm("before"))
        .await
        .unwrap();
    let mut w = Box::pin(
        t.client
            .watch(vms, Some("default"), &ListParams::default(), None)
            .await
            .unwrap(),
    );
    let first = next(&mut w).await;
    assert_eq!(
        (first.type_.as_str(), name(&first)),
        ("ADDED", "before"),
        "a watch without a version starts with what exists"
    );
    t.client
        .create(vms, Some("default"), &vm("after"))
        .await
        .unwrap();
    t.client
        .patch(
            vms,
            Some("default"),
            "after",
            &json!({"spec": {"powerState": "Stopped"}}),
            false,
        )
        .await
        .unwrap();
    t.client
        .delete(vms, Some("default"), "after")
        .await
        .unwrap();
    let kinds: Vec<String> = [next(&mut w).await, next(&mut w).await, next(&mut w).await]
        .iter()
        .map(|e| format!("{} {}", e.type_, name(e)))
        .collect();
    assert_eq!(kinds, ["ADDED after", "MODIFIED after", "DELETED after"]);
}

#[tokio::test]
async fn watch_resumes_exactly_after_a_resource_version() {
    let t = start().await;
    let vms = kind("vm");
    let a = t
        .client
        .create(vms, Some("default"), &vm("a"))
        .await
        .unwrap();
    t.client
        .create(vms, Some("default"), &vm("b"))
        .await
        .unwrap();
    t.client
        .create(vms, Some("default"), &vm("c"))
        .await
        .unwrap();
    let rv = a["metadata"]["resourceVersion"].as_str().unwrap();
    let mut w = Box::pin(
        t.client
            .watch(vms, Some("default"), &ListParams::default(), Some(rv))
            .await
            .unwrap(),
    );
    assert_eq!(name(&next(&mut w).await), "b");
    assert_eq!(name(&next(&mut w).await), "c");
    // Other projects' changes are not part of this watch.
    t.client
        .create(
            kind("project"),
            None,
            &json!({"metadata": {"name": "other"}}),
        )
        .await
        .unwrap();
    t.client.create(vms, Some("other"), &vm("x")).await.unwrap();
    t.client
        .create(vms, Some("default"), &vm("d"))
        .await
        .unwrap();
    assert_eq!(name(&next(&mut w).await), "d");
}

#[tokio::test]
async fn a_compacted_resource_version_answers_410() {
    let t = start().await;
    let vms = kind("vm");
    let a = t
        .client
        .create(vms, Some("default"), &vm("a"))
        .await
        .unwrap();
    let b = t
        .client
        .create(vms, Some("default"), &vm("b"))
        .await
        .unwrap();
    let store = t.server.objects.store().clone();
    let rv_b: i64 = b["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    store.compact(rv_b).await.unwrap();
    let old = a["metadata"]["resourceVersion"].as_str().unwrap();
    let resp = t
        .http()
        .get(t.url(&format!("/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines?watch=true&resourceVersion={old}")))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 410);
    let status: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status["reason"], "Expired");
    assert!(
        status["message"].as_str().unwrap().contains("list again"),
        "{status}"
    );
    // From the compaction point on, watching works.
    let mut w = Box::pin(
        t.client
            .watch(
                vms,
                Some("default"),
                &ListParams::default(),
                Some(&rv_b.to_string()),
            )
            .await
            .unwrap(),
    );
    t.client
        .create(vms, Some("default"), &vm("c"))
        .await
        .unwrap();
    assert_eq!(name(&next(&mut w).await), "c");
}

#[tokio::test]
async fn bookmarks_carry_a_resumable_version() {
    let t = start_with(|c| c.bookmark_interval = Duration::from_millis(200)).await;
    let vms = kind("vm");
    let mut w = Box::pin(
        t.client
            .watch(vms, Some("default"), &ListParams::default(), None)
            .await
            .unwrap(),
    );
    t.client
        .create(vms, Some("default"), &vm("a"))
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.type_, "ADDED");
    let bm = loop {
        let ev = next(&mut w).await;
        if ev.type_ == "BOOKMARK" {
            break ev;
        }
    };
    let rv = bm.object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    drop(w);
    t.client
        .create(vms, Some("default"), &vm("b"))
        .await
        .unwrap();
    let mut resumed = Box::pin(
        t.client
            .watch(vms, Some("default"), &ListParams::default(), Some(&rv))
            .await
            .unwrap(),
    );
    let ev = next_non_bookmark(&mut resumed).await;
    assert_eq!(
        (ev.type_.as_str(), name(&ev)),
        ("ADDED", "b"),
        "resuming from a bookmark misses nothing and repeats nothing"
    );
}

#[tokio::test]
async fn selectors_turn_transitions_into_added_and_deleted() {
    let t = start().await;
    let vms = kind("vm");
    let params = ListParams {
        label_selector: Some("tier=web".into()),
        ..Default::default()
    };
    let mut w = Box::pin(
        t.client
            .watch(vms, Some("default"), &params, None)
            .await
            .unwrap(),
    );
    t.client
        .create(vms, Some("default"), &vm("x"))
        .await
        .unwrap();
    t.client
        .patch(
            vms,
            Some("default"),
            "x",
            &json!({"metadata": {"labels": {"tier": "web"}}}),
            false,
        )
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert_eq!(
        (ev.type_.as_str(), name(&ev)),
        ("ADDED", "x"),
        "starting to match is an ADDED"
    );
    t.client
        .patch(
            vms,
            Some("default"),
            "x",
            &json!({"metadata": {"labels": {"tier": "db"}}}),
            false,
        )
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert_eq!(ev.type_, "DELETED", "no longer matching is a DELETED");
    let fields = ListParams {
        field_selector: Some("spec.nodeName=n1".into()),
        ..Default::default()
    };
    let mut w = Box::pin(t.client.watch(vms, None, &fields, None).await.unwrap());
    let mut pinned = vm("pinned");
    pinned["spec"]["nodeName"] = json!("n1");
    t.client
        .create(vms, Some("default"), &vm("unpinned"))
        .await
        .unwrap();
    t.client
        .create(vms, Some("default"), &pinned)
        .await
        .unwrap();
    assert_eq!(name(&next(&mut w).await), "pinned");
}

#[tokio::test]
async fn a_hundred_watchers_all_see_every_event() {
    let t = start().await;
    let vms = kind("vm");
    let mut watchers = Vec::new();
    for _ in 0..100 {
        watchers.push(Box::pin(
            t.client
                .watch(vms, Some("default"), &ListParams::default(), Some("1"))
                .await
                .unwrap(),
        ));
    }
    for i in 0..5 {
        t.client
            .create(vms, Some("default"), &vm(&format!("v{i}")))
            .await
            .unwrap();
    }
    for w in watchers.iter_mut() {
        for i in 0..5 {
            assert_eq!(name(&next_non_bookmark(w).await), format!("v{i}"));
        }
    }
}

/// Watchers of one node each (as agents are) share one store watch, routed by spec.nodeName:
/// each sees exactly the VMs bound to its node, moves in and out included, and a watcher
/// resuming from an older resourceVersion gets what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_watchers_see_exactly_their_own_vms() {
    let t = start().await;
    let vms = kind("vm");
    let on = |node: &str| ListParams {
        field_selector: Some(format!("spec.nodeName={node}")),
        ..Default::default()
    };
    let mut a = Box::pin(
        t.client
            .watch(vms, None, &on("node-a"), None)
            .await
            .unwrap(),
    );
    let mut b = Box::pin(
        t.client
            .watch(vms, None, &on("node-b"), None)
            .await
            .unwrap(),
    );
    let mut unbound = Box::pin(t.client.watch(vms, None, &on(""), None).await.unwrap());
    let bound_to = |name: &str, node: &str| {
        let mut v = vm(name);
        v["spec"]["nodeName"] = json!(node);
        v
    };
    let first = t
        .client
        .create(vms, Some("default"), &bound_to("one", "node-a"))
        .await
        .unwrap();
    t.client
        .create(vms, Some("default"), &bound_to("two", "node-b"))
        .await
        .unwrap();
    t.client
        .create(vms, Some("default"), &vm("three"))
        .await
        .unwrap();
    let ev = next_non_bookmark(&mut a).await;
    assert_eq!((ev.type_.as_str(), name(&ev)), ("ADDED", "one"));
    let ev = next_non_bookmark(&mut b).await;
    assert_eq!((ev.type_.as_str(), name(&ev)), ("ADDED", "two"));
    let ev = next_non_bookmark(&mut unbound).await;
    assert_eq!((ev.type_.as_str(), name(&ev)), ("ADDED", "three"));

    // "one" moves from node-a to node-b: DELETED for a, ADDED for b. Clients cannot change a
    // binding (spec.nodeName is set once); a migration does, by writing the store, as here.
    let key = flotilla_server::objects::object_key(vms, Some("default"), "one");
    let store = t.server.objects.store();
    let mut stored: serde_json::Value =
        serde_json::from_slice(&store.get(&key).await.unwrap().unwrap().value).unwrap();
    stored["spec"]["nodeName"] = json!("node-b");
    store
        .put(&key, serde_json::to_vec(&stored).unwrap())
        .await
        .unwrap();
    let ev = next_non_bookmark(&mut a).await;
    assert_eq!((ev.type_.as_str(), name(&ev)), ("DELETED", "one"));
    let ev = next_non_bookmark(&mut b).await;
    assert_eq!((ev.type_.as_str(), name(&ev)), ("ADDED", "one"));
    t.client.delete(vms, Some("default"), "two").await.unwrap();
    let ev = next_non_bookmark(&mut b).await;
    assert_eq!((ev.type_.as_str(), name(&ev)), ("DELETED", "two"));
    // Nothing else reached node-a's watcher.
    let quiet = tokio::time::timeout(Duration::from_millis(300), a.next()).await;
    assert!(quiet.is_err() || quiet.unwrap().unwrap().unwrap().type_ == "BOOKMARK");

    // Resuming node-b's watch from the first create replays its history in order.
    let rv = first["metadata"]["resourceVersion"].as_str().unwrap();
    let mut again = Box::pin(
        t.client
            .watch(vms, None, &on("node-b"), Some(rv))
            .await
            .unwrap(),
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = next_non_bookmark(&mut again).await;
        seen.push(format!("{} {}", ev.type_, name(&ev)));
    }
    assert_eq!(seen, ["ADDED two", "ADDED one", "DELETED two"]);
}
