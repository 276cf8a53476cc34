//! The kernel vL3 as processes (docs/VL3.md), as the vL3 root test
//! (`tests/vl3_kernel.rs`) and the vL3 bench (`benches/vl3.rs`) build it: the registry
//! and the prefix server (`nsm-vl3-ipam`) in the host namespace, an `nsmgr` and an
//! `nsm-forwarder` (VXLAN between the nodes) in each node namespace, and vL3 endpoints
//! (`nse-vl3`) `vl3-0`, `vl3-1`... each in a pod of node 0, 1... All talk over unix
//! sockets in the caller's temp directory (files, reachable from every namespace), each
//! program with its identity from the directory's CA.
//!
//! State: the running programs and the endpoints' pods. Dropping a [`Vl3Mesh`] kills
//! every program (SIGKILL) and deletes the pods, also when the caller panics; call
//! [`Vl3Mesh::stop`] for a clean stop that checks every program exits 0.

use std::time::Duration;

use nsm_testkit::{underlay_addr, Ns};

use crate::{start_in, Proc, TempDir};

/// The vL3 networks the prefix server carves: IPv4 and IPv6.
pub const NETWORKS: &str = "172.16.0.0/16,fd10::/64";
/// The network service the vL3 endpoints serve.
pub const SERVICE: &str = "vl3";

/// What [`Vl3Mesh::start`] builds besides the nodes' control plane.
#[derive(Debug, Clone, Copy)]
pub struct Vl3Options<'a> {
    /// How many vL3 endpoints: endpoint `i` in a pod of node `i` (at most one per node).
    pub endpoints: usize,
    /// The token lifetime of the links between vL3 endpoints (`NSM_VL3_LINK_TOKEN_LIFETIME`).
    pub link_token: &'a str,
    /// The prefix length each endpoint gets, per family (`NSM_VL3_PREFIX_LEN`): the
    /// number of clients an endpoint can serve.
    pub prefix_len: &'a str,
    /// How long the endpoints' DNS answers live (`NSM_DNS_TTL`): how long a closed
    /// client's name may still resolve from another endpoint's cache.
    pub dns_ttl: &'a str,
    /// How long a program may take to get ready.
    pub ready: Duration,
}

impl Default for Vl3Options<'_> {
    fn default() -> Self {
        Vl3Options {
            endpoints: 2,
            link_token: "60s",
            prefix_len: "24,120",
            dns_ttl: "10s",
            ready: Duration::from_secs(20),
        }
    }
}

/// A running kernel vL3 (see the module's doc). Its fields are public so that a test
/// can kill or stop one program on its own.
#[derive(Debug)]
pub struct Vl3Mesh {
    /// The vL3 endpoints, `vl3-<i>` on node `i`.
    pub endpoints: Vec<Proc>,
    /// Each node's manager and forwarder.
    pub control: Vec<(Proc, Proc)>,
    /// The prefix server.
    pub ipam: Proc,
    /// The registry.
    pub registry: Proc,
    /// Each node's manager URL (`unix://`), where the node's clients connect.
    pub nsmgr_urls: Vec<String>,
    /// The pod of each vL3 endpoint.
    pub endpoint_pods: Vec<Ns>,
}

/// Starts the example program `program` as `name` in `pod` (the host namespace when
/// `None`), its stdout captured when `stdout`.
pub fn start_vl3(
    dir: &TempDir,
    pod: Option<&Ns>,
    program: &str,
    name: &str,
    env: &[(&str, &str)],
    stdout: bool,
    ready: Duration,
) -> Proc {
    start_in(
        pod.map(|p| p.name.as_str()),
        dir,
        program,
        name,
        env,
        stdout,
        ready,
    )
}

impl Vl3Mesh {
    /// Starts the vL3 on `nodes` (node `i` has the underlay address
    /// [`underlay_addr`]`(i)`) and waits until every endpoint registered and every pair
    /// of endpoints is linked.
    ///
    /// # Panics
    /// When a program does not start or get ready within `opts.ready`, or there are
    /// more endpoints than nodes.
    pub fn start(dir: &TempDir, nodes: &[Ns], opts: Vl3Options<'_>) -> Vl3Mesh {
        assert!(opts.endpoints <= nodes.len(), "one vL3 endpoint per node");
        let ready = opts.ready;
        let registry_url = dir.unix("registry.sock");
        let ipam_url = dir.unix("ipam.sock");
        let mut registry = start_vl3(
            dir,
            None,
            "nsm-registry",
            "registry",
            &[("NSM_LISTEN_ON", &registry_url)],
            false,
            ready,
        );
        registry.wait_for_log(&["serving", &registry_url]);
        let mut ipam = start_vl3(
            dir,
            None,
            "nsm-vl3-ipam",
            "vl3-ipam",
            &[
                ("NSM_LISTEN_ON", &ipam_url),
                ("NSM_VL3_NETWORKS", NETWORKS),
                ("NSM_VL3_PREFIX_LEN", opts.prefix_len),
            ],
            false,
            ready,
        );
        ipam.wait_for_log(&["serving", &ipam_url]);

        let mut control = Vec::new();
        let mut nsmgr_urls = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let (name, url) = (format!("nsmgr-{i}"), dir.unix(&format!("nsmgr-{i}.sock")));
            let mut nsmgr = start_vl3(
                dir,
                Some(node),
                "nsmgr",
                &name,
                &[
                    ("NSM_NAME", &name),
                    ("NSM_LISTEN_ON", &url),
                    ("NSM_REGISTRY_URL", &registry_url),
                ],
                false,
                ready,
            );
            nsmgr.wait_for_log(&["serving", &url]);
            let fname = format!("forwarder-{i}");
            let furl = dir.unix(&format!("{fname}.sock"));
            let mut fwd = start_vl3(
                dir,
                Some(node),
                "nsm-forwarder",
                &fname,
                &[
                    ("NSM_NAME", &fname),
                    ("NSM_LISTEN_ON", &furl),
                    ("NSM_CONNECT_TO", &url),
                    ("NSM_TUNNEL_IP", &underlay_addr(i)),
                ],
                false,
                ready,
            );
            fwd.wait_for_log(&["registered endpoint", &format!("name={fname}")]);
            control.push((nsmgr, fwd));
            nsmgr_urls.push(url);
        }

        let endpoint_pods: Vec<Ns> = (0..opts.endpoints).map(|_| Ns::new()).collect();
        let mut endpoints = Vec::new();
        for (i, pod) in endpoint_pods.iter().enumerate() {
            let name = format!("vl3-{i}");
            let listen = dir.unix(&format!("{name}.sock"));
            let mut nse = start_vl3(
                dir,
                Some(pod),
                "nse-vl3",
                &name,
                &[
                    ("NSM_NAME", &name),
                    ("NSM_LISTEN_ON", &listen),
                    ("NSM_CONNECT_TO", &nsmgr_urls[i]),
                    ("NSM_SERVICE_NAMES", SERVICE),
                    ("NSM_VL3_NETWORKS", NETWORKS),
                    ("NSM_PREFIX_SERVER_URL", &ipam_url),
                    ("NSM_VL3_LINK_TOKEN_LIFETIME", opts.link_token),
                    ("NSM_DNS_TTL", opts.dns_ttl),
                ],
                false,
                ready,
            );
            nse.wait_for_log(&["registered endpoint", &format!("name={name}")]);
            endpoints.push(nse);
        }
        // The endpoint whose name sorts first makes the link of a pair.
        for i in 0..endpoints.len() {
            for j in i + 1..endpoints.len() {
                endpoints[i].wait_for_log(&["vL3 link up", &format!("peer=vl3-{j}")]);
            }
        }
        Vl3Mesh {
            endpoints,
            control,
            ipam,
            registry,
            nsmgr_urls,
            endpoint_pods,
        }
    }

    /// Stops every program still running with SIGTERM, endpoints first, and checks that
    /// each exits 0 (a program already stopped or killed is skipped).
    ///
    /// # Panics
    /// When one does not exit 0 within 10 s.
    pub fn stop(mut self) {
        for nse in &mut self.endpoints {
            if nse.running() {
                nse.terminate();
            }
        }
        for (nsmgr, fwd) in &mut self.control {
            for p in [fwd, nsmgr] {
                if p.running() {
                    p.terminate();
                }
            }
        }
        for p in [&mut self.ipam, &mut self.registry] {
            if p.running() {
                p.terminate();
            }
        }
    }
}
