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
//! State: per connection ([`ConnHandle::state`]), the pending timer (a task owned by the
//! connection, under a child of its cancellation token). Every successful Request
//! replaces it, a Close cancels it, and the end of the connection cancels it in any
//! case. [`Timeout::pending`] counts the timers alive.
//!
//! Failure handled: a caller that went away (crashed, lost its network, was killed
//! without a Close) no longer holds resources here past its token. A failed refresh
//! leaves the timer as it was, so the connection still expires on the old token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use crate::core::{spawn_owned, ConnHandle, Cx, Handler, Next};
use crate::Result;

/// The default margin before the caller's token expiry: the request timeout.
pub const DEFAULT_MARGIN: Duration = crate::handlers::begin::DEFAULT_TIMEOUT;

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct Timeout {
    margin: Duration,
    pending: Arc<AtomicUsize>,
}

/// The `timeout` handler with the default margin ([`DEFAULT_MARGIN`], 15 s).
pub fn timeout() -> Timeout {
    Timeout {
        margin: DEFAULT_MARGIN,
        pending: Arc::new(AtomicUsize::new(0)),
    }
}

impl Timeout {
    /// Close this long before the caller's token expires (at most half the time left).
    pub fn margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// How many close timers of this handler are alive (one per connection with a
    /// deadline); a cancelled timer's task counts until it has wound down.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// The timeout state of one connection: cancels its pending timer.
#[derive(Default)]
struct ConnTimeout(Mutex<Option<CancellationToken>>);

impl ConnTimeout {
    fn replace(&self, timer: Option<CancellationToken>) {
        let old = std::mem::replace(
            &mut *self.0.lock().unwrap_or_else(|p| p.into_inner()),
            timer,
        );
        if let Some(old) = old {
            old.cancel();
        }
    }
}

/// Counts a live timer of the handler while it exists.
struct PendingGuard(Arc<AtomicUsize>);

impl PendingGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        PendingGuard(count.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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

    /// Replaces the connection's timer by one that closes it at `at`.
    fn arm(&self, handle: &ConnHandle, at: Instant) {
        let token = handle.cancel_token().child_token();
        handle.state::<ConnTimeout>().replace(Some(token.clone()));
        let h = handle.clone();
        let guard = PendingGuard::new(&self.pending);
        let span = tracing::debug_span!("timeout", connection.id = %handle.id());
        spawn_owned(
            token,
            async move {
                let _guard = guard;
                tokio::time::sleep_until(at).await;
                info!("the caller's token expired without a refresh: closing the connection");
                // The Close cancels this task through this handler; its outcome is
                // logged by whoever runs it.
                drop(h.close_event());
            }
            .instrument(span),
        );
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
                None => h.state::<ConnTimeout>().replace(None),
            },
            (Some(h), None) => {
                debug!(connection.id = %h.id(), "the caller's token has no expiry: no deadline");
                h.state::<ConnTimeout>().replace(None);
            }
            (None, _) => debug!("timeout without a connection handle (no begin before it)"),
        }
        Ok(out)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        if let Some(state) = cx.conn().and_then(|h| h.get_state::<ConnTimeout>()) {
            state.replace(None);
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Chain, Peer, Side};
    use crate::handlers::begin::Begin;
    use crate::handlers::{begin, refresh, update_path, update_token};
    use crate::tools::token::lifetime_token;
    use crate::Error;
    use std::sync::atomic::AtomicBool;
    use tokio::time::sleep;

    /// What this hop built downstream: counts Requests and Closes, fails when told.
    #[derive(Default)]
    struct Downstream {
        requests: AtomicUsize,
        closes: AtomicUsize,
        fail: AtomicBool,
    }

    #[async_trait]
    impl Handler for Arc<Downstream> {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::unavailable("injected failure"));
            }
            next.request(cx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.closes.fetch_add(1, Ordering::SeqCst);
            next.close(cx, conn).await
        }
    }

    impl Downstream {
        fn closes(&self) -> usize {
            self.closes.load(Ordering::SeqCst)
        }
    }

    struct Hop {
        chain: Chain,
        begin: Begin,
        timeout: Timeout,
        down: Arc<Downstream>,
    }

    fn server(margin: Option<Duration>) -> Hop {
        let b = begin();
        let t = match margin {
            Some(m) => timeout().margin(m),
            None => timeout(),
        };
        let down = Arc::new(Downstream::default());
        let chain = Chain::builder()
            .push(update_path("nse"))
            .push(b.clone())
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
        let cx = Cx::server().with_peer(Peer {
            addr: None,
            token: secs.map(|_| "nsc-token".to_string()),
            token_expires: secs.map(|s| SystemTime::now() + Duration::from_secs(s)),
        });
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                id: "nsc-id".into(),
                path: Some(nsm_proto::connection::Path {
                    index: 0,
                    path_segments: vec![nsm_proto::connection::PathSegment {
                        name: "nsc".into(),
                        id: "nsc-id".into(),
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
        assert!(hop.down.requests.load(Ordering::SeqCst) >= 3600 / 24);
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
