//! `timeout`: closes a connection whose caller stopped refreshing it.
//!
//! What it does (server side, after `begin` and after `update_token`): after every
//! successful Request it sets the connection's deadline to the expiry of the caller's
//! token (the *previous* path segment's `expires`, which `update_token` just took from
//! the call) minus a margin: the request timeout (15 s by default), but never more than
//! half the time left, so a short token still leaves the caller time to refresh. When
//! the deadline passes without another successful Request, it queues a Close of the
//! connection ([`ConnHandle::close_event`]); the Close runs through the rest of the
//! chain after `begin`, so everything this hop built downstream is torn down, exactly
//! once. A Request without an expiry in the previous segment sets no deadline.
//!
//! How the pieces fit: [`update_token`](mod@super::update_token) writes each hop's token
//! expiry into its path segment; the caller's [`refresh`](mod@super::refresh) re-requests
//! before the earliest of them; this handler is what happens when it does not.
//!
//! State: one timer queue per handler (deadlines in order, each naming its connection
//! without keeping it alive) and one task that sleeps until the earliest deadline and
//! queues the Closes, rather than a task and a timer per connection (about a kilobyte
//! each); per connection ([`ConnHandle::state`]) only where its deadline sits in the
//! queue. Every successful Request replaces the connection's deadline and a Close
//! removes it. A connection that ends some other way loses its deadline when its
//! handle is dropped, or when the task finds it ended (it watches the connection of the
//! next deadline, so when the owner of the chain stops and every connection ends, the
//! queue empties at once); a deadline that passes after its connection ended closes
//! nothing (not even a new connection under the same id). The task runs only while
//! deadlines are queued, and stops when the handler is dropped. [`Timeout::pending`]
//! counts the queued deadlines.
//!
//! Failure handled: a caller that went away (crashed, lost its network, was killed
//! without a Close) no longer holds resources here past its token. A failed refresh
//! leaves the deadline as it was, so the connection still expires on the old token.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::core::conn::WeakConnHandle;
use crate::core::{spawn_owned, ConnHandle, Cx, Handler, Next};
use crate::Result;

/// The default margin before the caller's token expiry: the request timeout.
pub const DEFAULT_MARGIN: Duration = crate::core::rt::begin::DEFAULT_TIMEOUT;

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct Timeout {
    margin: Duration,
    owner: Arc<Owner>,
}

impl fmt::Debug for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timeout")
            .field("margin", &self.margin)
            .field("pending", &self.pending())
            .finish()
    }
}

/// The `timeout` handler with the default margin ([`DEFAULT_MARGIN`], 15 s).
pub fn timeout() -> Timeout {
    Timeout {
        margin: DEFAULT_MARGIN,
        owner: Owner::new(),
    }
}

impl Timeout {
    /// Close this long before the caller's token expires (at most half the time left).
    pub fn margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// How many close deadlines of this handler are queued: one per connection with a
    /// deadline, until it passes, is replaced or removed, or the connection ends.
    pub fn pending(&self) -> usize {
        self.owner.0.queue().deadlines.len()
    }
}

/// Stops the timers when the last clone of the handler is dropped.
struct Owner(Arc<Timers>);

impl Owner {
    fn new() -> Arc<Self> {
        Arc::new(Owner(Arc::new(Timers {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            stop: CancellationToken::new(),
        })))
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.stop.cancel();
    }
}

/// Where a deadline sits in the queue. The sequence number makes keys unique for the
/// life of the process, so removing a key that already fired (or belongs to another
/// handler) removes nothing else.
type Key = (Instant, u64);

static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

/// One handler's deadlines and the task that waits for them.
struct Timers {
    queue: Mutex<Queue>,
    /// Wakes the task when the earliest deadline changed.
    wake: Notify,
    /// Fires when the handler is gone.
    stop: CancellationToken,
}

#[derive(Default)]
struct Queue {
    deadlines: BTreeMap<Key, WeakConnHandle>,
    /// Whether the task runs (it runs while deadlines are queued).
    running: bool,
}

impl Timers {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a Close of `handle` at `at`; `None` when the timers are stopped.
    fn insert(self: &Arc<Self>, at: Instant, handle: &ConnHandle) -> Option<Key> {
        let key = (at, NEXT_SEQ.fetch_add(1, Ordering::Relaxed));
        let mut q = self.queue();
        if self.stop.is_cancelled() {
            return None;
        }
        let start = !q.running;
        if start && tokio::runtime::Handle::try_current().is_err() {
            warn!("close deadline not set: no tokio runtime to run its timer");
            return None;
        }
        q.deadlines.insert(key, handle.downgrade());
        let earliest = q
            .deadlines
            .first_key_value()
            .is_some_and(|(k, _)| *k == key);
        q.running = true;
        drop(q);
        if start {
            // Built before the task, so that a task stopped before its first poll
            // still hands back what it owned.
            let mut stopped = Stopped(Some(self.clone()));
            let timers = self.clone();
            spawn_owned(self.stop.clone(), async move {
                timers.run().await;
                // Ended on its own, with nothing queued: nothing to hand back.
                stopped.0.take();
            });
        } else if earliest {
            self.wake.notify_one();
        }
        Some(key)
    }

    fn remove(&self, key: Key) {
        let mut q = self.queue();
        let earliest = q
            .deadlines
            .first_key_value()
            .is_some_and(|(k, _)| *k == key);
        if q.deadlines.remove(&key).is_some() && earliest {
            drop(q);
            // The task sleeps until this deadline: let it sleep until the next one, or
            // end if there is none.
            self.wake.notify_one();
        }
    }

    /// Takes the deadlines that passed; the next deadline and whose it is, or `None`
    /// when the queue is empty, and then the task has ended.
    fn take_due(&self, now: Instant) -> (Vec<WeakConnHandle>, Option<(Instant, WeakConnHandle)>) {
        let mut q = self.queue();
        let mut due = Vec::new();
        while let Some(entry) = q.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        let next = q
            .deadlines
            .first_key_value()
            .map(|(k, handle)| (k.0, handle.clone()));
        if next.is_none() {
            q.running = false;
        }
        (due, next)
    }

    /// Removes the deadlines at the front of the queue whose connections ended (or
    /// whose owner stopped), up to the first live one. Each ended connection is looked
    /// at once, so the owner stopping with n connections costs n removals, and a
    /// connection closed through this handler (its deadline already removed) costs
    /// nothing: no scan of the whole queue. Ended connections further back lose their
    /// deadlines when their handles are dropped, or here once they reach the front.
    fn sweep(&self) {
        let mut q = self.queue();
        while let Some(entry) = q.deadlines.first_entry() {
            // A handle upgraded here may turn out to be the last strong one; dropping
            // it removes its deadline, which takes this lock: it is always dropped
            // after the lock is released.
            let Some(handle) = entry.get().upgrade() else {
                entry.remove();
                continue;
            };
            if !handle.is_closed() {
                drop(q);
                drop(handle);
                return;
            }
            entry.remove();
            drop(q);
            drop(handle);
            q = self.queue();
        }
    }

    /// The task: closes connections whose deadline passed, while any is queued. It
    /// watches the connection of the next deadline: when that one ends without a
    /// Close through this handler (most often because the owner of the whole chain
    /// stopped, which ends every connection), the ended ones are swept out.
    async fn run(&self) {
        loop {
            let wake = self.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let (due, next) = self.take_due(Instant::now());
            for handle in due {
                expire(handle);
            }
            let Some((at, first)) = next else { return };
            let watched = first.upgrade().map(|h| h.cancel_token().clone());
            let ended = async {
                match watched {
                    Some(token) => token.cancelled_owned().await,
                    // Its handle is being dropped, which removes the deadline.
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = wake => {}
                _ = ended => self.sweep(),
            }
        }
    }
}

/// Hands back the queue of a task stopped before its end (the handler was dropped, or
/// the runtime shut down): a later deadline starts a new task, unless the handler is
/// gone, and then the deadlines are dropped.
struct Stopped(Option<Arc<Timers>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let Some(timers) = self.0.take() else { return };
        let mut q = timers.queue();
        q.running = false;
        if timers.stop.is_cancelled() {
            q.deadlines.clear();
        }
    }
}

/// A deadline passed: close the connection, unless it already ended.
fn expire(handle: WeakConnHandle) {
    let Some(h) = handle.upgrade() else { return };
    if h.is_closed() {
        return;
    }
    info!(connection.id = %h.id(), "the caller's token expired without a refresh: closing the connection");
    // The Close reaches this handler, which has nothing left to remove; its outcome is
    // logged by whoever runs it.
    drop(h.close_event());
}

/// The timeout state of one connection: where its deadline sits in a queue.
#[derive(Default)]
struct ConnTimeout(Mutex<Option<Armed>>);

struct Armed {
    timers: Weak<Timers>,
    key: Key,
}

impl Armed {
    fn disarm(self) {
        if let Some(timers) = self.timers.upgrade() {
            timers.remove(self.key);
        }
    }
}

impl ConnTimeout {
    /// Locked before the queue, never while it is held.
    fn lock(&self) -> MutexGuard<'_, Option<Armed>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ConnTimeout {
    /// The connection's handle is gone (the connection ended some other way than a
    /// Close through this handler): its deadline goes with it.
    fn drop(&mut self) {
        if let Some(armed) = self.0.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            armed.disarm();
        }
    }
}

/// The time left before the caller's token (the previous segment's) expires.
fn caller_expiry(req: &NetworkServiceRequest) -> Option<Duration> {
    let path = req.connection.as_ref()?.path.as_ref()?;
    let prev = (path.index as usize).checked_sub(1)?;
    let expires = path.path_segments.get(prev)?.expires.as_ref()?;
    match SystemTime::try_from(*expires) {
        Ok(t) => Some(t.duration_since(SystemTime::now()).unwrap_or_default()),
        // Beyond what the clock can say: it does not expire.
        Err(_) => None,
    }
}

impl Timeout {
    /// When to close a connection whose caller's token expires in `left` from `now`.
    fn deadline(&self, now: Instant, left: Duration) -> Option<Instant> {
        let margin = self.margin.min(left / 2);
        now.checked_add(left - margin)
    }

    /// Replaces the connection's deadline by `at`.
    fn arm(&self, handle: &ConnHandle, at: Instant) {
        let state = handle.state::<ConnTimeout>();
        let mut armed = state.lock();
        if let Some(old) = armed.take() {
            old.disarm();
        }
        let timers = &self.owner.0;
        *armed = timers.insert(at, handle).map(|key| Armed {
            timers: Arc::downgrade(timers),
            key,
        });
    }
}

/// Removes the connection's deadline, if it has one.
fn disarm(handle: &ConnHandle) {
    if let Some(state) = handle.get_state::<ConnTimeout>() {
        if let Some(old) = state.lock().take() {
            old.disarm();
        }
    }
}

#[async_trait]
impl Handler for Timeout {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let now = Instant::now();
        let left = caller_expiry(&req);
        let handle = cx.conn().cloned();
        let out = next.request(cx, req).await?;
        match (handle, left) {
            (Some(h), Some(left)) => match self.deadline(now, left) {
                Some(at) => {
                    debug!(connection.id = %h.id(), ?left, "close deadline set");
                    self.arm(&h, at);
                }
                None => disarm(&h),
            },
            (Some(h), None) => {
                debug!(connection.id = %h.id(), "the caller's token has no expiry: no deadline");
                disarm(&h);
            }
            (None, _) => debug!("timeout without a connection handle (no begin before it)"),
        }
        Ok(out)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        if let Some(h) = cx.conn() {
            disarm(h);
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rt::begin::Begin;
    use crate::core::{Chain, Peer, Side};
    use crate::handlers::test_support::TestHop;
    use crate::handlers::{begin, refresh, update_path, update_token};
    use crate::token::lifetime_token;
    use crate::Error;
    use std::sync::Weak;
    use tokio::time::sleep;

    struct Hop {
        chain: Chain,
        begin: Begin,
        timeout: Timeout,
        down: Arc<TestHop>,
    }

    fn server(margin: Option<Duration>) -> Hop {
        hop(margin, None)
    }

    /// `update_path`, `begin`, `extra` if any, `update_token`, `timeout` (with `margin`
    /// if given), a recording downstream.
    fn hop(margin: Option<Duration>, extra: Option<FailClose>) -> Hop {
        let b = begin();
        let t = match margin {
            Some(m) => timeout().margin(m),
            None => timeout(),
        };
        let down = Arc::new(TestHop::default());
        let chain = Chain::builder()
            .push(update_path("nse"))
            .push(b.clone())
            .push_opt(extra)
            .push(update_token(Arc::new(lifetime_token(Duration::from_secs(
                3600,
            )))))
            .push(t.clone())
            .push(down.clone())
            .build();
        Hop {
            chain,
            begin: b,
            timeout: t,
            down,
        }
    }

    /// A call from `nsc` whose token expires `secs` from now (none for `None`).
    fn call(secs: Option<u64>) -> (Cx, NetworkServiceRequest) {
        call_for("nsc-id", secs)
    }

    /// [`call`] for the connection `id`.
    fn call_for(id: &str, secs: Option<u64>) -> (Cx, NetworkServiceRequest) {
        let cx = Cx::server().with_peer(Peer {
            addr: None,
            token: secs.map(|_| "nsc-token".to_string()),
            token_expires: secs.map(|s| SystemTime::now() + Duration::from_secs(s)),
            ..Default::default()
        });
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                path: Some(nsm_proto::connection::Path {
                    index: 0,
                    path_segments: vec![nsm_proto::connection::PathSegment {
                        name: "nsc".into(),
                        id: id.into(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        (cx, req)
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    async fn settle() {
        sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn closes_after_the_callers_token_expires_and_downstream_sees_one_close() {
        let hop = server(None);
        let (mut cx, req) = call(Some(60));
        hop.chain.request(&mut cx, req).await.unwrap();
        assert_eq!(hop.timeout.pending(), 1);
        // 60 s token, 15 s margin: the deadline is at 45 s.
        sleep(Duration::from_millis(44_900)).await;
        assert_eq!(hop.down.closes(), 0);
        assert_eq!(hop.begin.len(), 1);
        sleep(Duration::from_millis(200)).await;
        assert_eq!(hop.down.closes(), 1);
        assert!(hop.begin.is_empty(), "the connection is gone at this hop");
        settle().await;
        assert_eq!((hop.timeout.pending(), alive_tasks()), (0, 0));
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(hop.down.closes(), 1, "exactly one Close");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_token_keeps_half_its_time_for_the_caller() {
        let hop = server(None);
        let (mut cx, req) = call(Some(2));
        hop.chain.request(&mut cx, req).await.unwrap();
        sleep(Duration::from_millis(900)).await;
        assert_eq!(hop.down.closes(), 0);
        sleep(Duration::from_millis(200)).await;
        assert_eq!(hop.down.closes(), 1, "closed at 1 s: margin = half of 2 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_that_extends_the_token_moves_the_deadline() {
        let hop = server(None);
        let (mut cx, req) = call(Some(60));
        let conn = hop.chain.request(&mut cx, req).await.unwrap();
        sleep(Duration::from_secs(30)).await;
        let (mut cx, mut again) = call(Some(60));
        again.connection = Some(conn);
        hop.chain.request(&mut cx, again).await.unwrap();
        settle().await;
        assert_eq!(hop.timeout.pending(), 1, "the old timer was replaced");
        sleep(Duration::from_secs(44)).await;
        assert_eq!(
            hop.down.closes(),
            0,
            "74 s in: the refresh at 30 s moved it to 75 s"
        );
        sleep(Duration::from_secs(2)).await;
        assert_eq!(hop.down.closes(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_close_after_the_caller_closed() {
        let hop = server(None);
        let (mut cx, req) = call(Some(60));
        let conn = hop.chain.request(&mut cx, req).await.unwrap();
        sleep(Duration::from_secs(10)).await;
        let (mut cx, _) = call(Some(60));
        hop.chain.close(&mut cx, conn).await.unwrap();
        settle().await;
        assert_eq!((hop.timeout.pending(), alive_tasks()), (0, 0));
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(hop.down.closes(), 1, "only the caller's Close");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_timer() {
        let hop = server(None);
        let (mut cx, req) = call(Some(60));
        let conn = hop.chain.request(&mut cx, req).await.unwrap();
        sleep(Duration::from_secs(30)).await;
        hop.down.fail.store(true, Ordering::SeqCst);
        let (mut cx, mut again) = call(Some(600));
        again.connection = Some(conn);
        assert!(hop.chain.request(&mut cx, again).await.is_err());
        assert_eq!(hop.begin.len(), 1, "the established connection stays");
        sleep(Duration::from_millis(15_100)).await;
        assert_eq!(hop.down.closes(), 1, "closed on the old token, at 45 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_without_expiry_sets_no_deadline() {
        let hop = server(None);
        let (mut cx, req) = call(None);
        hop.chain.request(&mut cx, req).await.unwrap();
        assert_eq!(hop.timeout.pending(), 0);
        sleep(Duration::from_secs(24 * 3600)).await;
        assert_eq!(hop.down.closes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_margin_is_configurable() {
        let hop = server(Some(Duration::from_secs(5)));
        let (mut cx, req) = call(Some(60));
        hop.chain.request(&mut cx, req).await.unwrap();
        sleep(Duration::from_millis(54_900)).await;
        assert_eq!(hop.down.closes(), 0);
        sleep(Duration::from_millis(200)).await;
        assert_eq!(hop.down.closes(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_task_serves_every_connection_and_ends_with_the_last_deadline() {
        let hop = server(None);
        for i in 0..100 {
            let (mut cx, req) = call_for(&format!("nsc-{i}"), Some(60 + i));
            hop.chain.request(&mut cx, req).await.unwrap();
        }
        assert_eq!((hop.timeout.pending(), alive_tasks()), (100, 1));
        sleep(Duration::from_millis(45_100)).await;
        assert_eq!(hop.down.closes(), 1, "the earliest deadline only");
        assert_eq!(hop.timeout.pending(), 99);
        sleep(Duration::from_secs(100)).await;
        assert_eq!(hop.down.closes(), 100);
        assert!(hop.begin.is_empty());
        settle().await;
        assert_eq!((hop.timeout.pending(), alive_tasks()), (0, 0));
    }

    /// Fails every Close before it reaches `timeout`: the connection ends at `begin`
    /// without this handler being told.
    struct FailClose;

    #[async_trait]
    impl Handler for FailClose {
        async fn close(&self, _: &mut Cx, _: Connection, _: Next) -> Result<()> {
            Err(Error::unavailable("injected close failure"))
        }
    }

    /// A hop whose Closes never reach `timeout`.
    fn deaf_server() -> Hop {
        hop(None, Some(FailClose))
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_without_a_close_through_here_leaves_no_deadline() {
        let hop = deaf_server();
        let (mut cx, req) = call(Some(60));
        let conn = hop.chain.request(&mut cx, req).await.unwrap();
        drop(cx);
        assert_eq!(hop.timeout.pending(), 1);
        let (mut cx, _) = call(Some(60));
        assert!(hop.chain.close(&mut cx, conn).await.is_err());
        drop(cx);
        assert!(hop.begin.is_empty(), "begin forgets a failed Close");
        settle().await;
        assert_eq!(
            (hop.timeout.pending(), alive_tasks()),
            (0, 0),
            "the deadline went with the connection's handle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_of_an_ended_connection_closes_nothing_not_even_its_successor() {
        let hop = deaf_server();
        let (mut cx, req) = call(Some(60));
        let conn = hop.chain.request(&mut cx, req).await.unwrap();
        // Someone still holds the ended connection's handle, so its deadline stays.
        let held = cx.conn().cloned().unwrap();
        let conn_copy = conn.clone();
        let (mut close_cx, _) = call(Some(60));
        assert!(hop.chain.close(&mut close_cx, conn).await.is_err());
        assert!(held.is_closed());
        // The caller comes back with the same connection (the same id at this hop).
        let (mut cx, mut again) = call(Some(600));
        again.connection = Some(conn_copy);
        hop.chain.request(&mut cx, again).await.unwrap();
        drop(cx);
        sleep(Duration::from_secs(46)).await;
        assert_eq!(
            hop.begin.len(),
            1,
            "the old deadline closed the new connection"
        );
        assert_eq!(
            hop.timeout.pending(),
            1,
            "the new connection's own deadline"
        );
        sleep(Duration::from_secs(600)).await;
        assert!(hop.begin.is_empty());
        settle().await;
        assert_eq!((hop.timeout.pending(), alive_tasks()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timers_stop_with_their_owner() {
        let root = CancellationToken::new();
        let b = begin().root(root.clone());
        let t = timeout();
        let down = Arc::new(TestHop::default());
        let chain = Chain::builder()
            .push(update_path("nse"))
            .push(b.clone())
            .push(update_token(Arc::new(lifetime_token(Duration::from_secs(
                3600,
            )))))
            .push(t.clone())
            .push(down.clone())
            .build();
        for i in 0..10 {
            let (mut cx, req) = call_for(&format!("nsc-{i}"), Some(60 + i));
            chain.request(&mut cx, req).await.unwrap();
        }
        assert_eq!((t.pending(), alive_tasks()), (10, 1));
        // The owner of the chain stops: every connection ends, and the timers with them.
        root.cancel();
        settle().await;
        assert_eq!((t.pending(), alive_tasks()), (0, 0));
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(down.closes(), 0);

        // A handler that is dropped stops its timers too. (Behind `begin` an
        // established connection keeps its chain alive through the rest of the chain it
        // stores, so this handler stands alone here, with a handle made by hand.)
        let t = timeout();
        let chain = Chain::builder().push(t.clone()).build();
        let handle = ConnHandle::new(
            "nsc-id",
            &CancellationToken::new(),
            Weak::<crate::core::conn::NoSink>::new(),
        );
        let (mut cx, mut req) = call(Some(60));
        cx.set_conn(Some(handle.clone()));
        let path = req.connection.as_mut().unwrap().path.as_mut().unwrap();
        path.path_segments[0].expires = Some((SystemTime::now() + Duration::from_secs(60)).into());
        path.path_segments.push(Default::default());
        path.index = 1;
        chain.request(&mut cx, req).await.unwrap();
        assert_eq!((t.pending(), alive_tasks()), (1, 1));
        drop((chain, t));
        settle().await;
        assert_eq!(alive_tasks(), 0);
        assert!(!handle.is_closed());
    }

    /// Stands for the gRPC hop between a client chain and a server chain: the server
    /// sees the client's token as its caller's.
    struct Wire(Chain);

    #[async_trait]
    impl Handler for Wire {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            _: Next,
        ) -> Result<Connection> {
            let mut scx = Cx::server().with_peer(cx.peer().clone());
            self.0.request(&mut scx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, _: Next) -> Result<()> {
            let mut scx = Cx::server().with_peer(cx.peer().clone());
            self.0.close(&mut scx, conn).await
        }
    }

    fn client(hop: &Hop, refreshing: bool) -> Chain {
        let b = Chain::builder().push(update_path("nsc")).push(begin());
        let b = if refreshing { b.push(refresh()) } else { b };
        b.push(update_token(Arc::new(lifetime_token(Duration::from_secs(
            60,
        )))))
        .push(Wire(hop.chain.clone()))
        .build()
    }

    #[tokio::test(start_paused = true)]
    async fn a_refreshing_client_keeps_its_connection_and_a_silent_one_loses_it() {
        let hop = server(None);
        let nsc = client(&hop, true);
        let mut cx = Cx::client();
        assert_eq!(cx.side(), Side::Client);
        nsc.request(&mut cx, Default::default()).await.unwrap();
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(hop.down.closes(), 0, "an hour of 60 s tokens, refreshed");
        assert!(hop.down.attempts() >= 3600 / 24);
        assert_eq!(hop.begin.len(), 1);

        let hop = server(None);
        let silent = client(&hop, false);
        silent
            .request(&mut Cx::client(), Default::default())
            .await
            .unwrap();
        sleep(Duration::from_secs(46)).await;
        assert_eq!(hop.down.closes(), 1, "the server closed it after 45 s");
        assert!(hop.begin.is_empty());
    }
}
