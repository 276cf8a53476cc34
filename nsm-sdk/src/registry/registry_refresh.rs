//! `registry_refresh`: keeps an endpoint's registration alive until it unregisters.
//!
//! What it does (on the client side of a registration: an NSE or a forwarder
//! registering through its nsmgr): after a successful Register it re-registers the same
//! entry through the rest of the chain at a fraction of the time left before the
//! `expiration_time` the registry answered with: 2/3 by default (docs/SCENARIOS.md 6.11),
//! jittered by ±10 % so endpoints that registered together do not refresh together.
//! Every answer schedules the next refresh the same way, until the endpoint unregisters
//! or the handler is dropped. The re-registered entry is the one the caller registered,
//! with the `initial_registration_time` the registry answered and, when the caller asked
//! for an expiration, the same duration from the moment of the refresh. Because a
//! Register is idempotent per name, a registry that restarted empty gets the entry back
//! at the next refresh: this is how registrations heal after a registry restart.
//! Network services do not expire and pass through untouched.
//!
//! How the pieces fit: the registry's [`expire`](mod@super::expire) drops an endpoint whose
//! expiration passed; this handler, on the registrant's side, refreshes it well before.
//! Registry expiry is a setting of its own, independent of token lifetimes (the
//! connection-side counterparts are [`refresh`](mod@crate::handlers::refresh) and
//! [`timeout`](mod@crate::handlers::timeout)).
//!
//! State: per endpoint name, the scheduled refresh (an owned task with its own
//! cancellation token, child of the handler's root token) and an async lock that puts
//! the caller's Register and Unregister and the timer's own Register of one name in
//! order, so a refresh never re-registers an endpoint that just unregistered. The timer
//! holds the rest of the chain only weakly; dropping the handler (with its chain)
//! cancels the root token and every timer with it.
//!
//! Failure handled: a failed refresh (registry down or restarting, a timeout) is retried
//! with exponential backoff (200 ms, doubling, capped at 5 s, jittered by ±20 %) for as
//! long as the endpoint wants to be registered. A failed caller Register leaves the
//! previous refresh (if any) in place. An answer without an expiration stops refreshing:
//! nothing expires.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use prost_types::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use super::{RegistryHandler, RegistryNext};
use crate::core::handler::WeakCursor;
use crate::core::rt::count_guard::CountGuard;
use crate::core::rt::keyed_lock::Guard;
use crate::core::rt::keyed_timers::{Firing, KeyedTimers, Slot};
use crate::core::rt::Backoff;
use crate::core::Cx;
use crate::Result;

/// The default fraction of the remaining expiry at which an entry is refreshed.
pub const DEFAULT_REFRESH_FRACTION: f64 = 2.0 / 3.0;
/// The default jitter of the refresh time, either way, as a fraction of it.
pub const DEFAULT_REFRESH_JITTER: f64 = 0.1;
/// How long one re-registration may take.
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(15);

const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The shortest wait before a refresh, whatever the registry answered.
const MIN_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
struct Config {
    fraction: f64,
    jitter: f64,
    timeout: Duration,
    retry: Backoff,
}

impl Config {
    /// When to refresh an entry that expires in `left`.
    fn delay(&self, left: Duration) -> Duration {
        let jitter = if self.jitter > 0.0 {
            rand::random_range(-self.jitter..self.jitter)
        } else {
            0.0
        };
        let fraction = (self.fraction * (1.0 + jitter)).clamp(0.0, 1.0);
        left.mul_f64(fraction).max(MIN_DELAY)
    }
}

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct RegistryRefresh {
    config: Config,
    inner: Arc<Inner>,
}

/// The `registry_refresh` handler: refresh at 2/3 of the remaining expiry, ±10 %.
pub fn registry_refresh() -> RegistryRefresh {
    RegistryRefresh::under(&CancellationToken::new())
}

impl RegistryRefresh {
    /// Its timers are children of `parent` (cancelling `parent` stops them all). A
    /// builder option: set it before the handler is shared.
    pub fn root(self, parent: &CancellationToken) -> Self {
        RegistryRefresh {
            config: self.config,
            ..RegistryRefresh::under(parent)
        }
    }

    fn under(parent: &CancellationToken) -> Self {
        RegistryRefresh {
            config: Config {
                fraction: DEFAULT_REFRESH_FRACTION,
                jitter: DEFAULT_REFRESH_JITTER,
                timeout: DEFAULT_REGISTER_TIMEOUT,
                retry: Backoff::new(RETRY_START, RETRY_MAX),
            },
            inner: Arc::new(Inner {
                slots: KeyedTimers::new(parent),
                pending: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    /// Refresh at this fraction of the remaining expiry (clamped to `0..=1`).
    pub fn fraction(mut self, fraction: f64) -> Self {
        self.config.fraction = if fraction.is_nan() {
            DEFAULT_REFRESH_FRACTION
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self
    }

    /// Jitter the refresh time by up to this fraction of it, either way (clamped to
    /// `0..=0.5`).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.config.jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 0.5)
        };
        self
    }

    /// How long one re-registration may take.
    pub fn register_timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Retry a failed refresh after `start`, doubling up to `max`.
    pub fn backoff(mut self, start: Duration, max: Duration) -> Self {
        self.config.retry = Backoff::new(start, max);
        self
    }

    /// How many refresh timers are alive (one per registered entry); a cancelled
    /// timer's task counts until it has wound down.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for RegistryRefresh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryRefresh")
            .field("fraction", &self.config.fraction)
            .field("jitter", &self.config.jitter)
            .field("pending", &self.pending())
            .finish()
    }
}

struct Inner {
    /// One timer per endpoint name, under the handler's root token.
    slots: KeyedTimers,
    pending: Arc<AtomicUsize>,
}

/// What a timer re-registers, and how.
struct Refreshing {
    entry: NetworkServiceEndpoint,
    /// The expiration the caller asked for, as a duration from each Register.
    asked: Option<Duration>,
    cx: Cx,
    next: WeakCursor<dyn RegistryHandler<NetworkServiceEndpoint>>,
}

/// The time left before `t`; `None` when there is no expiration.
fn time_left(t: Option<&Timestamp>) -> Option<Duration> {
    let t = SystemTime::try_from(*t?).ok()?;
    Some(t.duration_since(SystemTime::now()).unwrap_or_default())
}

impl Inner {
    /// Exclusive access to the slot of `name`, created on demand.
    async fn lock(&self, name: &str) -> Guard<Slot> {
        self.slots.lock(name).await
    }

    /// Cancels the slot's timer and removes the slot (the caller holds it).
    fn forget(&self, name: &str, slot: &mut Guard<Slot>) {
        self.slots.forget(name, slot);
    }
}

impl RegistryRefresh {
    /// Replaces the slot's timer by one that refreshes `what` after `delay`, and again
    /// after each answer.
    fn schedule(&self, slot: &mut Guard<Slot>, what: Refreshing, delay: Duration) {
        let span = tracing::debug_span!("registry_refresh", name = %what.entry.name);
        let guard = CountGuard::new(&self.inner.pending);
        let inner = Arc::downgrade(&self.inner);
        let config = self.config;
        self.inner.slots.arm(slot, |generation| {
            async move {
                let _guard = guard;
                run_timer(inner, config, generation, what, delay).await;
            }
            .instrument(span)
        });
    }
}

/// The life of one entry's timer: wait, re-register, repeat; until replaced, cancelled,
/// or the registry answers without an expiration.
async fn run_timer(
    inner: Weak<Inner>,
    config: Config,
    generation: u64,
    mut what: Refreshing,
    mut delay: Duration,
) {
    let name = what.entry.name.clone();
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(delay).await;
        let Some(me) = inner.upgrade() else { return };
        let mut slot = me.lock(&name).await;
        if me.slots.firing(&name, &mut slot, generation) != Firing::Current {
            return;
        }
        let Some(next) = what.next.upgrade() else {
            return;
        };
        let mut entry = what.entry.clone();
        entry.expiration_time = what
            .asked
            .and_then(|d| SystemTime::now().checked_add(d))
            .map(Timestamp::from);
        let mut cx = what.cx.fork(Some(config.timeout));
        let outcome = tokio::time::timeout(config.timeout, next.register(&mut cx, entry)).await;
        match outcome {
            Ok(Ok(out)) => {
                failures = 0;
                if out.initial_registration_time.is_some() {
                    what.entry.initial_registration_time = out.initial_registration_time;
                }
                match time_left(out.expiration_time.as_ref()) {
                    Some(left) => {
                        delay = config.delay(left);
                        debug!(?left, ?delay, "registration refreshed");
                    }
                    None => {
                        debug!("the registry answered without expiration: refreshing stops");
                        me.forget(&name, &mut slot);
                        return;
                    }
                }
            }
            Ok(Err(e)) => {
                delay = config.retry.wait(failures);
                failures = failures.saturating_add(1);
                warn!(error = %e, failures, ?delay, "refreshing the registration failed; retrying");
            }
            Err(_) => {
                delay = config.retry.wait(failures);
                failures = failures.saturating_add(1);
                warn!(
                    failures,
                    ?delay,
                    "refreshing the registration timed out; retrying"
                );
            }
        }
    }
}

#[async_trait]
impl RegistryHandler<NetworkServiceEndpoint> for RegistryRefresh {
    async fn register(
        &self,
        cx: &mut Cx,
        r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<NetworkServiceEndpoint> {
        let name = r.name.clone();
        let asked = time_left(r.expiration_time.as_ref());
        let weak_next = next.downgrade();
        let mut slot = self.inner.lock(&name).await;
        let out = next
            .register(cx, r.clone())
            .await
            .inspect_err(|_| self.inner.slots.forget_unarmed(&name, &mut slot))?;
        match time_left(out.expiration_time.as_ref()) {
            Some(left) => {
                let mut entry = r;
                entry.initial_registration_time = out.initial_registration_time;
                let what = Refreshing {
                    entry,
                    asked,
                    cx: cx.fork(None),
                    next: weak_next,
                };
                let delay = self.config.delay(left);
                debug!(name = %name, ?left, ?delay, "registration refresh scheduled");
                self.schedule(&mut slot, what, delay);
            }
            None => self.inner.forget(&name, &mut slot),
        }
        Ok(out)
    }

    async fn unregister(
        &self,
        cx: &mut Cx,
        r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<()> {
        let name = r.name.clone();
        let mut slot = self.inner.lock(&name).await;
        // Whatever the answer, the caller wants the entry gone: stop keeping it alive.
        self.inner.forget(&name, &mut slot);
        next.unregister(cx, r).await
    }
}

/// Network services do not expire: every call passes through.
#[async_trait]
impl RegistryHandler<NetworkService> for RegistryRefresh {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::expire::expire;
    use crate::registry::memory::{memory, Memory};
    use crate::registry::{Query, RegistryChain};
    use crate::Error;
    use futures::{FutureExt, StreamExt};
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use tokio::time::{sleep, Instant};

    fn nse(name: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec!["svc".into()],
            url: "tcp://nse:1".into(),
            ..Default::default()
        }
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    async fn settle() {
        sleep(Duration::from_millis(1)).await;
    }

    /// Stands between the registrant and the registry: records when entries pass and
    /// what they carry, and fails while `down`.
    #[derive(Default)]
    struct Wire {
        seen: Mutex<Vec<(Instant, NetworkServiceEndpoint)>>,
        down: AtomicBool,
    }

    impl Wire {
        fn times(&self) -> Vec<Instant> {
            self.seen.lock().unwrap().iter().map(|(t, _)| *t).collect()
        }
        fn count(&self) -> usize {
            self.seen.lock().unwrap().len()
        }
    }

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Arc<Wire> {
        async fn register(
            &self,
            cx: &mut Cx,
            r: NetworkServiceEndpoint,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<NetworkServiceEndpoint> {
            self.seen.lock().unwrap().push((Instant::now(), r.clone()));
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::unavailable("registry down"));
            }
            next.register(cx, r).await
        }
    }

    /// A registry (expire + memory store) that can restart empty.
    #[derive(Clone)]
    struct Registry(
        Arc<
            Mutex<(
                RegistryChain<NetworkServiceEndpoint>,
                Memory<NetworkServiceEndpoint>,
            )>,
        >,
    );

    impl Registry {
        fn new(expiration: Duration) -> Self {
            Registry(Arc::new(Mutex::new(Self::fresh(expiration))))
        }
        fn fresh(
            expiration: Duration,
        ) -> (
            RegistryChain<NetworkServiceEndpoint>,
            Memory<NetworkServiceEndpoint>,
        ) {
            let store = memory();
            let chain = RegistryChain::builder()
                .push(expire(expiration))
                .push(store.clone())
                .build();
            (chain, store)
        }
        fn restart(&self, expiration: Duration) {
            *self.0.lock().unwrap() = Self::fresh(expiration);
        }
        fn store(&self) -> Memory<NetworkServiceEndpoint> {
            self.0.lock().unwrap().1.clone()
        }
    }

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Registry {
        async fn register(
            &self,
            cx: &mut Cx,
            r: NetworkServiceEndpoint,
            _: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<NetworkServiceEndpoint> {
            let chain = self.0.lock().unwrap().0.clone();
            chain.register(cx, r).await
        }
        async fn unregister(
            &self,
            cx: &mut Cx,
            r: NetworkServiceEndpoint,
            _: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<()> {
            let chain = self.0.lock().unwrap().0.clone();
            chain.unregister(cx, r).await
        }
    }

    struct Setup {
        refresh: RegistryRefresh,
        wire: Arc<Wire>,
        registry: Registry,
        chain: RegistryChain<NetworkServiceEndpoint>,
    }

    fn setup(expiration: Duration) -> Setup {
        let refresh = registry_refresh();
        let wire = Arc::new(Wire::default());
        let registry = Registry::new(expiration);
        let chain = RegistryChain::builder()
            .push(refresh.clone())
            .push(wire.clone())
            .push(registry.clone())
            .build();
        Setup {
            refresh,
            wire,
            registry,
            chain,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_with_a_2s_expiry_stays_registered_for_20s() {
        let s = setup(Duration::from_secs(2));
        let cx = &mut Cx::client();
        s.chain.register(cx, nse("a")).await.unwrap();
        let store = s.registry.store();
        let mut watch = RegistryChain::builder()
            .push(store.clone())
            .build()
            .find(
                cx,
                Query {
                    template: nse(""),
                    watch: true,
                },
            )
            .await
            .unwrap();
        let mut deleted = 0;
        for tick in 0..200 {
            sleep(Duration::from_millis(100)).await;
            assert!(
                store.get("a").is_some(),
                "gone after {} ms",
                (tick + 1) * 100
            );
            while let Some(Some(Ok(item))) = watch.next().now_or_never() {
                deleted += usize::from(item.deleted);
            }
        }
        assert_eq!(deleted, 0, "the store never announced a deletion");
        // Refreshed at 2/3 of 2 s, ±10 %: between 1.2 and 1.47 s apart.
        let times = s.wire.times();
        for w in times.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64();
            assert!((1.19..=1.47).contains(&gap), "{gap}");
        }
        assert!(
            (13..=18).contains(&times.len()),
            "{} registrations",
            times.len()
        );
        assert_eq!(s.refresh.pending(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unregister_stops_refreshing_and_leaves_no_timer() {
        let s = setup(Duration::from_secs(2));
        let cx = &mut Cx::client();
        s.chain.register(cx, nse("a")).await.unwrap();
        sleep(Duration::from_secs(5)).await;
        s.chain.unregister(cx, nse("a")).await.unwrap();
        let count = s.wire.count();
        settle().await;
        assert_eq!(s.refresh.pending(), 0);
        assert_eq!(
            alive_tasks(),
            0,
            "neither the refresh nor the expiry timer is left"
        );
        sleep(Duration::from_secs(20)).await;
        assert_eq!(s.wire.count(), count, "no re-registration after Unregister");
        assert!(s.registry.store().is_empty());
        assert!(s.refresh.inner.slots.len() == 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_registry_that_comes_back_empty_gets_the_entry_at_the_next_refresh() {
        let s = setup(Duration::from_secs(60));
        let cx = &mut Cx::client();
        let first = s.chain.register(cx, nse("a")).await.unwrap();
        sleep(Duration::from_secs(10)).await;
        s.registry.restart(Duration::from_secs(60));
        assert!(s.registry.store().get("a").is_none(), "restarted empty");
        // The refresh is due at 2/3 of 60 s, ±10 %: 36 to 44 s after the Register.
        sleep(Duration::from_secs(34)).await;
        let back = s.registry.store().get("a").expect("registered again");
        assert_eq!(
            back.initial_registration_time, first.initial_registration_time,
            "the first registration time survives the restart"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_is_retried_with_backoff_until_the_registry_is_back() {
        let s = setup(Duration::from_secs(10));
        let cx = &mut Cx::client();
        s.chain.register(cx, nse("a")).await.unwrap();
        s.wire.down.store(true, Ordering::SeqCst);
        sleep(Duration::from_secs(30)).await;
        let tries: Vec<Instant> = s.wire.times().into_iter().skip(1).collect();
        // First try at 6-7.3 s, then 0.2, 0.4, 0.8, 1.6, 3.2 s and 5 s apart (±20 %).
        assert!(
            (8..=10).contains(&tries.len()),
            "{} tries in 30 s",
            tries.len()
        );
        let gaps: Vec<f64> = tries
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        for (i, g) in gaps.iter().enumerate() {
            let expected = (0.2 * f64::powi(2.0, i as i32)).min(5.0);
            assert!(
                *g >= expected * 0.8 - 0.001 && *g <= expected * 1.2 + 0.001,
                "retry {i} after {g} s, expected about {expected} s"
            );
        }
        assert!(
            s.registry.store().is_empty(),
            "expired while the registry was down"
        );

        s.wire.down.store(false, Ordering::SeqCst);
        let failed = s.wire.count();
        sleep(Duration::from_millis(6_500)).await;
        assert!(
            s.registry.store().get("a").is_some(),
            "back within one capped retry"
        );
        sleep(Duration::from_secs(20)).await;
        let after: Vec<Instant> = s.wire.times().into_iter().skip(failed).collect();
        assert!(after.len() >= 3);
        for w in after.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64();
            assert!(
                (5.99..=7.34).contains(&gap),
                "back to 2/3 of 10 s, got {gap}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresh_sends_the_asked_expiration_and_the_initial_registration_time() {
        let s = setup(Duration::from_secs(3600));
        let cx = &mut Cx::client();
        let asked = NetworkServiceEndpoint {
            expiration_time: Some((SystemTime::now() + Duration::from_secs(30)).into()),
            ..nse("a")
        };
        let first = s.chain.register(cx, asked).await.unwrap();
        sleep(Duration::from_secs(23)).await;
        let seen = s.wire.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "refreshed once, at 18-22 s");
        let again = &seen[1].1;
        assert_eq!(
            again.initial_registration_time,
            first.initial_registration_time
        );
        let left = time_left(again.expiration_time.as_ref())
            .unwrap()
            .as_secs_f64();
        assert!(
            (29.0..=30.0).contains(&left),
            "asked for 30 s again, got {left}"
        );
        assert_eq!(again.url, "tcp://nse:1");
    }

    #[tokio::test(start_paused = true)]
    async fn registering_twice_keeps_one_timer_and_dropping_the_chain_stops_it() {
        let s = setup(Duration::from_secs(60));
        let cx = &mut Cx::client();
        s.chain.register(cx, nse("a")).await.unwrap();
        s.chain.register(cx, nse("a")).await.unwrap();
        s.chain.register(cx, nse("b")).await.unwrap();
        settle().await;
        assert_eq!(s.refresh.pending(), 2);
        let Setup {
            refresh,
            wire,
            registry,
            chain,
        } = s;
        drop((refresh, chain));
        settle().await;
        sleep(Duration::from_secs(120)).await;
        assert_eq!(wire.count(), 3, "no refresh after the chain is gone");
        drop(registry);
        settle().await;
        assert_eq!(alive_tasks(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_without_expiration_is_not_refreshed() {
        let refresh = registry_refresh();
        let store = memory();
        let chain = RegistryChain::builder()
            .push(refresh.clone())
            .push(store.clone())
            .build();
        chain.register(&mut Cx::client(), nse("a")).await.unwrap();
        assert_eq!(refresh.pending(), 0);
        assert!(refresh.inner.slots.len() == 0);
    }
}
