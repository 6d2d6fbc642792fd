//! Event expiry: deletes Events last seen more than the TTL ago (Kubernetes' `--event-ttl`,
//! default one hour), so that a noisy fleet cannot fill the store with records nobody reads.

use std::time::Duration;

use flotilla_server::objects::ListOptions;
use flotilla_server::Objects;
use flotilla_types::registry::by_kind;
use flotilla_types::Event;

/// Sweeps every `every` (and once at start), deleting events older than `ttl`.
pub async fn run(objects: Objects, ttl: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match sweep(&objects, ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "expired events deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot expire events; trying again later"),
        }
    }
}

/// Deletes the events last seen before now - `ttl`; returns how many.
pub async fn sweep(objects: &Objects, ttl: Duration) -> Result<usize, flotilla_server::ApiError> {
    let kind = by_kind("Event").expect("registered");
    let cutoff =
        chrono::Utc::now() - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    let list = objects.list(kind, None, &ListOptions::default()).await?;
    let mut deleted = 0;
    for raw in list.items {
        let Ok(event) = serde_json::from_slice::<Event>(&raw) else {
            continue;
        };
        let seen = event.last_seen().or(event.metadata.creation_timestamp);
        if seen.is_none_or(|t| t >= cutoff) {
            continue;
        }
        let ns = event.metadata.namespace.as_deref();
        match objects.delete(kind, ns, &event.metadata.name).await {
            Ok(_) => deleted += 1,
            Err(e) if e.code() == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
