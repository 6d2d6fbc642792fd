//! Shared watches (Kubernetes' watch cache, in small): one store watch per kind, each change
//! parsed once, kept in a bounded buffer, and routed only to the watchers it concerns.
//!
//! A thousand agents each watch the VMs bound to their own node (`spec.nodeName=<node>`). With
//! one store watch per client every VM change was parsed and filtered a thousand times; here
//! watchers whose field selector names one node are indexed by that node, so a change reaches
//! the watchers of the node it was and is bound to (plus the watchers that are not indexed).
//!
//! A watch starting at revision N is served from the buffer when everything from N on is still
//! in it; otherwise (`subscribe` returns None) the caller reads history from the store itself. A
//! watcher whose channel is full is dropped: its stream ends and the client resumes from its
//! last resourceVersion, as when any watch breaks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flotilla_store::{EventKind, Revision, Store, WatchEvent};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::objects::ListOptions;

/// Changes kept per kind for watches that resume a little in the past.
const BUFFER: usize = 4096;
/// Lines a watcher may have waiting before it counts as too slow.
const QUEUE: usize = 1024;
/// The field watchers are indexed by.
const NODE_FIELD: &str = "spec.nodeName";

/// One change of a kind, as the store reported it (values raw; parsed only to route).
pub struct Change {
    pub kind: EventKind,
    pub key: String,
    pub revision: Revision,
    pub value: Vec<u8>,
    pub prev: Option<Vec<u8>>,
}

impl Change {
    pub fn from_event(ev: WatchEvent) -> Self {
        Change {
            kind: ev.kind,
            key: ev.kv.key,
            revision: ev.kv.mod_revision,
            value: ev.kv.value,
            prev: ev.prev_kv.map(|kv| kv.value),
        }
    }
}

/// A change with its values parsed (when they exist).
pub struct Parsed<'a> {
    pub change: &'a Change,
    pub object: Option<Value>,
    pub prev: Option<Value>,
}

impl<'a> Parsed<'a> {
    /// Without parsing: for watchers without selectors, which need no values.
    pub fn unparsed(change: &'a Change) -> Self {
        Parsed {
            change,
            object: None,
            prev: None,
        }
    }

    pub fn new(change: &'a Change) -> Self {
        let parse = |raw: &[u8]| serde_json::from_slice::<Value>(raw).ok();
        Parsed {
            change,
            object: match change.kind {
                EventKind::Put => parse(&change.value),
                EventKind::Delete => None,
            },
            prev: change.prev.as_deref().and_then(parse),
        }
    }

    /// The node values a change concerns: where the object was and where it is.
    fn nodes(&self) -> impl Iterator<Item = &str> {
        fn node(v: &Option<Value>) -> Option<&str> {
            v.as_ref()
                .map(|v| v["spec"]["nodeName"].as_str().unwrap_or(""))
        }
        let (now, before) = (node(&self.object), node(&self.prev));
        now.into_iter().chain(before.filter(|b| Some(*b) != now))
    }
}

/// Turns a parsed change into the watch line a watcher with `options` sees, if any.
pub type Translate = fn(&Parsed<'_>, &ListOptions) -> Option<Bytes>;

struct Subscriber {
    prefix: String,
    options: ListOptions,
    start: Revision,
    tx: mpsc::Sender<(Revision, Bytes)>,
}

struct FeedState {
    alive: bool,
    buffer: VecDeque<Arc<Change>>,
    /// Every change up to this revision has left the buffer (or predates the feed).
    evicted_through: Revision,
    next_id: u64,
    published: u64,
    subscribers: HashMap<u64, Subscriber>,
    by_node: HashMap<String, HashSet<u64>>,
    unindexed: HashSet<u64>,
}

impl FeedState {
    fn remove(&mut self, id: u64) {
        if let Some(sub) = self.subscribers.remove(&id) {
            match node_of(&sub.options) {
                Some(node) => {
                    if let Some(set) = self.by_node.get_mut(node) {
                        set.remove(&id);
                        if set.is_empty() {
                            self.by_node.remove(node);
                        }
                    }
                }
                None => {
                    self.unindexed.remove(&id);
                }
            }
        }
    }
}

/// The node a watcher's field selector requires (`spec.nodeName=X`), if any.
fn node_of(options: &ListOptions) -> Option<&str> {
    options
        .fields
        .0
        .iter()
        .find(|(field, equal, _)| field == NODE_FIELD && *equal)
        .map(|(_, _, value)| value.as_str())
}

struct Feed {
    state: Mutex<FeedState>,
    translate: Translate,
}

impl Feed {
    fn publish(&self, change: Change) {
        let parsed = Parsed::new(&change);
        let mut state = self.state.lock().expect("feed lock");
        let mut targets: Vec<u64> = state.unindexed.iter().copied().collect();
        for node in parsed.nodes() {
            if let Some(ids) = state.by_node.get(node) {
                targets.extend(ids.iter().copied());
            }
        }
        let mut slow = Vec::new();
        for id in targets {
            let sub = &state.subscribers[&id];
            if change.revision < sub.start || !change.key.starts_with(&sub.prefix) {
                continue;
            }
            if let Some(line) = (self.translate)(&parsed, &sub.options) {
                if sub.tx.try_send((change.revision, line)).is_err() {
                    slow.push(id);
                }
            }
        }
        for id in slow {
            tracing::debug!("a watcher is too slow or gone; dropping it");
            state.remove(id);
        }
        // Now and then, forget watchers that went away without a change to tell them of.
        state.published += 1;
        if state.published.is_multiple_of(1024) {
            let gone: Vec<u64> = state
                .subscribers
                .iter()
                .filter(|(_, s)| s.tx.is_closed())
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                state.remove(id);
            }
        }
        drop(parsed);
        state.buffer.push_back(Arc::new(change));
        while state.buffer.len() > BUFFER {
            if let Some(old) = state.buffer.pop_front() {
                state.evicted_through = old.revision;
            }
        }
    }

    fn close(&self) {
        let mut state = self.state.lock().expect("feed lock");
        state.alive = false;
        state.subscribers.clear();
        state.by_node.clear();
        state.unindexed.clear();
    }
}

/// The shared watches of one server.
pub struct WatchCache {
    store: Arc<dyn Store>,
    feeds: tokio::sync::Mutex<HashMap<String, Arc<Feed>>>,
}

impl WatchCache {
    pub fn new(store: Arc<dyn Store>) -> Self {
        WatchCache {
            store,
            feeds: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn feed(&self, kind_prefix: &str, translate: Translate) -> Option<Arc<Feed>> {
        let mut feeds = self.feeds.lock().await;
        if let Some(feed) = feeds.get(kind_prefix) {
            if feed.state.lock().expect("feed lock").alive {
                return Some(feed.clone());
            }
        }
        let from = self.store.current_revision().await.ok()?;
        let mut events = self.store.watch(kind_prefix, from + 1).await.ok()?;
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState {
                alive: true,
                buffer: VecDeque::new(),
                evicted_through: from,
                next_id: 0,
                published: 0,
                subscribers: HashMap::new(),
                by_node: HashMap::new(),
                unindexed: HashSet::new(),
            }),
            translate,
        });
        let running = feed.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                running.publish(Change::from_event(ev));
            }
            running.close();
        });
        feeds.insert(kind_prefix.to_string(), feed.clone());
        Some(feed)
    }

    /// Starts the feed of a kind ahead of its first watcher.
    pub async fn warm(&self, kind_prefix: &str, translate: Translate) {
        let _ = self.feed(kind_prefix, translate).await;
    }

    /// Lines for every change under `prefix` (within the kind at `kind_prefix`) from revision
    /// `start` on that `options` let through; None when the buffer no longer reaches back to
    /// `start` (read the store instead).
    pub async fn subscribe(
        &self,
        kind_prefix: &str,
        prefix: &str,
        options: &ListOptions,
        start: Revision,
        translate: Translate,
    ) -> Option<mpsc::Receiver<(Revision, Bytes)>> {
        // History the store has compacted is gone for every watcher alike (410 Gone), even
        // when the buffer still holds it.
        if start <= self.store.compacted_revision().await.ok()? {
            return None;
        }
        let feed = self.feed(kind_prefix, translate).await?;
        let mut state = feed.state.lock().expect("feed lock");
        if !state.alive || start <= state.evicted_through {
            return None;
        }
        let replay: Vec<Arc<Change>> = state
            .buffer
            .iter()
            .filter(|c| c.revision >= start && c.key.starts_with(prefix))
            .cloned()
            .collect();
        let (tx, rx) = mpsc::channel(QUEUE + replay.len());
        for change in replay {
            if let Some(line) = translate(&Parsed::new(&change), options) {
                let _ = tx.try_send((change.revision, line));
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        match node_of(options) {
            Some(node) => {
                state
                    .by_node
                    .entry(node.to_string())
                    .or_default()
                    .insert(id);
            }
            None => {
                state.unindexed.insert(id);
            }
        }
        state.subscribers.insert(
            id,
            Subscriber {
                prefix: prefix.to_string(),
                options: options.clone(),
                start,
                tx,
            },
        );
        Some(rx)
    }
}
