//! What the kernel benches share beyond the test kit: the in-process mesh of
//! `tests/mesh.rs` (a sandbox over unix sockets: registry, nsmgr, forwarder, NSE) with
//! either the KERNEL or the NOOP mechanism, and the data-plane shape of a device.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use nsm_sdk::chains::client;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox};
use nsm_sdk::{Chain, Handler};
use nsm_sdk_kernel::kernel_forwarder_mechanisms;
use nsm_testkit::bench::{Res, Timer};
use nsm_testkit::kernel::{kernel_nsc, kernel_nse, kernel_sandbox};
use nsm_testkit::lab::run;
use nsm_testkit::Ns;

pub const SERVICE: &str = "kernel-svc";
pub const PREFIX: &str = "172.16.50.0/24";
/// The client's interface name in its pod (fixed: the pair is deleted on every Close).
pub const CLIENT_IF: &str = "nsm-1";

/// Root, `ip` and `ping` are needed; otherwise the bench prints why and does nothing.
pub fn can_run() -> bool {
    nsm_testkit::can_run("kernel benches")
}

/// Runs a command that must succeed.
pub fn must(cmd: &str, args: &[&str]) -> Res<String> {
    let (ok, out) = run(cmd, args);
    if ok {
        Ok(out)
    } else {
        Err(format!("{cmd} {args:?}: {out}").into())
    }
}

/// What the data plane of `dev` in `ns` looks like, without what names or numbers a
/// device (ifindex, MAC, IPv6 link-local): MTU, flags, qdisc, queues, GSO/TSO/GRO
/// limits, addresses, main-table IPv4 routes.
pub fn shape(ns: &Ns, dev: &str) -> Vec<String> {
    let mut v = Vec::new();
    for l in ns.json(&["-d", "link", "show", "dev", dev]) {
        v.push(format!(
            "mtu {} qlen {} flags {} qdisc {}",
            l["mtu"], l["txqlen"], l["flags"], l["qdisc"]
        ));
        v.push(format!(
            "queues tx {} rx {} gso {}/{} tso {}/{} gro {} addrgen {}",
            l["num_tx_queues"],
            l["num_rx_queues"],
            l["gso_max_size"],
            l["gso_max_segs"],
            l["tso_max_size"],
            l["tso_max_segs"],
            l["gro_max_size"],
            l["inet6_addr_gen_mode"]
        ));
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

/// Which mechanism the mesh uses end to end.
pub enum Kind<'a> {
    /// KERNEL: the client in `nsc`, the endpoint in `nse`. With `timers`, the
    /// forwarder's client chain is `[timers.0, kernel_forwarder_client, timers.1]`: the
    /// first sees the pair's creation plus the endpoint call, the second the endpoint
    /// call alone.
    Kernel {
        nsc: &'a Ns,
        nse: &'a Ns,
        timers: Option<(Timer, Timer)>,
    },
    /// NOOP (the forwarder's and the client's defaults), as `nsm-sdk/benches/request.rs`.
    Noop,
}

/// A registry, a manager, a forwarder and one endpoint, served over unix sockets, and
/// a client chain (no retry); dropped, it stops them and removes its directory.
/// Drop it inside its runtime (`rt.enter()`).
pub struct Mesh {
    pub client: Chain,
    _nse: EndpointHandle,
    _sandbox: Sandbox,
}

impl Mesh {
    pub async fn start(kind: Kind<'_>) -> Res<Mesh> {
        let builder = kernel_sandbox().registry_expiry(Duration::from_secs(3600));
        let (builder, spec) = match &kind {
            Kind::Kernel { nse, timers, .. } => {
                let timers = timers.clone();
                let builder = builder.forwarder_mechanisms(move |_| {
                    let (server_side, fwd_client) = kernel_forwarder_mechanisms();
                    let client_side = match &timers {
                        Some((total, nse_call)) => {
                            let mut v: Vec<Arc<dyn Handler>> = vec![Arc::new(total.clone())];
                            v.extend(fwd_client);
                            v.push(Arc::new(nse_call.clone()));
                            v
                        }
                        None => fwd_client,
                    };
                    (server_side, client_side)
                });
                (builder, kernel_nse("nse", SERVICE, nse, PREFIX))
            }
            Kind::Noop => (
                Sandbox::builder()
                    .transport(nsm_sdk::sandbox::Transport::Unix)
                    .registry_expiry(Duration::from_secs(3600)),
                EndpointSpec::new("nse", SERVICE).ipam(PREFIX.parse()?),
            ),
        };
        let sandbox = builder.build().await?;
        let nse = sandbox.node(0).endpoint(spec).await?;
        let node = sandbox.node(0);
        let opts = match kind {
            Kind::Kernel { nsc, .. } => kernel_nsc(node, nsc, Some(CLIENT_IF)),
            Kind::Noop => node.client_options("nsc").retry(None),
        };
        Ok(Mesh {
            client: client(opts),
            _nse: nse,
            _sandbox: sandbox,
        })
    }
}

/// A first Request for a fresh connection.
pub fn request() -> NetworkServiceRequest {
    nsm_testkit::request(SERVICE)
}
