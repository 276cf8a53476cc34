//! Scenario and end-to-end tests for nsm-rs, and what their process-level suites share:
//! finding the example binaries, a temporary directory per test, reading a child's
//! output line by line.

#![deny(missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

/// The path of the example binary `name`, built once if it is missing.
///
/// # Panics
/// When the binary cannot be found or built (the test cannot run).
pub fn bin(name: &str) -> PathBuf {
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

/// A fresh directory for one test's sockets and logs, removed when the test passes and
/// kept (with a line saying where) when it fails.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

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
        TempDir(path)
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
