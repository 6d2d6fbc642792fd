//! Binding a VM to a node: the scheduler's one write per placement.
//!
//! A binding sets `spec.nodeName`, the agent's finalizer and the VM's `Scheduled` status in one
//! transaction, guarded by the VM's resourceVersion (it must still be the unbound VM the
//! scheduler looked at) and by the node's claim key, which the same transaction bumps. The claim key is the node's capacity
//! generation, as in Nova's placement service: two schedulers that both saw the node with room
//! for one more VM both compare against the same claim revision, so only one binding lands; the
//! other learns the claim's new revision and places again once it has seen what changed.

use flotilla_store::{Compare, Op, OpResult, Revision, Txn};
use flotilla_types::kinds::vm::AGENT_FINALIZER;
use flotilla_types::registry::KindInfo;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::objects::{encode, parse_stored, validate, Objects};

/// Where the claim keys of nodes live (outside `/registry/`: they are not API objects).
pub const CLAIMS_PREFIX: &str = "/flotilla/claims/";

pub fn claim_key(node: &str) -> String {
    format!("{CLAIMS_PREFIX}{node}")
}

/// The outcome of [`Objects::bind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Bound at this revision, which is now also the claim's revision.
    Bound { revision: Revision },
    /// The VM changed since the scheduler saw it (edited, bound, deleted or being deleted).
    Changed,
    /// Someone else claimed capacity on the node first; the claim is now at `claim_revision`.
    ClaimLost { claim_revision: Revision },
}

impl Objects {
    /// Binds the unbound object `name` (at `resource_version`) to `node`, merging `status` into its
    /// status, if the node's claim key is still at `claim_revision` (0: never claimed).
    #[allow(clippy::too_many_arguments)]
    pub async fn bind(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        resource_version: Revision,
        node: &str,
        status: Value,
        claim_revision: Revision,
    ) -> Result<Binding, ApiError> {
        let kv = match self.get_kv(kind, namespace, name).await {
            Ok(kv) => kv,
            Err(e) if e.code() == 404 => return Ok(Binding::Changed),
            Err(e) => return Err(e),
        };
        let current = parse_stored(&kv)?;
        if kv.mod_revision != resource_version
            || current["spec"]["nodeName"].is_string()
            || current["metadata"].get("deletionTimestamp").is_some()
        {
            return Ok(Binding::Changed);
        }
        let mut next = current.clone();
        next["spec"]["nodeName"] = json!(node);
        // From now on the node holds things to clean up: deletion waits for its agent.
        let mut finalizers: Vec<String> =
            serde_json::from_value(current["metadata"]["finalizers"].clone()).unwrap_or_default();
        if !finalizers.iter().any(|f| f == AGENT_FINALIZER) {
            finalizers.push(AGENT_FINALIZER.to_string());
        }
        next["metadata"]["finalizers"] = json!(finalizers);
        let mut status = status;
        keep_other_conditions(&current, &mut status);
        json_patch::merge(&mut next, &json!({ "status": status }));
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        next["metadata"]["generation"] = json!(generation + 1);
        let next = validate(kind, &next)?;
        let claim = claim_key(node);
        let record = json!({"vm": kv.key, "revision": resource_version});
        let resp = self
            .store()
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                    .when(Compare::mod_revision(&claim, claim_revision))
                    .and_then(Op::put(&kv.key, encode(&next)))
                    .and_then(Op::put(&claim, encode(&record)))
                    .or_else(Op::get(&claim)),
            )
            .await?;
        if resp.succeeded {
            return Ok(Binding::Bound {
                revision: resp.revision,
            });
        }
        let now = match resp.results.first() {
            Some(OpResult::Get { kv }) => kv.as_ref().map_or(0, |kv| kv.mod_revision),
            _ => claim_revision,
        };
        Ok(if now != claim_revision {
            Binding::ClaimLost {
                claim_revision: now,
            }
        } else {
            Binding::Changed
        })
    }
}

/// The conditions `status` sets, after those of other types `current` has (e.g. a VM's
/// `Evacuated` stays when it is bound again).
fn keep_other_conditions(current: &Value, status: &mut Value) {
    let Some(new) = status.get("conditions").and_then(Value::as_array) else {
        return;
    };
    let types: Vec<&Value> = new.iter().map(|c| &c["type"]).collect();
    let mut all: Vec<Value> = current["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| !types.contains(&&c["type"]))
        .cloned()
        .collect();
    all.extend(new.iter().cloned());
    status["conditions"] = Value::Array(all);
}

impl Objects {
    /// Moves the VM `name` (with `uid`) from node `from` to node `to`: the one write that ends
    /// a migration, made by the migration controller once the VM runs on `to`. It also clears
    /// `status.migration` and bumps both nodes' claim keys (the scheduler counts the VM on `to`
    /// from then on). True when written or already done; false when the VM is gone or bound
    /// elsewhere.
    pub async fn rebind(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        uid: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, ApiError> {
        loop {
            let kv = match self.get_kv(kind, namespace, name).await {
                Ok(kv) => kv,
                Err(e) if e.code() == 404 => return Ok(false),
                Err(e) => return Err(e),
            };
            let current = parse_stored(&kv)?;
            if current["metadata"]["uid"].as_str() != Some(uid) {
                return Ok(false);
            }
            match current["spec"]["nodeName"].as_str() {
                Some(node) if node == to => return Ok(true),
                Some(node) if node == from => {}
                _ => return Ok(false),
            }
            let mut next = current.clone();
            next["spec"]["nodeName"] = json!(to);
            if let Some(status) = next.get_mut("status").and_then(Value::as_object_mut) {
                status.remove("migration");
            }
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(generation + 1);
            let next = validate(kind, &next)?;
            let record = json!({"vm": kv.key, "movedFrom": from, "movedTo": to});
            let resp = self
                .store()
                .txn(
                    Txn::new()
                        .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                        .and_then(Op::put(&kv.key, encode(&next)))
                        .and_then(Op::put(claim_key(from), encode(&record)))
                        .and_then(Op::put(claim_key(to), encode(&record))),
                )
                .await?;
            if resp.succeeded {
                return Ok(true);
            }
        }
    }
}

impl Objects {
    /// Takes the VM `name` (with `uid`) off its failed node `from` so that the scheduler
    /// places it again: the evacuation's one write. Guarded by the node's lease key still being
    /// at `lease_revision` (0: absent), so that an agent whose renewal lands first keeps its
    /// VM. Also drops the agent's finalizer (the failed node cannot remove it; the next binding
    /// adds it again). True when written.
    #[allow(clippy::too_many_arguments)]
    pub async fn unbind_from_failed_node(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        uid: &str,
        from: &str,
        lease_key: &str,
        lease_revision: Revision,
        status: Value,
    ) -> Result<bool, ApiError> {
        let kv = match self.get_kv(kind, namespace, name).await {
            Ok(kv) => kv,
            Err(e) if e.code() == 404 => return Ok(false),
            Err(e) => return Err(e),
        };
        let current = parse_stored(&kv)?;
        if current["metadata"]["uid"].as_str() != Some(uid)
            || current["spec"]["nodeName"].as_str() != Some(from)
            || current["metadata"].get("deletionTimestamp").is_some()
        {
            return Ok(false);
        }
        let mut next = current.clone();
        if let Some(spec) = next.get_mut("spec").and_then(Value::as_object_mut) {
            spec.remove("nodeName");
        }
        let finalizers: Vec<String> =
            serde_json::from_value(current["metadata"]["finalizers"].clone()).unwrap_or_default();
        let kept: Vec<String> = finalizers
            .into_iter()
            .filter(|f| f != AGENT_FINALIZER)
            .collect();
        next["metadata"]["finalizers"] = json!(kept);
        json_patch::merge(&mut next, &json!({ "status": status }));
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        next["metadata"]["generation"] = json!(generation + 1);
        let next = validate(kind, &next)?;
        let resp = self
            .store()
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                    .when(Compare::mod_revision(lease_key, lease_revision))
                    .and_then(Op::put(&kv.key, encode(&next)))
                    .and_then(Op::put(
                        claim_key(from),
                        encode(&json!({"vm": kv.key, "evacuatedFrom": from})),
                    )),
            )
            .await?;
        Ok(resp.succeeded)
    }
}
