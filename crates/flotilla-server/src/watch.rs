//! Watches: store changes become Kubernetes watch events, one JSON object per line.
//!
//! Without `resourceVersion` (or with "0") a watch starts with an `ADDED` event for every
//! existing object, then streams changes. With `resourceVersion=N` it streams every change after
//! N, so a client resumes exactly where it stopped; if N has been compacted the request fails
//! with 410 Gone and the client must list again. With selectors, an object that starts to match
//! arrives as `ADDED` and one that stops matching as `DELETED`, as in Kubernetes.

use std::time::Duration;

use bytes::Bytes;
use flotilla_store::{EventKind, Revision, StoreError};
use flotilla_types::registry::KindInfo;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::objects::{list_prefix, splice_resource_version, ListOptions, Objects};
use crate::watch_cache::{Change, Parsed};

pub struct WatchRequest {
    pub kind: &'static KindInfo,
    pub namespace: Option<String>,
    pub options: ListOptions,
    /// Stream changes after this revision; None = start with the current objects.
    pub resource_version: Option<Revision>,
    /// Send a BOOKMARK at this interval (None = never).
    pub bookmarks: Option<Duration>,
    pub timeout: Option<Duration>,
}

fn line(event_type: &str, object: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(object.len() + 32);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(event_type.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    out.extend_from_slice(object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn error_line(e: &ApiError) -> Bytes {
    line(
        "ERROR",
        &serde_json::to_vec(&e.0).expect("Status serialises"),
    )
}

/// Starts a watch; fails before streaming when the revision is too old or the request is wrong.
pub async fn start(
    objects: &Objects,
    req: WatchRequest,
) -> Result<impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>>, ApiError> {
    let prefix = list_prefix(req.kind, req.namespace.as_deref());
    let (initial, from) = match req.resource_version {
        Some(rv) if rv > 0 => (Vec::new(), rv + 1),
        _ => {
            let list = objects
                .list(
                    req.kind,
                    req.namespace.as_deref(),
                    &ListOptions {
                        limit: 0,
                        continue_token: None,
                        ..req.options.clone()
                    },
                )
                .await?;
            (list.items, list.revision + 1)
        }
    };
    let kind_prefix = list_prefix(req.kind, None);
    let shared = objects
        .watch_cache()
        .subscribe(&kind_prefix, &prefix, &req.options, from, translate)
        .await;
    let mut on_shared = shared.is_some();
    let mut events = match shared {
        Some(rx) => Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|(rev, line)| (Ok((rev, Some(line))), rx))
        })),
        None => from_store(objects, &prefix, from, &req.options).await?,
    };
    let objects = objects.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let kind = req.kind;
    tokio::spawn(async move {
        for item in initial {
            if tx.send(line("ADDED", &item)).await.is_err() {
                return;
            }
        }
        let mut last = from - 1;
        let mut bookmark =
            tokio::time::interval(req.bookmarks.unwrap_or(Duration::from_secs(3600)));
        bookmark.tick().await;
        let deadline =
            tokio::time::sleep(req.timeout.unwrap_or(Duration::from_secs(u32::MAX as u64)));
        tokio::pin!(deadline);
        loop {
            let out = tokio::select! {
                _ = tx.closed() => return,
                _ = &mut deadline => return,
                _ = bookmark.tick(), if req.bookmarks.is_some() => {
                    let object = json!({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": {"resourceVersion": last.to_string()}});
                    Some(line("BOOKMARK", &serde_json::to_vec(&object).expect("serialises")))
                }
                ev = events.next() => match ev {
                    // The shared feed dropped this watcher (too slow) or stopped: carry on
                    // from the store's history, which says 410 Gone if it no longer reaches back.
                    None if on_shared => {
                        on_shared = false;
                        match from_store(&objects, &prefix, last + 1, &req.options).await {
                            Ok(stream) => events = stream,
                            Err(e) => {
                                let _ = tx.send(error_line(&e)).await;
                                return;
                            }
                        }
                        None
                    }
                    None => return,
                    Some(Err(e)) => {
                        let _ = tx.send(error_line(&ApiError::from(e))).await;
                        return;
                    }
                    Some(Ok((revision, line))) => {
                        last = revision;
                        line
                    }
                }
            };
            if let Some(bytes) = out {
                if tx.send(bytes).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(b), rx))
    }))
}

type Lines = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<(Revision, Option<Bytes>), StoreError>> + Send>,
>;

/// A watch read from the store itself (history the shared feed no longer holds).
async fn from_store(
    objects: &Objects,
    prefix: &str,
    from: Revision,
    options: &ListOptions,
) -> Result<Lines, ApiError> {
    let options = options.clone();
    let stream = objects.store().watch(prefix, from).await?;
    Ok(Box::pin(stream.map(move |ev| {
        ev.map(|ev| {
            let change = Change::from_event(ev);
            let parsed = if options.has_selectors() {
                Parsed::new(&change)
            } else {
                Parsed::unparsed(&change)
            };
            (change.revision, translate(&parsed, &options))
        })
    })))
}

/// One change as a watch line, or None when the selectors hide it.
pub(crate) fn translate(p: &Parsed<'_>, options: &ListOptions) -> Option<Bytes> {
    let change = p.change;
    let rev = change.revision;
    let filtering = options.has_selectors();
    let matches = |v: &Option<Value>| !filtering || v.as_ref().is_some_and(|v| options.matches(v));
    match change.kind {
        EventKind::Put => {
            let now_matches = matches(&p.object);
            let before_matches = change.prev.is_some() && matches(&p.prev);
            let (now, before) = (now_matches, before_matches);
            if !now && !before {
                return None;
            }
            let object = splice_resource_version(&change.value, rev);
            match (before, now) {
                (false, true) => Some(line("ADDED", &object)),
                (true, true) => Some(line("MODIFIED", &object)),
                _ => Some(line("DELETED", &object)),
            }
        }
        EventKind::Delete => {
            let prev = change.prev.as_ref()?;
            if !matches(&p.prev) {
                return None;
            }
            Some(line("DELETED", &splice_resource_version(prev, rev)))
        }
    }
}
