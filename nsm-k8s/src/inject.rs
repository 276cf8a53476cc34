//! What the admission webhook does to a pod: [`mutate`] answers one AdmissionReview
//! request with a JSON patch that adds `nsc` to the pods annotated
//! `networkservicemesh.io: kernel://vpn-gateway/nsm-1?app=web` (several NS URLs
//! comma-separated), or to the pod template of a Deployment, StatefulSet, DaemonSet,
//! ReplicaSet or Job so annotated.
//!
//! The patch adds, at the front of the init containers:
//! - `nsm-init`: `nsc` in init mode (`NSM_INIT=true`): requests the services, waits for
//!   the connections and exits 0 leaving the interfaces, so the application's
//!   containers start with them;
//! - `nsm-sidecar`: `nsc` as a native sidecar (an init container with
//!   `restartPolicy: Always`, Kubernetes 1.29 and later): requests the same services,
//!   keeps the connections (refresh, heal) while the pod lives and closes them on
//!   SIGTERM, after the application's containers have stopped. A Job's pod still
//!   completes;
//!
//! both with the environment (`NSM_NAME` = the pod's name, `NSM_NETWORK_SERVICES` = the
//! annotation, `NSM_CONNECT_TO` = the node's manager socket, `NSM_CONNECTIONS_FILE` =
//! [`CONNECTIONS_FILE`], the SVID files), the hostPath volume of the manager's socket
//! directory, the `emptyDir` through which `nsm-init` hands its connections to
//! `nsm-sidecar` (which re-requests them: a refresh, the same interfaces; see
//! docs/NSC-INIT.md) and the volume of the SVID source ([`SvidSource`]).
//!
//! State: none; the [`InjectConfig`] is read-only. Failures handled: an annotation that
//! does not parse (an empty item, a bad NS URL) or an object that is not what its kind
//! says is refused (`allowed: false`, code 400, a message naming the annotation, the
//! item and the fault), never an error of the webhook itself. A pod that already has
//! `nsm-init` or `nsm-sidecar` is left as it is (idempotent), and so are objects of
//! other kinds, other operations, namespaces of [`InjectConfig::excluded_namespaces`]
//! and objects without the annotation. Only namespaces labelled
//! [`NAMESPACE_LABEL`]`=`[`NAMESPACE_LABEL_VALUE`] reach the webhook at all: the
//! MutatingWebhookConfiguration's `namespaceSelector` (see [`namespace_opted_in`]).

use std::collections::BTreeMap;

use base64::Engine;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HostPathVolumeSource,
    ObjectFieldSelector, ResourceRequirements, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use nsm_sdk::config::NsUrl;
use serde_json::{json, Value};

use crate::admission::{AdmissionRequest, AdmissionResponse, Status};

/// The annotation that asks for network services.
pub const ANNOTATION: &str = "networkservicemesh.io";
/// The namespace label that opts a namespace in.
pub const NAMESPACE_LABEL: &str = "networkservicemesh.io/inject";
/// The value of [`NAMESPACE_LABEL`] that opts in.
pub const NAMESPACE_LABEL_VALUE: &str = "enabled";
/// The injected init container (`nsc` in init mode).
pub const INIT_CONTAINER: &str = "nsm-init";
/// The injected sidecar (`nsc` that keeps the connections).
pub const SIDECAR: &str = "nsm-sidecar";
/// The volume of the manager's socket directory.
pub const SOCKET_VOLUME: &str = "nsm-socket";
/// The volume of the SVID files.
pub const SVID_VOLUME: &str = "nsm-svid";
/// The volume (an `emptyDir`) where `nsm-init` leaves its connections for `nsm-sidecar`.
pub const CONNECTIONS_VOLUME: &str = "nsm-connections";
/// Where [`CONNECTIONS_VOLUME`] is mounted in both injected containers.
pub const CONNECTIONS_DIR: &str = "/var/lib/nsm-connections";
/// `NSM_CONNECTIONS_FILE` of both injected containers: the hand-over of the
/// connections from `nsm-init` to `nsm-sidecar` (docs/NSC-INIT.md).
pub const CONNECTIONS_FILE: &str = "/var/lib/nsm-connections/connections.jsonl";
/// Where the SVID files are mounted in the injected containers.
pub const SVID_DIR: &str = "/var/run/nsm/svid";
/// The CSI driver of cert-manager's csi-driver-spiffe: SVID files (`tls.crt`,
/// `tls.key`, `ca.crt`) rotated in place, what `NSM_TLS_*` files need.
pub const DEFAULT_SVID_CSI_DRIVER: &str = "spiffe.csi.cert-manager.io";

/// Where the injected `nsc` gets its X.509-SVID (the `NSM_TLS_CERT`, `NSM_TLS_KEY` and
/// `NSM_TLS_CA` files: `tls.crt`, `tls.key` and `ca.crt` in [`SVID_DIR`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SvidSource {
    /// A CSI driver that writes and rotates the pod's SVID files (cert-manager's
    /// csi-driver-spiffe by default).
    Csi {
        /// The driver's name.
        driver: String,
    },
    /// A Secret of type `kubernetes.io/tls` with a `ca.crt` (one identity for all
    /// injected pods of a namespace; rotated by whoever writes the Secret).
    Secret {
        /// The Secret's name.
        name: String,
    },
    /// No identity: `NSM_INSECURE=true` (plaintext to the manager; tests and demos).
    Insecure,
}

impl std::str::FromStr for SvidSource {
    type Err = String;

    /// `csi:<driver>`, `secret:<name>` or `insecure`.
    fn from_str(s: &str) -> Result<SvidSource, String> {
        match s.split_once(':') {
            Some(("csi", d)) if !d.is_empty() => Ok(SvidSource::Csi {
                driver: d.to_string(),
            }),
            Some(("secret", n)) if !n.is_empty() => Ok(SvidSource::Secret {
                name: n.to_string(),
            }),
            None if s == "insecure" => Ok(SvidSource::Insecure),
            _ => Err(format!(
                "{s:?}: expected csi:<driver>, secret:<name> or insecure"
            )),
        }
    }
}

/// What the webhook injects and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image with `nsc`.
    pub nsc_image: String,
    /// The image pull policy of the injected containers (`IfNotPresent` when `None`).
    pub image_pull_policy: Option<String>,
    /// The node's manager: a `unix://` URL inside the hostPath directory.
    pub manager_url: String,
    /// The hostPath directory of the manager's socket (mounted at the same path).
    pub socket_dir: String,
    /// Where the SVID comes from.
    pub svid: SvidSource,
    /// Namespaces never patched, whatever their labels (the mesh's own).
    pub excluded_namespaces: Vec<String>,
}

impl Default for InjectConfig {
    fn default() -> InjectConfig {
        InjectConfig {
            nsc_image: "nsm-rs/nsc:latest".to_string(),
            image_pull_policy: None,
            manager_url: nsm_sdk::serving::DEFAULT_MANAGER_URL.to_string(),
            socket_dir: "/var/lib/networkservicemesh".to_string(),
            svid: SvidSource::Csi {
                driver: DEFAULT_SVID_CSI_DRIVER.to_string(),
            },
            excluded_namespaces: vec![
                "kube-system".to_string(),
                "kube-public".to_string(),
                "nsm-system".to_string(),
            ],
        }
    }
}

/// Whether a namespace with these labels is opted in: what the
/// MutatingWebhookConfiguration's `namespaceSelector` (`matchLabels`) selects.
pub fn namespace_opted_in(labels: &BTreeMap<String, String>) -> bool {
    labels.get(NAMESPACE_LABEL).map(String::as_str) == Some(NAMESPACE_LABEL_VALUE)
}

/// The answer to one request: allowed with or without a patch, or refused with a
/// message naming the fault.
pub fn mutate(request: &AdmissionRequest, config: &InjectConfig) -> AdmissionResponse {
    let mut response = AdmissionResponse {
        uid: request.uid.clone(),
        allowed: true,
        ..AdmissionResponse::default()
    };
    match patch(request, config) {
        Ok(None) => {}
        Ok(Some(ops)) => {
            let bytes = serde_json::to_vec(&Patch(ops)).unwrap_or_default();
            response.patch = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
            response.patch_type = Some("JSONPatch".to_string());
        }
        Err(message) => {
            response.allowed = false;
            response.status = Some(Status {
                code: 400,
                message,
                reason: "BadRequest".to_string(),
            });
        }
    }
    response
}

/// Where the pod spec of an object of this kind is: the tokens of its JSON pointer.
fn pod_spec_pointer(group: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (group, kind) {
        ("", "Pod") => Some(&["spec"]),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") | ("batch", "Job") => {
            Some(&["spec", "template", "spec"])
        }
        _ => None,
    }
}

/// An `add` of `value` at the pod spec's `field` (then `index`: `-` or `0`).
fn add(spec: &[&str], field: &str, index: Option<&str>, value: Value) -> PatchOperation {
    let tokens = spec.iter().copied().chain([field]).chain(index);
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens),
        value,
    })
}

/// The JSON patch operations for a request, `None` when nothing is to be done, or the
/// refusal's message.
fn patch(
    request: &AdmissionRequest,
    config: &InjectConfig,
) -> Result<Option<Vec<PatchOperation>>, String> {
    if !matches!(request.operation.as_str(), "CREATE" | "UPDATE") {
        return Ok(None);
    }
    let Some(tokens) = pod_spec_pointer(&request.kind.group, &request.kind.kind) else {
        return Ok(None);
    };
    let pointer = PointerBuf::from_tokens(tokens.iter().copied()).to_string();
    let namespace = request.namespace.as_deref().unwrap_or_default();
    if config.excluded_namespaces.iter().any(|n| n == namespace) {
        return Ok(None);
    }
    let Some(object) = &request.object else {
        return Err(format!("the {} request has no object", request.kind.kind));
    };
    let what = describe(request, object);
    // The object's own annotation, else its pod template's.
    let annotation = [
        "/metadata/annotations",
        "/spec/template/metadata/annotations",
    ]
    .iter()
    .find_map(|at| object.pointer(at).and_then(|a| a.get(ANNOTATION)));
    let Some(annotation) = annotation else {
        return Ok(None);
    };
    let Some(annotation) = annotation.as_str() else {
        return Err(format!("annotation {ANNOTATION:?} of {what}: not a string"));
    };
    let services = parse_annotation(annotation)
        .map_err(|fault| format!("annotation {ANNOTATION:?} of {what}: {fault}"))?;
    let Some(spec) = object.pointer(&pointer).and_then(Value::as_object) else {
        return Err(format!("{what} has no pod spec at {pointer}"));
    };
    let names = |field: &str| -> Vec<String> {
        spec.get(field)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let containers: Vec<String> = [names("initContainers"), names("containers")].concat();
    if containers
        .iter()
        .any(|n| n == INIT_CONTAINER || n == SIDECAR)
    {
        // Already injected (a re-invocation, or an UPDATE of a patched template).
        return Ok(None);
    }
    if let Some(taken) = names("volumes")
        .into_iter()
        .find(|n| n == SOCKET_VOLUME || n == SVID_VOLUME || n == CONNECTIONS_VOLUME)
    {
        return Err(format!(
            "{what} already has a volume named {taken:?}, which the injected nsc needs"
        ));
    }
    let mut ops = Vec::new();
    let volumes = json_of(&volumes(config));
    if spec.contains_key("volumes") {
        for v in volumes.as_array().into_iter().flatten() {
            ops.push(add(tokens, "volumes", Some("-"), v.clone()));
        }
    } else {
        ops.push(add(tokens, "volumes", None, volumes));
    }
    let init = json_of(&container(INIT_CONTAINER, &services, true, config));
    let sidecar = json_of(&container(SIDECAR, &services, false, config));
    if spec.contains_key("initContainers") {
        ops.push(add(tokens, "initContainers", Some("0"), sidecar));
        ops.push(add(tokens, "initContainers", Some("0"), init));
    } else {
        ops.push(add(tokens, "initContainers", None, json!([init, sidecar])));
    }
    Ok(Some(ops))
}

/// `Pod default/web` (or `Deployment default/(generated)`), for messages.
fn describe(request: &AdmissionRequest, object: &Value) -> String {
    let name = request
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or_else(|| object.pointer("/metadata/name").and_then(Value::as_str))
        .or_else(|| {
            object
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
        })
        .unwrap_or("(unnamed)");
    match request.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{} {ns}/{name}", request.kind.kind),
        _ => format!("{} {name}", request.kind.kind),
    }
}

/// The annotation's NS URLs, checked as `nsc` will read them, joined back with commas;
/// or the fault, naming the item.
pub fn parse_annotation(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err("empty: expected NS URLs like kernel://vpn-gateway/nsm-1?app=web".to_string());
    }
    let mut items = Vec::new();
    for (i, item) in value.split(',').enumerate() {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("item {} is empty", i + 1));
        }
        item.parse::<NsUrl>()
            .map_err(|e| format!("item {}: {e}", i + 1))?;
        items.push(item);
    }
    Ok(items.join(","))
}

fn json_of<T: serde::Serialize>(value: &T) -> Value {
    // k8s-openapi types always serialize to JSON.
    serde_json::to_value(value).unwrap_or_default()
}

fn volumes(config: &InjectConfig) -> Vec<Volume> {
    let socket = Volume {
        name: SOCKET_VOLUME.to_string(),
        host_path: Some(HostPathVolumeSource {
            path: config.socket_dir.clone(),
            type_: Some("Directory".to_string()),
        }),
        ..Volume::default()
    };
    let svid = match &config.svid {
        SvidSource::Csi { driver } => Some(Volume {
            name: SVID_VOLUME.to_string(),
            csi: Some(CSIVolumeSource {
                driver: driver.clone(),
                read_only: Some(true),
                ..CSIVolumeSource::default()
            }),
            ..Volume::default()
        }),
        SvidSource::Secret { name } => Some(Volume {
            name: SVID_VOLUME.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }),
        SvidSource::Insecure => None,
    };
    let connections = Volume {
        name: CONNECTIONS_VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    [socket, connections].into_iter().chain(svid).collect()
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    }
}

fn container(name: &str, services: &str, init: bool, config: &InjectConfig) -> Container {
    let mut envs = vec![
        EnvVar {
            name: "NSM_NAME".to_string(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_string(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        env("NSM_NETWORK_SERVICES", services),
        env("NSM_CONNECT_TO", &config.manager_url),
        env("NSM_CONNECTIONS_FILE", CONNECTIONS_FILE),
    ];
    if init {
        envs.push(env("NSM_INIT", "true"));
    }
    let mut mounts = vec![
        VolumeMount {
            name: SOCKET_VOLUME.to_string(),
            mount_path: config.socket_dir.clone(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: CONNECTIONS_VOLUME.to_string(),
            mount_path: CONNECTIONS_DIR.to_string(),
            ..VolumeMount::default()
        },
    ];
    if config.svid == SvidSource::Insecure {
        envs.push(env("NSM_INSECURE", "true"));
    } else {
        envs.push(env("NSM_TLS_CERT", &format!("{SVID_DIR}/tls.crt")));
        envs.push(env("NSM_TLS_KEY", &format!("{SVID_DIR}/tls.key")));
        envs.push(env("NSM_TLS_CA", &format!("{SVID_DIR}/ca.crt")));
        mounts.push(VolumeMount {
            name: SVID_VOLUME.to_string(),
            mount_path: SVID_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    Container {
        name: name.to_string(),
        image: Some(config.nsc_image.clone()),
        image_pull_policy: Some(
            config
                .image_pull_policy
                .clone()
                .unwrap_or_else(|| "IfNotPresent".to_string()),
        ),
        command: Some(vec!["nsc".to_string()]),
        env: Some(envs),
        volume_mounts: Some(mounts),
        // The sidecar is a native sidecar: started after nsm-init, kept running beside
        // the application, stopped after it.
        restart_policy: (!init).then(|| "Always".to_string()),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".to_string())),
                ("memory".to_string(), Quantity("16Mi".to_string())),
            ])),
            ..ResourceRequirements::default()
        }),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::GroupVersionKind;

    fn request(kind: (&str, &str), namespace: &str, object: Value) -> AdmissionRequest {
        AdmissionRequest {
            uid: "u-1".to_string(),
            kind: GroupVersionKind {
                group: kind.0.to_string(),
                version: "v1".to_string(),
                kind: kind.1.to_string(),
            },
            name: Some("web".to_string()),
            namespace: Some(namespace.to_string()),
            operation: "CREATE".to_string(),
            object: Some(object),
            ..AdmissionRequest::default()
        }
    }

    fn pod(annotation: Option<&str>) -> Value {
        let mut pod = json!({"metadata": {"name": "web"},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]}});
        if let Some(a) = annotation {
            pod["metadata"]["annotations"] = json!({ ANNOTATION: a });
        }
        pod
    }

    fn ops(response: &AdmissionResponse) -> Vec<Value> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(response.patch.as_deref().unwrap())
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn an_annotated_pod_gets_init_and_sidecar_first() {
        let config = InjectConfig::default();
        let r = mutate(
            &request(
                ("", "Pod"),
                "default",
                pod(Some(" kernel://vpn-gateway/nsm-1?app=web , noop://x ")),
            ),
            &config,
        );
        assert!(r.allowed && r.status.is_none());
        assert_eq!(r.uid, "u-1");
        assert_eq!(r.patch_type.as_deref(), Some("JSONPatch"));
        let ops = ops(&r);
        assert_eq!(ops[0]["path"], "/spec/volumes");
        assert_eq!(
            ops[0]["value"][0]["hostPath"]["path"],
            "/var/lib/networkservicemesh"
        );
        assert_eq!(ops[0]["value"][1]["name"], CONNECTIONS_VOLUME);
        assert_eq!(ops[0]["value"][1]["emptyDir"], json!({}));
        assert_eq!(ops[0]["value"][2]["csi"]["driver"], DEFAULT_SVID_CSI_DRIVER);
        assert_eq!(ops[1]["path"], "/spec/initContainers");
        let [init, sidecar] = ops[1]["value"].as_array().unwrap().as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(init["name"], INIT_CONTAINER);
        assert_eq!(sidecar["name"], SIDECAR);
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert!(init.get("restartPolicy").is_none());
        let env = |c: &Value, name: &str| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .cloned()
        };
        assert_eq!(
            env(init, "NSM_NETWORK_SERVICES").unwrap()["value"],
            "kernel://vpn-gateway/nsm-1?app=web,noop://x"
        );
        assert_eq!(env(init, "NSM_INIT").unwrap()["value"], "true");
        for c in [init, sidecar] {
            assert_eq!(
                env(c, "NSM_CONNECTIONS_FILE").unwrap()["value"],
                CONNECTIONS_FILE,
                "the hand-over file of docs/NSC-INIT.md"
            );
            let mounts = c["volumeMounts"].as_array().unwrap();
            assert!(mounts
                .iter()
                .any(|m| m["name"] == CONNECTIONS_VOLUME && m["mountPath"] == CONNECTIONS_DIR));
        }
        assert!(env(sidecar, "NSM_INIT").is_none());
        assert_eq!(
            env(sidecar, "NSM_CONNECT_TO").unwrap()["value"],
            config.manager_url
        );
        assert_eq!(
            env(sidecar, "NSM_TLS_CA").unwrap()["value"],
            "/var/run/nsm/svid/ca.crt"
        );
        assert_eq!(
            env(sidecar, "NSM_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
    }

    #[test]
    fn existing_lists_are_added_to_and_insecure_has_no_svid() {
        let config = InjectConfig {
            svid: SvidSource::Insecure,
            ..InjectConfig::default()
        };
        let mut object = pod(Some("kernel://vpn-gateway"));
        object["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        object["spec"]["initContainers"] = json!([{"name": "migrate", "image": "x"}]);
        let ops = ops(&mutate(&request(("", "Pod"), "default", object), &config));
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/spec/volumes/-",
                "/spec/volumes/-",
                "/spec/initContainers/0",
                "/spec/initContainers/0"
            ]
        );
        assert_eq!(ops[2]["value"]["name"], SIDECAR);
        assert_eq!(ops[3]["value"]["name"], INIT_CONTAINER);
        let env = ops[3]["value"]["env"].as_array().unwrap();
        assert!(env
            .iter()
            .any(|e| e["name"] == "NSM_INSECURE" && e["value"] == "true"));
        assert!(!env.iter().any(|e| e["name"] == "NSM_TLS_CERT"));
    }

    #[test]
    fn workload_templates_are_patched_under_their_template() {
        let template = json!({"metadata": {"annotations": {ANNOTATION: "kernel://vpn-gateway"}},
            "spec": {"containers": [{"name": "app"}]}});
        for kind in [
            ("apps", "Deployment"),
            ("apps", "StatefulSet"),
            ("apps", "DaemonSet"),
            ("apps", "ReplicaSet"),
            ("batch", "Job"),
        ] {
            let r = mutate(
                &request(kind, "default", json!({"spec": {"template": template}})),
                &InjectConfig::default(),
            );
            assert_eq!(
                ops(&r)[1]["path"],
                "/spec/template/spec/initContainers",
                "{kind:?}"
            );
        }
        // The annotation on the workload itself counts too.
        let object = json!({"metadata": {"annotations": {ANNOTATION: "kernel://x"}},
            "spec": {"template": {"spec": {"containers": []}}}});
        let r = mutate(
            &request(("apps", "Deployment"), "d", object),
            &InjectConfig::default(),
        );
        assert!(r.patch.is_some());
    }

    #[test]
    fn left_alone_without_annotation_when_patched_excluded_or_other() {
        let config = InjectConfig::default();
        let annotated = pod(Some("kernel://vpn-gateway"));
        let untouched = |r: AdmissionResponse| r.allowed && r.patch.is_none() && r.status.is_none();
        assert!(untouched(mutate(
            &request(("", "Pod"), "default", pod(None)),
            &config
        )));
        assert!(untouched(mutate(
            &request(("", "Pod"), "kube-system", annotated.clone()),
            &config
        )));
        assert!(untouched(mutate(
            &request(("", "Service"), "default", annotated.clone()),
            &config
        )));
        let mut delete = request(("", "Pod"), "default", annotated.clone());
        delete.operation = "DELETE".to_string();
        assert!(untouched(mutate(&delete, &config)));
        let mut patched = annotated;
        patched["spec"]["initContainers"] = json!([{"name": INIT_CONTAINER}]);
        assert!(untouched(mutate(
            &request(("", "Pod"), "default", patched),
            &config
        )));
    }

    #[test]
    fn faults_are_refused_with_a_message_that_names_them() {
        let config = InjectConfig::default();
        let refused = |object: Value| {
            let r = mutate(&request(("", "Pod"), "default", object), &config);
            assert!(!r.allowed && r.patch.is_none());
            let status = r.status.unwrap();
            assert_eq!(status.code, 400);
            status.message
        };
        let m = refused(pod(Some("kernel://vpn-gateway,,noop://x")));
        assert!(
            m.contains("networkservicemesh.io") && m.contains("item 2 is empty"),
            "{m}"
        );
        assert!(m.contains("Pod default/web"), "{m}");
        let m = refused(pod(Some("kernel://vpn-gateway/far-too-long-for-linux")));
        assert!(
            m.contains("item 1: ") && m.contains("far-too-long-for-linux"),
            "{m}"
        );
        let m = refused(pod(Some("  ")));
        assert!(m.contains("empty"), "{m}");
        let m = refused(json!({"metadata": {"annotations": {ANNOTATION: "kernel://x"}}}));
        assert!(m.contains("no pod spec at /spec"), "{m}");
        let mut taken = pod(Some("kernel://x"));
        taken["spec"]["volumes"] = json!([{"name": SOCKET_VOLUME}]);
        let m = refused(taken);
        assert!(m.contains("nsm-socket"), "{m}");
    }

    #[test]
    fn svid_sources_and_namespace_labels() {
        assert_eq!(
            "csi:x.io".parse::<SvidSource>(),
            Ok(SvidSource::Csi {
                driver: "x.io".into()
            })
        );
        assert_eq!(
            "secret:s".parse::<SvidSource>(),
            Ok(SvidSource::Secret { name: "s".into() })
        );
        assert_eq!("insecure".parse::<SvidSource>(), Ok(SvidSource::Insecure));
        assert!("csi:".parse::<SvidSource>().is_err());
        assert!("vault".parse::<SvidSource>().is_err());
        let labels = |v: &str| BTreeMap::from([(NAMESPACE_LABEL.to_string(), v.to_string())]);
        assert!(namespace_opted_in(&labels("enabled")));
        assert!(!namespace_opted_in(&labels("disabled")));
        assert!(!namespace_opted_in(&BTreeMap::new()));
    }
}
