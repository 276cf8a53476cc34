//! The node manager: picks a local forwarder for each connection and is its node's
//! registry front.
//!
//! NetworkService chain: `update_path(name)`, `begin`,
//! [`after_begin`](NsmgrOptions::after_begin) handlers, `update_token`, `timeout`,
//! `monitor`, [`handler`](NsmgrOptions::handler)s, `filter_mechanisms` (a request from
//! another node's forwarder keeps only its REMOTE preferences, any other only LOCAL
//! ones), `discover_forwarder`, [`before_connect`](NsmgrOptions::before_connect)
//! handlers, `connect` (a client
//! chain of `begin`, `monitor_relay`, `update_token` and the gRPC client).
//! Registry: endpoints registered through it (local NSEs and forwarders) are stored
//! upstream under the manager's own URL (`local_bypass`) and resolved back to their
//! local URL for local use; network services pass through. Watching Finds to the
//! registry reconnect by themselves when it restarts (`watch_reconnect`); repeated
//! Finds are answered from memory kept current by one watch per query (`find_cache`).
//!
//! With [`policies`](NsmgrOptions::policies), `authorize_server` follows `update_token`, `authorize_client` precedes the client half's gRPC client, MonitorConnection shows each subscriber only its own connections, and the registry front keeps each endpoint name for the identity that registered it (`registry::authorize`; network services are registered by every endpoint that serves them and stay shared).
//!
//! `netns_inode` and `netns_owner` follow (`authorize_server`): a local client in a pid
//! namespace of its own has its namespace found by its inode (`netnsInode`), and a
//! local client may name in a KERNEL mechanism only a network namespace it is in or
//! could enter itself.

use std::sync::Arc;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tokio_util::sync::CancellationToken;

use super::security::Secured;
use super::Served;
use crate::core::rt::begin;
use crate::core::{Chain, Handler};
use crate::handlers::{
    authorize_client, authorize_server, connect, discover_forwarder, filter_mechanisms,
    monitor_relay, netns_inode, netns_owner, timeout, update_path, update_token, Monitor,
};
use crate::registry::{
    authorize as registry_authorize, find_cache, local_bypass, validate, watch_reconnect,
    Registries, RegistryChain,
};
use crate::transport::{grpc_client, grpc_registry, RegistryUrls, Services, Url};

/// What a manager is made of.
#[derive(Clone)]
#[must_use]
pub struct NsmgrOptions {
    name: String,
    url: Url,
    registry_urls: RegistryUrls,
    root: CancellationToken,
    after_begin: Vec<Arc<dyn Handler>>,
    handlers: Vec<Arc<dyn Handler>>,
    before_connect: Vec<Arc<dyn Handler>>,
    sec: Secured,
}

impl std::fmt::Debug for NsmgrOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsmgrOptions")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("registry_urls", &self.registry_urls.to_string())
            .finish()
    }
}

impl NsmgrOptions {
    /// A manager called `name`, reachable at `url` (what it registers upstream), using the
    /// registry at `registry`: one [`Url`] or a [`RegistryUrls`] list of replicas, which
    /// its registry client fails over between (a call or watch that meets an
    /// unavailable replica goes on to the next; see
    /// [`grpc_registry`](crate::transport::grpc_registry)).
    pub fn new(name: impl Into<String>, url: Url, registry: impl Into<RegistryUrls>) -> Self {
        NsmgrOptions {
            sec: Secured::default(),
            name: name.into(),
            url,
            registry_urls: registry.into(),
            root: CancellationToken::new(),
            after_begin: Vec::new(),
            handlers: Vec::new(),
            before_connect: Vec::new(),
        }
    }

    secured_setters! {
        policies: "`authorize_server` after `update_token`, `authorize_client` before the gRPC client of its client half, and a MonitorConnection service that shows each subscriber only its own connections (`monitor::authorized`)",
        security: "a new channel pool (mTLS when secure; to share a pool, pass one made by [`Security::channels`](crate::chains::Security::channels) to `.channels` after this), signed path tokens, mTLS on its servers ([`Nsmgr::services`]), and the authorize policies",
        channels
    }

    handler_setters! {
        /// Inserts a handler right after `begin`: it sees each Request and Close that
        /// `begin` lets through (with the connection's handle in [`Cx::conn`](crate::Cx::conn)),
        /// before the chain's own handlers; handlers inserted here run in the order added.
        after_begin => after_begin,
        /// Appends a handler right after `monitor` (before the forwarder is picked): it
        /// sees every Request and Close of the manager's connections, with this hop's path
        /// segment and token in place.
        handler => handlers,
        /// Inserts a handler right before `connect`: it sees the request once
        /// `discover_forwarder` has picked a forwarder (its URL in [`Cx::ext`](crate::Cx::ext)
        /// as [`ClientUrl`](crate::transport::ClientUrl)).
        before_connect => before_connect,
    }
}

/// An assembled manager.
#[derive(Debug, Clone)]
pub struct Nsmgr {
    name: String,
    url: Url,
    served: Served,
    registries: Registries,
}

impl Nsmgr {
    /// The manager's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL the manager is reachable at.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The NetworkService chain.
    pub fn chain(&self) -> &Chain {
        &self.served.chain
    }

    /// The node's registry front (what local NSEs and forwarders register with).
    pub fn registries(&self) -> &Registries {
        &self.registries
    }

    /// The gRPC services to serve: NetworkService, MonitorConnection and both
    /// registries.
    pub fn services(&self) -> Services {
        self.served.services_with(|s| {
            s.ns_registry(self.registries.ns.clone())
                .nse_registry(self.registries.nse.clone())
        })
    }
}

/// The manager.
pub fn nsmgr(opts: NsmgrOptions) -> Nsmgr {
    // Endpoint names registered through this manager belong to the identity that
    // registered them here: the registry behind it sees only the manager's identity for
    // all of them. Network services are shared: every endpoint of a service registers it.
    let owners = || {
        opts.sec
            .policies
            .as_ref()
            .map(|p| registry_authorize((**p).clone()))
    };
    let registries = Registries {
        ns: RegistryChain::<NetworkService>::builder()
            .push(validate())
            .push(watch_reconnect())
            .push(find_cache().root(opts.root.child_token()))
            .push(grpc_registry(
                opts.sec.channels.clone(),
                opts.registry_urls.clone(),
            ))
            .build(),
        nse: RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(validate())
            .push_opt(owners())
            .push(local_bypass(opts.url.clone()))
            .push(watch_reconnect())
            .push(find_cache().root(opts.root.child_token()))
            .push(grpc_registry(
                opts.sec.channels.clone(),
                opts.registry_urls.clone(),
            ))
            .build(),
    };
    let monitor = Monitor::builder().shutdown(opts.root.clone()).build();
    let client = Chain::builder()
        .push(begin().root(opts.root.clone()))
        .push(monitor_relay(opts.sec.channels.clone()))
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
        .push(netns_inode())
        .push(netns_owner())
        .push(timeout())
        .push(monitor.clone())
        .extend(opts.handlers)
        .push(filter_mechanisms())
        .push(discover_forwarder(registries.clone(), opts.url.clone()))
        .extend(opts.before_connect)
        .push(connect(client))
        .build();
    Nsmgr {
        name: opts.name,
        url: opts.url,
        served: Served::new(chain, monitor, &opts.sec),
        registries,
    }
}
