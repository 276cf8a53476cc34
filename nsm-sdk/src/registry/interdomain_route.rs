//! `interdomain_route`: a domain's registry hands what concerns other domains to its
//! registry proxy.
//!
//! What it does: a Register, Find or Unregister whose entry (or query template) names
//! another domain (`name@domain`, or an endpoint serving `service@domain`; see
//! [`DomainNames::domain`]) goes to the given registries (a client of the registry
//! proxy) instead of on down this chain; everything else passes on.
//!
//! State: none.
//!
//! Failure handled: none of its own; the proxy's errors (a domain not found by DNS is
//! NotFound, an unreachable one Unavailable) reach the caller as they are.

use async_trait::async_trait;

use super::domain_names::DomainNames;
use super::{FindStream, Query, Registries, RegistryHandler, RegistryNext};
use crate::core::Cx;
use crate::Result;

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct InterdomainRoute {
    proxy: Registries,
}

/// The `interdomain_route` handler, sending interdomain entries and queries to `proxy`.
pub fn interdomain_route(proxy: Registries) -> InterdomainRoute {
    InterdomainRoute { proxy }
}

#[async_trait]
impl<R: DomainNames> RegistryHandler<R> for InterdomainRoute {
    async fn register(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<R> {
        match r.domain() {
            Some(_) => R::chain(&self.proxy).register(cx, r).await,
            None => next.register(cx, r).await,
        }
    }

    async fn find(
        &self,
        cx: &mut Cx,
        query: Query<R>,
        next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        match query.template.domain() {
            Some(_) => R::chain(&self.proxy).find(cx, query).await,
            None => next.find(cx, query).await,
        }
    }

    async fn unregister(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<()> {
        match r.domain() {
            Some(_) => R::chain(&self.proxy).unregister(cx, r).await,
            None => next.unregister(cx, r).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::registry_proxy::test_support::store;
    use crate::registry::RegistryChain;
    use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

    #[tokio::test]
    async fn interdomain_names_go_to_the_proxy_and_local_ones_stay() {
        let (local, proxy) = (store(), store());
        let chain = Registries {
            ns: RegistryChain::builder()
                .push(interdomain_route(proxy.clone()))
                .push(local.ns.clone())
                .build(),
            nse: RegistryChain::builder()
                .push(interdomain_route(proxy.clone()))
                .push(local.nse.clone())
                .build(),
        };
        let cx = &mut Cx::client();
        for name in ["here", "there@c2"] {
            chain
                .ns
                .register(
                    cx,
                    NetworkService {
                        name: name.into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
        let nse = NetworkServiceEndpoint {
            name: "nse".into(),
            network_service_names: vec!["svc@floating".into()],
            url: "tcp://1.1.1.1:1".into(),
            ..Default::default()
        };
        chain.nse.register(cx, nse.clone()).await.unwrap();
        let names = |v: Vec<NetworkService>| v.into_iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(
            names(local.ns.list(cx, Default::default()).await.unwrap()),
            ["here"]
        );
        assert_eq!(
            names(proxy.ns.list(cx, Default::default()).await.unwrap()),
            ["there@c2"]
        );
        assert_eq!(
            proxy.nse.list(cx, Default::default()).await.unwrap().len(),
            1
        );
        assert!(local
            .nse
            .list(cx, Default::default())
            .await
            .unwrap()
            .is_empty());
        // A Find by an interdomain service goes to the proxy, too.
        let q = NetworkServiceEndpoint {
            network_service_names: vec!["svc@floating".into()],
            ..Default::default()
        };
        assert_eq!(chain.nse.list(cx, q).await.unwrap().len(), 1);
        chain.nse.unregister(cx, nse).await.unwrap();
        assert!(proxy
            .nse
            .list(cx, Default::default())
            .await
            .unwrap()
            .is_empty());
    }
}
