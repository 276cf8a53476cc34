//! `heal`: a client keeps its connection working when something on its path dies.
//!
//! Where it goes: in a client chain (an NSC's, or a passthrough's), after `begin` and
//! after `retry`, where [`ClientOptions::handler`](crate::chains::ClientOptions::handler)
//! puts application handlers:
//!
//! ```text
//! update_path, begin, retry, heal, ..., mechanism_preferences, client_url, grpc_client
//! ```
//!
//! Heal's re-requests are `begin` events, and events re-enter right after `begin`, so
//! they pass `retry` wherever heal sits. After `retry`, heal sees every try and can make
//! its own attempts fail fast: a failed heal attempt leaves `retry` with a
//! non-retryable error (Cancelled, carrying the cause), and heal's own backoff decides
//! when to try again. Otherwise each failed attempt would be retried for `retry`'s
//! whole budget (15 s) while holding the connection's turn, delaying the reselect and
//! any Close behind it. The caller's own Requests are never changed: heal knows its
//! attempt by the request it queued and by `begin`'s mark on operations that events
//! started, so a caller's refresh with the same content is not taken for it. (`refresh`
//! does not retry a request that failed as Cancelled either: heal's backoff is the only
//! one.)
//!
//! What it does, per connection, after each successful Request:
//! - **watch**: it follows the connection at the next hop (the next hop's URL is the
//!   call's [`ClientUrl`](crate::transport::ClientUrl)) through the client-side filter.
//!   All connections of one client to one next hop share one MonitorConnection stream
//!   ([`shared_monitor`](crate::transport::channels::shared_monitor)), so the next hop serves one
//!   stream per client process, not one per connection. The
//!   next hops relay what happens further down (`monitor_relay`), so the death of any
//!   hop or of the endpoint arrives here as state DOWN. With a liveness check
//!   ([`HealOptions::liveness`]) it also asks, every interval, whether the data plane
//!   works.
//! - **heal**: on DOWN, or when the stream breaks or ends, it first re-requests the
//!   connection as it is (same path, same endpoint): that is all a restarted manager or
//!   forwarder needs. With a liveness check, a failed re-request is tried again after a
//!   backoff for as long as the check says the data plane works (only the control plane
//!   is broken: moving the connection would break a working data plane). If the
//!   re-request fails (and no liveness check vouches for the data plane), or when the
//!   liveness check said the data plane is dead, it **reselects**: the reselect function
//!   ([`default_reselect`]: clear the endpoint name and the mechanism) prepares the
//!   last good request, heal marks it RESELECT_REQUESTED, and `begin` closes the old
//!   path before sending it (guarantee 6), so every hop selects afresh. Failed reselects
//!   are tried again after a backoff with jitter (100 ms doubling to 5 s by default).
//!   A success starts a new watch of the new path.
//! - **wake-up**: connections that broke together (a forwarder or a manager that died)
//!   wait out their backoffs one by one, up to the longest pause (5 s) after the path
//!   works again. So when a connection of this handler heals (its path works again),
//!   every connection of the same handler that is waiting out a pause cuts it short
//!   (no sooner than the wake-up spread, [`HealOptions::wake_up`], 250 ms by default,
//!   after the pause began), waits a random part of the spread and tries again, at
//!   most 32 such attempts at a time. Nothing wakes a connection while nothing heals,
//!   so a path that stays down is tried only at the backoff's pace; a connection
//!   broken for another reason (its endpoint is gone) is tried again at most once per
//!   spread while others keep healing, not once per heal.
//!
//! Heal publishes nothing; the caller keeps its connection. A Request that the caller
//! makes while heal is healing goes through as usual, and if it succeeds the connection
//! counts as healed.
//!
//! State: per connection (in `begin`'s handle): the last good request (with the
//! connection the chain returned), the running watch/heal task and a generation number
//! fencing off replaced tasks, the request of heal's attempt in flight (to recognise
//! it), the current backoff and how many heals the wake-up had counted at its last
//! attempt. Per handler: the count of heals (a watch channel the waiting connections
//! follow) and the permits of woken attempts. The task is owned by the connection:
//! Close ends it.
//!
//! Failure handled: the next hop, a hop further down or the endpoint dying or
//! restarting; a data plane that stops working (with a liveness check); a next hop that
//! cannot be subscribed to (healed like a broken stream, after a backoff, so a hop that
//! always refuses does not cause a tight loop; a next hop without a MonitorConnection
//! service is only watched by the liveness check). Without a `begin` before it heal
//! passes calls through untouched.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use nsm_proto::connection::{Connection, State};
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use super::monitor_relay::{NextHop, DEFAULT_SUBSCRIBE_TIMEOUT};
use crate::core::rt::begin::FromEvent;
use crate::core::rt::conn_task::ConnTask;
use crate::core::rt::Backoff;
use crate::core::{ConnHandle, Cx, Handler, Next};
use crate::transport::Channels;
use crate::{Error, Result};

/// Prepares the request of a reselect from the last good one.
pub type ReselectFn = Arc<dyn Fn(&mut NetworkServiceRequest) + Send + Sync>;

/// Told of what heal does to which connection ([`HealOptions::observer`]): the event
/// and the connection's id (as `begin` knows it: the id of the caller's connection).
pub type HealObserver = Arc<dyn Fn(HealEvent, &str) + Send + Sync>;

/// What heal tells its observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealEvent {
    /// A connection was found broken (DOWN, its next hop's stream broke or ended, or
    /// the liveness check failed): heal starts healing it.
    Broken,
    /// A broken connection works again (heal's attempt or the caller's request
    /// succeeded).
    Healed,
}

/// Says whether the data plane of a connection works.
pub type LivenessFn = Arc<dyn Fn(&Connection) -> BoxFuture<'static, bool> + Send + Sync>;

/// Default pause between two liveness checks.
pub const DEFAULT_LIVENESS_INTERVAL: Duration = Duration::from_secs(1);
/// Default time a liveness check may take; a check that takes longer says "dead".
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_millis(500);
/// Default first pause between two failed heal attempts.
pub const DEFAULT_BACKOFF_START: Duration = Duration::from_millis(100);
/// Default longest pause between two failed heal attempts.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Default spread of the attempts of woken connections (see the module docs,
/// "wake-up"): each waits a random part of it.
pub const DEFAULT_WAKE_SPREAD: Duration = Duration::from_millis(250);
/// Default number of woken connections that may be attempting at once.
pub const DEFAULT_WAKE_CONCURRENCY: usize = 32;

/// The default reselect: forget the endpoint and the mechanism, so the forwarder and
/// the endpoint are selected afresh, and say RESELECT_REQUESTED.
pub fn default_reselect(req: &mut NetworkServiceRequest) {
    let conn = req.connection.get_or_insert_with(Default::default);
    conn.network_service_endpoint_name.clear();
    conn.mechanism = None;
    conn.state = State::ReselectRequested as i32;
}

/// What [`heal`] is made of.
#[derive(Clone)]
#[must_use]
pub struct HealOptions {
    channels: Channels,
    reselect: ReselectFn,
    liveness: Option<LivenessFn>,
    liveness_interval: Duration,
    liveness_timeout: Duration,
    backoff: Backoff,
    subscribe_timeout: Duration,
    observer: Option<HealObserver>,
    /// `None`: no wake-ups.
    wake_spread: Option<Duration>,
    wake_concurrency: usize,
}

impl fmt::Debug for HealOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealOptions")
            .field("liveness", &self.liveness.is_some())
            .field("liveness_interval", &self.liveness_interval)
            .field("liveness_timeout", &self.liveness_timeout)
            .field("backoff", &self.backoff)
            .field("subscribe_timeout", &self.subscribe_timeout)
            .field("observer", &self.observer.is_some())
            .field("wake_spread", &self.wake_spread)
            .field("wake_concurrency", &self.wake_concurrency)
            .finish_non_exhaustive()
    }
}

impl HealOptions {
    /// Heal that subscribes to next hops through `channels` (share the client's pool),
    /// with the default reselect and no liveness check.
    pub fn new(channels: Channels) -> Self {
        HealOptions {
            channels,
            reselect: Arc::new(default_reselect),
            liveness: None,
            liveness_interval: DEFAULT_LIVENESS_INTERVAL,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            backoff: Backoff::new(DEFAULT_BACKOFF_START, DEFAULT_BACKOFF_MAX),
            subscribe_timeout: DEFAULT_SUBSCRIBE_TIMEOUT,
            observer: None,
            wake_spread: Some(DEFAULT_WAKE_SPREAD),
            wake_concurrency: DEFAULT_WAKE_CONCURRENCY,
        }
    }

    /// Prepares reselect requests with `f` instead of [`default_reselect`] (for example
    /// to add a label). Heal marks the result RESELECT_REQUESTED either way.
    pub fn reselect(
        mut self,
        f: impl Fn(&mut NetworkServiceRequest) + Send + Sync + 'static,
    ) -> Self {
        self.reselect = Arc::new(f);
        self
    }

    /// Checks the data plane with `check` every interval; when it says `false` (or does
    /// not answer within the liveness timeout) the connection is reselected.
    pub fn liveness(mut self, check: LivenessFn) -> Self {
        self.liveness = Some(check);
        self
    }

    /// The pause between two liveness checks (default [`DEFAULT_LIVENESS_INTERVAL`]).
    pub fn liveness_interval(mut self, interval: Duration) -> Self {
        self.liveness_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long one liveness check may take (default [`DEFAULT_LIVENESS_TIMEOUT`]).
    pub fn liveness_timeout(mut self, timeout: Duration) -> Self {
        self.liveness_timeout = timeout;
        self
    }

    /// The pause after the first failed attempt and the longest pause; each failure
    /// doubles it, with the jitter of [`Backoff`] (defaults [`DEFAULT_BACKOFF_START`],
    /// [`DEFAULT_BACKOFF_MAX`]).
    pub fn backoff(mut self, start: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(start, max);
        self
    }

    /// How long subscribing to the next hop may take before the stream counts as broken
    /// (default [`DEFAULT_SUBSCRIBE_TIMEOUT`]).
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout;
        self
    }

    /// Calls `f` with each [`HealEvent`] and the id of the connection it is about (for
    /// counting and timing heals per connection; it must not block).
    pub fn observer(mut self, f: impl Fn(HealEvent, &str) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(f));
        self
    }

    /// When a connection heals, the connections waiting out a pause try again after a
    /// random part of `spread`, at most `concurrency` (at least 1) at a time (defaults
    /// [`DEFAULT_WAKE_SPREAD`], [`DEFAULT_WAKE_CONCURRENCY`]; see the module docs,
    /// "wake-up").
    pub fn wake_up(mut self, spread: Duration, concurrency: usize) -> Self {
        self.wake_spread = Some(spread);
        self.wake_concurrency = concurrency.max(1);
        self
    }

    /// No wake-ups: each connection waits out its whole pause, whatever heals (for
    /// comparison; see the module docs, "wake-up").
    pub fn no_wake_up(mut self) -> Self {
        self.wake_spread = None;
        self
    }

    fn tell(&self, event: HealEvent, connection: &str) {
        if let Some(f) = &self.observer {
            f(event, connection);
        }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Heal {
    opts: Arc<HealOptions>,
    wake: Arc<WakeUp>,
}

/// What wakes the connections of one handler that wait out a pause: see the module
/// docs, "wake-up".
struct WakeUp {
    /// How many connections of the handler healed so far.
    heals: watch::Sender<u64>,
    /// One per woken attempt in flight.
    permits: Arc<Semaphore>,
}

impl WakeUp {
    fn healed(&self) {
        self.heals.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn count(&self) -> u64 {
        *self.heals.borrow()
    }
}

impl fmt::Debug for Heal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heal").field("opts", &self.opts).finish()
    }
}

/// The `heal` handler.
pub fn heal(options: HealOptions) -> Heal {
    let wake = Arc::new(WakeUp {
        heals: watch::Sender::new(0),
        permits: Arc::new(Semaphore::new(options.wake_concurrency)),
    });
    Heal {
        opts: Arc::new(options),
        wake,
    }
}

fn is_reselect(req: &NetworkServiceRequest) -> bool {
    req.connection
        .as_ref()
        .is_some_and(|c| c.state == State::ReselectRequested as i32)
}

/// Per connection: see the module docs, "State".
#[derive(Default)]
struct HealState(Mutex<HealInner>);

#[derive(Default)]
struct HealInner {
    /// The watch/heal task, tagged with the next hop it follows; a task acts only
    /// while its generation is current.
    task: ConnTask<Option<NextHop>>,
    /// A task is healing (the connection is known broken).
    healing: bool,
    /// The request of heal's own attempt in flight.
    own: Option<NetworkServiceRequest>,
    /// Heal's attempt in flight follows a wake-up: it takes a permit once its turn
    /// comes (not while it waits behind the connection's other operations, which
    /// would hold a permit that others could use).
    own_woken: bool,
    /// The last good request, with the connection the chain returned.
    last: Option<NetworkServiceRequest>,
    /// Failed attempts since the path was last healthy: the next pause's attempt.
    failures: u32,
    /// The handler's count of heals when this connection's last attempt started: a
    /// heal after it wakes the connection from its pause.
    seen_heals: u64,
}

impl HealState {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl HealInner {
    fn stop(&mut self) {
        self.healing = false;
        self.task.stop();
    }
}

/// Why the connection needs healing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The control plane says DOWN, or its stream broke: re-request, then reselect.
    Broken,
    /// The liveness check failed: reselect at once.
    Dead,
}

/// What to do first when a task starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Watch,
    Reselect,
}

impl Heal {
    /// After a success: remember the request, keep the running watch if it still
    /// follows the same next hop, else start a new one.
    fn established(
        &self,
        cx: &Cx,
        handle: &ConnHandle,
        state: &Arc<HealState>,
        mut req: NetworkServiceRequest,
        conn: &Connection,
    ) {
        let hop = NextHop::of(cx, conn);
        req.connection = Some(conn.clone());
        let mut inner = state.lock();
        inner.last = Some(req);
        inner.own = None;
        let was_healing = inner.healing;
        if !was_healing && inner.task.runs_for(&hop) {
            return;
        }
        inner.stop();
        if hop.is_none() && self.opts.liveness.is_none() {
            debug!(connection.id = %conn.id, "heal: no next hop to follow and no liveness check");
            return;
        }
        if was_healing {
            info!(connection.id = %conn.id, "heal: connection healed");
            self.opts.tell(HealEvent::Healed, handle.id());
            self.wake.healed();
        }
        self.spawn(handle, state, &mut inner, hop, Start::Watch);
    }

    fn spawn(
        &self,
        handle: &ConnHandle,
        state: &Arc<HealState>,
        inner: &mut HealInner,
        hop: Option<NextHop>,
        start: Start,
    ) {
        inner.seen_heals = self.wake.count();
        let task = |generation| {
            Task {
                opts: self.opts.clone(),
                wake: self.wake.clone(),
                handle: handle.clone(),
                state: state.clone(),
                generation,
                hop: hop.clone(),
            }
            .run(start)
        };
        inner.task.restart(handle.cancel_token(), hop.clone(), task);
    }
}

/// One watch-then-heal task of a connection.
struct Task {
    opts: Arc<HealOptions>,
    wake: Arc<WakeUp>,
    handle: ConnHandle,
    state: Arc<HealState>,
    generation: u64,
    hop: Option<NextHop>,
}

/// The next item of an optional stream; pending forever without one.
async fn next_of(
    events: &mut Option<BoxStream<'static, Result<Connection>>>,
) -> Option<Result<Connection>> {
    match events {
        Some(s) => s.next().await,
        None => futures::future::pending().await,
    }
}

/// The next tick of an optional interval; pending forever without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => futures::future::pending().await,
    }
}

impl Task {
    fn id(&self) -> &str {
        self.handle.id()
    }

    fn is_current(&self) -> bool {
        self.state.lock().task.is_current(self.generation)
    }

    async fn run(self, start: Start) {
        let trigger = match start {
            Start::Reselect => Trigger::Dead,
            Start::Watch => match self.watch().await {
                Some(t) => t,
                None => return,
            },
        };
        self.heal(trigger).await;
    }

    /// Waits until the connection needs healing; `None` when there is nothing to watch.
    async fn watch(&self) -> Option<Trigger> {
        let mut events = None;
        if let Some(hop) = &self.hop {
            match hop
                .follow(&self.opts.channels, self.opts.subscribe_timeout)
                .await
            {
                Ok(s) => events = Some(s),
                Err(e) if e.code() == tonic::Code::Unimplemented => {
                    warn!(connection.id = %self.id(), next = %hop.url, "heal: the next hop has no monitor; only the liveness check watches")
                }
                Err(e) => {
                    warn!(connection.id = %self.id(), next = %hop.url, error = %e, "heal: cannot follow the next hop");
                    self.pause().await;
                    return Some(Trigger::Broken);
                }
            }
        }
        let mut liveness = self.opts.liveness.as_ref().map(|_| {
            let every = self.opts.liveness_interval;
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        if events.is_none() && liveness.is_none() {
            return None;
        }
        // Until the stream has shown the connection working, a failure may be this
        // hop's own doing (a next hop that does not know us): pause before healing.
        let mut healthy = false;
        loop {
            tokio::select! {
                item = next_of(&mut events) => match item {
                    Some(Ok(copy)) if copy.state == State::Down as i32 => {
                        warn!(connection.id = %self.id(), "heal: the path reports the connection DOWN");
                        break;
                    }
                    Some(Ok(_)) => {
                        if !healthy {
                            healthy = true;
                            self.state.lock().failures = 0;
                        }
                    }
                    Some(Err(e)) => {
                        warn!(connection.id = %self.id(), error = %e, "heal: the next hop's monitor stream broke");
                        break;
                    }
                    None => {
                        warn!(connection.id = %self.id(), "heal: the next hop's monitor stream ended");
                        break;
                    }
                },
                _ = tick(&mut liveness) => {
                    if !self.alive().await {
                        warn!(connection.id = %self.id(), "heal: the liveness check failed");
                        return Some(Trigger::Dead);
                    }
                }
            }
        }
        if !healthy {
            self.pause().await;
        }
        Some(Trigger::Broken)
    }

    async fn alive(&self) -> bool {
        let Some(check) = self.opts.liveness.clone() else {
            return true;
        };
        let conn = self
            .state
            .lock()
            .last
            .as_ref()
            .and_then(|r| r.connection.clone())
            .unwrap_or_default();
        matches!(
            tokio::time::timeout(self.opts.liveness_timeout, check(&conn)).await,
            Ok(true)
        )
    }

    /// Sleeps the current backoff and counts the failure. A heal of another
    /// connection of the handler since this one's last attempt cuts the pause short
    /// (not before the wake-up spread has passed): then it waits a random part of the
    /// spread and says it was woken (its attempt then takes a permit once its turn
    /// comes).
    async fn pause(&self) -> bool {
        let (attempt, seen) = {
            let mut inner = self.state.lock();
            let attempt = inner.failures;
            inner.failures = inner.failures.saturating_add(1);
            (attempt, inner.seen_heals)
        };
        let pause = self.opts.backoff.wait(attempt);
        debug!(connection.id = %self.id(), ?pause, "heal: backing off");
        let Some(spread) = self.opts.wake_spread else {
            tokio::time::sleep(pause).await;
            return false;
        };
        let mut heals = self.wake.heals.subscribe();
        let woken = async {
            tokio::time::sleep(pause.min(spread)).await;
            if heals.wait_for(|n| *n != seen).await.is_err() {
                futures::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => return false,
            _ = woken => {}
        }
        let spread = spread.mul_f64(rand::random_range(0.0..1.0));
        debug!(connection.id = %self.id(), ?spread, "heal: another connection healed, trying again");
        tokio::time::sleep(spread).await;
        true
    }

    /// Re-requests (unless `trigger` says reselect at once), then reselects until a
    /// request succeeds or the connection ends.
    async fn heal(&self, trigger: Trigger) {
        {
            let mut inner = self.state.lock();
            if !inner.task.is_current(self.generation) {
                return;
            }
            inner.healing = true;
        }
        self.opts.tell(HealEvent::Broken, self.id());
        let mut reselect = trigger == Trigger::Dead;
        // Whether the next attempt follows a wake-up.
        let mut woken = false;
        loop {
            let req = {
                let mut inner = self.state.lock();
                if !inner.task.is_current(self.generation) {
                    return;
                }
                let Some(mut req) = inner.last.clone() else {
                    return;
                };
                if reselect {
                    (self.opts.reselect)(&mut req);
                    req.connection.get_or_insert_with(Default::default).state =
                        State::ReselectRequested as i32;
                }
                inner.own = Some(req.clone());
                inner.own_woken = woken;
                inner.seen_heals = self.wake.count();
                req
            };
            if reselect {
                info!(connection.id = %self.id(), "heal: reselecting");
            } else {
                info!(connection.id = %self.id(), "heal: re-requesting the same path");
            }
            // The same as `request_event(None)` for a re-request (the last good request
            // is what begin would replay), but heal can recognise its own attempt.
            let outcome = self.handle.request_event(Some(req)).await;
            {
                let mut inner = self.state.lock();
                if inner.task.is_current(self.generation) {
                    inner.own = None;
                }
            }
            match outcome {
                // The success started a new task and stopped this one.
                Ok(_) => return,
                Err(e) => {
                    if self.handle.is_closed() || !self.is_current() {
                        return;
                    }
                    warn!(connection.id = %self.id(), error = %e, reselect, "heal: attempt failed");
                    if reselect {
                        woken = self.pause().await;
                    } else if self.opts.liveness.is_some() {
                        // While the data plane works only the control plane is broken:
                        // re-request the same path again, and reselect only once the
                        // check says the data plane is dead too.
                        woken = self.pause().await;
                        if self.alive().await {
                            continue;
                        }
                        warn!(connection.id = %self.id(), "heal: the liveness check failed");
                    }
                    reselect = true;
                }
            }
        }
    }
}

#[async_trait]
impl Handler for Heal {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let Some(handle) = cx.conn().cloned() else {
            return next.request(cx, req).await;
        };
        let state = handle.state::<HealState>();
        // Only an event can be heal's attempt: a caller's request with the same content
        // (a refresh of an unchanged connection) is the caller's. `own` stays set until
        // heal's task has the outcome, so whichever identical event runs first, heal's
        // own comes back to it past retry.
        let (own, woken) = {
            let inner = state.lock();
            let own = cx.ext().get::<FromEvent>().is_some() && inner.own.as_ref() == Some(&req);
            (own, own && inner.own_woken)
        };
        let _permit = match woken {
            true => self.wake.permits.clone().acquire_owned().await.ok(),
            false => None,
        };
        match next.request(cx, req.clone()).await {
            Ok(conn) => {
                self.established(cx, &handle, &state, req, &conn);
                Ok(conn)
            }
            // Heal's own attempt: straight back to heal's loop, past retry.
            Err(e) if own => Err(Error::Cancelled(format!("heal attempt failed: {e}"))),
            Err(e) => {
                // The caller's own reselect failed after begin closed the old path:
                // keep trying to reselect, unless something else already heals.
                let mut inner = state.lock();
                if is_reselect(&req)
                    && !inner.task.is_started()
                    && inner.last.is_some()
                    && !handle.is_closed()
                {
                    warn!(connection.id = %handle.id(), error = %e, "heal: the caller's reselect failed; heal keeps trying");
                    self.spawn(&handle, &state, &mut inner, None, Start::Reselect);
                }
                Err(e)
            }
        }
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let own_reselect = match cx.conn().and_then(|h| h.get_state::<HealState>()) {
            Some(state) => {
                let mut inner = state.lock();
                // begin closes the old path of heal's own reselect: heal goes on.
                let own = cx.ext().get::<FromEvent>().is_some()
                    && inner.own.as_ref().is_some_and(is_reselect);
                if !own {
                    inner.stop();
                }
                own
            }
            None => false,
        };
        let result = next.close(cx, conn).await;
        match result {
            Err(e) if own_reselect => Err(Error::Cancelled(format!(
                "heal: closing the old path failed: {e}"
            ))),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::handlers::test_support::{eventually, memory_url, serve_nse, TestHop};
    use crate::handlers::{begin, client_url, retry, update_path};
    use crate::transport::{grpc_client, Url};
    use nsm_proto::connection::ConnectionEventType;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn nsc(url: &Url, opts: HealOptions) -> Chain {
        nsc_backing_off(
            url,
            opts,
            Duration::from_millis(10),
            Duration::from_millis(50),
        )
    }

    fn nsc_backing_off(url: &Url, opts: HealOptions, start: Duration, max: Duration) -> Chain {
        Chain::builder()
            .push(update_path("nsc"))
            .push(begin())
            .push(retry())
            .push(heal(opts.backoff(start, max)))
            .push(client_url(url.clone()))
            .push(grpc_client(Channels::new()))
            .build()
    }

    /// Heal options whose liveness check, run every `interval`, finds the data plane
    /// dead while the returned flag is set.
    fn switchable_liveness(interval: Duration) -> (HealOptions, Arc<AtomicBool>) {
        let dead = Arc::new(AtomicBool::new(false));
        let check = dead.clone();
        let opts = HealOptions::new(Channels::new())
            .liveness(Arc::new(move |_: &Connection| {
                let dead = check.load(Ordering::SeqCst);
                Box::pin(async move { !dead })
            }))
            .liveness_interval(interval);
        (opts, dead)
    }

    fn request() -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                network_service: "svc".into(),
                network_service_endpoint_name: "nse".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_default_reselect_forgets_the_endpoint_and_mechanism() {
        let mut req = request();
        req.connection.as_mut().unwrap().mechanism = Some(Default::default());
        default_reselect(&mut req);
        let c = req.connection.unwrap();
        assert!(c.network_service_endpoint_name.is_empty());
        assert!(c.mechanism.is_none());
        assert_eq!(c.state, State::ReselectRequested as i32);
    }

    #[tokio::test]
    async fn a_down_event_re_requests_the_same_path() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let chain = nsc(&u, HealOptions::new(Channels::new()));
        let conn = chain.request(&mut Cx::client(), request()).await.unwrap();
        eventually("heal subscribed", || monitor.subscriber_count() == 1).await;
        let nse_id = conn.path.as_ref().unwrap().path_segments[1].id.clone();
        let mut down = monitor.get(&nse_id).unwrap();
        down.state = State::Down as i32;
        monitor.publish(ConnectionEventType::Update, down);
        eventually("a re-request reached the endpoint", || nse.requests() == 2).await;
        let again = nse.passed(1);
        assert_eq!(again.network_service_endpoint_name, "nse", "same path");
        assert_ne!(again.state, State::ReselectRequested as i32);
        assert_eq!(nse.closes(), 0, "nothing was closed");
        chain.close(&mut Cx::client(), conn).await.unwrap();
    }

    #[tokio::test]
    async fn the_observer_is_told_of_each_break_and_heal() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let chain = nsc(
            &u,
            HealOptions::new(Channels::new())
                .observer(move |e, id| seen.lock().unwrap().push((e, id.to_string()))),
        );
        let conn = chain.request(&mut Cx::client(), request()).await.unwrap();
        eventually("heal subscribed", || monitor.subscriber_count() == 1).await;
        // A refresh of a healthy connection is no event.
        let again = NetworkServiceRequest {
            connection: Some(conn.clone()),
            ..Default::default()
        };
        chain.request(&mut Cx::client(), again).await.unwrap();
        assert!(events.lock().unwrap().is_empty());
        let nse_id = conn.path.as_ref().unwrap().path_segments[1].id.clone();
        let mut down = monitor.get(&nse_id).unwrap();
        down.state = State::Down as i32;
        monitor.publish(ConnectionEventType::Update, down);
        eventually("healed", || events.lock().unwrap().len() == 2).await;
        assert_eq!(
            *events.lock().unwrap(),
            [
                (HealEvent::Broken, conn.id.clone()),
                (HealEvent::Healed, conn.id.clone())
            ]
        );
        chain.close(&mut Cx::client(), conn).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_re_request_reselects_and_backs_off_without_waiting_for_retry() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let chain = nsc(
            &u,
            HealOptions::new(Channels::new()).reselect(|req| {
                default_reselect(req);
                if let Some(c) = req.connection.as_mut() {
                    c.labels.insert("reselected".into(), "yes".into());
                }
            }),
        );
        let conn = chain.request(&mut Cx::client(), request()).await.unwrap();
        eventually("heal subscribed", || monitor.subscriber_count() == 1).await;
        nse.fail.store(true, Ordering::SeqCst);
        let nse_id = conn.path.as_ref().unwrap().path_segments[1].id.clone();
        let mut down = monitor.get(&nse_id).unwrap();
        down.state = State::Down as i32;
        let started = tokio::time::Instant::now();
        monitor.publish(ConnectionEventType::Update, down);
        // The re-request fails; the reselect closes the old path first.
        eventually("the reselect closed the old path", || nse.closes() == 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        nse.fail.store(false, Ordering::SeqCst);
        eventually("a reselect reached the endpoint", || nse.requests() == 2).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "heal's attempts were held up by retry: {:?}",
            started.elapsed()
        );
        let again = nse.passed(1);
        assert_eq!(again.labels["reselected"], "yes");
        assert_eq!(again.state, State::ReselectRequested as i32);
        assert_eq!(nse.closes(), 1, "the old path closed once");
        chain.close(&mut Cx::client(), conn).await.unwrap();
        assert_eq!(nse.closes(), 2, "Close reached the new path");
    }

    #[tokio::test]
    async fn a_heal_wakes_the_connections_waiting_out_their_backoff() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let healed = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let seen = healed.clone();
        // Every pause is at least 48 s: within the test only a wake-up heals.
        let long = Duration::from_secs(60);
        let chain = nsc_backing_off(
            &u,
            HealOptions::new(Channels::new())
                .wake_up(Duration::from_millis(50), 2)
                .observer(move |e, id| {
                    if e == HealEvent::Healed {
                        seen.lock().unwrap().insert(id.to_string());
                    }
                }),
            long,
            long,
        );
        let mut conns = Vec::new();
        for n in 0..6 {
            let mut req = request();
            req.connection.as_mut().unwrap().id = format!("conn-{n}");
            conns.push(chain.request(&mut Cx::client(), req).await.unwrap());
        }
        eventually("heal subscribed", || monitor.subscriber_count() == 1).await;
        // The path breaks under every connection (each saw it work first, so none
        // pauses before its first attempt) and stays broken for a while.
        nse.fail.store(true, Ordering::SeqCst);
        for conn in &conns {
            let nse_id = conn.path.as_ref().unwrap().path_segments[1].id.clone();
            let up = monitor.get(&nse_id).unwrap();
            monitor.publish(ConnectionEventType::Update, up.clone());
            let mut down = up;
            down.state = State::Down as i32;
            monitor.publish(ConnectionEventType::Update, down);
        }
        // Each re-requests, then reselects (closing its old path), fails and pauses.
        eventually("every reselect failed", || {
            nse.attempts_where(is_reselect) == conns.len()
        })
        .await;
        let before = nse.attempts();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(nse.attempts(), before, "nothing tries while nothing heals");
        // The path works again; one connection heals by its caller's own request.
        nse.fail.store(false, Ordering::SeqCst);
        let first = chain
            .request(
                &mut Cx::client(),
                NetworkServiceRequest {
                    connection: Some(conns[0].clone()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        eventually("the others healed too", || {
            healed.lock().unwrap().len() == conns.len()
        })
        .await;
        assert_eq!(
            nse.attempts(),
            before + conns.len(),
            "one attempt per connection after the path came back"
        );
        chain.close(&mut Cx::client(), first).await.unwrap();
        for conn in conns.into_iter().skip(1) {
            chain.close(&mut Cx::client(), conn).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_failing_liveness_check_reselects() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (_server, _monitor) = serve_nse(&u, &nse).await;
        let (opts, dead) = switchable_liveness(Duration::from_millis(20));
        let chain = nsc(&u, opts);
        let conn = chain.request(&mut Cx::client(), request()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(nse.requests(), 1, "a live data plane is left alone");
        dead.store(true, Ordering::SeqCst);
        eventually("reselected", || nse.requests() >= 2).await;
        dead.store(false, Ordering::SeqCst);
        let again = nse.passed(1);
        assert_eq!(again.state, State::ReselectRequested as i32);
        assert!(again.network_service_endpoint_name.is_empty());
        chain.close(&mut Cx::client(), conn).await.unwrap();
    }

    #[tokio::test]
    async fn a_callers_refresh_equal_to_heals_queued_attempt_stays_the_callers() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let chain = nsc(&u, HealOptions::new(Channels::new()));
        let conn = chain.request(&mut Cx::client(), request()).await.unwrap();
        eventually("heal subscribed", || monitor.subscriber_count() == 1).await;
        nse.fail.store(true, Ordering::SeqCst);
        // The caller's refresh fails at the endpoint, which reports the connection DOWN;
        // heal queues its re-request (the same request) behind the caller's, whose
        // retry tries again meanwhile.
        let started = tokio::time::Instant::now();
        let err = chain
            .request(
                &mut Cx::client().with_timeout(Duration::from_millis(700)),
                NetworkServiceRequest {
                    connection: Some(conn.clone()),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_ne!(
            err.code(),
            tonic::Code::Cancelled,
            "the caller's retry was cut short as if it were heal's attempt: {err}"
        );
        assert!(started.elapsed() >= Duration::from_millis(500), "{err}");
        assert!(nse.attempts() >= 3);
        nse.fail.store(false, Ordering::SeqCst);
        chain.close(&mut Cx::client(), conn).await.unwrap();
    }

    #[tokio::test]
    async fn with_a_live_data_plane_a_failed_re_request_is_tried_again_not_reselected() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let (opts, dead) = switchable_liveness(Duration::from_secs(60));
        let chain = nsc(&u, opts);
        let conn = chain.request(&mut Cx::client(), request()).await.unwrap();
        eventually("heal subscribed", || monitor.subscriber_count() == 1).await;
        nse.fail.store(true, Ordering::SeqCst);
        let nse_id = conn.path.as_ref().unwrap().path_segments[1].id.clone();
        let mut down = monitor.get(&nse_id).unwrap();
        down.state = State::Down as i32;
        monitor.publish(ConnectionEventType::Update, down);
        eventually("heal re-requested three times", || nse.attempts() >= 4).await;
        assert_eq!(nse.attempts_where(is_reselect), 0, "no reselect");
        assert_eq!(nse.closes(), 0, "the path stays");

        // The data plane dies too: now heal reselects (closing the old path first).
        dead.store(true, Ordering::SeqCst);
        eventually("reselected", || nse.attempts_where(is_reselect) >= 1).await;
        assert_eq!(nse.closes(), 1);
        dead.store(false, Ordering::SeqCst);
        nse.fail.store(false, Ordering::SeqCst);
        eventually("healed", || nse.requests() == 2).await;
        chain.close(&mut Cx::client(), conn).await.unwrap();
    }

    #[tokio::test]
    async fn close_ends_the_heal_task_even_while_it_heals() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (server, _monitor) = serve_nse(&u, &nse).await;
        let chain = nsc(&u, HealOptions::new(Channels::new()));
        let conn = chain.request(&mut Cx::client(), request()).await.unwrap();
        server.kill();
        // Heal cannot reach anything now and keeps trying (every 50 ms at most).
        tokio::time::sleep(Duration::from_millis(100)).await;
        chain.close(&mut Cx::client(), conn).await.unwrap();
        // Were heal still trying, it would reach the endpoint served again.
        let back = Arc::new(TestHop::default());
        let (_server, _monitor) = serve_nse(&u, &back).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(back.requests(), 0, "heal went on after Close");
    }

    #[tokio::test]
    async fn a_refresh_keeps_the_watch() {
        let u = memory_url("heal-test");
        let nse = Arc::new(TestHop::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let channels = Channels::new();
        let chain = nsc(&u, HealOptions::new(channels.clone()));
        let conn = chain.request(&mut Cx::client(), request()).await.unwrap();
        eventually("heal subscribed", || monitor.subscriber_count() == 1).await;
        eventually("heal follows", || channels.monitor_followers() == 1).await;
        let again = NetworkServiceRequest {
            connection: Some(conn.clone()),
            ..Default::default()
        };
        chain.request(&mut Cx::client(), again).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(monitor.subscriber_count(), 1);
        assert_eq!(channels.monitor_followers(), 1);
        assert_eq!(nse.requests(), 2, "no heal request on a healthy connection");
        chain.close(&mut Cx::client(), conn).await.unwrap();
        eventually("heal stopped following", || {
            channels.monitor_followers() == 0
        })
        .await;
        // The shared stream stays open for the next connection a while.
        assert_eq!(monitor.subscriber_count(), 1);
        assert_eq!(channels.shared_monitors(), 1);
    }
}
