//! The handler trait, the cursor over the rest of a chain, and chains themselves.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;

use super::cx::Cx;
use crate::Result;

/// One element of a NetworkService chain, on the client or the server side.
///
/// A handler does its part of a Request or Close and passes the call on with `next`
/// (or answers itself without calling `next`, or calls it several times, as failover
/// does). Both methods default to passing the call on unchanged, so a handler
/// implements only what it cares about.
///
/// Client and server chains use the same trait: what differs between the two sides
/// lives in [`Cx`].
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles a Request; returns the connection as this hop's caller should see it.
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        next.request(cx, req).await
    }

    /// Handles a Close of `conn`.
    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        next.close(cx, conn).await
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        (**self).request(cx, req, next).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        (**self).close(cx, conn, next).await
    }
}

/// A cursor over the rest of a chain of `H` handlers.
///
/// Owning it is cheap (reference counts, no copy of the chain), so a handler can keep
/// one for later (as `begin` does to replay events) or hand it to a tower service. At
/// the end of a nested chain the cursor continues in the enclosing one.
pub struct Cursor<H: ?Sized> {
    handlers: Arc<[Arc<H>]>,
    pos: usize,
    outer: Option<Arc<Cursor<H>>>,
}

impl<H: ?Sized> Clone for Cursor<H> {
    fn clone(&self) -> Self {
        Cursor {
            handlers: self.handlers.clone(),
            pos: self.pos,
            outer: self.outer.clone(),
        }
    }
}

impl<H: ?Sized> fmt::Debug for Cursor<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cursor")
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl<H: ?Sized> Cursor<H> {
    /// A cursor at the start of `handlers`, continuing with `outer` at their end.
    pub fn new(handlers: Arc<[Arc<H>]>, outer: Option<Cursor<H>>) -> Self {
        Cursor {
            handlers,
            pos: 0,
            outer: outer.map(Arc::new),
        }
    }

    /// An empty cursor: calls through it end at once.
    pub fn end() -> Self {
        Cursor {
            handlers: Arc::from(Vec::<Arc<H>>::new()),
            pos: 0,
            outer: None,
        }
    }

    /// How many handlers are left, counting enclosing chains.
    pub fn remaining(&self) -> usize {
        self.handlers.len() - self.pos + self.outer.as_ref().map_or(0, |o| o.remaining())
    }

    /// The next handler and the cursor after it; `None` at the end of the outermost chain.
    pub fn step(self) -> Option<(Arc<H>, Cursor<H>)> {
        let mut cur = self;
        loop {
            if let Some(h) = cur.handlers.get(cur.pos).cloned() {
                cur.pos += 1;
                return Some((h, cur));
            }
            match cur.outer {
                Some(outer) => cur = Arc::unwrap_or_clone(outer),
                None => return None,
            }
        }
    }
}

impl<H: ?Sized> Cursor<H> {
    /// A cursor that does not keep the chains alive, for a task a handler leaves
    /// running (an expiry timer): a strong cursor held by such a task would keep the
    /// handler that owns the task alive, so the handler could never stop it on drop.
    pub fn downgrade(&self) -> WeakCursor<H> {
        WeakCursor {
            handlers: Arc::downgrade(&self.handlers),
            pos: self.pos,
            outer: self.outer.as_ref().map(|o| Box::new(o.downgrade())),
        }
    }
}

/// A [`Cursor`] that does not keep its chains alive; see [`Cursor::downgrade`].
pub struct WeakCursor<H: ?Sized> {
    handlers: std::sync::Weak<[Arc<H>]>,
    pos: usize,
    outer: Option<Box<WeakCursor<H>>>,
}

impl<H: ?Sized> Clone for WeakCursor<H> {
    fn clone(&self) -> Self {
        WeakCursor {
            handlers: self.handlers.clone(),
            pos: self.pos,
            outer: self.outer.clone(),
        }
    }
}

impl<H: ?Sized> fmt::Debug for WeakCursor<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakCursor")
            .field("alive", &(self.handlers.strong_count() > 0))
            .finish()
    }
}

impl<H: ?Sized> WeakCursor<H> {
    /// The cursor again, if every chain it runs through still exists.
    pub fn upgrade(&self) -> Option<Cursor<H>> {
        let outer = match &self.outer {
            Some(o) => Some(Arc::new(o.upgrade()?)),
            None => None,
        };
        Some(Cursor {
            handlers: self.handlers.upgrade()?,
            pos: self.pos,
            outer,
        })
    }
}

/// The rest of a NetworkService chain, handed to each handler.
pub type Next = Cursor<dyn Handler>;

impl Cursor<dyn Handler> {
    /// Passes a Request on. At the end of the outermost chain the request's connection
    /// is the answer.
    pub async fn request(self, cx: &mut Cx, req: NetworkServiceRequest) -> Result<Connection> {
        match self.step() {
            // `(*h)`: call the handler itself, not the `Arc` blanket impl (one boxed future, not two).
            Some((h, next)) => (*h).request(cx, req, next).await,
            None => Ok(req.connection.unwrap_or_default()),
        }
    }

    /// Passes a Close on. At the end of the outermost chain it succeeds.
    pub async fn close(self, cx: &mut Cx, conn: Connection) -> Result<()> {
        match self.step() {
            Some((h, next)) => (*h).close(cx, conn, next).await,
            None => Ok(()),
        }
    }
}

/// An ordered list of handlers, built once and shared; itself a handler, so chains nest.
///
/// ```
/// use nsm_sdk::{Chain, Cx};
/// use nsm_sdk::handlers::update_path;
/// # async fn demo() -> nsm_sdk::Result<()> {
/// let chain = Chain::builder().push(update_path("nsc")).build();
/// let conn = chain.request(&mut Cx::client(), Default::default()).await?;
/// assert_eq!(conn.path.unwrap().path_segments[0].name, "nsc");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Chain {
    handlers: Arc<[Arc<dyn Handler>]>,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain")
            .field("len", &self.handlers.len())
            .finish()
    }
}

impl Chain {
    /// Starts building a chain.
    pub fn builder() -> ChainBuilder {
        ChainBuilder::default()
    }

    /// A chain of these handlers, in order.
    pub fn from_handlers(handlers: Vec<Arc<dyn Handler>>) -> Self {
        Chain {
            handlers: handlers.into(),
        }
    }

    /// How many handlers the chain has (nested chains count as one).
    pub fn len(&self) -> usize {
        self.handlers.len()
    }

    /// Whether the chain has no handler.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    /// A cursor at the start of this chain, with nothing after it.
    pub fn cursor(&self) -> Next {
        Cursor::new(self.handlers.clone(), None)
    }

    /// Runs a Request through the chain.
    pub async fn request(&self, cx: &mut Cx, req: NetworkServiceRequest) -> Result<Connection> {
        self.cursor().request(cx, req).await
    }

    /// Runs a Close through the chain.
    pub async fn close(&self, cx: &mut Cx, conn: Connection) -> Result<()> {
        self.cursor().close(cx, conn).await
    }
}

#[async_trait]
impl Handler for Chain {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        Cursor::new(self.handlers.clone(), Some(next))
            .request(cx, req)
            .await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        Cursor::new(self.handlers.clone(), Some(next))
            .close(cx, conn)
            .await
    }
}

/// Builds a [`Chain`].
#[derive(Default)]
#[must_use]
pub struct ChainBuilder {
    handlers: Vec<Arc<dyn Handler>>,
}

impl fmt::Debug for ChainBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainBuilder")
            .field("len", &self.handlers.len())
            .finish()
    }
}

impl ChainBuilder {
    /// Appends a handler.
    pub fn push(mut self, handler: impl Handler) -> Self {
        self.handlers.push(Arc::new(handler));
        self
    }

    /// Appends a shared handler.
    pub fn push_arc(mut self, handler: Arc<dyn Handler>) -> Self {
        self.handlers.push(handler);
        self
    }

    /// Appends a handler when there is one.
    pub fn push_opt(self, handler: Option<impl Handler>) -> Self {
        match handler {
            Some(h) => self.push(h),
            None => self,
        }
    }

    /// Appends several shared handlers.
    pub fn extend(mut self, handlers: impl IntoIterator<Item = Arc<dyn Handler>>) -> Self {
        self.handlers.extend(handlers);
        self
    }

    /// The chain.
    pub fn build(self) -> Chain {
        Chain::from_handlers(self.handlers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records its tag on the way in and out.
    struct Tag(&'static str, Arc<Mutex<Vec<String>>>);

    #[async_trait]
    impl Handler for Tag {
        async fn request(
            &self,
            cx: &mut Cx,
            mut req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            self.1.lock().unwrap().push(format!("in:{}", self.0));
            let conn = req.connection.get_or_insert_with(Default::default);
            conn.labels.insert(self.0.to_string(), String::new());
            let out = next.request(cx, req).await;
            self.1.lock().unwrap().push(format!("out:{}", self.0));
            out
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.1.lock().unwrap().push(format!("close:{}", self.0));
            next.close(cx, conn).await
        }
    }

    #[tokio::test]
    async fn handlers_run_in_order_and_nested_chains_continue_outside() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let inner = Chain::builder()
            .push(Tag("b", log.clone()))
            .push(Tag("c", log.clone()))
            .build();
        let outer = Chain::builder()
            .push(Tag("a", log.clone()))
            .push(inner)
            .push(Tag("d", log.clone()))
            .build();
        let conn = outer
            .request(&mut Cx::server(), NetworkServiceRequest::default())
            .await
            .unwrap();
        let mut labels: Vec<_> = conn.labels.keys().cloned().collect();
        labels.sort();
        assert_eq!(labels, ["a", "b", "c", "d"]);
        assert_eq!(
            *log.lock().unwrap(),
            ["in:a", "in:b", "in:c", "in:d", "out:d", "out:c", "out:b", "out:a"]
        );
        log.lock().unwrap().clear();
        outer.close(&mut Cx::server(), conn).await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["close:a", "close:b", "close:c", "close:d"]
        );
    }

    #[tokio::test]
    async fn an_empty_chain_returns_the_request_connection() {
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                id: "x".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let conn = Chain::builder()
            .build()
            .request(&mut Cx::client(), req)
            .await
            .unwrap();
        assert_eq!(conn.id, "x");
    }

    #[test]
    fn a_weak_cursor_upgrades_only_while_its_chains_live() {
        let h: Arc<dyn Handler> = Arc::new(Chain::builder().build());
        let inner: Arc<[Arc<dyn Handler>]> = vec![h.clone()].into();
        let outer: Arc<[Arc<dyn Handler>]> = vec![h.clone(), h].into();
        let (_, c) = Cursor::new(inner.clone(), Some(Cursor::new(outer.clone(), None)))
            .step()
            .unwrap();
        let weak = c.downgrade();
        drop(c);
        assert_eq!(weak.upgrade().map(|c| c.remaining()), Some(2));
        drop(outer);
        assert!(weak.upgrade().is_none(), "the enclosing chain is gone");
        drop(inner);
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn remaining_counts_enclosing_chains() {
        let h: Arc<dyn Handler> = Arc::new(Chain::builder().build());
        let inner: Arc<[Arc<dyn Handler>]> = vec![h.clone()].into();
        let outer: Arc<[Arc<dyn Handler>]> = vec![h.clone(), h].into();
        let c = Cursor::new(inner, Some(Cursor::new(outer, None)));
        assert_eq!(c.remaining(), 3);
        let (_, c) = c.step().unwrap();
        let (_, c) = c.step().unwrap();
        assert_eq!(c.remaining(), 1);
    }
}
