//! Scenario and end-to-end tests for nsm-rs, and what their process-level suites share:
//! finding the example binaries, a temporary directory per test, reading a child's
//! output line by line, a running program ([`Proc`]), the kernel vL3 as processes
//! ([`vl3`]) and its bench ([`vl3_bench`]).

#![deny(missing_docs)]

pub mod vl3;
pub mod vl3_bench;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nsm_sdk::security::dev_ca::DevCa;

/// The path of the example binary `name`, built once if it is missing; from the
/// directory `NSM_TEST_BIN_DIR` instead when set (e.g. `target/release`, for a bench
/// against optimised programs).
///
/// # Panics
/// When the binary cannot be found or built (the test cannot run).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("NSM_TEST_BIN_DIR") {
        let path = Path::new(&dir).join(name);
        assert!(path.exists(), "{} is missing", path.display());
        return path;
    }
    static BUILT: Mutex<bool> = Mutex::new(false);
    let exe = std::env::current_exe().expect("the test knows its path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let path = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !path.exists() && !*built {
        *built = true;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(cargo)
            .args(["build", "-p", "nsm-examples", "--bins"])
            .current_dir(workspace)
            .status();
        eprintln!("built the example binaries: {status:?}");
    }
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p nsm-examples --bins` (or test the whole \
         workspace) before this test",
        path.display()
    );
    path
}

/// A fresh directory for one test's sockets, logs and identity files, removed when the
/// test passes and kept (with a line saying where) when it fails.
#[derive(Debug)]
pub struct TempDir(pub PathBuf, OnceLock<DevCa>);

/// The trust domain of the CA every process test makes for its programs.
pub const TRUST_DOMAIN: &str = "nsm.test";

impl TempDir {
    /// A new directory named after `prefix`, `test`, the process and a counter.
    pub fn new(prefix: &str, test: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path, OnceLock::new())
    }

    /// This test's CA (trust domain [`TRUST_DOMAIN`]), made on first use.
    pub fn ca(&self) -> &DevCa {
        self.1
            .get_or_init(|| DevCa::new(TRUST_DOMAIN).expect("a throw-away CA"))
    }

    /// The identity files of `spiffe://nsm.test/<name>`, written into this directory,
    /// as the `NSM_TLS_*` variables that give them to a program.
    pub fn identity(&self, name: &str) -> [(&'static str, String); 3] {
        self.ca()
            .write_identity(&self.0, name)
            .expect("identity files")
            .env()
    }

    /// The `unix://` URL of the socket `name` in this directory.
    pub fn unix(&self, name: &str) -> String {
        format!("unix://{}", self.0.join(name).display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Lines of `out`, read by a thread of their own.
pub fn read_lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Starts the example program `program` as `name` with only the `NSM_*` variables of
/// `env` (none inherited from the test's environment), secure: unless `env` says
/// `NSM_INSECURE` or names its own `NSM_TLS_CERT`, the program gets the identity
/// `spiffe://nsm.test/<name>` from the test's CA ([`TempDir::identity`]). `NSM_LOG_LEVEL` from
/// `NSM_TEST_LOG_LEVEL` (default `info`); its stderr goes to `<dir>/<name>.log`, its
/// stdout, when `capture_stdout`, to [`Proc::next_stdout_line`]. Each step waits at
/// most `ready`.
///
/// # Panics
/// When the program cannot be started.
pub fn start(
    dir: &TempDir,
    program: &str,
    name: &str,
    env: &[(&str, &str)],
    capture_stdout: bool,
    ready: Duration,
) -> Proc {
    start_in(None, dir, program, name, env, capture_stdout, ready)
}

/// [`start`] inside the network namespace `pod` when given (`ip netns exec <pod>`, which
/// execs the program: the child's pid is the program's).
///
/// # Panics
/// When the program cannot be started.
pub fn start_in(
    pod: Option<&str>,
    dir: &TempDir,
    program: &str,
    name: &str,
    env: &[(&str, &str)],
    capture_stdout: bool,
    ready: Duration,
) -> Proc {
    start_wrapped(pod, &[], dir, program, name, env, capture_stdout, ready)
}

/// [`start_in`] with the program run by `wrapper` (a command and its arguments that
/// take the program's path last, e.g. `unshare --pid --fork ...`); the child is the
/// wrapper's first command (when it forks, the program is its child).
///
/// # Panics
/// When the program cannot be started.
#[allow(clippy::too_many_arguments)]
pub fn start_wrapped(
    pod: Option<&str>,
    wrapper: &[&str],
    dir: &TempDir,
    program: &str,
    name: &str,
    env: &[(&str, &str)],
    capture_stdout: bool,
    ready: Duration,
) -> Proc {
    let stderr = dir.0.join(format!("{name}.log"));
    let mut line: Vec<std::ffi::OsString> = Vec::new();
    if let Some(pod) = pod {
        line.extend(["ip", "netns", "exec", pod].map(Into::into));
    }
    line.extend(wrapper.iter().map(Into::into));
    line.push(bin(program).into());
    let mut cmd = Command::new(&line[0]);
    cmd.args(&line[1..]);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("NSM_")) {
        cmd.env_remove(k);
    }
    let level = std::env::var("NSM_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    // A program's identity is its NSM_NAME when it has one: a restarted program (started
    // under another name for another log) keeps it.
    let identity = env
        .iter()
        .find(|(k, _)| *k == "NSM_NAME")
        .map_or(name, |(_, v)| *v);
    cmd.envs(identity_env(dir, identity, env))
        .env("NSM_LOG_LEVEL", level)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(File::create(&stderr).expect("log file"))
        .stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    Proc::new(name, child, stderr, ready)
}

/// The `NSM_TLS_*` variables that give the program `name` its identity
/// (`spiffe://nsm.test/<name>`, [`TempDir::identity`]), unless `env` chooses for itself
/// (`NSM_INSECURE` or its own `NSM_TLS_CERT`): then none.
pub fn identity_env(
    dir: &TempDir,
    name: &str,
    env: &[(&str, &str)],
) -> Vec<(&'static str, String)> {
    let chooses = env
        .iter()
        .any(|(k, _)| *k == "NSM_INSECURE" || *k == "NSM_TLS_CERT");
    if chooses {
        Vec::new()
    } else {
        dir.identity(name).to_vec()
    }
}

/// One running example program of a process test. Dropping it kills it (SIGKILL) and
/// reaps it; when the test fails, its log (stderr) is printed.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stderr: PathBuf,
    stdout: Option<mpsc::Receiver<String>>,
    status: Option<ExitStatus>,
    ready: Duration,
}

/// How long a process may take to exit after SIGTERM.
const EXIT: Duration = Duration::from_secs(10);

impl Proc {
    /// A started program called `name` whose stderr goes to the file `stderr`; its
    /// stdout (when piped) is read line by line. Each step waits at most `ready`.
    pub fn new(name: &str, mut child: Child, stderr: PathBuf, ready: Duration) -> Proc {
        let stdout = child.stdout.take().map(read_lines);
        Proc {
            name: name.to_string(),
            child,
            stderr,
            stdout,
            status: None,
            ready,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Polls the log until a line contains every one of `parts`; returns it.
    ///
    /// # Panics
    /// When the process exits first or no such line comes within the ready time.
    pub fn wait_for_log(&mut self, parts: &[&str]) -> String {
        self.wait_for_lines(parts, 1).pop().expect("one line")
    }

    /// Polls the log until `count` lines contain every one of `parts`.
    ///
    /// # Panics
    /// When the process exits first or they do not come within the ready time.
    pub fn wait_for_lines(&mut self, parts: &[&str], count: usize) -> Vec<String> {
        let until = Instant::now() + self.ready;
        loop {
            let found: Vec<String> = self
                .log()
                .lines()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_string)
                .collect();
            if found.len() >= count {
                return found;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                panic!(
                    "{} exited ({status}) before logging {parts:?} {count} times:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < until,
                "{} did not log {parts:?} {count} times within {:?}:\n{}",
                self.name,
                self.ready,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The next line the process prints on stdout.
    ///
    /// # Panics
    /// When none comes within the ready time, or stdout is not captured.
    pub fn next_stdout_line(&mut self) -> String {
        let lines = self.stdout.as_ref().expect("stdout is captured");
        match lines.recv_timeout(self.ready) {
            Ok(line) => line,
            Err(e) => panic!(
                "{} printed no line on stdout ({e}); its log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// The next line on stdout within `within`, or why there is none.
    ///
    /// # Panics
    /// When stdout is not captured.
    pub fn stdout_within(&mut self, within: Duration) -> Result<String, mpsc::RecvTimeoutError> {
        let lines = self.stdout.as_ref().expect("stdout is captured");
        lines.recv_timeout(within)
    }

    /// A line on stdout, if the process printed one within 100 ms.
    pub fn next_stdout_line_or_none(&mut self) -> Option<String> {
        self.stdout
            .as_ref()
            .and_then(|lines| lines.recv_timeout(Duration::from_millis(100)).ok())
    }

    /// Sends `signal` (`TERM`, `HUP`...) with `kill`.
    ///
    /// # Panics
    /// When `kill` fails.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}: {status}", self.name);
    }

    /// Waits for the process to exit on its own.
    ///
    /// # Panics
    /// When it still runs after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                return status;
            }
            assert!(
                Instant::now() < until,
                "{} still runs after {within:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then asserts a clean exit (status 0) within 10 s.
    pub fn terminate(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(EXIT);
        assert_eq!(
            status.code(),
            Some(0),
            "{} after SIGTERM: {status}:\n{}",
            self.name,
            self.log()
        );
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status.is_none()
    }

    /// SIGKILL: the process dies at once, undoing nothing.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- {} (stderr) -----\n{}", self.name, self.log());
        }
    }
}

/// Polls `f` every 50 ms until it gives `Some`, for at most `within`.
///
/// # Panics
/// With `what` when it does not within `within`.
pub fn poll<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
