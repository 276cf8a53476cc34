//! The NetworkService and NetworkServiceEndpoint custom resources, as NSM's Kubernetes
//! registry defines them: group `networkservicemesh.io`, version `v1`, namespaced, the
//! spec being the registry message itself with its protobuf field names
//! (`source_selector`, `network_service_names`), which is how Go's `encoding/json`
//! writes NSM's registry types into Kubernetes objects.
//!
//! The CRDs are generated from these types ([`crds`], [`crds_yaml`]); `deploy/crds.yaml`
//! is that output, and a test checks that it is up to date.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::yaml::to_yaml;

/// The API group of NSM's resources.
pub const GROUP: &str = "networkservicemesh.io";

/// The spec of a NetworkService: `registry.NetworkService` (the name repeats
/// `metadata.name` and may be left out).
#[derive(
    kube::CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema,
)]
#[kube(
    group = "networkservicemesh.io",
    version = "v1",
    kind = "NetworkService",
    doc = "A network service of NSM: what its clients ask for by name, and how their labels select its endpoints.",
    namespaced,
    shortname = "netsvc",
    shortname = "netsvcs"
)]
pub struct NetworkServiceSpec {
    /// The service's name; `metadata.name` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the service carries: `IP` (the default) or `ETHERNET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// How a client's labels select the endpoints, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<Match>,
    /// The path ids of the registries the service went through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_ids: Vec<String>,
}

/// `registry.Match`: when the client's labels contain `source_selector`, the endpoints
/// come from `routes`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct Match {
    /// Labels the client must have (empty: every client).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_selector: BTreeMap<String, String>,
    /// The endpoints to choose from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Destination>,
    /// When no endpoint of `routes` is found, go on with the next match.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallthrough: bool,
    /// Labels of the match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MatchMetadata>,
}

/// `registry.Metadata`: labels of a match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct MatchMetadata {
    /// The labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `registry.Destination`: the endpoints whose labels contain `destination_selector`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct Destination {
    /// Labels the endpoint must have for this service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub destination_selector: BTreeMap<String, String>,
    /// Relative weight among the destinations.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight: u32,
}

/// The spec of a NetworkServiceEndpoint: `registry.NetworkServiceEndpoint`.
#[derive(
    kube::CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema,
)]
#[kube(
    group = "networkservicemesh.io",
    version = "v1",
    kind = "NetworkServiceEndpoint",
    doc = "An endpoint of NSM: the network services it provides, its labels and its URL.",
    namespaced,
    shortname = "nse",
    shortname = "nses"
)]
pub struct NetworkServiceEndpointSpec {
    /// The endpoint's name; `metadata.name` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The services it provides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_service_names: Vec<String>,
    /// Its labels, per service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_service_labels: BTreeMap<String, NetworkServiceLabels>,
    /// Where it listens (`tcp://10.0.0.1:5001`, `unix:///...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When the registration expires unless refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<Timestamp>,
    /// When the endpoint first registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_registration_time: Option<Timestamp>,
    /// The path ids of the registries the registration went through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_ids: Vec<String>,
}

/// `registry.NetworkServiceLabels`: an endpoint's labels for one service.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct NetworkServiceLabels {
    /// The labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `google.protobuf.Timestamp` as Go's `encoding/json` writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub seconds: i64,
    /// Nanoseconds within the second.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub nanos: i32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

/// The CRDs of NSM's Kubernetes registry, NetworkService first.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![NetworkService::crd(), NetworkServiceEndpoint::crd()]
}

/// [`crds`] as one YAML text of two documents: what `deploy/crds.yaml` holds.
pub fn crds_yaml() -> String {
    let mut out =
        String::from("# Generated by `cargo run -p nsm-k8s --bin nsm-k8s-crdgen`: do not edit.\n");
    for crd in crds() {
        // A CRD always serializes to JSON: its types hold strings, maps and lists only.
        let value = serde_json::to_value(&crd).unwrap_or_default();
        out.push_str(&to_yaml(&value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_scope_and_short_names_are_nsm_s() {
        let [ns, nse] = <[CustomResourceDefinition; 2]>::try_from(crds()).unwrap();
        assert_eq!(
            ns.metadata.name.as_deref(),
            Some("networkservices.networkservicemesh.io")
        );
        assert_eq!(
            nse.metadata.name.as_deref(),
            Some("networkserviceendpoints.networkservicemesh.io")
        );
        for crd in [&ns, &nse] {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.versions.len(), 1);
            assert_eq!(crd.spec.versions[0].name, "v1");
            assert!(crd.spec.versions[0].served && crd.spec.versions[0].storage);
        }
        assert_eq!(
            nse.spec.names.short_names,
            Some(vec!["nse".to_string(), "nses".to_string()])
        );
    }

    #[test]
    fn a_spec_uses_the_protobuf_field_names() {
        let spec = NetworkServiceSpec {
            payload: Some("IP".into()),
            matches: vec![Match {
                source_selector: [("app".to_string(), "web".to_string())].into(),
                routes: vec![Destination {
                    destination_selector: [("app".to_string(), "vpng".to_string())].into(),
                    weight: 0,
                }],
                ..Match::default()
            }],
            ..NetworkServiceSpec::default()
        };
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({"payload": "IP", "matches": [{
                "source_selector": {"app": "web"},
                "routes": [{"destination_selector": {"app": "vpng"}}]}]})
        );
    }
}
