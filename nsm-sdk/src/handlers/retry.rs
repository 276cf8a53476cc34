//! `retry`: tries a Request or Close again while the failure is worth retrying.
//!
//! What it does (client side): passes the call on; on a retryable error
//! ([`Error::is_retryable`]) it waits `interval` and tries again, until the retry budget
//! ends: `try_timeout` after the first try, or the call's deadline, whichever is first.
//! Then it returns the last error. A non-retryable error returns at once. Each try runs
//! with a fresh copy of the call's context whose deadline is the end of the budget, and
//! is cut off there (DeadlineExceeded) if it is still running; the context of the try
//! that succeeded is kept, so values the rest of the chain put in it reach the handlers
//! before this one.
//!
//! Defaults (docs/SCENARIOS.md 6.11): try timeout 15 s, interval 200 ms. Unlike the Go SDK,
//! where the try timeout bounds each attempt and retries go on until the caller's
//! context ends, here it bounds the whole retrying, so a caller without a deadline
//! still gets an answer.
//!
//! State: none. Failure handled: transient failures of the next hop.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::core::{Cx, Handler, Next};
use crate::{Error, Result};

/// Default time a call is retried for.
pub const DEFAULT_TRY_TIMEOUT: Duration = Duration::from_secs(15);
/// Default pause between two tries.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct Retry {
    try_timeout: Duration,
    interval: Duration,
}

/// The `retry` handler with the default try timeout (15 s) and interval (200 ms).
pub fn retry() -> Retry {
    Retry {
        try_timeout: DEFAULT_TRY_TIMEOUT,
        interval: DEFAULT_INTERVAL,
    }
}

impl Retry {
    /// How long after the first try a call may still be retried.
    pub fn try_timeout(mut self, d: Duration) -> Self {
        self.try_timeout = d;
        self
    }

    /// The pause between two tries.
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d;
        self
    }

    async fn run<T, F, Fut>(&self, cx: &mut Cx, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut(Cx) -> Fut + Send,
        Fut: Future<Output = (Cx, Result<T>)> + Send,
        T: Send,
    {
        let budget_end = Instant::now() + self.try_timeout;
        let end = cx.deadline().map_or(budget_end, |d| d.min(budget_end));
        let mut tries = 0u32;
        let mut last: Option<Error> = None;
        loop {
            tries += 1;
            let mut try_cx = cx.clone();
            try_cx.set_deadline(Some(end));
            let outcome = match tokio::time::timeout_at(end, attempt(try_cx)).await {
                Ok((try_cx, Ok(v))) => {
                    let deadline = cx.deadline();
                    *cx = try_cx;
                    cx.set_deadline(deadline);
                    if tries > 1 {
                        debug!(tries, "{what} succeeded after retrying");
                    }
                    return Ok(v);
                }
                Ok((_, Err(e))) => e,
                Err(_) => Error::DeadlineExceeded(format!(
                    "{what}: try {tries} still running when the retry budget ended"
                )),
            };
            // A try cut off by the end of the budget says less than the failure before
            // it (a service not found, say): report that one.
            if outcome.code() == tonic::Code::DeadlineExceeded && Instant::now() >= end {
                if let Some(prev) = last {
                    warn!(tries, error = %prev, "{what} failed; giving up retrying");
                    return Err(prev);
                }
            }
            if !outcome.is_retryable() {
                return Err(outcome);
            }
            if Instant::now() + self.interval >= end {
                warn!(tries, error = %outcome, "{what} failed; giving up retrying");
                return Err(outcome);
            }
            debug!(tries, error = %outcome, interval = ?self.interval, "{what} failed; retrying");
            last = Some(outcome);
            tokio::time::sleep(self.interval).await;
        }
    }
}

#[async_trait]
impl Handler for Retry {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        self.run(cx, "request", |mut try_cx| {
            let (req, next) = (req.clone(), next.clone());
            async move {
                let out = next.request(&mut try_cx, req).await;
                (try_cx, out)
            }
        })
        .await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        self.run(cx, "close", |mut try_cx| {
            let (conn, next) = (conn.clone(), next.clone());
            async move {
                let out = next.close(&mut try_cx, conn).await;
                (try_cx, out)
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Fails with `err` for the first `failures` calls, then succeeds; records when each
    /// call came and the deadline it saw.
    #[derive(Clone)]
    struct Flaky {
        failures: u32,
        err: Error,
        calls: Arc<AtomicU32>,
        hang: bool,
        deadlines: Arc<std::sync::Mutex<Vec<Option<Instant>>>>,
    }

    impl Flaky {
        fn new(failures: u32, err: Error) -> Self {
            Flaky {
                failures,
                err,
                calls: Arc::default(),
                hang: false,
                deadlines: Arc::default(),
            }
        }
        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
        async fn call(&self, cx: &Cx) -> Result<()> {
            self.deadlines.lock().unwrap().push(cx.deadline());
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang {
                futures::future::pending::<()>().await;
            }
            if n < self.failures {
                Err(self.err.clone())
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl Handler for Flaky {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            self.call(cx).await?;
            next.request(cx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.call(cx).await?;
            next.close(cx, conn).await
        }
    }

    fn chain(r: Retry, f: &Flaky) -> Chain {
        Chain::builder().push(r).push(f.clone()).build()
    }

    #[tokio::test(start_paused = true)]
    async fn succeeds_after_three_failures_three_intervals_later() {
        let f = Flaky::new(3, Error::unavailable("nsmgr restarting"));
        let start = Instant::now();
        chain(retry(), &f)
            .request(&mut Cx::client(), NetworkServiceRequest::default())
            .await
            .unwrap();
        assert_eq!(f.calls(), 4);
        assert_eq!(start.elapsed(), 3 * DEFAULT_INTERVAL);
        // Each try saw the end of the retry budget as its deadline.
        let deadlines = f.deadlines.lock().unwrap();
        assert!(deadlines
            .iter()
            .all(|d| *d == Some(start + DEFAULT_TRY_TIMEOUT)));
    }

    #[tokio::test(start_paused = true)]
    async fn close_is_retried_too() {
        let f = Flaky::new(2, Error::unavailable("down"));
        let start = Instant::now();
        chain(retry().interval(Duration::from_secs(1)), &f)
            .close(&mut Cx::client(), Connection::default())
            .await
            .unwrap();
        assert_eq!(f.calls(), 3);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_retryable_error_returns_at_once() {
        let f = Flaky::new(3, Error::invalid("bad request"));
        let start = Instant::now();
        let err = chain(retry(), &f)
            .request(&mut Cx::client(), NetworkServiceRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert_eq!(f.calls(), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_call_deadline_with_the_last_error() {
        let f = Flaky::new(u32::MAX, Error::unavailable("still down"));
        let start = Instant::now();
        let mut cx = Cx::client().with_timeout(Duration::from_secs(1));
        let err = chain(retry(), &f)
            .request(&mut cx, NetworkServiceRequest::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("still down"), "{err}");
        // Tries at 0, 0.2, 0.4, 0.6, 0.8 s; a sixth would start at the deadline.
        assert_eq!(f.calls(), 5);
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(cx.deadline(), Some(start + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_try_timeout_without_a_deadline() {
        let f = Flaky::new(u32::MAX, Error::unavailable("still down"));
        let start = Instant::now();
        let err = chain(retry().try_timeout(Duration::from_secs(2)), &f)
            .request(&mut Cx::client(), NetworkServiceRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)));
        assert_eq!(f.calls(), 10);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_try_is_cut_off_at_the_end_of_the_budget() {
        let mut f = Flaky::new(0, Error::unavailable("x"));
        f.hang = true;
        let start = Instant::now();
        let err = chain(retry().try_timeout(Duration::from_secs(3)), &f)
            .request(&mut Cx::client(), NetworkServiceRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(f.calls(), 1);
    }
}
