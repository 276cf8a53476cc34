//! [`stop_on_signal`]: the stop token of a program, cancelled by SIGTERM or SIGINT.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::core::spawn_owned;

/// A token that the first SIGTERM or SIGINT cancels. The signal handlers are installed
/// before this returns, so a signal that comes later never kills the process
/// uncleanly. The task that waits for the signals is owned by the token: it ends when
/// the token is cancelled, by a signal or by the caller.
///
/// Must be called inside a tokio runtime. Fails when the handlers cannot be installed.
pub fn stop_on_signal() -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    drop(spawn_owned(stop.clone(), async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "stopping");
        token.cancel();
    }));
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sigterm_cancels_the_token_and_the_waiting_task_ends() {
        let before = alive_tasks();
        let stop = stop_on_signal().expect("handlers installed");
        assert!(!stop.is_cancelled());
        sigterm_to_self();
        tokio::time::timeout(std::time::Duration::from_secs(5), stop.cancelled())
            .await
            .expect("SIGTERM cancels the token");
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while alive_tasks() > before {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the signal task ends");
    }

    #[tokio::test]
    async fn cancelling_the_token_ends_the_waiting_task() {
        let before = alive_tasks();
        let stop = stop_on_signal().expect("handlers installed");
        stop.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while alive_tasks() > before {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the signal task ends");
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    /// SIGTERM to this process, through the `kill` program (the SDK has no libc
    /// dependency); the handler installed above keeps the test process alive.
    fn sigterm_to_self() {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}
