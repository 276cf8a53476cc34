//! The VXLAN remote mechanism in the forwarders: a KERNEL client on one node reaches a
//! KERNEL endpoint on another through a VXLAN device in each pod.
//!
//! The remote path is `nsc → nsmgr1 → fwd1 → nsmgr2 → fwd2 → nse`. Each forwarder
//! makes its own pod's end; the mechanism between the two forwarders carries the
//! tunnel (docs/KERNEL.md 3):
//!
//! - **fwd1** (the client's node) serves KERNEL to the client and, in its client chain,
//!   [`vxlan_forwarder_client`] offers `{cls: REMOTE, type: VXLAN, src_ip, src_port,
//!   MTU}` next to the KERNEL preference of the kernel handler. nsmgr2's
//!   `filter_mechanisms` keeps only the VXLAN one.
//! - **fwd2** (the endpoint's node) serves VXLAN with [`vxlan_forwarder_server`]: it sets
//!   `dst_ip`/`dst_port`, picks the VNI (unique on the node, NSM's parity rule, kept
//!   across refreshes) and the MTU (the smaller of the two tunnel MTUs), then its
//!   client chain asks the local endpoint for KERNEL and, when it answers,
//!   [`vxlan_forwarder_client`] creates the VXLAN device in the **endpoint's** pod
//!   (`local` = fwd2's tunnel IP, `remote` = `src_ip`).
//! - Back in fwd1, the answer's VXLAN mechanism makes [`vxlan_forwarder_client`] create
//!   the device in the **client's** pod (`local` = fwd1's tunnel IP, `remote` =
//!   `dst_ip`); the kernel handler beside it leaves a REMOTE answer alone.
//!
//! Each device is created by a netlink socket of its node's namespace directly inside
//! the pod ([`vxlan_up`](crate::vxlan_up)), so its UDP socket stays on the node's
//! underlay; it is programmed from the connection context like a veth end
//! ([`end_plan`], the alias naming the connection as [`veth_alias`] does).
//!
//! **Neighbours.** As with a veth pair, each pod gets a permanent neighbour entry for
//! every address of the other end (learnt entries count against the node-wide
//! `gc_thresh3`, docs/KERNEL.md §8), which needs the other device's hardware address.
//! Each forwarder says what its own pod's device has, in parameters of this SDK that
//! NSM does not define ([`SRC_MAC`] in the request, [`DST_MAC`] in the answer): the
//! client's device gets an address derived from the connection ([`client_mac`]) so
//! fwd1 can name it before the device exists, the endpoint's device the one of its
//! plan ([`stable_mac`](nsm_sdk_kernel::stable_mac) of its first address), kept for
//! its life. A forwarder of another implementation sends neither and ignores them: its
//! peer then gets no entries and the pods learn by ARP/ND as before.
//!
//! **VNI clashes.** The kernel refuses a second device with one VNI on one port in a
//! namespace (`EEXIST`, [`Error::VniClash`](crate::Error::VniClash)). On the endpoint's
//! node, fwd2 marks the VNI reserved and takes another itself; the final VNI reaches
//! the answer. On the client's node, fwd1 re-requests (at most
//! [`CLIENT_CLASH_RETRIES`] times) with `vni` cleared, which fwd2 reads as "the client
//! could not use it" and answers with another. Neither is an error for the user.
//! fwd1 also records the VNIs of its client-side devices in the node's allocator, so
//! its own server side never hands them out.
//!
//! [`forwarder_mechanisms`] adds NOOP beside them (and makes the tunnel optional), for
//! a mesh where some clients or endpoints cannot make kernel interfaces.
//!
//! ```no_run
//! use nsm_sdk::chains::{forwarder, ForwarderOptions};
//! use nsm_sdk_vxlan::mechanism::{vxlan_forwarder_mechanisms, Tunnel};
//! # async fn demo(nsmgr: nsm_sdk::transport::Url) -> nsm_sdk_vxlan::Result<()> {
//! let tunnel = Tunnel::builder("192.0.2.1".parse().unwrap()).build().await?;
//! let (server, client_side) = vxlan_forwarder_mechanisms(tunnel);
//! let fwd = forwarder(
//!     ForwarderOptions::new("forwarder", nsmgr)
//!         .server_mechanisms(server)
//!         .client_mechanisms(client_side),
//! );
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod server;
pub mod tunnel;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub use client::{vxlan_forwarder_client, VxlanForwarderClient, CLIENT_CLASH_RETRIES};
pub use server::{vxlan_forwarder_server, VxlanForwarderServer};
pub use tunnel::{Tunnel, TunnelBuilder};

use nsm_sdk_kernel::parse_mac;

use nsm_sdk::handlers::{mechanisms, noop_client, noop_server, Mechanisms};
use nsm_sdk::proto::connection::{Connection, Mechanism};
use nsm_sdk::wire::{cls, types};
use nsm_sdk::Handler;
use nsm_sdk_kernel::mechanism::{end_plan, kernel_forwarder_client, kernel_forwarder_server};
use nsm_sdk_kernel::{plan_from_context, veth_alias, with_peer_neighbours, Mtu};

use crate::vni::Vni;

/// Mechanism parameter of NAT-aware setups: the client node's address before NAT,
/// used instead of `src_ip` for the VNI parity when present.
pub const ORIG_SRC_IP: &str = "orig_src_ip";
/// Mechanism parameter of NAT-aware setups: the server node's address before NAT,
/// used instead of `dst_ip` for the VNI parity when present.
pub const ORIG_DST_IP: &str = "orig_dst_ip";

/// Mechanism parameter of this SDK (not NSM's): the hardware address of the VXLAN
/// device in the client's pod, set by the client's node (`aa:bb:cc:dd:ee:ff`).
pub const SRC_MAC: &str = "nsm-rs.src_mac";
/// Mechanism parameter of this SDK (not NSM's): the hardware address of the VXLAN
/// device in the endpoint's pod, set by the endpoint's node in its answer.
pub const DST_MAC: &str = "nsm-rs.dst_mac";

/// The hardware address of the client's VXLAN device of the connection named `key`
/// (the first path segment's id): locally administered unicast `06:` followed by five
/// bytes of the key's FNV-1a hash. Derived from the connection and not from its
/// addresses (unlike [`stable_mac`](nsm_sdk_kernel::stable_mac), whose `02:fe:`
/// space it never meets), because the client's node names it in its first request,
/// before the endpoint gave any address; the same connection gets the same one after
/// a heal or a forwarder restart.
pub fn client_mac(key: &str) -> [u8; 6] {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let h = key
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
        .to_be_bytes();
    [0x06, h[0], h[1], h[2], h[3], h[4]]
}

/// A forwarder's KERNEL and VXLAN mechanisms on the node of `tunnel`: the server-side
/// dispatcher (KERNEL for local pods, VXLAN for another node's forwarder) and the
/// client-side handlers (the kernel one, which makes veth pairs to local endpoints,
/// then the VXLAN one), for `ForwarderOptions::server_mechanisms` and
/// `client_mechanisms`.
pub fn vxlan_forwarder_mechanisms(tunnel: Tunnel) -> (Mechanisms, Vec<Arc<dyn Handler>>) {
    (
        mechanisms()
            .with(types::KERNEL, kernel_forwarder_server())
            .with(types::VXLAN, vxlan_forwarder_server(tunnel.clone())),
        vec![
            Arc::new(kernel_forwarder_client()),
            Arc::new(vxlan_forwarder_client(tunnel)),
        ],
    )
}

/// A forwarder's mechanisms with NOOP beside them: KERNEL (the handlers of
/// [`kernel_forwarder_mechanisms`](nsm_sdk_kernel::kernel_forwarder_mechanisms)) and
/// NOOP, plus VXLAN ([`vxlan_forwarder_mechanisms`]) when this node has a `tunnel`, as
/// server-side dispatcher and client-side handlers for
/// `ForwarderOptions::server_mechanisms` and `client_mechanisms`.
///
/// On the way to the endpoint a KERNEL connection offers KERNEL (then VXLAN with a
/// tunnel) then NOOP, a NOOP one NOOP only; another node's manager keeps only the
/// VXLAN offer. A KERNEL attempt that fails retryably (an endpoint that answers NOOP,
/// say) makes the server side fall back to the caller's next preference.
pub fn forwarder_mechanisms(tunnel: Option<Tunnel>) -> (Mechanisms, Vec<Arc<dyn Handler>>) {
    let mut client: Vec<Arc<dyn Handler>> = vec![Arc::new(kernel_forwarder_client())];
    let mut server = mechanisms()
        .with(types::KERNEL, kernel_forwarder_server())
        .with(types::NOOP, noop_server());
    if let Some(tunnel) = tunnel {
        client.push(Arc::new(vxlan_forwarder_client(tunnel.clone())));
        server = server.with(types::VXLAN, vxlan_forwarder_server(tunnel));
    }
    client.push(Arc::new(noop_client()));
    (server, client)
}

/// The VXLAN preference of a client-side forwarder: `{cls: REMOTE, type: VXLAN}` with
/// no parameters.
pub fn vxlan_mechanism() -> Mechanism {
    Mechanism {
        cls: cls::REMOTE.to_string(),
        r#type: types::VXLAN.to_string(),
        ..Default::default()
    }
}

fn is_vxlan(m: &Mechanism) -> bool {
    m.r#type == types::VXLAN
}

fn is_kernel(m: &Mechanism) -> bool {
    m.r#type == types::KERNEL
}

fn param<'a>(m: &'a Mechanism, key: &str) -> Option<&'a str> {
    m.parameters
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// A mechanism parameter that is missing or does not parse, named in the message.
#[derive(Debug)]
struct BadParam(String);

fn required<T>(m: &Mechanism, key: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T, BadParam> {
    optional(m, key, parse)?.ok_or_else(|| BadParam(format!("the VXLAN mechanism has no {key}")))
}

fn optional<T>(
    m: &Mechanism,
    key: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, BadParam> {
    match param(m, key) {
        None => Ok(None),
        Some(s) => parse(s)
            .map(Some)
            .ok_or_else(|| BadParam(format!("VXLAN mechanism {key} {s:?} is not valid"))),
    }
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse().ok().filter(|p| *p != 0)
}

fn parse_mtu(s: &str) -> Option<Mtu> {
    s.parse().ok().and_then(|n| Mtu::new(n).ok())
}

fn parse_vni(s: &str) -> Option<Vni> {
    Vni::parse(s).ok()
}

/// Sets `key` to `mac`, or removes it without one.
fn set_mac(m: &mut Mechanism, key: &str, mac: Option<[u8; 6]>) {
    match mac {
        Some(mac) => set(m, key, nsm_sdk_kernel::fmt_mac(&mac)),
        None => {
            m.parameters.remove(key);
        }
    }
}

fn set(m: &mut Mechanism, key: &str, value: impl ToString) {
    m.parameters.insert(key.to_string(), value.to_string());
}

/// The smaller of two MTUs.
fn min_mtu(a: Mtu, b: Option<Mtu>) -> Mtu {
    match b {
        Some(b) if b.get() < a.get() => b,
        _ => a,
    }
}

/// Lowers `conn`'s `context.MTU` to `mtu` (sets it when absent); returns the result.
fn lower_context_mtu(conn: &mut Connection, mtu: Mtu) -> u32 {
    let ctx = conn.context.get_or_insert_with(Default::default);
    if ctx.mtu == 0 || ctx.mtu > mtu.get() {
        ctx.mtu = mtu.get();
    }
    ctx.mtu
}

/// What names the connection in the aliases of its devices: the id of the first path
/// segment (the client's own, the same on both nodes), else the connection id — as the
/// kernel mechanism names its veth ends.
fn connection_key(conn: &Connection) -> &str {
    conn.path
        .as_ref()
        .and_then(|p| p.path_segments.first())
        .map(|s| s.id.as_str())
        .filter(|id| !id.is_empty())
        .unwrap_or(&conn.id)
}

/// The remote end of a VXLAN connection, from fwd2's server handler to its client
/// chain (a per-call value in [`Cx::ext`](nsm_sdk::Cx::ext)). The VNI can change on
/// the way (a clash in the endpoint's pod): the server handler reads it back after the
/// endpoint answered and puts it in its own answer.
#[derive(Clone, Debug)]
struct RemoteEnd(Arc<RemoteEndInner>);

#[derive(Debug)]
struct RemoteEndInner {
    /// The allocator key: the server-side connection id.
    key: String,
    /// The client node's tunnel IP (`src_ip`).
    peer: IpAddr,
    /// The agreed tunnel MTU.
    mtu: Mtu,
    vni: Mutex<Vni>,
    /// The hardware address of the client's device ([`SRC_MAC`]), when told.
    peer_mac: Option<[u8; 6]>,
    /// The hardware address of the endpoint's device, once it is up.
    own_mac: Mutex<Option<[u8; 6]>>,
}

impl RemoteEnd {
    fn new(key: String, peer: IpAddr, mtu: Mtu, vni: Vni, peer_mac: Option<[u8; 6]>) -> RemoteEnd {
        RemoteEnd(Arc::new(RemoteEndInner {
            key,
            peer,
            mtu,
            vni: Mutex::new(vni),
            peer_mac,
            own_mac: Mutex::new(None),
        }))
    }
    fn own_mac(&self) -> Option<[u8; 6]> {
        *self.0.own_mac.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set_own_mac(&self, mac: Option<[u8; 6]>) {
        *self.0.own_mac.lock().unwrap_or_else(|p| p.into_inner()) = mac;
    }
    fn vni(&self) -> Vni {
        *self.0.vni.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set_vni(&self, vni: Vni) {
        *self.0.vni.lock().unwrap_or_else(|p| p.into_inner()) = vni;
    }
}

/// The plan of a pod's end: [`end_plan`] plus the connection's alias and, unless the
/// end is bridged, a permanent neighbour entry on `peer_mac` (the other device's
/// hardware address, when known) for each address of the other end.
fn pod_plan(
    conn: &Connection,
    side: nsm_sdk_kernel::PodSide,
    ifname: &str,
    bridged: bool,
    peer_mac: Option<[u8; 6]>,
) -> nsm_sdk::Result<nsm_sdk_kernel::Plan> {
    let ctx = conn.context.clone().unwrap_or_default();
    let plan =
        end_plan(&ctx, side, ifname, bridged)?.with_alias(veth_alias(side, connection_key(conn)));
    if bridged || peer_mac.is_none() {
        return Ok(plan);
    }
    let other = match side {
        nsm_sdk_kernel::PodSide::Client => nsm_sdk_kernel::PodSide::Endpoint,
        nsm_sdk_kernel::PodSide::Endpoint => nsm_sdk_kernel::PodSide::Client,
    };
    let peer = plan_from_context(&ctx, other, ifname)?;
    Ok(with_peer_neighbours(plan, &peer, peer_mac))
}
