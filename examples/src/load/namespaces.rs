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

    /// The links other than `lo` in each namespace that has any: (namespace, link
    /// names). A namespace that cannot be read counts with the error as its link.
    pub(super) async fn leftover_links(&self) -> Vec<(String, Vec<String>)> {
        use futures::stream::{self, StreamExt};
        use nsm_sdk_kernel::{NetNs, Netlink, OnDemandNetlink};
        stream::iter(self.names.iter().enumerate())
            .map(|(n, name)| async move {
                let links = match NetNs::from_url(&self.url(n)) {
                    Ok(ns) => {
                        let nl = OnDemandNetlink::new(ns);
                        let links = nl.links().await;
                        nl.release();
                        links.map(|ls| {
                            ls.into_iter()
                                .map(|l| l.name)
                                .filter(|n| n != "lo")
                                .collect::<Vec<_>>()
                        })
                    }
                    Err(e) => Err(e),
                };
                let links = links.unwrap_or_else(|e| vec![format!("(cannot read: {e})")]);
                (name.clone(), links)
            })
            .buffer_unordered(16)
            .filter(|(_, links)| std::future::ready(!links.is_empty()))
            .collect()
            .await
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
