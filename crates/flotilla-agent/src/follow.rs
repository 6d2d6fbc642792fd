//! Following every object of a kind: a list, then a watch from its revision, and a relist when
//! the watch breaks (after a second, so an unreachable server is not hammered).

use std::time::Duration;

use std::sync::Arc;

use flotilla_client::{Client, ListParams};
use flotilla_types::KindInfo;
use serde_json::Value;
use tokio::sync::mpsc;

/// What the follower hears.
pub enum Seen {
    /// Everything there is, after a (re)list.
    Listed(Vec<Value>),
    /// One object made or changed.
    Changed(Value),
    /// One object gone.
    Deleted(Value),
}

/// The objects a follower has heard of, by a key of each (its uid or name), and whether a
/// list has come since it started (before one, nothing may be concluded from what is absent).
pub struct Mirror<T> {
    pub items: std::collections::BTreeMap<String, T>,
    pub listed: bool,
    key: fn(&T) -> Option<String>,
}

impl<T: serde::de::DeserializeOwned> Mirror<T> {
    pub fn new(key: fn(&T) -> Option<String>) -> Self {
        Mirror {
            items: Default::default(),
            listed: false,
            key,
        }
    }

    /// Takes in what the follower heard (objects that do not decode are left out).
    pub fn apply(&mut self, seen: Seen) {
        let decode = |v: &Value| serde_json::from_value::<T>(v.clone()).ok();
        match seen {
            Seen::Listed(items) => {
                self.items = items
                    .iter()
                    .filter_map(decode)
                    .filter_map(|t| Some(((self.key)(&t)?, t)))
                    .collect();
                self.listed = true;
            }
            Seen::Changed(item) => {
                if let Some(t) = decode(&item) {
                    if let Some(k) = (self.key)(&t) {
                        self.items.insert(k, t);
                    }
                }
            }
            Seen::Deleted(item) => {
                if let Some(k) = decode(&item).and_then(|t| (self.key)(&t)) {
                    self.items.remove(&k);
                }
            }
        }
    }
}

/// Follows `kind` on a task of its own, which ends when the receiver is dropped.
pub fn follow(client: Arc<Client>, kind: &'static KindInfo) -> mpsc::Receiver<Seen> {
    follow_selected(client, kind, ListParams::default())
}

/// Follows the objects of `kind` that `params` select (e.g. a field selector naming this node).
pub fn follow_selected(
    client: Arc<Client>,
    kind: &'static KindInfo,
    params: ListParams,
) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        tokio::select! {
            _ = tx.closed() => {}
            _ = run(&client, kind, &params, &tx) => {}
        }
    });
    rx
}

async fn run(client: &Client, kind: &KindInfo, params: &ListParams, seen: &mpsc::Sender<Seen>) {
    loop {
        let list = match client.list(kind, None, params).await {
            Ok(list) => list,
            Err(e) => {
                tracing::debug!(kind = kind.kind, error = %e, "cannot list; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let items = list["items"].as_array().cloned().unwrap_or_default();
        if seen.send(Seen::Listed(items)).await.is_err() {
            return;
        }
        let events = match client.watch(kind, None, params, Some(&rv)).await {
            Ok(events) => events,
            Err(e) => {
                tracing::debug!(kind = kind.kind, error = %e, "cannot watch; relisting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut events = std::pin::pin!(events);
        while let Some(Ok(event)) = futures::StreamExt::next(&mut events).await {
            let sent = match event.type_.as_str() {
                "ADDED" | "MODIFIED" => seen.send(Seen::Changed(event.object)).await,
                "DELETED" => seen.send(Seen::Deleted(event.object)).await,
                "ERROR" => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                return;
            }
        }
    }
}
