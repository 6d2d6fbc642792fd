//! Deleting VMs whose guest ignores ACPI (the tiny guest does), on real QEMU: a deletion does
//! not wait behind a graceful stop under way (60 s here), the default deletion destroys the
//! domain at once (its disks die with it), and `gracePeriodSeconds` gives the guest that long.

mod support;

use std::time::{Duration, Instant};

use flotilla_controllers::testkit::eventually;
use flotilla_types::registry::lookup;
use serde_json::json;
use support::{agent_with, join_token, tiny_guest, traversable_tempdir, DomainSweeper, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_do_not_wait_for_guests_that_ignore_acpi() {
    let guest = tiny_guest();
    let dir = traversable_tempdir();
    let tag = format!("d{:04x}", rand::random::<u16>());
    let _sweeper = DomainSweeper(format!("_{tag}-"));
    let server = Server::start(dir.path());
    let admin = server.admin().await;
    let token = join_token(&admin).await;
    let node = format!("del-{tag}");
    let _agent = agent_with(
        &server.url(),
        &token,
        &node,
        dir.path(),
        &["--shutdown-timeout", "60s"],
    );
    let vms = lookup("vm").unwrap();
    let (http, bearer) = (server.http(), server.admin_token());

    let running = |name: &str| {
        json!({"metadata": {"name": name}, "spec": {"nodeName": node,
            "resources": {"cpus": 1, "memory": "96Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0"}}})
    };
    for i in 0..3 {
        admin
            .create(vms, Some("default"), &running(&format!("{tag}-{i}")))
            .await
            .unwrap();
    }
    for i in 0..3 {
        let name = format!("{tag}-{i}");
        eventually(&format!("{name} runs"), 20, async || {
            (admin.get(vms, Some("default"), &name).await.ok()?["status"]["phase"] == "Running")
                .then_some(())
        })
        .await;
    }
    let gone_within = |name: String| {
        let admin = &admin;
        async move {
            let t = Instant::now();
            eventually(&format!("{name} is deleted"), 60, async || {
                admin
                    .get(vms, Some("default"), &name)
                    .await
                    .is_err_and(|e| e.code() == Some(404))
                    .then_some(())
            })
            .await;
            t.elapsed()
        }
    };

    // 0: asked to stop (the guest ignores it: the agent waits up to 60 s), then deleted.
    let stop = json!({"spec": {"powerState": "Stopped"}});
    admin
        .patch(vms, Some("default"), &format!("{tag}-0"), &stop, false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    admin
        .delete(vms, Some("default"), &format!("{tag}-0"))
        .await
        .unwrap();
    let overtaking = gone_within(format!("{tag}-0")).await;
    // 1: deleted plainly: destroyed at once.
    admin
        .delete(vms, Some("default"), &format!("{tag}-1"))
        .await
        .unwrap();
    let plain = gone_within(format!("{tag}-1")).await;
    // 2: deleted with a grace period of 4 s: the guest gets them (and ignores them).
    let resp = http
        .delete(format!(
            "{}/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines/{tag}-2?gracePeriodSeconds=4",
            server.url()
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let graceful = gone_within(format!("{tag}-2")).await;
    println!(
        "{{\"delete_during_stop_ms\":{},\"delete_ms\":{},\"delete_with_4s_grace_ms\":{}}}",
        overtaking.as_millis(),
        plain.as_millis(),
        graceful.as_millis()
    );
    assert!(
        overtaking < Duration::from_secs(15),
        "the deletion waited behind the stop: {overtaking:?}"
    );
    assert!(plain < Duration::from_secs(10), "{plain:?}");
    assert!(
        graceful >= Duration::from_secs(3) && graceful < Duration::from_secs(20),
        "the guest gets its grace period, no more: {graceful:?}"
    );
}
