//! `monitor`: the hop's table of connections and its MonitorConnection event source.
//!
//! One [`Monitor`] value is both the chain handler and the event source: push a clone of
//! it into the chain (after `update_path` and `begin`, so it sees this hop's id and runs
//! in the connection's order) and hand [`Monitor::source`] to the transport that serves
//! `MonitorConnection`. Clones share one table.
//!
//! ```
//! use nsm_sdk::Chain;
//! use nsm_sdk::handlers::{begin, monitor, update_path};
//! let monitor = monitor();
//! let chain = Chain::builder()
//!     .push(update_path("nse"))
//!     .push(begin())
//!     .push(monitor.clone())
//!     .build();
//! let source = monitor.source(); // served as the MonitorConnection service
//! # let _ = (chain, source);
//! ```
//!
//! What it does:
//! - after each successful Request, stores the returned connection (keyed by its id at
//!   this hop, in state UP on the server side) and publishes an UPDATE;
//! - after each Close, removes the connection and publishes a DELETE, also when the
//!   downstream Close failed;
//! - when a Request of an established connection (a refresh) fails, stores and
//!   publishes the connection in state DOWN (docs/SCENARIOS.md 6.4); a failed first Request
//!   publishes nothing;
//! - puts itself into [`Cx::ext`] so later handlers of the same call (a monitor relay, an
//!   endpoint asking for REFRESH_REQUESTED) can [`Monitor::publish`] for this hop.
//!
//! Subscribers ([`MonitorSource::subscribe`]) first get an INITIAL_STATE_TRANSFER with
//! every current connection the selector matches (even when there is none), then the
//! UPDATE and DELETE events, each cut down to the connections the selector matches
//! ([`selector::matches`]); an event left with no connection is not sent.
//!
//! State: the table of connections (id -> connection, each stored once and shared with
//! the subscriber queues it is queued on: publishing copies no connection; a subscriber's
//! stream makes its own event when it takes one), an index from path segment ids to the
//! connections whose path holds them, and the subscribers, each with a bounded queue of
//! events ([`MonitorBuilder::capacity`]). A subscriber whose selector names a
//! path segment id (a client or a relay following its own connection: every subscriber
//! of a hop's per-connection streams) is indexed by that id, so publishing an event
//! costs the length of the connection's path plus the subscribers it concerns, not one
//! wake-up per subscriber, and a new subscriber's initial transfer reads only the
//! connections that hold its id; only selectors without an id (by network service, or
//! everything) are checked against every event and scan the table.
//!
//! Failure handled: a slow subscriber never blocks a publisher. Publishing only queues
//! the event for the subscribers it concerns, without waiting. A subscriber that falls
//! more than `capacity` events behind has lost events, so instead of continuing with a
//! gap (which could hide a DELETE) it gets a fresh INITIAL_STATE_TRANSFER of the
//! current table and continues from there; a consumer treats every
//! INITIAL_STATE_TRANSFER as the complete state. A dropped subscriber leaves nothing
//! behind (no task; its registration goes with its stream). Streams end when the
//! shutdown token ([`MonitorBuilder::shutdown`]) fires or every `Monitor` clone is
//! gone.
//!
//! Client side, [`filter`] turns a next hop's stream into the client's own view. With
//! policies, a hop serves [`authorized`] around its source: each subscriber sees only
//! the connections whose path holds its identity.

pub mod authorized;
pub mod filter;
pub mod selector;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector, State,
};
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::{Cx, Handler, MonitorSource, Next, Side};
use crate::Result;

pub use authorized::{authorized, Authorized};
pub use filter::{filter_events, ClientFilter};

/// How many events a subscriber may fall behind before it is re-synchronised.
pub const DEFAULT_CAPACITY: usize = 256;

/// Largest queue a subscriber may have.
const MAX_CAPACITY: usize = 1 << 20;

/// See the [module docs](self).
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<Shared>,
    capacity: usize,
    shutdown: CancellationToken,
}

/// The table and the subscribers, under one lock: an event is queued for the
/// subscribers while the table holds it, so a subscriber's initial transfer and its
/// queue agree on which events the transfer already contains.
#[derive(Default)]
struct Shared {
    table: HashMap<String, Arc<Connection>>,
    /// Path segment id -> ids (table keys) of the connections whose path holds it.
    /// (A list, not a set: a segment id is nearly always in one connection, and a list
    /// of one costs a tenth of a set of one.)
    by_segment: HashMap<String, Vec<String>>,
    next_subscriber: u64,
    /// Every subscriber, by its number.
    subscribers: HashMap<u64, Subscriber>,
    /// Subscribers indexed by the path segment id their selector names.
    indexed: HashMap<String, HashSet<u64>>,
    /// Subscribers whose selector names no path segment id.
    unindexed: HashSet<u64>,
}

/// A subscriber as the publishers see it.
struct Subscriber {
    key: Option<String>,
    selector: MonitorScopeSelector,
    tx: mpsc::Sender<Queued>,
    lagged: Arc<AtomicBool>,
}

/// An UPDATE or DELETE as queued for a subscriber: the connection is shared with the
/// table and the other subscribers; each subscriber makes its own `ConnectionEvent`
/// when its stream takes the event (publishing copies no connection).
type Queued = (ConnectionEventType, Arc<Connection>);

/// The path segment id a subscriber is indexed by: the first one its selector names.
/// A connection without that id in its path cannot match the selector.
fn index_key(selector: &MonitorScopeSelector) -> Option<String> {
    selector
        .path_segments
        .iter()
        .find(|s| !s.id.is_empty())
        .map(|s| s.id.clone())
}

fn segment_ids(conn: &Connection) -> impl Iterator<Item = &str> {
    conn.path
        .iter()
        .flat_map(|p| p.path_segments.iter())
        .map(|s| s.id.as_str())
        .filter(|id| !id.is_empty())
}

impl Shared {
    fn index(&mut self, key: &str, conn: &Connection) {
        for id in segment_ids(conn) {
            let keys = self.by_segment.entry(id.to_string()).or_default();
            if !keys.iter().any(|k| k == key) {
                keys.push(key.to_string());
            }
        }
    }

    fn unindex(&mut self, key: &str, conn: &Connection) {
        for id in segment_ids(conn) {
            if let Some(keys) = self.by_segment.get_mut(id) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_segment.remove(id);
                }
            }
        }
    }

    /// Stores (`Some`) or removes (`None`) the connection `key`, keeping the index (a
    /// connection stored again with the same path segment ids, such as a refresh, keeps
    /// its index entries).
    fn store(&mut self, key: &str, conn: Option<Arc<Connection>>) {
        match conn {
            Some(conn) => match self.table.get_mut(key) {
                Some(old) => {
                    if !segment_ids(old).eq(segment_ids(&conn)) {
                        let old = std::mem::replace(old, conn.clone());
                        self.unindex(key, &old);
                        self.index(key, &conn);
                    } else {
                        *old = conn;
                    }
                }
                None => {
                    self.index(key, &conn);
                    self.table.insert(key.to_string(), conn);
                }
            },
            None => {
                if let Some(old) = self.table.remove(key) {
                    self.unindex(key, &old);
                }
            }
        }
    }

    /// Queues the event `kind` about `conn` for every subscriber whose selector
    /// matches `conn`.
    fn deliver(&self, kind: ConnectionEventType, conn: &Arc<Connection>) {
        let mut seen = HashSet::new();
        let indexed = segment_ids(conn)
            .filter_map(|id| self.indexed.get(id))
            .flatten();
        for n in indexed.chain(self.unindexed.iter()) {
            if !seen.insert(*n) {
                continue;
            }
            let Some(sub) = self.subscribers.get(n) else {
                continue;
            };
            // A lagged subscriber re-synchronises from the table: no gap, no queueing.
            if sub.lagged.load(Ordering::Acquire) || !selector::matches(conn, &sub.selector) {
                continue;
            }
            if let Err(mpsc::error::TrySendError::Full(_)) = sub.tx.try_send((kind, conn.clone())) {
                sub.lagged.store(true, Ordering::Release);
            }
        }
    }

    /// The INITIAL_STATE_TRANSFER for `selector`.
    fn initial(&self, selector: &MonitorScopeSelector) -> ConnectionEvent {
        let pick = |(id, c): (&String, &Arc<Connection>)| {
            selector::matches(c, selector).then(|| (id.clone(), Connection::clone(c)))
        };
        let connections = match index_key(selector) {
            Some(key) => self
                .by_segment
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|id| self.table.get_key_value(id))
                .filter_map(pick)
                .collect(),
            None => self.table.iter().filter_map(pick).collect(),
        };
        ConnectionEvent {
            r#type: ConnectionEventType::InitialStateTransfer as i32,
            connections,
        }
    }

    fn unsubscribe(&mut self, n: u64) {
        let Some(sub) = self.subscribers.remove(&n) else {
            return;
        };
        match sub.key {
            Some(key) => {
                if let Some(subs) = self.indexed.get_mut(&key) {
                    subs.remove(&n);
                    if subs.is_empty() {
                        self.indexed.remove(&key);
                    }
                }
            }
            None => {
                self.unindexed.remove(&n);
            }
        }
    }
}

impl fmt::Debug for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Monitor")
            .field("connections", &self.len())
            .field("subscribers", &self.subscriber_count())
            .finish()
    }
}

/// The `monitor` handler with the default buffer and no shutdown token.
pub fn monitor() -> Monitor {
    Monitor::builder().build()
}

/// Builds a [`Monitor`].
#[derive(Debug, Default)]
#[must_use]
pub struct MonitorBuilder {
    capacity: Option<usize>,
    shutdown: Option<CancellationToken>,
}

impl MonitorBuilder {
    /// How many events a subscriber may fall behind before it is re-synchronised with a
    /// fresh INITIAL_STATE_TRANSFER (default [`DEFAULT_CAPACITY`]; at least 1).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Ends every subscriber's stream when `token` fires (the server's lifetime).
    pub fn shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = Some(token);
        self
    }

    /// The monitor.
    pub fn build(self) -> Monitor {
        let capacity = self
            .capacity
            .unwrap_or(DEFAULT_CAPACITY)
            .clamp(1, MAX_CAPACITY);
        Monitor {
            inner: Arc::new(Inner {
                state: Mutex::new(Shared::default()),
                capacity,
                shutdown: self.shutdown.unwrap_or_default(),
            }),
        }
    }
}

impl Monitor {
    /// Starts building a monitor.
    pub fn builder() -> MonitorBuilder {
        MonitorBuilder::default()
    }

    /// This monitor as the event source the transport serves.
    pub fn source(&self) -> Arc<dyn MonitorSource> {
        Arc::new(self.clone())
    }

    /// Publishes one connection event for this hop and updates the table: UPDATE stores
    /// `conn` (any state: UP, DOWN, REFRESH_REQUESTED...), DELETE removes it.
    /// INITIAL_STATE_TRANSFER is ignored (only subscribing produces one), as is a
    /// connection without an id.
    pub fn publish(&self, event_type: ConnectionEventType, conn: Connection) {
        if conn.id.is_empty() {
            tracing::debug!("monitor: connection without an id not published");
            return;
        }
        self.publish_shared(event_type, Arc::new(conn));
    }

    /// [`publish`](Self::publish) of a connection already shared.
    fn publish_shared(&self, event_type: ConnectionEventType, conn: Arc<Connection>) {
        let mut shared = self.inner.lock();
        match event_type {
            ConnectionEventType::InitialStateTransfer => {
                tracing::debug!(connection.id = %conn.id, "monitor: INITIAL_STATE_TRANSFER is not published");
                return;
            }
            ConnectionEventType::Update => shared.store(&conn.id, Some(conn.clone())),
            ConnectionEventType::Delete => shared.store(&conn.id, None),
        }
        tracing::debug!(connection.id = %conn.id, event = event_type.as_str_name(), state = conn.state, "monitor: publish");
        // Queued under the lock, so a subscriber's initial transfer and its queue agree
        // on which events the transfer already contains.
        shared.deliver(event_type, &conn);
    }

    /// The stored connection `id`, shared.
    pub(crate) fn get_shared(&self, id: &str) -> Option<Arc<Connection>> {
        self.inner.lock().table.get(id).cloned()
    }

    /// The stored connection `id` (this hop's id).
    pub fn get(&self, id: &str) -> Option<Connection> {
        self.get_shared(id).map(Arc::unwrap_or_clone)
    }

    /// Every stored connection.
    pub fn connections(&self) -> Vec<Connection> {
        let shared: Vec<Arc<Connection>> = self.inner.lock().table.values().cloned().collect();
        shared.into_iter().map(Arc::unwrap_or_clone).collect()
    }

    /// How many connections are stored.
    pub fn len(&self) -> usize {
        self.inner.lock().table.len()
    }

    /// Whether no connection is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many subscriber streams are alive.
    pub fn subscriber_count(&self) -> usize {
        self.inner.lock().subscribers.len()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One subscriber's stream state. Dropping it unsubscribes.
struct Subscription {
    monitor: Weak<Inner>,
    number: u64,
    rx: mpsc::Receiver<Queued>,
    lagged: Arc<AtomicBool>,
    selector: MonitorScopeSelector,
    initial: Option<ConnectionEvent>,
    shutdown: CancellationToken,
}

impl Subscription {
    async fn next_event(&mut self) -> Option<ConnectionEvent> {
        if let Some(initial) = self.initial.take() {
            return Some(initial);
        }
        if self.lagged.load(Ordering::Acquire) {
            let monitor = self.monitor.upgrade()?;
            let shared = monitor.lock();
            // Everything queued is older than the table under this lock.
            let mut missed = 0usize;
            while self.rx.try_recv().is_ok() {
                missed += 1;
            }
            self.lagged.store(false, Ordering::Release);
            tracing::warn!(
                queued = missed,
                "monitor subscriber fell behind: re-synchronising"
            );
            return Some(shared.initial(&self.selector));
        }
        let received = tokio::select! {
            _ = self.shutdown.cancelled() => return None,
            r = self.rx.recv() => r,
        };
        // `None`: every Monitor clone is gone (they held the sending side).
        let (kind, conn) = received?;
        // Queued only when the selector matched (see `deliver`).
        let conn = Arc::unwrap_or_clone(conn);
        Some(ConnectionEvent {
            r#type: kind as i32,
            connections: [(conn.id.clone(), conn)].into(),
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(monitor) = self.monitor.upgrade() {
            monitor.lock().unsubscribe(self.number);
        }
    }
}

impl MonitorSource for Monitor {
    fn subscribe(
        &self,
        selector: MonitorScopeSelector,
    ) -> BoxStream<'static, Result<ConnectionEvent>> {
        let (tx, rx) = mpsc::channel(self.inner.capacity);
        let lagged = Arc::new(AtomicBool::new(false));
        let key = index_key(&selector);
        let (number, initial) = {
            let mut shared = self.inner.lock();
            let number = shared.next_subscriber;
            shared.next_subscriber += 1;
            match &key {
                Some(k) => {
                    shared.indexed.entry(k.clone()).or_default().insert(number);
                }
                None => {
                    shared.unindexed.insert(number);
                }
            }
            shared.subscribers.insert(
                number,
                Subscriber {
                    key,
                    selector: selector.clone(),
                    tx,
                    lagged: lagged.clone(),
                },
            );
            (number, shared.initial(&selector))
        };
        let sub = Subscription {
            monitor: Arc::downgrade(&self.inner),
            number,
            rx,
            lagged,
            selector,
            initial: Some(initial),
            shutdown: self.inner.shutdown.clone(),
        };
        stream::unfold(sub, |mut sub| async move {
            let event = sub.next_event().await?;
            Some((Ok(event), sub))
        })
        .boxed()
    }
}

#[async_trait]
impl Handler for Monitor {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let id = req.conn().id.clone();
        cx.ext_mut().insert(self.clone());
        match next.request(cx, req).await {
            Ok(conn) => {
                let mut stored = conn.clone();
                if cx.side() == Side::Server {
                    stored.state = State::Up as i32;
                }
                self.publish_shared(ConnectionEventType::Update, Arc::new(stored));
                Ok(conn)
            }
            Err(e) => {
                if let Some(mut established) = self.get(&id) {
                    tracing::warn!(connection.id = %id, error = %e, "refresh failed: connection DOWN");
                    established.state = State::Down as i32;
                    self.publish(ConnectionEventType::Update, established);
                }
                Err(e)
            }
        }
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        cx.ext_mut().insert(self.clone());
        let id = conn.id.clone();
        // What the DELETE carries: the stored connection (taken after the Close), or,
        // none being stored, the one closed; copied only in that case.
        let before = self.get_shared(&id);
        let fallback = before.is_none().then(|| Arc::new(conn.clone()));
        let result = next.close(cx, conn).await;
        if let Err(e) = &result {
            tracing::debug!(connection.id = %id, error = %e, "downstream close failed; deleting anyway");
        }
        if let Some(gone) = self.get_shared(&id).or(before).or(fallback) {
            self.publish_shared(ConnectionEventType::Delete, gone);
        }
        result
    }
}

#[cfg(test)]
mod tests;
