//! The OpenAPI documents, generated from the kinds' types, served as Kubernetes serves them:
//! - `/openapi/v3`: the index, one entry per group-version with a `serverRelativeURL` carrying
//!   the document's hash (clients cache by it);
//! - `/openapi/v3/apis/flotilla.dev/v1alpha1` and `/openapi/v3/api/v1`: one OpenAPI 3 document
//!   per group-version, each kind's schema marked with `x-kubernetes-group-version-kind` (how
//!   kubectl finds the schema to validate `apply` and to `explain`);
//! - `/openapi/v2`: one Swagger 2 document of every kind, for older clients.
//!
//! Copies are checked in under `openapi/`; a test fails when they drift from what is served.

use std::collections::BTreeMap;

use flotilla_types::registry::{KindInfo, KINDS};
use schemars::gen::SchemaSettings;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// A served document: its bytes and their hash (the ETag, and the `hash` of the index's URL).
pub struct Served {
    pub bytes: Vec<u8>,
    pub hash: String,
}

impl Served {
    fn new(doc: &Value) -> Self {
        let bytes = serde_json::to_vec(doc).expect("documents serialise");
        let hash = hex::encode(&Sha256::digest(&bytes)[..16]);
        Served { bytes, hash }
    }
}

/// Every document the server serves, made once at start.
pub struct Documents {
    pub index: Served,
    /// By group-version path: `apis/flotilla.dev/v1alpha1`, `api/v1`.
    pub groups: BTreeMap<String, Served>,
    pub v2: Served,
}

/// The group-versions kinds are served in, as their document paths (`apis/flotilla.dev/v1alpha1`).
fn group_versions() -> Vec<&'static str> {
    let mut gvs: Vec<&'static str> = KINDS.iter().map(|k| k.api_version).collect();
    gvs.sort();
    gvs.dedup();
    gvs
}

fn document_path(api_version: &str) -> String {
    if api_version.contains('/') {
        format!("apis/{api_version}")
    } else {
        format!("api/{api_version}")
    }
}

/// `(group, version)` of an apiVersion: core kinds have the empty group.
fn group_and_version(api_version: &str) -> (&str, &str) {
    api_version.split_once('/').unwrap_or(("", api_version))
}

impl Documents {
    pub fn build() -> Self {
        let mut groups = BTreeMap::new();
        let mut index = Map::new();
        for gv in group_versions() {
            let served = Served::new(&group_document(gv));
            let path = document_path(gv);
            index.insert(
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", served.hash)}),
            );
            groups.insert(path, served);
        }
        Documents {
            index: Served::new(&json!({ "paths": index })),
            groups,
            v2: Served::new(&v2_document()),
        }
    }
}

/// The schema settings of one document; `definitions` is where `$ref`s point.
fn generator(definitions: &str, openapi3: bool) -> schemars::gen::SchemaGenerator {
    let mut settings = if openapi3 {
        SchemaSettings::openapi3()
    } else {
        SchemaSettings::draft07()
    };
    settings.definitions_path = definitions.to_string();
    if !openapi3 {
        // Swagger 2 has no nullable; an absent field is how it says "none".
        settings.option_nullable = false;
        settings.option_add_null_type = false;
        settings.meta_schema = None;
    }
    settings.into_generator()
}

/// The schemas of `kinds` (and what they use), each kind's marked with its group-version-kind.
fn schemas(kinds: &[&'static KindInfo], definitions: &str, openapi3: bool) -> Map<String, Value> {
    let mut gen = generator(definitions, openapi3);
    for kind in kinds {
        (kind.schema)(&mut gen);
    }
    let mut out: Map<String, Value> = gen
        .definitions()
        .iter()
        .map(|(name, schema)| {
            (
                name.clone(),
                serde_json::to_value(schema).expect("schemas serialise"),
            )
        })
        .collect();
    for kind in kinds {
        let (group, version) = group_and_version(kind.api_version);
        if let Some(schema) = out.get_mut(kind.kind) {
            schema["x-kubernetes-group-version-kind"] =
                json!([{"group": group, "version": version, "kind": kind.kind}]);
            // The server refuses any other value (it may be left out: the path says it).
            if let Some(props) = schema["properties"].as_object_mut() {
                for (field, value) in [("apiVersion", kind.api_version), ("kind", kind.kind)] {
                    if let Some(p) = props.get_mut(field) {
                        p["enum"] = json!([value]);
                        p["default"] = json!(value);
                    }
                }
            }
        }
    }
    if openapi3 {
        state_what_the_server_enforces(&mut out);
    }
    out.insert("Status".into(), status_schema(definitions));
    out.insert("WatchEvent".into(), json!({
        "type": "object", "required": ["type", "object"],
        "description": "One line of a watch stream (newline-delimited JSON).",
        "properties": {
            "type": {"type": "string", "enum": ["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"],
                     "description": "What happened; ERROR carries a Status (e.g. 410 when the resourceVersion was compacted)."},
            "object": {"type": "object", "description": "The object after the change (before it, for DELETED); for BOOKMARK only its resourceVersion."}}}));
    let mut delete_options = json!({
        "type": "object", "description": "Options of a DELETE (all optional).",
        "properties": {
            "apiVersion": {"type": "string", "description": "v1 or meta.k8s.io/v1"},
            "kind": {"type": "string", "description": "DeleteOptions"},
            "dryRun": {"type": "array", "items": {"type": "string", "enum": ["All", ""]}, "description": "All: run the deletion, change nothing."},
            "gracePeriodSeconds": {"type": "integer", "minimum": 0, "maximum": i64::MAX, "description": "For a VM: how long its guest may take to shut down (0 or absent: at once)."},
            "propagationPolicy": {"type": "string", "enum": ["Background", "Foreground", "Orphan"], "description": "What happens to dependents: deleted afterwards (Background), first (Foreground), or kept (Orphan)."},
            "orphanDependents": {"type": "boolean", "description": "Deprecated: true means propagationPolicy Orphan."},
            "preconditions": {"type": "object", "description": "Delete only if the object still has this uid and resourceVersion (409 otherwise).",
                "properties": {"uid": {"type": "string", "description": "The object's uid."},
                               "resourceVersion": {"type": "string", "description": "The object's resourceVersion."}}}}});
    if openapi3 {
        // As everywhere in Kubernetes' API, null is the same as leaving a field out.
        if let Some(props) = delete_options["properties"].as_object_mut() {
            if let Some(inner) = props
                .get_mut("preconditions")
                .and_then(|p| p.get_mut("properties"))
                .and_then(Value::as_object_mut)
            {
                for p in inner.values_mut() {
                    p["nullable"] = json!(true);
                }
            }
            for p in props.values_mut() {
                p["nullable"] = json!(true);
                // An enum lists null itself when null is allowed (OpenAPI 3.0.3).
                if let Some(values) = p.get_mut("enum").and_then(Value::as_array_mut) {
                    values.push(Value::Null);
                }
            }
        }
    }
    out.insert("DeleteOptions".into(), delete_options);
    out
}

/// What the server checks that the types' derived schemas cannot say by themselves (OpenAPI 3
/// only: Swagger 2 has no anyOf).
fn state_what_the_server_enforces(schemas: &mut Map<String, Value>) {
    // A quantity is a string such as 2Gi or a whole number, as Kubernetes' int-or-string. The
    // string pattern bounds the digits so that every value it allows is one the server can hold.
    if let Some(q) = schemas.get_mut("Quantity") {
        let description = q["description"].clone();
        *q = json!({
            "description": description,
            "x-kubernetes-int-or-string": true,
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": u64::MAX},
                {"type": "string", "pattern": flotilla_types::quantity::PATTERN},
            ],
        });
    }
    // Integers are bounded by the types the server reads them into.
    for schema in schemas.values_mut() {
        bound_integers(schema);
    }
    // A name, or a generateName for the server to make one from.
    if let Some(meta) = schemas.get_mut("ObjectMeta") {
        meta["anyOf"] = json!([
            {"required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
            {"required": ["generateName"], "properties": {"generateName": {"type": "string"}}},
        ]);
    }
}

/// Adds the range of its format (uint32, int64, ...) to every integer that does not state one.
fn bound_integers(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let range: Option<(Value, Value)> = match map.get("format").and_then(Value::as_str) {
                Some("uint32") => Some((json!(0), json!(u32::MAX))),
                Some("int32") => Some((json!(i32::MIN), json!(i32::MAX))),
                Some("uint64" | "uint") => Some((json!(0), json!(u64::MAX))),
                Some("int64") => Some((json!(i64::MIN), json!(i64::MAX))),
                _ => None,
            };
            if let Some((min, max)) = range {
                map.entry("minimum").or_insert(min);
                map.entry("maximum").or_insert(max);
            }
            for v in map.values_mut() {
                bound_integers(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

fn status_schema(definitions: &str) -> Value {
    let _ = definitions;
    json!({"type": "object", "description": "An error (or success) report, as Kubernetes' Status.",
        "required": ["apiVersion", "kind", "status", "message", "reason", "code"],
        "properties": {
            "apiVersion": {"type": "string", "description": "v1"},
            "kind": {"type": "string", "description": "Status"},
            "status": {"type": "string", "enum": ["Success", "Failure"], "description": "Success or Failure."},
            "message": {"type": "string", "description": "What went wrong, for a person."},
            "reason": {"type": "string", "description": "A machine-readable word: NotFound, AlreadyExists, Conflict, Invalid, BadRequest, ..."},
            "code": {"type": "integer", "description": "The HTTP status code."},
            "details": {"type": "object", "description": "More about the error.", "properties": {
                "name": {"type": "string", "description": "The object's name."},
                "kind": {"type": "string", "description": "The object's kind."},
                "retryAfterSeconds": {"type": "integer", "description": "When to try again (429, 503, 504)."},
                "causes": {"type": "array", "description": "One entry per problem.", "items": {"type": "object", "properties": {
                    "reason": {"type": "string", "description": "A machine-readable word, e.g. FieldValueInvalid."},
                    "field": {"type": "string", "description": "The field's path, e.g. spec.resources.cpus."},
                    "message": {"type": "string", "description": "What is wrong with it."}}}}}}}})
}

/// A response whose body is an object of `schema`.
fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// The error answers every operation can give.
fn errors(status: &Value, codes: &[(&str, &str)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (code, what) in [
        (
            "400",
            "Malformed request: a bad query parameter, body or selector",
        ),
        ("401", "Missing or invalid bearer token"),
        ("403", "The credentials may not do this"),
        ("404", "No such object, project or resource"),
        (
            "429",
            "Too many failed authentications from this address; see Retry-After",
        ),
        (
            "503",
            "The store did not answer (e.g. etcd lost its leader); see Retry-After. A write's outcome is unknown: read before writing again",
        ),
    ]
    .iter()
    .chain(codes)
    {
        out.insert(code.to_string(), ok(what, status.clone()));
    }
    out
}

fn param(name: &str, ty: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": ty})
}

fn dry_run() -> Value {
    param("dryRun", json!({"type": "string", "enum": ["All", ""]}), "All: run the write in full (validation, conflicts) and answer what would be stored, storing nothing (empty: a real write)")
}

fn field_validation() -> Value {
    param(
        "fieldValidation",
        json!({"type": "string", "enum": ["Strict", "Warn", "Ignore", ""]}),
        "Unknown fields in the body: Strict (the default, also when empty) refuses them, Warn drops them with a Warning header, Ignore drops them",
    )
}

/// An RFC 6901 JSON pointer: empty (the whole document) or /-separated tokens, `~` escaped.
const JSON_POINTER: &str = "^(/([^~]|~[01])*)*$";

/// One RFC 6902 operation: add, replace and test carry a value; move and copy a from.
fn json_patch_operation() -> Value {
    let op = |ops: &[&str], extra: &str| {
        let mut required = vec!["op", "path"];
        if !extra.is_empty() {
            required.push(extra);
        }
        json!({"type": "object", "required": required, "properties": {
            "op": {"type": "string", "enum": ops, "description": "What to do"},
            "path": {"type": "string", "pattern": JSON_POINTER, "description": "A JSON pointer, e.g. /spec/powerState"},
            "from": {"type": "string", "pattern": JSON_POINTER, "description": "For move and copy: the pointer to take the value from"},
            "value": {"description": "For add, replace and test: the value"}}})
    };
    json!({"description": "One operation", "oneOf": [
        op(&["add", "replace", "test"], "value"),
        op(&["remove"], ""),
        op(&["move", "copy"], "from"),
    ]})
}

/// A resourceVersion in a query: one this server issued (or empty).
fn resource_version_param(description: &str) -> Value {
    param(
        "resourceVersion",
        json!({"type": "string", "pattern": "^[0-9]{0,18}$"}),
        description,
    )
}

fn list_params() -> Vec<Value> {
    vec![
        param("labelSelector", json!({"type": "string"}), "Only objects whose labels match, e.g. app=web,tier!=db,zone in (a,b)"),
        param("fieldSelector", json!({"type": "string"}), "Only objects whose fields match, e.g. metadata.name=web or spec.nodeName=node-1"),
        param("limit", json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}), "At most this many items (0: all); pass metadata.continue back for the next page"),
        param("continue", json!({"type": "string"}), "The continue token of the previous page (opaque: only the server makes them)"),
        resource_version_param("Read at least this fresh (a version the store has not reached is answered 504 after 3 s)"),
        param("timeoutSeconds", json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}), "Accepted for Kubernetes clients; a list answers at once"),
        param("includeObject", json!({"type": "string", "enum": ["None", "Metadata", "Object"]}), "With a Table answer: what each row carries of its object"),
    ]
}

/// The parameters of a watch (the `watch` operation, or a list with watch=true).
fn watch_params() -> Vec<Value> {
    let boolean = json!({"type": "boolean"});
    vec![
        param("labelSelector", json!({"type": "string"}), "Only objects whose labels match, e.g. app=web,tier!=db,zone in (a,b)"),
        param("fieldSelector", json!({"type": "string"}), "Only objects whose fields match, e.g. metadata.name=web or spec.nodeName=node-1"),
        resource_version_param("Stream the changes after this version; absent: every object as ADDED first (a version the store has not reached is answered 504 after 3 s; one compacted away, an ERROR event with 410)"),
        param("allowWatchBookmarks", boolean, "Send BOOKMARK events now and then, so a client can resume from a recent version"),
        param("timeoutSeconds", json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}), "End the stream after this long"),
        param("includeObject", json!({"type": "string", "enum": ["None", "Metadata", "Object"]}), "With Table events: what each row carries of its object"),
    ]
}

fn paths_for(kind: &KindInfo, definitions: &str, paths: &mut Map<String, Value>) {
    let mut own = Map::new();
    paths_of(kind, definitions, &mut own);
    paths.extend(own);
}

fn paths_of(kind: &KindInfo, definitions: &str, paths: &mut Map<String, Value>) {
    let root = kind.api_root();
    let (collection, item) = if kind.namespaced {
        (
            format!("{root}/namespaces/{{namespace}}/{}", kind.plural),
            format!("{root}/namespaces/{{namespace}}/{}/{{name}}", kind.plural),
        )
    } else {
        (
            format!("{root}/{}", kind.plural),
            format!("{root}/{}/{{name}}", kind.plural),
        )
    };
    let name = json!({"type": "string", "pattern": flotilla_types::validation::DNS_LABEL_PATTERN, "maxLength": 63});
    let mut path_params = Vec::new();
    if kind.namespaced {
        path_params.push(json!({"name": "namespace", "in": "path", "required": true, "description": "The project", "schema": name.clone()}));
    }
    let mut item_params = path_params.clone();
    item_params.push(json!({"name": "name", "in": "path", "required": true, "description": "The object's name", "schema": name}));
    let reference = |name: &str| json!({"$ref": format!("{definitions}{name}")});
    let (obj, status) = (reference(kind.kind), reference("Status"));
    let list = json!({"type": "object", "description": format!("A list of {}", kind.plural),
        "required": ["apiVersion", "kind", "metadata", "items"],
        "properties": {
            "apiVersion": {"type": "string", "description": kind.api_version},
            "kind": {"type": "string", "description": format!("{}List", kind.kind)},
            "metadata": {"type": "object", "description": "Where the list was read", "properties": {
                "resourceVersion": {"type": "string", "description": "Watch from here to see every later change"},
                "continue": {"type": "string", "description": "Pass as continue to read the next page"}}},
            "items": {"type": "array", "items": obj.clone(), "description": "The objects"}}});
    // YAML is read too, but documented is JSON: YAML 1.1 writers and this YAML 1.2 reader
    // disagree on plain scalars such as 1e+100 (a string to one, a number to the other).
    let body = json!({"required": true, "content": {"application/json": {"schema": obj.clone()}}});
    let patch = json!({"required": true, "content": {
        "application/merge-patch+json": {"schema": {"type": "object", "description": "An RFC 7386 merge patch"}},
        "application/json-patch+json": {"schema": {"type": "array", "description": "An RFC 6902 JSON patch", "items": json_patch_operation()}},
        "application/apply-patch+yaml": {"schema": {"allOf": [obj.clone()], "required": ["apiVersion", "kind", "metadata"],
            "description": "Server-side apply: the fields this manager owns, as an object of the kind naming its apiVersion, kind and metadata.name"}}}});
    let delete_body = json!({"required": false, "content": {"application/json": {"schema": reference("DeleteOptions")}}});
    let k = kind.kind;
    let with = |mut m: Map<String, Value>, extra: Value| {
        if let Value::Object(e) = extra {
            m.extend(e);
        }
        Value::Object(m)
    };
    let read_errors = || {
        errors(
            &status,
            &[("504", "A resourceVersion the store has not reached yet")],
        )
    };
    let write_errors = || {
        errors(
            &status,
            &[
                (
                    "409",
                    "Already exists, a stale resourceVersion, or a failed precondition",
                ),
                ("413", "The body is larger than 3 MiB"),
                ("415", "A content type this operation does not take"),
                ("422", "An invalid object; details.causes name each field"),
            ],
        )
    };
    let mut list_params = list_params();
    list_params.extend([dry_run()]);
    let mut delete_params = vec![
        dry_run(),
        param(
            "gracePeriodSeconds",
            json!({"type": "integer", "minimum": 0, "maximum": i64::MAX}),
            "For a VM: how long its guest may take to shut down",
        ),
        param(
            "propagationPolicy",
            json!({"type": "string", "enum": ["Background", "Foreground", "Orphan"]}),
            "What happens to dependents",
        ),
    ];
    let write_params = json!([
        dry_run(),
        field_validation(),
        param(
            "fieldManager",
            json!({"type": "string", "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}),
            "Who makes the change (server-side apply: required), at most 128 printable characters"
        )
    ]);
    let mut patch_params = write_params.as_array().cloned().unwrap_or_default();
    patch_params.push(param(
        "force",
        json!({"type": "boolean"}),
        "Server-side apply: take over fields other managers own",
    ));
    paths.insert(collection, json!({
        "parameters": path_params.clone(),
        "get": {"operationId": format!("list{k}"),
                "description": format!("List {}. With watch=true (and the parameters of the watch operation) this answers as watch{k} does", kind.plural),
                "parameters": list_params.iter().filter(|p| p["name"] != "dryRun").collect::<Vec<_>>(),
                "responses": with(read_errors(), json!({"200": ok("The list", list.clone())}))},
        "post": {"operationId": format!("create{k}"), "description": format!("Create a {k}"), "parameters": write_params, "requestBody": body.clone(),
                 "responses": with(write_errors(), json!({"201": ok("Created", obj.clone()), "405": ok("Not allowed here", status.clone())}))},
        "delete": {"operationId": format!("deletecollection{k}"), "description": format!("Delete every {k} the selectors match"),
                   "parameters": list_params.iter().chain(delete_params.iter()).filter(|p| p["name"] != "watch").cloned().collect::<Vec<_>>(),
                   "requestBody": delete_body.clone(),
                   "responses": with(write_errors(), json!({"200": ok("What was deleted (or marked for deletion)", list.clone()),
                                                             "504": ok("A resourceVersion the store has not reached yet", status.clone())}))},
    }));
    // The watch as its own operation, at Kubernetes' watch path: a stream, not a list.
    let watch_path = match kind.namespaced {
        true => format!("{root}/watch/namespaces/{{namespace}}/{}", kind.plural),
        false => format!("{root}/watch/{}", kind.plural),
    };
    paths.insert(watch_path, json!({
        "parameters": path_params,
        "get": {"operationId": format!("watch{k}List"),
                "description": format!("Watch {}: newline-delimited WatchEvents, one per change, until timeoutSeconds or the client leaves", kind.plural),
                "parameters": watch_params(),
                "responses": with(read_errors(), json!({"200": {"description": "A stream of WatchEvents, one JSON object per line", "content": {
                    "application/json;stream=watch": {"schema": reference("WatchEvent")}}}}))},
    }));
    delete_params.push(json!({"name": "orphanDependents", "in": "query", "required": false, "description": "Deprecated: true means propagationPolicy Orphan", "schema": {"type": "boolean"}}));
    paths.insert(item.clone(), json!({
        "parameters": item_params.clone(),
        "get": {"operationId": format!("read{k}"), "description": format!("Read a {k}"),
                "responses": with(read_errors(), json!({"200": ok("The object", obj.clone())}))},
        "put": {"operationId": format!("replace{k}"), "description": "Replace spec and metadata; a stale metadata.resourceVersion is 409",
                "parameters": write_params, "requestBody": body.clone(),
                "responses": with(write_errors(), json!({"200": ok("Replaced", obj.clone())}))},
        "patch": {"operationId": format!("patch{k}"), "description": "Merge patch, JSON patch, or server-side apply",
                  "parameters": patch_params.clone(), "requestBody": patch.clone(),
                  "responses": with(write_errors(), json!({"200": ok("Patched", obj.clone()), "201": ok("Created by server-side apply", obj.clone())}))},
        "delete": {"operationId": format!("delete{k}"), "description": "Delete; an object with finalizers stays, marked with deletionTimestamp, until they are done",
                   "parameters": delete_params, "requestBody": delete_body,
                   "responses": with(write_errors(), json!({"200": ok("Deleted", obj.clone()), "202": ok("Deletion pending finalizers", obj.clone())}))},
    }));
    // Every operation names its kind and action, as Kubernetes' documents do: kubectl finds the
    // PATCH operation of a kind by them to see that fieldValidation is supported.
    let (group, version) = group_and_version(kind.api_version);
    let gvk = json!({"group": group, "version": version, "kind": k});
    let mark = |path: &mut Value| {
        for (method, action) in [
            ("get", "get"),
            ("post", "post"),
            ("put", "put"),
            ("patch", "patch"),
            ("delete", "delete"),
        ] {
            if let Some(op) = path.get_mut(method) {
                let action = match (method, op["operationId"].as_str()) {
                    ("get", Some(id)) if id.starts_with("list") => "list",
                    ("get", Some(id)) if id.starts_with("watch") => "watchlist",
                    ("delete", Some(id)) if id.starts_with("deletecollection") => {
                        "deletecollection"
                    }
                    _ => action,
                };
                op["x-kubernetes-action"] = json!(action);
                op["x-kubernetes-group-version-kind"] = gvk.clone();
            }
        }
    };
    if kind.has_status {
        paths.insert(format!("{item}/status"), json!({
            "parameters": item_params,
            "get": {"operationId": format!("read{k}Status"), "description": format!("Read a {k} (for its status)"),
                    "responses": with(read_errors(), json!({"200": ok("The object", obj.clone())}))},
            "put": {"operationId": format!("replace{k}Status"), "description": "Replace status only", "parameters": write_params, "requestBody": body,
                    "responses": with(write_errors(), json!({"200": ok("Replaced", obj.clone())}))},
            "patch": {"operationId": format!("patch{k}Status"), "description": "Patch status only", "parameters": patch_params, "requestBody": patch,
                      "responses": with(write_errors(), json!({"200": ok("Patched", obj)}))},
        }));
    }
    if kind.kind == "Network" {
        let address = json!({"type": "object", "required": ["address", "vm", "uid", "macAddress"], "properties": {
            "address": {"type": "string", "description": "The IPv4 address."},
            "vm": {"type": "string", "description": "The VM whose NIC holds it."},
            "uid": {"type": "string", "description": "The VM's uid."},
            "macAddress": {"type": "string", "description": "The NIC's MAC address."},
        }});
        let list = json!({"type": "object", "required": ["apiVersion", "kind", "metadata", "items"], "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string", "enum": ["NetworkAddressList"]},
            "metadata": {"type": "object", "properties": {"resourceVersion": {"type": "string"}}},
            "items": {"type": "array", "items": address, "description": "The addresses, in address order."},
        }});
        paths.insert(format!("{item}/addresses"), json!({
            "parameters": item_params,
            "get": {"operationId": "readNetworkAddresses",
                    "description": "The addresses NICs hold on the network, with their VMs and MACs: what each node's DHCP and DNS server serves",
                    "responses": with(read_errors(), json!({"200": ok("The addresses", list)}))},
        }));
    }
    for path in paths.values_mut() {
        mark(path);
    }
}

/// The OpenAPI 3 document of one group-version.
pub fn group_document(api_version: &str) -> Value {
    let kinds: Vec<&'static KindInfo> = KINDS
        .iter()
        .filter(|k| k.api_version == api_version)
        .collect();
    let definitions = "#/components/schemas/";
    let mut paths = Map::new();
    for kind in &kinds {
        paths_for(kind, definitions, &mut paths);
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Flotilla API", "version": api_version,
                 "description": "Declarative VM orchestration for libvirt fleets, with Kubernetes API conventions."},
        "security": [{"BearerToken": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"BearerToken": {"type": "apiKey", "in": "header", "name": "authorization",
                "description": "Bearer token: \"Authorization: Bearer flt.<id>.<secret>\""}},
            "schemas": schemas(&kinds, definitions, true),
        },
    })
}

/// The Swagger 2 document of every kind (definitions only carry what older clients read).
pub fn v2_document() -> Value {
    let kinds: Vec<&'static KindInfo> = KINDS.iter().collect();
    let definitions = "#/definitions/";
    let mut paths = Map::new();
    for kind in &kinds {
        let root = kind.api_root();
        let collection = if kind.namespaced {
            format!("{root}/namespaces/{{namespace}}/{}", kind.plural)
        } else {
            format!("{root}/{}", kind.plural)
        };
        paths.insert(collection, json!({"get": {"operationId": format!("list{}", kind.kind),
            "description": format!("List or watch {}", kind.plural), "produces": ["application/json"],
            "responses": {"200": {"description": "OK"}}}}));
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Flotilla API", "version": flotilla_types::VERSION},
        "securityDefinitions": {"BearerToken": {"type": "apiKey", "in": "header", "name": "authorization"}},
        "security": [{"BearerToken": []}],
        "paths": paths,
        "definitions": schemas(&kinds, definitions, false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every property of every schema says what it is (kubectl explain shows it).
    fn undocumented(name: &str, schema: &Value, at: &str, out: &mut Vec<String>) {
        if let Some(props) = schema["properties"].as_object() {
            for (field, s) in props {
                let here = format!("{at}.{field}");
                if s.get("description").is_none() {
                    out.push(format!("{name}{here}"));
                }
                undocumented(name, s, &here, out);
            }
        }
        if let Some(items) = schema.get("items") {
            undocumented(name, items, &format!("{at}[]"), out);
        }
    }

    #[test]
    fn every_field_is_described_and_every_kind_carries_its_gvk() {
        let mut missing = Vec::new();
        for gv in group_versions() {
            let doc = group_document(gv);
            for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
                undocumented(name, schema, "", &mut missing);
            }
        }
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:#?}"
        );
        let flotilla = group_document(flotilla_types::API_VERSION);
        let vm = &flotilla["components"]["schemas"]["VirtualMachine"];
        assert_eq!(
            vm["x-kubernetes-group-version-kind"][0]["group"],
            "flotilla.dev"
        );
        let core = group_document("v1");
        let event = &core["components"]["schemas"]["Event"];
        assert_eq!(event["x-kubernetes-group-version-kind"][0]["group"], "");
        assert!(core["paths"]
            .as_object()
            .unwrap()
            .keys()
            .all(|p| p.starts_with("/api/v1/")));
    }
}
