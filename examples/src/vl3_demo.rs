//! The vL3 act of the demo (`demo --vl3`): three nodes, two vL3 endpoints, six client
//! pods; every pair pings, and an HTTP server in one pod is reached by name from a pod
//! on another node (docs/VL3.md, docs/DNS.md).
//!
//! Everything NSM runs here is in this process, with security on (a throw-away CA,
//! mTLS, signed tokens, policies): the sandbox's registry, a manager and a VXLAN/KERNEL
//! forwarder per node on unix sockets, the vL3 prefix server, the two vL3 endpoints
//! ([`Vl3Endpoint`], as `nse-vl3` runs them: a router and a DNS server in the pod) and
//! the six clients (the KERNEL mechanism in their pods, each pod's resolv.conf written
//! from the DNS config its connection brings). Around them, a [`Lab`] of network
//! namespaces: three nodes on a bridge (192.0.2.1-3), the endpoints' pods on nodes 1
//! and 2, two client pods per node. The HTTP server is a few lines of tokio in the
//! pod `pod-1a`; the GET is bash's `/dev/tcp` in another pod, whose glibc resolves the
//! name through that pod's resolv.conf.
//!
//! Each check is an assertion: the act returns an error (the program exits 1) when one
//! fails; the lab goes in every case.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nsm_sdk::chains::client;
use nsm_sdk::config::NsUrl;
use nsm_sdk::handlers::{heal, HealOptions};
use nsm_sdk::ipam::PrefixServer;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::sandbox::{Sandbox, Transport};
use nsm_sdk::serving::{serve_endpoint, ServeOptions};
use nsm_sdk::transport::Url;
use nsm_sdk::{Chain, Cx};
use nsm_sdk_dns::{dns_context, ResolvConf};
use nsm_sdk_kernel::kernel_client;
use nsm_sdk_vxlan::mechanism::{vxlan_forwarder_mechanisms, Tunnel};
use nsm_testkit::lab::Lab;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::vl3::{Vl3Endpoint, Vl3EndpointOptions};
use crate::vpn_demo::{announce, check, mesh_err, DemoError};

const SERVICE: &str = "vl3";
const NETWORK_V4: &str = "172.16.0.0/16";
const NETWORK_V6: &str = "fd10::/64";
const NODES: usize = 3;
const HTTP_PORT: u16 = 8080;
const STEPS: usize = 7;

fn step(n: usize, what: &str) {
    announce(n, STEPS, what);
}

fn net(s: &str) -> Result<IpNet, DemoError> {
    s.parse().map_err(|e| DemoError::Check(format!("{s}: {e}")))
}

/// A client pod: its name, node, chain, connection and addresses (v4, v6).
struct Pod {
    name: String,
    node: usize,
    nsc: Chain,
    conn: Connection,
    addrs: Vec<String>,
}

impl Pod {
    fn endpoint(&self) -> &str {
        &self.conn.network_service_endpoint_name
    }
}

/// The addresses (without length) of the client's side of `conn`.
fn src_addrs(conn: &Connection) -> Vec<String> {
    conn.context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .map(|ip| {
            ip.src_ip_addrs
                .iter()
                .map(|a| a.split('/').next().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A tiny HTTP/1.0 server on `[::]:HTTP_PORT` in the lab namespace `pod` (IPv4 and
/// IPv6): every request gets one line naming the pod and the caller. Runs until the
/// returned task is aborted.
async fn http_server(lab: &Lab, pod: &str) -> Result<tokio::task::JoinHandle<()>, DemoError> {
    let addr: SocketAddr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, HTTP_PORT));
    let listener = lab
        .netns(pod)?
        .run(move || std::net::TcpListener::bind(addr))
        .await
        .map_err(|e| mesh_err("HTTP server", e))?
        .map_err(|e| mesh_err("HTTP server", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| mesh_err("HTTP server", e))?;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| mesh_err("HTTP server", e))?;
    let me = pod.to_string();
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let me = me.clone();
            tokio::spawn(async move {
                // The request line and headers, up to the empty line (a client may
                // write them in pieces: answering and closing before the rest came
                // would reset the connection under it). 8 KiB and 5 s at most.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await;
                let body = format!("hello from {me}, you are {}\n", peer.ip());
                let answer = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    }))
}

/// The sockets directory and the served endpoints of the act, removed and stopped on
/// drop (also when a check fails; the [`Lab`] removes its namespaces itself).
struct Stage {
    dir: PathBuf,
    stop: CancellationToken,
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the act; `Ok` when every check passed and nothing was left.
pub async fn run() -> Result<(), DemoError> {
    let started = Instant::now();
    let mut lab = Lab::new(format!("nsmvl3-{}", std::process::id()));
    let stage = Stage {
        dir: std::env::temp_dir().join(format!("nsm-vl3-demo-{}", std::process::id())),
        stop: CancellationToken::new(),
    };

    step(
        1,
        "building the cluster: 3 nodes on a bridge, 2 vL3 endpoint pods, 6 client pods",
    );
    lab.add("switch")?;
    lab.ip("switch", &["link", "add", "br0", "type", "bridge"])?;
    lab.ip("switch", &["link", "set", "br0", "up"])?;
    let mut tunnel_ips = Vec::new();
    for n in 1..=NODES {
        let node = format!("node{n}");
        let port = format!("to-{node}");
        lab.add(&node)?;
        lab.link(
            (&node, "eth0", &format!("192.0.2.{n}/24")),
            ("switch", &port, ""),
        )?;
        lab.ip("switch", &["link", "set", &port, "master", "br0"])?;
        tunnel_ips.push(format!("192.0.2.{n}"));
    }
    let pods: Vec<(String, usize)> = (0..NODES)
        .flat_map(|node| ["a", "b"].map(|x| (format!("pod-{}{x}", node + 1), node)))
        .collect();
    for pod in ["vl3-a", "vl3-b"]
        .into_iter()
        .chain(pods.iter().map(|(p, _)| p.as_str()))
    {
        lab.add(pod)?;
    }
    eprintln!("      node1 192.0.2.1, node2 192.0.2.2, node3 192.0.2.3 (bridge br0)");

    step(2, "starting the control plane: a registry, a manager and a VXLAN/KERNEL forwarder per node, the vL3 prefix server");
    let mut tunnels = Vec::new();
    for (i, ip) in tunnel_ips.iter().enumerate() {
        let tunnel = Tunnel::builder(ip.parse().map_err(|e| DemoError::Check(format!("{e}")))?)
            .netns(lab.netns(&format!("node{}", i + 1))?)
            .build()
            .await
            .map_err(|e| mesh_err("tunnel", e))?;
        tunnels.push(tunnel);
    }
    let mesh = Sandbox::builder()
        .nodes(NODES)
        .transport(Transport::Unix)
        .forwarder_mechanisms(move |i| vxlan_forwarder_mechanisms(tunnels[i].clone()))
        .build()
        .await?;
    let prefixes = PrefixServer::builder(net(NETWORK_V4)?, 24)
        .network(net(NETWORK_V6)?, 120)
        .build()?;
    let prefix_server = mesh.start_prefix_server(prefixes).await?;
    eprintln!("      security on: a throw-away CA, mTLS on every link, signed path tokens, the default policies");
    eprintln!("      vL3 network {SERVICE}: {NETWORK_V4} (a /24 per endpoint) and {NETWORK_V6} (a /120 per endpoint)");

    step(3, "starting the vL3 endpoints vl3-a on node 1 and vl3-b on node 2 (router + DNS server in each pod)");
    std::fs::create_dir_all(&stage.dir).map_err(|e| mesh_err("socket directory", e))?;
    let mut endpoints = Vec::new();
    let mut serving = Vec::new();
    for (node, name) in ["vl3-a", "vl3-b"].into_iter().enumerate() {
        let security = mesh.security().clone();
        let vl3 = Vl3Endpoint::start(
            Vl3EndpointOptions {
                name: name.into(),
                service: SERVICE.into(),
                networks: vec![net(NETWORK_V4)?, net(NETWORK_V6)?],
                prefix_server: prefix_server.clone(),
                connect_to: mesh.node(node).nsmgr_url().clone(),
                netns_url: lab.url(name),
                dns_listen_on: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 53)),
                dns_ttl: 10,
                link_token_lifetime: Duration::from_secs(60),
            },
            &security,
        )
        .await
        .map_err(|e| mesh_err(name, e))?;
        let opts = ServeOptions::new(
            Url::Unix(stage.dir.join(format!("{name}.sock"))),
            mesh.node(node).nsmgr_url().clone(),
        )
        .security(&security)
        .network_services([SERVICE]);
        let endpoint = vl3.endpoint().clone();
        let stop = stage.stop.child_token();
        serving.push(tokio::spawn(async move {
            serve_endpoint(&endpoint, opts, stop).await
        }));
        endpoints.push(vl3);
    }
    // vl3-a makes the link (its name sorts first); each fans out DNS to the other.
    let linked = Instant::now();
    while endpoints[0].mesh().links() != ["vl3-b"]
        || endpoints.iter().any(|e| e.dns().peers().is_empty())
    {
        if linked.elapsed() > Duration::from_secs(20) {
            return Err(DemoError::Check(
                "vl3-a and vl3-b linked within 20 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check(
        true,
        format!(
            "vl3-a linked to vl3-b in {} ms",
            linked.elapsed().as_millis()
        ),
    )?;
    for e in &endpoints {
        eprintln!(
            "      DNS at {} in its pod, asking {:?} for the names it does not hold",
            e.dns_addr(),
            e.dns().peers()
        );
    }

    step(
        4,
        "six client pods, two per node, request kernel://vl3/nsm-1?podName=<pod>",
    );
    let mut clients = Vec::new();
    for (name, node) in &pods {
        let opts = mesh
            .node(*node)
            .client_options(name)
            .mechanisms(vec![])
            .handler(heal(HealOptions::new(mesh.channels())))
            .handler(kernel_client(lab.url(name)).ifname("nsm-1"))
            .handler(
                dns_context()
                    .apply_to(ResolvConf::netns(&lab.full(name)).map_err(|e| mesh_err(name, e))?),
            );
        let nsc = client(opts);
        let url = NsUrl::parse(&format!("kernel://{SERVICE}/nsm-1?podName={name}"))?;
        let t = Instant::now();
        let conn = nsc.request(&mut Cx::client(), url.to_request()).await?;
        let pod = Pod {
            name: name.clone(),
            node: *node,
            addrs: src_addrs(&conn),
            nsc,
            conn,
        };
        eprintln!(
            "      {} (node {}) on {}: {} in {} ms",
            pod.name,
            node + 1,
            pod.endpoint(),
            pod.addrs.join(", "),
            t.elapsed().as_millis()
        );
        if pod.addrs.len() != 2 {
            return Err(DemoError::Check(format!(
                "{} has an IPv4 and an IPv6 address: {:?}",
                pod.name, pod.addrs
            )));
        }
        clients.push(pod);
    }

    step(5, "every pod pings every other pod, IPv4 and IPv6");
    let t = Instant::now();
    let mut pings = 0;
    for a in &clients {
        for b in clients.iter().filter(|b| b.name != a.name) {
            for to in &b.addrs {
                // The first pings may meet routes still being installed: a few tries.
                let mut tries = 0;
                while let Err(e) = lab.ping(&a.name, to, 1) {
                    tries += 1;
                    if tries == 20 {
                        return Err(DemoError::Check(format!(
                            "{} -> {} ({to}): {e}",
                            a.name, b.name
                        )));
                    }
                }
                pings += 1;
            }
        }
    }
    check(
        true,
        format!(
            "{} ordered pairs, {pings} pings answered in {} ms (across nodes over VXLAN, through at most two vL3 routers)",
            clients.len() * (clients.len() - 1),
            t.elapsed().as_millis()
        ),
    )?;

    step(6, "names: every pod resolves every other as <pod>.vl3; an HTTP server in pod-1a is reached by name");
    for a in &clients {
        for b in clients.iter().filter(|b| b.name != a.name) {
            let v4 = lab
                .exec(
                    &a.name,
                    "getent",
                    &["ahostsv4", &format!("{}.{SERVICE}", b.name)],
                )
                .unwrap_or_default();
            let v6 = lab
                .exec(&a.name, "getent", &["hosts", &b.name])
                .unwrap_or_default();
            let first = |out: &str| out.split_whitespace().next().unwrap_or("").to_string();
            if first(&v4) != b.addrs[0] || first(&v6) != b.addrs[1] {
                return Err(DemoError::Check(format!(
                    "{} resolves {}.{SERVICE} to {:?} / {:?}, not {:?}",
                    a.name,
                    b.name,
                    first(&v4),
                    first(&v6),
                    b.addrs
                )));
            }
        }
    }
    check(
        true,
        "every pod resolves the 5 others (A and AAAA, the short name through the search domain)",
    )?;
    let resolv = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", lab.full("pod-3b")))
        .unwrap_or_default();
    eprintln!(
        "      pod-3b's resolv.conf: {}",
        resolv.lines().collect::<Vec<_>>().join(" | ")
    );
    let web = &clients[0];
    let server = http_server(&lab, &web.name).await?;
    // The caller: a pod on another node, behind the other vL3 endpoint if there is one
    // (its endpoint finds the name by fanout).
    let caller = clients
        .iter()
        .filter(|c| c.node != web.node)
        .max_by_key(|c| c.endpoint() != web.endpoint())
        .ok_or_else(|| DemoError::Check("no pod on another node".into()))?;
    let host = format!("{}.{SERVICE}", web.name);
    eprintln!(
        "      HTTP server on port {HTTP_PORT} in {} (node {}, on {}); GET http://{host}:{HTTP_PORT}/ from {} (node {}, on {})",
        web.name,
        web.node + 1,
        web.endpoint(),
        caller.name,
        caller.node + 1,
        caller.endpoint()
    );
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{HTTP_PORT} && printf 'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' >&3 && timeout 5 cat <&3"
    );
    let ns = lab.full(&caller.name);
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "bash", "-c", &script])
        .output()
        .map_err(|e| mesh_err("bash", e));
    server.abort();
    let out = out?;
    let got = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(DemoError::Check(format!(
            "GET from {}: {} ({got:?}, {:?})",
            caller.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    for line in got.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("        < {}", line.trim_end());
    }
    check(
        got.starts_with("HTTP/1.0 200 OK") && got.contains(&format!("hello from {}", web.name)),
        format!("{} got the page of {} by its name", caller.name, web.name),
    )?;

    step(
        7,
        "closing every connection and stopping the vL3 endpoints: nothing is left",
    );
    for c in &clients {
        c.nsc.close(&mut Cx::client(), c.conn.clone()).await?;
    }
    for c in &clients {
        let left: Vec<String> = lab
            .links(&c.name)?
            .into_keys()
            .filter(|l| l != "lo")
            .collect();
        let resolv = format!("/etc/netns/{}/resolv.conf", lab.full(&c.name));
        check(
            left.is_empty() && !std::path::Path::new(&resolv).exists(),
            format!(
                "pod {}: no interface and no resolv.conf left {left:?}",
                c.name
            ),
        )?;
    }
    for e in endpoints {
        e.stop().await;
    }
    stage.stop.cancel();
    for s in serving {
        if let Ok(Err(e)) = s.await {
            return Err(DemoError::Mesh(e));
        }
    }
    for pod in ["vl3-a", "vl3-b"] {
        // The links' ends go with the Close of each link, asynchronously on the far side.
        let t = Instant::now();
        loop {
            let left: Vec<String> = lab.links(pod)?.into_keys().filter(|l| l != "lo").collect();
            if left.is_empty() {
                check(true, format!("pod {pod}: no interface left"))?;
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(DemoError::Check(format!(
                    "pod {pod}: interfaces left {left:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(mesh);
    drop(stage);
    lab.teardown();
    eprintln!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
