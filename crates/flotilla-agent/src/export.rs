//! Volume export for the API server (`GET /v1/volumes/{uid}/data?format=qcow2|raw` on the
//! agent's endpoint): the volume's content as one standalone file — its whole backing chain
//! flattened by `qemu-img convert` into a temporary file beside it, under the volume's lock and
//! in the node's disk queue, then streamed. The file is unlinked as soon as it is open, so
//! nothing stays behind whether the transfer ends, breaks off or the agent dies. A volume a
//! running guest writes is refused: a copy of it would be torn.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use flotilla_storage::Format;

use crate::vm::Context;

/// The agent's context once it has one (the endpoint starts before it).
pub type Late = Arc<OnceLock<Arc<Context>>>;

#[derive(serde::Deserialize)]
pub struct ExportQuery {
    #[serde(default)]
    format: Option<String>,
}

fn answer(code: StatusCode, message: impl Into<String>) -> Response {
    (code, message.into()).into_response()
}

pub async fn export(
    State(late): State<Late>,
    Path(uid): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Response {
    let Some(ctx) = late.get().cloned() else {
        return answer(StatusCode::SERVICE_UNAVAILABLE, "the agent is starting");
    };
    let format = match q.format.as_deref().unwrap_or("qcow2") {
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        other => {
            return answer(
                StatusCode::BAD_REQUEST,
                format!("format {other:?} is neither qcow2 nor raw"),
            )
        }
    };
    let Some(volume) = ctx.volumes.by_uid(&uid) else {
        return answer(StatusCode::NOT_FOUND, "no such volume on this node");
    };
    let status = volume.status.clone().unwrap_or_default();
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    let _held = ctx
        .volumes
        .lock(&project, [volume.metadata.name.clone()])
        .await;
    // Read again under the lock: a snapshot or revert may have moved it meanwhile.
    let path = ctx
        .volumes
        .by_uid(&uid)
        .and_then(|v| v.status)
        .map(|s| s.path)
        .unwrap_or(status.path);
    if path.is_empty() {
        return answer(StatusCode::CONFLICT, "the volume has no file yet");
    }
    match ctx.libvirt.disk_users(&path).await {
        Ok(users) if users.is_empty() => {}
        Ok(_) => {
            return answer(
                StatusCode::CONFLICT,
                "a running VM writes the volume: stop it (or detach the volume), or snapshot the volume and export a clone of the snapshot",
            )
        }
        Err(e) => return answer(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    let path = PathBuf::from(path);
    let tmp = flotilla_files::temp_path(&path);
    let from_format = match flotilla_storage::qemu_img::info(&path).await {
        Ok(info) => info.format,
        Err(e) => return answer(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let converted = {
        let _permit = ctx.disks.queued().await;
        flotilla_storage::qemu_img::convert(&path, from_format, &tmp, format).await
    };
    drop(_held);
    let opened = match converted {
        Ok(()) => tokio::fs::File::open(&tmp).await,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return answer(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    };
    // Unlinked at once: the open file is all that is left of it.
    let _ = tokio::fs::remove_file(&tmp).await;
    let file = match opened {
        Ok(f) => f,
        Err(e) => return answer(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let chunks = flotilla_files::chunks(file, 1 << 20);
    tracing::info!(volume = %volume.metadata.name, bytes = len, format = format.as_str(), "exporting a volume");
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(chunks))
        .expect("valid response")
}
