"""Schemathesis hooks for the Flotilla API run (tests/clients/schemathesis.toml).

The OpenAPI document states every rule OpenAPI 3.0 can state: required fields, patterns,
lengths, ranges, enums. The rules below are the ones it cannot, each named in the field's
description; a generated request breaking one of them would be rejected (rightly) and reported
as "valid data rejected". This hook makes generated requests keep them, and nothing else:

- a body's metadata.name is the name in the path, its metadata.namespace the project in the path
  (cross-field: OpenAPI cannot relate a body to its path);
- keys of labels, annotations and nodeSelector are [prefix/]name (OpenAPI 3.0 has no
  propertyNames);
- memory, disk and volume sizes fall in their ranges (a quantity is a string; OpenAPI cannot bound the
  number it spells);
- a shareable volume is raw (cross-field), and volumes are blank (a clone's source must
  exist: cross-object);
- one of several fields (class or resources; image, boot or adoptedDomain; url or path), a node
  for an adopted domain, NICs for cloud-init from the metadata service (cross-field);
- a network's type decides its fields (overlay: a cidr, no bridge or VLAN; bridged: a bridge), a
  cidr has no host bits, a gateway is a host of the cidr, ranges lie inside the cidr, an IPv6
  prefix needs a cidr beside it (cross-field); a VM's NICs name
  Networks that exist (cross-object: generated VMs have none);
- a security group rule has ports only for tcp and udp (a port, or a range start first), and a
  remote names a cidr (host bits zero) or a group, not both (cross-field);
- a VM's disks name volumes that exist and are free (cross-object: generated VMs have none), a
  snapshot's volume exists and is qcow2 (cross-object: the run makes st-vol);
- a router's and a floating IP's networks exist (cross-object: the run makes st-ext, bridged
  with a cidr, and st-lan), a router leaves through a network or the node's uplink (cross-field), a floating IP's address is a free one of its network, a route's
  destination is a network narrower than the default route (cross-field);
- a pool's type decides its fields (lvm: a volume group, no path; rbd: a Ceph cluster, no path,
  a keyring path without QEMU's separators; iscsi: a target, no path; nfs: an export that does
  not climb with "..", no path; dir: none of them), and a
  volume names a LUN only in an iscsi pool (cross-object: generated volumes have none);
- a VM snapshot's VM exists on a node (cross-object: the run makes st-vm), a VM's cloned root
  disk names a source that exists (cross-object: generated root disks are new), an image has
  one of url, path and upload (cross-field);
- a JSON patch's paths lead into its target (cross-object: a drawn patch becomes a test of
  the name), and a merge patch has no unknown top-level fields (fieldValidation=Strict, a rule of the
  parameter);
- a cold migration has none of the live-only fields (suspend, maxDowntimeMs, autoConverge,
  postCopy), and a suspended one no postCopy (cross-field);
- label and field selectors follow their grammar (not a regular language for labels' sets);
- continue tokens are the server's own (opaque; a made-up one is rightly 400);
- numbers fit a 64-bit float (JSON has no limit; the server reads JSON numbers as 64-bit integers
  or floats, as most JSON readers do), also where a field takes any value (a JSON patch's value).

None of this touches a part schemathesis generated to be invalid (a negative case): fixing it
could make it valid, and the server would be blamed for accepting it.

And a few about the run itself, not the document:
- every request targets the `default` project: the only one that exists, so that project-scoped
  operations reach their validation rather than a 404 for a random project name;
- every write runs with dryRun=All: through the whole write path (decoding, defaulting,
  validation, admission, conflicts) but storing nothing, so that a random update never lands on
  an object an earlier random create made, and the run is the same every time (an invalid dryRun
  value is kept: the server must reject it and store nothing). Writes that
  store are covered by the API tests and the real-client suites. For the same reason, patches
  do not target the `default` project itself.
- fieldManager is present for server-side apply, force only with it (both rules of one media
  type, which OpenAPI cannot attach a parameter to);
- a create carries no resourceVersion (one schema serves reads, where the server sets it).
"""

import copy
import ipaddress
import re
from urllib.parse import unquote

import schemathesis
from schemathesis.core.parameters import ParameterLocation

QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?){0,2}/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# A conservative subset of the selector grammars: the server accepts more.
LABEL_SELECTOR = re.compile(r"^([a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?(=|!=)[a-z0-9]{0,20})?$")
FIELD_SELECTOR = re.compile(r"^(metadata\.name=[a-z0-9]{0,20})?$")

SUFFIXES = {
    "": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def quantity(value):
    """The number a quantity spells, or None if it spells none this hook understands."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    m = re.match(r"^\+?([0-9]*\.?[0-9]*)(.*)$", value)
    if not m or m.group(1) in ("", "."):
        return None
    number, suffix = float(m.group(1)), m.group(2)
    if suffix in SUFFIXES:
        return number * SUFFIXES[suffix]
    if suffix[:1] in ("e", "E"):
        try:
            return number * 10 ** int(suffix[1:])
        except ValueError:
            return None
    return None


def in_range(obj, key, low, high, fallback):
    if isinstance(obj, dict) and key in obj:
        n = quantity(obj[key])
        if n is not None and not low <= n <= high:
            obj[key] = fallback


def only_qualified_keys(obj, key):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj[key] = {k: v for k, v in obj[key].items() if QUALIFIED_NAME.match(k)}


def keep_vm_rules(spec):
    if not isinstance(spec, dict):
        return
    if spec.get("class") is not None and spec.get("resources") is not None:
        spec["class"] = None
    if spec.get("class") is None and spec.get("resources") is None:
        spec["resources"] = {"cpus": 1, "memory": "64Mi"}
    in_range(spec.get("resources"), "memory", 16 * 2**20, 16 * 2**40, "64Mi")
    in_range(spec.get("rootDisk"), "size", 2**20, 64 * 2**40, "1Gi")
    if all(spec.get(k) is None for k in ("image", "boot", "adoptedDomain")):
        spec["image"] = "base"
    if spec.get("adoptedDomain") is not None and spec.get("nodeName") is None:
        spec["nodeName"] = "node-1"
    only_qualified_keys(spec, "nodeSelector")
    # NICs name Networks, which must exist (cross-object): generated VMs have none, so their
    # cloud-init reads the seed (the metadata service is on a VM's networks).
    if "networks" in spec:
        spec["networks"] = []
    # Disks name Volumes, which must exist and be free (cross-object): generated VMs have none.
    if "disks" in spec:
        spec["disks"] = []
    # A cloned root disk names a VM snapshot or a VM that must exist (cross-object): generated
    # root disks are new.
    if isinstance(spec.get("rootDisk"), dict):
        spec["rootDisk"]["source"] = None
    if spec.get("cloudInit") == "metadata":
        spec["cloudInit"] = "seed"
    affinity = spec.get("affinity")
    if isinstance(affinity, dict):
        keep_affinity_rules(affinity)


def keep_affinity_rules(affinity):
    spread = affinity.get("topologySpread")
    terms = list(spread) if isinstance(spread, list) else []
    for rules in (affinity.get("vmAffinity"), affinity.get("vmAntiAffinity")):
        if isinstance(rules, dict):
            for key in ("required", "preferred"):
                if isinstance(rules.get(key), list):
                    terms += rules[key]
    for term in terms:
        if isinstance(term, dict) and isinstance(term.get("labelSelector"), str):
            if not LABEL_SELECTOR.match(term["labelSelector"]):
                term["labelSelector"] = "app=web"


def keep_network_rules(spec):
    """An overlay network has a cidr and no bridge or VLAN; a bridged one a bridge; a cidr's host
    bits are zero; a gateway is a host of the cidr."""
    bridged = spec.get("type") == "bridged"
    if bridged:
        if not isinstance(spec.get("bridge"), str):
            spec["bridge"] = "br0"
    else:
        spec["bridge"] = None
        spec["vlan"] = None
    cidr = spec.get("cidr")
    if isinstance(cidr, str) and "/" in cidr:
        addr, _, length = cidr.partition("/")
        octets = [int(o) for o in addr.split(".")]
        value = sum(o << (24 - 8 * i) for i, o in enumerate(octets))
        bits = int(length)
        value &= (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
        spec["cidr"] = ".".join(str((value >> (24 - 8 * i)) & 255) for i in range(4)) + "/" + length
    elif not bridged:
        spec["cidr"] = "10.0.0.0/24"
    # Whether a gateway is a host of the cidr, and ranges lie inside it, is the server's to check
    # (tests/networks.rs).
    spec["gateway"] = None
    spec["ranges"] = None
    if spec.get("cidr") is None:
        spec["cidr6"] = None


def zero_host_bits(cidr):
    """An IPv4 or IPv6 network with its host bits cleared (an address alone is a /32 or /128)."""
    if "/" not in cidr:
        return cidr
    network = ipaddress.ip_network(cidr, strict=False)
    return f"{network.network_address}/{network.prefixlen}"


def keep_security_group_rules(spec):
    """Ports only on tcp and udp rules, as a port or a range start first; a remote names a cidr
    (host bits zero) or a group, one of the two."""
    for rule in spec.get("rules") or []:
        if not isinstance(rule, dict):
            continue
        ports = rule.get("ports")
        if isinstance(ports, str):
            if rule.get("protocol") not in ("tcp", "udp"):
                rule["ports"] = None
            else:
                ends = [min(max(int(p), 1), 65535) for p in ports.split("-")]
                rule["ports"] = "-".join(str(p) for p in sorted(ends))
        remote = rule.get("remote")
        if isinstance(remote, dict):
            if isinstance(remote.get("cidr"), str):
                remote["cidr"] = zero_host_bits(remote["cidr"])
                remote["securityGroup"] = None
            elif not isinstance(remote.get("securityGroup"), str):
                remote["securityGroup"] = "default"


def keep_router_rules(spec):
    """A router's networks exist (cross-object): its external network is st-ext (a bridged
    network with a cidr the run makes) unless it leaves through the node's uplink, its
    networks st-lan or none; a route's destination is a
    network (host bits zero) narrower than the default route."""
    if isinstance(spec.get("external"), dict):
        # The node's uplink or a network, not both (cross-field).
        if spec["external"].get("uplink") is True:
            spec["external"].pop("network", None)
        else:
            spec["external"]["network"] = "st-ext"
        spec["external"]["ip"] = None
    if isinstance(spec.get("networks"), list):
        spec["networks"] = ["st-lan"] if spec["networks"] else []
    for route in spec.get("routes") or []:
        if isinstance(route, dict) and isinstance(route.get("destination"), str):
            dst = zero_host_bits(route["destination"])
            if dst.endswith("/0"):
                dst = "192.0.2.0/24"
            route["destination"] = dst


def keep_floating_ip_rules(spec):
    """A floating IP's network exists (cross-object: st-ext), its address is a free one of it
    (left to IPAM), and a NIC comes with its VM."""
    spec["network"] = "st-ext"
    spec["address"] = None
    if spec.get("vm") is None:
        spec["nic"] = None


def keep_spec_rules(kind_path, spec):
    if kind_path == "virtualmachines":
        keep_vm_rules(spec)
    elif kind_path == "vmclasses" and isinstance(spec, dict):
        in_range(spec, "memory", 16 * 2**20, 16 * 2**40, "1Gi")
    elif kind_path == "images" and isinstance(spec, dict):
        source = spec.get("source")
        if isinstance(source, dict):
            # One of url, path and upload.
            given = [k for k in ("url", "path", "upload") if source.get(k) is not None]
            for extra in given[1:]:
                source[extra] = None
            if not given:
                source["url"] = "https://images.invalid/base.qcow2"
    elif kind_path == "networks" and isinstance(spec, dict):
        keep_network_rules(spec)
    elif kind_path == "routers" and isinstance(spec, dict):
        keep_router_rules(spec)
        only_qualified_keys(spec, "nodeSelector")
    elif kind_path == "floatingips" and isinstance(spec, dict):
        keep_floating_ip_rules(spec)
    elif kind_path == "securitygroups" and isinstance(spec, dict):
        keep_security_group_rules(spec)
    elif kind_path == "storagepools" and isinstance(spec, dict):
        only_qualified_keys(spec, "nodeSelector")
        # The type decides the fields: dir a path; lvm a volume group; rbd, iscsi and nfs their
        # own object — and none of the others.
        kind = spec.get("type") or "dir"
        defaults = {
            "lvm": ("volumeGroup", "vg0"),
            "rbd": ("rbd", {"monitors": ["127.0.0.1:6789"], "pool": "rbd"}),
            "iscsi": ("iscsi", {"portal": "127.0.0.1", "target": "iqn.2026-12.dev.flotilla:t"}),
            "nfs": ("nfs", {"server": "nfs1", "export": "/export"}),
        }
        for other, (field, default) in defaults.items():
            if other != kind:
                spec[field] = None
            elif not spec.get(field):
                spec[field] = default
        if kind != "dir":
            spec["path"] = None
        if kind == "rbd":
            # The keyring path reaches QEMU's option syntax, whose separators it must not hold.
            keyring = spec["rbd"].get("keyring")
            if isinstance(keyring, str) and any(c in keyring for c in ":\\@,="):
                spec["rbd"]["keyring"] = None
        if kind == "nfs" and ".." in str(spec["nfs"].get("export", "")).split("/"):
            # An export path never climbs out of itself (OpenAPI cannot forbid a "..").
            spec["nfs"]["export"] = "/export"
    elif kind_path == "volumes" and isinstance(spec, dict):
        in_range(spec, "size", 2**20, 64 * 2**40, "1Gi")
        if spec.get("shareable") is True:
            spec["format"] = "raw"
        # A clone's source must exist (cross-object): generated volumes are blank; a LUN is for
        # volumes in iscsi pools (cross-object: generated volumes are in others).
        spec["source"] = None
        spec["lun"] = None
    elif kind_path == "volumesnapshots" and isinstance(spec, dict):
        # Its volume must exist and be qcow2 (cross-object): the run makes st-vol.
        spec["volume"] = "st-vol"
    elif kind_path == "vmsnapshots" and isinstance(spec, dict):
        # Its VM must exist on a node (cross-object): the run makes st-vm, pinned to one.
        spec["vm"] = "st-vm"
    elif kind_path == "migrations" and isinstance(spec, dict):
        # A cold migration takes no live-only tuning; a suspended guest is copied in one pass,
        # so post-copy does not apply (cross-field).
        if spec.get("mode") == "Cold":
            for field in ("suspend", "maxDowntimeMs", "autoConverge", "postCopy"):
                spec.pop(field, None)
        if spec.get("suspend") is True:
            spec.pop("postCopy", None)
    elif kind_path == "placementpolicies" and isinstance(spec, dict):
        if isinstance(spec.get("affinity"), dict):
            keep_affinity_rules(spec["affinity"])


def representable(value):
    """`value` with numbers no 64-bit float holds replaced by 0."""
    if isinstance(value, dict):
        return {k: representable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [representable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**308:
        return 0
    return value


def negative_at(case, location):
    """Whether schemathesis generated the case's `location` to break the document on purpose."""
    meta = case.meta
    return meta is not None and meta.is_negative_at(ParameterLocation(location))


@schemathesis.hook
def map_case(context, case):
    method = case.operation.method.upper()
    # A part generated to be invalid is left as drawn, or the fix-ups below could make it valid
    # and the server would be blamed for accepting it; only dryRun is always kept safe.
    negative_path = negative_at(case, "path")
    negative_query = negative_at(case, "query")
    negative_body = negative_at(case, "body")
    template = case.operation.path
    # Cases of one operation can share their containers: change copies, never what was drawn.
    params = dict(case.path_parameters or {})
    case.path_parameters = params
    if "namespace" in params and not negative_path:
        params["namespace"] = "default"
    parts = [p for p in template.split("/") if p and not p.startswith("{")]
    plural = parts[-2] if parts[-1] == "status" else parts[-1]
    # The objects the server makes (the default project and pool) have set-once fields that a
    # drawn body would change.
    if method in ("PATCH", "PUT") and plural in ("projects", "storagepools") and params.get("name") == "default":
        params["name"] = "default-absent"
    apply = method == "PATCH" and case.media_type == "application/apply-patch+yaml"

    query = dict(case.query or {})
    if not negative_query:
        query.pop("continue", None)
        if "labelSelector" in query and not LABEL_SELECTOR.match(str(query["labelSelector"])):
            query["labelSelector"] = ""
        if "fieldSelector" in query and not FIELD_SELECTOR.match(str(query["fieldSelector"])):
            query["fieldSelector"] = ""
        if apply and not query.get("fieldManager"):
            query["fieldManager"] = "schemathesis"
        if not apply:
            query.pop("force", None)
    # An invalid dryRun value is kept (the server must answer 400 and store nothing); a missing
    # or empty one, which would store, becomes All.
    if method in ("POST", "PUT", "PATCH", "DELETE") and query.get("dryRun") in (None, "", [], [""]):
        query["dryRun"] = "All"
    case.query = query

    # Bodies are only assigned when there is one: schemathesis re-checks an assigned body and
    # takes an absent one (DELETE without DeleteOptions) for an invalid one.
    if negative_body or not isinstance(case.body, (dict, list)):
        return case
    body = case.body = representable(copy.deepcopy(case.body))
    if case.media_type == "application/json-patch+json" and isinstance(body, list):
        # A JSON patch's paths must lead into the object it patches (cross-object: one drawn
        # without knowing the target removes or moves what is not there, rightly refused): it
        # becomes a test of the name the path gives, which the server applies as a patch
        # (what patches change is covered by the API tests and the real clients).
        case.body = [{"op": "test", "path": "/metadata/name", "value": unquote(params.get("name", ""))}]
        return case
    if case.media_type == "application/merge-patch+json" and isinstance(body, dict):
        # Unknown fields are refused under fieldValidation=Strict, the default (a rule of the
        # parameter, which the body's schema cannot state).
        for key in list(body):
            if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
                del body[key]
    if (method in ("POST", "PUT") or apply) and isinstance(body, dict):
        meta = body.get("metadata")
        if isinstance(meta, dict):
            if method != "POST" and "name" in params:
                meta["name"] = unquote(params["name"])
            if "namespace" in params:
                meta["namespace"] = params["namespace"]
            if method == "POST":
                meta.pop("resourceVersion", None)
            only_qualified_keys(meta, "labels")
            only_qualified_keys(meta, "annotations")
        keep_spec_rules(plural, body.get("spec"))
    return case
