//! `monitor_relay`: a passthrough hop follows its downstream connection and relays what
//! happens to it upstream (docs/SCENARIOS.md 6.4, 6.6).
//!
//! Where it goes: in the client chain that `connect` runs (the NSMgr's and the
//! forwarder's), right after that chain's `begin`:
//!
//! ```text
//! server: update_path, begin, monitor, ..., connect(client)
//! client:                                   begin, monitor_relay, ..., grpc_client
//! ```
//!
//! There it has everything it needs and nothing more: the connection the next hop
//! returned (so the next hop's path segment), the next hop's URL ([`ClientUrl`], put in
//! the context by `discover_forwarder` or `round_robin` before `connect`), this hop's
//! [`Monitor`] (the server chain's `monitor` puts itself in the context, and `connect`
//! copies the context into the client chain), and an owner whose lifetime is exactly
//! the downstream connection: the client `begin`'s connection, which a Close, a reselect
//! (the server `begin` closes the old downstream first) or `connect`'s clean-up after a
//! failure all end.
//!
//! What it does: after a successful Request it follows the connection at the next hop
//! (the process's shared MonitorConnection stream to that hop, cut down to this
//! connection's events; see "Cost") and passes them through the client-side filter ([`ClientFilter`]).
//! Each change the filter lets through is relayed upstream: this hop's connection (as
//! its `monitor` stored it, so the mechanism this hop gave its caller stays) takes the
//! downstream's path, context and state, and is published through the [`Monitor`] as an
//! UPDATE when it differs from what is stored. A change that arrives before this hop's
//! `monitor` has announced the connection (the downstream asked for a refresh while
//! this hop was still on its return path) is held, and relayed once the connection is
//! announced, so it is not lost. When the stream fails or ends (the next
//! hop died or restarted) this hop's connection is published in state DOWN, and the
//! relay stops: the upstream client heals, and its re-request starts a new relay.
//! A re-request keeps a relay that is still following the same next hop and replaces
//! it otherwise; Close stops it before the downstream Close goes out, so the teardown's
//! own DELETE events are not relayed as failures.
//!
//! State: per connection (in the client `begin`'s handle), the relay's registration
//! with the shared stream, the next hop it follows and a generation number: a relay
//! publishes only while its generation is current, so a replaced or stopped relay can
//! never publish over a newer state. The shared stream calls the relay with each event
//! (a function holding the filter's last copy, no task); the relay holds the
//! connection's state weakly, so it ends with the connection whichever way that ends.
//!
//! Failure handled: the next hop dying (a broken stream), or restarting without the
//! connection (its INITIAL_STATE_TRANSFER lacks it, which the filter turns into DOWN).
//! A subscription that cannot be made counts as a broken stream. Without a `begin`, a
//! `Monitor`, a `ClientUrl` or a next path segment there is nothing to follow and the
//! relay passes calls through untouched.
//!
//! Cost: no stream of its own. Every connection of this hop that goes to the same next
//! hop shares one MonitorConnection stream ([`shared_monitor`](crate::transport::channels::shared_monitor):
//! selector `[{name: this hop's name}]`, kept open a while after the last connection
//! left), so a Request or a Close opens no stream and no task; per connection there is
//! a follower registration (about 1.5 KB with the filter's copy of the connection). A
//! short-lived task exists only while a change waits for this hop's announcement.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::transport::channels::shared_monitor::Following;
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector, PathSegment, State,
};
use nsm_proto::networkservice::NetworkServiceRequest;
use prost_types::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::monitor::{ClientFilter, Monitor};
use crate::core::{spawn_owned, ConnHandle, Cx, Handler, MonitorSource, Next};
use crate::transport::{Channels, ClientUrl, Url};
use crate::Result;

/// How long subscribing to a next hop's monitor may take before it counts as broken.
pub const DEFAULT_SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client hop's connection and where it goes next: what the relay and heal follow.
///
/// Two are equal when they follow the same connection at the same next hop; the
/// expiry of this hop's segment (`floor`) is not compared, so a refresh keeps the
/// follower it has.
#[derive(Debug, Clone)]
pub(crate) struct NextHop {
    /// The next hop's URL.
    pub(crate) url: Url,
    /// This hop's connection id, segment name and index in the path.
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) index: u32,
    /// The next hop's path segment (name and id only).
    pub(crate) next: PathSegment,
    /// The expiry of this hop's own segment in the connection the next hop returned:
    /// an event carrying an older one is about an earlier incarnation of the
    /// connection (a DELETE of the path a reselect closed, still in flight on the
    /// shared stream) and is not this connection's news.
    pub(crate) floor: Option<Timestamp>,
}

impl PartialEq for NextHop {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url
            && self.id == other.id
            && self.name == other.name
            && self.index == other.index
            && self.next == other.next
    }
}

/// Whether the copy in `event` is older than `floor` at this hop's segment `index`. An
/// event without a connection (an initial state that lacks it) is never stale.
fn is_stale(event: &ConnectionEvent, index: u32, floor: &Timestamp) -> bool {
    !event.connections.is_empty()
        && event.connections.values().all(|c| {
            let seg = c
                .path
                .as_ref()
                .and_then(|p| p.path_segments.get(usize::try_from(index).ok()?));
            match seg.and_then(|s| s.expires.as_ref()) {
                Some(e) => (e.seconds, e.nanos) < (floor.seconds, floor.nanos),
                None => false,
            }
        })
}

/// What a follower of one connection makes of the next hop's events: copies of an
/// earlier incarnation left out (see [`NextHop::floor`]), then the client-side filter;
/// each change that passes comes out as this hop's connection. Shared by the relay and
/// by the followers that read a stream ([`NextHop::follow`]).
pub(crate) struct HopFilter {
    index: u32,
    floor: Option<Timestamp>,
    filter: ClientFilter,
}

impl HopFilter {
    /// This hop's connection as the event shows it, when the event changes it.
    pub(crate) fn apply(&mut self, event: &ConnectionEvent) -> Option<Connection> {
        if let Some(floor) = &self.floor {
            if is_stale(event, self.index, floor) {
                return None;
            }
        }
        // The filter emits exactly one connection per event.
        self.filter.apply(event)?.connections.into_values().next()
    }
}

impl NextHop {
    /// The filter of this connection's events.
    pub(crate) fn filter(&self) -> HopFilter {
        HopFilter {
            index: self.index,
            floor: self.floor,
            filter: ClientFilter::new(self.id.clone(), self.name.clone(), self.index),
        }
    }

    /// The next hop of `conn` (as returned to this client hop), dialled at the call's
    /// [`ClientUrl`]; `None` when either is missing.
    pub(crate) fn of(cx: &Cx, conn: &Connection) -> Option<Self> {
        let url = cx.ext().get::<ClientUrl>()?.0.clone();
        let path = conn.path.as_ref()?;
        let index = usize::try_from(path.index).ok()?;
        let me = path.path_segments.get(index)?;
        let next = path.path_segments.get(index.checked_add(1)?)?;
        Some(NextHop {
            url,
            id: conn.id.clone(),
            name: me.name.clone(),
            index: path.index,
            next: PathSegment {
                name: next.name.clone(),
                id: next.id.clone(),
                ..Default::default()
            },
            floor: me.expires,
        })
    }

    /// Follows this connection at the next hop: the stream yields this hop's connection
    /// as the next hop reports it, in this hop's view (client-side filtered: changes
    /// only, DELETE as DOWN), and ends with an error when the stream breaks. The
    /// subscription is the process's shared stream to the next hop for this hop's name
    /// ([`shared_monitor`](crate::transport::channels::shared_monitor)); events of an earlier
    /// incarnation of the connection (see `floor`) are left out.
    pub(crate) async fn follow(
        &self,
        channels: &Channels,
        timeout: Duration,
    ) -> Result<BoxStream<'static, Result<Connection>>> {
        let following = channels
            .follow_segment(&self.url, &self.name, &self.id, self.index, timeout)
            .await?;
        let mut filter = self.filter();
        Ok(following
            .filter_map(move |item| {
                futures::future::ready(match item {
                    Ok(event) => filter.apply(&event).map(Ok),
                    Err(e) => Some(Err(e)),
                })
            })
            .boxed())
    }
}

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct MonitorRelay {
    channels: Channels,
    subscribe_timeout: Duration,
}

impl fmt::Debug for MonitorRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MonitorRelay")
            .field("subscribe_timeout", &self.subscribe_timeout)
            .finish_non_exhaustive()
    }
}

/// The `monitor_relay` handler, subscribing to next hops through `channels`.
pub fn monitor_relay(channels: Channels) -> MonitorRelay {
    MonitorRelay {
        channels,
        subscribe_timeout: DEFAULT_SUBSCRIBE_TIMEOUT,
    }
}

impl MonitorRelay {
    /// How long subscribing may take before the stream counts as broken (default
    /// [`DEFAULT_SUBSCRIBE_TIMEOUT`]).
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout;
        self
    }

    fn follow(&self, cx: &Cx, conn: &Connection) {
        let Some(handle) = cx.conn() else {
            debug!("monitor_relay: no begin before it; nothing owns a relay");
            return;
        };
        let Some(monitor) = cx.ext().get::<Monitor>().cloned() else {
            debug!(connection.id = %conn.id, "monitor_relay: no monitor in this hop; nothing to relay to");
            return;
        };
        let Some(hop) = NextHop::of(cx, conn) else {
            debug!(connection.id = %conn.id, "monitor_relay: no next hop to follow");
            return;
        };
        let state = handle.state::<RelayState>();
        let (old, generation) = {
            let mut inner = state.lock();
            if let Some(running) = &inner.running {
                if running.hop == hop && !running.broken.load(Ordering::SeqCst) {
                    return;
                }
            }
            (inner.stop(), inner.generation)
        };
        // Unfollowed outside the relay's lock: the shared stream calls relays with its
        // own lock held, and they take the relay's lock.
        drop(old);
        let broken = Arc::new(AtomicBool::new(false));
        let mut sink = RelaySink {
            id: hop.id.clone(),
            url: hop.url.clone(),
            filter: hop.filter(),
            monitor,
            state: Arc::downgrade(&state),
            generation,
            cancel: handle.cancel_token().clone(),
            broken: broken.clone(),
            pending: Arc::default(),
        };
        let following = match self.channels.follow_segment_with(
            &hop.url,
            &hop.name,
            &hop.id,
            hop.index,
            Box::new(move |item| sink.on(item)),
        ) {
            Ok(f) => f,
            Err(e) => {
                warn!(connection.id = %hop.id, next = %hop.url, error = %e, "monitor_relay: cannot follow the downstream");
                broken.store(true, Ordering::SeqCst);
                publish_down(&state, generation, &hop.id, cx.ext().get::<Monitor>());
                return;
            }
        };
        let late = {
            let mut inner = state.lock();
            if inner.generation == generation {
                inner.running = Some(Running {
                    hop,
                    broken,
                    _following: following,
                });
                None
            } else {
                Some(following)
            }
        };
        drop(late);
    }
}

/// Per connection: the running relay and the generation allowed to publish.
#[derive(Default)]
struct RelayState(Mutex<RelayInner>);

#[derive(Default)]
struct RelayInner {
    generation: u64,
    running: Option<Running>,
}

/// A relay: its registration with the shared stream (dropping it unfollows).
struct Running {
    hop: NextHop,
    /// The stream broke (the relay published DOWN and relays nothing more).
    broken: Arc<AtomicBool>,
    _following: Following,
}

impl RelayState {
    fn lock(&self) -> std::sync::MutexGuard<'_, RelayInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `publish` if `generation` is still the current one (under the lock, so a
    /// stop that returned has fenced off every later publish of older relays).
    fn publish_if_current(&self, generation: u64, publish: impl FnOnce()) {
        let inner = self.lock();
        if inner.generation == generation {
            publish();
        }
    }
}

impl RelayInner {
    /// Fences off the running relay's publishing and hands it back: the caller drops
    /// it (which unfollows) after letting go of the lock.
    #[must_use]
    fn stop(&mut self) -> Option<Running> {
        self.generation += 1;
        self.running.take()
    }
}

/// This hop's connection `base` with what the downstream says of it: the downstream's
/// path, context and state (the mechanism and labels this hop gave its caller stay).
/// A copy without a path is the filter's bare DOWN (the next hop does not know the
/// connection, and the relay had no copy of it yet): only its state counts, or the
/// relayed connection would lose its path and no upstream subscriber would match it.
fn merged(mut base: Connection, downstream: &Connection) -> Connection {
    if downstream.path.is_some() {
        base.path = downstream.path.clone();
        base.context = downstream.context.clone();
    }
    base.state = downstream.state;
    base
}

/// Relays `copy` into this hop's monitor; `false` when the monitor does not know the
/// connection yet (its caller has not seen it: nothing can be relayed before).
fn relay_copy(
    monitor: &Monitor,
    state: &RelayState,
    generation: u64,
    id: &str,
    copy: &Connection,
) -> bool {
    let mut known = true;
    state.publish_if_current(generation, || {
        let Some(base) = monitor.get_shared(id) else {
            known = false;
            return;
        };
        // Compared in place: most copies change nothing (the UPDATE that answers this
        // hop's own Request), and then nothing is copied.
        let changed = base.state != copy.state
            || (copy.path.is_some() && (base.path != copy.path || base.context != copy.context));
        if changed {
            let out = merged(Connection::clone(&base), copy);
            debug!(connection.id = %id, state = out.state, "monitor_relay: relaying a downstream change");
            monitor.publish(ConnectionEventType::Update, out);
        }
    });
    known
}

/// Publishes this hop's connection DOWN (the downstream can no longer be followed).
fn publish_down(state: &RelayState, generation: u64, id: &str, monitor: Option<&Monitor>) {
    let Some(monitor) = monitor else {
        return;
    };
    state.publish_if_current(generation, || {
        if let Some(mut conn) = monitor.get(id) {
            if conn.state != State::Down as i32 {
                conn.state = State::Down as i32;
                monitor.publish(ConnectionEventType::Update, conn);
            }
        }
    });
}

/// What the shared stream calls with the events of one relayed connection: the
/// client-side filter, then the relay into this hop's monitor. No task of its own: a
/// change that arrives before this hop's monitor has announced the connection is held
/// by a short-lived waiter task (see [`RelaySink::hold`]).
struct RelaySink {
    id: String,
    url: Url,
    filter: HopFilter,
    monitor: Monitor,
    /// Weak: the relay lives as long as the connection's state does.
    state: std::sync::Weak<RelayState>,
    generation: u64,
    /// The connection's lifetime: nothing is relayed after it ended.
    cancel: CancellationToken,
    broken: Arc<AtomicBool>,
    /// The latest change waiting for this hop's monitor to announce the connection.
    pending: Arc<Mutex<Option<Connection>>>,
}

impl RelaySink {
    fn on(&mut self, item: Result<ConnectionEvent>) {
        if self.broken.load(Ordering::SeqCst) || self.cancel.is_cancelled() {
            return;
        }
        let Some(state) = self.state.upgrade() else {
            return;
        };
        match item {
            Ok(event) => {
                let Some(copy) = self.filter.apply(&event) else {
                    return;
                };
                if !relay_copy(&self.monitor, &state, self.generation, &self.id, &copy) {
                    self.hold(state, copy);
                }
            }
            Err(e) => {
                warn!(connection.id = %self.id, next = %self.url, error = %e, "monitor_relay: the downstream monitor stream broke");
                self.broken.store(true, Ordering::SeqCst);
                publish_down(&state, self.generation, &self.id, Some(&self.monitor));
            }
        }
    }

    /// A downstream change can arrive before this hop's own monitor announced the
    /// connection (the downstream asked for a refresh while this hop was still on its
    /// return path). It waits for the announcement instead of being lost: the latest
    /// such change is kept, and one waiter relays it once the monitor has the
    /// connection.
    fn hold(&self, state: Arc<RelayState>, copy: Connection) {
        let start = {
            let mut slot = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let start = slot.is_none();
            *slot = Some(copy);
            start
        };
        if !start {
            return;
        }
        let (monitor, pending, id, generation) = (
            self.monitor.clone(),
            self.pending.clone(),
            self.id.clone(),
            self.generation,
        );
        spawn_owned(self.cancel.child_token(), async move {
            let selector = MonitorScopeSelector {
                path_segments: vec![PathSegment {
                    id: id.clone(),
                    ..Default::default()
                }],
                network_services: Vec::new(),
            };
            // Subscribed first, checked after: no announcement slips between.
            let mut announced = monitor.subscribe(selector);
            loop {
                {
                    let mut slot = pending.lock().unwrap_or_else(|p| p.into_inner());
                    match slot.as_ref() {
                        None => return,
                        Some(copy) => {
                            if relay_copy(&monitor, &state, generation, &id, copy) {
                                *slot = None;
                                return;
                            }
                        }
                    }
                }
                if announced.next().await.is_none() {
                    // This hop's monitor is shutting down: nothing to wait for.
                    return;
                }
            }
        });
    }
}

fn stop(handle: Option<&ConnHandle>) {
    if let Some(state) = handle.and_then(|h| h.get_state::<RelayState>()) {
        let old = state.lock().stop();
        drop(old);
    }
}

#[async_trait]
impl Handler for MonitorRelay {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = next.request(cx, req).await?;
        self.follow(cx, &conn);
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        stop(cx.conn());
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Chain, MonitorSource};
    use crate::handlers::monitor::filter_events;
    use crate::handlers::test_support::{eventually, memory_url, serve_nse, TestHop};
    use crate::handlers::{begin, connect, monitor, update_path};
    use crate::transport::{grpc_client, serve, Server, Services};
    use nsm_proto::connection::ConnectionEvent;

    /// A downstream endpoint ("nse") served on `url` (its own work only counts), and
    /// its monitor.
    async fn downstream(url: &Url) -> (Server, Monitor) {
        serve_nse(url, &Arc::new(TestHop::default())).await
    }

    /// Puts the URL it holds (which a test may change) in the context, as `select`
    /// handlers do.
    #[derive(Clone)]
    struct Dial(Arc<Mutex<Url>>);

    #[async_trait]
    impl Handler for Dial {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let url = self.0.lock().unwrap().clone();
            cx.ext_mut().insert(ClientUrl(url));
            next.request(cx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            let url = self.0.lock().unwrap().clone();
            cx.ext_mut().insert(ClientUrl(url));
            next.close(cx, conn).await
        }
    }

    /// A passthrough hop ("hop") whose client chain dials `next` with a relay after its
    /// begin; returns its chain, its monitor and the switch of its next hop's URL.
    fn hop_with(next: &Url, channels: &Channels) -> (Chain, Monitor, Dial) {
        let monitor = monitor();
        let dial = Dial(Arc::new(Mutex::new(next.clone())));
        let client = Chain::builder()
            .push(begin())
            .push(monitor_relay(channels.clone()))
            .push(grpc_client(channels.clone()))
            .build();
        let chain = Chain::builder()
            .push(update_path("hop"))
            .push(begin())
            .push(monitor.clone())
            .push(dial.clone())
            .push(connect(client))
            .build();
        (chain, monitor, dial)
    }

    fn hop(next: &Url, channels: &Channels) -> (Chain, Monitor) {
        let (chain, monitor, _) = hop_with(next, channels);
        (chain, monitor)
    }

    fn request() -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "nsc-id".into(),
                network_service: "svc".into(),
                path: Some(nsm_proto::connection::Path {
                    index: 0,
                    path_segments: vec![PathSegment {
                        name: "nsc".into(),
                        id: "nsc-id".into(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Subscribes to `monitor` as the NSC would and returns the filtered copies.
    fn upstream_view(monitor: &Monitor) -> BoxStream<'static, Result<ConnectionEvent>> {
        filter_events(
            "nsc-id",
            "nsc",
            0,
            monitor.subscribe(MonitorScopeSelector::default()),
        )
    }

    async fn next_state(events: &mut BoxStream<'static, Result<ConnectionEvent>>) -> Connection {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .unwrap();
        event.connections.into_values().next().unwrap()
    }

    #[tokio::test]
    async fn a_dead_next_hop_turns_this_hops_connection_down() {
        let channels = Channels::new();
        let nse_url = memory_url("relay-test-nse");
        let (server, _nse_monitor) = downstream(&nse_url).await;
        let (chain, monitor) = hop(&nse_url, &channels);
        let conn = chain.request(&mut Cx::server(), request()).await.unwrap();
        assert_eq!(conn.path.as_ref().unwrap().path_segments.len(), 3);
        let mut events = upstream_view(&monitor);
        assert_eq!(next_state(&mut events).await.state, State::Up as i32);

        server.kill();
        let down = next_state(&mut events).await;
        assert_eq!(down.state, State::Down as i32);
        assert_eq!(
            down.path.unwrap().path_segments.len(),
            3,
            "the DOWN copy keeps the whole path"
        );
    }

    #[tokio::test]
    async fn a_next_hop_that_does_not_know_the_connection_turns_it_down_with_its_path() {
        // A next hop whose monitor never hears of the connection: what the relay meets
        // when the next hop restarted after the Request and before the subscription.
        let nse_url = memory_url("relay-test-nse");
        let forgetful = monitor();
        let chain = Chain::builder()
            .push(update_path("nse").trim_tail(true))
            .push(begin())
            .build();
        let source: Arc<dyn MonitorSource> = forgetful.source();
        let _server = serve(
            &nse_url,
            Services::new().network_service(chain).monitor(source),
        )
        .await
        .unwrap();
        let (chain, monitor) = hop(&nse_url, &Channels::new());
        chain.request(&mut Cx::server(), request()).await.unwrap();
        let mut events = upstream_view(&monitor);
        let mut seen = next_state(&mut events).await;
        if seen.state == State::Up as i32 {
            seen = next_state(&mut events).await;
        }
        assert_eq!(seen.state, State::Down as i32);
        assert_eq!(
            seen.path.map(|p| p.path_segments.len()),
            Some(3),
            "the DOWN copy keeps the path, so the upstream client recognises it"
        );
    }

    #[test]
    fn a_copy_without_a_path_changes_only_the_state() {
        let base = Connection {
            id: "hop-id".into(),
            path: Some(nsm_proto::connection::Path {
                index: 1,
                path_segments: vec![PathSegment::default(); 3],
            }),
            context: Some(Default::default()),
            ..Default::default()
        };
        let bare = Connection {
            id: "hop-id".into(),
            state: State::Down as i32,
            ..Default::default()
        };
        let out = merged(base.clone(), &bare);
        assert_eq!(out.state, State::Down as i32);
        assert_eq!((out.path, out.context), (base.path, base.context));
    }

    #[tokio::test]
    async fn a_downstream_change_is_relayed_with_this_hops_mechanism() {
        let channels = Channels::new();
        let nse_url = memory_url("relay-test-nse");
        let (_server, nse_monitor) = downstream(&nse_url).await;
        let (chain, monitor) = hop(&nse_url, &channels);
        let conn = chain.request(&mut Cx::server(), request()).await.unwrap();
        let hop_id = conn.path.as_ref().unwrap().path_segments[1].id.clone();
        let nse_id = conn.path.as_ref().unwrap().path_segments[2].id.clone();
        // This hop's caller was given its own mechanism.
        let mut mine = monitor.get(&hop_id).unwrap();
        mine.mechanism = Some(nsm_proto::connection::Mechanism {
            r#type: "MINE".into(),
            ..Default::default()
        });
        monitor.publish(ConnectionEventType::Update, mine);
        let mut events = upstream_view(&monitor);
        next_state(&mut events).await;

        // The endpoint asks for a refresh (as vl3mtu would).
        let mut at_nse = nse_monitor.get(&nse_id).unwrap();
        at_nse.state = State::RefreshRequested as i32;
        nse_monitor.publish(ConnectionEventType::Update, at_nse);
        let relayed = next_state(&mut events).await;
        assert_eq!(relayed.state, State::RefreshRequested as i32);
        assert_eq!(relayed.mechanism.unwrap().r#type, "MINE");
    }

    /// Holds the answer on its way back (after `connect`, before `monitor`) and, while
    /// it holds it, the downstream asks for a refresh.
    struct AskWhileReturning(Monitor);

    #[async_trait]
    impl Handler for AskWhileReturning {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let conn = next.request(cx, req).await?;
            let nse_id = &conn.path.as_ref().unwrap().path_segments[2].id;
            let mut at_nse = self.0.get(nse_id).unwrap();
            at_nse.state = State::RefreshRequested as i32;
            self.0.publish(ConnectionEventType::Update, at_nse);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(conn)
        }
    }

    #[tokio::test]
    async fn a_change_made_while_this_hop_still_returns_is_relayed_once_announced() {
        let channels = Channels::new();
        let nse_url = memory_url("relay-test-nse");
        let (_server, nse_monitor) = downstream(&nse_url).await;
        let monitor = monitor();
        let client = Chain::builder()
            .push(begin())
            .push(monitor_relay(channels.clone()))
            .push(grpc_client(channels.clone()))
            .build();
        let chain = Chain::builder()
            .push(update_path("hop"))
            .push(begin())
            .push(monitor.clone())
            .push(AskWhileReturning(nse_monitor.clone()))
            .push(Dial(Arc::new(Mutex::new(nse_url.clone()))))
            .push(connect(client))
            .build();
        let conn = chain.request(&mut Cx::server(), request()).await.unwrap();
        let hop_id = conn.path.as_ref().unwrap().path_segments[1].id.clone();
        eventually("the refresh request was relayed", || {
            monitor.get(&hop_id).map(|c| c.state) == Some(State::RefreshRequested as i32)
        })
        .await;
    }

    #[tokio::test]
    async fn close_stops_the_relay_without_reporting_down() {
        let channels = Channels::new();
        let nse_url = memory_url("relay-test-nse");
        let (_server, nse_monitor) = downstream(&nse_url).await;
        let (chain, monitor) = hop(&nse_url, &channels);
        let conn = chain.request(&mut Cx::server(), request()).await.unwrap();
        eventually("the relay subscribed", || {
            nse_monitor.subscriber_count() == 1
        })
        .await;

        let mut events = monitor.subscribe(MonitorScopeSelector::default());
        events.next().await; // the initial state
        chain.close(&mut Cx::server(), conn).await.unwrap();
        let event = events.next().await.unwrap().unwrap();
        assert_eq!(
            event.r#type,
            ConnectionEventType::Delete as i32,
            "the first event after Close is the DELETE, not a relayed DOWN"
        );
        eventually("the relay stopped following", || {
            channels.monitor_followers() == 0
        })
        .await;
        // The shared stream lingers for the next connection.
        assert_eq!(nse_monitor.subscriber_count(), 1);
        assert!(monitor.is_empty());
    }

    #[tokio::test]
    async fn a_refresh_keeps_the_stream_and_a_new_next_hop_replaces_it() {
        let channels = Channels::new();
        let first = memory_url("relay-test-nse-1");
        let second = memory_url("relay-test-nse-2");
        let (_s1, m1) = downstream(&first).await;
        let (_s2, m2) = downstream(&second).await;
        let (chain, _monitor, dial) = hop_with(&first, &channels);
        let conn = chain.request(&mut Cx::server(), request()).await.unwrap();
        eventually("subscribed to the first", || m1.subscriber_count() == 1).await;
        let again = NetworkServiceRequest {
            connection: Some(conn.clone()),
            ..Default::default()
        };
        chain
            .request(&mut Cx::server(), again.clone())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(m1.subscriber_count(), 1, "a refresh keeps the one stream");
        assert_eq!(channels.monitor_followers(), 1);

        *dial.0.lock().unwrap() = second.clone();
        chain.request(&mut Cx::server(), again).await.unwrap();
        eventually("moved to the second", || {
            m2.subscriber_count() == 1 && channels.monitor_followers() == 1
        })
        .await;
        assert_eq!(channels.shared_monitors(), 2, "the first stream lingers");
        chain.close(&mut Cx::server(), conn).await.unwrap();
        eventually("stopped following", || channels.monitor_followers() == 0).await;
    }

    #[test]
    fn the_next_hop_is_the_segment_after_this_hops_own() {
        let mut cx = Cx::client();
        let conn = Connection {
            id: "b".into(),
            path: Some(nsm_proto::connection::Path {
                index: 1,
                path_segments: ["a", "b", "c"]
                    .iter()
                    .map(|n| PathSegment {
                        name: format!("{n}-name"),
                        id: n.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        assert!(
            NextHop::of(&cx, &conn).is_none(),
            "no URL, nothing to follow"
        );
        let u = memory_url("relay-test-c");
        cx.ext_mut().insert(ClientUrl(u.clone()));
        let hop = NextHop::of(&cx, &conn).unwrap();
        assert_eq!(
            (hop.id.as_str(), hop.name.as_str(), hop.index),
            ("b", "b-name", 1)
        );
        assert_eq!(
            (hop.next.name.as_str(), hop.next.id.as_str()),
            ("c-name", "c")
        );
        assert_eq!(hop.url, u);
        let mut last = conn.clone();
        last.path.as_mut().unwrap().index = 2;
        last.id = "c".into();
        assert!(
            NextHop::of(&cx, &last).is_none(),
            "the last hop has no next"
        );
    }
}
