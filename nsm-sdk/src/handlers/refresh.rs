//! `refresh`: re-requests a connection before the tokens in its path expire.
//!
//! What it does (client side, after `begin`): after every successful Request, including
//! the refreshes it queued itself (they re-enter the chain after `begin`), it looks at
//! the earliest `expires` among the path's segments and schedules one re-request of the
//! connection ([`ConnHandle::request_event`]) at a random fraction of the time left
//! until then: uniformly between 0.2 and 0.4 (exactly 1/3 when the path has a single
//! segment), docs/SCENARIOS.md 6.11. The randomness is the point: clients that connected
//! together do not refresh together, so a restart or a burst of connections does not
//! turn into a refresh storm every few minutes. A path without any `expires` is not
//! refreshed.
//!
//! How the pieces fit: [`update_token`](mod@super::update_token) writes each hop's token
//! expiry into its path segment; this handler re-requests before the earliest of them,
//! which gives every hop a fresh token; the server-side [`timeout`](mod@super::timeout)
//! closes a connection whose caller stopped refreshing.
//!
//! State: per connection ([`ConnHandle::state`]), the pending timer (a task owned by the
//! connection, under a child of its cancellation token), the time the path expires and
//! the number of failed refreshes in a row. One timer per connection: a new Request
//! replaces it, a Close cancels it, and the end of the connection cancels it in any
//! case. [`Refresh::pending`] counts the timers alive.
//!
//! Failure handled: a failed refresh (the Request fails, or is cut off by `begin`'s
//! deadline; not one that failed as Cancelled, which is how `heal` fails its own
//! attempts) is retried with exponential backoff (200 ms, doubling, capped at 5 s, each
//! wait jittered by ±20 %) until the path's earliest expiry; after that it gives up
//! (the servers close their side; `heal` is the tool to get a new connection). A failed
//! first Request schedules nothing. The wait before a refresh is never shorter than
//! [`MIN_REFRESH_DELAY`], so a path that comes back already expired is re-requested at
//! most ten times a second, never in a tight loop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::core::rt::count_guard::CountGuard;
use crate::core::rt::Backoff;
use crate::core::{spawn_owned, ConnHandle, Cx, Handler, Next};
use crate::{Error, Result};

/// The fractions of the time left before the earliest expiry at which a connection whose
/// path has several segments is refreshed (drawn uniformly between them).
pub const DEFAULT_FRACTION: (f64, f64) = (0.2, 0.4);
/// The fraction used when the path has a single segment.
pub const SINGLE_SEGMENT_FRACTION: f64 = 1.0 / 3.0;
/// The first wait after a failed refresh.
pub const DEFAULT_RETRY_START: Duration = Duration::from_millis(200);
/// The longest wait between two tries of a failing refresh.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);
/// The shortest wait before a refresh, whatever the path says.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
struct Config {
    fraction: (f64, f64),
    single: f64,
    retry: Backoff,
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct Refresh {
    config: Config,
    pending: Arc<AtomicUsize>,
}

/// The `refresh` handler with the defaults of docs/SCENARIOS.md 6.11.
pub fn refresh() -> Refresh {
    Refresh {
        config: Config {
            fraction: DEFAULT_FRACTION,
            single: SINGLE_SEGMENT_FRACTION,
            retry: Backoff::new(DEFAULT_RETRY_START, DEFAULT_RETRY_MAX),
        },
        pending: Arc::new(AtomicUsize::new(0)),
    }
}

impl Refresh {
    /// Refresh at a fraction of the time left drawn uniformly from `min..max` (paths
    /// with several segments). Values are clamped to `0..=1`.
    pub fn fraction(mut self, min: f64, max: f64) -> Self {
        let min = clamp_fraction(min);
        self.config.fraction = (min, clamp_fraction(max).max(min));
        self
    }

    /// Refresh at this fraction of the time left when the path has a single segment.
    pub fn single_segment_fraction(mut self, fraction: f64) -> Self {
        self.config.single = clamp_fraction(fraction);
        self
    }

    /// Retry a failed refresh after `start`, doubling up to `max`.
    pub fn backoff(mut self, start: Duration, max: Duration) -> Self {
        self.config.retry = Backoff::new(start, max);
        self
    }

    /// How many refresh timers of this handler are alive (one per refreshed connection);
    /// a cancelled timer's task counts until it has wound down.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

fn clamp_fraction(f: f64) -> f64 {
    if f.is_nan() {
        0.0
    } else {
        f.clamp(0.0, 1.0)
    }
}

/// The refresh state of one connection.
#[derive(Default)]
struct ConnRefresh(Mutex<Slot>);

#[derive(Default)]
struct Slot {
    /// Cancels the pending timer.
    timer: Option<CancellationToken>,
    /// When the path's earliest token expires, as of the last successful Request.
    expires_at: Option<Instant>,
    /// Failed refreshes since the last success.
    failures: u32,
}

impl ConnRefresh {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The time left before the earliest `expires` in the path, and how many segments the
/// path has; `None` when no segment has an expiry.
fn earliest_expiry(conn: &Connection) -> Option<(Duration, usize)> {
    let path = conn.path.as_ref()?;
    let now = SystemTime::now();
    let left = path
        .path_segments
        .iter()
        .filter_map(|s| s.expires.as_ref())
        .map(|ts| match SystemTime::try_from(*ts) {
            Ok(t) => t.duration_since(now).unwrap_or_default(),
            // Beyond what the clock can say: as good as never.
            Err(_) => Duration::MAX,
        })
        .min()?;
    Some((left, path.path_segments.len()))
}

impl Config {
    /// When to refresh a path whose earliest token expires in `left`.
    fn delay(&self, left: Duration, segments: usize) -> Duration {
        let fraction = if segments > 1 {
            let (lo, hi) = self.fraction;
            if hi > lo {
                rand::random_range(lo..hi)
            } else {
                lo
            }
        } else {
            self.single
        };
        left.mul_f64(fraction).max(MIN_REFRESH_DELAY)
    }
}

impl Refresh {
    /// Replaces the connection's timer by one that re-requests it after `delay`.
    fn arm(&self, handle: &ConnHandle, slot: &mut Slot, delay: Duration) {
        let token = handle.cancel_token().child_token();
        if let Some(old) = slot.timer.replace(token.clone()) {
            old.cancel();
        }
        let me = self.clone();
        let h = handle.clone();
        let guard = CountGuard::new(&self.pending);
        let span = tracing::debug_span!("refresh", connection.id = %handle.id());
        let mine = token.clone();
        spawn_owned(
            token,
            async move {
                let _guard = guard;
                tokio::time::sleep(delay).await;
                debug!("refreshing the connection");
                let outcome = h.request_event(None).await;
                if mine.is_cancelled() {
                    // The refresh went through this handler, which armed the next timer.
                    return;
                }
                match outcome {
                    // Cancelled: not retried (see `request`).
                    Err(e) if e.code() == tonic::Code::Cancelled => {}
                    // It never reached this handler, or was cut off on the way back.
                    Err(e) => me.failed(&h, &e),
                    Ok(_) => {}
                }
            }
            .instrument(span),
        );
    }

    /// A Request of the connection succeeded with `conn`.
    fn succeeded(&self, handle: &ConnHandle, conn: &Connection) {
        let state = handle.state::<ConnRefresh>();
        let mut slot = state.lock();
        slot.failures = 0;
        match earliest_expiry(conn) {
            Some((left, segments)) => {
                slot.expires_at = Instant::now().checked_add(left);
                let delay = self.config.delay(left, segments);
                debug!(connection.id = %handle.id(), ?left, ?delay, "refresh scheduled");
                self.arm(handle, &mut slot, delay);
            }
            None => {
                debug!(connection.id = %handle.id(), "no expiry in the path: no refresh");
                slot.expires_at = None;
                disarm(&mut slot);
            }
        }
    }

    /// A Request of an established connection failed: retry before the path expires.
    fn failed(&self, handle: &ConnHandle, error: &Error) {
        if handle.is_closed() {
            return;
        }
        let state = handle.state::<ConnRefresh>();
        let mut slot = state.lock();
        let Some(expires_at) = slot.expires_at else {
            // Never established (or never had an expiry): nothing to keep alive.
            return;
        };
        let delay = self.config.retry.wait(slot.failures);
        slot.failures = slot.failures.saturating_add(1);
        if Instant::now() + delay >= expires_at {
            warn!(connection.id = %handle.id(), error = %error, failures = slot.failures,
                "refresh failed and the path expires before another try; giving up");
            slot.expires_at = None;
            disarm(&mut slot);
            return;
        }
        debug!(connection.id = %handle.id(), error = %error, failures = slot.failures, ?delay,
            "refresh failed; retrying");
        self.arm(handle, &mut slot, delay);
    }
}

fn disarm(slot: &mut Slot) {
    if let Some(t) = slot.timer.take() {
        t.cancel();
    }
}

#[async_trait]
impl Handler for Refresh {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let handle = cx.conn().cloned();
        let out = next.request(cx, req).await;
        match (&out, handle) {
            (Ok(conn), Some(h)) => self.succeeded(&h, conn),
            // Cancelled: the request's owner gave up on it, or it was heal's attempt
            // (heal fails its attempts that way and retries on its own backoff): a
            // refresh retry would only race with heal. The timer set by the last
            // success stays.
            (Err(e), Some(_)) if e.code() == tonic::Code::Cancelled => {
                debug!(error = %e, "cancelled request: no refresh retry")
            }
            (Err(e), Some(h)) => self.failed(&h, e),
            (_, None) => debug!("refresh without a connection handle (no begin before it)"),
        }
        out
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        if let Some(state) = cx.conn().and_then(|h| h.get_state::<ConnRefresh>()) {
            let mut slot = state.lock();
            slot.expires_at = None;
            disarm(&mut slot);
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rt::begin::{begin, Begin};
    use crate::core::Chain;
    use crate::handlers::update_path;
    use nsm_proto::connection::PathSegment;
    use prost_types::Timestamp;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use tokio::time::sleep;

    /// The rest of the path, as the client sees it: gives every segment a token that
    /// expires after its lifetime, and records when each connection was requested.
    #[derive(Default)]
    struct Far {
        lifetimes: Mutex<Vec<Duration>>,
        calls: Mutex<HashMap<String, Vec<Instant>>>,
        fail_next: AtomicUsize,
        cancel_next: AtomicUsize,
        fail_always: AtomicBool,
        slow_next: Mutex<Option<Duration>>,
        closes: AtomicUsize,
    }

    impl Far {
        fn with_lifetimes(lifetimes: &[u64]) -> Arc<Far> {
            let far = Far::default();
            *far.lifetimes.lock().unwrap() =
                lifetimes.iter().map(|s| Duration::from_secs(*s)).collect();
            Arc::new(far)
        }

        fn calls(&self, id: &str) -> Vec<Instant> {
            self.calls
                .lock()
                .unwrap()
                .get(id)
                .cloned()
                .unwrap_or_default()
        }
    }

    #[async_trait]
    impl Handler for Arc<Far> {
        async fn request(
            &self,
            cx: &mut Cx,
            mut req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let conn = req.connection.get_or_insert_with(Default::default);
            self.calls
                .lock()
                .unwrap()
                .entry(conn.id.clone())
                .or_default()
                .push(Instant::now());
            let slow = self.slow_next.lock().unwrap().take();
            if let Some(d) = slow {
                sleep(d).await;
            }
            let fail_once = self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail_once || self.fail_always.load(Ordering::SeqCst) {
                return Err(Error::unavailable("injected failure"));
            }
            let cancel_once = self
                .cancel_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if cancel_once {
                return Err(Error::Cancelled("injected: given up by its owner".into()));
            }
            let path = conn.path.get_or_insert_with(Default::default);
            let lifetimes = self.lifetimes.lock().unwrap().clone();
            for (i, life) in lifetimes.iter().enumerate() {
                if path.path_segments.len() <= i {
                    path.path_segments.push(PathSegment {
                        name: format!("hop-{i}"),
                        id: format!("id-{i}"),
                        ..Default::default()
                    });
                }
                path.path_segments[i].expires = Some(Timestamp::from(SystemTime::now() + *life));
            }
            next.request(cx, req).await
        }

        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.closes.fetch_add(1, Ordering::SeqCst);
            next.close(cx, conn).await
        }
    }

    fn chain_with(begin: Begin, refresh: &Refresh, far: &Arc<Far>) -> Chain {
        Chain::builder()
            .push(update_path("nsc"))
            .push(begin)
            .push(refresh.clone())
            .push(far.clone())
            .build()
    }

    fn setup(lifetimes: &[u64]) -> (Chain, Refresh, Arc<Far>) {
        let r = refresh();
        let far = Far::with_lifetimes(lifetimes);
        let chain = chain_with(crate::handlers::begin(), &r, &far);
        (chain, r, far)
    }

    fn req(id: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    /// Lets cancelled tasks wind down.
    async fn settle() {
        sleep(Duration::from_millis(1)).await;
    }

    /// The gaps between consecutive calls, in seconds.
    fn gaps(calls: &[Instant]) -> Vec<f64> {
        calls
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_before_expiry_within_the_jitter_window() {
        let (chain, r, far) = setup(&[60, 60]);
        chain.request(&mut Cx::client(), req("a")).await.unwrap();
        assert_eq!(r.pending(), 1);
        sleep(Duration::from_secs(300)).await;
        let gaps = gaps(&far.calls("a"));
        assert!(gaps.len() >= 12, "refreshed only {} times", gaps.len());
        for g in &gaps {
            assert!(
                (12.0..=24.0).contains(g),
                "refreshed after {g} s of a 60 s token"
            );
        }
        assert_eq!(r.pending(), 1, "one timer per connection");
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_segment_path_refreshes_at_a_third_of_its_expiry() {
        let (chain, _r, far) = setup(&[30]);
        chain.request(&mut Cx::client(), req("a")).await.unwrap();
        sleep(Duration::from_secs(35)).await;
        let gaps = gaps(&far.calls("a"));
        assert_eq!(gaps.len(), 3);
        for g in gaps {
            assert!((9.9..=10.0).contains(&g), "{g}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn uses_the_shortest_expiry_in_the_path() {
        let (chain, _r, far) = setup(&[600, 30, 3600]);
        chain.request(&mut Cx::client(), req("a")).await.unwrap();
        sleep(Duration::from_secs(60)).await;
        let gaps = gaps(&far.calls("a"));
        assert!(gaps.len() >= 5);
        for g in gaps {
            assert!((6.0..=12.0).contains(&g), "{g}: 0.2-0.4 of the 30 s token");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_path_without_expiry_is_not_refreshed() {
        let (chain, r, far) = setup(&[]);
        chain.request(&mut Cx::client(), req("a")).await.unwrap();
        assert_eq!(r.pending(), 0);
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(far.calls("a").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_close_and_leaves_no_task() {
        let (chain, r, far) = setup(&[60, 60]);
        let conn = chain.request(&mut Cx::client(), req("a")).await.unwrap();
        sleep(Duration::from_secs(30)).await;
        let refreshed = far.calls("a").len();
        assert!(refreshed >= 2);
        assert_eq!((r.pending(), alive_tasks()), (1, 1));
        chain.close(&mut Cx::client(), conn).await.unwrap();
        settle().await;
        assert_eq!(r.pending(), 0);
        assert_eq!(alive_tasks(), 0, "the timer task ended with the Close");
        sleep(Duration::from_secs(600)).await;
        assert_eq!(far.calls("a").len(), refreshed);
        assert_eq!(far.closes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_request_replaces_the_timer_and_a_request_after_close_restarts_it() {
        let (chain, r, far) = setup(&[30]);
        let t0 = Instant::now();
        let conn = chain.request(&mut Cx::client(), req("a")).await.unwrap();
        sleep(Duration::from_secs(5)).await;
        // The caller re-requests: the next refresh is 10 s after this, not after the first.
        let mut again = req("a");
        again.connection = Some(conn.clone());
        let conn = chain.request(&mut Cx::client(), again).await.unwrap();
        settle().await;
        assert_eq!(r.pending(), 1);
        sleep(Duration::from_millis(9_899)).await;
        assert_eq!(
            far.calls("a").len(),
            2,
            "the first timer (due at 10 s) is gone"
        );
        sleep(Duration::from_millis(200)).await;
        assert_eq!(far.calls("a").len(), 3);
        assert!(((far.calls("a")[2] - t0).as_secs_f64() - 15.0).abs() < 0.1);

        chain.close(&mut Cx::client(), conn).await.unwrap();
        settle().await;
        assert_eq!(r.pending(), 0);
        chain.request(&mut Cx::client(), req("a")).await.unwrap();
        assert_eq!(r.pending(), 1);
        sleep(Duration::from_secs(11)).await;
        assert_eq!(
            far.calls("a").len(),
            5,
            "refreshing again after the new Request"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_is_retried_with_backoff_and_stops_after_success() {
        let (chain, r, far) = setup(&[30]);
        chain.request(&mut Cx::client(), req("a")).await.unwrap();
        far.fail_next.store(4, Ordering::SeqCst);
        sleep(Duration::from_secs(25)).await;
        let calls = far.calls("a");
        let gaps = gaps(&calls);
        // 10 s: refresh (fails), then ~0.2, ~0.4, ~0.8 s (fail), ~1.6 s (succeeds), then
        // the next refresh 10 s after the success.
        assert_eq!(gaps.len(), 6, "{gaps:?}");
        assert!((9.9..=10.0).contains(&gaps[0]));
        for (i, expected) in [0.2, 0.4, 0.8, 1.6].iter().enumerate() {
            let g = gaps[i + 1];
            assert!(
                g >= expected * 0.8 - 0.001 && g <= expected * 1.2 + 0.001,
                "retry {} after {g} s, expected about {expected} s",
                i + 1
            );
        }
        assert!(
            (9.9..=10.0).contains(&gaps[5]),
            "back to the normal cadence"
        );
        assert_eq!(r.pending(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_fails_as_cancelled_is_not_retried() {
        let (chain, r, far) = setup(&[30]);
        let t0 = Instant::now();
        let conn = chain.request(&mut Cx::client(), req("a")).await.unwrap();
        sleep(Duration::from_secs(1)).await;
        // As heal's failed attempts come back (heal retries on its own backoff).
        far.cancel_next.store(1, Ordering::SeqCst);
        let again = NetworkServiceRequest {
            connection: Some(conn),
            ..Default::default()
        };
        let err = chain.request(&mut Cx::client(), again).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Cancelled);
        sleep(Duration::from_secs(12)).await;
        let at: Vec<f64> = far
            .calls("a")
            .iter()
            .map(|c| (*c - t0).as_secs_f64())
            .collect();
        assert_eq!(at.len(), 3, "{at:?}");
        assert!(
            (9.9..=10.0).contains(&at[2]),
            "the timer of the last success stays: {at:?}"
        );
        assert_eq!(r.pending(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retrying_stops_when_the_path_expires() {
        let (chain, r, far) = setup(&[3]);
        let t0 = Instant::now();
        chain.request(&mut Cx::client(), req("a")).await.unwrap();
        far.fail_always.store(true, Ordering::SeqCst);
        sleep(Duration::from_secs(120)).await;
        let calls = far.calls("a");
        // The refresh at 1 s, then retries at about 1.2, 1.6 and 2.4 s; the next would
        // come after the token expired at 3 s.
        assert!(calls.len() <= 6, "{} calls", calls.len());
        assert!(calls.len() >= 4, "{} calls", calls.len());
        let last = (*calls.last().unwrap() - t0).as_secs_f64();
        assert!(last < 3.0, "tried at {last} s, after the expiry");
        assert_eq!(r.pending(), 0);
        settle().await;
        assert_eq!(alive_tasks(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_request_schedules_nothing() {
        let (chain, r, far) = setup(&[30]);
        far.fail_next.store(1, Ordering::SeqCst);
        assert!(chain.request(&mut Cx::client(), req("a")).await.is_err());
        settle().await;
        assert_eq!((r.pending(), alive_tasks()), (0, 0));
        sleep(Duration::from_secs(60)).await;
        assert_eq!(far.calls("a").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_cut_off_by_the_deadline_is_retried() {
        let r = refresh();
        let far = Far::with_lifetimes(&[30]);
        let begin = begin()
            .root(CancellationToken::new())
            .default_timeout(Duration::from_secs(1));
        let chain = chain_with(begin, &r, &far);
        let t0 = Instant::now();
        chain.request(&mut Cx::client(), req("a")).await.unwrap();
        // The refresh at 10 s hangs past begin's 1 s deadline: this handler never sees
        // its outcome; the timer that queued it does, and retries.
        *far.slow_next.lock().unwrap() = Some(Duration::from_secs(60));
        sleep(Duration::from_secs(13)).await;
        let calls = far.calls("a");
        assert_eq!(calls.len(), 3, "first, cut-off refresh, retry");
        let retry = (calls[2] - t0).as_secs_f64();
        assert!((11.1..=11.3).contains(&retry), "retried at {retry} s");
        assert_eq!(r.pending(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_made_together_refresh_spread_over_the_jitter_window() {
        let (chain, _r, far) = setup(&[60, 60]);
        let t0 = Instant::now();
        let ids: Vec<String> = (0..1000).map(|i| format!("conn-{i}")).collect();
        for id in &ids {
            chain.request(&mut Cx::client(), req(id)).await.unwrap();
        }
        assert_eq!(Instant::now(), t0, "all at the same instant");
        sleep(Duration::from_secs(25)).await;
        let mut firsts: Vec<f64> = ids
            .iter()
            .map(|id| {
                let calls = far.calls(id);
                assert!(calls.len() >= 2, "{id} was not refreshed");
                (calls[1] - t0).as_secs_f64()
            })
            .collect();
        firsts.sort_by(f64::total_cmp);
        let (min, max) = (firsts[0], firsts[firsts.len() - 1]);
        assert!(min >= 12.0 && max <= 24.0, "{min}..{max}");
        assert!(
            max - min > 10.0,
            "refreshes spread over {} s only",
            max - min
        );
        // No one-second slice takes much more than its share (1/12 of 1000).
        let mut per_second = [0usize; 13];
        for t in &firsts {
            per_second[(*t as usize).saturating_sub(12).min(12)] += 1;
        }
        let busiest = per_second.iter().max().copied().unwrap_or_default();
        assert!(
            busiest < 160,
            "{busiest} refreshes in one second: {per_second:?}"
        );
    }
}
