//! Handlers for tests: count what passes, fail on demand.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;

use crate::core::{Cx, Handler, Next};
use crate::{Error, Result};

#[derive(Debug, Default)]
struct Counts {
    requests: AtomicUsize,
    closes: AtomicUsize,
    ids: Mutex<HashSet<String>>,
    close_ids: Mutex<HashSet<String>>,
    last: Mutex<Option<Connection>>,
}

/// Counts Requests and Closes that pass it (all, and distinct connection ids); clones
/// share the counts, so a test keeps one and puts the other in a chain.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<Counts>);

/// A new [`Counter`].
pub fn counter() -> Counter {
    Counter::default()
}

impl Counter {
    /// Requests seen.
    pub fn requests(&self) -> usize {
        self.0.requests.load(Ordering::SeqCst)
    }
    /// Distinct connection ids among the Requests.
    pub fn unique_requests(&self) -> usize {
        self.0.ids.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    /// Closes seen.
    pub fn closes(&self) -> usize {
        self.0.closes.load(Ordering::SeqCst)
    }
    /// Distinct connection ids among the Closes.
    pub fn unique_closes(&self) -> usize {
        self.0
            .close_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
    /// The connection of the last Request that passed.
    pub fn last(&self) -> Option<Connection> {
        self.0
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl Handler for Counter {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        self.0.requests.fetch_add(1, Ordering::SeqCst);
        if let Some(c) = &req.connection {
            self.0
                .ids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(c.id.clone());
            *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        }
        next.request(cx, req).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        self.0.closes.fetch_add(1, Ordering::SeqCst);
        self.0
            .close_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn.id.clone());
        next.close(cx, conn).await
    }
}

#[derive(Debug, Default)]
struct InjectState {
    fail_requests: AtomicBool,
    fail_closes: AtomicBool,
    fail_first: AtomicUsize,
    pass_first: AtomicUsize,
}

/// Fails Requests or Closes on demand, with Unavailable (retryable) or the given error.
/// Clones share the switches.
#[derive(Debug, Clone, Default)]
pub struct Inject(Arc<InjectState>);

/// A new [`Inject`] that lets everything pass until told otherwise.
pub fn inject() -> Inject {
    Inject::default()
}

impl Inject {
    /// Fail every Request from now on (or stop failing).
    pub fn fail_requests(&self, on: bool) -> &Self {
        self.0.fail_requests.store(on, Ordering::SeqCst);
        self
    }
    /// Fail every Close from now on (or stop failing).
    pub fn fail_closes(&self, on: bool) -> &Self {
        self.0.fail_closes.store(on, Ordering::SeqCst);
        self
    }
    /// Fail the next `n` Requests.
    pub fn fail_next(&self, n: usize) -> &Self {
        self.0.fail_first.store(n, Ordering::SeqCst);
        self
    }
    /// Let the next `n` Requests pass, then fail every Request.
    pub fn fail_after(&self, n: usize) -> &Self {
        self.0.pass_first.store(n, Ordering::SeqCst);
        self.0.fail_requests.store(true, Ordering::SeqCst);
        self
    }

    fn should_fail_request(&self) -> bool {
        let s = &self.0;
        if s.fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return true;
        }
        if !s.fail_requests.load(Ordering::SeqCst) {
            return false;
        }
        s.pass_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
    }
}

#[async_trait]
impl Handler for Inject {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        if self.should_fail_request() {
            return Err(Error::unavailable("injected request failure"));
        }
        next.request(cx, req).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        if self.0.fail_closes.load(Ordering::SeqCst) {
            return Err(Error::unavailable("injected close failure"));
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;

    fn req(id: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn counts_and_injects() {
        let c = counter();
        let i = inject();
        let chain = Chain::builder().push(c.clone()).push(i.clone()).build();
        chain.request(&mut Cx::server(), req("a")).await.unwrap();
        i.fail_next(1);
        assert!(chain.request(&mut Cx::server(), req("a")).await.is_err());
        chain.request(&mut Cx::server(), req("b")).await.unwrap();
        i.fail_after(1);
        chain.request(&mut Cx::server(), req("c")).await.unwrap();
        assert!(chain.request(&mut Cx::server(), req("c")).await.is_err());
        i.fail_requests(false).fail_closes(true);
        assert!(chain
            .close(&mut Cx::server(), Connection::default())
            .await
            .is_err());
        assert_eq!(c.requests(), 5);
        assert_eq!(c.unique_requests(), 3);
        assert_eq!(c.closes(), 1);
    }
}
