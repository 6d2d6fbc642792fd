//! The control plane's backing graph, as a property: through the real API, random sequences of
//! volumes (blank, full and linked clones of volumes and of snapshots), snapshots and deletes;
//! a delete goes through exactly when nothing rests on what it deletes — no linked clone of a
//! volume or snapshot, no snapshot of a volume, no newer snapshot of the same volume — and is
//! refused with 409 otherwise, leaving the object in place. (libvirt would delete a backing
//! file without a word; the pools on the nodes refuse too, see flotilla-storage's tests.)

use std::collections::BTreeMap;

use flotilla_controllers::testkit::TestCluster;
use flotilla_types::registry::lookup;
use proptest::prelude::*;
use serde_json::json;

#[derive(Clone, Debug)]
enum Op {
    /// A volume: blank, or cloning volume/snapshot number `from` (modulo what exists).
    Volume {
        from: Option<(bool, usize)>,
        linked: bool,
    },
    Snapshot {
        of: usize,
    },
    DeleteVolume(usize),
    DeleteSnapshot(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (proptest::option::of((any::<bool>(), 0..8usize)), any::<bool>())
            .prop_map(|(from, linked)| Op::Volume { from, linked }),
        2 => (0..8usize).prop_map(|of| Op::Snapshot { of }),
        2 => (0..8usize).prop_map(Op::DeleteVolume),
        2 => (0..8usize).prop_map(Op::DeleteSnapshot),
    ]
}

/// What the test believes exists: volumes with their (linked) base, snapshots with their
/// volume, in creation order.
#[derive(Default)]
struct Model {
    volumes: BTreeMap<String, Option<String>>,
    snapshots: Vec<(String, String)>,
}

impl Model {
    fn volume_held(&self, v: &str) -> bool {
        self.volumes.values().any(|b| b.as_deref() == Some(v))
            || self.snapshots.iter().any(|(_, of)| of == v)
    }

    fn snapshot_held(&self, s: &str) -> bool {
        let key = format!("snapshot:{s}");
        let of = self.snapshots.iter().find(|(n, _)| n == s).map(|(_, v)| v);
        let newer = self
            .snapshots
            .iter()
            .skip_while(|(n, _)| n != s)
            .skip(1)
            .any(|(_, v)| Some(v) == of);
        newer
            || self
                .volumes
                .values()
                .any(|b| b.as_deref() == Some(key.as_str()))
    }
}

async fn run(cluster: &TestCluster, case: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let admin = &cluster.admin;
    let (volumes, snapshots) = (lookup("volume").unwrap(), lookup("volumesnapshot").unwrap());
    let project = format!("graph-{case}");
    admin
        .create(
            lookup("project").unwrap(),
            None,
            &json!({"metadata": {"name": project}}),
        )
        .await
        .unwrap();
    let ns = Some(project.as_str());
    let mut model = Model::default();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Volume { from, linked } => {
                let name = format!("v{i}");
                let mode = if linked { "linked" } else { "full" };
                let (source, base) = match from {
                    Some((true, n)) if !model.volumes.is_empty() => {
                        let v = model.volumes.keys().nth(n % model.volumes.len()).unwrap();
                        (
                            json!({"volume": v, "mode": mode}),
                            linked.then(|| v.clone()),
                        )
                    }
                    Some((false, n)) if !model.snapshots.is_empty() => {
                        let s = &model.snapshots[n % model.snapshots.len()].0;
                        (
                            json!({"snapshot": s, "mode": mode}),
                            linked.then(|| format!("snapshot:{s}")),
                        )
                    }
                    _ => (serde_json::Value::Null, None),
                };
                let mut spec = json!({"size": "1Gi"});
                if !source.is_null() {
                    spec["source"] = source;
                }
                let body = json!({"metadata": {"name": name}, "spec": spec});
                admin.create(volumes, ns, &body).await.unwrap();
                model.volumes.insert(name, base);
            }
            Op::Snapshot { of } => {
                if model.volumes.is_empty() {
                    continue;
                }
                let v = model
                    .volumes
                    .keys()
                    .nth(of % model.volumes.len())
                    .unwrap()
                    .clone();
                let name = format!("s{i}");
                let body = json!({"metadata": {"name": name}, "spec": {"volume": v}});
                admin.create(snapshots, ns, &body).await.unwrap();
                model.snapshots.push((name, v));
            }
            Op::DeleteVolume(n) => {
                if model.volumes.is_empty() {
                    continue;
                }
                let v = model
                    .volumes
                    .keys()
                    .nth(n % model.volumes.len())
                    .unwrap()
                    .clone();
                let held = model.volume_held(&v);
                let result = admin.delete(volumes, ns, &v).await;
                match (held, result) {
                    (false, Ok(_)) => {
                        model.volumes.remove(&v);
                    }
                    (true, Err(e)) if e.code() == Some(409) => {
                        prop_assert!(admin.get(volumes, ns, &v).await.is_ok(), "{v} stays");
                    }
                    (held, result) => {
                        return Err(TestCaseError::fail(format!(
                            "deleting volume {v} (held: {held}) answered {result:?}"
                        )))
                    }
                }
            }
            Op::DeleteSnapshot(n) => {
                if model.snapshots.is_empty() {
                    continue;
                }
                let s = model.snapshots[n % model.snapshots.len()].0.clone();
                let held = model.snapshot_held(&s);
                let result = admin.delete(snapshots, ns, &s).await;
                match (held, result) {
                    (false, Ok(_)) => model.snapshots.retain(|(name, _)| *name != s),
                    (true, Err(e)) if e.code() == Some(409) => {
                        prop_assert!(admin.get(snapshots, ns, &s).await.is_ok(), "{s} stays");
                    }
                    (held, result) => {
                        return Err(TestCaseError::fail(format!(
                            "deleting snapshot {s} (held: {held}) answered {result:?}"
                        )))
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn nothing_that_something_rests_on_is_deleted() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Without controllers: volumes stay Pending (no agent makes them, no finalizer holds
    // them), so only the API's own rules decide.
    let cluster = runtime.block_on(TestCluster::without_controllers());
    let case = std::sync::atomic::AtomicUsize::new(0);
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in proptest::collection::vec(op(), 1..24))| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(run(&cluster, n, ops))?;
    });
}
