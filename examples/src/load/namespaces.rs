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
        for family in ["ipv4", "ipv6"] {
            let path = format!("/proc/sys/net/{family}/neigh/default/gc_thresh3");
            let limit = std::fs::read_to_string(&path)
                .ok()
                .and_then(|v| v.trim().parse().ok());
            if let Some(advice) = limit.and_then(|l| neighbour_advice(family, count, l)) {
                tracing::warn!("{advice}");
            }
        }
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

/// What to tell the operator when `connections` KERNEL connections need more learnt
/// neighbour entries (one in each pod of a connection) than the node's `family` table
/// holds (`gc_thresh3`, node-wide: every namespace's entries count together): past it
/// the kernel refuses new entries and those connections stay silent.
fn neighbour_advice(family: &str, connections: usize, gc_thresh3: usize) -> Option<String> {
    let needed = connections.saturating_mul(2);
    (needed > gc_thresh3).then(|| {
        format!(
            "{connections} KERNEL connections need about {needed} {family} neighbour entries, \
             more than this node's table holds (net.{family}.neigh.default.gc_thresh3 = \
             {gc_thresh3}): connections past it will not pass traffic; raise gc_thresh1/2/3"
        )
    })
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

#[cfg(test)]
mod tests {
    use super::neighbour_advice;

    #[test]
    fn a_run_larger_than_the_nodes_neighbour_table_is_told_which_sysctl_to_raise() {
        assert_eq!(neighbour_advice("ipv4", 500, 1024), None);
        let advice = neighbour_advice("ipv4", 1000, 1024).expect("2,000 entries > 1,024");
        assert!(
            advice.contains("net.ipv4.neigh.default.gc_thresh3 = 1024"),
            "{advice}"
        );
        assert_eq!(neighbour_advice("ipv6", 1000, 16384), None);
    }
}
