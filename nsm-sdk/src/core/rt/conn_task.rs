//! [`ConnTask`]: the one background task a handler runs for a connection, fenced by a
//! generation.
//!
//! For handlers that follow something on a connection's behalf (`heal` watches the next
//! hop and heals, `upstream_refresh` follows the next hop's refresh requests): at most
//! one task per connection, tagged with what it follows, so a refresh that keeps the
//! same next hop keeps the task and one that moves starts a new one. Stopping cancels
//! the task and bumps the generation: a task that was already past its last await
//! checks [`ConnTask::is_current`] under the connection's state lock before it acts,
//! and a stopped one never does.
//!
//! State: the generation, and the running task's tag, cancellation token (a child of
//! the connection's) and join handle. It lives in the handler's per-connection state
//! (behind that state's lock), so it adds no lock and no task of its own.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::spawn_owned;

/// See the [module docs](self).
pub(crate) struct ConnTask<K> {
    generation: u64,
    running: Option<Running<K>>,
}

struct Running<K> {
    tag: K,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl<K> Default for ConnTask<K> {
    fn default() -> Self {
        ConnTask {
            generation: 0,
            running: None,
        }
    }
}

impl<K: PartialEq> ConnTask<K> {
    /// Whether a task tagged `tag` is still running.
    pub(crate) fn runs_for(&self, tag: &K) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.tag == *tag && !r.task.is_finished())
    }

    /// Whether a task was started and not stopped since (it may have ended on its own).
    pub(crate) fn is_started(&self) -> bool {
        self.running.is_some()
    }

    /// Whether a task started with `generation` may still act.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.generation == generation
    }

    /// Cancels the running task, if any, and fences it off.
    pub(crate) fn stop(&mut self) {
        self.generation += 1;
        if let Some(running) = self.running.take() {
            running.token.cancel();
        }
    }

    /// Stops the running task and starts `task` (given its generation), tagged `tag`,
    /// under a child of `parent` (the connection's token).
    pub(crate) fn restart<F>(
        &mut self,
        parent: &CancellationToken,
        tag: K,
        task: impl FnOnce(u64) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        self.stop();
        let token = parent.child_token();
        let task = spawn_owned(token.clone(), task(self.generation));
        self.running = Some(Running { tag, token, task });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_restart_stops_and_fences_off_the_old_task() {
        let conn = CancellationToken::new();
        let mut slot = ConnTask::default();
        assert!(!slot.is_started());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let first = tx.clone();
        slot.restart(&conn, "hop-1", move |generation| async move {
            first.send(generation).unwrap();
            std::future::pending::<()>().await;
        });
        settle().await;
        let g1 = rx.recv().await.unwrap();
        assert!(slot.is_current(g1));
        assert!(slot.runs_for(&"hop-1"));
        assert!(!slot.runs_for(&"hop-2"));
        slot.restart(&conn, "hop-2", move |generation| async move {
            tx.send(generation).unwrap();
        });
        settle().await;
        let g2 = rx.recv().await.unwrap();
        assert!(!slot.is_current(g1), "the replaced task may no longer act");
        assert!(slot.is_current(g2));
        assert!(!slot.runs_for(&"hop-2"), "it ended on its own");
        assert!(slot.is_started());
    }

    #[tokio::test]
    async fn stop_cancels_the_task_and_cancelling_the_connection_does_too() {
        let conn = CancellationToken::new();
        let mut slot = ConnTask::default();
        slot.restart(&conn, 1, |_| std::future::pending());
        slot.stop();
        assert!(!slot.is_started());
        assert!(!slot.is_current(0));

        slot.restart(&conn, 2, |_| std::future::pending());
        assert!(slot.runs_for(&2));
        conn.cancel();
        settle().await;
        assert!(!slot.runs_for(&2), "the task ended with its connection");
    }
}
