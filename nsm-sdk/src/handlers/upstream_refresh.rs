//! `upstream_refresh`: a client refreshes its connection when the endpoint asks for it
//! (docs/SCENARIOS.md 5.6, 6.4 REFRESH_REQUESTED).
//!
//! Where it goes: in a client chain (an NSC's, or a passthrough's), after `begin`, among
//! the application handlers ([`ClientOptions::handler`](crate::chains::ClientOptions::handler)),
//! like `heal`:
//!
//! ```text
//! update_path, begin, refresh, retry, upstream_refresh, ..., client_url, grpc_client
//! ```
//!
//! An endpoint asks its clients to refresh (to pick up a new context: a smaller MTU, new
//! addresses) by publishing the connection in state REFRESH_REQUESTED through its
//! [`Monitor`](super::Monitor) (`cx.ext().get::<Monitor>()` inside its chain, or
//! [`Endpoint::monitor`](crate::chains::Endpoint::monitor)). Every manager and forwarder
//! on the path relays that state upstream (`monitor_relay` copies the downstream state).
//!
//! What it does, per connection, after each successful Request: it follows the next
//! hop's MonitorConnection events for this connection, as `heal` does (the process's
//! shared stream to the next hop; the client-side filter), and when the connection arrives in
//! state REFRESH_REQUESTED it re-requests it ([`ConnHandle::request_event`]: the last
//! good request, in `begin`'s order with the connection's other operations). Other
//! states are left to `heal`.
//!
//! An event that reaches the next hop before this client follows it (the client is still
//! on the return path of its Request) is not lost: a new shared stream starts with the
//! state the next hop's `monitor` keeps (INITIAL_STATE_TRANSFER), and a stream already
//! open keeps such a change for a follower that joins late
//! ([`shared_monitor`](crate::transport::channels::shared_monitor)). Hops that are themselves still returning hold such a
//! change until their own `monitor` has the connection (`monitor_relay`).
//!
//! With [`UpstreamRefreshOptions::local_notifications`], a refresh requested on one of
//! this client's connections also refreshes every other connection this handler holds
//! (the Go SDK's `WithLocalNotifications`: connections of one client that share a data
//! plane resource, such as an MTU, follow the one the endpoint told).
//!
//! State: per connection (in `begin`'s handle), the running follow task, the next hop
//! it follows and a generation number fencing off replaced tasks; with local
//! notifications, the handles of the established connections of this handler (removed
//! on Close). The task is owned by the connection: Close ends it.
//!
//! Failure handled: a stream that breaks or ends (the next hop died or restarted) ends
//! the follow; the connection's next successful Request (a refresh, or heal's repair)
//! follows the next hop again. A next hop that cannot be subscribed to is left alone
//! the same way. Without a `begin` before it the handler passes calls through untouched.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use nsm_proto::connection::{Connection, State};
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::{debug, info, warn};

use super::monitor_relay::{NextHop, DEFAULT_SUBSCRIBE_TIMEOUT};
use crate::core::rt::conn_task::ConnTask;
use crate::core::{ConnHandle, Cx, Handler, Next};
use crate::transport::Channels;
use crate::Result;

/// What [`upstream_refresh`] is made of.
#[derive(Clone)]
#[must_use]
pub struct UpstreamRefreshOptions {
    channels: Channels,
    local_notifications: bool,
    subscribe_timeout: Duration,
}

impl fmt::Debug for UpstreamRefreshOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamRefreshOptions")
            .field("local_notifications", &self.local_notifications)
            .field("subscribe_timeout", &self.subscribe_timeout)
            .finish_non_exhaustive()
    }
}

impl UpstreamRefreshOptions {
    /// Follows next hops through `channels` (share the client's pool); each connection
    /// refreshes only itself.
    pub fn new(channels: Channels) -> Self {
        UpstreamRefreshOptions {
            channels,
            local_notifications: false,
            subscribe_timeout: DEFAULT_SUBSCRIBE_TIMEOUT,
        }
    }

    /// A refresh requested on one connection also refreshes this client's other
    /// connections (default off).
    pub fn local_notifications(mut self, yes: bool) -> Self {
        self.local_notifications = yes;
        self
    }

    /// How long subscribing to the next hop may take (default
    /// [`DEFAULT_SUBSCRIBE_TIMEOUT`]).
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout;
        self
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct UpstreamRefresh {
    opts: Arc<UpstreamRefreshOptions>,
    /// The established connections, for local notifications.
    local: Arc<Mutex<HashMap<String, ConnHandle>>>,
}

impl fmt::Debug for UpstreamRefresh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamRefresh")
            .field("opts", &self.opts)
            .field("connections", &self.lock_local().len())
            .finish()
    }
}

/// The `upstream_refresh` handler.
pub fn upstream_refresh(options: UpstreamRefreshOptions) -> UpstreamRefresh {
    UpstreamRefresh {
        opts: Arc::new(options),
        local: Arc::default(),
    }
}

/// Per connection: the running follow task and the generation allowed to act.
#[derive(Default)]
struct FollowState(Mutex<FollowInner>);

#[derive(Default)]
struct FollowInner {
    /// The follow task, tagged with the next hop it follows.
    task: ConnTask<NextHop>,
}

impl FollowState {
    fn lock(&self) -> std::sync::MutexGuard<'_, FollowInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl UpstreamRefresh {
    fn lock_local(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnHandle>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the next hop of `conn`, unless a task still follows the same one.
    fn follow(&self, cx: &Cx, handle: &ConnHandle, conn: &Connection) {
        let Some(hop) = NextHop::of(cx, conn) else {
            debug!(connection.id = %conn.id, "upstream_refresh: no next hop to follow");
            return;
        };
        let state = handle.state::<FollowState>();
        let mut inner = state.lock();
        if inner.task.runs_for(&hop) {
            return;
        }
        let follower = |generation| {
            Follower {
                hop: hop.clone(),
                opts: self.opts.clone(),
                handle: handle.clone(),
                state: state.clone(),
                generation,
                local: self.opts.local_notifications.then(|| self.local.clone()),
            }
            .run()
        };
        inner
            .task
            .restart(handle.cancel_token(), hop.clone(), follower);
    }
}

/// One follow task of a connection.
struct Follower {
    hop: NextHop,
    opts: Arc<UpstreamRefreshOptions>,
    handle: ConnHandle,
    state: Arc<FollowState>,
    generation: u64,
    local: Option<Arc<Mutex<HashMap<String, ConnHandle>>>>,
}

impl Follower {
    fn id(&self) -> &str {
        self.handle.id()
    }

    async fn run(self) {
        let mut events = match self
            .hop
            .follow(&self.opts.channels, self.opts.subscribe_timeout)
            .await
        {
            Ok(events) => events,
            Err(e) => {
                warn!(connection.id = %self.id(), next = %self.hop.url, error = %e, "upstream_refresh: cannot follow the next hop");
                return;
            }
        };
        while let Some(item) = events.next().await {
            match item {
                Ok(copy) if copy.state == State::RefreshRequested as i32 => {
                    if !self.state.lock().task.is_current(self.generation) {
                        return;
                    }
                    info!(connection.id = %self.id(), "upstream_refresh: the endpoint asks for a refresh");
                    self.notify_others();
                    // Awaited, so requests that pile up while one runs become one.
                    if let Err(e) = self.handle.request_event(None).await {
                        warn!(connection.id = %self.id(), error = %e, "upstream_refresh: the requested refresh failed");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(connection.id = %self.id(), next = %self.hop.url, error = %e, "upstream_refresh: the next hop's monitor stream broke");
                    return;
                }
            }
        }
        debug!(connection.id = %self.id(), next = %self.hop.url, "upstream_refresh: the next hop's monitor stream ended");
    }

    /// With local notifications: queues a refresh of every other live connection.
    fn notify_others(&self) {
        let Some(local) = &self.local else {
            return;
        };
        let others: Vec<ConnHandle> = {
            let mut map = local.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, h| !h.is_closed());
            map.values()
                .filter(|h| h.id() != self.id())
                .cloned()
                .collect()
        };
        for other in others {
            debug!(connection.id = %other.id(), by = %self.id(), "upstream_refresh: local notification");
            // The outcome is the other connection's business.
            drop(other.request_event(None));
        }
    }
}

#[async_trait]
impl Handler for UpstreamRefresh {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let Some(handle) = cx.conn().cloned() else {
            return next.request(cx, req).await;
        };
        let conn = next.request(cx, req).await?;
        self.follow(cx, &handle, &conn);
        if self.opts.local_notifications {
            self.lock_local()
                .insert(handle.id().to_string(), handle.clone());
        }
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        if let Some(handle) = cx.conn() {
            if let Some(state) = handle.get_state::<FollowState>() {
                state.lock().task.stop();
            }
            self.lock_local().remove(handle.id());
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::handlers::test_support::{eventually, memory_url, serve_nse};
    use crate::handlers::{begin, client_url, update_path, Monitor};
    use crate::transport::{grpc_client, Server, Url};
    use nsm_proto::connection::{ConnectionEventType, Path, PathSegment};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The next hop: an endpoint "nse" that records the client id of each request.
    #[derive(Default)]
    struct Nse {
        requests: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Handler for Arc<Nse> {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let client = req
                .connection
                .as_ref()
                .and_then(|c| c.path.as_ref())
                .and_then(|p| p.path_segments.first())
                .map(|s| s.id.clone())
                .unwrap_or_default();
            self.requests.lock().unwrap().push(client);
            next.request(cx, req).await
        }
    }

    impl Nse {
        fn requests_of(&self, client: &str) -> usize {
            self.requests
                .lock()
                .unwrap()
                .iter()
                .filter(|c| *c == client)
                .count()
        }
    }

    /// On the return path of the first Request only, runs `during` (the event that
    /// arrives while the client is still returning).
    struct OnReturn {
        first: AtomicBool,
        during: Box<dyn Fn(&Connection) + Send + Sync>,
    }

    #[async_trait]
    impl Handler for Arc<OnReturn> {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let conn = next.request(cx, req).await?;
            if !self.first.swap(true, Ordering::SeqCst) {
                (self.during)(&conn);
            }
            Ok(conn)
        }
    }

    fn nsc_with(
        url: &Url,
        opts: UpstreamRefreshOptions,
        on_return: Option<Arc<OnReturn>>,
    ) -> Chain {
        Chain::builder()
            .push(update_path("nsc"))
            .push(begin())
            .push(upstream_refresh(opts))
            .push_opt(on_return)
            .push(client_url(url.clone()))
            .push(grpc_client(Channels::new()))
            .build()
    }

    fn nsc(url: &Url, opts: UpstreamRefreshOptions) -> Chain {
        nsc_with(url, opts, None)
    }

    fn request(id: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                network_service: "svc".into(),
                path: Some(Path {
                    index: 0,
                    path_segments: vec![PathSegment {
                        name: "nsc".into(),
                        id: id.into(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The endpoint publishes `conn` (as the client got it) in `state`.
    fn publish(monitor: &Monitor, conn: &Connection, state: State) {
        let nse_id = &conn.path.as_ref().unwrap().path_segments[1].id;
        let mut at_nse = monitor
            .get(nse_id)
            .expect("the endpoint knows the connection");
        at_nse.state = state as i32;
        monitor.publish(ConnectionEventType::Update, at_nse);
    }

    /// A served endpoint and a client whose connection "a" to it upstream_refresh
    /// follows: the endpoint, its server and monitor, the client chain, the connection.
    async fn following() -> (Arc<Nse>, Server, Monitor, Chain, Connection) {
        let u = memory_url("upstream-refresh-test");
        let nse = Arc::new(Nse::default());
        let (server, monitor) = serve_nse(&u, &nse).await;
        let chain = nsc(&u, UpstreamRefreshOptions::new(Channels::new()));
        let conn = chain
            .request(&mut Cx::client(), request("a"))
            .await
            .unwrap();
        eventually("following", || monitor.subscriber_count() == 1).await;
        (nse, server, monitor, chain, conn)
    }

    #[tokio::test]
    async fn a_refresh_requested_by_the_endpoint_re_requests_the_connection() {
        let (nse, _server, monitor, chain, conn) = following().await;
        publish(&monitor, &conn, State::RefreshRequested);
        eventually("refreshed", || nse.requests_of("a") == 2).await;
        let nse_id = &conn.path.as_ref().unwrap().path_segments[1].id;
        eventually("the refresh put the connection UP again", || {
            monitor.get(nse_id).map(|c| c.state) == Some(State::Up as i32)
        })
        .await;
        chain.close(&mut Cx::client(), conn).await.unwrap();
    }

    #[tokio::test]
    async fn other_states_are_left_to_heal() {
        let (nse, _server, monitor, chain, conn) = following().await;
        publish(&monitor, &conn, State::Down);
        publish(&monitor, &conn, State::Up);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(nse.requests_of("a"), 1);
        // Still following.
        publish(&monitor, &conn, State::RefreshRequested);
        eventually("refreshed", || nse.requests_of("a") == 2).await;
        chain.close(&mut Cx::client(), conn).await.unwrap();
    }

    async fn two_connections_one_asked(local_notifications: bool) -> Arc<Nse> {
        let u = memory_url("upstream-refresh-test");
        let nse = Arc::new(Nse::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let channels = Channels::new();
        let chain = nsc(
            &u,
            UpstreamRefreshOptions::new(channels.clone()).local_notifications(local_notifications),
        );
        let a = chain
            .request(&mut Cx::client(), request("a"))
            .await
            .unwrap();
        let b = chain
            .request(&mut Cx::client(), request("b"))
            .await
            .unwrap();
        eventually("following both", || channels.monitor_followers() == 2).await;
        assert_eq!(monitor.subscriber_count(), 1, "one shared stream");
        publish(&monitor, &a, State::RefreshRequested);
        eventually("a refreshed", || nse.requests_of("a") == 2).await;
        if local_notifications {
            eventually("b refreshed", || nse.requests_of("b") == 2).await;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        chain.close(&mut Cx::client(), a).await.unwrap();
        chain.close(&mut Cx::client(), b).await.unwrap();
        nse
    }

    #[tokio::test]
    async fn local_notifications_refresh_the_clients_other_connections() {
        let nse = two_connections_one_asked(true).await;
        assert_eq!(nse.requests_of("a"), 2);
        assert_eq!(nse.requests_of("b"), 2);
    }

    #[tokio::test]
    async fn without_local_notifications_only_the_asked_connection_refreshes() {
        let nse = two_connections_one_asked(false).await;
        assert_eq!(nse.requests_of("a"), 2);
        assert_eq!(nse.requests_of("b"), 1);
    }

    #[tokio::test]
    async fn a_request_made_while_the_client_still_returns_is_not_lost() {
        let u = memory_url("upstream-refresh-test");
        let nse = Arc::new(Nse::default());
        let (_server, monitor) = serve_nse(&u, &nse).await;
        let asker = monitor.clone();
        let on_return = Arc::new(OnReturn {
            first: AtomicBool::new(false),
            during: Box::new(move |conn| publish(&asker, conn, State::RefreshRequested)),
        });
        let chain = nsc_with(
            &u,
            UpstreamRefreshOptions::new(Channels::new()),
            Some(on_return),
        );
        let conn = chain
            .request(&mut Cx::client(), request("a"))
            .await
            .unwrap();
        eventually("refreshed", || nse.requests_of("a") == 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(nse.requests_of("a"), 2, "one refresh, not a loop");
        chain.close(&mut Cx::client(), conn).await.unwrap();
    }

    #[tokio::test]
    async fn close_stops_following_and_a_broken_stream_is_followed_again_on_the_next_request() {
        let u = memory_url("upstream-refresh-test");
        let nse = Arc::new(Nse::default());
        let (server, _monitor) = serve_nse(&u, &nse).await;
        let channels = Channels::new();
        let chain = nsc(&u, UpstreamRefreshOptions::new(channels.clone()));
        let conn = chain
            .request(&mut Cx::client(), request("a"))
            .await
            .unwrap();
        // The next hop restarts (without the connection): the stream breaks.
        server.kill();
        let back = Arc::new(Nse::default());
        let (_server, monitor) = serve_nse(&u, &back).await;
        let again = NetworkServiceRequest {
            connection: Some(conn.clone()),
            ..Default::default()
        };
        // The first call may still meet the broken channel.
        let mut conn = None;
        for _ in 0..50 {
            match chain.request(&mut Cx::client(), again.clone()).await {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let conn = conn.expect("the restarted hop answers");
        eventually("following the restarted hop", || {
            monitor.subscriber_count() == 1
        })
        .await;
        publish(&monitor, &conn, State::RefreshRequested);
        eventually("refreshed", || back.requests_of("a") == 2).await;
        chain.close(&mut Cx::client(), conn).await.unwrap();
        eventually("stopped following", || channels.monitor_followers() == 0).await;
    }
}
