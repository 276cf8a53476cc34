//! One MonitorConnection stream per peer and client name, shared by every connection of
//! this process that follows that peer.
//!
//! A client hop (a manager's or forwarder's `monitor_relay`, a client's `heal`) follows
//! each of its connections at the next hop. Subscribing once per connection costs a
//! gRPC stream per connection at both ends (a server task, codec buffers, a subscriber
//! queue at the peer, a decoder here) and a stream set-up and tear-down on every
//! Request and Close. Here a hop named `name` subscribes **once** per peer, with the
//! selector `[{name}]`: every connection whose path goes through a segment of that name
//! (NSM's contiguous-run rule, so any implementation of the API serves it the same way).
//! Each event is split by connection and handed to the followers of the segment id at
//! that place in the path, as an event with that one connection; a follower then runs
//! the client-side filter ([`ClientFilter`](crate::handlers::monitor::ClientFilter)) on
//! it as it would on a stream of its own.
//!
//! What a follower sees, against a stream of its own:
//! - the peer's INITIAL_STATE_TRANSFER comes once per shared stream; a follower gets
//!   its connection from it when it is there. A follower registered before the
//!   subscription went out (its Request had returned, so the peer must know the
//!   connection) gets an empty initial state when the connection is missing, which the
//!   filter turns into DOWN (the peer restarted without it); for a follower that
//!   joined a stream already opening, absence proves nothing and it gets nothing;
//! - a change of a connection that nobody follows yet (DELETE, or any state but UP:
//!   DOWN, REFRESH_REQUESTED...) is kept for a while (the last [`RECENT`] of them): a
//!   follower that joins after its Request returned gets it, so a death or a refresh
//!   request between the answer and the join is not missed (the follower leaves out
//!   copies of an earlier incarnation of its connection by their expiry); a newer
//!   change of the same connection replaces the kept one, and an UP nobody takes
//!   clears it (a failed refresh then a successful one leave nothing stale);
//! - when the shared stream breaks or ends (the peer died or restarted), every follower
//!   gets the error and its stream ends, exactly as with a stream of its own;
//! - a stream with no follower left stays open for [`DEFAULT_LINGER`], so connections
//!   that come and go (Request, Close, Request...) do not open a stream each.
//!
//! Failure handled: a peer that cannot be subscribed to (every follower waiting for
//! the stream gets the error, and the next follow tries again), a peer that dies (the
//! error above), a follower that goes away (its registration is removed when its stream
//! is dropped, so nothing piles up).
//!
//! State: per (peer URL, name), the stream's task, its followers by segment id, and the
//! recent unclaimed changes. Per follower: its registration and either an unbounded
//! queue ([`Channels::follow_segment`]: events per connection are few, one per
//! Request, refresh or state change) or a function the stream's task calls
//! ([`Channels::follow_segment_with`]: no task and no queue per connection).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::channel::mpsc;
use futures::stream::{Stream, StreamExt};
use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector, PathSegment, State,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use super::{monitor_connections, Channels};
use crate::core::url::Url;
use crate::{Error, Result};

/// How long a shared stream stays open after its last follower left.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(30);

/// How long opening a shared stream may take before its followers get an error.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many changes (not UP) of connections nobody follows are kept for followers that
/// join late.
pub const RECENT: usize = 256;

type Key = (Url, String);

/// The shared streams of one channel pool.
pub(crate) struct SharedMonitors {
    peers: Mutex<HashMap<Key, Arc<Peer>>>,
    /// How long a stream without followers stays open, in milliseconds.
    linger_ms: AtomicU64,
}

impl Default for SharedMonitors {
    fn default() -> Self {
        SharedMonitors {
            peers: Mutex::default(),
            linger_ms: AtomicU64::new(
                u64::try_from(DEFAULT_LINGER.as_millis()).unwrap_or(u64::MAX),
            ),
        }
    }
}

impl fmt::Debug for SharedMonitors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMonitors")
            .field("streams", &self.len())
            .finish()
    }
}

impl SharedMonitors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Peer>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many shared streams are open or opening.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn remove(&self, peer: &Arc<Peer>) {
        let mut peers = self.lock();
        if peers.get(&peer.key).is_some_and(|p| Arc::ptr_eq(p, peer)) {
            peers.remove(&peer.key);
        }
    }
}

/// Where a shared stream is.
#[derive(Debug, Clone)]
enum Phase {
    Opening,
    Open,
    Failed(Error),
}

struct Peer {
    key: Key,
    pool: Weak<SharedMonitors>,
    state: Mutex<PeerState>,
    phase: watch::Sender<Phase>,
}

#[derive(Default)]
struct PeerState {
    /// Followers by the segment id they follow.
    followers: HashMap<String, Vec<Follower>>,
    count: usize,
    next_key: u64,
    /// The stream ended: nobody may register any more.
    dead: bool,
    /// The subscription went out (followers registered from now on cannot tell
    /// anything from their absence in the initial state).
    subscribed: bool,
    /// When the last follower left (None while someone follows).
    idle_since: Option<Instant>,
    /// Changes (not UP) of connections nobody followed: (segment id, index, event).
    recent: VecDeque<(String, u32, ConnectionEvent)>,
}

struct Follower {
    key: u64,
    index: u32,
    /// Registered before the subscription went out: the peer's initial state must
    /// contain its connection (its Request had returned), so absence there means the
    /// peer lost it.
    before_subscribe: bool,
    sink: Sink,
}

/// A function that [`Channels::follow_segment_with`] calls with each event of a
/// followed connection, in order, and once with the error that ends the stream. It
/// runs on the shared stream's task (with no lock of the stream held, so it may drop
/// its own [`Following`]): it must be quick and must not block.
pub type FollowFn = Box<dyn FnMut(Result<ConnectionEvent>) + Send>;

type SharedFn = Arc<Mutex<FollowFn>>;

/// Where a follower's events go.
#[derive(Clone)]
enum Sink {
    Queue(mpsc::UnboundedSender<Result<ConnectionEvent>>),
    Call(SharedFn),
}

/// Calls a follower's function (after the stream's lock was let go).
fn call(f: &SharedFn, item: Result<ConnectionEvent>) {
    let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
    (*f)(item);
}

/// Items for followers' functions, collected under the stream's lock and handed over
/// after it.
#[derive(Default)]
struct Calls(Vec<(SharedFn, Result<ConnectionEvent>)>);

impl Calls {
    /// Hands `item` to `sink` now (a queue) or later (a function); `false` when the
    /// follower is gone.
    fn send(&mut self, sink: &Sink, item: Result<ConnectionEvent>) -> bool {
        self.give(sink, item).is_none()
    }

    /// [`send`](Self::send) that gives the item back when the follower is gone.
    fn give(
        &mut self,
        sink: &Sink,
        item: Result<ConnectionEvent>,
    ) -> Option<Result<ConnectionEvent>> {
        match sink {
            Sink::Queue(tx) => tx.unbounded_send(item).err().map(|e| e.into_inner()),
            Sink::Call(f) => {
                self.0.push((f.clone(), item));
                None
            }
        }
    }

    fn run(self) {
        for (f, item) in self.0 {
            call(&f, item);
        }
    }
}

impl Peer {
    fn lock(&self) -> std::sync::MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands one event to the followers of each connection in it.
    fn dispatch(&self, event: ConnectionEvent) {
        let name = &self.key.1;
        let kind = event.r#type;
        let gone = kind == ConnectionEventType::Delete as i32;
        let initial = kind == ConnectionEventType::InitialStateTransfer as i32;
        let mut calls = Calls::default();
        let mut state = self.lock();
        let mut present: Vec<(String, u32)> = Vec::new();
        for (key, conn) in event.connections {
            let Some(path) = conn.path.as_ref() else {
                continue;
            };
            let mut places: Vec<(String, u32)> = Vec::new();
            for (i, seg) in path.path_segments.iter().enumerate() {
                if seg.name == *name {
                    if let Ok(i) = u32::try_from(i) {
                        places.push((seg.id.clone(), i));
                    }
                }
            }
            if initial {
                present.extend(places.iter().cloned());
            }
            // The connection goes to the last place's last follower as it came (nearly
            // always the only one), copied only for the others.
            let mut conn = Some(conn);
            let last_place = places.len().saturating_sub(1);
            for (p, (id, index)) in places.into_iter().enumerate() {
                let single = |conn: Connection| ConnectionEvent {
                    r#type: kind,
                    connections: HashMap::from([(key.clone(), conn)]),
                };
                let sinks: Vec<Sink> = state
                    .followers
                    .get(&id)
                    .map(|fs| {
                        fs.iter()
                            .filter(|f| f.index == index)
                            .map(|f| f.sink.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let up = conn.as_ref().is_some_and(|c| c.state == State::Up as i32);
                let event = if p == last_place {
                    conn.take().map(single)
                } else {
                    conn.clone().map(single)
                };
                // What is not handed over yet: a copy for each follower but the last,
                // which gets it; back from a gone last follower, it is kept below.
                let mut undelivered = event;
                let mut delivered = false;
                for (n, sink) in sinks.iter().enumerate() {
                    let last = n + 1 == sinks.len();
                    let item = if last {
                        undelivered.take()
                    } else {
                        undelivered.clone()
                    };
                    let Some(item) = item else { break };
                    match calls.give(sink, Ok(item)) {
                        None => delivered = true,
                        Some(Ok(back)) if last => undelivered = Some(back),
                        Some(_) => {}
                    }
                }
                if !delivered {
                    // The newest change of a place supersedes what was kept of it: a
                    // DOWN followed by UP (a failed refresh, then a successful one)
                    // leaves nothing for a follower that joins after both.
                    state
                        .recent
                        .retain(|(rid, rindex, _)| !(*rid == id && *rindex == index));
                    if gone || !up {
                        if let Some(event) = undelivered {
                            if state.recent.len() >= RECENT {
                                state.recent.pop_front();
                            }
                            state.recent.push_back((id, index, event));
                        }
                    }
                }
            }
        }
        if initial {
            // Followers whose connection the peer should know but does not: an empty
            // initial state, which the client-side filter turns into DOWN.
            for (id, followers) in state.followers.iter_mut() {
                for f in followers.iter_mut().filter(|f| f.before_subscribe) {
                    f.before_subscribe = false;
                    if !present.iter().any(|(pid, pi)| pid == id && *pi == f.index) {
                        calls.send(
                            &f.sink,
                            Ok(ConnectionEvent {
                                r#type: kind,
                                connections: HashMap::new(),
                            }),
                        );
                    }
                }
            }
        }
        drop(state);
        calls.run();
    }

    /// Takes the peer out of its pool (if it is still the pool's) and ends every
    /// follower's stream with `error`.
    fn end(self: &Arc<Self>, error: Error) {
        if let Some(pool) = self.pool.upgrade() {
            pool.remove(self);
        }
        self.fail(error);
    }

    /// When nobody has followed for `linger`: takes the peer out of its pool and marks
    /// it dead, atomically with respect to registrations (pool lock, then peer lock, as
    /// `register` takes them). Returns whether it did.
    fn close_if_idle(self: &Arc<Self>, linger: Duration) -> bool {
        let Some(pool) = self.pool.upgrade() else {
            return true;
        };
        let mut peers = pool.lock();
        let mut state = self.lock();
        if state.count != 0 || state.idle_since.is_none_or(|t| t.elapsed() < linger) {
            return false;
        }
        state.dead = true;
        state.recent.clear();
        if peers.get(&self.key).is_some_and(|p| Arc::ptr_eq(p, self)) {
            peers.remove(&self.key);
        }
        true
    }

    /// Ends every follower's stream with `error`; nobody may register afterwards.
    fn fail(&self, error: Error) {
        let followers = {
            let mut state = self.lock();
            state.dead = true;
            state.count = 0;
            state.recent.clear();
            std::mem::take(&mut state.followers)
        };
        let mut calls = Calls::default();
        for f in followers.into_values().flatten() {
            calls.send(&f.sink, Err(error.clone()));
        }
        calls.run();
        self.phase.send_replace(Phase::Failed(error));
    }

    fn unregister(&self, id: &str, key: u64) {
        let mut state = self.lock();
        let Some(list) = state.followers.get_mut(id) else {
            return;
        };
        let before = list.len();
        list.retain(|f| f.key != key);
        let removed = before - list.len();
        if list.is_empty() {
            state.followers.remove(id);
        }
        state.count -= removed;
        if state.count == 0 && !state.dead {
            state.idle_since = Some(Instant::now());
        }
    }
}

/// The events of one connection at a peer, cut from the shared stream; see the
/// [module docs](self). Dropping it unregisters the follower.
pub struct Following {
    /// `None` for a follower whose events go to a function.
    rx: Option<mpsc::UnboundedReceiver<Result<ConnectionEvent>>>,
    peer: Weak<Peer>,
    id: String,
    key: u64,
}

impl Stream for Following {
    type Item = Result<ConnectionEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.as_mut() {
            Some(rx) => rx.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(peer) = self.peer.upgrade() {
            peer.unregister(&self.id, self.key);
        }
    }
}

impl Channels {
    /// Follows, at the peer `url`, the connection whose path has this hop's segment
    /// `{name, id}` at `index`: the events of the shared stream of `(url, name)` that
    /// concern it (see the [module docs](self)). Fails when the shared stream cannot
    /// be opened within `timeout`.
    pub async fn follow_segment(
        &self,
        url: &Url,
        name: &str,
        id: &str,
        index: u32,
        timeout: Duration,
    ) -> Result<Following> {
        let (tx, rx) = mpsc::unbounded();
        let (peer, mut following) = self.register(url, name, id, index, Sink::Queue(tx))?;
        following.rx = Some(rx);
        let mut phase = peer.phase.subscribe();
        let waited =
            tokio::time::timeout(timeout, phase.wait_for(|p| !matches!(p, Phase::Opening))).await;
        let outcome = match waited {
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "subscribing to the monitor of {url} took longer than {timeout:?}"
            ))),
            Ok(Err(_)) => Err(Error::unavailable(format!(
                "the monitor stream of {url} ended"
            ))),
            Ok(Ok(p)) => match &*p {
                Phase::Failed(e) => Err(e.clone()),
                _ => Ok(()),
            },
        };
        outcome.map(|()| following)
    }

    /// Like [`follow_segment`](Self::follow_segment), without a task or a queue of the
    /// follower's own: `sink` is called with each event of the connection (see
    /// [`FollowFn`]), and with the error when the shared stream breaks, ends or cannot
    /// be opened (within [`SUBSCRIBE_TIMEOUT`]). Returns at once; the follower stays
    /// registered until the returned guard is dropped or the stream ends.
    pub fn follow_segment_with(
        &self,
        url: &Url,
        name: &str,
        id: &str,
        index: u32,
        sink: FollowFn,
    ) -> Result<Following> {
        self.register(url, name, id, index, Sink::Call(Arc::new(Mutex::new(sink))))
            .map(|(_, following)| following)
    }

    /// How many shared monitor streams this pool has open or opening.
    pub fn shared_monitors(&self) -> usize {
        self.monitors().len()
    }

    /// How long a shared monitor stream of this pool stays open after its last follower
    /// left (default [`DEFAULT_LINGER`]); applies to streams opened from now on.
    pub fn set_monitor_linger(&self, linger: Duration) {
        let ms = u64::try_from(linger.as_millis()).unwrap_or(u64::MAX);
        self.monitors().linger_ms.store(ms, Ordering::Relaxed);
    }

    /// How many connections follow a peer through this pool's shared monitor streams.
    pub fn monitor_followers(&self) -> usize {
        let peers: Vec<Arc<Peer>> = self.monitors().lock().values().cloned().collect();
        peers.iter().map(|p| p.lock().count).sum()
    }

    /// Registers a follower with the shared stream of `(url, name)`, opening it when
    /// there is none.
    fn register(
        &self,
        url: &Url,
        name: &str,
        id: &str,
        index: u32,
        sink: Sink,
    ) -> Result<(Arc<Peer>, Following)> {
        // A function follower's lock is held from before it is registered until the
        // changes it missed are handed to it, so the stream's task cannot call it with a
        // newer event first.
        let own = match &sink {
            Sink::Call(f) => Some(f.clone()),
            Sink::Queue(_) => None,
        };
        let mut own = own
            .as_ref()
            .map(|f| f.lock().unwrap_or_else(|p| p.into_inner()));
        let mut missed = Vec::new();
        let key: Key = (url.clone(), name.to_string());
        let monitors = self.monitors();
        let mut peers = monitors.lock();
        let mut fresh = false;
        loop {
            let peer = match peers.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let peer = self.new_peer(key.clone())?;
                    peers.insert(key.clone(), peer.clone());
                    fresh = true;
                    peer
                }
            };
            let mut state = peer.lock();
            if state.dead {
                drop(state);
                peers.remove(&key);
                continue;
            }
            let fkey = state.next_key;
            state.next_key += 1;
            state.count += 1;
            state.idle_since = None;
            // A death that came before this follower joined.
            let mut i = 0;
            while i < state.recent.len() {
                let (rid, rindex, _) = &state.recent[i];
                if rid == id && *rindex == index {
                    if let Some((_, _, ev)) = state.recent.remove(i) {
                        match &sink {
                            Sink::Queue(tx) => {
                                let _ = tx.unbounded_send(Ok(ev));
                            }
                            Sink::Call(_) => missed.push(ev),
                        }
                    }
                } else {
                    i += 1;
                }
            }
            let before_subscribe = !state.subscribed;
            state
                .followers
                .entry(id.to_string())
                .or_default()
                .push(Follower {
                    key: fkey,
                    index,
                    before_subscribe,
                    sink,
                });
            drop(state);
            drop(peers);
            if let Some(f) = own.as_mut() {
                for ev in missed.drain(..) {
                    (**f)(Ok(ev));
                }
            }
            drop(own);
            if fresh {
                let span = tracing::debug_span!("shared_monitor", peer = %key.0, name = %key.1);
                let linger = Duration::from_millis(monitors.linger_ms.load(Ordering::Relaxed));
                tokio::spawn(run(self.clone(), peer.clone(), linger).instrument(span));
            }
            let following = Following {
                rx: None,
                peer: Arc::downgrade(&peer),
                id: id.to_string(),
                key: fkey,
            };
            return Ok((peer, following));
        }
    }

    /// A new shared stream, not started yet.
    fn new_peer(&self, key: Key) -> Result<Arc<Peer>> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::internal(format!(
                "cannot follow {}: monitors run inside a tokio runtime",
                key.0
            )));
        }
        let (phase, _) = watch::channel(Phase::Opening);
        let peer = Arc::new(Peer {
            key,
            pool: Arc::downgrade(&self.monitors()),
            state: Mutex::new(PeerState::default()),
            phase,
        });
        Ok(peer)
    }
}

/// The task of one shared stream: subscribe, dispatch, end on a break or when idle for
/// `linger`.
async fn run(channels: Channels, peer: Arc<Peer>, linger: Duration) {
    let (url, name) = peer.key.clone();
    let selector = MonitorScopeSelector {
        path_segments: vec![PathSegment {
            name,
            ..Default::default()
        }],
        network_services: Vec::new(),
    };
    peer.lock().subscribed = true;
    let subscribed = tokio::time::timeout(
        SUBSCRIBE_TIMEOUT,
        monitor_connections(&channels, &url, selector),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Error::DeadlineExceeded(format!(
            "subscribing to the monitor of {url} took longer than {SUBSCRIBE_TIMEOUT:?}"
        )))
    });
    // The pool is kept by the followers; this task only needed it to subscribe.
    drop(channels);
    let mut events = match subscribed {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "cannot subscribe to the peer's monitor");
            peer.end(e);
            return;
        }
    };
    peer.phase.send_replace(Phase::Open);
    debug!("shared monitor stream open");
    let check = linger.clamp(Duration::from_millis(10), Duration::from_secs(5));
    // One ticker for the whole stream: a sleep made anew in each round would be put off
    // by every event, and a busy stream nobody follows would never close.
    let mut ticker = tokio::time::interval_at(Instant::now() + check, check);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let error = loop {
        tokio::select! {
            item = events.next() => match item {
                Some(Ok(event)) => peer.dispatch(event),
                Some(Err(e)) => break e,
                None => break Error::unavailable(format!("the monitor stream of {url} ended")),
            },
            _ = ticker.tick() => {
                if peer.close_if_idle(linger) {
                    debug!("shared monitor stream closed: no follower for {linger:?}");
                    return;
                }
            }
        }
    };
    // A stream that only lingers (no connection follows it) breaking is what a peer
    // shutting down looks like after its connections were closed: nothing is lost.
    if peer.lock().count == 0 {
        debug!(error = %error, "shared monitor stream broke while nobody followed it");
    } else {
        warn!(error = %error, "shared monitor stream broke");
    }
    peer.end(error);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::MonitorSource;
    use crate::handlers::{monitor, Monitor};
    use crate::transport::{serve, Server, Services};
    use nsm_proto::connection::{Connection, Path};
    use prost_types::Timestamp;
    use std::sync::atomic::AtomicUsize;

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    fn url() -> Url {
        Url::Memory(format!(
            "shared-monitor-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ))
    }

    async fn peer(url: &Url) -> (Server, Monitor) {
        let monitor = monitor();
        let source: Arc<dyn MonitorSource> = monitor.source();
        let server = serve(url, Services::new().monitor(source)).await.unwrap();
        (server, monitor)
    }

    /// A connection as the peer ("fwd", index 1) sees it: `me` at index 0 with `id`.
    fn conn(me: &str, id: &str, state: State) -> Connection {
        Connection {
            id: format!("fwd-{id}"),
            state: state as i32,
            path: Some(Path {
                index: 1,
                path_segments: vec![
                    PathSegment {
                        name: me.into(),
                        id: id.into(),
                        expires: Some(Timestamp {
                            seconds: 100,
                            nanos: 0,
                        }),
                        ..Default::default()
                    },
                    PathSegment {
                        name: "fwd".into(),
                        id: format!("fwd-{id}"),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        }
    }

    const T: Duration = Duration::from_secs(2);

    /// Follows connection `id` of hop "nsmgr" (index 0) at `u`.
    async fn follow(channels: &Channels, u: &Url, id: &str) -> Following {
        channels.follow_segment(u, "nsmgr", id, 0, T).await.unwrap()
    }

    async fn next(f: &mut Following) -> ConnectionEvent {
        tokio::time::timeout(T, f.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("not an error")
    }

    fn states(e: &ConnectionEvent) -> Vec<(String, i32)> {
        e.connections
            .values()
            .map(|c| {
                (
                    c.path.as_ref().unwrap().path_segments[0].id.clone(),
                    c.state,
                )
            })
            .collect()
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + T;
        while !check() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn connections_share_one_stream_and_each_sees_only_its_own() {
        let u = url();
        let (_server, monitor) = peer(&u).await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "b", State::Up));
        let channels = Channels::new();
        let mut a = follow(&channels, &u, "a").await;
        let mut b = follow(&channels, &u, "b").await;
        assert_eq!(monitor.subscriber_count(), 1, "one stream for both");
        assert_eq!(
            (channels.shared_monitors(), channels.monitor_followers()),
            (1, 2)
        );
        // `a` registered before the subscription: it gets its copy of the initial state.
        assert_eq!(
            states(&next(&mut a).await),
            vec![("a".into(), State::Up as i32)]
        );
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "b", State::Down));
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Down));
        assert_eq!(
            states(&next(&mut b).await),
            vec![("b".into(), State::Down as i32)]
        );
        assert_eq!(
            states(&next(&mut a).await),
            vec![("a".into(), State::Down as i32)]
        );
        // Another name, or the same id at another place in the path, is not theirs.
        monitor.publish(ConnectionEventType::Update, conn("other", "a", State::Up));
        let mut moved = conn("nsmgr", "a", State::Up);
        moved.path.as_mut().unwrap().path_segments.swap(0, 1);
        monitor.publish(ConnectionEventType::Update, moved);
        monitor.publish(ConnectionEventType::Delete, conn("nsmgr", "a", State::Up));
        let e = next(&mut a).await;
        assert_eq!(e.r#type, ConnectionEventType::Delete as i32);
        drop(a);
        assert_eq!(channels.monitor_followers(), 1);
    }

    #[tokio::test]
    async fn every_follower_of_a_connection_gets_the_event_and_a_gone_one_loses_nothing() {
        let u = url();
        let (_server, monitor) = peer(&u).await;
        let channels = Channels::new();
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        let mut first = follow(&channels, &u, "a").await;
        // Its copy of the initial state.
        assert_eq!(
            states(&next(&mut first).await),
            vec![("a".into(), State::Up as i32)]
        );
        let mut second = follow(&channels, &u, "a").await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Down));
        for f in [&mut first, &mut second] {
            assert_eq!(
                states(&next(f).await),
                vec![("a".into(), State::Down as i32)]
            );
        }
        // One of them gone: the other still gets the change.
        drop(second);
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        assert_eq!(
            states(&next(&mut first).await),
            vec![("a".into(), State::Up as i32)]
        );
        // Both gone (the last one's queue closed, not yet unregistered when the event
        // comes, or unregistered): a DELETE nobody took is kept for a follower that
        // joins after it.
        drop(first);
        monitor.publish(ConnectionEventType::Delete, conn("nsmgr", "a", State::Up));
        let mut probe = follow(&channels, &u, "p").await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "p", State::Up));
        next(&mut probe).await;
        let mut late = follow(&channels, &u, "a").await;
        let e = next(&mut late).await;
        assert_eq!(e.r#type, ConnectionEventType::Delete as i32);
    }

    #[tokio::test]
    async fn a_change_before_the_follower_joined_is_kept_for_it() {
        let u = url();
        let (_server, monitor) = peer(&u).await;
        let channels = Channels::new();
        let mut first = follow(&channels, &u, "a").await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        next(&mut first).await;
        // `b` dies at the peer before its follower joins the running stream.
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "b", State::Up));
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "b", State::Down));
        // A change of `a` after those of `b` tells when they have all been dispatched.
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Down));
        next(&mut first).await;
        let mut b = follow(&channels, &u, "b").await;
        assert_eq!(
            states(&next(&mut b).await),
            vec![("b".into(), State::Down as i32)]
        );
        // Claimed once: a second follower of `b` does not get it again.
        let mut again = follow(&channels, &u, "b").await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), again.next())
                .await
                .is_err(),
            "nothing more for b"
        );
    }

    #[tokio::test]
    async fn a_kept_change_is_replaced_by_a_newer_one_and_cleared_by_up() {
        let u = url();
        let (_server, monitor) = peer(&u).await;
        let channels = Channels::new();
        let mut first = follow(&channels, &u, "a").await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        next(&mut first).await;
        // `b`'s refresh fails (DOWN), then its heal succeeds (UP), both before a
        // follower of `b` joins: nothing stale is left for it.
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "b", State::Down));
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "b", State::Up));
        // `c` goes DOWN then is deleted: the follower gets the DELETE only.
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "c", State::Down));
        monitor.publish(ConnectionEventType::Delete, conn("nsmgr", "c", State::Down));
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Down));
        next(&mut first).await;
        let mut b = follow(&channels, &u, "b").await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), b.next())
                .await
                .is_err(),
            "a DOWN superseded by UP reached the follower"
        );
        let mut c = follow(&channels, &u, "c").await;
        assert_eq!(
            next(&mut c).await.r#type,
            ConnectionEventType::Delete as i32
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), c.next())
                .await
                .is_err(),
            "the superseded DOWN reached the follower too"
        );
    }

    #[tokio::test]
    async fn a_peer_that_does_not_know_a_registered_connection_sends_an_empty_initial_state() {
        let u = url();
        let (_server, _monitor) = peer(&u).await;
        let channels = Channels::new();
        let mut a = follow(&channels, &u, "a").await;
        let e = next(&mut a).await;
        assert_eq!(e.r#type, ConnectionEventType::InitialStateTransfer as i32);
        assert!(e.connections.is_empty());
    }

    #[tokio::test]
    async fn a_dead_peer_ends_every_follower_with_an_error_and_a_new_follow_reopens() {
        let u = url();
        let (server, monitor) = peer(&u).await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "b", State::Up));
        let channels = Channels::new();
        let mut a = follow(&channels, &u, "a").await;
        let mut b = follow(&channels, &u, "b").await;
        next(&mut a).await;
        server.kill();
        for f in [&mut a, &mut b] {
            let mut saw_error = false;
            while let Some(item) = tokio::time::timeout(T, f.next()).await.expect("in time") {
                saw_error |= item.is_err();
            }
            assert!(saw_error, "the stream ends with an error");
        }
        assert_eq!(channels.shared_monitors(), 0);
        assert!(channels
            .follow_segment(&u, "nsmgr", "a", 0, Duration::from_millis(500))
            .await
            .is_err());
        let (_server, monitor) = peer(&u).await;
        channels.forget(&u);
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        let mut a = follow(&channels, &u, "a").await;
        assert_eq!(
            states(&next(&mut a).await),
            vec![("a".into(), State::Up as i32)]
        );
    }

    #[tokio::test]
    async fn a_stream_without_followers_lingers_then_closes() {
        let u = url();
        let (_server, monitor) = peer(&u).await;
        let channels = Channels::new();
        channels.set_monitor_linger(Duration::from_millis(200));
        let a = follow(&channels, &u, "a").await;
        drop(a);
        assert_eq!(channels.monitor_followers(), 0);
        let b = follow(&channels, &u, "b").await;
        assert_eq!(
            monitor.subscriber_count(),
            1,
            "b joined the lingering stream"
        );
        drop(b);
        // Events nobody follows keep coming: they must not keep the stream open.
        let busy = monitor.clone();
        let chatter = tokio::spawn(async move {
            loop {
                busy.publish(ConnectionEventType::Update, conn("nsmgr", "z", State::Up));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        eventually("the idle stream closed", || channels.shared_monitors() == 0).await;
        chatter.abort();
        eventually("the peer lost its subscriber", || {
            monitor.subscriber_count() == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_function_follower_gets_its_events_and_may_drop_its_own_registration() {
        let u = url();
        let (_server, monitor) = peer(&u).await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        let channels = Channels::new();
        let slot: Arc<Mutex<Option<Following>>> = Arc::default();
        let seen: Arc<Mutex<Vec<Result<ConnectionEvent>>>> = Arc::default();
        let (s2, seen2) = (slot.clone(), seen.clone());
        let f = channels
            .follow_segment_with(
                &u,
                "nsmgr",
                "a",
                0,
                Box::new(move |item| {
                    let down = matches!(&item, Ok(e) if states(e) == vec![("a".to_string(), State::Down as i32)]);
                    seen2.lock().unwrap().push(item);
                    if down {
                        // Unfollows from inside its own call: must not deadlock.
                        drop(s2.lock().unwrap().take());
                    }
                }),
            )
            .unwrap();
        *slot.lock().unwrap() = Some(f);
        eventually("the initial state", || seen.lock().unwrap().len() == 1).await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Down));
        eventually("unfollowed from inside", || {
            channels.monitor_followers() == 0
        })
        .await;
        monitor.publish(ConnectionEventType::Update, conn("nsmgr", "a", State::Up));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "nothing after it unfollowed");
        assert_eq!(
            states(seen[0].as_ref().unwrap()),
            vec![("a".to_string(), State::Up as i32)]
        );
    }

    #[tokio::test]
    async fn a_peer_without_a_monitor_fails_the_follow() {
        let u = url();
        let _server = serve(&u, Services::new()).await.unwrap();
        let channels = Channels::new();
        let err = channels
            .follow_segment(&u, "nsmgr", "a", 0, T)
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        assert_eq!(channels.shared_monitors(), 0);
    }
}
