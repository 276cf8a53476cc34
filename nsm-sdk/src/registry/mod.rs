//! The registry: one generic handler trait for network services and endpoints, chains
//! of registry handlers, query matching and stores.
//!
//! A registry chain has the same shape as a NetworkService chain ([`crate::core`]):
//! handlers call `next`, chains nest, and the end of the outermost chain answers
//! (Register returns the resource, Find an empty stream, Unregister Ok). Handlers are
//! written once, generic over the [`Resource`] (a `NetworkService` or a
//! `NetworkServiceEndpoint`), wherever the logic is the same.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use crate::core::{Cursor, Cx};
use crate::wire::bounds;
use crate::Result;

/// A registry entry: a network service or an endpoint.
pub trait Resource:
    prost::Message + Clone + Default + PartialEq + fmt::Debug + Send + Sync + 'static
{
    /// "network service" or "network service endpoint", for messages.
    const KIND: &'static str;
    /// The entry's name (its key in a registry).
    fn name(&self) -> &str;
    /// Sets the entry's name.
    fn set_name(&mut self, name: String);
    /// Checks the entry against the input bounds ([`crate::wire::bounds`]).
    fn check(&self) -> Result<()>;
    /// Whether registering `self` over `stored` (same name) changes nothing that is
    /// shared: then an identity that does not own the name may register it too,
    /// leaving the owner as it was. True only for a network service whose payload and
    /// matches are the same (every endpoint of a service registers the service, each
    /// through its own manager); an endpoint is always its owner's alone.
    fn same_definition(&self, _stored: &Self) -> bool {
        false
    }
}

impl Resource for NetworkService {
    const KIND: &'static str = "network service";
    fn name(&self) -> &str {
        &self.name
    }
    fn set_name(&mut self, name: String) {
        self.name = name;
    }
    fn check(&self) -> Result<()> {
        bounds::check_ns(self)
    }
    fn same_definition(&self, stored: &Self) -> bool {
        self.name == stored.name && self.payload == stored.payload && self.matches == stored.matches
    }
}

impl Resource for NetworkServiceEndpoint {
    const KIND: &'static str = "network service endpoint";
    fn name(&self) -> &str {
        &self.name
    }
    fn set_name(&mut self, name: String) {
        self.name = name;
    }
    fn check(&self) -> Result<()> {
        bounds::check_nse(self)
    }
}

/// A Find: a template (empty fields match anything) and whether to keep watching.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query<R> {
    /// What to match.
    pub template: R,
    /// Keep the stream open and send later changes.
    pub watch: bool,
}

/// One item of a Find stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Found<R> {
    /// The entry.
    pub resource: R,
    /// The entry was removed (unregistered or expired).
    pub deleted: bool,
}

/// The answer to a Find.
pub type FindStream<R> = BoxStream<'static, Result<Found<R>>>;

/// One element of a registry chain for resource `R`.
#[async_trait]
pub trait RegistryHandler<R: Resource>: Send + Sync + 'static {
    /// Registers (or refreshes) `r`; returns the entry as stored.
    async fn register(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<R> {
        next.register(cx, r).await
    }
    /// Finds the entries matching the query.
    async fn find(
        &self,
        cx: &mut Cx,
        query: Query<R>,
        next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        next.find(cx, query).await
    }
    /// Removes `r`.
    async fn unregister(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<()> {
        next.unregister(cx, r).await
    }
}

/// The rest of a registry chain.
pub type RegistryNext<R> = Cursor<dyn RegistryHandler<R>>;

impl<R: Resource> Cursor<dyn RegistryHandler<R>> {
    /// Passes a Register on; at the end the resource is the answer.
    pub async fn register(self, cx: &mut Cx, r: R) -> Result<R> {
        match self.step() {
            Some((h, next)) => h.register(cx, r, next).await,
            None => Ok(r),
        }
    }
    /// Passes a Find on; at the end the answer is an empty stream.
    pub async fn find(self, cx: &mut Cx, query: Query<R>) -> Result<FindStream<R>> {
        match self.step() {
            Some((h, next)) => h.find(cx, query, next).await,
            None => Ok(Box::pin(futures::stream::empty())),
        }
    }
    /// Passes an Unregister on; at the end it succeeds.
    pub async fn unregister(self, cx: &mut Cx, r: R) -> Result<()> {
        match self.step() {
            Some((h, next)) => h.unregister(cx, r, next).await,
            None => Ok(()),
        }
    }
}

/// A chain of registry handlers for resource `R`; itself a handler, so chains nest.
pub struct RegistryChain<R: Resource> {
    handlers: Arc<[Arc<dyn RegistryHandler<R>>]>,
}

impl<R: Resource> Clone for RegistryChain<R> {
    fn clone(&self) -> Self {
        RegistryChain {
            handlers: self.handlers.clone(),
        }
    }
}

impl<R: Resource> fmt::Debug for RegistryChain<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryChain")
            .field("kind", &R::KIND)
            .field("len", &self.handlers.len())
            .finish()
    }
}

impl<R: Resource> RegistryChain<R> {
    /// Starts building a chain.
    pub fn builder() -> RegistryChainBuilder<R> {
        RegistryChainBuilder {
            handlers: Vec::new(),
        }
    }

    fn cursor(&self) -> RegistryNext<R> {
        Cursor::new(self.handlers.clone(), None)
    }

    /// Registers through the chain.
    pub async fn register(&self, cx: &mut Cx, r: R) -> Result<R> {
        self.cursor().register(cx, r).await
    }

    /// Finds through the chain.
    pub async fn find(&self, cx: &mut Cx, query: Query<R>) -> Result<FindStream<R>> {
        self.cursor().find(cx, query).await
    }

    /// Unregisters through the chain.
    pub async fn unregister(&self, cx: &mut Cx, r: R) -> Result<()> {
        self.cursor().unregister(cx, r).await
    }

    /// Finds without watching and collects the entries that are not deleted.
    pub async fn list(&self, cx: &mut Cx, template: R) -> Result<Vec<R>> {
        use futures::StreamExt;
        let mut stream = self
            .find(
                cx,
                Query {
                    template,
                    watch: false,
                },
            )
            .await?;
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let item = item?;
            if !item.deleted {
                out.push(item.resource);
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl<R: Resource> RegistryHandler<R> for RegistryChain<R> {
    async fn register(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<R> {
        Cursor::new(self.handlers.clone(), Some(next))
            .register(cx, r)
            .await
    }
    async fn find(
        &self,
        cx: &mut Cx,
        query: Query<R>,
        next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        Cursor::new(self.handlers.clone(), Some(next))
            .find(cx, query)
            .await
    }
    async fn unregister(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<()> {
        Cursor::new(self.handlers.clone(), Some(next))
            .unregister(cx, r)
            .await
    }
}

/// Builds a [`RegistryChain`].
#[must_use]
pub struct RegistryChainBuilder<R: Resource> {
    handlers: Vec<Arc<dyn RegistryHandler<R>>>,
}

impl<R: Resource> fmt::Debug for RegistryChainBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryChainBuilder")
            .field("len", &self.handlers.len())
            .finish()
    }
}

impl<R: Resource> RegistryChainBuilder<R> {
    /// Appends a handler.
    pub fn push(mut self, h: impl RegistryHandler<R>) -> Self {
        self.handlers.push(Arc::new(h));
        self
    }
    /// Appends a shared handler.
    pub fn push_arc(mut self, h: Arc<dyn RegistryHandler<R>>) -> Self {
        self.handlers.push(h);
        self
    }
    /// Appends a handler when there is one.
    pub fn push_opt(self, h: Option<impl RegistryHandler<R>>) -> Self {
        match h {
            Some(h) => self.push(h),
            None => self,
        }
    }
    /// The chain.
    pub fn build(self) -> RegistryChain<R> {
        RegistryChain {
            handlers: self.handlers.into(),
        }
    }
}

/// Both registries a component talks to: network services and endpoints.
#[derive(Debug, Clone)]
pub struct Registries {
    /// The network service registry chain.
    pub ns: RegistryChain<NetworkService>,
    /// The endpoint registry chain.
    pub nse: RegistryChain<NetworkServiceEndpoint>,
}

pub mod select;

pub mod authorize;
pub mod domain_names;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod expire;
pub mod interdomain_route;
pub mod local_bypass;
pub mod memory;
pub mod query;
pub mod registry_proxy;
pub mod validate;

pub use authorize::{authorize, Authorize};
pub use domain_names::DomainNames;
#[cfg(feature = "etcd")]
pub use etcd::{Etcd, EtcdConfig, EtcdResource, EtcdStore, EtcdTls};
pub use expire::{expire, Expire, ExpiryCleanup, DEFAULT_EXPIRATION};
pub use interdomain_route::{interdomain_route, InterdomainRoute};
pub use local_bypass::{local_bypass, LocalBypass};
pub use memory::{memory, Memory, Stored};
pub use query::Matches;
pub use registry_proxy::{registry_proxy, RegistryProxy, RemoteRegistries};
pub use validate::{validate, Validate};
pub mod registry_refresh;
pub use registry_refresh::{registry_refresh, RegistryRefresh};
pub mod find_cache;
pub use find_cache::{find_cache, FindCache};
pub mod watch_reconnect;
pub use watch_reconnect::{watch_reconnect, WatchReconnect};
