//! Control loops that run inside the server process. Each is level-triggered and idempotent: it
//! can stop at any point and, when it starts again, converges from what the store holds.

pub mod compactor;
pub mod garbage_collector;
pub mod node_lifecycle;
pub mod scheduler;

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
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            compaction_interval: Duration::from_secs(300),
            gc_resync: Duration::from_secs(60),
            node_grace: Duration::from_secs(10),
        }
    }
}

/// Starts every controller; they run until the runtime stops.
pub fn spawn_all(objects: Objects, config: ControllerConfig) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(garbage_collector::run(objects.clone(), config.gc_resync)),
        tokio::spawn(node_lifecycle::run(objects.clone(), config.node_grace)),
        tokio::spawn(scheduler::run(objects.clone(), Duration::from_secs(2))),
    ];
    if !config.compaction_interval.is_zero() {
        tasks.push(tokio::spawn(compactor::run(
            objects.store().clone(),
            config.compaction_interval,
        )));
    }
    tasks
}
