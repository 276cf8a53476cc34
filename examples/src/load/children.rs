//! The programs started as child processes (`--processes`): stopped with SIGTERM at
//! the end of a run, killed when dropped before that.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// How long a started program has to exit after SIGTERM before it is killed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(5);

/// Spawned processes (with their names), stopped by [`Children::stop`] at the end of a
/// run and killed when dropped before that; their directory is removed unless kept.
pub(super) struct Children {
    pub(super) procs: Vec<(String, tokio::process::Child)>,
    pub(super) dir: Option<PathBuf>,
    pub(super) keep: bool,
}

impl Children {
    /// Stops every program as an operator would: SIGTERM, then up to [`STOP_GRACE`] for
    /// it to close what it holds, unregister and exit (a profiling build writes its
    /// profile then). Returns how each one ended: `exit 0` for a clean stop.
    pub(super) async fn stop(&mut self) -> BTreeMap<String, String> {
        for (_, child) in &self.procs {
            // It may have exited already: its status is read below.
            if let Some(pid) = child.id() {
                crate::process::terminate(pid);
            }
        }
        let mut ended = BTreeMap::new();
        for (name, child) in &mut self.procs {
            let how = match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(Ok(status)) => match status.code() {
                    Some(code) => format!("exit {code}"),
                    None => format!("{status}"),
                },
                Ok(Err(e)) => format!("unknown: {e}"),
                Err(_) => {
                    let _ = child.kill().await;
                    format!(
                        "killed: still running {} s after SIGTERM",
                        STOP_GRACE.as_secs()
                    )
                }
            };
            ended.insert(name.clone(), how);
        }
        ended
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, p) in &mut self.procs {
            let _ = p.start_kill();
        }
        if let Some(dir) = &self.dir {
            if self.keep {
                eprintln!("nsm-load: logs of the mesh kept in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}
