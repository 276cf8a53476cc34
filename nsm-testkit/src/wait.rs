//! Waiting for a condition in async tests.

use std::time::Duration;

use tokio::time::Instant;

/// How often [`eventually`] checks.
const POLL: Duration = Duration::from_millis(10);

/// Checks `check` every 10 ms until it holds; fails the test (panics, naming `what`)
/// when it still does not after `within`. Time is tokio's, so a test with paused time
/// advances through the wait instead of sleeping.
///
/// # Panics
/// When `check` does not hold within `within`.
pub async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting: {what} (not within {within:?})"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn eventually_returns_once_the_condition_holds() {
        let start = Instant::now();
        let mut n = 0;
        eventually("the third check", Duration::from_secs(1), || {
            n += 1;
            n == 3
        })
        .await;
        assert_eq!(n, 3);
        assert_eq!(start.elapsed(), 2 * POLL);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out waiting: never")]
    async fn eventually_fails_after_the_limit() {
        eventually("never", Duration::from_millis(100), || false).await;
    }
}
