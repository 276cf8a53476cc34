//! Per-connection handles: typed state, owned tasks and events that re-enter a chain.

use std::any::{Any, TypeId};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Something that happens to a connection from inside: a timer, a monitor, the endpoint.
// A request is as large as the connection it carries; events are rare, boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ConnEvent {
    /// Request the connection again: with the given request, or with the last one that
    /// succeeded.
    Request(Option<NetworkServiceRequest>),
    /// Close the connection.
    Close,
}

/// What an event produced: the connection after a Request, `None` after a Close.
pub type EventOutcome = Result<Option<Connection>>;

/// Accepts events for connections; implemented by `begin`, which runs them in order with
/// the connection's other operations.
pub trait EventSink: Send + Sync + 'static {
    /// Queues `event` for the connection `id`; the receiver gets its outcome.
    fn send(&self, id: &str, event: ConnEvent) -> oneshot::Receiver<EventOutcome>;
}

/// The waiting side of an event: resolves to its outcome once the chain has run it.
#[derive(Debug)]
#[must_use = "an event runs whether or not its outcome is awaited; drop it to ignore the outcome"]
pub struct EventReceipt(oneshot::Receiver<EventOutcome>);

impl Future for EventReceipt {
    type Output = EventOutcome;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| {
            r.unwrap_or_else(|_| Err(Error::Cancelled("the connection's owner is gone".into())))
        })
    }
}

/// Typed per-connection values. A connection holds a handful (one per handler that keeps
/// state), so a vector searched in order is smaller than a map and as fast; it starts
/// empty, without an allocation.
type StateList = Vec<(TypeId, Arc<dyn Any + Send + Sync>)>;

struct Shared {
    id: String,
    state: Mutex<StateList>,
    cancel: CancellationToken,
    sink: Weak<dyn EventSink>,
}

/// A connection as one hop knows it, shared by every handler of that hop's chain.
///
/// Made by `begin`. It carries typed per-connection state ([`ConnHandle::state`]), a
/// cancellation token that fires when the connection ends (every timer, monitor or watch
/// the connection starts listens to it), and the way back into the chain for events
/// ([`ConnHandle::request_event`], [`ConnHandle::close_event`]).
#[derive(Clone)]
pub struct ConnHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnHandle")
            .field("id", &self.shared.id)
            .field("cancelled", &self.shared.cancel.is_cancelled())
            .finish()
    }
}

impl ConnHandle {
    /// A handle for connection `id` whose lifetime is a child of `parent`, with events
    /// going to `sink`.
    pub fn new(
        id: impl Into<String>,
        parent: &CancellationToken,
        sink: Weak<dyn EventSink>,
    ) -> Self {
        LIVE_HANDLES.fetch_add(1, Ordering::SeqCst);
        ConnHandle {
            shared: Arc::new(Shared {
                id: id.into(),
                state: Mutex::new(Vec::new()),
                cancel: parent.child_token(),
                sink,
            }),
        }
    }

    /// The connection id at this hop.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The state of type `T` of this connection, created with `T::default()` on first use.
    /// Handlers keep their per-connection state here, with interior mutability inside `T`.
    pub fn state<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut list = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = find::<T>(&list) {
            return found;
        }
        let value = Arc::new(T::default());
        list.push((TypeId::of::<T>(), value.clone()));
        value
    }

    /// The state of type `T`, if any handler created it.
    pub fn get_state<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        let list = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        find::<T>(&list)
    }

    /// Removes the state of type `T`.
    pub fn remove_state<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        let mut list = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let at = list.iter().position(|(t, _)| *t == TypeId::of::<T>())?;
        list.swap_remove(at).1.downcast::<T>().ok()
    }

    /// A reference to this connection that does not keep its state alive: for whoever
    /// must find the connection later without owning it (a shared timer).
    pub fn downgrade(&self) -> WeakConnHandle {
        WeakConnHandle(Arc::downgrade(&self.shared))
    }

    /// Fires when the connection ends at this hop (closed, or forgotten after a failed
    /// first request). Child tokens of it bound timers and monitors.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.shared.cancel
    }

    /// Whether the connection has ended at this hop.
    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Ends the connection's lifetime: every task it owns stops. Done by `begin`.
    pub fn end(&self) {
        self.shared.cancel.cancel();
    }

    /// Runs `fut` as a task owned by this connection: it stops when the connection ends,
    /// and is counted by [`live_tasks`].
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        spawn_owned(self.shared.cancel.child_token(), fut)
    }

    /// Queues a Request for this connection (with `req`, or the last good request); it
    /// re-enters the chain after `begin`, in order with the connection's other
    /// operations. Never await the receipt from inside an operation on the same
    /// connection: it runs after that operation.
    pub fn request_event(&self, req: Option<NetworkServiceRequest>) -> EventReceipt {
        self.send(ConnEvent::Request(req))
    }

    /// Queues a Close for this connection; see [`ConnHandle::request_event`].
    pub fn close_event(&self) -> EventReceipt {
        self.send(ConnEvent::Close)
    }

    fn send(&self, event: ConnEvent) -> EventReceipt {
        match self.shared.sink.upgrade() {
            Some(sink) => EventReceipt(sink.send(&self.shared.id, event)),
            None => {
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Err(Error::Cancelled("the chain is gone".into())));
                EventReceipt(rx)
            }
        }
    }
}

/// The entry of type `T` in a connection's state list.
fn find<T: Send + Sync + 'static>(list: &StateList) -> Option<Arc<T>> {
    list.iter()
        .find(|(t, _)| *t == TypeId::of::<T>())
        .and_then(|(_, v)| v.clone().downcast::<T>().ok())
}

/// A [`ConnHandle`] that does not keep the connection's state alive
/// ([`ConnHandle::downgrade`]).
#[derive(Clone)]
pub struct WeakConnHandle(Weak<Shared>);

impl WeakConnHandle {
    /// The handle, while anything else still holds it.
    pub fn upgrade(&self) -> Option<ConnHandle> {
        self.0.upgrade().map(|shared| ConnHandle { shared })
    }
}

impl fmt::Debug for WeakConnHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.upgrade() {
            Some(h) => f.debug_tuple("WeakConnHandle").field(&h).finish(),
            None => f.write_str("WeakConnHandle(gone)"),
        }
    }
}

static LIVE_TASKS: AtomicUsize = AtomicUsize::new(0);
static LIVE_HANDLES: AtomicUsize = AtomicUsize::new(0);

impl Drop for Shared {
    fn drop(&mut self) {
        LIVE_HANDLES.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many connection handles are alive in this process: one per connection held by
/// each `begin` (a manager's connection counts twice: its server chain's and its client
/// chain's). A gauge of the connections a process holds, and, after Close, proof that
/// none is left behind.
pub fn live_handles() -> usize {
    LIVE_HANDLES.load(Ordering::SeqCst)
}

/// How many tasks started through [`spawn_owned`] (timers, monitors, watches of
/// connections and hops) are running in this process. Tests use it to prove that
/// nothing is left running after Close.
pub fn live_tasks() -> usize {
    LIVE_TASKS.load(Ordering::SeqCst)
}

struct LiveGuard;

impl LiveGuard {
    fn new() -> Self {
        LIVE_TASKS.fetch_add(1, Ordering::SeqCst);
        LiveGuard
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        LIVE_TASKS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Spawns `fut` so that it stops when `token` is cancelled; counted by [`live_tasks`].
pub fn spawn_owned<F>(token: CancellationToken, fut: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let guard = LiveGuard::new();
    tokio::spawn(async move {
        let _guard = guard;
        tokio::select! {
            _ = token.cancelled() => {}
            _ = fut => {}
        }
    })
}

/// For tests: an event sink that takes no event (the receipt fails at once), for
/// handles that no `begin` made (`Weak::<NoSink>::new()`).
#[cfg(test)]
pub(crate) struct NoSink;

#[cfg(test)]
impl EventSink for NoSink {
    fn send(&self, _: &str, _: ConnEvent) -> oneshot::Receiver<EventOutcome> {
        oneshot::channel().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counter(std::sync::atomic::AtomicU32);

    #[test]
    fn state_is_typed_and_created_once() {
        let root = CancellationToken::new();
        let h = ConnHandle::new("id", &root, Weak::<NoSink>::new());
        assert!(h.get_state::<Counter>().is_none());
        h.state::<Counter>().0.fetch_add(1, Ordering::SeqCst);
        h.state::<Counter>().0.fetch_add(1, Ordering::SeqCst);
        assert_eq!(
            h.get_state::<Counter>().unwrap().0.load(Ordering::SeqCst),
            2
        );
        assert!(h.remove_state::<Counter>().is_some());
        assert!(h.get_state::<Counter>().is_none());
    }

    #[derive(Default)]
    struct Other(std::sync::atomic::AtomicU32);

    #[test]
    fn states_of_several_types_live_side_by_side() {
        let root = CancellationToken::new();
        let h = ConnHandle::new("id", &root, Weak::<NoSink>::new());
        h.state::<Counter>().0.store(1, Ordering::SeqCst);
        h.state::<Other>().0.store(2, Ordering::SeqCst);
        h.state::<Counter>().0.fetch_add(10, Ordering::SeqCst);
        assert!(h.remove_state::<Counter>().is_some());
        assert!(h.remove_state::<Counter>().is_none());
        assert_eq!(h.get_state::<Other>().unwrap().0.load(Ordering::SeqCst), 2);
        assert_eq!(
            h.state::<Counter>().0.load(Ordering::SeqCst),
            0,
            "made anew"
        );
    }

    #[test]
    fn a_weak_handle_does_not_keep_the_connection() {
        let root = CancellationToken::new();
        let h = ConnHandle::new("id", &root, Weak::<NoSink>::new());
        let weak = h.downgrade();
        assert_eq!(weak.upgrade().unwrap().id(), "id");
        let state = h.state::<Counter>();
        drop(h);
        assert!(weak.upgrade().is_none());
        assert_eq!(
            Arc::strong_count(&state),
            1,
            "the state went with the handle"
        );
    }

    #[tokio::test]
    async fn owned_tasks_end_with_the_connection_and_events_without_a_chain_fail() {
        // The process-wide count is checked by tests/no_leaks.rs, alone in its binary;
        // here other tests run beside this one, so only this task's own end is checked.
        let root = CancellationToken::new();
        let h = ConnHandle::new("id", &root, Weak::<NoSink>::new());
        let task = h.spawn(futures::future::pending());
        root.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the owned task did not end with the connection")
            .unwrap();
        assert!(h.is_closed());
        assert!(matches!(h.close_event().await, Err(Error::Cancelled(_))));
    }
}
