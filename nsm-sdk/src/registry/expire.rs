//! `expire`: endpoints disappear from the registry unless they are refreshed.
//!
//! What it does, for endpoints: a Register gets `expiration_time = min(now + default,
//! the requested expiration if any)` (wall clock), is passed on, and the answer's
//! expiration is lowered to the downstream one if that is earlier. Then a timer is set
//! for that time: when it fires and no newer Register of the same name came, the entry
//! is unregistered **through the rest of the chain**, so the store tells its watchers
//! (`deleted = true`); that call carries [`ExpiryCleanup`], so `authorize` after
//! `expire` lets it through and frees the name. A refresh (another Register)
//! reschedules; a successful Unregister cancels the timer. Network services pass
//! through untouched.
//!
//! With [`Expire::stamp_only`] it only sets `expiration_time` and keeps no timer: for a
//! store that expires entries itself (etcd's leases), where a timer of one replica
//! would delete an entry that was refreshed through another.
//!
//! Expiry is a setting of its own ([`DEFAULT_EXPIRATION`] is the usual one), independent
//! of token lifetimes. Timers run on tokio time, so paused-time tests drive them.
//!
//! State: per endpoint name, the scheduled timer (an owned task with its own
//! cancellation token, child of the handler's root token) and an async lock that puts
//! Register, Unregister and the timer's own Unregister of one name in order, so a
//! refresh never races with the expiry it replaces. The timer task holds the chain
//! only weakly; dropping the handler (with its chain) cancels the root token and every
//! timer with it.
//!
//! Failure handled: a failed Register leaves the previous timer (if any) in place; a
//! failed Unregister keeps the timer, so the entry still expires; a failed expiry
//! Unregister is logged and not retried (the store's Find also hides expired
//! endpoints).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use prost_types::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::{RegistryHandler, RegistryNext};
use crate::core::handler::WeakCursor;
use crate::core::rt::keyed_lock::Guard;
use crate::core::rt::keyed_timers::{Firing, KeyedTimers, Slot};
use crate::core::Cx;
use crate::wire::bounds::Shown;
use crate::Result;

/// The usual registry expiration: one minute.
pub const DEFAULT_EXPIRATION: Duration = Duration::from_secs(60);

/// How long the Unregister of an expired entry may take.
const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(15);

/// Expirations further than this are capped (keeps time arithmetic from overflowing).
const MAX_EXPIRATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Marks the Unregister that [`Expire`] makes when an entry expires (a [`Cx::ext`]
/// value): the registry's own cleanup, not a peer's call, so the handlers after
/// `expire` (`authorize`) let it through whoever owns the name. Peers cannot set it:
/// the extensions of a call are made in process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryCleanup;

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct Expire {
    inner: Arc<Inner>,
}

/// The `expire` handler: entries live at most `default` unless refreshed.
pub fn expire(default: Duration) -> Expire {
    Expire::under(&CancellationToken::new(), default, true)
}

impl Expire {
    /// Its timers are children of `parent` (cancelling `parent` stops them all). A
    /// builder option: set it before the handler is shared.
    pub fn root(self, parent: &CancellationToken) -> Self {
        Expire::under(parent, self.inner.default, self.inner.timers)
    }

    /// Only stamps `expiration_time` on a Register; no timer, no Unregister of its own:
    /// the store after it expires entries (etcd leases). A builder option: set it before
    /// the handler is shared.
    pub fn stamp_only(self) -> Self {
        Expire::under(&CancellationToken::new(), self.inner.default, false)
    }

    fn under(parent: &CancellationToken, default: Duration, timers: bool) -> Self {
        Expire {
            inner: Arc::new_cyclic(|me| Inner {
                timers,
                default: default.min(MAX_EXPIRATION),
                slots: KeyedTimers::new(parent),
                scheduled: AtomicUsize::new(0),
                me: me.clone(),
            }),
        }
    }

    /// How many entries have an expiry scheduled.
    pub fn pending(&self) -> usize {
        self.inner.scheduled.load(Ordering::SeqCst)
    }

    /// The longest an entry lives without a refresh.
    pub fn default_expiration(&self) -> Duration {
        self.inner.default
    }
}

impl fmt::Debug for Expire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expire")
            .field("default", &self.inner.default)
            .field("pending", &self.pending())
            .finish()
    }
}

struct Inner {
    /// False with [`Expire::stamp_only`].
    timers: bool,
    default: Duration,
    /// One timer per endpoint name, under the handler's root token.
    slots: KeyedTimers,
    scheduled: AtomicUsize,
    me: Weak<Inner>,
}

/// Sets the answer's expiration to the earlier of `at` and the downstream one; returns it.
fn lower_expiration(out: &mut NetworkServiceEndpoint, at: SystemTime) -> SystemTime {
    let at = match out.expiration_time.as_ref().and_then(to_system_time) {
        Some(theirs) => at.min(theirs),
        None => at,
    };
    out.expiration_time = Some(at.into());
    at
}

fn to_system_time(t: &Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok()
}

impl Inner {
    /// Exclusive access to the slot of `name`, created on demand.
    async fn lock(&self, name: &str) -> Guard<Slot> {
        self.slots.lock(name).await
    }

    /// Counts a timer that stopped being the slot's.
    fn uncount(&self, had: bool) {
        if had {
            self.scheduled.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Cancels the slot's timer and removes the slot (the caller holds it).
    fn forget(&self, name: &str, slot: &mut Guard<Slot>) {
        let had = self.slots.forget(name, slot);
        self.uncount(had);
    }

    /// Sets the slot's timer to unregister `entry` through `next` at `at`.
    fn schedule(
        &self,
        slot: &mut Guard<Slot>,
        entry: NetworkServiceEndpoint,
        at: SystemTime,
        next: WeakCursor<dyn RegistryHandler<NetworkServiceEndpoint>>,
    ) {
        // Wall clock for the deadline, tokio time for the wait.
        let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
        let me = self.me.clone();
        let span = tracing::info_span!("expire", name = %Shown(&entry.name));
        let had = self.slots.arm(slot, |generation| {
            async move {
                tokio::time::sleep(delay).await;
                if let Some(inner) = me.upgrade() {
                    inner.fire(entry, generation, next).await;
                }
            }
            .instrument(span)
        });
        if !had {
            self.scheduled.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The timer of `entry` fired: unregister it unless a newer operation took over.
    async fn fire(
        &self,
        entry: NetworkServiceEndpoint,
        generation: u64,
        next: WeakCursor<dyn RegistryHandler<NetworkServiceEndpoint>>,
    ) {
        let mut slot = self.lock(&entry.name).await;
        if self.slots.firing(&entry.name, &mut slot, generation) != Firing::Current {
            return;
        }
        // Not cancelled: this very task runs under that token.
        let had = slot.disarm_fired();
        self.uncount(had);
        let name = entry.name.clone();
        match next.upgrade() {
            Some(next) => {
                let mut cx = Cx::server().with_timeout(UNREGISTER_TIMEOUT);
                cx.ext_mut().insert(ExpiryCleanup);
                let res =
                    tokio::time::timeout(UNREGISTER_TIMEOUT, next.unregister(&mut cx, entry)).await;
                match res {
                    Ok(Ok(())) => info!(name = %Shown(&name), "network service endpoint expired"),
                    Ok(Err(e)) => {
                        warn!(name = %Shown(&name), error = %e, "unregister of an expired endpoint failed")
                    }
                    Err(_) => {
                        warn!(name = %Shown(&name), "unregister of an expired endpoint timed out")
                    }
                }
            }
            None => warn!(name = %Shown(&name), "endpoint expired but its registry chain is gone"),
        }
        self.forget(&name, &mut slot);
    }
}

#[async_trait]
impl RegistryHandler<NetworkServiceEndpoint> for Expire {
    async fn register(
        &self,
        cx: &mut Cx,
        mut r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<NetworkServiceEndpoint> {
        let now = SystemTime::now();
        let mut at = now + self.inner.default;
        if let Some(asked) = r.expiration_time.as_ref().and_then(to_system_time) {
            at = at.min(asked);
        }
        r.expiration_time = Some(at.into());
        if !self.inner.timers {
            let mut out = next.register(cx, r).await?;
            lower_expiration(&mut out, at);
            return Ok(out);
        }
        let name = r.name.clone();
        let weak_next = next.downgrade();

        let mut slot = self.inner.lock(&name).await;
        let mut out = next
            .register(cx, r)
            .await
            .inspect_err(|_| self.inner.slots.forget_unarmed(&name, &mut slot))?;
        let at = lower_expiration(&mut out, at);
        self.inner.schedule(&mut slot, out.clone(), at, weak_next);
        Ok(out)
    }

    async fn unregister(
        &self,
        cx: &mut Cx,
        r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<()> {
        if !self.inner.timers {
            return next.unregister(cx, r).await;
        }
        let name = r.name.clone();
        let mut slot = self.inner.lock(&name).await;
        let res = next.unregister(cx, r).await;
        if res.is_ok() || !slot.is_armed() {
            self.inner.forget(&name, &mut slot);
        }
        res
    }
}

/// Network services do not expire: every call passes through.
#[async_trait]
impl RegistryHandler<NetworkService> for Expire {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::memory::{memory, Memory};
    use crate::registry::{Query, RegistryChain};
    use crate::Error;
    use futures::StreamExt;
    use tokio::time::{sleep, Instant};

    fn nse(name: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec!["svc".into()],
            url: "tcp://nse:1".into(),
            ..Default::default()
        }
    }

    fn setup(
        default: Duration,
    ) -> (
        Expire,
        Memory<NetworkServiceEndpoint>,
        RegistryChain<NetworkServiceEndpoint>,
    ) {
        let exp = expire(default);
        let store = memory();
        let chain = RegistryChain::builder()
            .push(exp.clone())
            .push(store.clone())
            .build();
        (exp, store, chain)
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    /// Lets finished or cancelled tasks wind down.
    async fn settle() {
        sleep(Duration::from_millis(1)).await;
    }

    fn secs_from_now(ts: &Option<Timestamp>) -> f64 {
        let t = to_system_time(ts.as_ref().expect("an expiration")).unwrap();
        match t.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_the_root_stops_every_timer() {
        let parent = CancellationToken::new();
        let exp = expire(Duration::from_secs(60)).root(&parent);
        assert_eq!(exp.default_expiration(), Duration::from_secs(60));
        let store = memory();
        let reg = RegistryChain::builder()
            .push(exp.clone())
            .push(store.clone())
            .build();
        reg.register(&mut Cx::server(), nse("a")).await.unwrap();
        settle().await;
        assert_eq!(alive_tasks(), 1, "one timer");
        parent.cancel();
        sleep(Duration::from_secs(120)).await;
        assert!(store.get("a").is_some(), "no timer fired");
        assert_eq!(alive_tasks(), 0, "the timer task is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn stamp_only_sets_the_expiration_and_leaves_removal_to_the_store() {
        let exp = expire(Duration::from_secs(10)).stamp_only();
        let store = memory();
        let reg = RegistryChain::builder()
            .push(exp.clone())
            .push(store.clone())
            .build();
        let out = reg.register(&mut Cx::server(), nse("a")).await.unwrap();
        let left = secs_from_now(&out.expiration_time);
        assert!((9.0..=10.0).contains(&left), "{left}");
        settle().await;
        assert_eq!((exp.pending(), alive_tasks()), (0, 0), "no timer");
        sleep(Duration::from_secs(60)).await;
        assert!(store.get("a").is_some(), "nobody removed it");
        reg.unregister(&mut Cx::server(), nse("a")).await.unwrap();
        assert!(store.get("a").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_removes_the_endpoint_and_tells_watchers() {
        let (exp, store, reg) = setup(Duration::from_secs(60));
        let cx = &mut Cx::server();
        let start = Instant::now();
        let out = reg.register(cx, nse("a")).await.unwrap();
        let left = secs_from_now(&out.expiration_time);
        assert!((59.0..=60.0).contains(&left), "expires in {left} s");
        assert_eq!(store.get("a").unwrap().expiration_time, out.expiration_time);
        assert_eq!(exp.pending(), 1);

        let mut w = reg
            .find(
                cx,
                Query {
                    template: nse(""),
                    watch: true,
                },
            )
            .await
            .unwrap();
        assert!(!w.next().await.unwrap().unwrap().deleted);
        let gone = w.next().await.unwrap().unwrap();
        assert_eq!((gone.resource.name.as_str(), gone.deleted), ("a", true));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(59) && waited <= Duration::from_secs(60),
            "{waited:?}"
        );
        assert!(store.is_empty());
        assert_eq!(exp.pending(), 0);
        drop(w);
        settle().await;
        assert_eq!(alive_tasks(), 0, "the timer task is done");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_keeps_the_endpoint_and_reschedules() {
        let (exp, store, reg) = setup(Duration::from_secs(60));
        let cx = &mut Cx::server();
        reg.register(cx, nse("a")).await.unwrap();
        sleep(Duration::from_secs(40)).await;
        reg.register(cx, nse("a")).await.unwrap();
        sleep(Duration::from_secs(30)).await;
        assert!(
            store.get("a").is_some(),
            "70 s after the first Register, 30 s after the refresh"
        );
        assert_eq!(exp.pending(), 1);
        assert_eq!(alive_tasks(), 1, "the replaced timer is gone");
        sleep(Duration::from_secs(31)).await;
        assert!(store.get("a").is_none());
        assert_eq!(exp.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn unregister_cancels_the_timer_and_leaves_no_task() {
        let (exp, store, reg) = setup(Duration::from_secs(60));
        let cx = &mut Cx::server();
        reg.register(cx, nse("a")).await.unwrap();
        assert_eq!(alive_tasks(), 1);
        reg.unregister(cx, nse("a")).await.unwrap();
        assert_eq!(exp.pending(), 0);
        settle().await;
        assert_eq!(alive_tasks(), 0);

        // Stored again behind expire's back: no stale timer removes it.
        let direct = RegistryChain::builder().push(store.clone()).build();
        direct.register(cx, nse("a")).await.unwrap();
        sleep(Duration::from_secs(120)).await;
        assert!(store.get("a").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_requested_expiration_wins_and_a_later_one_is_capped() {
        let (_exp, store, reg) = setup(Duration::from_secs(60));
        let cx = &mut Cx::server();
        let soon = NetworkServiceEndpoint {
            expiration_time: Some((SystemTime::now() + Duration::from_secs(10)).into()),
            ..nse("soon")
        };
        let late = NetworkServiceEndpoint {
            expiration_time: Some((SystemTime::now() + Duration::from_secs(3600)).into()),
            ..nse("late")
        };
        let left = secs_from_now(&reg.register(cx, soon).await.unwrap().expiration_time);
        assert!((9.0..=10.0).contains(&left), "{left}");
        let left = secs_from_now(&reg.register(cx, late).await.unwrap().expiration_time);
        assert!((59.0..=60.0).contains(&left), "{left}");
        sleep(Duration::from_secs(11)).await;
        assert!(store.get("soon").is_none());
        assert!(store.get("late").is_some());
    }

    /// Lowers the expiration the rest of the chain answers with.
    struct Lower(Duration);

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Lower {
        async fn register(
            &self,
            cx: &mut Cx,
            r: NetworkServiceEndpoint,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<NetworkServiceEndpoint> {
            let mut out = next.register(cx, r).await?;
            out.expiration_time = Some((SystemTime::now() + self.0).into());
            Ok(out)
        }
    }

    /// Fails every Register and Unregister.
    struct Refuse;

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Refuse {
        async fn register(
            &self,
            _: &mut Cx,
            _: NetworkServiceEndpoint,
            _: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<NetworkServiceEndpoint> {
            Err(Error::unavailable("down"))
        }
        async fn unregister(
            &self,
            _: &mut Cx,
            _: NetworkServiceEndpoint,
            _: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<()> {
            Err(Error::unavailable("down"))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_downstream_expiration_is_the_one_kept() {
        let exp = expire(Duration::from_secs(60));
        let store = memory();
        let reg = RegistryChain::builder()
            .push(exp.clone())
            .push(Lower(Duration::from_secs(5)))
            .push(store.clone())
            .build();
        let out = reg.register(&mut Cx::server(), nse("a")).await.unwrap();
        let left = secs_from_now(&out.expiration_time);
        assert!((4.0..=5.0).contains(&left), "{left}");
        sleep(Duration::from_secs(6)).await;
        assert!(store.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_register_schedules_nothing() {
        let exp = expire(Duration::from_secs(60));
        let reg = RegistryChain::builder()
            .push(exp.clone())
            .push(Refuse)
            .build();
        let e = reg.register(&mut Cx::server(), nse("a")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(exp.pending(), 0);
        assert_eq!(alive_tasks(), 0);
        assert_eq!(exp.inner.slots.len(), 0, "no slot is left for the name");
    }

    /// Fails the first Unregister, passes everything else on.
    #[derive(Default)]
    struct RefuseOnce(std::sync::atomic::AtomicBool);

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for RefuseOnce {
        async fn unregister(
            &self,
            cx: &mut Cx,
            r: NetworkServiceEndpoint,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<()> {
            if !self.0.swap(true, Ordering::SeqCst) {
                return Err(Error::unavailable("down"));
            }
            next.unregister(cx, r).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_unregister_keeps_the_timer_so_the_entry_still_expires() {
        let exp = expire(Duration::from_secs(60));
        let store = memory();
        let reg = RegistryChain::builder()
            .push(exp.clone())
            .push(RefuseOnce::default())
            .push(store.clone())
            .build();
        let cx = &mut Cx::server();
        reg.register(cx, nse("a")).await.unwrap();
        assert!(reg.unregister(cx, nse("a")).await.is_err());
        assert_eq!(exp.pending(), 1);
        sleep(Duration::from_secs(61)).await;
        assert!(store.is_empty());
        assert_eq!(exp.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_chain_stops_its_timers() {
        let (exp, store, reg) = setup(Duration::from_secs(60));
        reg.register(&mut Cx::server(), nse("a")).await.unwrap();
        reg.register(&mut Cx::server(), nse("b")).await.unwrap();
        assert_eq!(alive_tasks(), 2);
        drop((exp, reg));
        settle().await;
        assert_eq!(alive_tasks(), 0, "timers hold the chain only weakly");
        sleep(Duration::from_secs(120)).await;
        assert_eq!(store.len(), 2, "nobody is left to expire them");
    }

    #[tokio::test(start_paused = true)]
    async fn network_services_pass_through() {
        let exp = expire(Duration::from_secs(1));
        let store = memory::<NetworkService>();
        let reg = RegistryChain::builder()
            .push(exp.clone())
            .push(store.clone())
            .build();
        let ns = NetworkService {
            name: "vpn".into(),
            ..Default::default()
        };
        reg.register(&mut Cx::server(), ns).await.unwrap();
        sleep(Duration::from_secs(10)).await;
        assert_eq!(store.len(), 1);
        assert_eq!(exp.pending(), 0);
    }
}
