//! What the VXLAN benches share beyond the test kit: the two-node mesh of
//! `tests/mesh.rs` (a sandbox over unix sockets: registry, a manager and a forwarder
//! per node, an endpoint on node 2, a client chain on node 1) with either the VXLAN or
//! the NOOP mechanism, over the kit's underlay, and what a device is.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use nsm_sdk::chains::client;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox, Transport};
use nsm_sdk::Chain;
use nsm_sdk_vxlan::mechanism::{vxlan_forwarder_mechanisms, Tunnel};
use nsm_testkit::bench::Res;
use nsm_testkit::kernel::{kernel_nsc, kernel_nse};
use nsm_testkit::{Ns, UNDERLAY};
use serde_json::Value;

pub const SERVICE: &str = "vxlan-svc";
pub const PREFIX: &str = "172.16.70.0/24";
/// The client's interface name in its pod.
pub const CLIENT_IF: &str = "nsm-1";

/// Root, `ip` and `ping` are needed; otherwise the bench prints why and does nothing.
pub fn can_run() -> bool {
    nsm_testkit::can_run("VXLAN benches")
}

/// `(kind, mtu, vni)` of `dev` in `ns` (vni 0 when it is not VXLAN).
pub fn kind(ns: &Ns, dev: &str) -> (String, u64, u64) {
    let l = ns.link(dev);
    (
        l["linkinfo"]["info_kind"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        l["mtu"].as_u64().unwrap_or(0),
        l["linkinfo"]["info_data"]["id"].as_u64().unwrap_or(0),
    )
}

/// What the data plane of `dev` in `ns` looks like, without what names or numbers a
/// device (ifindex, MAC, VNI, IPv6 link-local): MTU, flags, qdisc, queues, the VXLAN
/// parameters, addresses and main-table IPv4 routes.
pub fn shape(ns: &Ns, dev: &str) -> Vec<String> {
    let mut v = Vec::new();
    for l in ns.json(&["-d", "link", "show", "dev", dev]) {
        v.push(format!(
            "mtu {} qlen {} flags {} qdisc {} queues {}/{} gso {}/{}",
            l["mtu"],
            l["txqlen"],
            l["flags"],
            l["qdisc"],
            l["num_tx_queues"],
            l["num_rx_queues"],
            l["gso_max_size"],
            l["gso_max_segs"]
        ));
        let mut info: Value = l["linkinfo"]["info_data"].clone();
        if let Some(o) = info.as_object_mut() {
            o.remove("id");
        }
        v.push(format!("{} {info}", l["linkinfo"]["info_kind"]));
    }
    for l in ns.json(&["addr", "show", "dev", dev]) {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] == "global" {
                v.push(format!("addr {}/{}", a["local"], a["prefixlen"]));
            }
        }
    }
    for r in ns.json(&["-4", "route", "show"]) {
        v.push(format!(
            "route {} scope {} gw {} proto {}",
            r["dst"], r["scope"], r["gateway"], r["protocol"]
        ));
    }
    v.sort();
    v
}

/// Which mechanism the two-node mesh uses.
pub enum Kind<'a> {
    /// KERNEL pods joined by VXLAN: the client in `nsc` on node 1, the endpoint in
    /// `nse` on node 2.
    Vxlan { nsc: &'a Ns, nse: &'a Ns },
    /// NOOP everywhere: the six gRPC hops alone.
    Noop,
}

/// A registry, per node a manager and a forwarder, an endpoint on node 2 and a client
/// chain on node 1 (no retry); dropped, it stops them and removes its directory. Drop
/// it inside its runtime.
pub struct Mesh {
    pub client: Chain,
    pub tunnels: Vec<Tunnel>,
    _nse: EndpointHandle,
    _sandbox: Sandbox,
}

impl Mesh {
    pub async fn start(nodes: &[Ns; 2], kind: Kind<'_>) -> Res<Mesh> {
        let mut builder = Sandbox::builder()
            .transport(Transport::Unix)
            .nodes(2)
            .registry_expiry(Duration::from_secs(3600));
        let mut tunnels = Vec::new();
        if let Kind::Vxlan { .. } = kind {
            for (node, underlay) in nodes.iter().zip(UNDERLAY) {
                tunnels.push(
                    Tunnel::builder(underlay.parse()?)
                        .netns(node.open())
                        .build()
                        .await?,
                );
            }
            let per_node = tunnels.clone();
            builder = builder
                .forwarder_mechanisms(move |i| vxlan_forwarder_mechanisms(per_node[i].clone()));
        }
        let sandbox = builder.build().await?;
        let (spec, opts) = match kind {
            Kind::Vxlan { nsc, nse } => (
                kernel_nse("nse", SERVICE, nse, PREFIX),
                kernel_nsc(sandbox.node(0), nsc, Some(CLIENT_IF)),
            ),
            Kind::Noop => (
                EndpointSpec::new("nse", SERVICE).ipam(PREFIX.parse()?),
                sandbox.node(0).client_options("nsc").retry(None),
            ),
        };
        let nse = sandbox.node(1).endpoint(spec).await?;
        Ok(Mesh {
            client: client(opts),
            tunnels,
            _nse: nse,
            _sandbox: sandbox,
        })
    }
}

/// A first Request for a fresh connection.
pub fn request() -> NetworkServiceRequest {
    nsm_testkit::request(SERVICE)
}
