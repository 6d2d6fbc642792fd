//! Every object in examples/ is valid: the README's tour must not break silently.

#[test]
fn example_objects_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            let kind = flotilla_types::registry::by_kind(value["kind"].as_str().unwrap()).unwrap();
            if let Err(e) = (kind.validate)(&value) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "the examples hold objects");
}
