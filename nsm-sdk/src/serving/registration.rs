//! Staying registered: a component registers through its node's manager (retrying while
//! the manager starts), [`registry_refresh`](mod@crate::registry::registry_refresh) keeps the entry from expiring, and the
//! component unregisters when it stops.

use std::future::Future;
use std::time::Duration;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::options::{DEFAULT_CALL_TIMEOUT, DEFAULT_STARTUP_TIMEOUT};
use crate::registry::{registry_refresh, Registries, RegistryChain, RegistryRefresh};
use crate::transport::{grpc_registry, Channels, Url};
use crate::wire::payload;
use crate::{Cx, Error, Result};

/// Pause between two tries of a failed registry call at start.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// How long calls may take, and how long to keep trying at start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patience {
    pub(crate) call: Duration,
    pub(crate) startup: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Patience {
            call: DEFAULT_CALL_TIMEOUT,
            startup: DEFAULT_STARTUP_TIMEOUT,
        }
    }
}

impl Patience {
    fn cx(&self) -> Cx {
        Cx::client().with_timeout(self.call)
    }
}

/// Plain gRPC registry clients of the registry served at `url` (a node manager's or the
/// registry's own).
pub fn registry_client(channels: &Channels, url: &Url) -> Registries {
    Registries {
        ns: RegistryChain::<NetworkService>::builder()
            .push(grpc_registry(channels.clone(), url.clone()))
            .build(),
        nse: RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(channels.clone(), url.clone()))
            .build(),
    }
}

/// `e` with `what` in front of its message, of the same kind (same gRPC code).
pub(crate) fn context(e: Error, what: &str) -> Error {
    e.prefixed(&format!("{what}: "))
}

/// Runs `call` until it succeeds, fails with an error that is not retryable, or
/// `timeout` passes (then the last error, prefixed with `what`); `Ok(None)` when `stop`
/// is cancelled first. For the first calls of a program, whose peers may be starting
/// too.
pub async fn retry_startup<T, F, Fut>(
    what: &str,
    timeout: Duration,
    stop: &CancellationToken,
    mut call: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let give_up = tokio::time::Instant::now() + timeout;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            outcome = call() => outcome,
        };
        match outcome {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < give_up => {
                debug!(error = %e, "{what} failed; trying again");
            }
            Err(e) => return Err(context(e, &format!("{what} failed"))),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(RETRY_INTERVAL) => {}
        }
    }
}

/// Registers the network service `name` (payload IP) through `registry` unless it
/// already has one by that name, retrying while the registry cannot be reached (for up
/// to [`DEFAULT_STARTUP_TIMEOUT`]). Network services are left registered on exit: other
/// endpoints may serve them. `Ok(false)` when `stop` came first.
pub async fn ensure_network_service(
    registry: &RegistryChain<NetworkService>,
    name: &str,
    stop: &CancellationToken,
) -> Result<bool> {
    ensure_with(registry, name, stop, Patience::default()).await
}

pub(crate) async fn ensure_with(
    registry: &RegistryChain<NetworkService>,
    name: &str,
    stop: &CancellationToken,
    patience: Patience,
) -> Result<bool> {
    let template = NetworkService {
        name: name.to_string(),
        ..Default::default()
    };
    let what = format!("looking up network service {name}");
    let Some(found) = retry_startup(&what, patience.startup, stop, || async {
        registry.list(&mut patience.cx(), template.clone()).await
    })
    .await?
    else {
        return Ok(false);
    };
    if !found.is_empty() {
        debug!(service = name, "network service already registered");
        return Ok(true);
    }
    let ns = NetworkService {
        name: name.to_string(),
        payload: payload::IP.to_string(),
        ..Default::default()
    };
    let what = format!("registering network service {name}");
    let registered = retry_startup(&what, patience.startup, stop, || async {
        registry.register(&mut patience.cx(), ns.clone()).await
    })
    .await?;
    if registered.is_some() {
        info!(service = name, "registered network service");
    }
    Ok(registered.is_some())
}

/// An endpoint (or forwarder) entry kept registered by [`registry_refresh`](mod@crate::registry::registry_refresh) until
/// [`Registration::unregister`]. Dropping it stops the refreshes (the entry then
/// expires).
///
/// The entry is sent without an expiration time, so the registry grants its full
/// expiry each time; refreshes come at 2/3 of what it grants, jittered, and a failed
/// refresh is retried with backoff (see [`registry_refresh`](mod@crate::registry::registry_refresh)).
#[derive(Debug)]
#[must_use = "dropping a Registration stops its refreshes"]
pub struct Registration {
    chain: RegistryChain<NetworkServiceEndpoint>,
    refresh: RegistryRefresh,
    /// Parent of the refresh timers: cancelled when the registration ends.
    timers: CancellationToken,
    entry: NetworkServiceEndpoint,
    patience: Patience,
}

impl Registration {
    /// Registers `entry` through `registry` (the plain chain to the manager, such as
    /// [`registry_client`]'s `nse`), retrying while it cannot be reached for up to
    /// [`DEFAULT_STARTUP_TIMEOUT`], then keeps it registered. `Ok(None)` when `stop`
    /// came first.
    pub async fn start(
        registry: RegistryChain<NetworkServiceEndpoint>,
        entry: NetworkServiceEndpoint,
        stop: &CancellationToken,
    ) -> Result<Option<Registration>> {
        Self::start_with(registry, entry, stop, Patience::default()).await
    }

    pub(crate) async fn start_with(
        registry: RegistryChain<NetworkServiceEndpoint>,
        mut entry: NetworkServiceEndpoint,
        stop: &CancellationToken,
        patience: Patience,
    ) -> Result<Option<Registration>> {
        entry.expiration_time = None;
        let timers = CancellationToken::new();
        let refresh = registry_refresh().root(&timers);
        let chain = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(refresh.clone())
            .push(registry)
            .build();
        let what = format!("registering {}", entry.name);
        let registered = retry_startup(&what, patience.startup, stop, || async {
            chain.register(&mut patience.cx(), entry.clone()).await
        })
        .await;
        let Some(_) = registered.inspect_err(|_| timers.cancel())? else {
            timers.cancel();
            return Ok(None);
        };
        info!(
            name = %entry.name,
            url = %entry.url,
            services = ?entry.network_service_names,
            "registered endpoint"
        );
        Ok(Some(Registration {
            chain,
            refresh,
            timers,
            entry,
            patience,
        }))
    }

    /// The entry as this component registers it.
    pub fn entry(&self) -> &NetworkServiceEndpoint {
        &self.entry
    }

    /// Whether a refresh is scheduled (false once the registry answered without an
    /// expiration: nothing to refresh).
    pub fn refreshing(&self) -> bool {
        self.refresh.pending() > 0
    }

    /// Stops refreshing and unregisters the entry; a failure is logged (the entry then
    /// expires).
    pub async fn unregister(self) {
        let name = self.entry.name.clone();
        match self
            .chain
            .unregister(&mut self.patience.cx(), self.entry.clone())
            .await
        {
            Ok(()) => info!(name = %name, "unregistered endpoint"),
            Err(e) => {
                warn!(name = %name, error = %e, "unregistering failed; the entry will expire")
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.timers.cancel();
    }
}

/// A registration held until `stop`, with `registry_refresh` from the SDK.
pub(crate) async fn registered_until(
    registry: RegistryChain<NetworkServiceEndpoint>,
    entry: NetworkServiceEndpoint,
    stop: &CancellationToken,
    patience: Patience,
) -> Result<()> {
    if let Some(registration) = Registration::start_with(registry, entry, stop, patience).await? {
        stop.cancelled().await;
        registration.unregister().await;
    }
    Ok(())
}
