//! Serving chains over gRPC: [`serve`] binds a [`Url`] and answers the NSM services a
//! [`Services`] names with their chains.
//!
//! Each call becomes a server-side [`Cx`](crate::Cx): the caller's address and token
//! (`nsm-client-token`, `nsm-client-token-expires`) in its
//! [`Peer`](crate::core::Peer), the deadline from `grpc-timeout`, and a tracing span
//! named after the method and connection. The chain's errors go back as gRPC statuses
//! with their codes.
//!
//! A [`Server`] ends in one of two ways. [`Server::kill`] (also what dropping it does)
//! is a crash: the listener closes and every accepted connection fails at once, so
//! peers see broken calls and streams right away; the URL is free again when `kill`
//! returns. [`Server::shutdown`] is graceful: no new connections, open streams end with
//! `Unavailable`, calls in flight finish.
//!
//! State: the listener (shared with the accept loop so `kill` can close it
//! synchronously), two tokens (graceful and kill) and the accept loop's task, which the
//! `Server` owns. Tonic runs each connection in a task of its own; those end when the
//! kill token breaks their I/O.

use std::fmt;
use std::sync::{Arc, Mutex};

use nsm_proto::connection::monitor_connection_server::MonitorConnectionServer;
use nsm_proto::ipam::ipam_server::IpamServer;
use nsm_proto::networkservice::network_service_server::NetworkServiceServer;
use nsm_proto::registry::network_service_endpoint_registry_server::NetworkServiceEndpointRegistryServer;
use nsm_proto::registry::network_service_registry_server::NetworkServiceRegistryServer;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tracing::{debug, info, warn, Instrument};

use super::edge::{IpamEdge, MonitorEdge, NetworkServiceEdge, RegistryEdge};
use super::listener::{bind, lock, Incoming, Listener};
use super::tls::Tls;
use crate::core::url::Url;
use crate::core::{Chain, MonitorSource};
use crate::ipam::PrefixServer;
use crate::registry::{Registries, RegistryChain};
use crate::Result;

/// The services a server answers; each is optional (a missing one answers
/// `Unimplemented`).
///
/// ```no_run
/// # use nsm_sdk::{Chain, transport::{serve, Services}};
/// # async fn demo(chain: Chain) -> nsm_sdk::Result<()> {
/// let server = serve(&"tcp://127.0.0.1:0".parse()?, Services::new().network_service(chain)).await?;
/// println!("listening on {}", server.url());
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct Services {
    network_service: Option<Chain>,
    monitor: Option<Arc<dyn MonitorSource>>,
    ns_registry: Option<RegistryChain<NetworkService>>,
    nse_registry: Option<RegistryChain<NetworkServiceEndpoint>>,
    ipam: Option<PrefixServer>,
    tls: Option<Tls>,
}

impl fmt::Debug for Services {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Services")
            .field("network_service", &self.network_service)
            .field("monitor", &self.monitor.is_some())
            .field("ns_registry", &self.ns_registry)
            .field("nse_registry", &self.nse_registry)
            .field("ipam", &self.ipam)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Services {
    /// No services yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers `networkservice.NetworkService` (Request, Close) with `chain`.
    pub fn network_service(mut self, chain: Chain) -> Self {
        self.network_service = Some(chain);
        self
    }

    /// Answers `connection.MonitorConnection` with streams from `source`.
    pub fn monitor(mut self, source: Arc<dyn MonitorSource>) -> Self {
        self.monitor = Some(source);
        self
    }

    /// Answers `registry.NetworkServiceRegistry` with `chain`.
    pub fn ns_registry(mut self, chain: RegistryChain<NetworkService>) -> Self {
        self.ns_registry = Some(chain);
        self
    }

    /// Answers `registry.NetworkServiceEndpointRegistry` with `chain`.
    pub fn nse_registry(mut self, chain: RegistryChain<NetworkServiceEndpoint>) -> Self {
        self.nse_registry = Some(chain);
        self
    }

    /// Answers `ipam.IPAM` (`ManagePrefixes`, the vL3 prefix server) from `server`.
    pub fn ipam(mut self, server: PrefixServer) -> Self {
        self.ipam = Some(server);
        self
    }

    /// Serves over mTLS with `tls`: every connection must present an SVID the trust
    /// bundle vouches for, and its identity is the [`Peer::identity`](crate::core::Peer)
    /// of every call on it. Without this the server speaks plaintext.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Answers both registries.
    pub fn registries(self, registries: Registries) -> Self {
        self.ns_registry(registries.ns).nse_registry(registries.nse)
    }
}

/// A running gRPC server. Dropping it kills it (see [`Server::kill`]).
#[must_use = "dropping a Server kills it"]
pub struct Server {
    url: Url,
    listener: Arc<Mutex<Option<Listener>>>,
    graceful: CancellationToken,
    killed: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("url", &self.url)
            .field("killed", &self.killed.is_cancelled())
            .field("shutting_down", &self.graceful.is_cancelled())
            .finish()
    }
}

impl Server {
    /// The URL the server listens on: for `tcp://host:0`, with the port it got.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Stops at once, like a killed process: the listener closes (a unix socket file is
    /// removed, an `inmem://` name freed) and every open connection breaks, so peers
    /// see errors and broken streams right away. The URL can be served again as soon
    /// as this returns. Idempotent.
    pub fn kill(&self) {
        if !self.killed.is_cancelled() {
            info!(url = %self.url, "server killed");
        }
        self.killed.cancel();
        self.graceful.cancel();
        drop(lock(&self.listener).take());
        if let Some(task) = &self.task {
            task.abort();
        }
    }

    /// Stops gracefully: no new connections; open streams (monitor, registry watches)
    /// end with `Unavailable`; returns when the calls in flight are done. Bound it with
    /// a timeout if a chain may hang: dropping the server then kills it.
    pub async fn shutdown(mut self) {
        info!(url = %self.url, "server shutting down");
        self.graceful.cancel();
        if let Some(task) = self.task.as_mut() {
            if let Err(e) = task.await {
                warn!(url = %self.url, error = %e, "server task failed");
            }
        }
        // Done: nothing left for drop to kill. (A shutdown dropped half way kills.)
        self.task = None;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.kill();
        }
    }
}

/// Serves `services` on `url`: `tcp://host:port` (port 0 picks one; TCP_NODELAY on
/// every accepted socket), `unix:///path` (parent directories are created, a stale
/// socket file replaced) or `inmem://name`.
///
/// Fails with [`Error::Unavailable`](crate::Error::Unavailable) when the address cannot be bound.
pub async fn serve(url: &Url, services: Services) -> Result<Server> {
    let (listener, url) = bind(url).await?;
    let listener = Arc::new(Mutex::new(Some(listener)));
    let graceful = CancellationToken::new();
    let killed = CancellationToken::new();

    let mut routes = Routes::default();
    if let Some(chain) = services.network_service {
        routes = routes.add_service(sized!(NetworkServiceServer::new(NetworkServiceEdge {
            chain
        })));
    }
    if let Some(source) = services.monitor {
        routes = routes.add_service(sized!(MonitorConnectionServer::new(MonitorEdge {
            source,
            graceful: graceful.clone(),
        })));
    }
    if let Some(chain) = services.ns_registry {
        routes = routes.add_service(sized!(NetworkServiceRegistryServer::new(RegistryEdge {
            chain,
            graceful: graceful.clone(),
        })));
    }
    if let Some(chain) = services.nse_registry {
        routes = routes.add_service(sized!(NetworkServiceEndpointRegistryServer::new(
            RegistryEdge {
                chain,
                graceful: graceful.clone(),
            }
        )));
    }

    if let Some(server) = services.ipam {
        routes = routes.add_service(sized!(IpamServer::new(IpamEdge {
            server,
            graceful: graceful.clone(),
        })));
    }

    let secure = services.tls.is_some();
    let incoming = Incoming::new(listener.clone(), killed.clone(), services.tls);
    let signal = graceful.clone().cancelled_owned();
    let span = tracing::info_span!("server", url = %url);
    let task = tokio::spawn(
        async move {
            let served = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, signal)
                .await;
            match served {
                Ok(()) => debug!("server stopped"),
                Err(e) => warn!(error = %e, "server failed"),
            }
        }
        .instrument(span),
    );
    info!(url = %url, mtls = secure, "serving");
    Ok(Server {
        url,
        listener,
        graceful,
        killed,
        task: Some(task),
    })
}
