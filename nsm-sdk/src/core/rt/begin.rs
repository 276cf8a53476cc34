//! `begin`: one operation at a time per connection, in order, and events from inside.
//!
//! What it does, per connection id (the id this hop sees, so it sits after
//! `update_path`):
//! 1. **Exclusivity and FIFO order**: one operation at a time, in arrival order (a
//!    fair lock per id, which the runtime's keyed lock keeps).
//! 2. **Close uses the last good connection** the chain returned, not what the caller
//!    passed, so every later handler tears down exactly what it built. Close of an
//!    unknown id returns Ok without going down the chain. A failed first Request
//!    forgets the id; a failed refresh keeps the established connection. On the client
//!    side a failed reselect keeps the id too (with no connection), for heal to retry.
//! 3. **Events from inside**: handlers queue a Request or Close through
//!    [`ConnHandle::request_event`]; it re-enters
//!    the chain just after `begin`, under the same ordering, with the context and request
//!    of the last good operation.
//! 4. **Cancellation safety**: the operation runs on the caller's task, and if the caller
//!    hangs up mid-request it is finished in a task of its own, so the operation is
//!    never left half done. The operation ends on its own deadline (the call's, or the
//!    default timeout).
//! 5. **Owned lifetimes**: the connection's [`ConnHandle`]
//!    token is cancelled when the connection ends, which stops every task it owns.
//! 6. **RESELECT_REQUESTED**: a Request in that state for an established connection
//!    first closes the old downstream (with the stored connection), then proceeds.
//!
//! On the server side a successful Request returns the connection in state UP.
//!
//! State: a slot per connection id, removed when the connection ends: the connection's
//! handle behind a fair lock and, from the first successful Request on (allocated then,
//! so an id being established costs little), the last good request (which carries the
//! last connection the chain returned, stored once), its context and the rest of the
//! chain, and the connection a caller was last given if events have changed it since.
//!
//! Failure handled: a panicking or timed-out operation does not wedge the id; a Close
//! whose downstream fails still forgets the connection (and returns the error), but a
//! Close or reselect that a handler refused before anything was torn down ([`Refused`],
//! `authorize`) leaves the connection as it was.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::FutureExt;
use nsm_proto::connection::{Connection, State};
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::keyed_lock::{Guard, KeyedLock};
use crate::core::{ConnEvent, ConnHandle, Cx, EventOutcome, EventSink, Handler, Next, Side};
use crate::{Error, Result};

/// Default time an operation may take when the caller gave no deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Put in [`Cx::ext`] by `begin` for the rest of an operation that an event started
/// (guarantee 3: a Request or a Close), and taken out for every other operation; a
/// handler that queued an event can tell it from a caller's request with the same
/// content (`heal` does), and `authorize` lets the hop's own operations (a `timeout`
/// close) pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FromEvent;

/// Put in [`Cx::ext`] by a handler after `begin` that refused a caller's operation
/// before anything further down ran (`authorize`): `begin` then leaves the connection
/// exactly as it was. A refused Close does not forget the connection, and a refused
/// reselect does not close the old path first.
#[derive(Debug, Clone, Copy)]
pub struct Refused;

/// See the [module docs](self).
#[derive(Clone)]
pub struct Begin {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Begin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Begin")
            .field("connections", &self.len())
            .finish()
    }
}

/// The `begin` handler with the default timeout, owning its connections' tasks through
/// a fresh root token; [`Begin::root`] and [`Begin::default_timeout`] change them.
pub fn begin() -> Begin {
    Begin::build(CancellationToken::new(), DEFAULT_TIMEOUT)
}

struct Inner {
    /// Each connection's slot behind a fair lock (one allocation per connection).
    slots: KeyedLock<Slot>,
    root: CancellationToken,
    default_timeout: Duration,
    me: Weak<Inner>,
}

/// What a hop keeps for a connection id. Small until the first Request succeeds: what
/// an established connection needs is in `est`, allocated then.
struct Slot {
    handle: ConnHandle,
    /// How long the first request was given; events get the same.
    timeout: Duration,
    est: Option<Box<Established>>,
}

/// An established connection (a Request of it succeeded once).
struct Established {
    /// The last good request, for events. Its connection is the last one the chain
    /// returned (as this hop sees it): stored once, not beside the request again.
    req: NetworkServiceRequest,
    /// Whether what `req`'s connection describes is still built downstream: false after
    /// a reselect closed it and the new path failed (client side), so a Close has
    /// nothing to tear down.
    up: bool,
    /// The last connection returned to a caller (not to an event), when events changed
    /// the connection since; `None` while it is `req`'s connection. What the caller may
    /// send back, possibly stale.
    seen: Option<Box<Connection>>,
    /// The context and rest of the chain of the last good operation, for events.
    cx: Cx,
    next: Next,
}

impl Established {
    /// The last connection the chain returned, if it is still built downstream.
    fn conn(&self) -> Option<&Connection> {
        self.req.connection.as_ref().filter(|_| self.up)
    }
}

impl Slot {
    fn conn(&self) -> Option<&Connection> {
        self.est.as_ref().and_then(|e| e.conn())
    }
}

impl Begin {
    /// Its connections' tasks are children of `root` (cancelling `root` ends them).
    /// A builder option: set it before the handler is shared.
    pub fn root(self, root: CancellationToken) -> Self {
        Begin::build(root, self.inner.default_timeout)
    }

    /// Operations get `timeout` when the caller set no deadline (default
    /// [`DEFAULT_TIMEOUT`]). A builder option: set it before the handler is shared.
    pub fn default_timeout(self, timeout: Duration) -> Self {
        Begin::build(self.inner.root.clone(), timeout)
    }

    fn build(root: CancellationToken, default_timeout: Duration) -> Self {
        let inner = Arc::new_cyclic(|me| Inner {
            slots: KeyedLock::default(),
            root,
            default_timeout,
            me: me.clone(),
        });
        Begin { inner }
    }

    /// How many connections this hop holds (established or being established).
    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    /// Whether this hop holds no connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids of the connections this hop holds.
    pub fn ids(&self) -> Vec<String> {
        self.inner.slots.keys()
    }
}

impl Inner {
    fn sink(&self) -> Weak<dyn EventSink> {
        let weak: Weak<dyn EventSink> = self.me.clone();
        weak
    }

    /// Waits for the connection's turn. `None`: the id is unknown and `create` is false.
    async fn acquire(&self, id: &str, create: bool) -> Option<Guard<Slot>> {
        if !create {
            return self.slots.lock(id).await;
        }
        let slot = self
            .slots
            .lock_or_insert(id, || Slot {
                handle: ConnHandle::new(id, &self.root, self.sink()),
                timeout: self.default_timeout,
                est: None,
            })
            .await;
        Some(slot)
    }

    fn forget(&self, guard: &mut Guard<Slot>) {
        guard.est = None;
        let handle = guard.handle.clone();
        self.slots.remove(handle.id(), guard);
        handle.end();
    }

    /// Runs a Request for an acquired slot in its own task.
    async fn run_request(
        self: Arc<Self>,
        mut guard: Guard<Slot>,
        mut cx: Cx,
        mut req: NetworkServiceRequest,
        next: Next,
        from_event: bool,
    ) -> (Cx, Result<Connection>) {
        let id = guard.handle.id().to_string();
        let timeout = cx.remaining().unwrap_or(self.default_timeout);
        if guard.conn().is_none() {
            guard.timeout = timeout;
        }
        cx.set_deadline(Some(tokio::time::Instant::now() + timeout));
        cx.set_conn(Some(guard.handle.clone()));
        if from_event {
            cx.ext_mut().insert(FromEvent);
        } else {
            cx.ext_mut().remove::<FromEvent>();
        }

        let conn = req.connection.get_or_insert_with(Default::default);
        if let Some(est) = guard.est.as_mut() {
            if let Some(stored) = est.conn() {
                if conn.state == State::ReselectRequested as i32 {
                    tracing::debug!("reselect requested: closing the old downstream first");
                    let mut close_cx = cx.clone();
                    let old = stored.clone();
                    if let Err(e) = next.clone().close(&mut close_cx, old).await {
                        if close_cx.ext().get::<Refused>().is_some() {
                            return (cx, Err(e));
                        }
                        tracing::debug!(error = %e, "closing the old downstream before reselect failed");
                    }
                    est.up = false;
                } else if cx.side() == Side::Client {
                    *conn = merge(stored, est.seen.as_deref().unwrap_or(stored), conn);
                }
            }
        }

        // What events replay with: the context as the caller's call brought it to this
        // hop, not what the handlers after `begin` put in it (they run again and put it
        // again; keeping their copies, such as `discover`'s endpoint list, would cost
        // memory per connection for nothing).
        let entry_cx = cx.fork(None);
        // What is stored on success is the request with the connection the chain
        // returned: only the mechanism preferences of this one are kept, not a copy of
        // the whole request.
        let preferences = req.mechanism_preferences.clone();
        let result = match tokio::time::timeout(timeout, next.clone().request(&mut cx, req)).await {
            Ok(r) => r,
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "request of connection {id} timed out after {timeout:?}"
            ))),
        };
        match result {
            Ok(mut conn) => {
                if cx.side() == Side::Server {
                    conn.state = State::Up as i32;
                }
                let req = NetworkServiceRequest {
                    connection: Some(conn.clone()),
                    mechanism_preferences: preferences,
                };
                let last_cx = entry_cx;
                match guard.est.as_mut() {
                    Some(est) => {
                        let before = std::mem::replace(&mut est.req, req);
                        if !from_event {
                            est.seen = None;
                        } else if est.seen.is_none() {
                            // The caller was given the connection this event replaces.
                            est.seen = before.connection.map(Box::new);
                        }
                        est.up = true;
                        est.cx = last_cx;
                        est.next = next;
                    }
                    None => {
                        guard.est = Some(Box::new(Established {
                            req,
                            up: true,
                            seen: None,
                            cx: last_cx,
                            next,
                        }))
                    }
                }
                (cx, Ok(conn))
            }
            Err(e) => {
                cx.ext_mut().remove::<Refused>();
                // On the client side a connection that was up and lost its path to a
                // failed reselect stays (with no connection: a Close goes nowhere), so
                // whoever reselects (heal) can try again.
                let was_up = cx.side() == Side::Client && guard.est.is_some();
                if guard.conn().is_none() && !was_up {
                    self.forget(&mut guard);
                }
                (cx, Err(e))
            }
        }
    }

    async fn run_close(
        self: Arc<Self>,
        mut guard: Guard<Slot>,
        mut cx: Cx,
        next: Next,
        from_event: bool,
    ) -> (Cx, Result<()>) {
        if from_event {
            cx.ext_mut().insert(FromEvent);
        } else {
            cx.ext_mut().remove::<FromEvent>();
        }
        let Some(conn) = guard.conn().cloned() else {
            self.forget(&mut guard);
            return (cx, Ok(()));
        };
        let id = guard.handle.id().to_string();
        let timeout = cx
            .remaining()
            .unwrap_or(guard.timeout.max(Duration::from_millis(1)));
        cx.set_deadline(Some(tokio::time::Instant::now() + timeout));
        cx.set_conn(Some(guard.handle.clone()));
        let result = match tokio::time::timeout(timeout, next.close(&mut cx, conn)).await {
            Ok(r) => r,
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "close of connection {id} timed out"
            ))),
        };
        // A refused Close tore nothing down: the connection stays as it was.
        if cx.ext_mut().remove::<Refused>().is_none() {
            self.forget(&mut guard);
        }
        (cx, result)
    }
}

/// A re-request on the client side starts from what the chain last returned (so the
/// whole path and mechanism come along) and takes from the caller what the caller
/// changed since it was last given the connection (`seen`). A caller that sends back a
/// copy made stale by events (heal moved the connection to another endpoint) changes
/// nothing.
fn merge(returned: &Connection, seen: &Connection, requested: &Connection) -> Connection {
    let mut out = returned.clone();
    if requested.context != seen.context {
        out.context = requested.context.clone();
    }
    if requested.labels != seen.labels {
        out.labels = requested.labels.clone();
    }
    if requested.state != seen.state {
        out.state = requested.state;
    }
    if requested.network_service_endpoint_name != seen.network_service_endpoint_name {
        out.network_service_endpoint_name = requested.network_service_endpoint_name.clone();
    }
    if requested.mechanism != seen.mechanism {
        out.mechanism = requested.mechanism.clone();
    }
    if requested.path != seen.path && requested.path.is_some() {
        out.path = requested.path.clone();
    }
    out
}

fn connection_id(conn: Option<&Connection>) -> Result<String> {
    match conn.map(|c| c.id.as_str()) {
        Some(id) if !id.is_empty() => Ok(id.to_string()),
        _ => Err(Error::invalid(
            "connection has no id (begin must follow update_path)",
        )),
    }
}

/// Runs an operation on the caller's task, and finishes it in a task of its own if the
/// caller goes away first (guarantee 4 without a task hand-off on every call: a spawned
/// task per operation tripled the CPU cost of a request on a two-worker runtime).
struct Detach<T: Send + 'static> {
    op: Option<BoxFuture<'static, T>>,
}

impl<T: Send + 'static> Future for Detach<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<T> {
        let Some(op) = self.op.as_mut() else {
            return Poll::Pending;
        };
        match op.as_mut().poll(cx) {
            Poll::Ready(v) => {
                self.op = None;
                Poll::Ready(v)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Send + 'static> Drop for Detach<T> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(op);
            }
        }
    }
}

async fn run_detached<T: Send + 'static>(
    op: impl Future<Output = (Cx, Result<T>)> + Send + 'static,
    cx: &mut Cx,
) -> Result<T> {
    let guarded = std::panic::AssertUnwindSafe(op).catch_unwind();
    let detach = Detach {
        op: Some(Box::pin(guarded)),
    };
    match detach.await {
        Ok((back, result)) => {
            let conn = cx.conn().cloned();
            *cx = back;
            // The caller's view keeps the handle set by this begin.
            if cx.conn().is_none() {
                cx.set_conn(conn);
            }
            result
        }
        Err(_) => Err(Error::internal("a handler panicked during the operation")),
    }
}

#[async_trait]
impl Handler for Begin {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let id = connection_id(req.connection.as_ref())?;
        let span = tracing::debug_span!(parent: cx.span(), "begin", connection.id = %id, side = ?cx.side());
        let guard = self
            .inner
            .acquire(&id, true)
            .instrument(span.clone())
            .await
            .ok_or_else(|| Error::internal("slot vanished"))?;
        let task_cx = std::mem::take(cx).with_span(span.clone());
        let inner = self.inner.clone();
        let op = inner
            .run_request(guard, task_cx, req, next, false)
            .instrument(span);
        run_detached(op, cx).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let id = connection_id(Some(&conn))?;
        let span = tracing::debug_span!(parent: cx.span(), "begin", connection.id = %id, side = ?cx.side());
        let Some(guard) = self
            .inner
            .acquire(&id, false)
            .instrument(span.clone())
            .await
        else {
            tracing::debug!(parent: &span, "close of an unknown connection: nothing to do");
            return Ok(());
        };
        let task_cx = std::mem::take(cx).with_span(span.clone());
        let inner = self.inner.clone();
        let op = inner
            .run_close(guard, task_cx, next, false)
            .instrument(span);
        run_detached(op, cx).await
    }
}

impl EventSink for Inner {
    fn send(&self, id: &str, event: ConnEvent) -> oneshot::Receiver<EventOutcome> {
        let (tx, rx) = oneshot::channel();
        let Some(me) = self.me.upgrade() else {
            let _ = tx.send(Err(Error::Cancelled("begin is gone".into())));
            return rx;
        };
        let id = id.to_string();
        tokio::spawn(async move {
            let outcome = me.clone().run_event(&id, event).await;
            let _ = tx.send(outcome);
        });
        rx
    }
}

impl Inner {
    async fn run_event(self: Arc<Self>, id: &str, event: ConnEvent) -> EventOutcome {
        let Some(guard) = self.acquire(id, false).await else {
            return Err(Error::not_found(format!(
                "connection {id} is not known here"
            )));
        };
        let Some(est) = guard.est.as_deref() else {
            // Not established: there is nothing to re-run.
            return Err(Error::not_found(format!(
                "connection {id} is not established"
            )));
        };
        let cx = est.cx.fork(Some(guard.timeout));
        let next = est.next.clone();
        let span = cx.span().clone();
        match event {
            ConnEvent::Request(req) => {
                let req = req.unwrap_or_else(|| est.req.clone());
                let (_, r) = self
                    .run_request(guard, cx, req, next, true)
                    .instrument(span)
                    .await;
                r.map(Some)
            }
            ConnEvent::Close => {
                let (_, r) = self.run_close(guard, cx, next, true).instrument(span).await;
                r.map(|()| None)
            }
        }
    }
}

#[cfg(test)]
mod tests;
