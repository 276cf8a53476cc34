//! The guide programs, run as processes against a mesh of the example programs:
//! `embed-client` gets a connection through the SDK's client chain and closes it on
//! SIGTERM; `my-nsmgr` serves the request through the handler it inserted into the
//! manager chain. (The programs are built by `cargo build -p nsm-examples --bins`, or
//! by testing the workspace.)

use std::fs::File;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use nsm_tests::{bin, read_lines, TempDir};

const READY: Duration = Duration::from_secs(20);

/// A program started by a test; killed if the test leaves it running.
struct Proc {
    name: String,
    child: Child,
    log: std::path::PathBuf,
    stdout: Option<Receiver<String>>,
}

impl Proc {
    fn start(dir: &TempDir, program: &str, name: &str, env: &[(&str, &str)]) -> Proc {
        let log = dir.0.join(format!("{name}.log"));
        let mut cmd = Command::new(bin(program));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("NSM_")) {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .env("NSM_LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdout = child.stdout.take().map(read_lines);
        Proc {
            name: name.to_string(),
            child,
            log,
            stdout,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a line of the log that has all of `parts`.
    fn wait_for_log(&mut self, parts: &[&str]) -> String {
        let until = Instant::now() + READY;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {parts:?}:\n{log}",
                    self.name
                );
            }
            assert!(
                Instant::now() < until,
                "{} did not log {parts:?} within {READY:?}:\n{log}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn next_stdout_line(&mut self) -> String {
        let lines = self.stdout.as_ref().expect("stdout captured");
        lines
            .recv_timeout(READY)
            .unwrap_or_else(|e| panic!("{} printed no line ({e}):\n{}", self.name, self.log()))
    }

    fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let until = Instant::now() + READY;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < until,
                "{} still running after SIGTERM:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- {} (stderr) -----\n{}", self.name, self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-node mesh: the registry, `my-nsmgr`, a forwarder and `hello-endpoint`
/// (serving `hello`); returns them with the manager's URL.
fn mesh(dir: &TempDir) -> (Vec<Proc>, Proc, String) {
    let (reg, mgr) = (dir.unix("reg.sock"), dir.unix("nsmgr.sock"));
    let mut registry = Proc::start(dir, "nsm-registry", "registry", &[("NSM_LISTEN_ON", &reg)]);
    registry.wait_for_log(&["serving", &reg]);
    let mut nsmgr = Proc::start(
        dir,
        "my-nsmgr",
        "my-nsmgr",
        &[("NSM_LISTEN_ON", &mgr), ("NSM_REGISTRY_URL", &reg)],
    );
    nsmgr.wait_for_log(&["serving", &mgr]);
    let mut fwd = Proc::start(
        dir,
        "nsm-forwarder",
        "forwarder",
        &[
            ("NSM_NAME", "forwarder"),
            ("NSM_LISTEN_ON", &dir.unix("fwd.sock")),
            ("NSM_CONNECT_TO", &mgr),
        ],
    );
    fwd.wait_for_log(&["registered endpoint", "name=forwarder"]);
    let mut hello = Proc::start(
        dir,
        "hello-endpoint",
        "hello",
        &[
            ("NSM_NAME", "hello"),
            ("NSM_LISTEN_ON", &dir.unix("hello.sock")),
            ("NSM_CONNECT_TO", &mgr),
        ],
    );
    hello.wait_for_log(&["registered endpoint", "name=hello"]);
    (vec![registry, fwd, hello], nsmgr, mgr)
}

fn embed_client(dir: &TempDir, nsmgr: &str) -> Proc {
    Proc::start(
        dir,
        "embed-client",
        "embed-client",
        &[
            ("NSM_NAME", "app"),
            ("NSM_CONNECT_TO", nsmgr),
            ("NSM_NETWORK_SERVICE", "noop://hello"),
        ],
    )
}

#[test]
fn embed_client_connects_and_closes_on_sigterm() {
    let dir = TempDir::new("nsm", "embed-client");
    let (mut others, _nsmgr, mgr) = mesh(&dir);
    let mut app = embed_client(&dir, &mgr);

    let connected = app.next_stdout_line();
    assert!(connected.starts_with("connected "), "{connected}");
    assert!(connected.ends_with(" endpoint=hello"), "{connected}");
    let id = connected.split(' ').nth(1).expect("an id").to_string();

    let status = app.terminate();
    assert!(status.success(), "{status}:\n{}", app.log());
    assert_eq!(app.next_stdout_line(), format!("closed {id}"));
    // The close went through the mesh: the endpoint and the forwarder stay up, and
    // a new client connects again.
    assert!(others
        .iter_mut()
        .all(|p| p.child.try_wait().unwrap().is_none()));
    let mut again = embed_client(&dir, &mgr);
    assert!(again.next_stdout_line().starts_with("connected "));
}

#[test]
fn my_nsmgr_serves_a_request_through_its_inserted_handler() {
    let dir = TempDir::new("nsm", "my-nsmgr");
    let (_others, mut nsmgr, mgr) = mesh(&dir);
    assert!(!nsmgr.log().contains("request counted"), "{}", nsmgr.log());
    let mut app = embed_client(&dir, &mgr);
    let connected = app.next_stdout_line();
    assert!(connected.ends_with(" endpoint=hello"), "{connected}");
    nsmgr.wait_for_log(&["request counted", "service=hello", "requests=1"]);

    assert!(app.terminate().success());
    let status = nsmgr.terminate();
    assert!(status.success(), "{status}:\n{}", nsmgr.log());
    nsmgr.wait_for_log(&["requests per network service", "\"hello\""]);
}
