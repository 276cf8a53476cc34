//! A lab of network namespaces for the demo: "nodes" and "pods" on one machine.
//!
//! A [`Lab`] makes named namespaces (`ip netns add <prefix>-<name>`), links between
//! them and addresses inside them, and deletes every namespace it made when it is
//! dropped (also on a panic or an early error), which takes every interface, address,
//! route and VXLAN device inside with it. Only addresses inside the lab's namespaces are
//! used. It also runs the checks the demo shows: ping from a pod, a TCP connect from a
//! pod, a TCP listener in a pod, and what each namespace holds.
//!
//! The lab's own plumbing (the underlay between nodes, the corporate network) stands
//! for the cluster and is made with `ip` here; everything NSM makes is made by the
//! mesh through netlink.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use nsm_sdk_kernel::NetNs;
use serde_json::Value;

/// A lab error: what was run and what it said.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct LabError {
    what: String,
    detail: String,
}

fn err(what: impl Into<String>, detail: impl ToString) -> LabError {
    LabError {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// A lab result.
pub type LabResult<T> = Result<T, LabError>;

/// Runs a command; Ok(stdout) when it exits 0.
pub fn sh(cmd: &str, args: &[&str]) -> LabResult<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| err(format!("{cmd} {}", args.join(" ")), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(err(
            format!("{cmd} {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim(),
        ))
    }
}

/// Runs a command; `(exited 0, stdout then stderr)`. For checks whose failure is an
/// answer (a ping that must not cross), not an error.
pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Whether this process can build a lab: root, with `ip` available.
pub fn can_build() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // The owner of /proc/self is the process's effective uid.
    if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return Err("not running as root".into());
    }
    sh("ip", &["-V"]).map_err(|e| format!("no usable `ip` command: {e}"))?;
    Ok(())
}

/// Namespaces made for one run, deleted on drop.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    made: Vec<String>,
}

impl Lab {
    /// An empty lab whose namespaces are called `<prefix>-<name>`.
    pub fn new(prefix: impl Into<String>) -> Lab {
        Lab {
            prefix: prefix.into(),
            made: Vec::new(),
        }
    }

    /// The full name of the lab namespace `name`.
    pub fn full(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// The `file://` URL of the lab namespace `name`.
    pub fn url(&self, name: &str) -> String {
        format!("file:///run/netns/{}", self.full(name))
    }

    /// Opens the lab namespace `name`.
    pub fn netns(&self, name: &str) -> LabResult<NetNs> {
        NetNs::named(&self.full(name)).map_err(|e| err(format!("open namespace {name}"), e))
    }

    /// Makes the namespace `name` with `lo` up.
    pub fn add(&mut self, name: &str) -> LabResult<()> {
        let full = self.full(name);
        let _ = sh("ip", &["netns", "del", &full]);
        sh("ip", &["netns", "add", &full])?;
        self.made.push(full.clone());
        sh("ip", &["-n", &full, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Runs `ip -n <ns> <args...>`.
    pub fn ip(&self, ns: &str, args: &[&str]) -> LabResult<String> {
        let full = self.full(ns);
        let mut all = vec!["-n", full.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, ns: &str, cmd: &str, args: &[&str]) -> LabResult<String> {
        let full = self.full(ns);
        let mut all = vec!["netns", "exec", full.as_str(), cmd];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Joins two namespaces with a veth pair, each end with an address (CIDR) and up.
    pub fn link(&self, a: (&str, &str, &str), b: (&str, &str, &str)) -> LabResult<()> {
        let (na, ia, addr_a) = a;
        let (nb, ib, addr_b) = b;
        let (fa, fb) = (self.full(na), self.full(nb));
        sh(
            "ip",
            &[
                "link", "add", ia, "netns", &fa, "type", "veth", "peer", "name", ib, "netns", &fb,
            ],
        )?;
        for (ns, ifname, addr) in [(na, ia, addr_a), (nb, ib, addr_b)] {
            if !addr.is_empty() {
                self.ip(ns, &["addr", "add", addr, "dev", ifname])?;
            }
            self.ip(ns, &["link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// Sets a sysctl inside the namespace (e.g. `net.ipv4.ip_forward=1`).
    pub fn sysctl(&self, ns: &str, setting: &str) -> LabResult<()> {
        self.exec(ns, "sysctl", &["-q", "-w", setting]).map(|_| ())
    }

    /// `count` pings from the namespace; Ok with the summary line when all are answered.
    pub fn ping(&self, ns: &str, to: &str, count: u32) -> LabResult<String> {
        let c = count.to_string();
        let out = self.exec(ns, "ping", &["-c", &c, "-W", "1", "-i", "0.2", "-q", to])?;
        Ok(out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("")
            .to_string())
    }

    /// A TCP listener inside the namespace that accepts and closes connections until
    /// the lab ends.
    pub async fn tcp_listener(&self, ns: &str, addr: SocketAddr) -> LabResult<()> {
        let listener = self
            .netns(ns)?
            .run(move || TcpListener::bind(addr))
            .await
            .map_err(|e| err(format!("listen on {addr} in {ns}"), e))?
            .map_err(|e| err(format!("listen on {addr} in {ns}"), e))?;
        std::thread::spawn(move || {
            for s in listener.incoming() {
                drop(s);
            }
        });
        Ok(())
    }

    /// Whether a TCP connection from the namespace to `to` is established within
    /// `timeout`.
    pub async fn tcp_connects(
        &self,
        ns: &str,
        to: SocketAddr,
        timeout: Duration,
    ) -> LabResult<bool> {
        self.netns(ns)?
            .run(move || TcpStream::connect_timeout(&to, timeout).is_ok())
            .await
            .map_err(|e| err(format!("connect to {to} from {ns}"), e))
    }

    /// The links of a namespace (`ip -j link`), by name, with their kind.
    pub fn links(&self, ns: &str) -> LabResult<BTreeMap<String, String>> {
        let out = self.ip(ns, &["-j", "-d", "link", "show"])?;
        let json = json_array(&out)?;
        Ok(json
            .iter()
            .filter_map(|l| {
                let name = l.get("ifname")?.as_str()?.to_string();
                let kind = l
                    .get("linkinfo")
                    .and_then(|i| i.get("info_kind"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                Some((name, kind))
            })
            .collect())
    }

    /// `(local, remote)` of the VXLAN device in a namespace (the first one), if it has
    /// one.
    pub fn vxlan_ends(&self, ns: &str) -> LabResult<Option<(String, String)>> {
        let out = self.ip(ns, &["-j", "-d", "link", "show"])?;
        let json = json_array(&out)?;
        Ok(json
            .iter()
            .find(|l| l["linkinfo"]["info_kind"] == "vxlan")
            .map(|l| {
                let d = &l["linkinfo"]["info_data"];
                let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
                (s("local"), s("remote"))
            }))
    }

    /// The IPv4 addresses of one interface, as `a.b.c.d/len`.
    pub fn addresses(&self, ns: &str, ifname: &str) -> LabResult<Vec<String>> {
        let out = self.ip(ns, &["-j", "-4", "addr", "show", "dev", ifname])?;
        let json = json_array(&out)?;
        Ok(json
            .iter()
            .flat_map(|l| {
                l.get("addr_info")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|a| {
                Some(format!(
                    "{}/{}",
                    a.get("local")?.as_str()?,
                    a.get("prefixlen")?.as_u64()?
                ))
            })
            .collect())
    }

    /// The IPv4 routes of a namespace's main table through one interface, as
    /// `dst [via gw]`.
    pub fn routes(&self, ns: &str, ifname: &str) -> LabResult<Vec<String>> {
        let out = self.ip(ns, &["-j", "-4", "route", "show", "dev", ifname])?;
        let json = json_array(&out)?;
        Ok(json
            .iter()
            .filter_map(|r| {
                let dst = r.get("dst")?.as_str()?;
                Some(match r.get("gateway").and_then(Value::as_str) {
                    Some(gw) => format!("{dst} via {gw}"),
                    None => dst.to_string(),
                })
            })
            .collect())
    }

    /// Packets received and sent by an interface.
    pub fn packets(&self, ns: &str, ifname: &str) -> LabResult<(u64, u64)> {
        let out = self.ip(ns, &["-j", "-s", "link", "show", "dev", ifname])?;
        let json = json_array(&out)?;
        let stats = json
            .first()
            .and_then(|l| l.get("stats64"))
            .ok_or_else(|| err(format!("statistics of {ifname} in {ns}"), "none"))?;
        let n = |dir: &str| {
            stats
                .get(dir)
                .and_then(|d| d.get("packets"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Ok((n("rx"), n("tx")))
    }

    /// Deletes every namespace of the lab now (and its `/etc/netns/<name>/`).
    pub fn teardown(&mut self) {
        for ns in self.made.drain(..) {
            if let Err(e) = sh("ip", &["netns", "del", &ns]) {
                tracing::warn!(namespace = %ns, error = %e, "could not delete a lab namespace");
            }
            // Its resolv.conf, when a client of the lab left one.
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

pub(crate) fn json_array(out: &str) -> LabResult<Vec<Value>> {
    // `ip` may print a warning before the JSON (e.g. about a namespace that is gone).
    let json = match (out.find('['), out.rfind(']')) {
        (Some(a), Some(b)) if a < b => &out[a..=b],
        _ => "[]",
    };
    serde_json::from_str(json).map_err(|e| err("parse `ip -j` output", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_json_is_found_after_a_warning() {
        let v = json_array("Peer netns reference is invalid.\n[{\"ifname\":\"lo\"}]\n").unwrap();
        assert_eq!(v[0]["ifname"], "lo");
        assert!(json_array("").unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_lab_links_two_namespaces_that_ping_and_vanish_on_drop() {
        if let Err(why) = can_build() {
            eprintln!("skipped: {why}");
            return;
        }
        let prefix = format!("nsmt-{}-lab", std::process::id());
        let full;
        {
            let mut lab = Lab::new(prefix);
            lab.add("a").unwrap();
            lab.add("b").unwrap();
            lab.link(("a", "x0", "192.0.2.1/24"), ("b", "y0", "192.0.2.2/24"))
                .unwrap();
            assert!(lab.ping("a", "192.0.2.2", 1).is_ok());
            assert_eq!(lab.addresses("b", "y0").unwrap(), ["192.0.2.2/24"]);
            assert_eq!(lab.links("a").unwrap()["x0"], "veth");
            lab.tcp_listener("b", "192.0.2.2:8080".parse().unwrap())
                .await
                .unwrap();
            let t = Duration::from_secs(1);
            assert!(lab
                .tcp_connects("a", "192.0.2.2:8080".parse().unwrap(), t)
                .await
                .unwrap());
            assert!(!lab
                .tcp_connects("a", "192.0.2.2:8081".parse().unwrap(), t)
                .await
                .unwrap());
            full = lab.full("a");
        }
        let list = sh("ip", &["netns", "list"]).unwrap();
        assert!(!list.contains(&full), "{list}");
    }
}
