//! One pid-unique network namespace for a test or a bench.

use std::sync::atomic::{AtomicU32, Ordering};

use nsm_sdk_kernel::NetNs;
use serde_json::Value;

use crate::lab::{json_array, run};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other namespace, directory or socket of this machine has:
/// `nsmt-<pid>-<what><n>`, `n` counting up in this process.
pub fn unique(what: &str) -> String {
    format!(
        "nsmt-{}-{what}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named namespace (a "pod" or a "node") with `lo` up, deleted (after killing what
/// still runs inside) when it drops, also when the test panics. Its reads go through `ip -n <name> -j` (an observer
/// independent of the SDK's netlink code) and fail the test when `ip` does.
#[derive(Debug)]
pub struct Ns {
    /// Its name under `/run/netns`.
    pub name: String,
}

impl Ns {
    /// Makes a namespace with a [`unique`] name.
    ///
    /// # Panics
    /// When `ip netns add` fails (the test cannot run).
    pub fn new() -> Ns {
        let name = unique("");
        // A leftover from an earlier run with the same pid would make `add` fail.
        let _ = run("ip", &["netns", "del", &name]);
        let out = run("ip", &["netns", "add", &name]);
        assert!(out.0, "ip netns add {name}: {}", out.1);
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its `file:///run/netns/<name>` URL, as the kernel mechanism names namespaces.
    pub fn url(&self) -> String {
        format!("file:///run/netns/{}", self.name)
    }

    /// Opens it.
    ///
    /// # Panics
    /// When it cannot be opened.
    pub fn open(&self) -> NetNs {
        NetNs::named(&self.name).unwrap_or_else(|e| panic!("open {}: {e}", self.name))
    }

    /// Runs `ip -n <name> <args...>`; its stdout and stderr.
    ///
    /// # Panics
    /// When `ip` fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        let (ok, out) = run("ip", &full);
        assert!(ok, "ip {full:?}: {out}");
        out
    }

    /// Runs `ip -n <name> -j <args...>`: the JSON array it prints (empty when it prints
    /// nothing). A warning before the JSON (stderr is merged into the output, e.g. "Peer
    /// netns reference is invalid." when another test's namespace is gone) is skipped.
    ///
    /// # Panics
    /// When `ip` fails or prints no JSON array.
    pub fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full);
        json_array(&out).unwrap_or_else(|e| panic!("ip -n {} {full:?}: {e}: {out}", self.name))
    }

    /// `ip netns exec <name> getent hosts <host>`: glibc's resolver inside the
    /// namespace, through the resolv.conf `ip netns exec` bind-mounts from
    /// `/etc/netns/<name>/` (the host's without it). The addresses, or `None` when it
    /// does not resolve.
    ///
    /// # Panics
    /// When `ip` cannot be started.
    pub fn getent_hosts(&self, host: &str) -> Option<Vec<String>> {
        self.getent("hosts", host)
    }

    /// `ip netns exec <name> getent <database> <key>` (e.g. `ahostsv4`, IPv4 only,
    /// where `hosts` prefers IPv6): the first column of each line, de-duplicated, or
    /// `None` when the key is not found. As [`getent_hosts`](Self::getent_hosts).
    ///
    /// # Panics
    /// When `ip` cannot be started.
    pub fn getent(&self, database: &str, key: &str) -> Option<Vec<String>> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "getent", database, key])
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {}: {e}", self.name));
        out.status.success().then(|| {
            let mut v: Vec<String> = Vec::new();
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(a) = l.split_whitespace().next() {
                    if !v.iter().any(|x| x == a) {
                        v.push(a.to_string());
                    }
                }
            }
            v
        })
    }

    /// Interface names, sorted.
    pub fn links(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .json(&["link", "show"])
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    /// The one interface the mesh made (everything but `lo`).
    ///
    /// # Panics
    /// When there is not exactly one.
    pub fn mesh_link(&self) -> String {
        let links: Vec<String> = self.links().into_iter().filter(|l| l != "lo").collect();
        assert_eq!(links.len(), 1, "{}: {links:?}", self.name);
        links[0].clone()
    }

    /// What `ip -d link show dev <dev>` says of `dev` (`null` when nothing).
    pub fn link(&self, dev: &str) -> Value {
        self.json(&["-d", "link", "show", "dev", dev])
            .pop()
            .unwrap_or(Value::Null)
    }

    /// Global addresses of `dev` (both families), sorted, e.g. `["172.16.50.1/32"]`.
    pub fn addresses(&self, dev: &str) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.json(&["addr", "show", "dev", dev]) {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                if a["scope"] == "global" {
                    v.push(format!(
                        "{}/{}",
                        a["local"].as_str().unwrap_or("?"),
                        a["prefixlen"]
                    ));
                }
            }
        }
        v.sort();
        v
    }

    /// What a refresh must not change: each interface (index, MAC, MTU, flags), its
    /// global addresses and the main-table routes (without IPv6 link-local ones, which
    /// the kernel adds on its own schedule).
    pub fn state(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.json(&["link", "show"]) {
            let name = l["ifname"].as_str().unwrap_or("?").to_string();
            v.push(format!(
                "link {name} index {} mac {} mtu {} flags {}",
                l["ifindex"], l["address"], l["mtu"], l["flags"]
            ));
            for a in self.addresses(&name) {
                v.push(format!("addr {name} {a}"));
            }
        }
        for fam in ["-4", "-6"] {
            for r in self.json(&[fam, "route", "show"]) {
                if !r["dst"].as_str().unwrap_or("").starts_with("fe80:") {
                    v.push(format!("route {r}"));
                }
            }
        }
        v
    }

    /// Everything a connection could leave behind in a pod, sorted: links, all
    /// addresses, the routes of every table, the policy rules and the neighbour entries.
    pub fn everything(&self) -> Vec<String> {
        let mut v = self.everything_but_neighbours();
        for n in self.json(&["neigh", "show"]) {
            v.push(format!("neigh {n}"));
        }
        v.sort();
        v
    }

    /// [`Ns::everything`] of a node: without what its underlay gets on its own
    /// schedule (the neighbour entries, the IPv6 link-local address and routes).
    pub fn everything_of_node(&self) -> Vec<String> {
        let mut v = self.everything_but_neighbours();
        v.retain(|e| !e.contains("fe80:"));
        v.sort();
        v
    }

    fn everything_but_neighbours(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.json(&["link", "show"]) {
            v.push(format!("link {} mtu {}", l["ifname"], l["mtu"]));
        }
        for l in self.json(&["addr", "show"]) {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                v.push(format!(
                    "addr {} {}/{}",
                    l["ifname"], a["local"], a["prefixlen"]
                ));
            }
        }
        for fam in ["-4", "-6"] {
            for r in self.json(&[fam, "route", "show", "table", "all"]) {
                v.push(format!("route {r}"));
            }
            for r in self.json(&[fam, "rule", "show"]) {
                v.push(format!("rule {r}"));
            }
        }
        v
    }

    /// (tx packets, rx packets) of `dev`.
    pub fn counters(&self, dev: &str) -> (u64, u64) {
        let l = self
            .json(&["-s", "link", "show", "dev", dev])
            .pop()
            .unwrap_or(Value::Null);
        let stats = &l["stats64"];
        (
            stats["tx"]["packets"].as_u64().unwrap_or(0),
            stats["rx"]["packets"].as_u64().unwrap_or(0),
        )
    }

    /// `ip neigh show dev <dev>`: one `address lladdr <mac> <STATE>` line per entry,
    /// sorted.
    pub fn neighbours(&self, dev: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .ip(&["neigh", "show", "dev", dev])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    /// The hardware address of `dev` (`aa:bb:cc:dd:ee:ff`).
    pub fn lladdr(&self, dev: &str) -> String {
        self.link(dev)["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Drops every ARP packet and every IPv6 neighbour solicitation this namespace
    /// sends or receives (nftables), so only permanent neighbour entries can carry a
    /// packet. The tables go with the namespace.
    ///
    /// # Panics
    /// When `nft` fails (`run-tests.sh` installs nftables).
    pub fn drop_neighbour_discovery(&self) {
        let (ok, out) = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "nft",
                "add table arp noarp; \
                 add chain arp noarp in { type filter hook input priority 0; policy drop; }; \
                 add chain arp noarp out { type filter hook output priority 0; policy drop; }; \
                 add table ip6 nond; \
                 add chain ip6 nond out { type filter hook output priority 0; }; \
                 add rule ip6 nond out icmpv6 type nd-neighbor-solicit drop",
            ],
        );
        assert!(ok, "nft in {}: {out}", self.name);
    }

    /// Runs `ping -c1 -W1 <args...>` inside the namespace (blocking); whether it was
    /// answered. `args` ends with the address; flags before it (`-6`, `-s 1422`, a
    /// longer `-W`) go to `ping` as they are.
    pub fn ping_with(&self, args: &[&str]) -> bool {
        let mut full = vec!["netns", "exec", &self.name, "ping", "-c1", "-W1"];
        full.extend_from_slice(args);
        run("ip", &full).0
    }

    /// One echo request to `addr` with a 2 s wait, without blocking the runtime;
    /// whether it was answered.
    pub async fn ping(&self, addr: &str) -> bool {
        self.ping_args(&["-W2", addr]).await
    }

    /// One echo request to `addr` waiting `wait` seconds (`ping -W`, e.g. `"0.2"`),
    /// without blocking the runtime; whether it was answered.
    pub async fn ping_within(&self, addr: &str, wait: &str) -> bool {
        self.ping_args(&[&format!("-W{wait}"), addr]).await
    }

    /// Runs `ping -c1 -q <args...>` inside the namespace without blocking the runtime;
    /// whether it was answered. `args` ends with the address and holds the wait
    /// (`-W2`) and any other flag (`-M do -s 1422`).
    pub async fn ping_args(&self, args: &[&str]) -> bool {
        let mut full = vec!["netns", "exec", &self.name, "ping", "-c1", "-q"];
        full.extend_from_slice(args);
        let out = tokio::process::Command::new("ip")
            .args(&full)
            .output()
            .await;
        out.is_ok_and(|o| o.status.success())
    }
}

/// The underlay addresses of the two nodes [`underlay`] makes.
pub const UNDERLAY: [&str; 2] = ["192.0.2.1", "192.0.2.2"];

/// Two "nodes" joined by a veth underlay `ul0` with MTU 1500, addressed
/// [`UNDERLAY`]`/24`.
pub fn underlay() -> [Ns; 2] {
    let nodes = [Ns::new(), Ns::new()];
    nodes[0].ip(&[
        "link",
        "add",
        "ul0",
        "type",
        "veth",
        "peer",
        "name",
        "ul0",
        "netns",
        &nodes[1].name,
    ]);
    for (n, addr) in nodes.iter().zip(UNDERLAY) {
        n.ip(&["addr", "add", &format!("{addr}/24"), "dev", "ul0"]);
        n.ip(&["link", "set", "ul0", "mtu", "1500", "up"]);
    }
    nodes
}

/// The underlay address of node `i` (from 0) of [`switched_underlay`]: `192.0.2.<i+1>`.
pub fn underlay_addr(i: usize) -> String {
    format!("192.0.2.{}", i + 1)
}

/// `n` nodes (at most 250) on one switch: a namespace holding a bridge, and from each
/// node a veth `ul0` (MTU 1500, addressed [`underlay_addr`]`/24`) plugged into it.
/// Returns the switch (keep it: dropping it cuts the underlay) and the nodes.
pub fn switched_underlay(n: usize) -> (Ns, Vec<Ns>) {
    assert!(n <= 250, "at most 250 nodes on one switch");
    let switch = Ns::new();
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    let nodes: Vec<Ns> = (0..n).map(|_| Ns::new()).collect();
    for (i, node) in nodes.iter().enumerate() {
        let port = format!("port{i}");
        node.ip(&[
            "link",
            "add",
            "ul0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &switch.name,
        ]);
        switch.ip(&["link", "set", &port, "master", "br0", "up"]);
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", underlay_addr(i)),
            "dev",
            "ul0",
        ]);
        node.ip(&["link", "set", "ul0", "mtu", "1500", "up"]);
    }
    (switch, nodes)
}

impl Default for Ns {
    fn default() -> Self {
        Ns::new()
    }
}

impl Drop for Ns {
    /// Kills what still runs inside (a program a test started there), then deletes it.
    fn drop(&mut self) {
        let (_, pids) = run("ip", &["netns", "pids", &self.name]);
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-KILL", pid]);
        }
        let _ = run("ip", &["netns", "del", &self.name]);
        // Its resolv.conf and other files, when a program killed above left them.
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_underlay_joins_two_nodes() {
        if !crate::can_run("kit namespace tests") {
            return;
        }
        let [a, b] = underlay();
        assert_eq!(a.addresses("ul0"), ["192.0.2.1/24"]);
        assert_eq!(b.link("ul0")["mtu"], 1500);
        assert!(a.ping_with(&[UNDERLAY[1]]));
    }

    #[test]
    fn a_switched_underlay_joins_three_nodes() {
        if !crate::can_run("kit namespace tests") {
            return;
        }
        let (_switch, nodes) = switched_underlay(3);
        assert_eq!(nodes[2].addresses("ul0"), ["192.0.2.3/24"]);
        assert!(nodes[0].ping_with(&["-W2", &underlay_addr(2)]));
        assert!(nodes[2].ping_with(&["-W2", &underlay_addr(1)]));
    }

    #[test]
    fn unique_names_differ_and_carry_the_pid() {
        let (a, b) = (unique("x"), unique("x"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("nsmt-{}-x", std::process::id())));
    }

    #[tokio::test]
    async fn a_namespace_holds_lo_pings_itself_and_vanishes_on_drop() {
        if !crate::can_run("kit namespace tests") {
            return;
        }
        let name;
        {
            let ns = Ns::new();
            name = ns.name.clone();
            assert_eq!(ns.links(), ["lo"]);
            assert!(ns.ping("127.0.0.1").await);
            assert!(ns.ping_within("127.0.0.1", "0.5").await);
            assert!(!ns.ping_args(&["-W1", "192.0.2.99"]).await, "no route");
            assert!(ns.ping_with(&["-W2", "127.0.0.1"]));
            let peer = Ns::new();
            ns.ip(&[
                "link", "add", "d0", "type", "veth", "peer", "name", "d1", "netns", &peer.name,
            ]);
            ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "d0"]);
            assert_eq!(ns.mesh_link(), "d0");
            assert_eq!(peer.mesh_link(), "d1");
            assert_eq!(ns.addresses("d0"), ["192.0.2.1/24"]);
            assert_eq!(ns.link("d0")["linkinfo"]["info_kind"], "veth");
            let before = ns.everything();
            assert!(before.iter().any(|e| e.starts_with("rule ")), "{before:?}");
            assert!(ns
                .state()
                .iter()
                .any(|e| e.starts_with("link \"d0\"") || e.starts_with("link d0")));
            ns.ip(&["link", "set", "d0", "up"]);
            peer.ip(&["link", "set", "d1", "up"]);
            assert_ne!(ns.everything(), before, "the link's state shows");
            assert_eq!(
                ns.everything_of_node()
                    .iter()
                    .filter(|e| e.contains("fe80:"))
                    .count(),
                0
            );
            let (tx, _) = ns.counters("d0");
            assert!(tx < 1000);
            assert!(ns.url().ends_with(&name));
            ns.open();
        }
        let (_, list) = run("ip", &["netns", "list"]);
        assert!(!list.contains(&name), "{list}");
    }
}
