//! The client chain: what an NSC (or the client half of a passthrough NSE) uses to ask
//! its node's manager for a network service.
//!
//! `update_path(name)`, `begin`, [`after_begin`](ClientOptions::after_begin) handlers,
//! `refresh` (re-request before the path's tokens expire), `retry`, the application's
//! handlers ([`handler`](ClientOptions::handler)), `update_token`, mechanism
//! preferences, [`before_connect`](ClientOptions::before_connect) handlers, the
//! manager's URL, and the gRPC client.
//!
//! With [`policies`](ClientOptions::policies), `authorize_client` comes last before the manager's URL.

use std::sync::Arc;
use std::time::Duration;

use nsm_proto::connection::Mechanism;
use tokio_util::sync::CancellationToken;

use super::security::Secured;

use crate::core::rt::begin;
use crate::core::{Chain, Handler};
use crate::handlers::noop_mechanism;
use crate::handlers::{
    authorize_client, client_url, mechanism_preferences, refresh, retry, update_path, update_token,
};
use crate::transport::{grpc_client, Url};

/// What a client chain is made of.
#[derive(Clone)]
#[must_use]
pub struct ClientOptions {
    name: String,
    connect_to: Url,
    mechanisms: Vec<Mechanism>,
    retry: Option<Duration>,
    timeout: Duration,
    handlers: Vec<Arc<dyn Handler>>,
    after_begin: Vec<Arc<dyn Handler>>,
    before_connect: Vec<Arc<dyn Handler>>,
    root: CancellationToken,
    sec: Secured,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("name", &self.name)
            .field("connect_to", &self.connect_to)
            .field("mechanisms", &self.mechanisms)
            .field("retry", &self.retry)
            .finish()
    }
}

impl ClientOptions {
    /// A client called `name` that talks to the manager at `connect_to`, offering the
    /// NOOP mechanism, retrying for 15 s.
    pub fn new(name: impl Into<String>, connect_to: Url) -> Self {
        ClientOptions {
            sec: Secured::default(),
            name: name.into(),
            connect_to,
            mechanisms: vec![noop_mechanism()],
            retry: Some(Duration::from_secs(15)),
            timeout: crate::core::rt::begin::DEFAULT_TIMEOUT,
            handlers: Vec::new(),
            after_begin: Vec::new(),
            before_connect: Vec::new(),
            root: CancellationToken::new(),
        }
    }

    secured_setters! {
        policies: "`authorize_client` last before the manager's URL and the gRPC client, checking the path the manager returns",
        security: "a new channel pool (mTLS when secure; to share a pool, pass one made by [`Security::channels`](crate::chains::Security::channels) to `.channels` after this), signed path tokens, and the authorize policies",
        channels
    }

    /// The mechanisms offered, in order of preference.
    pub fn mechanisms(mut self, mechanisms: Vec<Mechanism>) -> Self {
        self.mechanisms = mechanisms;
        self
    }

    /// Retry retryable failures for up to `try_timeout` (`None`: no retry).
    pub fn retry(mut self, try_timeout: Option<Duration>) -> Self {
        self.retry = try_timeout;
        self
    }

    /// How long one operation may take when the caller gives no deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    handler_setters! {
        /// Adds an application handler (after `begin`, before the mechanisms).
        handler => handlers,
        /// Inserts a handler right after `begin`: it sees each Request and Close that
        /// `begin` lets through (with the connection's handle in [`Cx::conn`](crate::Cx::conn)),
        /// before the chain's own handlers; handlers inserted here run in the order added.
        after_begin => after_begin,
        /// Inserts a handler right before the request leaves for the manager (after
        /// `update_token` and the mechanism preferences): it sees the request as sent, and
        /// the manager's answer first.
        before_connect => before_connect,
    }
}

/// The client chain.
pub fn client(opts: ClientOptions) -> Chain {
    let retry = opts.retry.map(|t| retry().try_timeout(t));
    Chain::builder()
        .push(update_path(opts.name))
        .push(begin().root(opts.root).default_timeout(opts.timeout))
        .extend(opts.after_begin)
        .push(refresh())
        .push_opt(retry)
        .extend(opts.handlers)
        .push(update_token(opts.sec.tokens))
        .push(mechanism_preferences(opts.mechanisms))
        .extend(opts.before_connect)
        .push_opt(opts.sec.policies.map(authorize_client))
        .push(client_url(opts.connect_to))
        .push(grpc_client(opts.sec.channels))
        .build()
}
