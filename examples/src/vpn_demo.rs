//! The main demo: a pod on node 1 joins a corporate network behind a VPN gateway on
//! node 2, through a firewall, over VXLAN; then the gateway dies and the connection
//! heals to a second one.
//!
//! Everything NSM runs here is in this process, served over unix sockets: a registry, a
//! manager and a forwarder (KERNEL + VXLAN) per node, the firewall NSE, the VPN gateway
//! NSEs and the client. The cluster around them is a [`Lab`] of network namespaces: two
//! "nodes" joined by a veth underlay (192.0.2.1 and 192.0.2.2), the pods (`nsc`,
//! `firewall` on node 1; `gw1`, `gw2` on node 2) and a "corporate" network with a host
//! (10.60.0.10) behind the gateways. The network service `vpn-gateway` comes from
//! `examples/config/vpn-gateway.json`: its matches send a plain client to the firewall
//! and the firewall to the gateway.
//!
//! Each check is an assertion: the demo returns an error (and the program exits 1) when
//! one fails, so CI runs it as a test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nsm_sdk::chains::{
    client, forwarder, nsmgr, ClientOptions, EndpointOptions, ForwarderOptions, NsmgrOptions,
    Security,
};
use nsm_sdk::config::{ns_file, NsUrl};
use nsm_sdk::handlers::{heal, HealOptions};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::registry::RegistryChain;
use nsm_sdk::security::dev_ca::DevCa;
use nsm_sdk::security::PolicySet;
use nsm_sdk::transport::{grpc_registry, serve, Channels, Server, Url};
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::kernel_client;
use nsm_sdk_vxlan::mechanism::{vxlan_forwarder_mechanisms, Tunnel};
use tokio_util::sync::CancellationToken;

use crate::firewall::{apply_acl, firewall, Acl};
use crate::gateway::{route_to_corporate, vpn_gateway};
use nsm_testkit::lab::{Lab, LabError};

/// The network service file the demo registers.
pub const SERVICE_FILE: &str = include_str!("../config/vpn-gateway.json");
/// The firewall's ACL in the demo.
pub const ACL: &str = "allow icmp; allow tcp 80; deny tcp 8080; default allow";

/// The demo's network service.
pub(crate) const SERVICE: &str = "vpn-gateway";
const CORPORATE: &str = "10.60.0.0/24";
/// The corporate host behind the gateways.
pub(crate) const CORPORATE_HOST: &str = "10.60.0.10";
const CLIENT_CIDR: &str = "172.16.80.0/24";
const STEPS: usize = 9;
/// The trust domain of the demo's throw-away CA.
const TRUST_DOMAIN: &str = "nsm.demo";

/// A demo failure: the step and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The lab (namespaces, links) could not be made or read.
    #[error("lab: {0}")]
    Lab(#[from] LabError),
    /// The mesh refused or failed.
    #[error("mesh: {0}")]
    Mesh(#[from] nsm_sdk::Error),
    /// A check of the demo failed.
    #[error("check failed: {0}")]
    Check(String),
}

/// Prints `ok: <what>` when `ok`, else fails the demo with `what`.
pub(crate) fn check(ok: bool, what: impl Into<String>) -> Result<(), DemoError> {
    if ok {
        eprintln!("      ok: {}", what.into());
        Ok(())
    } else {
        Err(DemoError::Check(what.into()))
    }
}

/// Whether this machine can run the kernel demos: root, `ip` and `nft`; else why not.
pub fn can_run() -> Result<(), String> {
    nsm_testkit::lab::can_build().and_then(|()| {
        nsm_testkit::lab::sh("nft", &["--version"])
            .map(|_| ())
            .map_err(|e| format!("no usable `nft` command ({e})"))
    })
}

/// The corporate network behind the gateway pods `gw1` and `gw2` (both made
/// already): the lab namespace `corp` (made already) with a bridge holding the
/// corporate host's address, and a link from each gateway (`corp0`, `10.60.0.1` and
/// `.2`) plugged into it.
pub(crate) fn corporate_network(lab: &Lab) -> Result<(), DemoError> {
    lab.ip("corp", &["link", "add", "br0", "type", "bridge"])?;
    lab.ip(
        "corp",
        &["addr", "add", &format!("{CORPORATE_HOST}/24"), "dev", "br0"],
    )?;
    lab.ip("corp", &["link", "set", "br0", "up"])?;
    for (gw, addr) in [("gw1", "10.60.0.1/24"), ("gw2", "10.60.0.2/24")] {
        let port = format!("to-{gw}");
        lab.link((gw, "corp0", addr), ("corp", &port, ""))?;
        lab.ip("corp", &["link", "set", &port, "master", "br0"])?;
    }
    Ok(())
}

/// Waits (60 s at most) after `killed` until `rewired` says the mesh made the new
/// end, then until the pod `nsc` pings `target`; the times of both.
pub(crate) async fn wait_for_heal(
    lab: &Lab,
    killed: Instant,
    target: &str,
    rewired: impl Fn(&Lab) -> Result<bool, DemoError>,
) -> Result<(Duration, Duration), DemoError> {
    let mut made = None;
    loop {
        if made.is_none() && rewired(lab)? {
            made = Some(killed.elapsed());
        }
        if let Some(made) = made {
            if lab.ping("nsc", target, 1).is_ok() {
                return Ok((made, killed.elapsed()));
            }
        }
        if killed.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Check("no heal to gw-2 within 60 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn step(n: usize, what: &str) {
    announce(n, STEPS, what);
}

/// Prints the heading of step `n` of `steps`.
pub(crate) fn announce(n: usize, steps: usize, what: &str) {
    eprintln!("\n[{n}/{steps}] {what}");
}

/// A failure of the mesh while doing `what`.
pub(crate) fn mesh_err(what: &str, e: impl std::fmt::Display) -> DemoError {
    DemoError::Mesh(nsm_sdk::Error::internal(format!("{what}: {e}")))
}

/// One node: its manager and forwarder.
struct Node {
    nsmgr_url: Url,
    front_nse: RegistryChain<NetworkServiceEndpoint>,
}

/// The demo's mesh: servers, channels and the socket directory, stopped on drop.
struct Mesh {
    dir: PathBuf,
    /// The throw-away CA of this run: every component has an SVID of its own from it.
    ca: DevCa,
    /// The pool of the demo itself (registering the forwarders, endpoints and the
    /// network service), as `spiffe://nsm.demo/demo`.
    channels: Channels,
    root: CancellationToken,
    servers: Vec<Server>,
    nodes: Vec<Node>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.root.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Mesh {
    /// The security of the component `name`: mTLS with its own SVID
    /// (`spiffe://nsm.demo/<name>`), signed tokens, the default policies.
    fn security(&self, name: &str) -> Result<Security, DemoError> {
        let identity = self.ca.identity(name).map_err(nsm_sdk::Error::from)?;
        Ok(Security::with_identity(
            identity.fixed(),
            PolicySet::defaults().map_err(nsm_sdk::Error::from)?,
        )?)
    }

    fn url(&self, name: &str) -> Url {
        Url::Unix(self.dir.join(format!("{name}.sock")))
    }

    async fn register_endpoint(
        &self,
        node: usize,
        name: &str,
        url: &Url,
        labels: &[(&str, &str)],
    ) -> Result<(), DemoError> {
        self.nodes[node]
            .front_nse
            .register(&mut Cx::client(), gateway_registration(name, url, labels))
            .await?;
        Ok(())
    }
}

/// The registration of an endpoint `name` of the demo's service at `url`, with
/// `labels` for that service.
pub(crate) fn gateway_registration(
    name: &str,
    url: &Url,
    labels: &[(&str, &str)],
) -> NetworkServiceEndpoint {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    NetworkServiceEndpoint {
        name: name.into(),
        network_service_names: vec![SERVICE.into()],
        network_service_labels: HashMap::from([(
            SERVICE.to_string(),
            NetworkServiceLabels { labels },
        )]),
        url: url.to_string(),
        ..Default::default()
    }
}

fn path_names(conn: &Connection) -> Vec<String> {
    conn.path
        .as_ref()
        .map(|p| p.path_segments.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default()
}

/// Where the demo puts the firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirewallNode {
    /// On node 1, with the client (the demo's default): client and firewall pods are
    /// joined by a veth pair, the firewall and the gateway by VXLAN.
    #[default]
    WithClient,
    /// On node 2, with the gateway: VXLAN from the client to the firewall, a veth pair
    /// from the firewall to the gateway.
    WithGateway,
}

/// Runs the demo in the lab with the firewall beside the client; `Ok` when every
/// check passed and nothing was left.
pub async fn run() -> Result<(), DemoError> {
    run_with(FirewallNode::WithClient).await
}

/// Runs the demo with the firewall on the given node.
pub async fn run_with(fw_node: FirewallNode) -> Result<(), DemoError> {
    let fw_at = match fw_node {
        FirewallNode::WithClient => 0,
        FirewallNode::WithGateway => 1,
    };
    let started = Instant::now();
    let mut lab = Lab::new(format!("nsmdemo-{}", std::process::id()));

    step(
        1,
        "building the cluster: 2 nodes on a veth underlay, 4 pods, a corporate network",
    );
    for ns in ["node1", "node2", "nsc", "firewall", "gw1", "gw2", "corp"] {
        lab.add(ns)?;
    }
    lab.link(
        ("node1", "eth0", "192.0.2.1/24"),
        ("node2", "eth0", "192.0.2.2/24"),
    )?;
    corporate_network(&lab)?;
    for port in [80u16, 8080] {
        let addr: SocketAddr = format!("{CORPORATE_HOST}:{port}")
            .parse()
            .map_err(|e| DemoError::Check(format!("{e}")))?;
        lab.tcp_listener("corp", addr).await?;
    }
    eprintln!("      node1 192.0.2.1 <-> node2 192.0.2.2; corporate host {CORPORATE_HOST} (TCP 80 and 8080 open)");

    step(2, "starting the control plane: a registry, and a manager and a VXLAN/KERNEL forwarder per node");
    let dir = std::env::temp_dir().join(format!("nsm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| mesh_err("socket directory", e))?;
    let ca = DevCa::new(TRUST_DOMAIN).map_err(nsm_sdk::Error::from)?;
    let mut mesh = Mesh {
        dir,
        ca,
        channels: Channels::new(),
        root: CancellationToken::new(),
        servers: Vec::new(),
        nodes: Vec::new(),
    };
    mesh.channels = mesh.security("demo")?.channels();
    eprintln!(
        "      security on: a throw-away CA ({TRUST_DOMAIN}), an SVID per component, mTLS on every link, signed path tokens, the default policies"
    );
    let registry_url = mesh.url("registry");
    let registry_security = mesh.security("registry")?;
    let registry = registry_security.registry_server(Duration::from_secs(600));
    let registry_services = registry_security.serve(registry.services());
    mesh.servers
        .push(serve(&registry_url, registry_services).await?);
    for (i, tunnel_ip) in ["192.0.2.1", "192.0.2.2"].iter().enumerate() {
        let n = i + 1;
        let nsmgr_url = mesh.url(&format!("nsmgr-{n}"));
        let mgr = nsmgr(
            NsmgrOptions::new(
                format!("nsmgr-{n}"),
                nsmgr_url.clone(),
                registry_url.clone(),
            )
            .security(&mesh.security(&format!("nsmgr-{n}"))?)
            .root(mesh.root.child_token()),
        );
        mesh.servers.push(serve(&nsmgr_url, mgr.services()).await?);
        let tunnel = Tunnel::builder(
            tunnel_ip
                .parse()
                .map_err(|e| DemoError::Check(format!("{e}")))?,
        )
        .netns(lab.netns(&format!("node{n}"))?)
        .build()
        .await
        .map_err(|e| mesh_err("tunnel", e))?;
        eprintln!(
            "      node{n}: nsmgr-{n}, forwarder-{n} (tunnel {tunnel_ip}, tunnel MTU {})",
            tunnel.mtu().get()
        );
        let (server_side, client_side) = vxlan_forwarder_mechanisms(tunnel);
        let fwd_url = mesh.url(&format!("forwarder-{n}"));
        let fwd = forwarder(
            ForwarderOptions::new(format!("forwarder-{n}"), nsmgr_url.clone())
                .security(&mesh.security(&format!("forwarder-{n}"))?)
                .root(mesh.root.child_token())
                .server_mechanisms(server_side)
                .client_mechanisms(client_side),
        );
        mesh.servers.push(serve(&fwd_url, fwd.services()).await?);
        let front_nse = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(mesh.channels.clone(), nsmgr_url.clone()))
            .build();
        front_nse
            .register(&mut Cx::client(), fwd.registration(&fwd_url))
            .await?;
        mesh.nodes.push(Node {
            nsmgr_url,
            front_nse,
        });
    }
    let services = ns_file::from_json(SERVICE_FILE).map_err(nsm_sdk::Error::from)?;
    let front_ns = RegistryChain::<NetworkService>::builder()
        .push(grpc_registry(mesh.channels.clone(), registry_url.clone()))
        .build();
    for s in &services {
        front_ns.register(&mut Cx::client(), s.clone()).await?;
    }
    eprintln!(
        "      network service {SERVICE} from examples/config/vpn-gateway.json: {} match rules",
        services.first().map(|s| s.matches.len()).unwrap_or(0)
    );

    step(
        3,
        &format!(
            "starting the VPN gateway gw-1 on node 2 and the firewall on node {}",
            fw_at + 1
        ),
    );
    let cidr: IpNet = CLIENT_CIDR
        .parse()
        .map_err(|e| DemoError::Check(format!("{e}")))?;
    let corporate: IpNet = CORPORATE
        .parse()
        .map_err(|e| DemoError::Check(format!("{e}")))?;
    let gw1_root = mesh.root.child_token();
    let gw1 = vpn_gateway(
        "gw-1",
        &lab.url("gw1"),
        vec![cidr],
        vec![corporate],
        EndpointOptions::new()
            .security(&mesh.security("gw-1")?)
            .root(gw1_root.clone()),
    );
    let gw1_url = mesh.url("gw-1");
    let gw1_server = serve(&gw1_url, gw1.services()).await?;
    route_to_corporate(&lab.netns("gw1")?, &[corporate])
        .await
        .map_err(|e| mesh_err("gateway routing", e))?;
    mesh.register_endpoint(1, "gw-1", &gw1_url, &[("app", "vpn-gateway")])
        .await?;
    eprintln!("      gw-1: addresses from {CLIENT_CIDR}, route to {CORPORATE}, NAT to the corporate network");

    let acl: Acl = ACL.parse().map_err(DemoError::Check)?;
    apply_acl(&lab.netns("firewall")?, &acl)
        .await
        .map_err(|e| mesh_err("firewall ACL", e))?;
    let fw_security = mesh.security("firewall")?;
    let fw_channels = fw_security.channels();
    let fw_client = ClientOptions::new("firewall-client", mesh.nodes[fw_at].nsmgr_url.clone())
        .security(&fw_security)
        .channels(fw_channels.clone())
        .root(mesh.root.child_token())
        .handler(heal(HealOptions::new(fw_channels)));
    let fw = firewall(
        "firewall",
        &lab.url("firewall"),
        HashMap::from([("app".to_string(), "firewall".to_string())]),
        EndpointOptions::new()
            .security(&fw_security)
            .root(mesh.root.child_token()),
        fw_client,
    );
    let fw_url = mesh.url("firewall");
    mesh.servers.push(serve(&fw_url, fw.services()).await?);
    mesh.register_endpoint(fw_at, "firewall", &fw_url, &[("app", "firewall")])
        .await?;
    eprintln!("      firewall ACL: {ACL}");

    step(
        4,
        "the client pod on node 1 requests kernel://vpn-gateway/nsm-1",
    );
    let nsc_security = mesh.security("nsc")?;
    let nsc_channels = nsc_security.channels();
    let nsc: Chain = client(
        ClientOptions::new("nsc", mesh.nodes[0].nsmgr_url.clone())
            .security(&nsc_security)
            .channels(nsc_channels.clone())
            .root(mesh.root.child_token())
            .mechanisms(vec![])
            .handler(heal(HealOptions::new(nsc_channels)))
            .handler(kernel_client(lab.url("nsc")).ifname("nsm-1")),
    );
    let url = NsUrl::parse("kernel://vpn-gateway/nsm-1")?;
    let t = Instant::now();
    let conn = nsc.request(&mut Cx::client(), url.to_request()).await?;
    eprintln!("      connected in {} ms", t.elapsed().as_millis());
    let names = path_names(&conn);
    eprintln!(
        "      path ({} segments): {}",
        names.len(),
        names.join(" -> ")
    );
    check(
        names.first().map(String::as_str) == Some("nsc") && names.iter().any(|n| n == "firewall"),
        "the path starts at the client and passes the firewall",
    )?;
    let addrs = lab.addresses("nsc", "nsm-1")?;
    let routes = lab.routes("nsc", "nsm-1")?;
    let mtu = lab
        .ip("nsc", &["-o", "link", "show", "nsm-1"])?
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .unwrap_or("?")
        .to_string();
    eprintln!("      nsc's interface nsm-1: addresses {addrs:?}, MTU {mtu}, routes {routes:?}");
    check(!addrs.is_empty(), "the client's interface has an address")?;
    check(
        routes.iter().any(|r| r.starts_with(CORPORATE)),
        format!("the client has a route to {CORPORATE}"),
    )?;
    let fw_links = lab.links("firewall")?;
    eprintln!("      firewall pod links: {fw_links:?}");
    check(
        fw_links.values().any(|k| k == "bridge") && fw_links.values().any(|k| k == "vxlan"),
        "the firewall bridges a veth pair and a VXLAN device (the other node)",
    )?;

    step(
        5,
        "proving it: ping and TCP from the client pod to the corporate host",
    );
    let (_, tx_before) = lab.packets("node1", "eth0")?;
    let summary = lab.ping("nsc", CORPORATE_HOST, 3)?;
    eprintln!("      ping {CORPORATE_HOST}: {summary}");
    let (_, tx_after) = lab.packets("node1", "eth0")?;
    check(
        tx_after >= tx_before + 3,
        format!(
            "the pings crossed the underlay encapsulated ({} packets out of node1's eth0)",
            tx_after - tx_before
        ),
    )?;
    let host = |port: u16| -> Result<SocketAddr, DemoError> {
        format!("{CORPORATE_HOST}:{port}")
            .parse()
            .map_err(|e| DemoError::Check(format!("{e}")))
    };
    let allowed = lab
        .tcp_connects("nsc", host(80)?, Duration::from_secs(2))
        .await?;
    check(allowed, "TCP to port 80 (allowed) connects")?;
    let denied = lab
        .tcp_connects("nsc", host(8080)?, Duration::from_secs(2))
        .await?;
    check(
        !denied,
        "TCP to port 8080 (denied by the firewall) does not",
    )?;

    step(
        6,
        "killing the VPN gateway gw-1 and starting gw-2 (same addresses, other pod)",
    );
    let gw2 = vpn_gateway(
        "gw-2",
        &lab.url("gw2"),
        vec![cidr],
        vec![corporate],
        EndpointOptions::new()
            .security(&mesh.security("gw-2")?)
            .root(mesh.root.child_token()),
    );
    let gw2_url = mesh.url("gw-2");
    mesh.servers.push(serve(&gw2_url, gw2.services()).await?);
    route_to_corporate(&lab.netns("gw2")?, &[corporate])
        .await
        .map_err(|e| mesh_err("gateway routing", e))?;
    mesh.register_endpoint(1, "gw-2", &gw2_url, &[("app", "vpn-gateway")])
        .await?;
    let killed = Instant::now();
    gw1_server.kill();
    gw1_root.cancel();
    eprintln!("      gw-1 killed (its server and tasks stopped; its pod keeps what the mesh made)");
    // Control plane healed: gw-2's pod has its end (VXLAN or veth). Data plane healed: the
    // client's ping crosses again.
    let (rewired, healed) = wait_for_heal(&lab, killed, CORPORATE_HOST, |lab| {
        Ok(lab
            .links("gw2")?
            .iter()
            .any(|(name, kind)| name != "corp0" && (kind == "vxlan" || kind == "veth")))
    })
    .await?;
    eprintln!(
        "      healed: the mesh rewired the firewall to gw-2 after {} ms; the client reaches {CORPORATE_HOST} again after {} ms",
        rewired.as_millis(),
        healed.as_millis()
    );
    check(
        lab.tcp_connects("nsc", host(80)?, Duration::from_secs(2))
            .await?
            && !lab
                .tcp_connects("nsc", host(8080)?, Duration::from_secs(2))
                .await?,
        "the firewall still filters after the heal",
    )?;

    step(7, "closing the connection");
    nsc.close(&mut Cx::client(), conn).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    step(8, "checking that nothing NSM made is left");
    for pod in ["nsc", "firewall", "gw2"] {
        let left: Vec<String> = lab
            .links(pod)?
            .into_iter()
            .filter(|(name, _)| name != "lo" && name != "corp0")
            .map(|(name, kind)| format!("{name} ({kind})"))
            .collect();
        check(
            left.is_empty(),
            format!("pod {pod}: no interface left {left:?}"),
        )?;
    }

    step(9, "stopping the mesh and removing the lab");
    drop(mesh);
    lab.teardown();
    eprintln!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
