//! NetworkService definition files: a network service (or several) written as the
//! protobuf JSON mapping of `registry.NetworkService`, or as the same document in YAML
//! (with the `yaml` feature).
//!
//! ```json
//! {
//!   "name": "vpn-gateway",
//!   "payload": "IP",
//!   "matches": [
//!     { "sourceSelector": { "app": "firewall" },
//!       "routes": [ { "destinationSelector": { "app": "vpn-gateway" } } ] },
//!     { "routes": [ { "destinationSelector": { "app": "firewall" } } ] }
//!   ]
//! }
//! ```
//!
//! A file holds one service (an object) or a list of them (an array); a YAML file may
//! also hold several documents separated by `---`, each an object or a list. Field
//! names are the JSON names (`sourceSelector`) or the proto names (`source_selector`):
//!
//! | field | of | type |
//! |---|---|---|
//! | `name` | NetworkService | string, required |
//! | `payload` | NetworkService | string (`IP` when absent or empty) |
//! | `matches` | NetworkService | list of Match |
//! | `pathIds` | NetworkService | list of strings |
//! | `sourceSelector` | Match | map of strings |
//! | `routes` | Match | list of Destination |
//! | `fallthrough` | Match | boolean |
//! | `metadata` | Match | object with `labels`, a map of strings |
//! | `destinationSelector` | Destination | map of strings |
//! | `weight` | Destination | whole number 0..=4294967295 (or such a number as a string) |
//!
//! `null` stands for the field's default, as the protobuf JSON mapping says.
//!
//! Failure handled: anything else is an [`NsFileError`] that names the file, the
//! field by its path (`matches[0].routes[1].destinationSelector`) and what is wrong:
//! a syntax error (with its line and column), an unknown field (with the known
//! ones), a value of the wrong type, a missing or empty name. Nothing is guessed.

use std::collections::HashMap;
use std::path::Path;

use nsm_proto::registry::{Destination, Match, Metadata, NetworkService};
use serde_json::Value;

use crate::wire::payload;

/// A NetworkService definition that cannot be loaded: which file, which field (a path
/// like `matches[0].routes[1].destinationSelector`, empty for the whole document) and
/// why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct NsFileError {
    /// The file, or empty when the text did not come from a file.
    pub file: String,
    /// The path of the offending field, or empty.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl NsFileError {
    fn new(field: &str, reason: impl Into<String>) -> NsFileError {
        NsFileError {
            file: String::new(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn describe(&self) -> String {
        [
            self.file.as_str(),
            self.field.as_str(),
            self.reason.as_str(),
        ]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(": ")
    }

    fn in_file(mut self, file: &Path) -> NsFileError {
        self.file = file.display().to_string();
        self
    }
}

impl From<NsFileError> for crate::Error {
    fn from(e: NsFileError) -> crate::Error {
        crate::Error::InvalidArgument(e.to_string())
    }
}

type Result<T> = std::result::Result<T, NsFileError>;

/// Loads the network services defined in the file at `path`: YAML when its name ends
/// in `.yaml` or `.yml` (with the `yaml` feature), JSON otherwise.
pub fn load(path: impl AsRef<Path>) -> Result<Vec<NetworkService>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| NsFileError::new("", e.to_string()).in_file(path))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let parsed = if yaml {
        from_yaml(&text)
    } else {
        from_json(&text)
    };
    parsed.map_err(|e| e.in_file(path))
}

/// The network services of a JSON document (an object or an array of objects).
pub fn from_json(text: &str) -> Result<Vec<NetworkService>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        NsFileError::new(
            "",
            format!(
                "invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })?;
    services(&value, "")
}

/// The network services of a YAML text: each document an object or a list of objects.
#[cfg(feature = "yaml")]
pub fn from_yaml(text: &str) -> Result<Vec<NetworkService>> {
    let docs = yaml_documents(text)?;
    let mut out = Vec::new();
    for (i, value) in docs.iter().enumerate() {
        let at = if docs.len() > 1 {
            format!("document {}: ", i + 1)
        } else {
            String::new()
        };
        out.extend(services(value, "").map_err(|mut e| {
            e.field = format!("{at}{}", e.field);
            e
        })?);
    }
    Ok(out)
}

/// The documents of a YAML text (separated by `---`) as JSON values: what other YAML
/// files of the project (Kubernetes manifests) are read with. Failure handled: a syntax
/// error (line and column), a key that is not a string, an alias or a bad number, named
/// by its path (`document 2: spec.template`).
#[cfg(feature = "yaml")]
pub fn yaml_documents(text: &str) -> Result<Vec<Value>> {
    use yaml_rust2::YamlLoader;
    let docs = YamlLoader::load_from_str(text).map_err(|e| {
        let m = e.marker();
        NsFileError::new(
            "",
            format!(
                "invalid YAML at line {} column {}: {}",
                m.line(),
                m.col() + 1,
                e.info()
            ),
        )
    })?;
    let many = docs.len() > 1;
    docs.iter()
        .enumerate()
        .map(|(i, doc)| {
            let prefix = if many {
                format!("document {}", i + 1)
            } else {
                String::new()
            };
            yaml_to_json(doc, &prefix)
        })
        .collect()
}

/// Without the `yaml` feature a YAML text is refused.
#[cfg(not(feature = "yaml"))]
pub fn from_yaml(_text: &str) -> Result<Vec<NetworkService>> {
    Err(NsFileError::new(
        "",
        "YAML needs nsm-sdk's `yaml` feature; write the file as JSON",
    ))
}

#[cfg(feature = "yaml")]
fn yaml_to_json(y: &yaml_rust2::Yaml, path: &str) -> Result<Value> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| NsFileError::new(path, format!("bad number {r}")))?,
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| yaml_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_>>()?,
        ),
        Yaml::Hash(h) => {
            let mut map = serde_json::Map::new();
            for (k, v) in h {
                let Yaml::String(key) = k else {
                    return Err(NsFileError::new(
                        path,
                        format!("keys must be strings, found {k:?}"),
                    ));
                };
                map.insert(key.clone(), yaml_to_json(v, &join(path, key))?);
            }
            Value::Object(map)
        }
        Yaml::Alias(_) | Yaml::BadValue => {
            return Err(NsFileError::new(path, "unresolved alias or bad value"))
        }
    })
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn expected(path: &str, what: &str, v: &Value) -> NsFileError {
    NsFileError::new(path, format!("expected {what}, found {}", kind(v)))
}

fn services(v: &Value, path: &str) -> Result<Vec<NetworkService>> {
    match v {
        Value::Object(_) => Ok(vec![service(v, path)?]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| service(item, &format!("{path}[{i}]")))
            .collect(),
        other => Err(expected(
            path,
            "a network service (an object) or a list of them",
            other,
        )),
    }
}

/// The fields of an object, each under one of its known names (JSON name first, proto
/// name second); an unknown field is an error listing the known ones.
fn fields<'a>(
    v: &'a Value,
    path: &str,
    what: &str,
    known: &[(&'static str, &'static str)],
) -> Result<HashMap<&'static str, (&'a Value, String)>> {
    let Value::Object(map) = v else {
        return Err(expected(path, what, v));
    };
    let mut out = HashMap::new();
    for (key, value) in map {
        let Some((json, _)) = known.iter().find(|(j, p)| key == j || key == p) else {
            let names: Vec<&str> = known.iter().map(|(j, _)| *j).collect();
            return Err(NsFileError::new(
                &join(path, key),
                format!("unknown field (expected one of {})", names.join(", ")),
            ));
        };
        if out.contains_key(json) {
            return Err(NsFileError::new(
                &join(path, key),
                "given twice (JSON and proto name)",
            ));
        }
        if !value.is_null() {
            out.insert(*json, (value, join(path, key)));
        }
    }
    Ok(out)
}

fn string(v: &Value, path: &str) -> Result<String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| expected(path, "a string", v))
}

fn list<'a>(v: &'a Value, path: &str, what: &str) -> Result<Vec<(&'a Value, String)>> {
    let Value::Array(items) = v else {
        return Err(expected(path, what, v));
    };
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, item)| (item, format!("{path}[{i}]")))
        .collect())
}

fn string_map(v: &Value, path: &str) -> Result<HashMap<String, String>> {
    let Value::Object(map) = v else {
        return Err(expected(path, "a map of strings", v));
    };
    map.iter()
        .map(|(k, val)| match val {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(NsFileError::new(
                path,
                format!(
                    "expected a map of strings, but {k:?} is {} (quote it)",
                    kind(other)
                ),
            )),
        })
        .collect()
}

fn service(v: &Value, path: &str) -> Result<NetworkService> {
    let f = fields(
        v,
        path,
        "a network service (an object)",
        &[
            ("name", "name"),
            ("payload", "payload"),
            ("matches", "matches"),
            ("pathIds", "path_ids"),
        ],
    )?;
    let name = match f.get("name") {
        Some((v, p)) => string(v, p)?,
        None => String::new(),
    };
    if name.trim().is_empty() {
        return Err(NsFileError::new(
            &join(path, "name"),
            "a network service needs a name",
        ));
    }
    let mut ns = NetworkService {
        name,
        payload: payload::IP.to_string(),
        ..Default::default()
    };
    if let Some((v, p)) = f.get("payload") {
        let given = string(v, p)?;
        if !given.is_empty() {
            ns.payload = given;
        }
    }
    if let Some((v, p)) = f.get("matches") {
        for (m, mp) in list(v, p, "a list of matches")? {
            ns.matches.push(one_match(m, &mp)?);
        }
    }
    if let Some((v, p)) = f.get("pathIds") {
        for (id, ip) in list(v, p, "a list of strings")? {
            ns.path_ids.push(string(id, &ip)?);
        }
    }
    Ok(ns)
}

fn one_match(v: &Value, path: &str) -> Result<Match> {
    let f = fields(
        v,
        path,
        "a match (an object)",
        &[
            ("sourceSelector", "source_selector"),
            ("routes", "routes"),
            ("fallthrough", "fallthrough"),
            ("metadata", "metadata"),
        ],
    )?;
    let mut m = Match::default();
    if let Some((v, p)) = f.get("sourceSelector") {
        m.source_selector = string_map(v, p)?;
    }
    if let Some((v, p)) = f.get("routes") {
        for (r, rp) in list(v, p, "a list of routes")? {
            m.routes.push(destination(r, &rp)?);
        }
    }
    if let Some((v, p)) = f.get("fallthrough") {
        m.fallthrough = v.as_bool().ok_or_else(|| expected(p, "a boolean", v))?;
    }
    if let Some((v, p)) = f.get("metadata") {
        let md = fields(v, p, "metadata (an object)", &[("labels", "labels")])?;
        let labels = match md.get("labels") {
            Some((v, p)) => string_map(v, p)?,
            None => HashMap::new(),
        };
        m.metadata = Some(Metadata { labels });
    }
    Ok(m)
}

fn destination(v: &Value, path: &str) -> Result<Destination> {
    let f = fields(
        v,
        path,
        "a route (an object)",
        &[
            ("destinationSelector", "destination_selector"),
            ("weight", "weight"),
        ],
    )?;
    let mut d = Destination::default();
    if let Some((v, p)) = f.get("destinationSelector") {
        d.destination_selector = string_map(v, p)?;
    }
    if let Some((v, p)) = f.get("weight") {
        let n = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        };
        d.weight = n
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| expected(p, "a whole number from 0 to 4294967295", v))?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VPN: &str = r#"{
        "name": "vpn-gateway",
        "payload": "IP",
        "matches": [
            { "sourceSelector": { "app": "firewall" },
              "routes": [ { "destinationSelector": { "app": "vpn-gateway" } } ] },
            { "routes": [ { "destinationSelector": { "app": "firewall" }, "weight": 2 } ],
              "fallthrough": true,
              "metadata": { "labels": { "p2p": "true" } } }
        ]
    }"#;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn vpn() -> NetworkService {
        NetworkService {
            name: "vpn-gateway".into(),
            payload: "IP".into(),
            matches: vec![
                Match {
                    source_selector: map(&[("app", "firewall")]),
                    routes: vec![Destination {
                        destination_selector: map(&[("app", "vpn-gateway")]),
                        weight: 0,
                    }],
                    ..Default::default()
                },
                Match {
                    routes: vec![Destination {
                        destination_selector: map(&[("app", "firewall")]),
                        weight: 2,
                    }],
                    fallthrough: true,
                    metadata: Some(Metadata {
                        labels: map(&[("p2p", "true")]),
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn err(text: &str) -> String {
        from_json(text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_file_gives_the_service_it_describes() {
        assert_eq!(from_json(VPN).unwrap(), [vpn()]);
    }

    #[test]
    fn what_the_protobuf_json_mapping_prints_loads_back_the_same() {
        let json = nsm_proto::json::to_json("registry.NetworkService", &vpn()).unwrap();
        assert_eq!(from_json(&json).unwrap(), [vpn()]);
    }

    #[test]
    fn proto_field_names_nulls_a_list_and_a_missing_payload_are_accepted() {
        let text = r#"[
            { "name": "a", "matches": [ { "source_selector": {"x": "1"},
                "routes": [ { "destination_selector": {"y": "2"}, "weight": "7" } ],
                "metadata": null } ], "path_ids": ["p"] },
            { "name": "b", "payload": "ETHERNET", "matches": null }
        ]"#;
        let got = from_json(text).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].payload, "IP", "the default payload");
        assert_eq!(got[0].matches[0].source_selector, map(&[("x", "1")]));
        assert_eq!(got[0].matches[0].routes[0].weight, 7);
        assert_eq!(got[0].matches[0].metadata, None);
        assert_eq!(got[0].path_ids, ["p"]);
        assert_eq!(got[1].payload, "ETHERNET");
        assert!(got[1].matches.is_empty());
    }

    #[test]
    fn a_wrong_type_is_named_by_its_path() {
        assert_eq!(
            err(r#"{"name":"a","matches":[{"routes":[{},{"destinationSelector":["x"]}]}]}"#),
            "matches[0].routes[1].destinationSelector: expected a map of strings, found a list"
        );
        assert_eq!(
            err(r#"{"name":"a","matches":[{"sourceSelector":{"app":1}}]}"#),
            "matches[0].sourceSelector: expected a map of strings, but \"app\" is a number (quote it)"
        );
        assert_eq!(
            err(r#"{"name":"a","matches":[{"fallthrough":"yes"}]}"#),
            "matches[0].fallthrough: expected a boolean, found a string"
        );
        assert_eq!(
            err(r#"{"name":"a","matches":{}}"#),
            "matches: expected a list of matches, found an object"
        );
        assert_eq!(
            err(r#"[{"name":"a"},{"name":"b","matches":[{"routes":[{"weight":-1}]}]}]"#),
            "[1].matches[0].routes[0].weight: expected a whole number from 0 to 4294967295, found a number"
        );
        assert_eq!(
            err(r#""vpn""#),
            "expected a network service (an object) or a list of them, found a string"
        );
    }

    #[test]
    fn an_unknown_field_is_an_error_listing_the_known_ones() {
        assert_eq!(
            err(r#"{"name":"a","matches":[{"sourceSelectr":{}}]}"#),
            "matches[0].sourceSelectr: unknown field (expected one of sourceSelector, routes, fallthrough, metadata)"
        );
        assert!(err(r#"{"name":"a","color":"red"}"#).starts_with("color: unknown field"));
        assert!(err(r#"{"name":"a","matches":[{"metadata":{"label":{}}}]}"#)
            .starts_with("matches[0].metadata.label: unknown field"));
    }

    #[test]
    fn a_missing_name_or_a_syntax_error_is_an_error() {
        assert_eq!(
            err(r#"{"payload":"IP"}"#),
            "name: a network service needs a name"
        );
        assert_eq!(
            err(r#"[{"name":" "}]"#),
            "[0].name: a network service needs a name"
        );
        let e = err("{\"name\": \"a\",\n \"matches\": [}");
        assert!(e.starts_with("invalid JSON at line 2 column"), "{e}");
        assert_eq!(
            err(r#"{"name":"a","matches":[{"source_selector":{},"sourceSelector":{}}]}"#),
            "matches[0].source_selector: given twice (JSON and proto name)"
        );
    }

    #[test]
    fn load_names_the_file_and_reads_yaml_by_its_extension() {
        let dir = std::env::temp_dir().join(format!("nsfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("vpn.json");
        std::fs::write(&good, VPN).unwrap();
        assert_eq!(load(&good).unwrap(), [vpn()]);

        let bad = dir.join("bad.json");
        std::fs::write(
            &bad,
            r#"{"name":"a","matches":[{"routes":[{"destinationSelector":3}]}]}"#,
        )
        .unwrap();
        let e = load(&bad).unwrap_err();
        assert_eq!(e.file, bad.display().to_string());
        assert_eq!(e.field, "matches[0].routes[0].destinationSelector");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: matches[0].routes[0].destinationSelector: expected a map of strings, found a number",
                bad.display()
            )
        );
        let missing = load(dir.join("none.json")).unwrap_err();
        assert!(missing.to_string().contains("none.json"), "{missing}");

        let yaml = dir.join("vpn.yaml");
        std::fs::write(
            &yaml,
            "name: vpn-gateway\nmatches:\n  - sourceSelector: {app: firewall}\n    routes:\n      - destinationSelector: {app: vpn-gateway}\n  - routes:\n      - destinationSelector: {app: firewall}\n        weight: 2\n    fallthrough: true\n    metadata:\n      labels: {p2p: \"true\"}\n",
        )
        .unwrap();
        let got = load(&yaml);
        #[cfg(feature = "yaml")]
        assert_eq!(got.unwrap(), [vpn()]);
        #[cfg(not(feature = "yaml"))]
        assert!(got.unwrap_err().reason.contains("yaml"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(feature = "yaml")]
    #[test]
    fn yaml_documents_are_services_and_their_errors_have_paths_too() {
        let two = "name: a\n---\n- name: b\n- name: c\n";
        let names: Vec<String> = from_yaml(two)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        let e = from_yaml("name: a\nmatches:\n  - sourceSelector: {app: 1}\n").unwrap_err();
        assert_eq!(e.field, "matches[0].sourceSelector");
        let e = from_yaml("name: a\nmatches:\n  - fallthrough: yes\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "matches[0].fallthrough: expected a boolean, found a string",
            "YAML 1.2: `yes` is a string"
        );
        let e = from_yaml("name: a\n---\nname: b\nextra: 1\n").unwrap_err();
        assert_eq!(e.field, "document 2: extra");
        let e = from_yaml("name: [a\n").unwrap_err();
        assert!(e.reason.starts_with("invalid YAML at line"), "{e}");
        let e = from_yaml("name: a\nmatches:\n  - {1: x}\n").unwrap_err();
        assert_eq!(e.field, "matches[0]");
    }
}
