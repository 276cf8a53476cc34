//! A vL3 endpoint put together: what `nse-vl3` runs in its own pod, and what the vL3
//! demo ([`crate::vl3_demo`]) runs in-process for a pod of its lab (docs/VL3.md).
//!
//! The parts: its prefixes held from the prefix server (`prefix_client`), a router in
//! its pod (IPv4 and IPv6 forwarding on), the endpoint chain (`vl3_ipam`, the vL3 DNS,
//! the KERNEL mechanism in the pod), the [`Vl3Mesh`] linking it to the other endpoints
//! of its service through its own client chain, and a DNS server in its pod serving
//! `<client>.<service>` with a fanout to the linked endpoints
//! ([`nsm_sdk_dns::vl3_dns`], docs/DNS.md).
//!
//! The DNS server runs on a thread of its own that lives in the pod's namespace (a
//! current-thread runtime there): the sockets its fanout makes for each query are then
//! in the pod too, which matters when the endpoint runs in a process outside its pod
//! (the demo).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use nsm_sdk::chains::{client, endpoint, ClientOptions, Endpoint, EndpointOptions, Security};
use nsm_sdk::handlers::{heal, vl3_client, vl3_ipam};
use nsm_sdk::ipam::Vl3Prefixes;
use nsm_sdk::proto::registry::NetworkServiceEndpoint;
use nsm_sdk::registry::{watch_reconnect, RegistryChain};
use nsm_sdk::serving::Vl3Mesh;
use nsm_sdk::transport::{grpc_registry, prefix_client, PrefixClient, Url};
use nsm_sdk::Chain;
use nsm_sdk_dns::{vl3_dns, DnsServer, Records, Vl3Dns};
use nsm_sdk_kernel::kernel_client;
use nsm_sdk_kernel::mechanism::endpoint_mechanisms;
use nsm_sdk_kernel::NetNs;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::endpoint::log_calls;
use crate::process::Failure;

/// Where a vL3 endpoint's DNS server listens by default: every address of its pod,
/// IPv4 and IPv6 (a dual-stack socket), port 53.
pub const DEFAULT_DNS_LISTEN_ON: &str = "[::]:53";

/// What a [`Vl3Endpoint`] needs.
#[derive(Debug, Clone)]
pub struct Vl3EndpointOptions {
    /// Its name (registry entry, path segment).
    pub name: String,
    /// The vL3 network service it serves; also the DNS domain of its clients.
    pub service: String,
    /// The vL3 networks, as the prefix server carves them.
    pub networks: Vec<IpNet>,
    /// The prefix server.
    pub prefix_server: Url,
    /// Its node's manager (the mesh's registry watch and links go through it).
    pub connect_to: Url,
    /// Its pod: the network namespace (`file:///...`) it routes in, where its ends of
    /// the connections and its DNS server are.
    pub netns_url: String,
    /// Where its DNS server listens in the pod.
    pub dns_listen_on: SocketAddr,
    /// The TTL of the names it serves, in seconds (also how long the other endpoints
    /// cache them).
    pub dns_ttl: u32,
    /// The path token lifetime of its links to other vL3 endpoints.
    pub link_token_lifetime: Duration,
}

/// A running vL3 endpoint (everything but its gRPC server: serve
/// [`endpoint`](Self::endpoint) and register it, e.g. with
/// `nsm_sdk::serving::serve_endpoint`). [`stop`](Self::stop) closes its links, gives
/// its prefixes back and stops its DNS server; dropping it stops its tasks.
pub struct Vl3Endpoint {
    endpoint: Endpoint,
    mesh: Vl3Mesh,
    links: Chain,
    dns: Vl3Dns,
    dns_addr: SocketAddr,
    /// Cancelled: the DNS server's thread stops it and ends.
    dns_stop: CancellationToken,
    dns_thread: Option<tokio::task::JoinHandle<()>>,
    holding: CancellationToken,
    _prefix_client: PrefixClient,
}

impl std::fmt::Debug for Vl3Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vl3Endpoint")
            .field("mesh", &self.mesh)
            .field("dns", &self.dns_addr)
            .finish()
    }
}

impl Drop for Vl3Endpoint {
    fn drop(&mut self) {
        self.dns_stop.cancel();
        self.holding.cancel();
    }
}

/// Serves DNS for the vL3 `service` on `addr` in `netns`, on a thread of its own in
/// that namespace; runs until `stop`. The vL3 DNS over it and where it listens.
async fn pod_dns(
    netns: NetNs,
    addr: SocketAddr,
    ttl: u32,
    service: String,
    stop: CancellationToken,
) -> Result<(Vl3Dns, SocketAddr, tokio::task::JoinHandle<()>), Failure> {
    let (ready, started) = tokio::sync::oneshot::channel();
    let thread = tokio::spawn(async move {
        let served = netns
            .run(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(Failure::runtime(format!("DNS runtime: {e}"))));
                        return;
                    }
                };
                rt.block_on(async move {
                    match DnsServer::builder(Records::new()).ttl(ttl).bind(addr).await {
                        Ok(server) => {
                            let _ =
                                ready.send(Ok((vl3_dns(&server, &service), server.local_addr())));
                            stop.cancelled().await;
                            server.shutdown().await;
                        }
                        Err(e) => {
                            let _ = ready.send(Err(Failure::config(e.to_string())));
                        }
                    }
                });
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the DNS server's thread could not enter the pod");
        }
    });
    match started.await {
        Ok(Ok((dns, addr))) => Ok((dns, addr, thread)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Failure::runtime(
            "the DNS server's thread could not enter the pod",
        )),
    }
}

/// Turns the namespace of the calling thread into a router: IPv4 and IPv6 forwarding
/// on, and no duplicate address detection on the interfaces to come.
fn enable_forwarding() -> Result<(), String> {
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
        // Interfaces made later take `default`: no duplicate address detection on
        // their link-local addresses, which would hold IPv6 back for a second or two.
        ("/proc/sys/net/ipv6/conf/default/accept_dad", "0"),
    ] {
        std::fs::write(path, value)
            .map_err(|e| format!("cannot turn forwarding on ({path}): {e}"))?;
    }
    Ok(())
}

impl Vl3Endpoint {
    /// Starts it with `security`: makes its pod a router, binds its DNS server there,
    /// holds its prefixes and starts linking to the other endpoints.
    ///
    /// # Errors
    /// The pod cannot be opened or made a router (runtime), the DNS address cannot be
    /// bound (configuration).
    pub async fn start(opts: Vl3EndpointOptions, security: &Security) -> Result<Self, Failure> {
        let netns =
            NetNs::from_url(&opts.netns_url).map_err(|e| Failure::runtime(e.to_string()))?;
        let in_pod = |e: nsm_sdk_kernel::Error| Failure::runtime(e.to_string());
        netns
            .run(enable_forwarding)
            .await
            .map_err(in_pod)?
            .map_err(Failure::runtime)?;
        let dns_stop = CancellationToken::new();
        let (dns, dns_addr, dns_thread) = pod_dns(
            netns,
            opts.dns_listen_on,
            opts.dns_ttl,
            opts.service.clone(),
            dns_stop.clone(),
        )
        .await?;

        let channels = security.channels();
        let prefixes = Vl3Prefixes::new();
        // Held until stop: the prefix server frees them when the stream closes.
        let holding = CancellationToken::new();
        let prefix_client = prefix_client(
            channels.clone(),
            opts.prefix_server.clone(),
            opts.networks.clone(),
            Vec::new(),
            prefixes.clone(),
            &holding,
        );
        let endpoint = endpoint(
            &opts.name,
            EndpointOptions::new()
                .security(security)
                .handler(log_calls())
                .handler(vl3_ipam(prefixes.clone(), opts.networks.clone()))
                .handler(dns.clone())
                .handler(endpoint_mechanisms(opts.netns_url.clone())),
        );
        let mesh = Vl3Mesh::new(&opts.name, &opts.service);
        let links = client(
            ClientOptions::new(&opts.name, opts.connect_to.clone())
                .security(security)
                .channels(channels.clone())
                .tokens(security.tokens(opts.link_token_lifetime))
                // The mesh retries a link itself, with a backoff, while its peer is
                // registered: each attempt fails fast.
                .retry(None)
                .mechanisms(vec![])
                .handler(heal(mesh.heal_options(channels.clone())))
                .handler(vl3_client(prefixes.clone()))
                .handler(dns.links())
                .handler(kernel_client(opts.netns_url.clone())),
        );
        mesh.start(
            links.clone(),
            RegistryChain::<NetworkServiceEndpoint>::builder()
                .push(watch_reconnect())
                .push(grpc_registry(channels, opts.connect_to.clone()))
                .build(),
            prefixes,
            &holding,
        );
        info!(dns = %dns_addr, service = %opts.service, "vL3 endpoint started");
        Ok(Vl3Endpoint {
            endpoint,
            mesh,
            links,
            dns,
            dns_addr,
            dns_stop,
            dns_thread: Some(dns_thread),
            holding,
            _prefix_client: prefix_client,
        })
    }

    /// The endpoint to serve.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Its links to the other vL3 endpoints.
    pub fn mesh(&self) -> &Vl3Mesh {
        &self.mesh
    }

    /// Its vL3 DNS (who it fans out to).
    pub fn dns(&self) -> &Vl3Dns {
        &self.dns
    }

    /// Where its DNS server listens.
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns_addr
    }

    /// Closes its links, gives its prefixes back and stops its DNS server.
    pub async fn stop(mut self) {
        self.mesh.close_all(&self.links).await;
        self.holding.cancel();
        self.dns_stop.cancel();
        if let Some(thread) = self.dns_thread.take() {
            let _ = thread.await;
        }
        info!("vL3 links closed, prefixes given back");
    }
}
