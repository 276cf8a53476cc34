//! Strict reading of Kubernetes manifests: each document is parsed as the Kubernetes
//! type its `apiVersion` and `kind` name (k8s-openapi's types, and this crate's custom
//! resources), and a field that the type does not know is an error with its path
//! (`spec.template.spec.containers.0.imagePullPolicyy`), where the API server would
//! silently drop it (or refuse it, with `kubectl apply --validate=strict`).
//!
//! State: none. Failure handled: every fault is a [`ManifestError`] naming the
//! document, its kind and name, and the fault.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::crd::{NetworkService, NetworkServiceEndpoint};

/// A manifest that does not parse as its Kubernetes type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct ManifestError {
    /// `Deployment nsm-system/nsm-admission-webhook` or `document 3`.
    pub what: String,
    /// What is wrong.
    pub reason: String,
}

/// One parsed manifest.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub enum Manifest {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ConfigMap(Box<ConfigMap>),
    Secret(Box<Secret>),
    Service(Box<Service>),
    Pod(Box<Pod>),
    Deployment(Box<Deployment>),
    DaemonSet(Box<DaemonSet>),
    StatefulSet(Box<StatefulSet>),
    ReplicaSet(Box<ReplicaSet>),
    Job(Box<Job>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    MutatingWebhookConfiguration(Box<MutatingWebhookConfiguration>),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    NetworkService(Box<NetworkService>),
    NetworkServiceEndpoint(Box<NetworkServiceEndpoint>),
}

/// `value` as a `T`, refusing any field `T` does not know (named by its path). The
/// top-level `apiVersion` and `kind`, which kube's custom resource types take as given
/// by the type, are not counted (the k8s-openapi types check them).
pub fn strict<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let parsed: T = serde_ignored::deserialize(value, |path| {
        let path = dotted(&path);
        if path != "apiVersion" && path != "kind" {
            unknown.push(path);
        }
    })
    .map_err(|e| e.to_string())?;
    if unknown.is_empty() {
        Ok(parsed)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

/// `spec.template.spec.containers.0.imagee`: serde_ignored's path without its markers
/// of options and newtypes.
fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    let join = |parent: &Path<'_>, segment: String| match dotted(parent) {
        p if p.is_empty() => segment,
        p => format!("{p}.{segment}"),
    };
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => join(parent, index.to_string()),
        Path::Map { parent, key } => join(parent, key.clone()),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => dotted(parent),
    }
}

/// `Deployment nsm-system/webhook`, for messages.
fn describe(doc: &Value) -> String {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("(no kind)");
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(no name)");
    match doc.pointer("/metadata/namespace").and_then(Value::as_str) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// One manifest, parsed strictly as the type its `apiVersion` and `kind` name.
pub fn parse(doc: &Value) -> Result<Manifest, ManifestError> {
    let what = describe(doc);
    let fail = |reason: String| ManifestError {
        what: what.clone(),
        reason,
    };
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    macro_rules! as_ {
        ($variant:ident) => {
            strict(doc)
                .map(|m| Manifest::$variant(Box::new(m)))
                .map_err(fail)
        };
    }
    match (api_version, kind) {
        ("v1", "Namespace") => as_!(Namespace),
        ("v1", "ServiceAccount") => as_!(ServiceAccount),
        ("v1", "ConfigMap") => as_!(ConfigMap),
        ("v1", "Secret") => as_!(Secret),
        ("v1", "Service") => as_!(Service),
        ("v1", "Pod") => as_!(Pod),
        ("apps/v1", "Deployment") => as_!(Deployment),
        ("apps/v1", "DaemonSet") => as_!(DaemonSet),
        ("apps/v1", "StatefulSet") => as_!(StatefulSet),
        ("apps/v1", "ReplicaSet") => as_!(ReplicaSet),
        ("batch/v1", "Job") => as_!(Job),
        ("policy/v1", "PodDisruptionBudget") => as_!(PodDisruptionBudget),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => as_!(ClusterRole),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => as_!(ClusterRoleBinding),
        ("rbac.authorization.k8s.io/v1", "Role") => as_!(Role),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => as_!(RoleBinding),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            as_!(MutatingWebhookConfiguration)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            as_!(CustomResourceDefinition)
        }
        ("networkservicemesh.io/v1", "NetworkService") => as_!(NetworkService),
        ("networkservicemesh.io/v1", "NetworkServiceEndpoint") => as_!(NetworkServiceEndpoint),
        _ => Err(fail(format!(
            "unknown apiVersion {api_version:?} and kind {kind:?}"
        ))),
    }
}

/// Every document of a YAML text, parsed strictly; empty documents (a trailing `---`)
/// are skipped.
pub fn parse_yaml(text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let docs = crate::yaml::yaml_documents(text).map_err(|e| ManifestError {
        what: "YAML".to_string(),
        reason: e.to_string(),
    })?;
    docs.iter().filter(|d| !d.is_null()).map(parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unknown_field_is_named_by_its_path() {
        let doc = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "imagee": "x"}]}}}
        });
        let e = parse(&doc).unwrap_err();
        assert_eq!(e.what, "Deployment default/web");
        assert!(
            e.reason.contains("spec.template.spec.containers.0.imagee"),
            "{e}"
        );
        let mut good = doc.clone();
        good["spec"]["template"]["spec"]["containers"][0] = json!({"name": "c", "image": "x"});
        assert!(matches!(parse(&good), Ok(Manifest::Deployment(_))));
    }

    #[test]
    fn a_wrong_type_or_an_unknown_kind_is_refused() {
        let e = parse(&json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s"}, "spec": {"ports": "443"}}))
        .unwrap_err();
        assert_eq!(e.what, "Service s");
        let e = parse(&json!({"apiVersion": "v9", "kind": "Thing"})).unwrap_err();
        assert!(e.reason.contains("unknown apiVersion"), "{e}");
    }

    #[test]
    fn a_custom_resource_is_strict_too() {
        let ns = json!({"apiVersion": "networkservicemesh.io/v1", "kind": "NetworkService",
            "metadata": {"name": "vpn-gateway"},
            "spec": {"payload": "IP", "matches": [{"routes": [{"destination_selector": {"app": "vpng"}}]}]}});
        let parsed = parse(&ns);
        assert!(
            matches!(parsed, Ok(Manifest::NetworkService(_))),
            "{parsed:?}"
        );
        let mut bad = ns.clone();
        bad["spec"]["matches"][0]["routes"][0]["destinationSelector"] = json!({"app": "x"});
        let e = parse(&bad).unwrap_err();
        assert!(
            e.reason
                .contains("spec.matches.0.routes.0.destinationSelector"),
            "{e}"
        );
    }
}
