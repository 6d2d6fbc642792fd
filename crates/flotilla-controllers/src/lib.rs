//! Control loops that run inside the server process. Each is level-triggered and idempotent: it
//! can stop at any point and, when it starts again, converges from what the store holds.

pub mod compactor;
pub mod evacuation;
pub mod event_ttl;
pub mod events;
pub mod garbage_collector;
pub mod ipam_sweeper;
pub mod leader;
pub mod migrations;
pub mod network_status;
pub mod node_lifecycle;
pub mod placement;
pub mod routers;
pub mod scheduler;
pub mod security_groups;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod volumes;

use std::time::Duration;

use flotilla_server::Objects;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// History is kept for at least this long (watch resume window); 0 = never compact.
    pub compaction_interval: Duration,
    /// Full garbage-collection sweeps at least this often, besides the ones deletions trigger.
    pub gc_resync: Duration,
    /// A node whose heartbeat lease is older than this is no longer Ready.
    pub node_grace: Duration,
    /// Spread VMs over the fleet (least allocated first) or pack them (most allocated first).
    pub placement: placement::Strategy,
    /// Events last seen longer ago than this are deleted; 0 = kept forever.
    pub event_ttl: Duration,
    /// A node has failed once its lease has not changed for its duration plus this; its VMs
    /// are recovered then (see [`evacuation`]).
    pub evacuation_margin: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            compaction_interval: Duration::from_secs(300),
            gc_resync: Duration::from_secs(60),
            node_grace: Duration::from_secs(10),
            placement: placement::Strategy::Spread,
            event_ttl: Duration::from_secs(3600),
            evacuation_margin: Duration::from_secs(5),
        }
    }
}

/// Merges `patch` into the status of `kind` `project`/`name`; 1 when written, 0 when the
/// object is gone (nothing to report on), an error otherwise.
pub async fn write_status(
    objects: &flotilla_server::objects::Objects,
    kind: &str,
    project: &str,
    name: &str,
    patch: serde_json::Value,
) -> Result<usize, flotilla_server::ApiError> {
    let kind = flotilla_types::registry::by_kind(kind).expect("registered");
    match objects
        .patch(
            kind,
            Some(project),
            name,
            flotilla_server::objects::PatchBody::Merge(patch),
            flotilla_server::objects::Subresource::Status,
        )
        .await
    {
        Ok(_) => Ok(1),
        Err(e) if e.code() == 404 => Ok(0),
        Err(e) => Err(e),
    }
}

/// Every object of `kind`, as `T` (those that do not decode are left out).
pub(crate) async fn list_all<T: flotilla_types::Resource>(
    objects: &Objects,
    kind: &str,
) -> Result<Vec<T>, flotilla_server::ApiError> {
    let kind = flotilla_types::registry::by_kind(kind).expect("registered");
    Ok(objects
        .list(
            kind,
            None,
            &flotilla_server::objects::ListOptions::default(),
        )
        .await?
        .items
        .iter()
        .filter_map(|raw| serde_json::from_slice(raw).ok())
        .collect())
}

/// Starts every controller; they run until the runtime stops.
pub fn spawn_all(objects: Objects, config: ControllerConfig) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(garbage_collector::run(objects.clone(), config.gc_resync)),
        // Freed addresses are usable again within seconds of their VM's deletion.
        tokio::spawn(ipam_sweeper::run(objects.clone(), Duration::from_secs(5))),
        tokio::spawn(network_status::run(objects.clone(), Duration::from_secs(2))),
        tokio::spawn(security_groups::run(
            objects.clone(),
            Duration::from_secs(30),
        )),
        // Routers move within seconds of their node failing.
        tokio::spawn(routers::run(objects.clone(), Duration::from_secs(2))),
        tokio::spawn(volumes::run(objects.clone(), Duration::from_secs(5))),
        tokio::spawn(node_lifecycle::run(objects.clone(), config.node_grace)),
        tokio::spawn(migrations::run(objects.clone(), Duration::from_secs(2))),
        tokio::spawn(evacuation::run(
            objects.clone(),
            config.evacuation_margin,
            Duration::from_millis(500),
        )),
        tokio::spawn(scheduler::run(
            objects.clone(),
            Duration::from_secs(2),
            config.placement,
        )),
    ];
    if !config.event_ttl.is_zero() {
        tasks.push(tokio::spawn(event_ttl::run(
            objects.clone(),
            config.event_ttl,
            config.event_ttl.min(Duration::from_secs(60)),
        )));
    }
    if !config.compaction_interval.is_zero() {
        tasks.push(tokio::spawn(compactor::run(
            objects.store().clone(),
            config.compaction_interval,
        )));
    }
    tasks
}

/// Waits for a change to a key `relevant` accepts, or `timeout`; then takes whatever else has
/// already arrived, so that a burst of changes costs one pass. False when the watch has ended
/// (the caller starts a new one).
pub(crate) async fn wait_for_change(
    events: &mut flotilla_store::WatchStream,
    timeout: Duration,
    relevant: impl Fn(&flotilla_store::WatchEvent) -> bool,
) -> bool {
    use futures::StreamExt;
    let first = tokio::time::timeout(timeout, async {
        loop {
            match events.next().await {
                Some(Ok(ev)) if relevant(&ev) => return true,
                Some(Ok(_)) => continue,
                _ => return false,
            }
        }
    })
    .await;
    match first {
        Ok(false) => false,
        _ => {
            while let Some(Some(item)) = futures::FutureExt::now_or_never(events.next()) {
                if item.is_err() {
                    return false;
                }
            }
            true
        }
    }
}

/// Runs `sweep` at start, after every change of an object of `kinds` (a burst costs one pass),
/// and at least every `resync`; `what` names the work in the log when a pass fails.
pub(crate) async fn on_changes<F, Fut>(
    objects: flotilla_server::Objects,
    kinds: &[&str],
    resync: Duration,
    what: &str,
    sweep: F,
) where
    F: Fn(flotilla_server::Objects) -> Fut,
    Fut: std::future::Future<Output = Result<usize, flotilla_server::ApiError>>,
{
    let prefixes: Vec<String> = kinds
        .iter()
        .map(|k| {
            flotilla_server::objects::list_prefix(
                flotilla_types::registry::by_kind(k).expect("registered"),
                None,
            )
        })
        .collect();
    let mut events = None;
    loop {
        if events.is_none() {
            events = objects.store().watch("/registry/", 0).await.ok();
        }
        if let Err(e) = sweep(objects.clone()).await {
            tracing::warn!(error = %e, "cannot {what}; trying again");
        }
        match events.as_mut() {
            Some(stream) => {
                let relevant = |ev: &flotilla_store::WatchEvent| {
                    prefixes.iter().any(|p| ev.kv.key.starts_with(p.as_str()))
                };
                if wait_for_change(stream, resync, relevant).await {
                    // Let a burst (a VM's create and its first status writes) settle.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                } else {
                    events = None;
                }
            }
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// The condition `type_` as it is now, keeping its transition time while its status stays.
pub(crate) fn condition(
    before: &[flotilla_types::Condition],
    type_: &str,
    status: flotilla_types::ConditionStatus,
    reason: &str,
    message: String,
) -> flotilla_types::Condition {
    match before.iter().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => flotilla_types::Condition {
            reason: reason.to_string(),
            message,
            ..c.clone()
        },
        _ => flotilla_types::Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            last_transition_time: Some(flotilla_types::meta::now()),
            observed_generation: None,
        },
    }
}
