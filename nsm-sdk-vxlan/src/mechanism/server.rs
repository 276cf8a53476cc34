//! [`vxlan_forwarder_server`]: the server side of VXLAN in the forwarder of the
//! endpoint's node (fwd2), under the forwarder's server `mechanisms()`.
//!
//! What it does: reads the client node's `src_ip` and `src_port` and the optional `MTU`
//! from the incoming VXLAN mechanism; sets `dst_ip`/`dst_port` to this node's tunnel;
//! picks the VNI from the node's [`VniAllocator`](crate::VniAllocator) with NSM's
//! parity rule (`orig_src_ip`/`orig_dst_ip` when present, [`parity_for`]); sets `MTU`
//! to the smaller of the client's and this node's tunnel MTU and lowers `context.MTU`
//! to it; and hands the remote end (peer IP, VNI, MTU) to the client chain through
//! [`Cx::ext`](nsm_sdk::Cx::ext), where [`vxlan_forwarder_client`](super::vxlan_forwarder_client)
//! makes the endpoint's device (with the client device's hardware address, [`SRC_MAC`],
//! when the client's node said it). After the endpoint answered it writes the VNI the
//! client chain settled on (another one after a clash in the endpoint's pod) and the
//! hardware address of the endpoint's device ([`DST_MAC`]) into its answer.
//!
//! The VNI of a connection is kept across refreshes: the same connection gets the same
//! VNI back; a request that carries a VNI (a refresh, or a heal after this forwarder
//! restarted) keeps it when it is free or already this connection's and of the right
//! parity, else gets a new one. A refresh whose `vni` is empty while the connection
//! had one means the client's node could not create its device with it (the kernel
//! refused the VNI there): that VNI is reserved on this node for good and another one
//! picked.
//!
//! State: the VNIs in the node's allocator, keyed by this hop's connection id; per
//! connection (needs `begin`), whether the connection was established.
//!
//! Failure handled: a missing or malformed `src_ip`, `src_port`, `MTU`, `vni` or
//! [`SRC_MAC`], a
//! `src_port` other than this node's port (a kernel VXLAN device sends to and listens
//! on one port) or a `src_ip` of another address family is InvalidArgument naming the
//! parameter, before anything is allocated. A failed first request frees the VNI;
//! Close frees it after the rest of the chain (the endpoint's device) is gone.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use nsm_sdk::handlers::select_mechanism;
use nsm_sdk::proto::connection::{Connection, Mechanism};
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::wire::{params, types};
use nsm_sdk::{async_trait, Cx, Handler, Next, Result};
use tracing::{debug, warn};

use super::{
    is_vxlan, lower_context_mtu, min_mtu, optional, parse_ip, parse_mac, parse_mtu, parse_port,
    parse_vni, required, set, set_mac, BadParam, RemoteEnd, Tunnel, DST_MAC, ORIG_DST_IP,
    ORIG_SRC_IP, SRC_MAC,
};
use crate::error::Error;
use crate::vni::{parity_for, Parity, Vni};

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct VxlanForwarderServer {
    tunnel: Tunnel,
}

/// The server side of VXLAN on the node of `tunnel`; see the [module docs](self).
pub fn vxlan_forwarder_server(tunnel: Tunnel) -> VxlanForwarderServer {
    VxlanForwarderServer { tunnel }
}

/// Whether this hop's connection was established (its VNI is then kept on a failed
/// refresh).
#[derive(Debug, Default)]
struct Established(AtomicBool);

fn invalid(e: BadParam) -> nsm_sdk::Error {
    nsm_sdk::Error::invalid(e.0)
}

/// What the client's side of the mechanism says.
struct Offer {
    src_ip: IpAddr,
    src_mac: Option<[u8; 6]>,
    mtu: Option<nsm_sdk_kernel::Mtu>,
    vni: Option<Vni>,
    parity: Parity,
}

impl VxlanForwarderServer {
    fn read(&self, m: &Mechanism) -> Result<Offer> {
        let src_ip = required(m, params::SRC_IP, parse_ip).map_err(invalid)?;
        let src_port = required(m, params::SRC_PORT, parse_port).map_err(invalid)?;
        let mtu = optional(m, params::MTU, parse_mtu).map_err(invalid)?;
        let vni = optional(m, params::VNI, parse_vni).map_err(invalid)?;
        let src_mac = optional(m, SRC_MAC, parse_mac).map_err(invalid)?;
        let own = self.tunnel.ip();
        if src_ip.is_ipv4() != own.is_ipv4() {
            return Err(nsm_sdk::Error::invalid(format!(
                "VXLAN mechanism src_ip {src_ip} is not of the family of this node's tunnel IP {own}"
            )));
        }
        if src_port != self.tunnel.port() {
            return Err(nsm_sdk::Error::invalid(format!(
                "VXLAN mechanism src_port {src_port} differs from this node's port {}: a kernel \
                 VXLAN device sends to and listens on one port",
                self.tunnel.port()
            )));
        }
        let orig_src = optional(m, ORIG_SRC_IP, parse_ip).map_err(invalid)?;
        let orig_dst = optional(m, ORIG_DST_IP, parse_ip).map_err(invalid)?;
        let parity = parity_for(orig_src.unwrap_or(src_ip), orig_dst.unwrap_or(own));
        Ok(Offer {
            src_ip,
            src_mac,
            mtu,
            vni,
            parity,
        })
    }

    /// The connection's VNI; see the [module docs](self).
    fn choose_vni(&self, key: &str, offer: &Offer) -> crate::Result<Vni> {
        let alloc = self.tunnel.allocator();
        match offer.vni {
            Some(vni) if vni.parity() == offer.parity => match alloc.adopt(key, vni) {
                Ok(()) => Ok(vni),
                Err(Error::VniTaken { holder, .. }) => {
                    warn!(%vni, %holder, "the requested VNI is taken on this node, picking another");
                    alloc.allocate(key, offer.parity)
                }
                Err(e) => Err(e),
            },
            Some(vni) => {
                warn!(%vni, parity = ?offer.parity, "the requested VNI has the wrong parity, picking another");
                alloc.allocate(key, offer.parity)
            }
            None => match alloc.get(key) {
                Some(old) if old.parity() == offer.parity => {
                    warn!(vni = %old, "the client's node could not use the VNI, picking another");
                    alloc.reserve_after_clash(key, old)
                }
                _ => alloc.allocate(key, offer.parity),
            },
        }
    }
}

#[async_trait]
impl Handler for VxlanForwarderServer {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let established = cx
            .conn()
            .map(|h| h.state::<Established>())
            .ok_or_else(|| nsm_sdk::Error::internal("vxlan forwarder server needs `begin`"))?;
        let offer = self.read(select_mechanism(
            &mut req,
            types::VXLAN,
            "vxlan forwarder server",
        )?)?;
        let conn = req.connection.get_or_insert_with(Default::default);
        let key = conn.id.clone();
        let first = !established.0.load(Ordering::SeqCst);
        let mtu = min_mtu(self.tunnel.mtu(), offer.mtu);
        let vni = self.choose_vni(&key, &offer)?;
        if let Some(m) = conn.mechanism.as_mut() {
            set(m, params::DST_IP, self.tunnel.ip());
            set(m, params::DST_PORT, self.tunnel.port());
            set(m, params::VNI, vni);
            set(m, params::MTU, mtu.get());
        }
        lower_context_mtu(conn, mtu);
        debug!(src_ip = %offer.src_ip, %vni, mtu = mtu.get(), "remote side of VXLAN");
        let remote = RemoteEnd::new(key.clone(), offer.src_ip, mtu, vni, offer.src_mac);
        cx.ext_mut().insert(remote.clone());
        match next.request(cx, req).await {
            Ok(mut out) => {
                let vni = remote.vni();
                if let Some(m) = out.mechanism.as_mut().filter(|m| is_vxlan(m)) {
                    set(m, params::VNI, vni);
                    set(m, params::MTU, mtu.get());
                    set_mac(m, DST_MAC, remote.own_mac());
                }
                lower_context_mtu(&mut out, mtu);
                established.0.store(true, Ordering::SeqCst);
                Ok(out)
            }
            Err(e) => {
                if first {
                    self.tunnel.allocator().free(&key);
                }
                Err(e)
            }
        }
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let key = conn.id.clone();
        let rest = next.close(cx, conn).await;
        // After the endpoint's device is gone: the kernel holds the VNI until then.
        self.tunnel.allocator().free(&key);
        rest
    }
}
