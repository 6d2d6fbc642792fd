//! Uploaded images: `PUT .../images/NAME/data` streams the file of an Image whose source is
//! `upload: {}` into the server's data directory (never whole in memory), hashing it as it
//! comes (runs of zeros kept as holes) and reporting progress in `status.upload`; `GET .../images/NAME/data` streams it back
//! (to the nodes, which cache it as they cache downloads). An upload happens once: the file is
//! checked (the `spec.sha256` given, the format qemu-img finds, no backing file — a qcow2
//! naming one would read a file of the server's host) before it is kept, and a refused or
//! broken-off upload leaves nothing. Files of images that are gone are swept.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use flotilla_types::registry;
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::auth::Principal;
use crate::authz::{self, Verb};
use crate::error::ApiError;
use crate::objects::{Objects, PatchBody, Subresource};

/// Largest upload accepted.
pub const MAX_UPLOAD: u64 = 1 << 40;
/// A body that sends nothing for this long is given up on.
const STALL: Duration = Duration::from_secs(60);
/// How often progress is written to `status.upload`.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The uploads this server is receiving (by image uid), each released when dropped.
struct InFlight(String);

static IN_FLIGHT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

impl InFlight {
    fn claim(uid: &str) -> Option<InFlight> {
        let mut all = IN_FLIGHT.lock().expect("uploads lock");
        if all.iter().any(|u| u == uid) {
            return None;
        }
        all.push(uid.to_string());
        Some(InFlight(uid.to_string()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .expect("uploads lock")
            .retain(|u| *u != self.0);
    }
}

/// Where the uploaded file of the image with `uid` lives.
pub fn file_of(dir: &Path, uid: &str) -> PathBuf {
    dir.join(format!("{uid}.img"))
}

fn image_kind() -> &'static flotilla_types::KindInfo {
    registry::by_kind("Image").expect("registered")
}

async fn report(objects: &Objects, namespace: &str, name: &str, upload: Value) {
    let patch = PatchBody::Merge(json!({"status": {"upload": upload}}));
    if let Err(e) = objects
        .patch(
            image_kind(),
            Some(namespace),
            name,
            patch,
            Subresource::Status,
        )
        .await
    {
        tracing::warn!(image = name, error = %e, "cannot report an upload");
    }
}

/// `PUT`: receives the image's file.
pub async fn receive(
    objects: &Objects,
    dir: &Path,
    principal: &Principal,
    (namespace, name): (&str, &str),
    (length, body): (Option<u64>, Body),
) -> Result<Response, ApiError> {
    let asked = authz::Request::new(Verb::Update, image_kind(), Some(namespace), Some(name));
    authz::authorize(objects, principal, &asked.on("data")).await?;
    let image = objects
        .get(image_kind(), Some(namespace), name)
        .await?
        .to_value();
    let invalid = |field: &str, message: String| {
        let mut errs = flotilla_types::validation::FieldErrors::default();
        errs.push(field, message);
        ApiError::invalid("Image", name, &errs)
    };
    if image["spec"]["source"]["upload"].is_null() {
        return Err(invalid(
            "spec.source.upload",
            "is not set: this image is fetched from its url or path, not uploaded".into(),
        ));
    }
    if image["status"]["upload"]["phase"] == "Ready" {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("image {name:?} is uploaded already; create another image for another file"),
        ));
    }
    let uid = image["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // One upload of an image at a time in this server; `Uploading` left by a server that
    // crashed mid-way does not stop a new one.
    let Some(_in_flight) = InFlight::claim(&uid) else {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("image {name:?} is being uploaded; wait for it to finish or fail"),
        ));
    };
    // The server's alone: images may hold what their owners would not show other local users.
    let mut made = tokio::fs::DirBuilder::new();
    made.recursive(true).mode(0o700);
    made.create(dir)
        .await
        .map_err(|e| ApiError::internal(format!("cannot make {}: {e}", dir.display())))?;
    // Refused before a byte is read when it cannot fit (a file that says its size).
    if let (Some(length), Ok((_, free))) = (length, flotilla_files::space(dir)) {
        if length > free {
            return Err(ApiError::too_large(format!(
                "the upload is {length} bytes and the server has {free} bytes free for it"
            )));
        }
    }
    let dest = file_of(dir, &uid);
    let part = flotilla_files::temp_path(&dest);
    report(
        objects,
        namespace,
        name,
        json!({"phase": "Uploading", "bytes": 0, "message": ""}),
    )
    .await;
    let received = write(objects, (namespace, name), body, &part).await;
    let checked = match received {
        Ok((bytes, sha256)) => check(&image, &part, &sha256)
            .await
            .map(|()| (bytes, sha256)),
        Err(e) => Err(e),
    };
    let (bytes, sha256) = match checked {
        Ok(done) => done,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            report(
                objects,
                namespace,
                name,
                json!({"phase": "Failed", "message": e.to_string()}),
            )
            .await;
            return Err(e);
        }
    };
    tokio::fs::rename(&part, &dest)
        .await
        .map_err(|e| ApiError::internal(format!("cannot keep the upload: {e}")))?;
    tracing::info!(image = name, bytes, "image uploaded");
    report(
        objects,
        namespace,
        name,
        json!({"phase": "Ready", "bytes": bytes, "sha256": sha256, "message": ""}),
    )
    .await;
    let image = objects
        .get(image_kind(), Some(namespace), name)
        .await?
        .to_value();
    Ok(crate::http::json_response(
        axum::http::StatusCode::OK,
        serde_json::to_vec(&image).expect("serialises"),
    ))
}

/// Streams `body` into `part`; returns its size and SHA-256.
async fn write(
    objects: &Objects,
    (namespace, name): (&str, &str),
    body: Body,
    part: &Path,
) -> Result<(u64, String), ApiError> {
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::StorageFull {
            ApiError::new(
                507,
                "InsufficientStorage",
                "the server ran out of space for the upload; nothing of it is kept",
            )
        } else {
            ApiError::internal(format!("cannot write the upload: {e}"))
        }
    };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(part)
        .await
        .map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut bytes: u64 = 0;
    let mut stream = body.into_data_stream();
    let mut reported = Instant::now();
    loop {
        let chunk = match tokio::time::timeout(STALL, stream.next()).await {
            Err(_) => {
                return Err(ApiError::bad_request(format!(
                    "the upload sent nothing for {} s; start it again",
                    STALL.as_secs()
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!("the upload broke off: {e}")))
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        bytes += chunk.len() as u64;
        if bytes > MAX_UPLOAD {
            return Err(ApiError::too_large(format!(
                "an image may be at most {} GiB",
                MAX_UPLOAD >> 30
            )));
        }
        hasher.update(&chunk);
        // Runs of zeros stay holes (a raw image is mostly zeros); the length is set at the end.
        if chunk.iter().all(|b| *b == 0) {
            file.seek(std::io::SeekFrom::Current(chunk.len() as i64))
                .await
                .map_err(io)?;
        } else {
            file.write_all(&chunk).await.map_err(io)?;
        }
        if reported.elapsed() >= PROGRESS_EVERY {
            reported = Instant::now();
            report(
                objects,
                namespace,
                name,
                json!({"phase": "Uploading", "bytes": bytes}),
            )
            .await;
        }
    }
    file.set_len(bytes).await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// Refuses (422) a file whose checksum or format is not what the image says, or that names a
/// backing file.
async fn check(image: &Value, part: &Path, sha256: &str) -> Result<(), ApiError> {
    let name = image["metadata"]["name"].as_str().unwrap_or_default();
    let invalid = |field: &str, message: String| {
        let mut errs = flotilla_types::validation::FieldErrors::default();
        errs.push(field, message);
        ApiError::invalid("Image", name, &errs)
    };
    if let Some(want) = image["spec"]["sha256"].as_str() {
        if !want.eq_ignore_ascii_case(sha256) {
            return Err(invalid(
                "spec.sha256",
                format!("is {want}, but the uploaded file's SHA-256 is {sha256}"),
            ));
        }
    }
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(part)
        .output()
        .await
        .map_err(|e| ApiError::internal(format!("cannot run qemu-img: {e}")))?;
    let info: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let found = info["format"].as_str().unwrap_or("unreadable");
    let declared = image["spec"]["format"].as_str().unwrap_or("qcow2");
    // Any file is raw data; only a qcow2 header makes a qcow2.
    if (declared == "qcow2") != (found == "qcow2") {
        return Err(invalid(
            "spec.format",
            format!("is {declared}, but the uploaded file is {found} data"),
        ));
    }
    if info.get("backing-filename").is_some() {
        return Err(invalid(
            "spec.source.upload",
            "the uploaded qcow2 names a backing file; upload a standalone image (qemu-img convert -O qcow2)".into(),
        ));
    }
    Ok(())
}

/// `GET`: streams the image's file.
pub async fn send(
    objects: &Objects,
    dir: &Path,
    principal: &Principal,
    (namespace, name): (&str, &str),
) -> Result<Response, ApiError> {
    let asked = authz::Request::new(Verb::Get, image_kind(), Some(namespace), Some(name));
    authz::authorize(objects, principal, &asked.on("data")).await?;
    let image = objects
        .get(image_kind(), Some(namespace), name)
        .await?
        .to_value();
    if image["status"]["upload"]["phase"] != "Ready" {
        return Err(ApiError::not_found("uploaded file of Image", name));
    }
    let uid = image["metadata"]["uid"].as_str().unwrap_or_default();
    let path = file_of(dir, uid);
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::new(
            503,
            "ServiceUnavailable",
            format!("this server does not hold the file of image {name:?} ({e}); uploaded images are kept by the server that received them"),
        )
    })?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .len();
    let chunks = flotilla_files::chunks(file, 256 * 1024);
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(chunks))
        .expect("valid response"))
}

/// Removes uploaded files whose image is gone. Uploads a crash broke off (temporary names)
/// are removed once, at start-up, by [`flotilla_files::sweep_temps`].
pub async fn sweep(objects: &Objects, dir: &Path) -> Result<usize, ApiError> {
    // The directory before the images: a file kept after the list was read has its image in it.
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return Ok(0);
    };
    let mut files = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        files.push(entry.file_name().to_string_lossy().into_owned());
    }
    let uids: std::collections::HashSet<String> = objects
        .list(image_kind(), None, &Default::default())
        .await?
        .items
        .iter()
        .filter_map(|raw| serde_json::from_slice::<Value>(raw).ok())
        .filter_map(|i| i["metadata"]["uid"].as_str().map(str::to_string))
        .collect();
    let mut removed = 0;
    for file in files {
        let Some(uid) = file.strip_suffix(".img") else {
            continue;
        };
        if !uids.contains(uid) && tokio::fs::remove_file(dir.join(&file)).await.is_ok() {
            tracing::info!(file, "removed the upload of a deleted image");
            removed += 1;
        }
    }
    Ok(removed)
}

/// Sweeps every `every` until the task is aborted.
pub async fn run_sweeper(objects: Objects, dir: PathBuf, every: Duration) {
    let _ = flotilla_files::sweep_temps(&dir, &[]);
    loop {
        if let Err(e) = sweep(&objects, &dir).await {
            tracing::warn!(error = %e, "cannot sweep uploaded images");
        }
        tokio::time::sleep(every).await;
    }
}
