//! Staying registered: registry entries of endpoints expire unless refreshed, so a
//! program registers, re-registers at a third of the expiry it gets back, and
//! unregisters when it stops.

use std::future::Future;
use std::time::{Duration, SystemTime};

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use nsm_sdk::registry::RegistryChain;
use nsm_sdk::wire::payload;
use nsm_sdk::{Cx, Error};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::process::Failure;

/// How long one registry call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a program keeps trying to reach its registry when it starts (its manager
/// may be starting too).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Refresh period when the registry gives no expiration time.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(20);
/// Pause between two tries of a failed registry call.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// Never refresh more often than this, however short the expiry.
const MIN_REFRESH: Duration = Duration::from_millis(100);

fn call_cx() -> Cx {
    Cx::client().with_timeout(CALL_TIMEOUT)
}

/// Runs `call` until it succeeds, fails with an error that is not retryable, or
/// [`STARTUP_TIMEOUT`] passes; `Ok(None)` when `stop` is cancelled first.
pub(crate) async fn retrying<T, F, Fut>(
    what: &str,
    stop: &CancellationToken,
    mut call: F,
) -> Result<Option<T>, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let give_up = tokio::time::Instant::now() + STARTUP_TIMEOUT;
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
            Err(e) => return Err(Failure::runtime(format!("{what} failed: {e}"))),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(RETRY_INTERVAL) => {}
        }
    }
}

/// Registers the network service `name` (payload IP) unless the registry already has
/// one by that name. Network services are left registered on exit: other endpoints
/// may serve them. `Ok(false)` when `stop` came first.
pub async fn ensure_network_service(
    registry: &RegistryChain<NetworkService>,
    name: &str,
    stop: &CancellationToken,
) -> Result<bool, Failure> {
    let template = NetworkService {
        name: name.to_string(),
        ..Default::default()
    };
    let what = format!("looking up network service {name}");
    let Some(found) = retrying(&what, stop, || async {
        registry.list(&mut call_cx(), template.clone()).await
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
    let registered = retrying(&what, stop, || async {
        registry.register(&mut call_cx(), ns.clone()).await
    })
    .await?;
    if registered.is_some() {
        info!(service = name, "registered network service");
    }
    Ok(registered.is_some())
}

/// An endpoint kept registered: a task re-registers it before it expires until
/// [`Registration::unregister`] is called. Dropping it stops the refreshes (the entry
/// then expires).
#[derive(Debug)]
#[must_use = "dropping a Registration stops its refreshes"]
pub struct Registration {
    registry: RegistryChain<NetworkServiceEndpoint>,
    entry: NetworkServiceEndpoint,
    refresh: JoinHandle<()>,
}

impl Registration {
    /// Registers `entry` through `registry` (retrying while the registry cannot be
    /// reached, for up to [`STARTUP_TIMEOUT`]), then keeps it registered. `Ok(None)`
    /// when `stop` came first.
    ///
    /// The entry is sent without an expiration time each time, so the registry gives
    /// it a full expiry; refreshes come at a third of what it grants
    /// ([`DEFAULT_REFRESH`] when it grants none).
    pub async fn start(
        registry: RegistryChain<NetworkServiceEndpoint>,
        mut entry: NetworkServiceEndpoint,
        stop: &CancellationToken,
    ) -> Result<Option<Registration>, Failure> {
        entry.expiration_time = None;
        let what = format!("registering {}", entry.name);
        let Some(registered) = retrying(&what, stop, || async {
            registry.register(&mut call_cx(), entry.clone()).await
        })
        .await?
        else {
            return Ok(None);
        };
        let every = refresh_period(&registered, SystemTime::now());
        info!(
            name = %entry.name,
            url = %entry.url,
            services = ?entry.network_service_names,
            refresh_every = ?every,
            "registered endpoint"
        );
        let refresh = tokio::spawn(keep_registered(registry.clone(), entry.clone(), every));
        Ok(Some(Registration {
            registry,
            entry,
            refresh,
        }))
    }

    /// The entry as this program registers it.
    pub fn entry(&self) -> &NetworkServiceEndpoint {
        &self.entry
    }

    /// Stops refreshing and unregisters the entry.
    pub async fn unregister(self) {
        self.refresh.abort();
        let name = self.entry.name.clone();
        match self
            .registry
            .unregister(&mut call_cx(), self.entry.clone())
            .await
        {
            Ok(()) => info!(name = %name, "unregistered endpoint"),
            Err(e) => {
                warn!(name = %name, error = %e, "unregistering failed; the entry will expire")
            }
        }
    }
}

/// Registers `entry` through `registry`, keeps it registered until `stop` is
/// cancelled, then unregisters it: the whole registration life of a program.
pub async fn registered_until(
    registry: RegistryChain<NetworkServiceEndpoint>,
    entry: NetworkServiceEndpoint,
    stop: &CancellationToken,
) -> Result<(), Failure> {
    if let Some(registration) = Registration::start(registry, entry, stop).await? {
        stop.cancelled().await;
        registration.unregister().await;
    }
    Ok(())
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.refresh.abort();
    }
}

async fn keep_registered(
    registry: RegistryChain<NetworkServiceEndpoint>,
    entry: NetworkServiceEndpoint,
    mut wait: Duration,
) {
    loop {
        tokio::time::sleep(wait).await;
        wait = match registry.register(&mut call_cx(), entry.clone()).await {
            Ok(registered) => {
                let every = refresh_period(&registered, SystemTime::now());
                debug!(name = %entry.name, next_in = ?every, "registration refreshed");
                every
            }
            Err(e) => {
                warn!(name = %entry.name, error = %e, "refreshing the registration failed; trying again");
                RETRY_INTERVAL
            }
        };
    }
}

/// A third of the time left before `registered` expires.
fn refresh_period(registered: &NetworkServiceEndpoint, now: SystemTime) -> Duration {
    let Some(expires) = registered.expiration_time.as_ref() else {
        return DEFAULT_REFRESH;
    };
    let Ok(expires) = SystemTime::try_from(*expires) else {
        return DEFAULT_REFRESH;
    };
    let left = expires.duration_since(now).unwrap_or_default();
    (left / 3).max(MIN_REFRESH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;

    #[test]
    fn refreshes_at_a_third_of_the_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut nse = NetworkServiceEndpoint::default();
        assert_eq!(refresh_period(&nse, now), DEFAULT_REFRESH);
        nse.expiration_time = Some(Timestamp {
            seconds: 1060,
            nanos: 0,
        });
        assert_eq!(refresh_period(&nse, now), Duration::from_secs(20));
        nse.expiration_time = Some(Timestamp {
            seconds: 900,
            nanos: 0,
        });
        assert_eq!(refresh_period(&nse, now), MIN_REFRESH);
    }
}
