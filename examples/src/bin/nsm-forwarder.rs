//! `nsm-forwarder`: a node's forwarder, with the KERNEL and NOOP data planes, and VXLAN
//! to other nodes when it has a tunnel IP.

use std::net::IpAddr;
use std::process::ExitCode;

use nsm_examples::metrics::MetricsArgs;
use nsm_examples::{run, security, Common, DEFAULT_NSM_SOCKET};
use nsm_sdk::chains::{forwarder, ForwarderOptions};
use nsm_sdk::serving::{serve_forwarder, ServeOptions};
use nsm_sdk::transport::Url;
use nsm_sdk_vxlan::{forwarder_mechanisms, Tunnel};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The forwarder: makes the client's side of each connection, picks the endpoint and
/// connects to it (or to the manager of the endpoint's node). It registers itself with
/// its manager and stays registered until it stops.
///
/// Data planes: KERNEL (a client and an endpoint on this node are joined by a veth
/// pair whose ends it creates inside their network namespaces, named by the
/// `file:///proc/<pid>/ns/net` URLs they send; needs root or CAP_NET_ADMIN and
/// CAP_SYS_ADMIN, and the pods' PIDs visible) and NOOP (nothing is built). A restarted
/// forwarder finds nothing to restore at start-up: the veth pairs its predecessor left
/// keep carrying traffic, and when the clients' heal re-requests their connections it
/// adopts each pair in place (both ends marked with the connection's alias, where the
/// connection puts them), so no interface is deleted or made twice. With a tunnel IP, also VXLAN: a KERNEL client here reaches a KERNEL
/// endpoint on another node through a VXLAN device in each pod, whose UDP socket is in
/// this forwarder's namespace (the node's, where the tunnel IP lives). Without one, a
/// connection to another node's endpoint must be NOOP.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Name of the forwarder: its path segment and registry entry (unique in the
    /// registry).
    #[arg(long, env = "NSM_NAME")]
    name: String,

    /// Where to listen (it registers this URL with its manager).
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL")]
    listen_on: Url,

    /// Its node's manager.
    #[arg(long, env = "NSM_CONNECT_TO", value_name = "URL", default_value = DEFAULT_NSM_SOCKET)]
    connect_to: Url,

    /// The node's address for VXLAN tunnels to other nodes (an address of a link in
    /// this forwarder's namespace, whose MTU minus 50 is the tunnel MTU). Without it, or
    /// when the tunnel cannot be set up (no link holds the address, no rights; logged as
    /// a warning), no tunnel is built.
    #[arg(long, env = "NSM_TUNNEL_IP", value_name = "IP")]
    tunnel_ip: Option<IpAddr>,

    /// The UDP port of the VXLAN tunnels (the same on every node).
    #[arg(long, env = "NSM_TUNNEL_PORT", value_name = "PORT", default_value_t = nsm_sdk_vxlan::DEFAULT_PORT)]
    tunnel_port: u16,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        let tunnel = match args.tunnel_ip {
            Some(ip) => match Tunnel::builder(ip).port(args.tunnel_port).build().await {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!(tunnel_ip = %ip, error = %e, "no VXLAN: the tunnel cannot be set up");
                    None
                }
            },
            None => None,
        };
        match &tunnel {
            Some(t) => info!(tunnel = ?t, "data planes KERNEL, VXLAN and NOOP"),
            None => info!("data planes KERNEL and NOOP"),
        }
        let _metrics = args.metrics.serve().await?;
        let root = CancellationToken::new();
        let (server_side, client_side) = forwarder_mechanisms(tunnel);
        let fwd = forwarder(
            ForwarderOptions::new(&args.name, args.connect_to.clone())
                .security(&security)
                .root(root.clone())
                .server_mechanisms(server_side)
                .client_mechanisms(client_side),
        );
        let opts = ServeOptions::new(args.listen_on, args.connect_to).security(&security);
        let outcome = serve_forwarder(&fwd, opts, stop).await;
        root.cancel();
        Ok(outcome?)
    })
}
