//! [`ServeOptions`]: where a served component listens, which manager it registers
//! through, and how patient it is.

use std::collections::HashMap;
use std::time::Duration;

use crate::chains::Security;
use crate::transport::{Channels, Url};

/// Where a node's manager listens for the pods of its node, as NSM deployments mount it.
pub const DEFAULT_MANAGER_URL: &str = "unix:///var/lib/networkservicemesh/nsm.io.sock";
/// How long one registry call may take.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a component keeps trying to reach its manager when it starts (the manager
/// may be starting too).
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to finish the calls in flight when it stops (then it is
/// killed).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`serve_endpoint`](super::serve_endpoint) and
/// [`serve_forwarder`](super::serve_forwarder) need besides the component itself.
#[derive(Debug, Clone)]
#[must_use]
pub struct ServeOptions {
    pub(super) listen_on: Url,
    pub(super) connect_to: Url,
    pub(super) channels: Channels,
    pub(super) network_services: Vec<String>,
    pub(super) labels: HashMap<String, String>,
    pub(super) call_timeout: Duration,
    pub(super) startup_timeout: Duration,
    pub(super) shutdown_timeout: Duration,
}

impl ServeOptions {
    /// Listen on `listen_on` (`tcp://host:0` picks a port; the URL registered is the
    /// one served) and register through the manager at `connect_to`.
    pub fn new(listen_on: Url, connect_to: Url) -> Self {
        ServeOptions {
            listen_on,
            connect_to,
            channels: Channels::new(),
            network_services: Vec::new(),
            labels: HashMap::new(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }

    /// Adds a network service the endpoint serves (an endpoint needs at least one).
    pub fn network_service(mut self, name: impl Into<String>) -> Self {
        self.network_services.push(name.into());
        self
    }

    /// Adds network services the endpoint serves.
    pub fn network_services<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.network_services
            .extend(names.into_iter().map(Into::into));
        self
    }

    /// The labels the endpoint registers with, for each of its network services
    /// (clients and service matches select endpoints by them).
    pub fn labels(mut self, labels: HashMap<String, String>) -> Self {
        self.labels = labels;
        self
    }

    /// Shares this channel pool (one gRPC channel per peer in the process).
    pub fn channels(mut self, channels: Channels) -> Self {
        self.channels = channels;
        self
    }

    /// Registers over the links `security` makes: a new channel pool, mTLS when secure
    /// (what the served component's own servers use comes from its chain's options).
    pub fn security(mut self, security: &Security) -> Self {
        self.channels = security.channels();
        self
    }

    /// How long one registry call may take (default [`DEFAULT_CALL_TIMEOUT`]).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// How long to keep trying to reach the manager at start (default
    /// [`DEFAULT_STARTUP_TIMEOUT`]).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// How long the server may take to finish its calls when stopping (default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`]).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Where the component listens.
    pub fn listen_on(&self) -> &Url {
        &self.listen_on
    }

    /// The manager it registers through.
    pub fn connect_to(&self) -> &Url {
        &self.connect_to
    }
}
