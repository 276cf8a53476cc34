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
//!   publishes the connection in state DOWN (SCENARIOS 6.4); a failed first Request
//!   publishes nothing;
//! - puts itself into [`Cx::ext`] so later handlers of the same call (a monitor relay, an
//!   endpoint asking for REFRESH_REQUESTED) can [`Monitor::publish`] for this hop.
//!
//! Subscribers ([`MonitorSource::subscribe`]) first get an INITIAL_STATE_TRANSFER with
//! every current connection the selector matches (even when there is none), then the
//! UPDATE and DELETE events, each cut down to the connections the selector matches
//! ([`selector::matches`]); an event left with no connection is not sent.
//!
//! State: the table of connections (id -> connection), and a tokio broadcast channel of
//! events with a bounded buffer ([`MonitorBuilder::capacity`]).
//!
//! Failure handled: a slow subscriber never blocks a publisher. Publishing only writes
//! into the broadcast buffer; each subscriber filters when it reads. A subscriber that
//! falls more than `capacity` events behind has lost events, so instead of continuing
//! with a gap (which could hide a DELETE) it gets a fresh INITIAL_STATE_TRANSFER of the
//! current table and continues from there; a consumer treats every
//! INITIAL_STATE_TRANSFER as the complete state. A dropped subscriber leaves nothing
//! behind (no task, no registration: it was only a broadcast receiver). Streams end
//! when the shutdown token ([`MonitorBuilder::shutdown`]) fires or every `Monitor`
//! clone is gone.
//!
//! Client side, [`filter`] turns a next hop's stream into the client's own view.

pub mod filter;
pub mod selector;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector, State,
};
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::core::{Cx, Handler, MonitorSource, Next, Side};
use crate::Result;

pub use filter::{filter_events, ClientFilter};

/// How many events a subscriber may fall behind before it is re-synchronised.
pub const DEFAULT_CAPACITY: usize = 256;

/// Largest buffer the broadcast channel accepts without panicking, with room to spare.
const MAX_CAPACITY: usize = 1 << 20;

/// See the [module docs](self).
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

struct Inner {
    table: Mutex<HashMap<String, Connection>>,
    events: broadcast::Sender<Arc<ConnectionEvent>>,
    shutdown: CancellationToken,
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
        let (events, _) = broadcast::channel(capacity);
        Monitor {
            inner: Arc::new(Inner {
                table: Mutex::new(HashMap::new()),
                events,
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
        let mut table = self.inner.lock_table();
        match event_type {
            ConnectionEventType::InitialStateTransfer => {
                tracing::debug!(connection.id = %conn.id, "monitor: INITIAL_STATE_TRANSFER is not published");
                return;
            }
            ConnectionEventType::Update => {
                table.insert(conn.id.clone(), conn.clone());
            }
            ConnectionEventType::Delete => {
                table.remove(&conn.id);
            }
        }
        tracing::debug!(connection.id = %conn.id, event = event_type.as_str_name(), state = conn.state, "monitor: publish");
        let event = ConnectionEvent {
            r#type: event_type as i32,
            connections: [(conn.id.clone(), conn)].into(),
        };
        // Sent under the table lock, so a subscriber's snapshot and its receiver agree
        // on which events the snapshot already contains. No receiver is not an error.
        let _ = self.inner.events.send(Arc::new(event));
    }

    /// The stored connection `id` (this hop's id).
    pub fn get(&self, id: &str) -> Option<Connection> {
        self.inner.lock_table().get(id).cloned()
    }

    /// Every stored connection.
    pub fn connections(&self) -> Vec<Connection> {
        self.inner.lock_table().values().cloned().collect()
    }

    /// How many connections are stored.
    pub fn len(&self) -> usize {
        self.inner.lock_table().len()
    }

    /// Whether no connection is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many subscriber streams are alive.
    pub fn subscriber_count(&self) -> usize {
        self.inner.events.receiver_count()
    }
}

impl Inner {
    fn lock_table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connection>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The INITIAL_STATE_TRANSFER for `selector` and a receiver of every later event.
    fn snapshot(
        &self,
        selector: &MonitorScopeSelector,
    ) -> (ConnectionEvent, broadcast::Receiver<Arc<ConnectionEvent>>) {
        let table = self.lock_table();
        let connections = table
            .iter()
            .filter(|(_, c)| selector::matches(c, selector))
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        let rx = self.events.subscribe();
        drop(table);
        let event = ConnectionEvent {
            r#type: ConnectionEventType::InitialStateTransfer as i32,
            connections,
        };
        (event, rx)
    }
}

/// One subscriber's stream state.
struct Subscription {
    monitor: Weak<Inner>,
    rx: broadcast::Receiver<Arc<ConnectionEvent>>,
    selector: MonitorScopeSelector,
    initial: Option<ConnectionEvent>,
    shutdown: CancellationToken,
}

impl Subscription {
    async fn next_event(&mut self) -> Option<ConnectionEvent> {
        if let Some(initial) = self.initial.take() {
            return Some(initial);
        }
        loop {
            let received = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                r = self.rx.recv() => r,
            };
            match received {
                Ok(event) => {
                    if let Some(event) = selector::scope(&event, &self.selector) {
                        return Some(event);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "monitor subscriber fell behind: re-synchronising");
                    let monitor = self.monitor.upgrade()?;
                    let (initial, rx) = monitor.snapshot(&self.selector);
                    self.rx = rx;
                    return Some(initial);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl MonitorSource for Monitor {
    fn subscribe(
        &self,
        selector: MonitorScopeSelector,
    ) -> BoxStream<'static, Result<ConnectionEvent>> {
        let (initial, rx) = self.inner.snapshot(&selector);
        let sub = Subscription {
            monitor: Arc::downgrade(&self.inner),
            rx,
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
        let id = req
            .connection
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        cx.ext_mut().insert(self.clone());
        match next.request(cx, req).await {
            Ok(conn) => {
                let mut stored = conn.clone();
                if cx.side() == Side::Server {
                    stored.state = State::Up as i32;
                }
                self.publish(ConnectionEventType::Update, stored);
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
        let result = next.close(cx, conn.clone()).await;
        if let Err(e) = &result {
            tracing::debug!(connection.id = %id, error = %e, "downstream close failed; deleting anyway");
        }
        let gone = self.get(&id).unwrap_or(conn);
        self.publish(ConnectionEventType::Delete, gone);
        result
    }
}

#[cfg(test)]
mod tests;
