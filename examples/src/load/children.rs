//! The programs started as child processes (`--processes`): stopped with SIGTERM at
//! the end of a run, killed when dropped before that; one can be SIGKILLed and started
//! again mid-run ([`Children::restart`], a forwarder dying under load).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use crate::process::Failure;

/// How to start one program (again).
#[derive(Debug, Clone)]
pub(super) struct Spec {
    pub(super) exe: PathBuf,
    /// Run it inside this namespace (`ip netns exec`).
    pub(super) netns: Option<String>,
    pub(super) env: Vec<(String, String)>,
}

impl Spec {
    /// Starts the program with its stderr going to `log`.
    pub(super) fn spawn(&self, log: std::fs::File) -> Result<tokio::process::Child, Failure> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.exe);
                c
            }
            None => tokio::process::Command::new(&self.exe),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        cmd.spawn()
            .map_err(|e| Failure::config(format!("cannot start {}: {e}", self.exe.display())))
    }
}

/// How long a started program has to exit after SIGTERM before it is killed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(5);

/// Spawned processes (with their names), stopped by [`Children::stop`] at the end of a
/// run and killed when dropped before that; their directory is removed unless kept.
pub(super) struct Children {
    pub(super) procs: Vec<(String, tokio::process::Child)>,
    /// How each one was started, by name.
    pub(super) specs: BTreeMap<String, Spec>,
    pub(super) dir: Option<PathBuf>,
    pub(super) keep: bool,
}

impl Children {
    /// No programs (the sandbox, a running mesh).
    pub(super) fn none() -> Children {
        Children {
            procs: Vec::new(),
            specs: BTreeMap::new(),
            dir: None,
            keep: false,
        }
    }

    /// SIGKILLs the program `name` and, `down_for` later, starts it again as it was
    /// started, its stderr going to `<name>.<restart>.log`. Returns when the new process
    /// was spawned.
    pub(super) async fn restart(
        &mut self,
        name: &str,
        restart: u32,
        down_for: Duration,
    ) -> Result<Instant, Failure> {
        let (spec, dir) = match (self.specs.get(name), &self.dir) {
            (Some(spec), Some(dir)) => (spec.clone(), dir.clone()),
            _ => return Err(Failure::config(format!("no started program {name}"))),
        };
        let Some((_, child)) = self.procs.iter_mut().find(|(n, _)| n == name) else {
            return Err(Failure::config(format!("no started program {name}")));
        };
        // Gone already or not, what counts is that it is gone before the new one starts.
        let _ = child.kill().await;
        tokio::time::sleep(down_for).await;
        let log = std::fs::File::create(dir.join(format!("{name}.{restart}.log")))
            .map_err(|e| Failure::runtime(format!("cannot create a log file: {e}")))?;
        *child = spec.spawn(log)?;
        Ok(Instant::now())
    }

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
