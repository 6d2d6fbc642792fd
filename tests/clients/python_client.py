"""The official Python `kubernetes` client against a Flotilla server, unmodified.

Run by crates/flotilla/tests/real_clients.rs with FLOTILLA_URL, FLOTILLA_CA and FLOTILLA_TOKEN
set; exits non-zero (with the failed assertion) when the server answers differently from a
Kubernetes API server. Covers: discovery through DynamicClient, create/get/list with selectors,
merge and JSON patches, replace, dry run (nothing stored: the object unchanged, no watch event),
watch, server-side apply with conflicts and force, core/v1 Events through the typed
CoreV1Api, deletion with preconditions, errors as Kubernetes Status objects, and RBAC through
the typed clients (RoleBinding, ServiceAccount, TokenRequest, SelfSubjectAccessReview).
"""

import os
import threading
import time

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import (  # the client spells it "Unprocessible"
    ConflictError,
    NotFoundError,
    UnprocessibleEntityError,
)

GROUP_VERSION = "flotilla.dev/v1alpha1"
NS = "default"


def api_client(token=None):
    conf = client.Configuration()
    conf.host = os.environ["FLOTILLA_URL"]
    conf.ssl_ca_cert = os.environ["FLOTILLA_CA"]
    conf.api_key = {"authorization": token or os.environ["FLOTILLA_TOKEN"]}
    conf.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(conf)


def vm(name, cpus=1, labels=None):
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"resources": {"cpus": cpus, "memory": "64Mi"}, "image": "base"},
    }


def vmclass(name, cpus):
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "VMClass",
        "metadata": {"name": name},
        "spec": {"cpus": cpus, "memory": "1Gi"},
    }


def expect(error, call):
    try:
        call()
    except error as e:
        return e
    raise AssertionError(f"expected {error.__name__}")


def main():
    api = api_client()
    dyn = DynamicClient(api)
    # Discovery: the kinds are found by group version and kind, and by short name.
    vms = dyn.resources.get(api_version=GROUP_VERSION, kind="VirtualMachine")
    assert vms.namespaced and vms.name == "virtualmachines", vms
    assert "vm" in vms.short_names, vms.short_names
    assert dyn.resources.get(api_version="v1", kind="Event").namespaced

    # Create, get, list with a label selector.
    made = vms.create(body=vm("py-web", labels={"app": "web"}), namespace=NS)
    assert made.metadata.uid and made.metadata.resourceVersion, made
    vms.create(body=vm("py-db", labels={"app": "db"}), namespace=NS)
    got = vms.get(name="py-web", namespace=NS)
    assert got.spec.resources.cpus == 1
    web = vms.get(namespace=NS, label_selector="app=web")
    assert [i.metadata.name for i in web.items] == ["py-web"], web
    # Paging: limit and continue.
    first = vms.get(namespace=NS, limit=1)
    assert len(first.items) == 1 and first.metadata["continue"], first.metadata
    rest = vms.get(namespace=NS, limit=1, _continue=first.metadata["continue"])
    assert rest.items[0].metadata.name != first.items[0].metadata.name
    # An existing name is a Conflict (409, AlreadyExists), as a Status.
    e = expect(ConflictError, lambda: vms.create(body=vm("py-web"), namespace=NS))
    assert e.status == 409 and "already exists" in e.summary(), e.summary()
    # Invalid input: 422 naming the field.
    bad = vm("py-bad")
    bad["spec"]["resources"]["cpus"] = 0
    e = expect(UnprocessibleEntityError, lambda: vms.create(body=bad, namespace=NS))
    assert "spec.resources.cpus" in e.summary(), e.summary()

    # Patches: merge (the dynamic client's default for dicts) and JSON patch.
    patched = vms.patch(
        name="py-web", namespace=NS, body={"metadata": {"labels": {"tier": "front"}}},
        content_type="application/merge-patch+json",
    )
    assert patched.metadata.labels.tier == "front"
    patched = vms.patch(
        name="py-web", namespace=NS,
        body=[{"op": "replace", "path": "/spec/resources/cpus", "value": 2}],
        content_type="application/json-patch+json",
    )
    assert patched.spec.resources.cpus == 2
    # Replace with the current resourceVersion, then with a stale one.
    current = vms.get(name="py-web", namespace=NS).to_dict()
    current["spec"]["resources"]["cpus"] = 3
    replaced = vms.replace(body=current, namespace=NS)
    assert replaced.spec.resources.cpus == 3
    e = expect(ConflictError, lambda: vms.replace(body=current, namespace=NS))
    assert e.status == 409

    # Dry run: the answer is what would be stored; nothing is. VMClasses, which no controller
    # writes: the object stays as it was, and a watch from before sees no change.
    classes = dyn.resources.get(api_version=GROUP_VERSION, kind="VMClass")
    small = classes.create(body=vmclass("py-small", 1))
    before = small.metadata.resourceVersion
    dry = classes.create(body=vmclass("py-dry", 2), dry_run="All")
    assert dry.metadata.name == "py-dry"
    would = classes.patch(
        name="py-small", body={"spec": {"cpus": 8}},
        content_type="application/merge-patch+json", dry_run="All",
    )
    assert would.spec.cpus == 8, would
    classes.delete(name="py-small", dry_run="All")
    expect(NotFoundError, lambda: classes.get(name="py-dry"))
    now = classes.get(name="py-small")
    assert now.spec.cpus == 1 and now.metadata.resourceVersion == before, now
    changes = [
        e for e in classes.watch(resource_version=before, timeout=2) if e["type"] != "BOOKMARK"
    ]
    assert not changes, changes
    # An unknown dryRun value is a 400.
    e = expect(ApiException, lambda: vms.delete(name="py-db", namespace=NS, dry_run="Some"))
    assert e.status == 400, e.status

    # Watch: a create made while watching arrives as ADDED, a delete as DELETED.
    before = vms.get(namespace=NS).metadata.resourceVersion
    seen = []

    def watch():
        for event in vms.watch(namespace=NS, resource_version=before, timeout=10):
            seen.append((event["type"], event["object"].metadata.name))
            if ("DELETED", "py-watched") in seen:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.5)
    vms.create(body=vm("py-watched"), namespace=NS)
    vms.delete(name="py-watched", namespace=NS)
    watcher.join(15)
    assert ("ADDED", "py-watched") in seen and ("DELETED", "py-watched") in seen, seen

    # Server-side apply: create, owned fields, a conflict with another manager, force.
    applied = vms.server_side_apply(body=vm("py-ssa", cpus=2), namespace=NS, field_manager="py")
    managers = [m.manager for m in applied.metadata.managedFields]
    assert managers == ["py"], managers
    e = expect(
        ConflictError,
        lambda: vms.server_side_apply(body=vm("py-ssa", cpus=4), namespace=NS, field_manager="other"),
    )
    assert ".spec.resources.cpus" in e.summary() and '"py"' in e.summary(), e.summary()
    forced = vms.server_side_apply(
        body=vm("py-ssa", cpus=4), namespace=NS, field_manager="other", force_conflicts=True
    )
    assert forced.spec.resources.cpus == 4

    # Events through the typed core/v1 client: the scheduler reported why nothing is placed.
    core = client.CoreV1Api(api)
    deadline = time.time() + 10
    while True:
        events = core.list_namespaced_event(NS, field_selector="involvedObject.name=py-web")
        if events.items or time.time() > deadline:
            break
        time.sleep(0.2)
    assert events.items, "no events for py-web"
    event = events.items[0]
    assert event.involved_object.kind == "VirtualMachine" and event.reason, event
    assert event.count >= 1 and event.type in ("Normal", "Warning"), event

    # Deletion with preconditions: a wrong uid is a 409 and deletes nothing.
    e = expect(
        ConflictError,
        lambda: vms.delete(name="py-web", namespace=NS, body={"preconditions": {"uid": "not-it"}}),
    )
    vms.get(name="py-web", namespace=NS)
    uid = vms.get(name="py-web", namespace=NS).metadata.uid
    vms.delete(name="py-web", namespace=NS, body={"preconditions": {"uid": uid}})
    # Deletion of a collection by label.
    vms.delete(namespace=NS, label_selector="app=db")
    names = sorted(i.metadata.name for i in vms.get(namespace=NS).items)
    assert "py-db" not in names, names

    # RBAC through the typed clients: a service account, a token for it (TokenRequest), a
    # RoleBinding to the built-in viewer role; then, as the account, "may I?" and a refusal.
    rbac = client.RbacAuthorizationV1Api(api)
    roles = {r.metadata.name for r in rbac.list_cluster_role().items}
    assert {"cluster-admin", "admin", "member", "viewer"} <= roles, roles
    core.create_namespaced_service_account(
        NS, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="py-ci"))
    )
    rbac.create_namespaced_role_binding(
        NS,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="py-ci-viewer"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="viewer"
            ),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="py-ci", namespace=NS)],
        ),
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    token = core.create_namespaced_service_account_token("py-ci", NS, request).status.token
    as_ci = api_client(token)

    def may(verb, resource, subresource=None):
        attributes = client.V1ResourceAttributes(
            namespace=NS, verb=verb, group="flotilla.dev", resource=resource, subresource=subresource
        )
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
        )
        return client.AuthorizationV1Api(as_ci).create_self_subject_access_review(review).status.allowed

    assert may("list", "virtualmachines") and may("get", "virtualmachines", "log")
    assert not may("create", "virtualmachines") and not may("delete", "volumes")
    custom = client.CustomObjectsApi(as_ci)
    custom.list_namespaced_custom_object("flotilla.dev", "v1alpha1", NS, "virtualmachines")
    e = expect(
        ApiException,
        lambda: custom.create_namespaced_custom_object(
            "flotilla.dev", "v1alpha1", NS, "virtualmachines", vm("py-denied")
        ),
    )
    assert e.status == 403 and "may not create virtualmachines" in e.body, (e.status, e.body)
    core.delete_namespaced_service_account("py-ci", NS)
    rbac.delete_namespaced_role_binding("py-ci-viewer", NS)
    print("python kubernetes client: all checks passed")


if __name__ == "__main__":
    main()
