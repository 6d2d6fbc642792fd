//! The OpenAPI 3 document, generated from the kinds' types. A copy is checked in at
//! `openapi/flotilla.json`; a test fails when the two drift apart.

use flotilla_types::registry::{KindInfo, KINDS};
use schemars::gen::SchemaSettings;
use serde_json::{json, Map, Value};

fn schema_ref(kind: &KindInfo) -> Value {
    json!({"$ref": format!("#/components/schemas/{}", kind.kind)})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn errors() -> Value {
    let status = json!({"$ref": "#/components/schemas/Status"});
    json!({
        "400": ok("Malformed request", status.clone()),
        "401": ok("Missing or invalid bearer token", status.clone()),
        "404": ok("Not found", status.clone()),
        "409": ok("Already exists, or a stale resourceVersion", status.clone()),
        "410": ok("resourceVersion too old (compacted)", status.clone()),
        "413": ok("Body too large", status.clone()),
        "422": ok("Invalid object; details.causes name each field", status),
    })
}

fn with_errors(mut responses: Value) -> Value {
    if let (Some(r), Some(e)) = (responses.as_object_mut(), errors().as_object()) {
        for (k, v) in e {
            r.insert(k.clone(), v.clone());
        }
    }
    responses
}

fn query_params() -> Value {
    let p = |name: &str, ty: &str, desc: &str| json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": ty}});
    json!([
        p(
            "labelSelector",
            "string",
            "Only objects whose labels match, e.g. app=web,tier!=db"
        ),
        p(
            "fieldSelector",
            "string",
            "Only objects whose fields match, e.g. spec.nodeName=node-1"
        ),
        p(
            "limit",
            "integer",
            "At most this many items; pass metadata.continue back for the next page"
        ),
        p(
            "continue",
            "string",
            "The continue token of the previous page"
        ),
        p(
            "watch",
            "boolean",
            "Stream changes as newline-delimited JSON events"
        ),
        p(
            "resourceVersion",
            "string",
            "With watch: stream changes after this version"
        ),
        p(
            "allowWatchBookmarks",
            "boolean",
            "With watch: send BOOKMARK events"
        ),
        p(
            "timeoutSeconds",
            "integer",
            "With watch: end the stream after this long"
        ),
    ])
}

fn paths_for(kind: &KindInfo, paths: &mut Map<String, Value>) {
    let base = format!("/apis/{}", flotilla_types::API_VERSION);
    let (collection, item) = if kind.namespaced {
        (
            format!("{base}/namespaces/{{project}}/{}", kind.plural),
            format!("{base}/namespaces/{{project}}/{}/{{name}}", kind.plural),
        )
    } else {
        (
            format!("{base}/{}", kind.plural),
            format!("{base}/{}/{{name}}", kind.plural),
        )
    };
    let mut path_params = Vec::new();
    if kind.namespaced {
        path_params.push(json!({"name": "project", "in": "path", "required": true, "schema": {"type": "string"}}));
    }
    let mut item_params = path_params.clone();
    item_params.push(
        json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}),
    );
    let obj = schema_ref(kind);
    let list = json!({"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "metadata": {"type": "object", "properties": {"resourceVersion": {"type": "string"}, "continue": {"type": "string"}}},
        "items": {"type": "array", "items": obj.clone()}}});
    let body = json!({"required": true, "content": {"application/json": {"schema": obj.clone()}, "application/yaml": {"schema": obj.clone()}}});
    let patch = json!({"required": true, "content": {
        "application/merge-patch+json": {"schema": {"type": "object"}},
        "application/json-patch+json": {"schema": {"type": "array", "items": {"type": "object"}}}}});
    let k = kind.kind;
    paths.insert(collection, json!({
        "parameters": path_params,
        "get": {"operationId": format!("list{k}"), "summary": format!("List or watch {}", kind.plural),
                "parameters": query_params(), "responses": with_errors(json!({"200": ok("The list, or a stream of watch events", list)}))},
        "post": {"operationId": format!("create{k}"), "summary": format!("Create a {k}"), "requestBody": body.clone(),
                 "responses": with_errors(json!({"201": ok("Created", obj.clone())}))},
    }));
    paths.insert(item.clone(), json!({
        "parameters": item_params.clone(),
        "get": {"operationId": format!("read{k}"), "responses": with_errors(json!({"200": ok("The object", obj.clone())}))},
        "put": {"operationId": format!("replace{k}"), "summary": "Replace spec and metadata; a stale metadata.resourceVersion is 409",
                "requestBody": body.clone(), "responses": with_errors(json!({"200": ok("Replaced", obj.clone())}))},
        "patch": {"operationId": format!("patch{k}"), "requestBody": patch.clone(),
                  "responses": with_errors(json!({"200": ok("Patched", obj.clone())}))},
        "delete": {"operationId": format!("delete{k}"), "summary": "Delete; with finalizers the object stays, marked with deletionTimestamp",
                   "responses": with_errors(json!({"200": ok("Deleted", obj.clone()), "202": ok("Deletion pending finalizers", obj.clone())}))},
    }));
    paths.insert(format!("{item}/status"), json!({
        "parameters": item_params,
        "get": {"operationId": format!("read{k}Status"), "responses": with_errors(json!({"200": ok("The object", obj.clone())}))},
        "put": {"operationId": format!("replace{k}Status"), "summary": "Replace status only", "requestBody": body,
                "responses": with_errors(json!({"200": ok("Replaced", obj.clone())}))},
        "patch": {"operationId": format!("patch{k}Status"), "requestBody": patch, "responses": with_errors(json!({"200": ok("Patched", obj)}))},
    }));
}

/// The whole document.
pub fn document() -> Value {
    let mut gen = SchemaSettings::openapi3().into_generator();
    for kind in KINDS {
        (kind.schema)(&mut gen);
    }
    let mut schemas: Map<String, Value> = gen
        .definitions()
        .iter()
        .map(|(name, schema)| {
            (
                name.clone(),
                serde_json::to_value(schema).expect("schemas serialise"),
            )
        })
        .collect();
    schemas.insert(
        "Status".into(),
        json!({"type": "object", "description": "An error (or success) report", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "status": {"type": "string"},
            "message": {"type": "string"}, "reason": {"type": "string"}, "code": {"type": "integer"},
            "details": {"type": "object", "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                "causes": {"type": "array", "items": {"type": "object", "properties": {
                    "field": {"type": "string"}, "message": {"type": "string"}}}}}}}}),
    );
    let mut paths = Map::new();
    for kind in KINDS {
        paths_for(kind, &mut paths);
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Flotilla API", "version": flotilla_types::VERSION,
                 "description": "Declarative VM orchestration for libvirt fleets. Kubernetes-style resources under flotilla.dev/v1alpha1."},
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
    })
}
