//! [`GroupCommit`]: work that arrives while the same kind of work is in flight waits
//! and then goes out together, as a database's group commit does.
//!
//! What it does: a job that finds nothing in flight runs at once, alone (no added
//! latency for a lone caller). Jobs that arrive while a run is in flight wait in a
//! queue; when the run is done the whole queue is handed to one of the waiting callers
//! (the next *leader*), which runs it as one batch, answers every other caller and
//! hands on whatever queued meanwhile. What a batch does is the caller's function
//! (the [reaper](crate::reaper) deletes link groups, [`crate::veth`] shares one link
//! dump per namespace); it must answer every job of the batch, in order.
//!
//! State: the queue and a "busy" flag behind a `std::sync::Mutex`, never held across
//! an await. No task is spawned: batches run in the futures of the callers. Failure
//! handled: a leader whose future is dropped (its caller went away) hands the queue on
//! from its drop guard, and the callers of the batch it was running see their reply
//! channel close and run their own job alone, so no caller waits for ever. A waiting
//! caller that goes away leaves its job in the queue: it still runs, unanswered.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;
use tracing::warn;

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct GroupCommit<J, R> {
    state: Mutex<State<J, R>>,
}

#[derive(Debug)]
struct State<J, R> {
    busy: bool,
    queue: Vec<Waiter<J, R>>,
}

#[derive(Debug)]
struct Waiter<J, R> {
    job: J,
    /// `None` once the caller is gone.
    reply: Option<oneshot::Sender<Turn<J, R>>>,
}

#[derive(Debug)]
enum Turn<J, R> {
    Done(R),
    Lead(Vec<Waiter<J, R>>),
}

impl<J: Clone, R> GroupCommit<J, R> {
    /// An idle one (usable in a `static`).
    pub(crate) const fn new() -> Self {
        GroupCommit {
            state: Mutex::new(State {
                busy: false,
                queue: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<J, R>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `job` with `run`: at once (a batch of one) when nothing is in flight, else
    /// in a batch with the jobs that queue up meanwhile. `run` gets the batch and
    /// returns one result per job, in order.
    pub(crate) async fn submit<F, Fut>(&self, job: J, run: F) -> R
    where
        F: Fn(Vec<J>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        let rx = {
            let mut s = self.lock();
            if s.busy {
                let (tx, rx) = oneshot::channel();
                s.queue.push(Waiter {
                    job: job.clone(),
                    reply: Some(tx),
                });
                Some(rx)
            } else {
                s.busy = true;
                None
            }
        };
        let Some(rx) = rx else {
            let _lead = Leader(self);
            return first(run(vec![job]).await);
        };
        match rx.await {
            Ok(Turn::Done(r)) => r,
            Ok(Turn::Lead(others)) => {
                let _lead = Leader(self);
                let mut jobs = vec![job];
                let mut replies = Vec::with_capacity(others.len());
                for w in others {
                    jobs.push(w.job);
                    replies.push(w.reply);
                }
                let mut results = run(jobs).await.into_iter();
                let mine = results.next();
                for (reply, r) in replies.into_iter().zip(results) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Turn::Done(r));
                    }
                }
                match mine {
                    Some(r) => r,
                    None => unreachable_batch(),
                }
            }
            // The leader running our batch went away: run it alone.
            Err(_) => first(run(vec![job]).await),
        }
    }
}

fn first<R>(results: Vec<R>) -> R {
    match results.into_iter().next() {
        Some(r) => r,
        None => unreachable_batch(),
    }
}

#[cold]
fn unreachable_batch() -> ! {
    // A batch function that answers fewer jobs than it got is a bug in this crate.
    panic!("a group commit batch returned fewer results than jobs")
}

/// Held while a run is in flight; on drop (done or cancelled) hands the queue to the
/// next leader, or marks the group idle.
struct Leader<'a, J, R>(&'a GroupCommit<J, R>);

impl<J, R> Drop for Leader<'_, J, R> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut waiting = std::mem::take(&mut s.queue).into_iter();
        let mut orphans = Vec::new();
        while let Some(w) = waiting.next() {
            let Some(reply) = w.reply else {
                orphans.push(w);
                continue;
            };
            let mut rest: Vec<_> = std::mem::take(&mut orphans);
            rest.extend(waiting.by_ref());
            match reply.send(Turn::Lead(rest)) {
                Ok(()) => return,
                Err(turn) => {
                    // That caller went away: its job still has to run.
                    orphans.push(Waiter {
                        job: w.job,
                        reply: None,
                    });
                    if let Turn::Lead(back) = turn {
                        waiting = back.into_iter();
                    }
                }
            }
        }
        if !orphans.is_empty() {
            warn!(
                jobs = orphans.len(),
                "jobs of callers that went away were dropped for lack of a caller to run them"
            );
        }
        s.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    static BATCHES: AtomicUsize = AtomicUsize::new(0);

    async fn double(jobs: Vec<u32>) -> Vec<u32> {
        BATCHES.fetch_add(1, Ordering::Relaxed);
        tokio::task::yield_now().await;
        jobs.into_iter().map(|j| j * 2).collect()
    }

    #[tokio::test]
    async fn a_lone_job_runs_at_once_and_queued_jobs_share_batches() {
        static G: GroupCommit<u32, u32> = GroupCommit::new();
        assert_eq!(G.submit(1, double).await, 2);
        let before = BATCHES.load(Ordering::Relaxed);
        let results = futures::future::join_all((0..50).map(|j| G.submit(j, double))).await;
        assert_eq!(results, (0..50).map(|j| j * 2).collect::<Vec<_>>());
        let batches = BATCHES.load(Ordering::Relaxed) - before;
        assert!(batches <= 3, "{batches} batches for 50 jobs");
        assert!(!G.lock().busy);
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_hands_the_queue_on() {
        static G: GroupCommit<u32, u32> = GroupCommit::new();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut lead = Box::pin(G.submit(100, double));
        let _ = lead.as_mut().poll(&mut cx);
        let mut rest = Box::pin(futures::future::join_all(
            (0..5).map(|j| G.submit(j, double)),
        ));
        let _ = rest.as_mut().poll(&mut cx);
        drop(lead);
        let results = tokio::time::timeout(std::time::Duration::from_secs(5), rest)
            .await
            .expect("the queued jobs ran");
        assert_eq!(results, [0, 2, 4, 6, 8]);
    }
}
