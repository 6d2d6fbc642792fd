//! Object semantics over the raw store: what create, update, patch, delete and the status
//! subresource mean, independent of HTTP. The HTTP layer, controllers and tests all call this.
//!
//! Objects are stored as canonical JSON without `metadata.resourceVersion`; the resource version
//! is the key's mod revision and is put back on every read.

use std::sync::Arc;

use base64::Engine;
use flotilla_store::{Compare, KeyValue, Op, OpResult, RangeRequest, Revision, Store, Txn};
use flotilla_types::meta::now;
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::selector::{FieldSelector, LabelSelector};
use rand::Rng;
use serde_json::{json, Value};

use crate::error::ApiError;

const ROOT: &str = "/registry/";
/// Write conflicts caused only by concurrent writers (not by a stale client) are retried this often.
/// A read-modify-write that keeps losing races to other writers gives up after this long.
const CONTENTION_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Retries of a read-modify-write that lost a race: at once a few times, then after a short
/// random pause (so that many writers of one object take turns instead of colliding again),
/// until the write lands or [`CONTENTION_LIMIT`] has passed. Kubernetes retries such writes
/// until they land too: a patch without a resourceVersion is not a conflict.
struct Contention {
    attempts: u32,
    since: std::time::Instant,
}

impl Contention {
    fn new() -> Self {
        Contention {
            attempts: 0,
            since: std::time::Instant::now(),
        }
    }

    /// Whether to try again (after pausing if needed).
    async fn again(&mut self) -> bool {
        self.attempts += 1;
        if self.since.elapsed() > CONTENTION_LIMIT {
            return false;
        }
        if self.attempts > 3 {
            let most = 5 * u64::from(self.attempts.min(40));
            let pause = rand::thread_rng().gen_range(0..=most);
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
        true
    }
}
/// Where the cluster's identity lives (outside `/registry/`: it is not an API object).
pub const CLUSTER_ID_KEY: &str = "/flotilla/cluster-id";

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    /// Everything but `status` (and server-owned metadata).
    Main,
    /// Only `status`.
    Status,
}

/// An object-level check run on every read or write: `(current, next)`; `next` is None for reads.
pub type Guard<'a> = &'a (dyn Fn(&Value, Option<&Value>) -> Result<(), ApiError> + Send + Sync);

fn no_guard(_: &Value, _: Option<&Value>) -> Result<(), ApiError> {
    Ok(())
}

/// How a write is checked: the client's resourceVersion, the part it may change, and an
/// object-level guard.
struct WriteOptions<'a> {
    precondition: Option<Revision>,
    sub: Subresource,
    guard: Guard<'a>,
}

/// A stored object and the revision it was read or written at.
#[derive(Clone, Debug)]
pub struct Stored {
    /// Canonical JSON without `metadata.resourceVersion`.
    pub raw: Vec<u8>,
    pub revision: Revision,
}

impl Stored {
    /// The object as clients see it: JSON with `metadata.resourceVersion` set.
    pub fn to_bytes(&self) -> Vec<u8> {
        splice_resource_version(&self.raw, self.revision)
    }

    pub fn to_value(&self) -> Value {
        serde_json::from_slice(&self.to_bytes()).expect("stored objects are valid JSON")
    }
}

/// Inserts `"resourceVersion":"N"` at the start of the object's metadata without re-parsing it.
/// Stored objects always begin `{"apiVersion":…,"kind":…,"metadata":{"name"…` (canonical order).
pub fn splice_resource_version(raw: &[u8], revision: Revision) -> Vec<u8> {
    const NEEDLE: &[u8] = b"\"metadata\":{";
    let at = raw
        .windows(NEEDLE.len())
        .position(|w| w == NEEDLE)
        .map(|p| p + NEEDLE.len());
    match at {
        Some(at) => {
            let field = format!("\"resourceVersion\":\"{revision}\"");
            let mut out = Vec::with_capacity(raw.len() + field.len() + 1);
            out.extend_from_slice(&raw[..at]);
            out.extend_from_slice(field.as_bytes());
            if raw.get(at) != Some(&b'}') {
                out.push(b',');
            }
            out.extend_from_slice(&raw[at..]);
            out
        }
        None => {
            let mut v: Value = serde_json::from_slice(raw).expect("stored objects are valid JSON");
            v["metadata"]["resourceVersion"] = json!(revision.to_string());
            serde_json::to_vec(&v).expect("serialises")
        }
    }
}

pub fn object_key(kind: &KindInfo, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) if kind.namespaced => format!("{ROOT}{}/{ns}/{name}", kind.plural),
        _ => format!("{ROOT}{}/{name}", kind.plural),
    }
}

/// The key prefix of a kind, optionally within one project.
pub fn list_prefix(kind: &KindInfo, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if kind.namespaced => format!("{ROOT}{}/{ns}/", kind.plural),
        _ => format!("{ROOT}{}/", kind.plural),
    }
}

#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// At most this many items; 0 = all.
    pub limit: usize,
    pub continue_token: Option<String>,
}

impl ListOptions {
    pub fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.0.is_empty()
    }

    /// Whether an object (as a JSON value) passes both selectors.
    pub fn matches(&self, object: &Value) -> bool {
        if !self.fields.matches(object) {
            return false;
        }
        if self.labels.is_empty() {
            return true;
        }
        let labels = object["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        self.labels.matches(&labels)
    }
}

pub struct ListResult {
    /// Items with their resource versions, ready to send.
    pub items: Vec<Vec<u8>>,
    pub revision: Revision,
    pub continue_token: Option<String>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: Revision,
    start: String,
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

pub(crate) fn parse_stored(kv: &KeyValue) -> Result<Value, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("stored object {} is corrupt: {e}", kv.key)))
}

pub(crate) fn encode(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values serialise")
}

/// Checks the envelope of a body against the path it was sent to, and fills what may be omitted;
/// answers a warning when it had to drop something.
fn check_envelope(
    kind: &KindInfo,
    namespace: Option<&str>,
    body: &mut Value,
) -> Result<Option<String>, ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the body must be a {} object",
            kind.kind
        )));
    };
    match obj.get("apiVersion") {
        None => {}
        Some(Value::String(v)) if v == kind.api_version => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "apiVersion {other} is not served here; use {}",
                kind.api_version
            )))
        }
    }
    match obj.get("kind") {
        None => {}
        Some(Value::String(k)) if k == kind.kind => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "kind {other} does not match the path, which is for {}",
                kind.plural
            )))
        }
    }
    obj.insert("apiVersion".into(), json!(kind.api_version));
    obj.insert("kind".into(), json!(kind.kind));
    let meta = obj.entry("metadata").or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else {
        return Err(ApiError::invalid(
            kind.kind,
            "",
            &flotilla_types::FieldErrors(vec![flotilla_types::FieldError {
                field: "metadata".into(),
                message: "must be an object".into(),
            }]),
        ));
    };
    // As Kubernetes: an empty namespace is the path's; a cluster-scoped object has none.
    let given = match meta.get("namespace") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "metadata.namespace {other} must be a string"
            )))
        }
    };
    if !given.is_empty() && !flotilla_types::validation::is_dns_label(&given) {
        return Err(ApiError::bad_request(format!(
            "metadata.namespace {given:?} is not a project name"
        )));
    }
    match (kind.namespaced, namespace) {
        (true, Some(ns)) if given.is_empty() || given == ns => {
            meta.insert("namespace".into(), json!(ns));
        }
        (true, Some(ns)) => {
            return Err(ApiError::bad_request(format!(
                "metadata.namespace {given:?} does not match the project {ns:?} in the path"
            )))
        }
        (false, _) => {
            meta.remove("namespace");
            if !given.is_empty() {
                return Ok(Some(format!(
                    "metadata.namespace {given:?} ignored: {} is cluster-scoped",
                    kind.kind
                )));
            }
        }
        (true, None) => {}
    }
    Ok(None)
}

pub(crate) fn validate(kind: &KindInfo, v: &Value) -> Result<Value, ApiError> {
    (kind.validate)(v).map_err(|errs| ApiError::invalid(kind.kind, name_of(v), &errs))
}

/// Puts (or, when null, removes) `metadata.managedFields`.
fn set_managed_fields(object: &mut Value, managed: Value) {
    if let Some(meta) = object["metadata"].as_object_mut() {
        if managed.is_null() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), managed);
        }
    }
}

/// Removes the fields `kind` does not have from `v`, one at a time as strict decoding finds
/// them; returns their paths.
fn drop_unknown_fields(kind: &KindInfo, v: &mut Value) -> Vec<String> {
    let mut dropped = Vec::new();
    while dropped.len() < 256 {
        let Err(errs) = (kind.validate)(v) else { break };
        let Some(unknown) = errs
            .0
            .iter()
            .find(|e| e.message.starts_with("unknown field"))
        else {
            break;
        };
        if !remove_path(v, &unknown.field) {
            break;
        }
        dropped.push(unknown.field.clone());
    }
    dropped
}

/// Removes the value at a path like `spec.networks[0].name`; false if there is none.
fn remove_path(v: &mut Value, path: &str) -> bool {
    let mut segments: Vec<String> = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            segments.push(rest[..i].to_string());
            rest = &rest[i..];
            while let Some(end) = rest.find(']') {
                segments.push(rest[..=end].to_string());
                rest = &rest[end + 1..];
            }
        } else {
            segments.push(rest.to_string());
        }
    }
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut here = v;
    for seg in parents.iter().filter(|s| !s.is_empty()) {
        let next = match seg.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(i) => i.parse::<usize>().ok().and_then(|i| here.get_mut(i)),
            None => here.get_mut(seg.as_str()),
        };
        match next {
            Some(n) => here = n,
            None => return false,
        }
    }
    here.as_object_mut()
        .is_some_and(|o| o.remove(last.as_str()).is_some())
}

/// Takes `metadata.resourceVersion` out of a body: the client's precondition, if it sent one.
fn take_precondition(body: &mut Value) -> Result<Option<Revision>, ApiError> {
    let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) else {
        return Ok(None);
    };
    match meta.remove("resourceVersion") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s.parse::<Revision>().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "metadata.resourceVersion {s:?} is not one this server issued"
            ))
        }),
        Some(other) => Err(ApiError::bad_request(format!(
            "metadata.resourceVersion {other} must be a string"
        ))),
    }
}

/// The object API over a store.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn Store>,
    watch_cache: Arc<crate::watch_cache::WatchCache>,
    dry_run: bool,
    unknown_fields: FieldValidation,
    /// Unknown fields dropped under `FieldValidation::Warn`, for the answer's Warning headers.
    warnings: Arc<std::sync::Mutex<Vec<String>>>,
    /// Who writes (`fieldManager`), and whether an apply takes fields from other managers.
    manager: Option<String>,
    force: bool,
    /// This server's IPAM locks and view of held addresses.
    ipam: Arc<crate::ipam::IpamState>,
    /// The id of the request writing, stamped on the objects agents act on.
    request_id: Option<String>,
    /// Callers' RBAC grants, read recently.
    grants: Arc<crate::rbac::GrantsCache>,
}

/// Kinds whose spec an agent acts on: a change of their spec carries its request's id to the
/// agent (see [`crate::audit`]).
const TRACED_KINDS: &[&str] = &["VirtualMachine", "Volume", "VolumeSnapshot", "VMSnapshot"];

/// The manager of writes that name none (controllers inside the server).
const DEFAULT_MANAGER: &str = "flotilla";

/// What a write does with fields the kind does not have (`fieldValidation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// Refuse the write, naming the field (the default, as kubectl asks).
    #[default]
    Strict,
    /// Drop them, and say so in a Warning header.
    Warn,
    /// Drop them.
    Ignore,
}

impl Objects {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Objects {
            watch_cache: Arc::new(crate::watch_cache::WatchCache::new(store.clone())),
            store,
            dry_run: false,
            unknown_fields: FieldValidation::Strict,
            warnings: Default::default(),
            manager: None,
            force: false,
            ipam: Default::default(),
            request_id: None,
            grants: Default::default(),
        }
    }

    /// Callers' grants read recently (see [`crate::rbac::grants_cached`]).
    pub fn grants_cache(&self) -> &crate::rbac::GrantsCache {
        &self.grants
    }

    /// Writes through these objects stamp `id` on the objects agents act on when their spec
    /// changes.
    pub fn with_request_id(&self, id: Option<String>) -> Objects {
        Objects {
            request_id: id,
            ..self.clone()
        }
    }

    fn stamp_request_id(&self, object: &mut Value) {
        let Some(id) = &self.request_id else { return };
        if !TRACED_KINDS.contains(&object["kind"].as_str().unwrap_or_default()) {
            return;
        }
        let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
            return;
        };
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(crate::audit::REQUEST_ID_ANNOTATION.into(), json!(id));
        }
    }

    /// Forgets what this server knows of held addresses (after the IPAM sweeper released some,
    /// so that they are given again at once).
    pub fn forget_held_addresses(&self) {
        self.ipam.forget_all();
    }

    /// The same objects for a dry run (`?dryRun=All`): every write runs in full (decoding,
    /// defaults, validation, guards, conflict checks against the real store) and answers what it
    /// would have stored, but nothing is stored and no watcher sees anything.
    pub fn dry_run(&self) -> Objects {
        Objects {
            store: Arc::new(flotilla_store::DryRunStore::new(self.store.clone())),
            dry_run: true,
            ..self.clone()
        }
    }

    /// The same objects, treating unknown fields in writes as `mode` says.
    pub fn with_field_validation(&self, mode: FieldValidation) -> Objects {
        Objects {
            unknown_fields: mode,
            warnings: Default::default(),
            ..self.clone()
        }
    }

    /// The same objects, writing as field manager `manager`; `force` lets an apply take
    /// fields other managers own.
    pub fn as_manager(&self, manager: Option<String>, force: bool) -> Objects {
        Objects {
            manager,
            force,
            ..self.clone()
        }
    }

    fn manager(&self) -> &str {
        self.manager.as_deref().unwrap_or(DEFAULT_MANAGER)
    }

    /// What writes through these objects had to drop (under `FieldValidation::Warn`).
    pub fn warnings(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let warnings = self.warnings.lock().expect("warnings lock");
        // A body is checked more than once (as sent, then as stored): each warning once.
        warnings
            .iter()
            .filter(|w| seen.insert(w.as_str()))
            .cloned()
            .collect()
    }

    /// [`check_envelope`], its warning kept for the answer.
    fn check_envelope(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        body: &mut Value,
    ) -> Result<(), ApiError> {
        if let Some(warning) = check_envelope(kind, namespace, body)? {
            self.warnings.lock().expect("warnings lock").push(warning);
        }
        Ok(())
    }

    /// The object as the client sent it (or as its patch made it) must be one of the kind as a
    /// whole, also in what the write then ignores (server-set metadata, status on the object,
    /// spec on /status), as Kubernetes decodes the whole object before it looks at a part. A
    /// part left out is taken from the current object.
    fn check_as_sent(
        &self,
        kind: &KindInfo,
        current: &Value,
        wanted: &Value,
    ) -> Result<(), ApiError> {
        let mut probe = wanted.clone();
        if let Some(obj) = probe.as_object_mut() {
            for part in ["spec", "status"] {
                if obj.get(part).is_none_or(Value::is_null) {
                    match current.get(part) {
                        Some(v) => obj.insert(part.into(), v.clone()),
                        None => obj.remove(part),
                    };
                }
            }
        }
        self.validate(kind, &probe).map(|_| ())
    }

    /// Strict decoding and every check, after dropping unknown fields if asked to.
    fn validate(&self, kind: &KindInfo, v: &Value) -> Result<Value, ApiError> {
        if self.unknown_fields == FieldValidation::Strict {
            return validate(kind, v);
        }
        let mut v = v.clone();
        let dropped = drop_unknown_fields(kind, &mut v);
        if self.unknown_fields == FieldValidation::Warn {
            self.warnings.lock().expect("warnings lock").extend(
                dropped
                    .into_iter()
                    .map(|f| format!("unknown field \"{f}\"")),
            );
        }
        validate(kind, &v)
    }

    /// The shared watches of this server (one store watch per kind).
    pub fn watch_cache(&self) -> &crate::watch_cache::WatchCache {
        &self.watch_cache
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Creates the `default` project if it does not exist.
    pub async fn ensure_default_project(&self) -> Result<(), ApiError> {
        let kind = registry::by_kind("Project").expect("Project is registered");
        match self.create(kind, None, json!({"metadata": {"name": "default"}, "spec": {"description": "The default project"}})).await {
            Ok(_) => Ok(()),
            Err(e) if e.0.reason == "AlreadyExists" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates the `default` storage pool (a directory in each node's data directory) if it
    /// does not exist. Deleted, it comes back at the next start.
    pub async fn ensure_default_pool(&self) -> Result<(), ApiError> {
        let kind = registry::by_kind("StoragePool").expect("StoragePool is registered");
        let body = json!({"metadata": {"name": flotilla_types::kinds::storage_pool::DEFAULT_POOL}, "spec": {"type": "dir"}});
        match self.create(kind, None, body).await {
            Ok(_) => Ok(()),
            Err(e) if e.0.reason == "AlreadyExists" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// This cluster's identity: a UUID made when the store was first used, shared by every
    /// replica. Agents write it into the domains they create, so that they never mistake another
    /// installation's domains on the same libvirt for their own.
    pub async fn ensure_cluster_id(&self) -> Result<String, ApiError> {
        let fresh = uuid::Uuid::new_v4().to_string();
        let resp = self
            .store
            .txn(
                Txn::new()
                    .when(Compare::absent(CLUSTER_ID_KEY))
                    .and_then(Op::put(CLUSTER_ID_KEY, fresh.clone().into_bytes()))
                    .or_else(Op::get(CLUSTER_ID_KEY)),
            )
            .await?;
        if resp.succeeded {
            return Ok(fresh);
        }
        match resp.results.first() {
            Some(OpResult::Get { kv: Some(kv) }) => String::from_utf8(kv.value.clone())
                .map_err(|_| ApiError::internal("the stored cluster ID is not text")),
            _ => Err(ApiError::internal(
                "the cluster ID vanished while being read",
            )),
        }
    }

    pub async fn get(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Stored, ApiError> {
        self.get_guarded(kind, namespace, name, &no_guard).await
    }

    pub async fn get_guarded(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        guard: Guard<'_>,
    ) -> Result<Stored, ApiError> {
        let kv = self.get_kv(kind, namespace, name).await?;
        guard(&parse_stored(&kv)?, None)?;
        Ok(Stored {
            raw: kv.value,
            revision: kv.mod_revision,
        })
    }

    pub(crate) async fn get_kv(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<KeyValue, ApiError> {
        self.store
            .get(&object_key(kind, namespace, name))
            .await?
            .ok_or_else(|| ApiError::not_found(kind.kind, name))
    }

    pub async fn create(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        body: Value,
    ) -> Result<Stored, ApiError> {
        self.create_as(kind, namespace, body, None).await
    }

    /// A create; `managed` is the managedFields a server-side apply computed (clients cannot
    /// set them).
    async fn create_as(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        mut body: Value,
        managed: Option<Value>,
    ) -> Result<Stored, ApiError> {
        self.check_envelope(kind, namespace, &mut body)?;
        // What the create then drops or overwrites (status, server-set metadata) must still be
        // what the document says it is.
        self.validate(kind, &body)?;
        let meta = body["metadata"]
            .as_object_mut()
            .expect("checked by check_envelope");
        if meta
            .get("resourceVersion")
            .is_some_and(|v| v.as_str() != Some(""))
        {
            return Err(ApiError::bad_request(
                "metadata.resourceVersion should not be set on objects to be created",
            ));
        }
        for server_owned in flotilla_types::meta::SERVER_SET_FIELDS {
            meta.remove(server_owned);
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        let generate = meta
            .get("name")
            .is_none_or(|n| n.as_str().is_some_and(str::is_empty))
            && meta.get("generateName").is_some_and(Value::is_string);
        if let Some(obj) = body.as_object_mut() {
            obj.remove("status");
        }
        let project = match (kind.namespaced, namespace) {
            (true, Some(ns)) => Some(ns.to_string()),
            (true, None) => {
                return Err(ApiError::bad_request(format!(
                    "{} objects are created inside a project",
                    kind.kind
                )))
            }
            _ => None,
        };
        // Creates that take addresses or VNIs from one record queue in this server, and retry
        // until they land when another server's create got there first.
        let _records = crate::ipam::lock_records(&self.ipam, kind, namespace, &body).await;
        let mut contention = Contention::new();
        while contention.again().await {
            if generate {
                let prefix = body["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                body["metadata"]["name"] = json!(format!("{prefix}{}", random_suffix()));
            }
            let mut object = self.validate(kind, &body)?;
            if let Some(m) = &managed {
                set_managed_fields(&mut object, m.clone());
            }
            self.stamp_request_id(&mut object);
            if let (Some(project), "Volume") = (&project, kind.kind) {
                crate::storage::check_source(self.store.as_ref(), project, &object).await?;
            }
            if let (Some(project), "VolumeSnapshot") = (&project, kind.kind) {
                crate::storage::check_snapshot(self.store.as_ref(), project, &object).await?;
            }
            if let (Some(project), "VMSnapshot") = (&project, kind.kind) {
                crate::vm_snapshots::admit(self.store.as_ref(), project, &mut object).await?;
            }
            if let (Some(project), "VirtualMachine") = (&project, kind.kind) {
                crate::vm_snapshots::place_clone(self.store.as_ref(), project, &mut object).await?;
                crate::security_groups::check_references(
                    self.store.as_ref(),
                    project,
                    &object,
                    None,
                )
                .await?;
            }
            // The project: not being deleted, compared by the write (so that neither its
            // deletion nor another counted create can slip in), and charged for the object.
            let mut project_ops = Vec::new();
            if let Some(ns) = &project {
                let p = crate::quota::project_kv(self.store.as_ref(), ns).await?;
                let p = p.ok_or_else(|| ApiError::not_found("Project", ns))?;
                if parse_stored(&p)?["metadata"]
                    .get("deletionTimestamp")
                    .is_some()
                {
                    return Err(ApiError::forbidden(format!(
                        "project {ns:?} is being deleted; nothing new can be created in it"
                    )));
                }
                let usage = crate::quota::usage_of(self.store.as_ref(), &object).await?;
                match crate::quota::charge(&p, usage, Default::default())? {
                    Some((compare, op)) => project_ops.push((compare, Some(op))),
                    None => project_ops
                        .push((Compare::mod_revision(p.key.clone(), p.mod_revision), None)),
                }
            }
            let attached = match (&project, kind.kind) {
                (Some(project), "VirtualMachine") => {
                    crate::storage::attach(self.store.as_ref(), project, &object, None).await?
                }
                _ => Default::default(),
            };
            let admission = crate::ipam::admit(
                &self.ipam,
                self.store.as_ref(),
                kind,
                namespace,
                &mut object,
            )
            .await?;
            let name = name_of(&object).to_string();
            let key = object_key(kind, namespace, &name);
            let mut txn = Txn::new()
                .when(Compare::absent(&key))
                .or_else(Op::get(&key));
            for compare in admission.compares.into_iter().chain(attached.0) {
                txn = txn.when(compare);
            }
            let mut charges = Vec::new();
            for (compare, op) in project_ops {
                txn = txn.when(compare);
                charges.extend(op);
            }
            if kind.kind == "Project" {
                // A new project holds nothing yet: its use starts at zero, shown from the start.
                crate::quota::set_used(&mut object, Default::default());
            }
            let raw = encode(&object);
            let mut txn = txn.and_then(Op::put(&key, raw.clone()));
            for op in charges {
                txn = txn.and_then(op);
            }
            if kind.kind == "Project" {
                // Every project has its default security group from the start.
                let (group_key, group) = crate::security_groups::default_group(&name);
                txn = txn.and_then(Op::put(&group_key, encode(&group)));
            }
            let admission_networks = crate::ipam::Admission {
                networks: admission.networks,
                ..Default::default()
            };
            for op in admission.ops.into_iter().chain(attached.1) {
                txn = txn.and_then(op);
            }
            let resp = self.store.txn(txn).await;
            if self.dry_run || !resp.as_ref().is_ok_and(|r| r.succeeded) {
                // What it took from the networks was not taken after all.
                self.ipam.forget(&admission_networks);
            }
            let resp = resp?;
            if resp.succeeded {
                return Ok(Stored {
                    raw,
                    revision: resp.revision,
                });
            }
            if matches!(resp.results.first(), Some(OpResult::Get { kv: Some(_) })) {
                if generate {
                    continue;
                }
                return Err(ApiError::already_exists(kind.kind, &name));
            }
            // The project or a network's record changed under us; look again.
        }
        Err(ApiError::new(
            409,
            "Conflict",
            "too many concurrent changes; try again",
        ))
    }

    pub async fn list(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> Result<ListResult, ApiError> {
        let prefix = list_prefix(kind, namespace);
        let end = flotilla_store::prefix_end(&prefix);
        let (mut start, mut revision) = match &opts.continue_token {
            None => (prefix.clone(), 0),
            Some(token) => {
                let t = decode_continue(token)?;
                if !t.start.starts_with(&prefix) {
                    return Err(ApiError::bad_request(
                        "the continue token belongs to a different list",
                    ));
                }
                (t.start, t.rv)
            }
        };
        let want = if opts.limit == 0 {
            usize::MAX
        } else {
            opts.limit
        };
        let mut items = Vec::new();
        let filtering = opts.has_selectors();
        loop {
            let chunk = if filtering {
                want.saturating_sub(items.len()).clamp(64, 2048)
            } else {
                want.min(100_000)
            };
            let req = RangeRequest {
                start: start.clone(),
                end: Some(end.clone()),
                limit: chunk,
                revision,
            };
            let resp = match self.store.range(req).await {
                Err(flotilla_store::StoreError::Compacted { .. }) => {
                    return Err(ApiError::gone(
                        "the continue token is too old: the list it started has been compacted; start the list again without continue",
                    ))
                }
                other => other?,
            };
            revision = resp.revision;
            let mut last_key = None;
            for kv in resp.kvs {
                last_key = Some(kv.key.clone());
                if filtering && !opts.matches(&parse_stored(&kv)?) {
                    continue;
                }
                items.push(splice_resource_version(&kv.value, kv.mod_revision));
                if items.len() == want {
                    break;
                }
            }
            match last_key {
                Some(k) if items.len() == want => {
                    let next_start = format!("{k}\0");
                    let token = if self.has_more(&next_start, &end, revision, opts).await? {
                        Some(encode_continue(revision, next_start))
                    } else {
                        None
                    };
                    return Ok(ListResult {
                        items,
                        revision,
                        continue_token: token,
                    });
                }
                Some(k) if resp.more => start = format!("{k}\0"),
                _ => {
                    return Ok(ListResult {
                        items,
                        revision,
                        continue_token: None,
                    })
                }
            }
        }
    }

    async fn has_more(
        &self,
        start: &str,
        end: &str,
        revision: Revision,
        opts: &ListOptions,
    ) -> Result<bool, ApiError> {
        let mut start = start.to_string();
        loop {
            let req = RangeRequest {
                start: start.clone(),
                end: Some(end.to_string()),
                limit: 256,
                revision,
            };
            let resp = self.store.range(req).await?;
            if !opts.has_selectors() {
                return Ok(!resp.kvs.is_empty());
            }
            for kv in &resp.kvs {
                if opts.matches(&parse_stored(kv)?) {
                    return Ok(true);
                }
            }
            match resp.kvs.last() {
                Some(kv) if resp.more => start = format!("{}\0", kv.key),
                _ => return Ok(false),
            }
        }
    }

    /// PUT: replaces spec and user metadata (Main) or status (Status).
    pub async fn update(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        body: Value,
        sub: Subresource,
    ) -> Result<Stored, ApiError> {
        self.update_guarded(kind, namespace, name, body, sub, &no_guard)
            .await
    }

    pub async fn update_guarded(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        mut body: Value,
        sub: Subresource,
        guard: Guard<'_>,
    ) -> Result<Stored, ApiError> {
        self.check_envelope(kind, namespace, &mut body)?;
        match body["metadata"].get("name") {
            None => body["metadata"]["name"] = json!(name),
            Some(Value::String(n)) if n == name => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "metadata.name {other} does not match the name {name:?} in the path"
                )))
            }
        }
        let precondition = take_precondition(&mut body)?;
        let how = WriteOptions {
            precondition,
            sub,
            guard,
        };
        self.update_with(kind, namespace, name, how, |_, _| Ok(body.clone()))
            .await
    }

    /// PATCH with a JSON merge patch (RFC 7386) or a JSON patch (RFC 6902).
    pub async fn patch(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        patch: PatchBody,
        sub: Subresource,
    ) -> Result<Stored, ApiError> {
        self.patch_guarded(kind, namespace, name, patch, sub, &no_guard)
            .await
    }

    pub async fn patch_guarded(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        patch: PatchBody,
        sub: Subresource,
        guard: Guard<'_>,
    ) -> Result<Stored, ApiError> {
        if let PatchBody::Apply(config) = &patch {
            return self.apply(kind, namespace, name, config, sub, guard).await;
        }
        // A resourceVersion inside a merge patch is a precondition, as in Kubernetes.
        let precondition = match &patch {
            PatchBody::Merge(p) => {
                let mut p = p.clone();
                take_precondition(&mut p)?
            }
            PatchBody::Json(_) | PatchBody::Apply(_) => None,
        };
        let how = WriteOptions {
            precondition,
            sub,
            guard,
        };
        self.update_with(kind, namespace, name, how, |current, revision| {
            let mut doc = current.clone();
            let served = revision.to_string();
            match &patch {
                PatchBody::Merge(p) => {
                    if !p.is_object() {
                        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                    }
                    json_patch::merge(&mut doc, p);
                }
                PatchBody::Json(p) => {
                    // Patched as the client saw the object, resourceVersion included; a
                    // resourceVersion the patch leaves different is a precondition that failed
                    // (kubectl's managed-fields migration tests it this way).
                    doc["metadata"]["resourceVersion"] = Value::String(served.clone());
                    json_patch::patch(&mut doc, p).map_err(|e| {
                        ApiError::new(
                            422,
                            "Invalid",
                            format!("the JSON patch cannot be applied: {e}"),
                        )
                    })?;
                    match doc["metadata"].get("resourceVersion") {
                        None | Some(Value::Null) => {}
                        Some(Value::String(rv)) if *rv == served || rv.is_empty() => {}
                        Some(_) => return Err(ApiError::conflict(kind.kind, name)),
                    }
                }
                PatchBody::Apply(_) => unreachable!("applied above"),
            }
            if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("resourceVersion");
            }
            if name_of(&doc) != name {
                return Err(ApiError::bad_request("a patch cannot change metadata.name"));
            }
            Ok(doc)
        })
        .await
    }

    /// Server-side apply of `config` by this manager: creates the object if it does not exist,
    /// else merges the configuration in (409 naming the fields and their managers when it
    /// would change fields others own, unless forced).
    async fn apply(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        config: &Value,
        sub: Subresource,
        guard: Guard<'_>,
    ) -> Result<Stored, ApiError> {
        let mut config = config.clone();
        if config.get("apiVersion").is_none() || config.get("kind").is_none() {
            return Err(ApiError::bad_request(
                "an applied configuration names its apiVersion and kind",
            ));
        }
        self.check_envelope(kind, namespace, &mut config)?;
        match config["metadata"].get("name") {
            None => {
                return Err(ApiError::bad_request(
                    "an applied configuration names its object in metadata.name",
                ))
            }
            Some(Value::String(n)) if n == name => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "metadata.name {other} does not match the name {name:?} in the path"
                )))
            }
        }
        let precondition = take_precondition(&mut config)?;
        let status = sub == Subresource::Status;
        let mut contention = Contention::new();
        while contention.again().await {
            let kv = match self.get_kv(kind, namespace, name).await {
                Ok(kv) => kv,
                Err(e) if e.code() == 404 && !status => {
                    // Nothing to apply to: the configuration makes it.
                    let made = crate::apply::apply(
                        None,
                        &config,
                        self.manager(),
                        self.force,
                        false,
                        kind.api_version,
                    );
                    // The configuration makes the whole object: it must be one, status too.
                    self.validate(kind, &config)?;
                    // What may not be created may not be applied into existence either.
                    guard(&Value::Null, Some(&made.object))?;
                    let managed = made.object["metadata"]["managedFields"].clone();
                    match self
                        .create_as(kind, namespace, made.object, Some(managed))
                        .await
                    {
                        Err(e) if e.0.reason == "AlreadyExists" => continue,
                        other => return other,
                    }
                }
                Err(e) => return Err(e),
            };
            if precondition.is_some_and(|rv| rv != kv.mod_revision) {
                return Err(ApiError::conflict(kind.kind, name));
            }
            let current = parse_stored(&kv)?;
            let applied = crate::apply::apply(
                Some(&current),
                &config,
                self.manager(),
                self.force,
                status,
                kind.api_version,
            );
            if !applied.conflicts.is_empty() {
                let (message, causes) = crate::apply::conflict_message(&applied.conflicts);
                let mut e = ApiError::new(409, "Conflict", message);
                e.0.details = Some(flotilla_types::status::StatusDetails {
                    name: name.to_string(),
                    kind: kind.kind.to_string(),
                    causes: causes
                        .into_iter()
                        .map(|(field, message)| flotilla_types::status::StatusCause {
                            reason: Some("FieldManagerConflict".into()),
                            field,
                            message,
                        })
                        .collect(),
                    retry_after_seconds: None,
                });
                return Err(e);
            }
            let managed = applied.object["metadata"]["managedFields"].clone();
            // The applied object, with what this apply ignores as the configuration has it.
            let mut as_sent = applied.object.clone();
            let ignored = if status { "spec" } else { "status" };
            if let Some(part) = config.get(ignored).filter(|v| !v.is_null()) {
                as_sent[ignored] = part.clone();
            }
            self.check_as_sent(kind, &current, &as_sent)?;
            let next = merge_for_write(kind, &current, applied.object, sub)?;
            let mut next = self.validate(kind, &next)?;
            set_managed_fields(&mut next, managed);
            match self.commit_update(kv, &current, next, guard).await? {
                Some(stored) => return Ok(stored),
                None if precondition.is_some() => return Err(ApiError::conflict(kind.kind, name)),
                None => continue,
            }
        }
        Err(ApiError::conflict(kind.kind, name))
    }

    /// The read-modify-write loop behind PUT and PATCH. `desired` maps the current object to what
    /// the client wants; server-owned fields are then restored, and only `sub` may differ.
    async fn update_with(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        how: WriteOptions<'_>,
        desired: impl Fn(&Value, Revision) -> Result<Value, ApiError>,
    ) -> Result<Stored, ApiError> {
        let WriteOptions {
            precondition,
            sub,
            guard,
        } = how;
        let mut contention = Contention::new();
        while contention.again().await {
            let kv = self.get_kv(kind, namespace, name).await?;
            if precondition.is_some_and(|rv| rv != kv.mod_revision) {
                return Err(ApiError::conflict(kind.kind, name));
            }
            let current = parse_stored(&kv)?;
            let wanted = desired(&current, kv.mod_revision)?;
            self.check_as_sent(kind, &current, &wanted)?;
            let next = merge_for_write(kind, &current, wanted, sub)?;
            let mut next = self.validate(kind, &next)?;
            crate::apply::record_update(
                &current,
                &mut next,
                self.manager(),
                sub == Subresource::Status,
                kind.api_version,
            );
            match self.commit_update(kv, &current, next, guard).await? {
                Some(stored) => return Ok(stored),
                None if precondition.is_some() => return Err(ApiError::conflict(kind.kind, name)),
                None => continue,
            }
        }
        Err(ApiError::conflict(kind.kind, name))
    }

    /// The end of every update of `current` (stored as `kv`) to `next`: the generation moves when
    /// the spec changed (compared in canonical form, so that defaults filled in do not count),
    /// the guard is asked, an update that changes nothing answers what is stored, and anything
    /// else is written if nobody wrote first (None when someone did).
    async fn commit_update(
        &self,
        kv: KeyValue,
        current: &Value,
        mut next: Value,
        guard: Guard<'_>,
    ) -> Result<Option<Stored>, ApiError> {
        let mut attached = (Vec::new(), Vec::new());
        keep_request_id(current, &mut next);
        if next.get("spec") != current.get("spec") {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(generation + 1);
            self.stamp_request_id(&mut next);
            if next["kind"] == "VirtualMachine" {
                let project = next["metadata"]["namespace"].as_str().unwrap_or("default");
                crate::security_groups::check_references(
                    self.store.as_ref(),
                    project,
                    &next,
                    Some(current),
                )
                .await?;
                attached =
                    crate::storage::attach(self.store.as_ref(), project, &next, Some(current))
                        .await?;
            }
            if next["kind"] == "Volume" {
                crate::storage::check_resize(self.store.as_ref(), current, &next).await?;
            }
            if crate::quota::counted(next["kind"].as_str().unwrap_or_default()) {
                let store = self.store.as_ref();
                let (was, will) = (
                    crate::quota::usage_of(store, current).await?,
                    crate::quota::usage_of(store, &next).await?,
                );
                let project = next["metadata"]["namespace"].as_str().unwrap_or("default");
                if let Some(p) = crate::quota::project_kv(store, project).await? {
                    if let Some((compare, op)) = crate::quota::charge(&p, will, was)? {
                        attached.0.push(compare);
                        attached.1.push(op);
                    }
                }
            }
            if next["kind"] == "Project" && next["spec"]["quota"] != current["spec"]["quota"] {
                // A new quota starts from what the project holds (the write compares the
                // project's revision, which every counted change moves).
                let name = next["metadata"]["name"].as_str().unwrap_or_default();
                let total = crate::quota::total(self.store.as_ref(), name).await?;
                crate::quota::set_used(&mut next, total);
            }
        }
        guard(current, Some(&next))?;
        if next == *current {
            return Ok(Some(Stored {
                raw: kv.value,
                revision: kv.mod_revision,
            }));
        }
        self.write_with(&kv, &next, attached).await
    }

    /// Writes `next` over `current` if nobody else did first (None when someone did). An object
    /// being deleted whose last finalizer is gone is deleted instead.
    async fn write(&self, current: &KeyValue, next: &Value) -> Result<Option<Stored>, ApiError> {
        self.write_with(current, next, Default::default()).await
    }

    /// [`Self::write`] with further compares and operations in the same transaction.
    async fn write_with(
        &self,
        current: &KeyValue,
        next: &Value,
        (compares, ops): (Vec<Compare>, Vec<Op>),
    ) -> Result<Option<Stored>, ApiError> {
        let finalized = next["metadata"].get("deletionTimestamp").is_some()
            && next["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty);
        let raw = encode(next);
        let mut txn = Txn::new().when(Compare::mod_revision(&current.key, current.mod_revision));
        for c in compares {
            txn = txn.when(c);
        }
        for op in ops {
            txn = txn.and_then(op);
        }
        if finalized {
            txn = txn.and_then(Op::delete(&current.key));
            let (compares, ops) = self.removal_effects(next).await?;
            for c in compares {
                txn = txn.when(c);
            }
            for op in ops {
                txn = txn.and_then(op);
            }
        } else {
            txn = txn.and_then(Op::put(&current.key, raw.clone()));
        }
        let resp = self.store.txn(txn).await?;
        Ok(resp.succeeded.then_some(Stored {
            raw,
            revision: resp.revision,
        }))
    }

    /// What goes with an object when it is finally removed, in the same transaction: the
    /// addresses its NICs hold, a service account's tokens.
    async fn removal_effects(&self, object: &Value) -> Result<(Vec<Compare>, Vec<Op>), ApiError> {
        let kind = object["kind"].as_str().unwrap_or_default();
        let (compares, mut ops) = if crate::ipam::holds_ports(kind) {
            crate::ipam::release_with(self.store.as_ref(), object).await?
        } else {
            Default::default()
        };
        let mut compares = compares;
        if kind == "ServiceAccount" {
            ops.extend(crate::service_accounts::removal_ops(object));
        }
        if crate::quota::counted(kind) {
            let store = self.store.as_ref();
            let project = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default");
            if let Some(p) = crate::quota::project_kv(store, project).await? {
                let usage = crate::quota::usage_of(store, object).await?;
                if let Some((compare, op)) = crate::quota::charge(&p, Default::default(), usage)? {
                    compares.push(compare);
                    ops.push(op);
                }
            }
        }
        Ok((compares, ops))
    }

    /// DELETE: immediate without finalizers, else marks the object with `deletionTimestamp` and
    /// leaves it until its finalizers are removed. Returns the object and whether it is gone.
    pub async fn delete(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(Stored, bool), ApiError> {
        self.delete_with(kind, namespace, name, &DeleteOptions::default())
            .await
    }

    /// DELETE with Kubernetes' options: preconditions (uid, resourceVersion: 409 when they no
    /// longer hold), propagation (Foreground and Orphan add the finalizer the garbage collector
    /// acts on) and a grace period (kept in `metadata.deletionGracePeriodSeconds`).
    pub async fn delete_with(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<(Stored, bool), ApiError> {
        if kind.kind == "Project" {
            return self.delete_project(kind, name).await;
        }
        if kind.kind == "SecurityGroup" {
            crate::security_groups::check_delete(
                self.store.as_ref(),
                namespace.unwrap_or_default(),
                name,
            )
            .await?;
        }
        if kind.kind == "StoragePool" {
            crate::storage::check_pool_delete(self.store.as_ref(), name).await?;
        }
        if kind.kind == "VolumeSnapshot" {
            crate::storage::check_snapshot_delete(
                self.store.as_ref(),
                namespace.unwrap_or_default(),
                name,
            )
            .await?;
        }
        if kind.kind == "VMSnapshot" {
            crate::vm_snapshots::check_delete(
                self.store.as_ref(),
                namespace.unwrap_or_default(),
                name,
            )
            .await?;
        }
        if matches!(kind.kind, "VirtualMachine" | "Volume") {
            crate::vm_snapshots::check_holder_delete(
                self.store.as_ref(),
                namespace.unwrap_or_default(),
                kind.kind,
                name,
            )
            .await?;
        }
        if kind.kind == "Volume" {
            crate::storage::check_volume_delete(
                self.store.as_ref(),
                namespace.unwrap_or_default(),
                name,
            )
            .await?;
        }
        if kind.kind == "Network" {
            let project = namespace.unwrap_or_default();
            let users = crate::ipam::holders(self.store.as_ref(), project, name).await?;
            if !users.is_empty() {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "network {name:?} is used by {}: delete them (or detach them) first",
                        crate::ipam::describe_holders(&users)
                    ),
                ));
            }
        }
        let mut contention = Contention::new();
        while contention.again().await {
            let kv = self.get_kv(kind, namespace, name).await?;
            let mut current = parse_stored(&kv)?;
            options.check_preconditions(kind, name, &current, kv.mod_revision)?;
            if kind.kind == "Volume" {
                // Here, against the revision the write compares: an attach made meanwhile fails it.
                crate::storage::check_volume_detached(&current)?;
            }
            let propagation_finalizer = match options.propagation {
                Some(Propagation::Foreground) => Some(FOREGROUND_FINALIZER),
                Some(Propagation::Orphan) => Some(ORPHAN_FINALIZER),
                _ => None,
            };
            let mut finalizers: Vec<Value> = current["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if finalizers.is_empty() && propagation_finalizer.is_none() {
                let mut txn = Txn::new()
                    .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                    .and_then(Op::delete(&kv.key));
                let (compares, ops) = self.removal_effects(&current).await?;
                for c in compares {
                    txn = txn.when(c);
                }
                for op in ops {
                    txn = txn.and_then(op);
                }
                let resp = self.store.txn(txn).await?;
                if resp.succeeded {
                    return Ok((
                        Stored {
                            raw: kv.value,
                            revision: resp.revision,
                        },
                        true,
                    ));
                }
                continue;
            }
            let marked = current["metadata"].get("deletionTimestamp").is_some();
            let mut changed = false;
            if let Some(f) = propagation_finalizer {
                if !finalizers.iter().any(|x| x == f) {
                    finalizers.push(json!(f));
                    changed = true;
                }
            }
            if !marked {
                current["metadata"]["deletionTimestamp"] = json!(now());
                self.stamp_request_id(&mut current);
                let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
                current["metadata"]["generation"] = json!(generation + 1);
                changed = true;
            }
            if let Some(grace) = options.grace_period_seconds {
                // A later deletion may shorten the grace period, never lengthen it.
                let now = current["metadata"]["deletionGracePeriodSeconds"].as_i64();
                if now.is_none_or(|n| grace < n) {
                    current["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                    changed = true;
                }
            }
            if !changed {
                return Ok((
                    Stored {
                        raw: kv.value,
                        revision: kv.mod_revision,
                    },
                    false,
                ));
            }
            current["metadata"]["finalizers"] = json!(finalizers);
            if let Some(stored) = self.write(&kv, &current).await? {
                return Ok((stored, false));
            }
        }
        Err(ApiError::conflict(kind.kind, name))
    }

    /// A project is deleted only when empty. It is marked first, so that a create racing with the
    /// deletion fails its guard on the project instead of leaving an orphan behind.
    async fn delete_project(
        &self,
        kind: &KindInfo,
        name: &str,
    ) -> Result<(Stored, bool), ApiError> {
        if name == "default" {
            return Err(ApiError::forbidden("the default project cannot be deleted"));
        }
        let kv = self.get_kv(kind, None, name).await?;
        let mut marked = parse_stored(&kv)?;
        marked["metadata"]["deletionTimestamp"] = json!(now());
        if self.dry_run {
            // Nothing to mark: say whether the deletion would go through.
            let contents = self.project_contents(name).await?;
            if !contents.is_empty() {
                return Err(project_not_empty(name, &contents));
            }
            return Ok((
                Stored {
                    raw: encode(&marked),
                    revision: kv.mod_revision,
                },
                true,
            ));
        }
        // A plain put: `write` would treat "deleting without finalizers" as "delete now".
        let raw = encode(&marked);
        let mark = Txn::new()
            .when(Compare::mod_revision(&kv.key, kv.mod_revision))
            .and_then(Op::put(&kv.key, raw.clone()));
        let resp = self.store.txn(mark).await?;
        if !resp.succeeded {
            return Err(ApiError::conflict(kind.kind, name));
        }
        let mut marked_stored = Stored {
            raw,
            revision: resp.revision,
        };
        let mut contents = self.project_contents(name).await?;
        if !contents.is_empty() && contents.iter().all(|c| GO_WITH_PROJECT.contains(c)) {
            // Who may use the project, and what happened in it, go with it (as in a Kubernetes
            // namespace); its workloads never do. Nothing new can appear meanwhile: creates
            // refuse a marked project.
            self.delete_all_in(name, &contents).await?;
            contents = self.project_contents(name).await?;
            if let Some(kv) = self.store.get(&object_key(kind, None, name)).await? {
                marked_stored.revision = kv.mod_revision;
            }
        }
        let key = object_key(kind, None, name);
        if contents.is_empty() {
            // The default security group goes with the project (nothing else may be left).
            let (group_key, _) = crate::security_groups::default_group(name);
            let txn = Txn::new()
                .when(Compare::mod_revision(&key, marked_stored.revision))
                .and_then(Op::delete(&key))
                .and_then(Op::delete(&group_key));
            if self.store.txn(txn).await?.succeeded {
                return Ok((
                    Stored {
                        raw: marked_stored.raw,
                        revision: marked_stored.revision,
                    },
                    true,
                ));
            }
            return Err(ApiError::conflict(kind.kind, name));
        }
        // Not empty: take the mark back so the project stays usable.
        let unmark = Txn::new()
            .when(Compare::mod_revision(&key, marked_stored.revision))
            .and_then(Op::put(&key, kv.value.clone()));
        self.store.txn(unmark).await?;
        Err(project_not_empty(name, &contents))
    }

    /// Deletes every object of the kinds `plurals` in project `name`.
    async fn delete_all_in(&self, name: &str, plurals: &[&str]) -> Result<(), ApiError> {
        for plural in plurals {
            let kind = registry::by_plural(plural).expect("a served kind");
            let kvs = self
                .store
                .range(RangeRequest::prefix(&list_prefix(kind, Some(name))))
                .await?
                .kvs;
            for kv in kvs {
                let object = parse_stored(&kv)?;
                // Boxed: a project's deletion deletes (not projects, but through the same call).
                let deletion = Box::pin(self.delete(kind, Some(name), name_of(&object)));
                match deletion.await {
                    Ok(_) => {}
                    Err(e) if e.code() == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The kinds (plural) that have objects in project `name`.
    async fn project_contents(&self, name: &str) -> Result<Vec<&'static str>, ApiError> {
        let mut contents = Vec::new();
        let (default_group, _) = crate::security_groups::default_group(name);
        for k in registry::KINDS.iter().filter(|k| k.namespaced) {
            let resp = self
                .store
                .range(RangeRequest::prefix(&list_prefix(k, Some(name))).with_limit(2))
                .await?;
            // The default security group is part of the project, not something left in it.
            if resp.kvs.iter().any(|kv| kv.key != default_group) {
                contents.push(k.plural);
            }
        }
        Ok(contents)
    }
}

/// The request id stamped on an object is the server's: a write that leaves it out (a manifest
/// applied again) keeps it, and only a change of the spec replaces it.
fn keep_request_id(current: &Value, next: &mut Value) {
    if !TRACED_KINDS.contains(&current["kind"].as_str().unwrap_or_default()) {
        return;
    }
    let key = crate::audit::REQUEST_ID_ANNOTATION;
    let kept = current["metadata"]["annotations"].get(key).cloned();
    let Some(meta) = next.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    match kept {
        Some(id) => {
            let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
            if let Some(a) = annotations.as_object_mut() {
                a.insert(key.into(), id);
            }
        }
        None => {
            if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
                a.remove(key);
                if a.is_empty() {
                    meta.remove("annotations");
                }
            }
        }
    }
}

/// What a project's deletion deletes with it; anything else in it refuses the deletion.
const GO_WITH_PROJECT: &[&str] = &["serviceaccounts", "roles", "rolebindings", "events"];

fn project_not_empty(name: &str, contents: &[&str]) -> ApiError {
    // Only what blocks the deletion: the rest would go with the project.
    let blocking: Vec<&str> = contents
        .iter()
        .copied()
        .filter(|c| !GO_WITH_PROJECT.contains(c))
        .collect();
    let contents = if blocking.is_empty() {
        contents
    } else {
        &blocking
    };
    ApiError::new(
        409,
        "Conflict",
        format!(
            "project {name:?} is not empty (it still has {}); delete those first",
            contents.join(", ")
        ),
    )
}

/// The finalizers of Kubernetes' propagation policies: the garbage collector deletes (or, for
/// `orphan`, releases) the object's dependents, then removes them.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
pub const ORPHAN_FINALIZER: &str = "orphan";

/// What happens to the dependents (objects naming it in `ownerReferences`) of a deleted object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// The object goes at once; the garbage collector deletes its dependents afterwards.
    Background,
    /// The object stays (being deleted) until its dependents are gone.
    Foreground,
    /// The object goes; its dependents stay, without the owner reference.
    Orphan,
}

/// Kubernetes' DeleteOptions (but dryRun, which chooses [`Objects::dry_run`]).
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub propagation: Option<Propagation>,
    pub grace_period_seconds: Option<i64>,
    /// Delete only if the object still has this uid / resourceVersion.
    /// Compared as text, as Kubernetes does: any other value (even one this server never issued)
    /// is a failed precondition, 409.
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

impl DeleteOptions {
    fn check_preconditions(
        &self,
        kind: &KindInfo,
        name: &str,
        current: &Value,
        revision: Revision,
    ) -> Result<(), ApiError> {
        let uid = current["metadata"]["uid"].as_str().unwrap_or_default();
        if let Some(want) = &self.uid {
            if want != uid {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "{} {name:?} was not deleted: precondition failed: UID in precondition: {want}, UID in object meta: {uid}",
                        kind.kind
                    ),
                ));
            }
        }
        if let Some(want) = &self.resource_version {
            if *want != revision.to_string() {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "{} {name:?} was not deleted: precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {revision}",
                        kind.kind
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Builds the object to store from the current one and what the client sent.
fn merge_for_write(
    kind: &KindInfo,
    current: &Value,
    mut wanted: Value,
    sub: Subresource,
) -> Result<Value, ApiError> {
    if !wanted.is_object() {
        return Err(ApiError::bad_request(format!(
            "the body must be a {} object",
            kind.kind
        )));
    }
    let mut next = match sub {
        Subresource::Status => {
            let mut next = current.clone();
            match wanted.as_object_mut().and_then(|o| o.remove("status")) {
                Some(Value::Null) | None => {
                    next.as_object_mut().expect("object").remove("status");
                }
                Some(status) => next["status"] = status,
            }
            next
        }
        Subresource::Main => {
            let obj = wanted.as_object_mut().expect("checked above");
            obj.remove("status");
            if let Some(status) = current.get("status") {
                obj.insert("status".into(), status.clone());
            }
            if !obj.get("metadata").is_some_and(Value::is_object) {
                obj.insert("metadata".into(), json!({}));
            }
            let meta = obj["metadata"].as_object_mut().expect("object");
            for owned in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
                "generation",
                "namespace",
                "generateName",
            ] {
                meta.remove(owned);
                if let Some(v) = current["metadata"].get(owned) {
                    meta.insert(owned.into(), v.clone());
                }
            }
            if current["metadata"].get("deletionTimestamp").is_some() {
                let before: Vec<&Value> = current["metadata"]["finalizers"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default();
                let added = meta
                    .get("finalizers")
                    .and_then(Value::as_array)
                    .is_some_and(|now| now.iter().any(|f| !before.contains(&f)));
                if added {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "{} {:?} is invalid: metadata.finalizers: no finalizer can be added while the object is being deleted",
                            kind.kind,
                            name_of(current)
                        ),
                    ));
                }
            }
            keep_set_once(kind, current, &mut wanted)?;
            if kind.kind == "VirtualMachine" {
                keep_nics(current, &wanted)?;
                only_grow(kind.kind, "spec.rootDisk.size", current, &wanted)?;
            }
            if kind.kind == "Volume" {
                only_grow(kind.kind, "spec.size", current, &wanted)?;
            }
            wanted
        }
    };
    next["apiVersion"] = json!(kind.api_version);
    next["kind"] = json!(kind.kind);
    Ok(next)
}

/// Restores the kind's set-once spec fields that `next` omits, and refuses changes to them.
fn keep_set_once(kind: &KindInfo, current: &Value, next: &mut Value) -> Result<(), ApiError> {
    let mut errs = flotilla_types::FieldErrors::default();
    for field in kind.set_once {
        let pointer = format!("/{}", field.replace('.', "/"));
        let Some(was) = current.pointer(&pointer).filter(|v| !v.is_null()) else {
            continue;
        };
        match next.pointer(&pointer).filter(|v| !v.is_null()) {
            None => {
                let (parent, leaf) = pointer.rsplit_once('/').expect("a dotted path");
                if let Some(obj) = next.pointer_mut(parent).and_then(Value::as_object_mut) {
                    obj.insert(leaf.to_string(), was.clone());
                }
            }
            Some(now) if now == was => {}
            Some(now) => errs.push(
                field.to_string(),
                format!("cannot change once set (it is {was}, not {now}); delete and recreate the object to change it"),
            ),
        }
    }
    errs.into_result()
        .map_err(|errs| ApiError::invalid(kind.kind, name_of(current), &errs))
}

/// A disk's size (a volume's, a VM's root disk's) may grow, never shrink: the data past the
/// new end would be lost.
fn only_grow(kind: &str, field: &str, current: &Value, next: &Value) -> Result<(), ApiError> {
    let pointer = format!("/{}", field.replace('.', "/"));
    let size = |v: &Value| {
        v.pointer(&pointer)
            .and_then(Value::as_str)
            .and_then(|s| flotilla_types::Quantity::parse(s).ok())
    };
    match (size(current), size(next)) {
        (Some(was), Some(now)) if now.value() < was.value() => {
            let mut errs = flotilla_types::FieldErrors::default();
            errs.push(
                field,
                format!("cannot shrink from {was} to {now}: the data past the new end would be lost; disks only grow"),
            );
            Err(ApiError::invalid(kind, name_of(current), &errs))
        }
        _ => Ok(()),
    }
}

/// A VM's NICs get their MACs and addresses when it is created (in the create's transaction):
/// until NICs can be added and removed on a VM, `spec.networks` stays as created (but for each
/// NIC's security groups and allowed address pairs).
fn keep_nics(current: &Value, next: &Value) -> Result<(), ApiError> {
    // Compared as NICs, not as JSON (absent and null fields are the same NIC).
    let nics = |v: &Value| {
        let list = v["spec"]
            .get("networks")
            .filter(|l| !l.is_null())
            .cloned()
            .unwrap_or(json!([]));
        serde_json::from_value::<Vec<flotilla_types::kinds::NetworkAttachment>>(list).ok()
    };
    // Groups and allowed address pairs may change on a running VM; nothing else may.
    let fixed = |nics: Vec<flotilla_types::kinds::NetworkAttachment>| {
        nics.into_iter()
            .map(|n| flotilla_types::kinds::NetworkAttachment {
                security_groups: None,
                allowed_address_pairs: Vec::new(),
                ..n
            })
            .collect::<Vec<_>>()
    };
    match (nics(current).map(fixed), nics(next).map(fixed)) {
        (Some(was), Some(now)) if was != now => {}
        // Unchanged, or not NICs at all (validation says why).
        _ => return Ok(()),
    }
    let mut errs = flotilla_types::FieldErrors::default();
    errs.push(
        "spec.networks",
        "cannot change after the VM is created (its NICs got their MACs and addresses then); delete and recreate the VM to change its networks",
    );
    Err(ApiError::invalid("VirtualMachine", name_of(current), &errs))
}

/// A PATCH body, by its content type.
pub enum PatchBody {
    Merge(Value),
    Json(json_patch::Patch),
    /// Server-side apply of this configuration (`application/apply-patch+yaml`).
    Apply(Value),
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

fn encode_continue(rv: Revision, start: String) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&ContinueToken { rv, start }).expect("serialises"))
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "the continue token is malformed; pass back the one a list returned",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_version_is_spliced_into_metadata() {
        let raw = br#"{"apiVersion":"a","kind":"K","metadata":{"name":"x"},"spec":{}}"#;
        let out: Value = serde_json::from_slice(&splice_resource_version(raw, 42)).unwrap();
        assert_eq!(
            out["metadata"],
            json!({"name": "x", "resourceVersion": "42"})
        );
        let empty = br#"{"metadata":{}}"#;
        let out: Value = serde_json::from_slice(&splice_resource_version(empty, 7)).unwrap();
        assert_eq!(out["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn continue_tokens_roundtrip_and_reject_garbage() {
        let t = decode_continue(&encode_continue(9, "/registry/x/a\0".into())).unwrap();
        assert_eq!((t.rv, t.start.as_str()), (9, "/registry/x/a\0"));
        assert_eq!(decode_continue("!!").unwrap_err().code(), 400);
    }
}
