//! The registry server: network services and endpoints in memory, endpoints expiring.
//!
//! Endpoint chain: `validate`, `expire(expiry)`, `memory`. Network service chain:
//! `validate`, `memory`.

use std::time::Duration;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use crate::registry::{expire, memory, validate, Registries, RegistryChain};
use crate::transport::Services;

/// Default time an endpoint stays registered without a refresh.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(60);

/// An assembled registry.
#[derive(Debug, Clone)]
pub struct RegistryServer {
    registries: Registries,
}

impl RegistryServer {
    /// Both registry chains (to use in process).
    pub fn registries(&self) -> &Registries {
        &self.registries
    }

    /// The gRPC services to serve: both registries.
    pub fn services(&self) -> Services {
        Services::new()
            .ns_registry(self.registries.ns.clone())
            .nse_registry(self.registries.nse.clone())
    }
}

/// The registry server; endpoints expire `expiry` after their last registration.
pub fn registry_server(expiry: Duration) -> RegistryServer {
    RegistryServer {
        registries: Registries {
            ns: RegistryChain::<NetworkService>::builder()
                .push(validate())
                .push(memory())
                .build(),
            nse: RegistryChain::<NetworkServiceEndpoint>::builder()
                .push(validate())
                .push(expire(expiry))
                .push(memory())
                .build(),
        },
    }
}
