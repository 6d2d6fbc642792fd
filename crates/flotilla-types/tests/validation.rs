//! What users see when an object is wrong: every error names its field path.

use flotilla_types::registry::lookup;
use serde_json::json;

fn errors(kind: &str, v: serde_json::Value) -> Vec<String> {
    match (lookup(kind).unwrap().validate)(&v) {
        Ok(_) => vec![],
        Err(e) => {
            e.0.iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect()
        }
    }
}

fn vm(spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "web"}, "spec": spec})
}

#[test]
fn a_valid_vm_passes_and_gets_defaults() {
    let v = vm(
        json!({"resources": {"cpus": 2, "memory": "2Gi"}, "image": "debian-12", "rootDisk": {"size": "20Gi"}}),
    );
    let out = (lookup("vm").unwrap().validate)(&v).unwrap();
    assert_eq!(out["spec"]["powerState"], "Running");
}

#[test]
fn unknown_fields_are_named_with_their_path() {
    let e = errors(
        "vm",
        vm(json!({"resources": {"cpus": 2, "memory": "2Gi", "gpus": 1}, "image": "x"})),
    );
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("spec.resources"), "{e:?}");
    assert!(e[0].contains("unknown field `gpus`"), "{e:?}");
}

#[test]
fn mistyped_fields_are_named_with_their_path() {
    let e = errors(
        "vm",
        vm(json!({"resources": {"cpus": "two", "memory": "2Gi"}, "image": "x"})),
    );
    assert!(
        e[0].starts_with("spec.resources.cpus: invalid type"),
        "{e:?}"
    );
    let e = errors(
        "vm",
        vm(json!({"resources": {"cpus": 2, "memory": "2GB"}, "image": "x"})),
    );
    assert!(
        e[0].starts_with("spec.resources.memory: invalid quantity \"2GB\""),
        "{e:?}"
    );
    let e = errors(
        "vm",
        vm(
            json!({"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x", "powerState": "Paused"}),
        ),
    );
    assert!(
        e[0].starts_with("spec.powerState: unknown variant `Paused`"),
        "{e:?}"
    );
}

#[test]
fn missing_required_fields_are_named() {
    let e = errors("vm", json!({"metadata": {"name": "web"}}));
    assert_eq!(e, vec!["spec: is required"]);
    let e = errors("vm", vm(json!({})));
    assert!(
        e.iter()
            .any(|e| e.starts_with("spec.resources: is required")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|e| e.starts_with("spec.image: is required")),
        "{e:?}"
    );
    let e = errors(
        "vmclass",
        json!({"metadata": {"name": "small"}, "spec": {"cpus": 1}}),
    );
    assert_eq!(e, vec!["spec.memory: is required"]);
}

#[test]
fn semantic_errors_are_all_reported_at_once() {
    let e = errors(
        "vm",
        json!({"metadata": {"name": "Bad_Name", "labels": {"ok": "bad value"}}, "spec": {
            "resources": {"cpus": 0, "memory": "1Mi"},
            "boot": {"kernel": "relative/vmlinuz"},
            "networks": [{"network": "lan", "macAddress": "zz"}],
            "sshAuthorizedKeys": ["not a key"],
            "nodeSelector": {"zone": "a b"}
        }}),
    );
    for field in [
        "metadata.name",
        "metadata.labels",
        "spec.resources.cpus",
        "spec.resources.memory",
        "spec.boot.kernel",
        "spec.networks[0].macAddress",
        "spec.sshAuthorizedKeys[0]",
        "spec.nodeSelector",
    ] {
        assert!(
            e.iter().any(|x| x.starts_with(field)),
            "no error for {field}: {e:?}"
        );
    }
}

#[test]
fn class_and_resources_are_exclusive_and_images_need_one_source() {
    let e = errors(
        "vm",
        vm(json!({"class": "small", "resources": {"cpus": 1, "memory": "1Gi"}, "image": "x"})),
    );
    assert_eq!(
        e,
        vec!["spec.resources: set either class or resources, not both"]
    );
    let e = errors(
        "image",
        json!({"metadata": {"name": "deb"}, "spec": {"source": {}}}),
    );
    assert!(e[0].starts_with("spec.source: set url"), "{e:?}");
    let e = errors(
        "image",
        json!({"metadata": {"name": "deb"}, "spec": {"source": {"url": "ftp://x"}, "sha256": "abc"}}),
    );
    assert_eq!(e.len(), 2, "{e:?}");
}

#[test]
fn oversized_user_data_is_rejected() {
    let big = "x".repeat(flotilla_types::kinds::vm::MAX_USER_DATA + 1);
    let e = errors(
        "vm",
        vm(json!({"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x", "userData": big})),
    );
    assert!(e[0].starts_with("spec.userData: is 65537 bytes"), "{e:?}");
}

#[test]
fn hostile_strings_survive_a_roundtrip_unchanged() {
    let evil = "</name><script>\"'&\u{0}";
    let v = vm(json!({"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x", "userData": evil}));
    let out = (lookup("vm").unwrap().validate)(&v).unwrap();
    assert_eq!(out["spec"]["userData"], evil);
}

#[test]
fn disk_serials_are_short_plain_and_unique_and_a_config_drive_is_a_cloud_init_mode() {
    let spec = |serials: serde_json::Value| {
        let disks: Vec<_> = serials
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"name": format!("d{i}"), "volume": format!("v{i}"), "serial": s}))
            .collect();
        vm(
            json!({"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x", "disks": disks, "cloudInit": "configDrive"}),
        )
    };
    assert_eq!(
        errors("vm", spec(json!(["disk0123456789abcdef", "ephemeral"]))),
        Vec::<String>::new()
    );
    let e = errors("vm", spec(json!(["a b"])));
    assert!(
        e.iter().any(|e| e.starts_with("spec.disks[0].serial")),
        "{e:?}"
    );
    let e = errors("vm", spec(json!(["x".repeat(21)])));
    assert!(
        e.iter().any(|e| e.starts_with("spec.disks[0].serial")),
        "{e:?}"
    );
    let e = errors("vm", spec(json!(["same", "same"])));
    assert!(
        e.iter()
            .any(|e| e.starts_with("spec.disks[1].serial") && e.contains("two disks")),
        "{e:?}"
    );
    let e = errors(
        "vm",
        vm(
            json!({"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x", "cloudInit": "configdrive"}),
        ),
    );
    assert!(e.iter().any(|e| e.starts_with("spec.cloudInit")), "{e:?}");
}
