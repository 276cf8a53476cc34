//! The registry server: network services and endpoints in memory, endpoints expiring.
//!
//! Endpoint chain: `validate`, `expire(expiry)`, `memory`. Network service chain:
//! `validate`, `memory`. With a [`PolicySet`] ([`registry_server_with`]), `authorize`
//! comes before `memory` in both: a name can be changed only by the identity that
//! registered it, until it is unregistered or expires.
//!
//! On etcd ([`Store::Etcd`], feature `etcd`, [`registry_server_on`]): endpoint chain
//! `validate`, `expire(expiry).stamp_only()`, the etcd store; network service chain
//! `validate`, the etcd store. The store keeps the owners (in etcd, so they hold across
//! replicas) and expires endpoints through etcd leases; no `authorize`, no timers.

use std::time::Duration;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use crate::registry::{
    authorize, expire, interdomain_route, memory, validate, Registries, RegistryChain,
};
use crate::security::PolicySet;
use crate::transport::Services;

/// Default time an endpoint stays registered without a refresh.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(60);

/// An assembled registry.
#[derive(Debug, Clone)]
pub struct RegistryServer {
    registries: Registries,
}

impl RegistryServer {
    /// A registry server made of these chains.
    pub fn from_registries(registries: Registries) -> RegistryServer {
        RegistryServer { registries }
    }

    /// Both registry chains (to use in process).
    pub fn registries(&self) -> &Registries {
        &self.registries
    }

    /// This registry with [`interdomain_route`] first in both chains: entries and
    /// queries naming another domain (`name@domain`) go to `proxy` (a client of the
    /// domain's registry proxy, e.g. `grpc_registry` to `NSM_REGISTRY_PROXY_URL`).
    pub fn route_interdomain(self, proxy: Registries) -> RegistryServer {
        RegistryServer {
            registries: Registries {
                ns: RegistryChain::builder()
                    .push(interdomain_route(proxy.clone()))
                    .push(self.registries.ns)
                    .build(),
                nse: RegistryChain::builder()
                    .push(interdomain_route(proxy))
                    .push(self.registries.nse)
                    .build(),
            },
        }
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
    registry_server_with(expiry, None)
}

/// Where a registry server keeps its entries.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Store {
    /// In the process's memory (the default): gone when the process stops.
    #[default]
    Memory,
    /// In etcd (feature `etcd`): durable, shared by every registry on the same etcd
    /// and prefix.
    #[cfg(feature = "etcd")]
    Etcd(crate::registry::Etcd),
}

/// The registry server; endpoints expire `expiry` after their last registration; with
/// `policies`, names are owned by the identity that registered them (the
/// [`policy::REGISTRY`](crate::security::policy::REGISTRY) policies, checked with the
/// caller's mTLS identity).
pub fn registry_server_with(expiry: Duration, policies: Option<PolicySet>) -> RegistryServer {
    registry_server_on(Store::Memory, expiry, policies)
}

/// [`registry_server_with`] on `store`.
pub fn registry_server_on(
    store: Store,
    expiry: Duration,
    policies: Option<PolicySet>,
) -> RegistryServer {
    match store {
        Store::Memory => in_memory(expiry, policies),
        #[cfg(feature = "etcd")]
        Store::Etcd(etcd) => on_etcd(&etcd, expiry, policies),
    }
}

#[cfg(feature = "etcd")]
fn on_etcd(
    etcd: &crate::registry::Etcd,
    expiry: Duration,
    policies: Option<PolicySet>,
) -> RegistryServer {
    let (mut ns, mut nse) = (etcd.store(), etcd.store());
    if let Some(policies) = policies {
        ns = ns.policies(policies.clone());
        nse = nse.policies(policies);
    }
    RegistryServer {
        registries: Registries {
            ns: RegistryChain::builder().push(validate()).push(ns).build(),
            nse: RegistryChain::builder()
                .push(validate())
                .push(expire(expiry).stamp_only())
                .push(nse)
                .build(),
        },
    }
}

fn in_memory(expiry: Duration, policies: Option<PolicySet>) -> RegistryServer {
    let mut ns = RegistryChain::<NetworkService>::builder().push(validate());
    let mut nse = RegistryChain::<NetworkServiceEndpoint>::builder()
        .push(validate())
        .push(expire(expiry));
    if let Some(policies) = policies {
        // One owner map per resource: a service and an endpoint may share a name.
        ns = ns.push(authorize(policies.clone()));
        nse = nse.push(authorize(policies));
    }
    RegistryServer {
        registries: Registries {
            ns: ns.push(memory()).build(),
            nse: nse.push(memory()).build(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Peer;
    use crate::security::dev_ca::DevCa;
    use crate::security::{PeerIdentity, SpiffeId, Svid};
    use crate::Cx;
    use tonic::Code;

    fn peers() -> (Cx, Cx) {
        let ca = DevCa::new("example.org").unwrap();
        let cx = |name: &str| {
            let id = SpiffeId::parse(&format!("spiffe://example.org/{name}")).unwrap();
            let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
            let svid =
                Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
            Cx::server().with_peer(Peer {
                identity: Some(PeerIdentity::from_leaf(svid.leaf().clone()).unwrap()),
                ..Default::default()
            })
        };
        (cx("victim"), cx("attacker"))
    }

    fn nse(url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: "nse-victim".into(),
            network_service_names: vec!["svc".into()],
            url: url.into(),
            ..Default::default()
        }
    }

    async fn found_urls(reg: &RegistryServer, cx: &mut Cx) -> Vec<String> {
        let template = NetworkServiceEndpoint {
            name: "nse-victim".into(),
            ..Default::default()
        };
        let found = reg.registries().nse.list(cx, template).await.unwrap();
        found.into_iter().map(|e| e.url).collect()
    }

    #[tokio::test]
    async fn with_policies_a_name_owned_by_another_identity_cannot_be_taken_over() {
        let (mut victim, mut attacker) = peers();
        let reg = registry_server_with(DEFAULT_EXPIRY, Some(PolicySet::defaults().unwrap()));
        let nse_chain = &reg.registries().nse;
        nse_chain
            .register(&mut victim, nse("tcp://victim:1"))
            .await
            .unwrap();
        let e = nse_chain
            .register(&mut attacker, nse("tcp://attacker:1"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let e = nse_chain
            .unregister(&mut attacker, nse(""))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert_eq!(found_urls(&reg, &mut attacker).await, ["tcp://victim:1"]);
        // The owner's refresh still works after the refused attempts.
        nse_chain
            .register(&mut victim, nse("tcp://victim:1"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn without_policies_the_registry_is_as_before() {
        let (mut victim, mut other) = peers();
        let reg = registry_server(DEFAULT_EXPIRY);
        let nse_chain = &reg.registries().nse;
        nse_chain
            .register(&mut victim, nse("tcp://victim:1"))
            .await
            .unwrap();
        nse_chain
            .register(&mut other, nse("tcp://other:1"))
            .await
            .unwrap();
        assert_eq!(found_urls(&reg, &mut other).await, ["tcp://other:1"]);
        // Calls without an identity are served too.
        nse_chain
            .unregister(&mut Cx::server(), nse(""))
            .await
            .unwrap();
    }
}
