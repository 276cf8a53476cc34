//! The life of a program: logging, the runtime, signals, serving, exit statuses.

use std::fmt;
use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use nsm_sdk::chains::Security;
use nsm_sdk::transport::{serve, Server, Services, Url};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::cli::{parse, program_name};

/// How long a server may take to finish the calls in flight when the program stops.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a program stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The configuration cannot work (exit status 2).
    Config(String),
    /// Something failed while running (exit status 1).
    Runtime(String),
}

impl Failure {
    /// A configuration that cannot work.
    pub fn config(reason: impl Into<String>) -> Self {
        Failure::Config(reason.into())
    }

    /// A failure while running.
    pub fn runtime(reason: impl Into<String>) -> Self {
        Failure::Runtime(reason.into())
    }

    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Config(_) => ExitCode::from(2),
            Failure::Runtime(_) => ExitCode::FAILURE,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Config(m) | Failure::Runtime(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

impl From<nsm_sdk::Error> for Failure {
    fn from(e: nsm_sdk::Error) -> Self {
        Failure::Runtime(e.to_string())
    }
}

/// Runs a program: parses its configuration `C` (a clap `Parser`; see
/// [`Common`](crate::Common) for the log level and the worker threads), starts logging,
/// builds a tokio runtime ([`runtime`]), and calls `program` with the configuration and a token that SIGTERM or
/// SIGINT cancels. The program should then undo what it did (unregister, close) and
/// return.
///
/// Exit status: 0 when `program` returns `Ok`; 2 for a bad configuration (one line on
/// stderr); 1 when `program` fails (one line on stderr, `<program>: <reason>`). A second
/// signal while stopping exits at once with status 1.
pub fn run<C, F, Fut>(program: F) -> ExitCode
where
    C: clap::Parser,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let (config, common) = parse::<C>();
    if let Err(reason) = init_logging(common.log_level.as_deref()) {
        return report(Failure::Config(reason));
    }
    let runtime = match runtime(common.worker_threads) {
        Ok(rt) => rt,
        Err(e) => return report(Failure::runtime(format!("cannot start tokio: {e}"))),
    };
    let outcome = runtime.block_on(async move {
        let stop = stop_on_signal()
            .map_err(|e| Failure::runtime(format!("cannot handle signals: {e}")))?;
        program(config, stop).await
    });
    // Tasks left behind (server connections, timers) must not delay the exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match outcome {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(failure) => report(failure),
    }
}

/// The tokio runtime of a program with `worker_threads` (`NSM_WORKER_THREADS`): `Some(1)`
/// is a current-thread runtime (everything on the thread that runs the program),
/// `Some(n)` a multi-thread runtime with `n` workers, `None` a multi-thread runtime
/// with tokio's default (one worker per CPU, or `TOKIO_WORKER_THREADS`). `Some(0)` is an
/// error.
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        Some(0) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a runtime needs at least one worker thread",
            ))
        }
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

fn report(failure: Failure) -> ExitCode {
    eprintln!("{}: {failure}", program_name());
    failure.exit_code()
}

/// Starts logging to stderr: `level` (from `NSM_LOG_LEVEL`/`--log-level`) when given,
/// else `RUST_LOG`, else `info`. A plain level may be in any case (`DEBUG`, as NSM's Go
/// commands take it); anything else is read as tracing filter directives.
pub fn init_logging(level: Option<&str>) -> Result<(), String> {
    let directives = match level.map(str::trim).filter(|l| !l.is_empty()) {
        Some(level) => plain_level(level).unwrap_or(level).to_string(),
        None => std::env::var("RUST_LOG")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| "info".to_string()),
    };
    let filter = EnvFilter::try_new(&directives)
        .map_err(|e| format!("bad log level {directives:?}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|e| format!("cannot start logging: {e}"))
}

fn plain_level(level: &str) -> Option<&'static str> {
    Some(match level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "fatal" | "panic" => "error",
        "off" => "off",
        _ => return None,
    })
}

/// A token cancelled by the first SIGTERM or SIGINT. The handlers are installed before
/// this returns, so a signal that comes later never kills the process uncleanly; a
/// second signal exits at once with status 1.
pub fn stop_on_signal() -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "stopping");
        token.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        warn!("second signal: exiting at once");
        std::process::exit(1);
    });
    Ok(stop)
}

/// The program's security, from its environment ([`Security::from_env`]): its identity
/// files (`NSM_TLS_CERT`, `NSM_TLS_KEY`, `NSM_TLS_CA`, watched for rotation) and its
/// policies, or plaintext with `NSM_INSECURE=true`. Without either, a configuration
/// failure (exit status 2) whose one line names the three variables.
pub fn security() -> Result<Security, Failure> {
    Security::from_env().map_err(|e| match e {
        nsm_sdk::Error::Internal(reason) => Failure::Config(reason),
        e => Failure::Config(e.to_string()),
    })
}

/// Serves `services` on each of `urls` (one server per URL, sharing the chains).
pub async fn serve_all(urls: &[Url], services: &Services) -> Result<Vec<Server>, Failure> {
    let mut servers = Vec::with_capacity(urls.len());
    for url in urls {
        let server = serve(url, services.clone())
            .await
            .map_err(|e| Failure::runtime(format!("cannot listen on {url}: {e}")))?;
        servers.push(server);
    }
    Ok(servers)
}

/// Stops servers gracefully, each within [`SHUTDOWN_TIMEOUT`] (then it is killed).
pub async fn shutdown_all(servers: Vec<Server>) {
    for server in servers {
        let url = server.url().clone();
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, server.shutdown())
            .await
            .is_err()
        {
            warn!(url = %url, "calls still running after {SHUTDOWN_TIMEOUT:?}; server killed");
        }
    }
}

/// Asks the process `pid` to stop as an operator would (SIGTERM: the programs here then
/// close what they hold, unregister and exit 0). False when no signal could be sent (it
/// is gone already, or the pid is not a process's).
pub fn terminate(pid: u32) -> bool {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    i32::try_from(pid).is_ok_and(|pid| pid > 0 && kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn terminate_sends_sigterm_to_that_process_only() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        assert!(super::terminate(child.id()));
        let status = child.wait().expect("sleep ends");
        assert_eq!(status.signal(), Some(nix::libc::SIGTERM), "{status}");
        // 0 would be this whole process group, and pids above i32::MAX do not exist.
        assert!(!super::terminate(0));
        assert!(!super::terminate(u32::MAX));
    }

    use tokio::runtime::RuntimeFlavor;

    use super::*;

    #[test]
    fn one_worker_thread_is_a_current_thread_runtime() {
        let flavor = |n| runtime(n).map(|rt| rt.handle().runtime_flavor());
        assert_eq!(flavor(Some(1)).unwrap(), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(Some(2)).unwrap(), RuntimeFlavor::MultiThread);
        assert_eq!(flavor(None).unwrap(), RuntimeFlavor::MultiThread);
        assert!(flavor(Some(0)).is_err());
    }

    #[test]
    fn a_multi_thread_runtime_has_the_workers_asked_for() {
        let rt = runtime(Some(3)).unwrap();
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}
