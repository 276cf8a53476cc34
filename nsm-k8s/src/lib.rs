//! Kubernetes for nsm-rs, without an API server client:
//!
//! - [`crd`]: the NetworkService and NetworkServiceEndpoint custom resources of NSM's
//!   Kubernetes registry (`networkservicemesh.io/v1`) and their generated CRDs;
//! - [`inject`]: what the admission webhook adds to annotated pods (`nsc` in init
//!   mode, the `nsc` sidecar, their environment and volumes);
//! - [`admission`] and [`server`]: AdmissionReview v1 over HTTPS, the
//!   `nsm-admission-webhook` program's server;
//! - [`manifest`]: strict parsing of Kubernetes manifests (unknown fields refused), what
//!   the tests check `deploy/` with;
//! - [`yaml`]: YAML in and out.
//!
//! `docs/KUBERNETES.md` tells how to install the mesh on a cluster and what is tested
//! here.

#![deny(missing_docs)]

pub mod admission;
pub mod crd;
mod error;
pub mod inject;
pub mod manifest;
pub mod server;
pub mod yaml;

pub use error::{Error, Result};
