//! The endpoint chain: what an NSE serves.
//!
//! `update_path(name)` (trimming a stale tail), `begin`,
//! [`after_begin`](EndpointOptions::after_begin) handlers, `update_token`, `timeout`
//! (close when the caller stops refreshing), `monitor`, then the application's handlers
//! ([`handler`](EndpointOptions::handler): IPAM, mechanisms, its own logic).
//!
//! With [`policies`](EndpointOptions::policies), `authorize_server` follows `update_token`, and MonitorConnection shows each subscriber only its own connections.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::security::Secured;
use super::Served;
use crate::core::rt::begin;
use crate::core::{Chain, Handler};
use crate::handlers::{authorize_server, timeout, update_path, update_token, Monitor};
use crate::transport::Services;

/// What an endpoint chain is made of.
#[derive(Clone)]
#[must_use]
pub struct EndpointOptions {
    handlers: Vec<Arc<dyn Handler>>,
    after_begin: Vec<Arc<dyn Handler>>,
    root: CancellationToken,
    sec: Secured,
}

impl std::fmt::Debug for EndpointOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointOptions")
            .field("handlers", &self.handlers.len())
            .finish()
    }
}

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            sec: Secured::default(),
            handlers: Vec::new(),
            after_begin: Vec::new(),
            root: CancellationToken::new(),
        }
    }
}

impl EndpointOptions {
    /// No handlers yet.
    pub fn new() -> Self {
        Self::default()
    }

    handler_setters! {
        /// Inserts a handler right after `begin`: it sees each Request and Close that
        /// `begin` lets through (with the connection's handle in [`Cx::conn`](crate::Cx::conn)),
        /// before the chain's own handlers; handlers inserted here run in the order added.
        after_begin => after_begin,
        /// Appends an application handler (after `monitor`, the end of the chain).
        handler => handlers,
    }

    secured_setters! {
        policies: "`authorize_server` after `update_token`, and a MonitorConnection service that shows each subscriber only its own connections (`monitor::authorized`)",
        security: "signed path tokens, mTLS on its servers ([`Endpoint::services`]) and the authorize policies"
    }

    /// Appends a shared application handler.
    pub fn handler_arc(mut self, handler: Arc<dyn Handler>) -> Self {
        self.handlers.push(handler);
        self
    }
}

/// An assembled endpoint: its chain and the monitor that feeds its MonitorConnection
/// service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    name: String,
    served: Served,
}

impl Endpoint {
    /// The endpoint's name (its path segment name and registered name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The NetworkService chain.
    pub fn chain(&self) -> &Chain {
        &self.served.chain
    }

    /// The monitor of the endpoint's connections.
    pub fn monitor(&self) -> &Monitor {
        &self.served.monitor
    }

    /// The gRPC services to serve: NetworkService and MonitorConnection.
    pub fn services(&self) -> Services {
        self.served.services_with(|s| s)
    }
}

/// The endpoint chain for the NSE called `name`.
pub fn endpoint(name: impl Into<String>, opts: EndpointOptions) -> Endpoint {
    let name = name.into();
    let monitor = Monitor::builder().shutdown(opts.root.clone()).build();
    let chain = Chain::builder()
        .push(update_path(name.clone()).trim_tail(true))
        .push(begin().root(opts.root))
        .extend(opts.after_begin)
        .push(update_token(opts.sec.tokens.clone()))
        .push_opt(opts.sec.policies.clone().map(authorize_server))
        .push(timeout())
        .push(monitor.clone())
        .extend(opts.handlers)
        .build();
    Endpoint {
        name,
        served: Served::new(chain, monitor, &opts.sec),
    }
}
