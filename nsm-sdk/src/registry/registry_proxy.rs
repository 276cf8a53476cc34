//! `registry_proxy`: the registry proxy of a domain, between its registry and the
//! registries of other domains (clusters, or floating registries).
//!
//! What it does, for an entry or query naming another domain `D` (`x@D`):
//! - finds `D`'s registry ([`RemoteRegistries`], by DNS in programs:
//!   `registry.nsm-system.<D>`), strips `@D` from every name of the entry or query
//!   ([`DomainNames`]) and forwards it there;
//! - adds `@D` back to every name of what comes back (Find results, watch updates and
//!   deletions, the stored registration), so the callers of this domain only ever see
//!   interdomain names;
//! - endpoints: with a [`nsmgr_proxy_url`](RegistryProxy::nsmgr_proxy_url), an endpoint
//!   found in another domain is handed out with this domain's nsmgr-proxy URL (the
//!   domain's border for Requests, which finds the real one itself); an endpoint
//!   registered from this domain into a floating registry is registered there with
//!   that same public URL (so other domains reach it through this domain's
//!   nsmgr-proxy), and handed back to this domain's own lookups with the URL it was
//!   registered with here (its node's manager), so this domain reaches it directly.
//!
//! Anything without another domain passes on (to nothing, in a proxy of its own).
//!
//! State: the endpoints registered through this proxy: (domain, name there) -> the URL
//! they registered with here. Forgotten on Unregister; lost with the process (the
//! endpoints' next registration refresh fills it again).
//!
//! Failure handled: a domain that cannot be found is the resolver's NotFound or
//! Unavailable, returned as is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use super::domain_names::DomainNames;
use super::{FindStream, Query, Registries, RegistryHandler, RegistryNext};
use crate::core::Cx;
use crate::Result;

/// Finds the registries of another domain.
#[async_trait]
pub trait RemoteRegistries: Send + Sync + 'static {
    /// A client of `domain`'s registry.
    async fn registries(&self, domain: &str) -> Result<Registries>;
}

type Registered = Arc<Mutex<HashMap<(String, String), String>>>;

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct RegistryProxy {
    remote: Arc<dyn RemoteRegistries>,
    nsmgr_proxy_url: Option<String>,
    registered: Registered,
}

impl std::fmt::Debug for RegistryProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryProxy")
            .field("nsmgr_proxy_url", &self.nsmgr_proxy_url)
            .finish()
    }
}

/// The `registry_proxy` handler over `remote`. One value serves both resources (clone
/// it into the network service and the endpoint chain).
pub fn registry_proxy(remote: Arc<dyn RemoteRegistries>) -> RegistryProxy {
    RegistryProxy {
        remote,
        nsmgr_proxy_url: None,
        registered: Arc::default(),
    }
}

impl RegistryProxy {
    /// The public URL of this domain's nsmgr-proxy: what endpoints of other domains are
    /// handed out with, and what this domain's endpoints register into floating
    /// registries with.
    pub fn nsmgr_proxy_url(mut self, url: impl Into<String>) -> Self {
        self.nsmgr_proxy_url = Some(url.into());
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What differs between the two resources: only endpoints have URLs.
trait Urls: DomainNames {
    /// Before forwarding a registration of `self` to `domain`: the URL it had here.
    fn outbound(&mut self, _proxy: &RegistryProxy) -> Option<String> {
        None
    }
    /// After: remembers or forgets the registration, and gives the original URL back.
    fn registered(&mut self, _proxy: &RegistryProxy, _domain: &str, _original: Option<String>) {}
    /// On an entry found in `domain` (its names still remote).
    fn inbound(&mut self, _proxy: &RegistryProxy, _domain: &str) {}
    /// On Unregister.
    fn forget(&self, _proxy: &RegistryProxy, _domain: &str) {}
}

impl Urls for NetworkService {}

impl Urls for NetworkServiceEndpoint {
    fn outbound(&mut self, proxy: &RegistryProxy) -> Option<String> {
        let public = proxy.nsmgr_proxy_url.clone()?;
        Some(std::mem::replace(&mut self.url, public))
    }
    fn registered(&mut self, proxy: &RegistryProxy, domain: &str, original: Option<String>) {
        if let Some(original) = original {
            proxy
                .lock()
                .insert((domain.to_string(), self.name.clone()), original.clone());
            self.url = original;
        }
    }
    fn inbound(&mut self, proxy: &RegistryProxy, domain: &str) {
        let Some(public) = &proxy.nsmgr_proxy_url else {
            return;
        };
        let own = (self.url == *public)
            .then(|| {
                proxy
                    .lock()
                    .get(&(domain.to_string(), self.name.clone()))
                    .cloned()
            })
            .flatten();
        self.url = own.unwrap_or_else(|| public.clone());
    }
    fn forget(&self, proxy: &RegistryProxy, domain: &str) {
        proxy
            .lock()
            .remove(&(domain.to_string(), self.name.clone()));
    }
}

#[async_trait]
impl<R: Urls> RegistryHandler<R> for RegistryProxy {
    async fn register(&self, cx: &mut Cx, mut r: R, next: RegistryNext<R>) -> Result<R> {
        let Some(domain) = r.domain() else {
            return next.register(cx, r).await;
        };
        let remote = self.remote.registries(&domain).await?;
        r.strip_domain(&domain);
        let original = r.outbound(self);
        let mut out = R::chain(&remote).register(cx, r).await?;
        out.registered(self, &domain, original);
        out.add_domain(&domain);
        Ok(out)
    }

    async fn find(
        &self,
        cx: &mut Cx,
        mut query: Query<R>,
        next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        let Some(domain) = query.template.domain() else {
            return next.find(cx, query).await;
        };
        let remote = self.remote.registries(&domain).await?;
        query.template.strip_domain(&domain);
        let stream = R::chain(&remote).find(cx, query).await?;
        let proxy = self.clone();
        Ok(Box::pin(stream.map(move |item| {
            item.map(|mut found| {
                found.resource.inbound(&proxy, &domain);
                found.resource.add_domain(&domain);
                found
            })
        })))
    }

    async fn unregister(&self, cx: &mut Cx, mut r: R, next: RegistryNext<R>) -> Result<()> {
        let Some(domain) = r.domain() else {
            return next.unregister(cx, r).await;
        };
        let remote = self.remote.registries(&domain).await?;
        r.strip_domain(&domain);
        r.forget(self, &domain);
        let _ = r.outbound(self);
        R::chain(&remote).unregister(cx, r).await
    }
}

/// Test scaffolding shared with the border's tests: domains as in-process stores.
#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::HashMap;

    use async_trait::async_trait;

    use super::RemoteRegistries;
    use crate::registry::{memory, Registries, RegistryChain};
    use crate::{Error, Result};

    /// Domains by name, each a store.
    pub(crate) struct Domains(pub(crate) HashMap<String, Registries>);

    #[async_trait]
    impl RemoteRegistries for Domains {
        async fn registries(&self, domain: &str) -> Result<Registries> {
            self.0
                .get(domain)
                .cloned()
                .ok_or_else(|| Error::not_found(format!("no domain {domain}")))
        }
    }

    /// A registry in memory.
    pub(crate) fn store() -> Registries {
        Registries {
            ns: RegistryChain::builder().push(memory()).build(),
            nse: RegistryChain::builder().push(memory()).build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{store, Domains};
    use super::*;
    use crate::registry::RegistryChain;

    fn proxy_of(domains: &[(&str, &Registries)], public: &str) -> Registries {
        let remote = Arc::new(Domains(
            domains
                .iter()
                .map(|(d, r)| (d.to_string(), (*r).clone()))
                .collect(),
        ));
        let p = registry_proxy(remote).nsmgr_proxy_url(public);
        Registries {
            ns: RegistryChain::builder().push(p.clone()).build(),
            nse: RegistryChain::builder().push(p).build(),
        }
    }

    fn nse(name: &str, service: &str, url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: [service]
                .into_iter()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            url: url.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn finds_strip_the_domain_and_results_get_it_back_with_our_border() {
        let c2 = store();
        let cx = &mut Cx::client();
        c2.nse
            .register(cx, nse("final", "ns", "tcp://10.0.2.1:5001"))
            .await
            .unwrap();
        let p1 = proxy_of(&[("c2", &c2)], "tcp://198.51.100.1:5005");
        let q = NetworkServiceEndpoint {
            network_service_names: vec!["ns@c2".into()],
            ..Default::default()
        };
        let found = p1.nse.list(cx, q).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "final@c2");
        assert_eq!(found[0].network_service_names, ["ns@c2"]);
        assert_eq!(found[0].url, "tcp://198.51.100.1:5005", "our nsmgr-proxy");
        let err = p1.nse.list(cx, nse("x@nowhere", "", "")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn a_floating_registration_is_public_there_and_direct_here() {
        let floating = store();
        let cx = &mut Cx::client();
        let p2 = proxy_of(&[("floating", &floating)], "tcp://198.51.100.2:5005");
        let out = p2
            .nse
            .register(cx, nse("final@floating", "ns", "inmem://nsmgr-2"))
            .await
            .unwrap();
        assert_eq!(out.name, "final@floating");
        assert_eq!(out.url, "inmem://nsmgr-2");
        let stored = floating.nse.list(cx, Default::default()).await.unwrap();
        assert_eq!(stored[0].name, "final");
        assert_eq!(stored[0].url, "tcp://198.51.100.2:5005");
        // This domain gets its manager's URL back; another domain its own border.
        let here = p2
            .nse
            .list(cx, nse("final@floating", "", ""))
            .await
            .unwrap();
        assert_eq!(here[0].url, "inmem://nsmgr-2");
        let p1 = proxy_of(&[("floating", &floating)], "tcp://198.51.100.1:5005");
        let there = p1
            .nse
            .list(cx, nse("final@floating", "", ""))
            .await
            .unwrap();
        assert_eq!(there[0].url, "tcp://198.51.100.1:5005");
        p2.nse
            .unregister(cx, nse("final@floating", "ns", "inmem://nsmgr-2"))
            .await
            .unwrap();
        assert!(floating
            .nse
            .list(cx, Default::default())
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn services_and_watches_are_renamed_too() {
        let c2 = store();
        let cx = &mut Cx::client();
        let p1 = proxy_of(&[("c2", &c2)], "tcp://198.51.100.1:5005");
        p1.ns
            .register(
                cx,
                NetworkService {
                    name: "ns@c2".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            c2.ns.list(cx, Default::default()).await.unwrap()[0].name,
            "ns"
        );
        let mut watch = p1
            .nse
            .find(
                cx,
                Query {
                    template: nse("", "ns@c2", ""),
                    watch: true,
                },
            )
            .await
            .unwrap();
        c2.nse
            .register(cx, nse("late", "ns", "tcp://10.0.2.1:5001"))
            .await
            .unwrap();
        let item = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(item.resource.name, "late@c2");
    }
}
