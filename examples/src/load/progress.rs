//! The progress line on stderr.

use std::io::{IsTerminal, Write as _};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::count_requests::{Counts, PHASE_CLOSE, PHASE_SETUP, PHASE_SOAK, PHASE_WARMUP};
use super::options::LoadOptions;

/// The progress line on stderr: redrawn in place on a terminal (5 times a second),
/// a plain line every 10 s otherwise.
pub(super) struct Progress {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Progress {
    pub(super) fn start(counts: Arc<Counts>, opts: &LoadOptions) -> Progress {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let (n, soak) = (opts.clients as u64, opts.duration);
        let terminal = std::io::stderr().is_terminal();
        let every = if terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(10)
        };
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut phase_started = (PHASE_WARMUP, Instant::now());
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let phase = counts.phase.load(Ordering::Relaxed);
                if phase != phase_started.0 {
                    phase_started = (phase, Instant::now());
                }
                let line = progress_line(
                    &counts,
                    phase,
                    phase_started.1.elapsed(),
                    n,
                    soak,
                    started.elapsed(),
                );
                let mut err = std::io::stderr().lock();
                let _ = if terminal {
                    write!(err, "\r{line:<100}")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
            if terminal {
                let _ = writeln!(std::io::stderr());
            }
        });
        Progress { stop, task }
    }

    pub(super) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

pub(super) fn bar(done: f64, total: f64) -> String {
    const WIDTH: usize = 30;
    let filled = if total > 0.0 {
        ((done / total).clamp(0.0, 1.0) * WIDTH as f64) as usize
    } else {
        0
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(WIDTH - filled))
}

/// The heal times so far, once any connection healed.
fn heal_so_far(c: &Counts) -> String {
    let h = c.heals.summary();
    if h.healed == 0 {
        return String::new();
    }
    format!(
        " (p50 {:.0} p99 {:.0} max {:.0} ms, all within {:.1} s)",
        h.latency.p50,
        h.latency.p99,
        h.latency.max,
        h.first_broken_to_last_healed
            .map_or(0.0, |d| d.as_secs_f64())
    )
}

pub(super) fn progress_line(
    c: &Counts,
    phase: u8,
    in_phase: Duration,
    n: u64,
    soak: Duration,
    total: Duration,
) -> String {
    let refreshes = c.rerequests.load(Ordering::Relaxed);
    let failed = c.rerequest_failed.load(Ordering::Relaxed);
    let t = total.as_secs_f64();
    match phase {
        PHASE_WARMUP => format!("{t:6.1}s warm-up"),
        PHASE_SETUP => {
            let done = c.setup_done.load(Ordering::Relaxed);
            format!(
                "{t:6.1}s setup {} {done}/{n} errors {}",
                bar(done as f64, n as f64),
                c.setup_failed.load(Ordering::Relaxed)
            )
        }
        PHASE_SOAK => format!(
            "{t:6.1}s soak  {} {:.0}/{:.0}s refreshes {refreshes} errors {failed} heal {}/{} broken now {}{}",
            bar(in_phase.as_secs_f64(), soak.as_secs_f64()),
            in_phase.as_secs_f64(),
            soak.as_secs_f64(),
            c.heal_broken.load(Ordering::Relaxed),
            c.heal_healed.load(Ordering::Relaxed),
            c.heals.unhealed(),
            heal_so_far(c),
        ),
        PHASE_CLOSE => {
            let done = c.closed.load(Ordering::Relaxed);
            format!("{t:6.1}s close {} {done}", bar(done as f64, n as f64))
        }
        _ => format!("{t:6.1}s done"),
    }
}
