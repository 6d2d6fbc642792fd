//! Image: a disk image VMs boot from, fetched and cached by each node on first use.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::Condition;
use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// Where the image comes from: a URL or a path on every node.
    pub source: ImageSource,
    /// The format of the file at the source: qcow2 (the default) or raw.
    #[serde(default)]
    pub format: ImageFormat,
    /// Hex SHA-256 of the file at the source; checked after download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
}

/// Exactly one of `url` (http or https) or `path` (a file on every node).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSource {
    /// An http:// or https:// URL to download the image from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^https?://[^\s\x00-\x1f\x7f-\x9f]*$"),
        length(max = 4096)
    )]
    pub url: Option<String>,
    /// A file on every node (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::HOST_PATH_PATTERN", length(max = 4096))]
    pub path: Option<String>,
    /// The file is uploaded through the API (`PUT .../images/NAME/data`, `flotilla image
    /// upload`), once; the server keeps it and the nodes fetch it from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<ImageUpload>,
}

/// An uploaded image's source: nothing to say (`upload: {}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageUpload {}

/// How far an upload is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadStatus {
    /// `Uploading`, `Ready` or `Failed`.
    pub phase: String,
    /// Bytes received so far (all of them when Ready).
    #[serde(default)]
    pub bytes: u64,
    /// Hex SHA-256 of what was received (when Ready).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Qcow2,
    Raw,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageStatus {
    /// The image's conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per node (by name): whether the image is cached there. A map, so that each node's agent
    /// merges in its own entry without touching the others'.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nodes: std::collections::BTreeMap<String, ImageNodeStatus>,
    /// An uploaded image's upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageNodeStatus {
    /// `Downloading`, `Ready` or `Failed`.
    pub phase: String,
    /// The size of the cached copy on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Why the image failed on this node, if it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Validate for ImageSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        let src = format!("{path}.source");
        let upload = self.source.upload.is_some();
        if upload && (self.source.url.is_some() || self.source.path.is_some()) {
            errs.push(src.clone(), "set one of url, path and upload");
        }
        match (&self.source.url, &self.source.path) {
            (None, None) if upload => {}
            (Some(url), None) => {
                let ok = (url.starts_with("http://") || url.starts_with("https://"))
                    && url.chars().count() <= 4096
                    && !url.chars().any(|c| c.is_whitespace() || c.is_control());
                if !ok {
                    errs.push(
                        format!("{src}.url"),
                        format!("{url:?} must be an http:// or https:// URL without spaces"),
                    );
                }
            }
            (None, Some(p)) => validation::host_path(errs, &format!("{src}.path"), p),
            (Some(_), Some(_)) => errs.push(src, "set either url or path, not both"),
            (None, None) => errs.push(
                src,
                "set url (http or https), path (a file on the nodes) or upload ({}: send the file through the API)",
            ),
        }
        if let Some(sum) = &self.sha256 {
            if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
                errs.push(
                    format!("{path}.sha256"),
                    "must be 64 hexadecimal characters",
                );
            }
        }
    }
}

impl Validate for ImageStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// A disk image. VMs name it in `spec.image`; their root disk is a linked clone of it.
    Image {
        spec: ImageSpec,
        status: ImageStatus,
        plural: "images",
        singular: "image",
        short_names: ["img"],
        namespaced: true,
        field_selectors: [],
        columns: [
            "FORMAT" => "spec.format",
            "URL" => "spec.source.url",
            "PATH" => "spec.source.path",
            "UPLOAD" => "status.upload.phase"
        ],
    }
}
