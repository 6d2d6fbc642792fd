//! Robustness: lagging watchers past compaction, concurrent writers, arbitrary bodies.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{kind, start, start_with, vm};
use flotilla_client::ListParams;
use flotilla_store::{SqliteOptions, SqliteStore, Store};
use futures::StreamExt;
use serde_json::json;

/// A watcher that falls so far behind that its next event was compacted gets an ERROR event
/// carrying 410, then the stream ends: it must relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_behind_compaction_gets_an_error_event() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open_with(
            dir.path().join("s.db"),
            SqliteOptions {
                watch_buffer: 16,
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let t = start_with(|c| c.store = Some(store.clone())).await;
    let vms = kind("vm");
    let rv = store.current_revision().await.unwrap().to_string();
    // A client without a total request timeout: the watch body streams for as long as the writes take.
    let streaming = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(t.server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let resp = streaming
        .get(t.url(&format!("/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines?watch=true&resourceVersion={rv}")))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Write far more than every buffer between the store and this (unread) connection holds.
    let padding = "x".repeat(16 * 1024);
    for i in 0..1500 {
        let mut body = vm(&format!("vm-{i}"));
        body["metadata"]["annotations"] = json!({"pad": padding});
        t.client.create(vms, Some("default"), &body).await.unwrap();
    }
    store
        .compact(store.current_revision().await.unwrap())
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let last = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk.unwrap());
        }
        buf
    })
    .await
    .expect("the stream ends after the error");
    let text = String::from_utf8(last).unwrap();
    let final_line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(final_line["type"], "ERROR");
    assert_eq!(final_line["object"]["code"], 410);
    let added = text
        .lines()
        .filter(|l| l.starts_with("{\"type\":\"ADDED\""))
        .count();
    assert!(
        added < 1500,
        "the watcher could not have seen every event ({added})"
    );
}

/// Merge patches retry internally on write races: concurrent clients lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_all_land() {
    let t = Arc::new(start().await);
    let vms = kind("vm");
    t.client
        .create(vms, Some("default"), &vm("shared"))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move {
                let patch = json!({"metadata": {"labels": {format!("writer-{i}"): "yes"}}});
                t.client
                    .patch(vms, Some("default"), "shared", &patch, false)
                    .await
                    .unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let obj = t.client.get(vms, Some("default"), "shared").await.unwrap();
    assert_eq!(obj["metadata"]["labels"].as_object().unwrap().len(), 20);
}

/// Whatever JSON arrives, the answer is 201 or a 4xx, never a 5xx, and nothing invalid is stored.
#[test]
fn arbitrary_bodies_never_cause_a_server_error() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = rt.block_on(start());
    let http = t.http();
    let url = t.url("/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines");
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-zA-Z0-9 ._/-]{0,12}".prop_map(|s| json!(s)),
        prop_oneof![Just("1Gi"), Just("web"), Just("Running"), Just("debian")]
            .prop_map(|s| json!(s)),
    ];
    let keys = prop_oneof![
        Just("metadata"),
        Just("spec"),
        Just("status"),
        Just("name"),
        Just("resources"),
        Just("cpus"),
        Just("memory"),
        Just("image"),
        Just("labels"),
        Just("kind"),
        Just("apiVersion"),
        Just("x")
    ];
    let value = leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(keys.clone(), inner, 0..5).prop_map(|m| {
                serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    });
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 200,
        ..Default::default()
    });
    runner
        .run(&value, |body| {
            let code = rt.block_on(async {
                http.post(&url)
                    .bearer_auth(t.token())
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            });
            prop_assert!(
                code == 201 || (400..500).contains(&code),
                "{code} for {body}"
            );
            Ok(())
        })
        .unwrap();
    let listed = rt
        .block_on(
            t.client
                .list(kind("vm"), Some("default"), &ListParams::default()),
        )
        .unwrap();
    for item in listed["items"].as_array().unwrap() {
        assert!(
            (kind("vm").validate)(item).is_ok(),
            "only valid objects are stored: {item}"
        );
    }
}
