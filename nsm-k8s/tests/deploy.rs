//! `deploy/` as the API server would take it: every manifest parses strictly as its
//! Kubernetes type, each kustomization lists exactly the files beside it, the CRDs are
//! what the Rust types generate, their schemas accept the NetworkService files of
//! examples/config, and the images and variables the manifests name exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nsm_k8s::crd::{crds, crds_yaml, NetworkService};
use nsm_k8s::manifest::{self, strict, Manifest};
use serde::Deserialize;
use serde_json::{json, Map, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The files under `dir` whose names end in one of `exts`, recursively, sorted.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if exts.iter().any(|e| path.to_string_lossy().ends_with(e)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// kustomize's Kustomization, the fields used here (any other is refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
}

fn manifests() -> Vec<(PathBuf, Vec<Manifest>)> {
    files(&root().join("deploy"), &[".yaml", ".yml"])
        .into_iter()
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .map(|p| {
            let parsed =
                manifest::parse_yaml(&read(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!parsed.is_empty(), "{}: no manifest", p.display());
            (p, parsed)
        })
        .collect()
}

#[test]
fn the_committed_crds_are_what_the_types_generate() {
    assert_eq!(
        read(&root().join("deploy/crds.yaml")),
        crds_yaml(),
        "deploy/crds.yaml is out of date: cargo run -p nsm-k8s --bin nsm-k8s-crdgen deploy/crds.yaml"
    );
}

#[test]
fn every_manifest_parses_strictly_and_every_kustomization_lists_its_files() {
    let parsed = manifests();
    let kinds: BTreeSet<&str> = parsed
        .iter()
        .flat_map(|(_, ms)| ms)
        .map(|m| match m {
            Manifest::Namespace(_) => "Namespace",
            Manifest::DaemonSet(_) => "DaemonSet",
            Manifest::Deployment(_) => "Deployment",
            Manifest::MutatingWebhookConfiguration(_) => "MutatingWebhookConfiguration",
            Manifest::CustomResourceDefinition(_) => "CustomResourceDefinition",
            Manifest::NetworkService(_) => "NetworkService",
            Manifest::ServiceAccount(_) => "ServiceAccount",
            Manifest::Service(_) => "Service",
            _ => "other",
        })
        .collect();
    for kind in [
        "Namespace",
        "DaemonSet",
        "Deployment",
        "MutatingWebhookConfiguration",
        "CustomResourceDefinition",
        "NetworkService",
        "ServiceAccount",
        "Service",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/");
    }

    let kustomizations = files(&root().join("deploy"), &["kustomization.yaml"]);
    assert_eq!(kustomizations.len(), 2, "{kustomizations:?}");
    let mut listed = BTreeSet::new();
    for k in &kustomizations {
        let docs = nsm_k8s::yaml::yaml_documents(&read(k)).unwrap();
        let kustomization: Kustomization = serde_json::from_value(docs[0].clone())
            .unwrap_or_else(|e| panic!("{}: {e}", k.display()));
        assert_eq!(kustomization.api_version, "kustomize.config.k8s.io/v1beta1");
        assert_eq!(kustomization.kind, "Kustomization");
        let dir = k.parent().unwrap();
        for r in &kustomization.resources {
            let path = dir.join(r);
            assert!(path.is_file(), "{}: {r} does not exist", k.display());
            listed.insert(path);
        }
    }
    let all: BTreeSet<PathBuf> = parsed.into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        listed, all,
        "manifests that no kustomization lists, or the reverse"
    );
}

/// A NetworkService file's JSON (protobuf JSON names) as a custom resource: the field
/// names as NSM's Kubernetes registry writes them (the proto names), label maps as
/// they are.
fn to_custom_resource(file: &Value) -> Value {
    fn snake(key: &str) -> String {
        let mut out = String::new();
        for c in key.chars() {
            if c.is_ascii_uppercase() {
                out.push('_');
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }
    fn convert(v: &Value, labels: bool) -> Value {
        match v {
            Value::Object(m) if !labels => Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        let is_map =
                            k.ends_with("Selector") || k.ends_with("_selector") || k == "labels";
                        (snake(k), convert(v, is_map))
                    })
                    .collect::<Map<_, _>>(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|v| convert(v, false)).collect()),
            other => other.clone(),
        }
    }
    let spec = convert(file, false);
    json!({
        "apiVersion": "networkservicemesh.io/v1",
        "kind": "NetworkService",
        "metadata": {"name": spec["name"], "namespace": "default"},
        "spec": spec,
    })
}

fn schema_of(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

#[test]
fn the_crd_schema_accepts_the_network_service_files_of_examples_config() {
    // OpenAPI v3 schemas are JSON Schema draft 4 plus keywords (nullable,
    // x-kubernetes-*) that a draft 4 validator ignores.
    let validator = jsonschema::draft4::new(&schema_of("NetworkService")).unwrap();
    let config = files(&root().join("examples/config"), &[".json", ".yaml"]);
    assert!(!config.is_empty());
    for path in config {
        let docs = if path.extension().is_some_and(|e| e == "json") {
            vec![serde_json::from_str::<Value>(&read(&path)).unwrap()]
        } else {
            nsm_k8s::yaml::yaml_documents(&read(&path)).unwrap()
        };
        for doc in docs {
            let cr = to_custom_resource(&doc);
            let errors: Vec<String> = validator.iter_errors(&cr).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            // And it reads strictly as the Rust type, every field known.
            let parsed: NetworkService = strict(&cr).unwrap();
            assert_eq!(parsed.spec.name.as_deref(), doc["name"].as_str());
            assert_eq!(
                parsed.spec.matches.len(),
                doc["matches"].as_array().map_or(0, Vec::len)
            );
        }
    }
    // The check can fail: wrong types are refused.
    let file = json!({"name": "x", "payload": 5, "matches": [{"routes": [{"weight": "heavy"}]}]});
    let errors = validator.iter_errors(&to_custom_resource(&file)).count();
    assert_eq!(errors, 2);
    let endpoint = jsonschema::draft4::new(&schema_of("NetworkServiceEndpoint")).unwrap();
    let nse = json!({"apiVersion": "networkservicemesh.io/v1", "kind": "NetworkServiceEndpoint",
        "metadata": {"name": "vpng-1"},
        "spec": {"network_service_names": ["vpn-gateway"],
                 "network_service_labels": {"vpn-gateway": {"labels": {"app": "vpng"}}},
                 "url": "tcp://10.0.0.5:5003", "expiration_time": {"seconds": 1765141200}}});
    assert!(endpoint.is_valid(&nse));
    let mut bad = nse.clone();
    bad["spec"]["network_service_names"] = json!("vpn-gateway");
    assert!(!endpoint.is_valid(&bad));
}

#[test]
fn the_vpn_example_s_service_file_says_what_its_network_service_says() {
    let dir = root().join("deploy/examples/vpn");
    let service = manifest::parse_yaml(&read(&dir.join("network-service.yaml"))).unwrap();
    let [Manifest::NetworkService(cr)] = service.as_slice() else {
        panic!("{service:?}")
    };
    let gateway = manifest::parse_yaml(&read(&dir.join("gateway.yaml"))).unwrap();
    let config_map = gateway
        .iter()
        .find_map(|m| match m {
            Manifest::ConfigMap(c) => Some(c),
            _ => None,
        })
        .unwrap();
    let file = &config_map.data.as_ref().unwrap()["vpn-gateway.json"];
    // The file is what the gateway's loader takes...
    let loaded = nsm_sdk::config::ns_file::from_json(file).unwrap();
    assert_eq!(loaded[0].name, "vpn-gateway");
    // ...and the same service as the custom resource.
    let from_file = to_custom_resource(&serde_json::from_str(file).unwrap());
    let mut spec = serde_json::to_value(&cr.spec).unwrap();
    spec["name"] = json!(cr.metadata.name);
    assert_eq!(from_file["spec"], spec);
}

/// Every `NSM_*` string of the workspace's sources: the variables programs read.
fn known_variables() -> BTreeSet<String> {
    let mut known = BTreeSet::new();
    for dir in [
        "examples/src",
        "nsm-sdk/src",
        "nsm-sdk-kernel/src",
        "nsm-sdk-vxlan/src",
        "nsm-sdk-dns/src",
        "nsm-k8s/src",
    ] {
        for file in files(&root().join(dir), &[".rs"]) {
            let text = read(&file);
            for (i, _) in text.match_indices("\"NSM_") {
                let name: String = text[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                known.insert(name);
            }
        }
    }
    known
}

#[test]
fn the_images_and_variables_the_manifests_name_exist() {
    let dockerfile = read(&root().join("deploy/docker/Dockerfile"));
    let bins: String = ["examples/Cargo.toml", "nsm-k8s/Cargo.toml"]
        .iter()
        .map(|f| read(&root().join(f)))
        .collect();
    let known = known_variables();
    let mut images = BTreeSet::from(["nsm-rs/nsc:latest".to_string()]);
    let mut checked = 0;
    for (path, ms) in manifests() {
        for m in ms {
            let spec = match &m {
                Manifest::Deployment(d) => d.spec.template.spec.clone(),
                Manifest::DaemonSet(d) => d.spec.template.spec.clone(),
                _ => None,
            };
            for c in spec.into_iter().flat_map(|s| s.containers) {
                let image = c.image.clone().unwrap();
                if !image.starts_with("nsm-rs/") {
                    continue;
                }
                images.insert(image);
                for e in c
                    .env
                    .iter()
                    .flatten()
                    .filter(|e| e.name.starts_with("NSM_"))
                {
                    assert!(
                        known.contains(&e.name),
                        "{}: {} reads no {}",
                        path.display(),
                        c.name,
                        e.name
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "{checked}");
    for image in &images {
        let program = image
            .trim_start_matches("nsm-rs/")
            .split(':')
            .next()
            .unwrap();
        assert!(
            dockerfile.contains(&format!("FROM runtime AS {program}\n"))
                && dockerfile.contains(&format!(
                    "COPY --from=build /out/{program} /usr/local/bin/{program}"
                ))
                && dockerfile.contains(&format!("--bin {program}"))
                && dockerfile.contains(&format!("target/release/{program}")),
            "{image}: no target in deploy/docker/Dockerfile"
        );
        assert!(
            bins.contains(&format!("name = \"{program}\"")),
            "{program} is no program of the workspace"
        );
    }
}
