//! `bridge_xconnect`: a passthrough endpoint (a firewall in a service chain) joins the
//! two kernel interfaces of each connection in a Linux bridge of its own.
//!
//! A bump-in-the-wire NSE has two interfaces per connection, both made by forwarders
//! and both [`BRIDGED`](super::BRIDGED) (name and MTU only): the upstream one, whose
//! name [`kernel_endpoint`](super::kernel_endpoint) put into the incoming connection's
//! mechanism, and the downstream one, whose name its client's
//! [`kernel_client`] offered. This handler puts both into one
//! bridge per connection (so clients stay apart), in the endpoint's namespace; what
//! crosses the bridge passes the namespace's `bridge`-family netfilter hooks, where a
//! firewall filters it.
//!
//! Two handlers, like the forwarder's mechanism pair:
//!
//! - [`bridge_xconnect`] (endpoint chain, after `kernel_endpoint`, before `connect`):
//!   reads the upstream name, lets the request go on, and once the downstream
//!   connection is up creates the connection's bridge (`nsmbr-<random>`, 15 bytes),
//!   puts the downstream interface in it, and starts a task owned by the connection
//!   that keeps both interfaces in it. The upstream interface does not exist yet at
//!   that point (its forwarder makes it only after this endpoint answers), and a heal
//!   or refresh may replace either interface with a new device of the same name: the
//!   task waits for netlink link notifications naming either interface or the bridge
//!   (a socket subscribed to `RTNLGRP_LINK` in the namespace, so it reacts within
//!   milliseconds and costs nothing while nothing changes) and then re-checks; it also
//!   re-checks every [`DEFAULT_RESYNC`], in case the notification socket overflowed.
//!   A refresh with the same names changes nothing; with other names, the old bridge
//!   goes and a new one is made. Close stops the task, deletes the bridge (the ports
//!   stay, their forwarders delete them), then passes on.
//! - [`bridge_xconnect_client`] (the passthrough's client chain, after
//!   `mechanism_translation`, before `kernel_client`): reports the downstream
//!   interface's name from the answer to the endpoint side, through the call's
//!   [`Cx::ext`] (which `connect` shares with the client chain).
//!
//! [`bridged_client`] builds that client chain. A firewall is then:
//!
//! ```no_run
//! use std::collections::HashMap;
//! use nsm_sdk::chains::{endpoint, ClientOptions, EndpointOptions};
//! use nsm_sdk::handlers::{connect, mechanisms, passthrough};
//! use nsm_sdk::wire::types;
//! use nsm_sdk_kernel::mechanism::{bridge_xconnect, bridged_client, kernel_endpoint, own_netns_url};
//! # fn demo(nsmgr: nsm_sdk::transport::Url) {
//! let ns = own_netns_url();
//! let labels = HashMap::from([("app".to_string(), "firewall".to_string())]);
//! let firewall = endpoint(
//!     "firewall",
//!     EndpointOptions::new()
//!         .handler(mechanisms().with(types::KERNEL, kernel_endpoint(&ns).bridged()))
//!         .handler(bridge_xconnect(&ns))
//!         .handler(passthrough().labels(labels))
//!         .handler(connect(bridged_client(ClientOptions::new("firewall-client", nsmgr), &ns))),
//! );
//! # }
//! ```
//!
//! State: per connection of the endpoint chain (needs `begin` there), the bridge, the
//! two port names and the keeping task.
//!
//! Failure handled: a connection that is not KERNEL passes untouched. A KERNEL one
//! without an upstream name (no `kernel_endpoint` before) is InvalidArgument; one
//! whose downstream name never came back (no `bridge_xconnect_client` in the client
//! chain) is Internal, and so is a bridge that cannot be made; either failure of a
//! first request closes the downstream connection again, so nothing is left. A port
//! that cannot be enslaved in the task is logged and tried again at the next change
//! or resync.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use nsm_sdk::chains::{client, ClientOptions};
use nsm_sdk::handlers::mechanism_translation;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::wire::params;
use nsm_sdk::{async_trait, Chain, ConnHandle, Cx, Handler, Next, Result};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{generate_ifname, is_kernel, kernel_client};
use crate::apply::Netlink;
use crate::error::Error as KernelError;
use crate::{IfName, NetNs, RtNetlink};

/// How often the keeping task re-checks the bridge when no notification came.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(5);

/// The prefix of the bridges' names: `nsmbr-` and 9 random characters.
pub const BRIDGE_PREFIX: &str = "nsmbr";

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct BridgeXconnect {
    netns_url: String,
    resync: Duration,
}

/// The endpoint side of the bridge cross-connect, bridging in the namespace
/// `netns_url` (the endpoint's own, e.g.
/// [`own_netns_url()`](super::own_netns_url)); see the [module docs](self).
pub fn bridge_xconnect(netns_url: impl Into<String>) -> BridgeXconnect {
    BridgeXconnect {
        netns_url: netns_url.into(),
        resync: DEFAULT_RESYNC,
    }
}

impl BridgeXconnect {
    /// How often the keeping task re-checks without a notification (default
    /// [`DEFAULT_RESYNC`]).
    pub fn resync(mut self, every: Duration) -> Self {
        self.resync = every;
        self
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
#[must_use]
pub struct BridgeXconnectClient;

/// The client side of the bridge cross-connect: reports the downstream interface's
/// name to [`bridge_xconnect`]; see the [module docs](self).
pub fn bridge_xconnect_client() -> BridgeXconnectClient {
    BridgeXconnectClient
}

/// The client chain of a bridging passthrough endpoint whose namespace is
/// `netns_url`: `opts` with no NOOP preference, then `mechanism_translation` (the
/// downstream connection gets a mechanism of its own), [`bridge_xconnect_client`] and
/// a [`BRIDGED`](super::BRIDGED) [`kernel_client`].
pub fn bridged_client(opts: ClientOptions, netns_url: impl Into<String>) -> Chain {
    client(
        opts.mechanisms(vec![])
            .handler(mechanism_translation())
            .handler(bridge_xconnect_client())
            .handler(kernel_client(netns_url).bridged()),
    )
}

/// Where the client side leaves the downstream interface's name for the endpoint side
/// (a per-call value in [`Cx::ext`], shared by `connect`'s copy of the context).
#[derive(Debug, Clone, Default)]
struct DownstreamName(Arc<Mutex<Option<String>>>);

impl DownstreamName {
    fn set(&self, name: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(name);
    }
    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn name_of(conn: &Connection) -> Option<&str> {
    conn.mechanism
        .as_ref()
        .filter(|m| is_kernel(m))
        .and_then(|m| m.parameters.get(params::NAME))
        .map(String::as_str)
        .filter(|n| !n.is_empty())
}

#[async_trait]
impl Handler for BridgeXconnectClient {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let out = next.request(cx, req).await?;
        if let (Some(slot), Some(name)) = (cx.ext().get::<DownstreamName>(), name_of(&out)) {
            slot.set(name.to_string());
        }
        Ok(out)
    }
}

/// The two interfaces a connection's bridge joins.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ports {
    upstream: IfName,
    downstream: IfName,
}

/// A connection's bridge and the task that keeps its ports in it.
#[derive(Debug)]
struct Bridge {
    name: IfName,
    ports: Ports,
    netlink: Arc<RtNetlink>,
    task: JoinHandle<()>,
}

impl Bridge {
    /// Stops the task, then deletes the bridge. Both go through the same netlink
    /// socket, whose requests the kernel sees in order, so nothing the task sent can
    /// re-create the bridge afterwards.
    async fn remove(self) -> crate::Result<()> {
        self.task.abort();
        let _ = self.task.await;
        match self.netlink.delete_link(&self.name).await {
            Ok(()) | Err(KernelError::LinkNotFound { .. }) => {
                info!(bridge = %self.name, "bridge deleted");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The bridge of one connection; `begin` runs one operation per connection at a time,
/// so taking it out for an operation and putting it back cannot race.
#[derive(Debug, Default)]
struct BridgeSlot(Mutex<Option<Bridge>>);

impl BridgeSlot {
    fn take(&self) -> Option<Bridge> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
    fn put(&self, b: Bridge) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(b);
    }
}

/// Makes sure the bridge exists and both ports that exist are in it.
async fn reconcile(nl: &RtNetlink, bridge: &IfName, ports: &Ports) -> crate::Result<()> {
    let index = match nl.link(bridge).await? {
        Some(l) => l.index,
        None => {
            nl.create_bridge(bridge).await?;
            nl.link(bridge)
                .await?
                .ok_or_else(|| KernelError::LinkNotFound {
                    name: bridge.to_string(),
                    netns: nl.netns().to_string(),
                })?
                .index
        }
    };
    for port in [&ports.upstream, &ports.downstream] {
        match nl.controller(port).await {
            Ok(Some(i)) if i == index => {}
            Ok(_) => match nl.set_bridge_port(port, bridge).await {
                Ok(()) => info!(%bridge, %port, "interface joined the bridge"),
                Err(KernelError::LinkNotFound { .. }) => {}
                Err(e) => return Err(e),
            },
            // Not made yet (or being replaced): a notification says when it is.
            Err(KernelError::LinkNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Link notifications of one namespace: a netlink socket subscribed to
/// `RTNLGRP_LINK`, its connection task aborted when this value drops.
struct LinkWatch {
    events: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    conn: JoinHandle<()>,
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl LinkWatch {
    async fn open(ns: &NetNs) -> crate::Result<LinkWatch> {
        let rt = tokio::runtime::Handle::current();
        let made = ns
            .run(move || {
                // The socket registers with tokio's reactor when it is created.
                let _entered = rt.enter();
                rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            })
            .await?;
        let (conn, _handle, events) = made.map_err(|e| KernelError::NetnsIo {
            path: ns.path().to_string(),
            source: e,
        })?;
        Ok(LinkWatch {
            events,
            conn: tokio::spawn(conn),
        })
    }

    /// Waits for a notification about a link called one of `names` (or for an
    /// overrun, after which anything may have changed). `false`: the socket is gone.
    async fn changed(&mut self, names: &[&IfName]) -> bool {
        while let Some((msg, _)) = self.events.next().await {
            let link = match msg.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l),
                ) => l,
                NetlinkPayload::Overrun(_) => return true,
                _ => continue,
            };
            let named = link.attributes.iter().any(
                |a| matches!(a, LinkAttribute::IfName(n) if names.iter().any(|x| x.as_str() == n)),
            );
            if named {
                return true;
            }
        }
        false
    }
}

/// Keeps the ports in the bridge until cancelled.
async fn keep(
    nl: Arc<RtNetlink>,
    ns: NetNs,
    mut watch: Option<LinkWatch>,
    bridge: IfName,
    ports: Ports,
    resync: Duration,
) {
    loop {
        let names = [&bridge, &ports.upstream, &ports.downstream];
        let notified = async {
            match watch.as_mut() {
                Some(w) => w.changed(&names).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            alive = notified => {
                if !alive {
                    warn!(%bridge, "link notifications stopped; re-opening");
                    watch = LinkWatch::open(&ns).await.ok();
                }
            }
            _ = tokio::time::sleep(resync) => {}
        }
        if let Err(e) = reconcile(&nl, &bridge, &ports).await {
            warn!(%bridge, error = %e, "keeping the connection's interfaces bridged failed; will retry");
        }
    }
}

impl BridgeXconnect {
    /// Creates the bridge with the downstream port in it and starts the keeping task.
    async fn start(&self, handle: &ConnHandle, ports: Ports) -> crate::Result<Bridge> {
        let ns = NetNs::from_url(&self.netns_url)?;
        let netlink = Arc::new(RtNetlink::open(&ns).await?);
        // Subscribed before the first check, so no change after it is missed.
        let watch = LinkWatch::open(&ns).await?;
        let mut attempt = 0;
        let name = loop {
            let name = IfName::new(generate_ifname(BRIDGE_PREFIX))?;
            match netlink.create_bridge(&name).await {
                Ok(()) => break name,
                Err(KernelError::LinkExists { .. }) if attempt < 3 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        if let Err(e) = reconcile(&netlink, &name, &ports).await {
            let _ = netlink.delete_link(&name).await;
            return Err(e);
        }
        info!(
            bridge = %name, upstream = %ports.upstream, downstream = %ports.downstream,
            "bridge made for the connection"
        );
        let task = handle.spawn(keep(
            netlink.clone(),
            ns,
            Some(watch),
            name.clone(),
            ports.clone(),
            self.resync,
        ));
        Ok(Bridge {
            name,
            ports,
            netlink,
            task,
        })
    }

    /// Brings the connection's bridge to `ports`: kept when they are the same,
    /// replaced otherwise.
    async fn bridge(&self, handle: &ConnHandle, ports: Ports) -> Result<()> {
        let slot = handle.state::<BridgeSlot>();
        if let Some(old) = slot.take() {
            if old.ports == ports {
                slot.put(old);
                return Ok(());
            }
            info!(bridge = %old.name, "the connection's interfaces changed, replacing its bridge");
            if let Err(e) = old.remove().await {
                warn!(error = %e, "deleting the old bridge failed");
            }
        }
        slot.put(self.start(handle, ports).await?);
        Ok(())
    }
}

#[async_trait]
impl Handler for BridgeXconnect {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        if !conn.mechanism.as_ref().is_some_and(is_kernel) {
            return next.request(cx, req).await;
        }
        let upstream = IfName::new(name_of(conn).ok_or_else(|| {
            nsm_sdk::Error::invalid(
                "bridge_xconnect: the KERNEL mechanism has no interface name \
                 (kernel_endpoint goes before it)",
            )
        })?)?;
        let handle = cx
            .conn()
            .cloned()
            .ok_or_else(|| nsm_sdk::Error::internal("bridge_xconnect needs `begin` before it"))?;
        let first = handle.get_state::<BridgeSlot>().is_none();
        let slot = DownstreamName::default();
        cx.ext_mut().insert(slot.clone());
        let out = next.clone().request(cx, req).await;
        cx.ext_mut().remove::<DownstreamName>();
        let out = out?;
        let bridged = match slot.get() {
            Some(down) => match IfName::new(down) {
                Ok(downstream) => {
                    self.bridge(
                        &handle,
                        Ports {
                            upstream,
                            downstream,
                        },
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            },
            None => Err(nsm_sdk::Error::internal(
                "bridge_xconnect: the downstream interface's name did not come back \
                 (put bridge_xconnect_client in the passthrough's client chain)",
            )),
        };
        match bridged {
            Ok(()) => Ok(out),
            Err(e) => {
                if first {
                    debug!(error = %e, "bridging failed; closing the downstream connection");
                    if let Err(ce) = next.close(cx, out).await {
                        debug!(error = %ce, "closing the downstream after a failure failed");
                    }
                }
                Err(e)
            }
        }
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let bridge = cx
            .conn()
            .and_then(|h| h.get_state::<BridgeSlot>())
            .and_then(|s| s.take());
        let removed = match bridge {
            Some(b) => b.remove().await.map_err(nsm_sdk::Error::from),
            None => Ok(()),
        };
        let rest = next.close(cx, conn).await;
        removed.and(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mechanism::kernel_mechanism;
    use nsm_sdk::handlers::{begin, connect};
    use nsm_sdk::proto::connection::Mechanism;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    use tonic::Code;

    fn kernel(name: &str) -> Mechanism {
        let mut m = kernel_mechanism();
        m.parameters.insert(params::NAME.into(), name.into());
        m
    }

    fn req(id: &str, mechanism: Option<Mechanism>) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                network_service: "svc".into(),
                mechanism,
                ..Default::default()
            }),
            mechanism_preferences: vec![],
        }
    }

    /// Plays the downstream forwarder: answers with a KERNEL mechanism named
    /// `<connection id>-dn` (after making a veth end of that name in `ns`, if given),
    /// and counts Closes.
    #[derive(Clone, Default)]
    struct Downstream {
        ns: Option<Arc<NetNs>>,
        closes: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Handler for Downstream {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> Result<Connection> {
            let mut conn = req.connection.unwrap_or_default();
            let name = format!("{}-dn", conn.id);
            if let Some(ns) = &self.ns {
                if link(ns, &name).await.is_none() {
                    add_dummy(ns, &name).await;
                }
            }
            conn.mechanism = Some(kernel(&name));
            Ok(conn)
        }
        async fn close(&self, _cx: &mut Cx, _conn: Connection, _next: Next) -> Result<()> {
            self.closes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A firewall's shape: `begin`, the cross-connect, then `connect` to a client chain
    /// with `mechanism_translation`, the client side (or not) and the downstream.
    fn chain(x: BridgeXconnect, client_side: bool, down: Downstream) -> Chain {
        let mut c = Chain::builder().push(mechanism_translation());
        if client_side {
            c = c.push(bridge_xconnect_client());
        }
        Chain::builder()
            .push(begin())
            .push(x)
            .push(connect(c.push(down).build()))
            .build()
    }

    #[tokio::test]
    async fn a_connection_that_is_not_kernel_passes_through_untouched() {
        // A namespace that cannot be opened proves nothing was tried.
        let down = Downstream::default();
        let c = chain(
            bridge_xconnect("file:///nonexistent/ns"),
            true,
            down.clone(),
        );
        let mut noop = kernel_mechanism();
        noop.r#type = "NOOP".into();
        c.request(&mut Cx::server(), req("c", Some(noop)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn without_its_client_side_the_request_fails_and_the_downstream_is_closed() {
        let down = Downstream::default();
        let c = chain(
            bridge_xconnect("file:///proc/self/ns/net"),
            false,
            down.clone(),
        );
        let err = c
            .request(&mut Cx::server(), req("c", Some(kernel("up-1"))))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err}");
        assert!(err.to_string().contains("bridge_xconnect_client"), "{err}");
        assert_eq!(down.closes.load(Ordering::SeqCst), 1);

        // A KERNEL mechanism without a name: kernel_endpoint was not before it.
        let err = chain(
            bridge_xconnect("file:///proc/self/ns/net"),
            true,
            down.clone(),
        )
        .request(&mut Cx::server(), req("c", Some(kernel_mechanism())))
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }

    /// A fresh network namespace held by an open descriptor (gone when the test ends),
    /// and its `file://` URL; `None` without the privilege to make one.
    fn scratch_ns() -> Option<(OwnedFd, String)> {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !root {
            eprintln!("skipped: needs root");
            return None;
        }
        let fd = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            std::fs::File::open("/proc/thread-self/ns/net")
                .ok()
                .map(OwnedFd::from)
        })
        .join()
        .ok()
        .flatten()?;
        let url = format!("file:///proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
        Some((fd, url))
    }

    /// Makes the interface `name` in `ns`: one end of a veth pair whose other end is
    /// `<name>p` (the kernel here has no dummy links).
    async fn add_dummy(ns: &NetNs, name: &str) {
        let nl = RtNetlink::open(ns).await.unwrap();
        let (a, b) = (
            IfName::new(name).unwrap(),
            IfName::new(format!("{name}p")).unwrap(),
        );
        nl.create_veth_pair(&a, ns, &b, ns, None).await.unwrap();
    }

    async fn link(ns: &NetNs, name: &str) -> Option<crate::Link> {
        let nl = RtNetlink::open(ns).await.unwrap();
        nl.link(&IfName::new(name).unwrap()).await.unwrap()
    }

    /// The bridges of `ns` and, for each, its ports.
    async fn bridges(ns: &NetNs) -> Vec<(String, Vec<String>)> {
        let nl = RtNetlink::open(ns).await.unwrap();
        let links = nl.links().await.unwrap();
        let mut out = Vec::new();
        for b in links.iter().filter(|l| l.kind.as_deref() == Some("bridge")) {
            let mut ports = Vec::new();
            for l in &links {
                let name = IfName::new(l.name.as_str()).unwrap();
                if nl.controller(&name).await.unwrap() == Some(b.index) {
                    ports.push(l.name.clone());
                }
            }
            ports.sort();
            out.push((b.name.clone(), ports));
        }
        out.sort();
        out
    }

    async fn wait_for<F, Fut>(what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let until = Instant::now() + Duration::from_secs(5);
        while !f().await {
            assert!(Instant::now() < until, "{what}: not within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_connection_gets_a_bridge_that_keeps_both_interfaces_even_when_recreated() {
        let Some((_fd, url)) = scratch_ns() else {
            return;
        };
        let ns = Arc::new(NetNs::from_url(&url).unwrap());
        let down = Downstream {
            ns: Some(ns.clone()),
            ..Default::default()
        };
        // No resync within the test: only notifications can make it pass.
        let c = chain(
            bridge_xconnect(&url).resync(Duration::from_secs(600)),
            true,
            down.clone(),
        );
        let a = c
            .request(&mut Cx::server(), req("a", Some(kernel("a-up"))))
            .await
            .unwrap();
        assert_eq!(a.mechanism, Some(kernel("a-up")), "the upstream mechanism");
        let [(bridge_a, ports)] = &bridges(&ns).await[..] else {
            panic!("{:?}", bridges(&ns).await)
        };
        assert!(
            bridge_a.starts_with("nsmbr-") && bridge_a.len() == 15,
            "{bridge_a}"
        );
        assert_eq!(ports, &["a-dn"], "the downstream joins at once");

        // The upstream forwarder makes its interface after the answer.
        add_dummy(&ns, "a-up").await;
        let want = vec![(
            bridge_a.clone(),
            vec!["a-dn".to_string(), "a-up".to_string()],
        )];
        wait_for("the upstream interface joins", || async {
            bridges(&ns).await == want
        })
        .await;

        // A second connection gets a bridge of its own.
        let b = c
            .request(&mut Cx::server(), req("b", Some(kernel("b-up"))))
            .await
            .unwrap();
        add_dummy(&ns, "b-up").await;
        wait_for("the second connection is bridged apart", || async {
            let all = bridges(&ns).await;
            all.len() == 2
                && all.contains(&want[0])
                && all
                    .iter()
                    .any(|(_, p)| p == &["b-dn".to_string(), "b-up".to_string()])
        })
        .await;

        // A heal replaces the upstream interface: the new device joins again.
        let old = link(&ns, "a-up").await.unwrap().index;
        let nl = RtNetlink::open(&ns).await.unwrap();
        nl.delete_link(&IfName::new("a-up").unwrap()).await.unwrap();
        add_dummy(&ns, "a-up").await;
        assert_ne!(link(&ns, "a-up").await.unwrap().index, old);
        wait_for("the new upstream device joins", || async {
            bridges(&ns).await.contains(&want[0])
        })
        .await;

        // A refresh with the same interfaces keeps the bridge.
        let a = c
            .request(
                &mut Cx::server(),
                NetworkServiceRequest {
                    connection: Some(a),
                    mechanism_preferences: vec![],
                },
            )
            .await
            .unwrap();
        assert!(bridges(&ns).await.contains(&want[0]));

        // Close deletes the bridge; the interfaces stay for their forwarders.
        c.close(&mut Cx::server(), a).await.unwrap();
        c.close(&mut Cx::server(), b).await.unwrap();
        assert_eq!(down.closes.load(Ordering::SeqCst), 2);
        assert_eq!(bridges(&ns).await, []);
        for name in ["a-up", "a-dn", "b-up", "b-dn"] {
            assert!(link(&ns, name).await.is_some(), "{name}");
        }
        // The keeping tasks are gone: a re-created interface stays out of any bridge.
        nl.delete_link(&IfName::new("a-up").unwrap()).await.unwrap();
        add_dummy(&ns, "a-up").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(bridges(&ns).await, []);
    }
}
