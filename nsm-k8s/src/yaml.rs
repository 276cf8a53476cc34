//! YAML in and out: Kubernetes manifests are read as JSON values (with nsm-sdk's reader,
//! [`yaml_documents`]) and generated ones are written from JSON values ([`to_yaml`]).

use serde_json::Value;
use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlEmitter};

pub use nsm_sdk::config::ns_file::yaml_documents;

/// One YAML document (starting with `---`, ending with a newline) of a JSON value.
/// Object keys keep their order; strings that YAML would read as something else are
/// quoted.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = YamlEmitter::new(&mut out).dump(&json_to_yaml(value));
    out.push('\n');
    out
}

fn json_to_yaml(value: &Value) -> Yaml {
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(json_to_yaml).collect()),
        Value::Object(map) => {
            let mut hash = Hash::new();
            for (k, v) in map {
                hash.insert(Yaml::String(k.clone()), json_to_yaml(v));
            }
            Yaml::Hash(hash)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_value_comes_back_the_same() {
        let value = json!({
            "apiVersion": "v1",
            "data": {"n": "8443", "t": "true", "multi": "a\nb", "empty": ""},
            "list": [1, -2, 2.5, true, null, {"k": []}],
            "obj": {},
        });
        let text = to_yaml(&value);
        assert!(text.starts_with("---\n"), "{text}");
        assert_eq!(yaml_documents(&text).unwrap(), vec![value]);
    }
}
