//! `CountRequests`: the counting handler of the client chain, and the [`Counts`] it
//! shares with the phases and the progress line.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::{Cx, Handler, Next};
use tokio::time::Instant;

use super::heal_times::HealTimes;
use super::histogram::Histogram;
use super::report::Errors;

/// What the counting handler and the progress line share.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) phase: AtomicU8,
    pub(super) setup_done: AtomicU64,
    pub(super) setup_failed: AtomicU64,
    pub(super) closed: AtomicU64,
    pub(super) rerequests: AtomicU64,
    pub(super) rerequest_failed: AtomicU64,
    pub(super) heal_broken: AtomicU64,
    pub(super) heal_healed: AtomicU64,
    /// Heal episodes per connection, timed.
    pub(super) heals: HealTimes,
    /// Latency and errors of re-requests, since the last [`Counts::take`].
    pub(super) window: Mutex<Window>,
}

#[derive(Debug, Default)]
pub(super) struct Window {
    pub(super) latency: Histogram,
    pub(super) errors: Errors,
}

impl Counts {
    pub(super) fn take(&self) -> Window {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub(super) const PHASE_WARMUP: u8 = 0;
pub(super) const PHASE_SETUP: u8 = 1;
pub(super) const PHASE_SOAK: u8 = 2;
pub(super) const PHASE_CLOSE: u8 = 3;
pub(super) const PHASE_DONE: u8 = 4;

/// Marks a connection the chain has established once (later Requests are re-requests).
#[derive(Default)]
pub(super) struct Established;

/// Counts the re-requests of established connections (refreshes and heal's attempts)
/// with their latency and errors. Goes after `heal` in the client chain.
#[derive(Debug, Clone)]
pub(super) struct CountRequests(pub(super) Arc<Counts>);

#[async_trait]
impl Handler for CountRequests {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let handle = cx.conn().cloned();
        let again = handle
            .as_ref()
            .is_some_and(|h| h.get_state::<Established>().is_some());
        let started = Instant::now();
        let outcome = next.request(cx, req).await;
        if again {
            self.0.rerequests.fetch_add(1, Ordering::Relaxed);
            let mut w = self.0.window.lock().unwrap_or_else(|p| p.into_inner());
            w.latency.record(started.elapsed());
            if let Err(e) = &outcome {
                self.0.rerequest_failed.fetch_add(1, Ordering::Relaxed);
                *w.errors.entry(format!("{:?}", e.code())).or_default() += 1;
            }
        } else if let (Ok(_), Some(h)) = (&outcome, &handle) {
            h.state::<Established>();
        }
        outcome
    }
}
