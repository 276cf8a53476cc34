//! The network namespaces of KERNEL clients (`ip netns add`), deleted when dropped.

use std::io::Write as _;
use std::process::Stdio;

use crate::process::Failure;

/// Network namespaces made for the run (`ip netns add`), deleted when dropped.
pub(super) struct Namespaces {
    pub(super) names: Vec<String>,
}

impl Namespaces {
    /// Makes `count` namespaces named `nsmt-<pid>-<n>`.
    pub(super) fn create(count: usize) -> Result<Namespaces, Failure> {
        let pid = std::process::id();
        let names: Vec<String> = (0..count).map(|n| format!("nsmt-{pid}-{n}")).collect();
        let made = Namespaces { names };
        let out = ip_batch("add", &made.names)
            .map_err(|e| Failure::config(format!("KERNEL needs ip: {e}")))?;
        if !out.status.success() {
            // `made` deletes whatever was made.
            return Err(Failure::config(format!(
                "cannot make the client namespaces (KERNEL needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(made)
    }

    pub(super) fn url(&self, n: usize) -> String {
        format!("file:///run/netns/{}", self.names[n])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Err(e) = ip_batch("del", &self.names) {
            eprintln!(
                "nsm-load: cannot delete the namespaces nsmt-{}-*: {e}",
                std::process::id()
            );
        }
    }
}

/// Runs `ip -force -batch -` with `netns <verb> <name>` for each name.
pub(super) fn ip_batch(verb: &str, names: &[String]) -> std::io::Result<std::process::Output> {
    let mut child = std::process::Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        let script: String = names
            .iter()
            .map(|n| format!("netns {verb} {n}\n"))
            .collect();
        stdin.write_all(script.as_bytes())?;
    }
    child.wait_with_output()
}
