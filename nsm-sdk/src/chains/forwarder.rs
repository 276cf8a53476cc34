//! The forwarder: the data plane of a node. It makes the client's side of the
//! connection (the server-side mechanism), picks the endpoint, and connects to it (a
//! local NSE, or the manager of the NSE's node).
//!
//! NetworkService chain: `update_path(name)`, `begin`,
//! [`after_begin`](ForwarderOptions::after_begin) handlers, `update_token`, `timeout`,
//! `monitor`, extra handlers ([`ForwarderOptions::handler`]; none by default),
//! `mechanisms` (server side, pluggable; NOOP by default), `discover`, `netsvc_monitor`
//! (the hop that selects the endpoint keeps it allowed by the network service),
//! `round_robin`, [`before_connect`](ForwarderOptions::before_connect) handlers, `connect` (a
//! client chain of `begin`, `monitor_relay`, `mechanism_translation`, client-side
//! mechanisms, `update_token`, the gRPC client).
//!
//! With [`policies`](ForwarderOptions::policies), `authorize_server` follows `update_token`, `authorize_client` precedes the client half's gRPC client, and MonitorConnection shows each subscriber only its own connections.
//!
//! `netns_owner` follows (`authorize_server`): a KERNEL mechanism's namespace is
//! accepted from the forwarder's own manager (the server at its manager URL, as the TLS
//! handshake proves it) and otherwise only from a local process that is in it or could
//! enter it itself.

use std::collections::HashMap;
use std::sync::Arc;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use tokio_util::sync::CancellationToken;

use super::security::Secured;
use super::Served;
use crate::core::rt::begin;
use crate::core::{Chain, Handler};
use crate::handlers::{
    authorize_client, authorize_server, connect, discover, mechanism_translation, mechanisms,
    monitor_relay, netns_owner, netsvc_monitor, noop_client, noop_server, round_robin, timeout,
    update_path, update_token, Mechanisms, Monitor,
};
use crate::registry::select::FORWARDER_SERVICE;
use crate::registry::{find_cache, watch_reconnect, Registries, RegistryChain};
use crate::transport::{grpc_client, grpc_registry, Services, Url};
use crate::wire::types;

/// What a forwarder is made of.
#[must_use]
pub struct ForwarderOptions {
    name: String,
    nsmgr_url: Url,
    root: CancellationToken,
    server_mechanisms: Mechanisms,
    client_mechanisms: Vec<Arc<dyn Handler>>,
    labels: HashMap<String, String>,
    handlers: Vec<Arc<dyn Handler>>,
    after_begin: Vec<Arc<dyn Handler>>,
    before_connect: Vec<Arc<dyn Handler>>,
    sec: Secured,
}

impl std::fmt::Debug for ForwarderOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwarderOptions")
            .field("name", &self.name)
            .field("nsmgr_url", &self.nsmgr_url)
            .field("labels", &self.labels)
            .field("handlers", &self.handlers.len())
            .finish()
    }
}

impl ForwarderOptions {
    /// A forwarder called `name` serving the manager at `nsmgr_url`, with the NOOP
    /// mechanism and the label `p2p=true`.
    pub fn new(name: impl Into<String>, nsmgr_url: Url) -> Self {
        ForwarderOptions {
            sec: Secured::default(),
            name: name.into(),
            nsmgr_url,
            root: CancellationToken::new(),
            server_mechanisms: mechanisms().with(types::NOOP, noop_server()),
            client_mechanisms: vec![Arc::new(noop_client())],
            labels: HashMap::from([("p2p".to_string(), "true".to_string())]),
            handlers: Vec::new(),
            after_begin: Vec::new(),
            before_connect: Vec::new(),
        }
    }

    secured_setters! {
        policies: "`authorize_server` after `update_token`, `authorize_client` before the gRPC client of its client half, and a MonitorConnection service that shows each subscriber only its own connections (`monitor::authorized`)",
        security: "a new channel pool (mTLS when secure; to share a pool, pass one made by [`Security::channels`](crate::chains::Security::channels) to `.channels` after this), signed path tokens, mTLS on its servers ([`Forwarder::services`]), and the authorize policies",
        channels
    }

    /// The server-side mechanisms (what the forwarder can make for its caller).
    pub fn server_mechanisms(mut self, m: Mechanisms) -> Self {
        self.server_mechanisms = m;
        self
    }

    /// The client-side mechanism handlers (what it offers the next hop).
    pub fn client_mechanisms(mut self, handlers: Vec<Arc<dyn Handler>>) -> Self {
        self.client_mechanisms = handlers;
        self
    }

    /// The labels it registers with (managers select forwarders by them).
    pub fn labels(mut self, labels: HashMap<String, String>) -> Self {
        self.labels = labels;
        self
    }

    handler_setters! {
        /// Inserts a handler right after `begin`: it sees each Request and Close that
        /// `begin` lets through (with the connection's handle in [`Cx::conn`](crate::Cx::conn)),
        /// before the chain's own handlers; handlers inserted here run in the order added.
        after_begin => after_begin,
        /// Inserts a handler right before `connect`: it sees the request once
        /// `round_robin` has picked the endpoint (its URL in [`Cx::ext`](crate::Cx::ext) as
        /// [`ClientUrl`](crate::transport::ClientUrl)), once per candidate tried.
        before_connect => before_connect,
        /// Appends a server-side handler right after `monitor` (before the mechanisms):
        /// it sees every Request and Close this forwarder's `begin` lets through (a test
        /// counter, say).
        handler => handlers,
    }
}

/// An assembled forwarder.
#[derive(Debug, Clone)]
pub struct Forwarder {
    name: String,
    served: Served,
    registries: Registries,
    labels: HashMap<String, String>,
}

impl Forwarder {
    /// The forwarder's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The NetworkService chain.
    pub fn chain(&self) -> &Chain {
        &self.served.chain
    }

    /// The registries it uses (its manager's front).
    pub fn registries(&self) -> &Registries {
        &self.registries
    }

    /// Its registration as an endpoint of the `forwarder` service at `url`.
    pub fn registration(&self, url: &Url) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: self.name.clone(),
            network_service_names: vec![FORWARDER_SERVICE.to_string()],
            network_service_labels: HashMap::from([(
                FORWARDER_SERVICE.to_string(),
                NetworkServiceLabels {
                    labels: self.labels.clone(),
                },
            )]),
            url: url.to_string(),
            ..Default::default()
        }
    }

    /// The gRPC services to serve: NetworkService and MonitorConnection.
    pub fn services(&self) -> Services {
        self.served.services_with(|s| s)
    }
}

/// The forwarder.
pub fn forwarder(opts: ForwarderOptions) -> Forwarder {
    let registries = Registries {
        ns: RegistryChain::<NetworkService>::builder()
            .push(watch_reconnect())
            .push(find_cache().root(opts.root.child_token()))
            .push(grpc_registry(
                opts.sec.channels.clone(),
                opts.nsmgr_url.clone(),
            ))
            .build(),
        nse: RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(watch_reconnect())
            .push(find_cache().root(opts.root.child_token()))
            .push(grpc_registry(
                opts.sec.channels.clone(),
                opts.nsmgr_url.clone(),
            ))
            .build(),
    };
    let monitor = Monitor::builder().shutdown(opts.root.clone()).build();
    let client = Chain::builder()
        .push(begin().root(opts.root.clone()))
        .push(monitor_relay(opts.sec.channels.clone()))
        .push(mechanism_translation())
        .extend(opts.client_mechanisms)
        .push(update_token(opts.sec.tokens.clone()))
        .push_opt(opts.sec.policies.clone().map(authorize_client))
        .push(grpc_client(opts.sec.channels.clone()))
        .build();
    let chain = Chain::builder()
        .push(update_path(opts.name.clone()))
        .push(begin().root(opts.root.clone()))
        .extend(opts.after_begin)
        .push(update_token(opts.sec.tokens.clone()))
        .push_opt(opts.sec.policies.clone().map(authorize_server))
        .push(netns_owner().trusting_server_at(opts.sec.channels.clone(), opts.nsmgr_url.clone()))
        .push(timeout())
        .push(monitor.clone())
        .extend(opts.handlers)
        .push(opts.server_mechanisms)
        .push(discover(registries.clone()))
        .push(netsvc_monitor(registries.clone()))
        .push(round_robin())
        .extend(opts.before_connect)
        .push(connect(client))
        .build();
    Forwarder {
        name: opts.name,
        served: Served::new(chain, monitor, &opts.sec),
        registries,
        labels: opts.labels,
    }
}
