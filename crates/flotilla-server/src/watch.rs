//! Watches: store changes become Kubernetes watch events, one JSON object per line.
//!
//! Without `resourceVersion` (or with "0") a watch starts with an `ADDED` event for every
//! existing object, then streams changes. With `resourceVersion=N` it streams every change after
//! N, so a client resumes exactly where it stopped; if N has been compacted the request fails
//! with 410 Gone and the client must list again. With selectors, an object that starts to match
//! arrives as `ADDED` and one that stops matching as `DELETED`, as in Kubernetes.

use std::time::Duration;

use bytes::Bytes;
use flotilla_store::{EventKind, Revision, WatchEvent};
use flotilla_types::registry::KindInfo;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::objects::{list_prefix, splice_resource_version, ListOptions, Objects};

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
    let mut events = objects.store().watch(&prefix, from).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let kind = req.kind;
    let options = req.options;
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
                    let object = json!({"apiVersion": flotilla_types::API_VERSION, "kind": kind.kind, "metadata": {"resourceVersion": last.to_string()}});
                    Some(line("BOOKMARK", &serde_json::to_vec(&object).expect("serialises")))
                }
                ev = events.next() => match ev {
                    None => return,
                    Some(Err(e)) => {
                        let _ = tx.send(error_line(&ApiError::from(e))).await;
                        return;
                    }
                    Some(Ok(ev)) => {
                        last = ev.kv.mod_revision;
                        translate(&ev, &options)
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

/// One store event as a watch line, or None when the selectors hide it.
fn translate(ev: &WatchEvent, options: &ListOptions) -> Option<Bytes> {
    let rev = ev.kv.mod_revision;
    let filtering = options.has_selectors();
    let parse = |raw: &[u8]| serde_json::from_slice::<Value>(raw).ok();
    match ev.kind {
        EventKind::Put => {
            let now_matches =
                !filtering || parse(&ev.kv.value).is_some_and(|v| options.matches(&v));
            let before_matches = match &ev.prev_kv {
                None => false,
                Some(prev) => !filtering || parse(&prev.value).is_some_and(|v| options.matches(&v)),
            };
            let object = splice_resource_version(&ev.kv.value, rev);
            match (before_matches, now_matches) {
                (false, true) => Some(line("ADDED", &object)),
                (true, true) => Some(line("MODIFIED", &object)),
                (true, false) => Some(line("DELETED", &object)),
                (false, false) => None,
            }
        }
        EventKind::Delete => {
            let prev = ev.prev_kv.as_ref()?;
            if filtering && !parse(&prev.value).is_some_and(|v| options.matches(&v)) {
                return None;
            }
            Some(line("DELETED", &splice_resource_version(&prev.value, rev)))
        }
    }
}
