//! [`vxlan_forwarder_client`]: the VXLAN device of one pod, made in a forwarder's client
//! chain (after `mechanism_translation`, next to the kernel handler).
//!
//! What it does, in the two places a VXLAN connection passes a forwarder:
//!
//! - **The client's node** (the forwarder's server side is KERNEL: the client's end,
//!   [`KernelClientEnd`], is in [`Cx::ext`]): offers `{cls: REMOTE, type: VXLAN,
//!   src_ip, src_port, MTU}` with this node's tunnel (on a refresh it updates those
//!   parameters of the established mechanism). When the answer's mechanism is VXLAN, it
//!   creates the device in the client's pod — `local` = this node's tunnel IP, `remote`
//!   = `dst_ip`, the answer's `vni`, the smaller of the two tunnel MTUs — programmed
//!   from the answered context for [`PodSide::Client`], and lowers `context.MTU` to the
//!   tunnel MTU. The device's hardware address is [`client_mac`] of the connection,
//!   offered as [`SRC_MAC`]; with the answer's [`DST_MAC`] the pod gets permanent
//!   neighbour entries for the endpoint's addresses. The VNI is recorded in the node's allocator under this hop's
//!   connection id. An answer of another mechanism (a local endpoint answered KERNEL)
//!   is left to the kernel handler.
//! - **The endpoint's node** (the server side is VXLAN: the remote end from
//!   [`vxlan_forwarder_server`](super::vxlan_forwarder_server) is in `Cx::ext`): offers
//!   an empty KERNEL preference to the local endpoint and, when it answers KERNEL,
//!   creates the device in the endpoint's pod (`local` = this node's tunnel IP,
//!   `remote` = `src_ip`), programmed for [`PodSide::Endpoint`] (an end whose mechanism
//!   says `bridged` gets name and MTU only), with permanent neighbour entries for the
//!   client's addresses when the request said [`SRC_MAC`]; its hardware address goes
//!   back as [`DST_MAC`].
//!
//! A refresh brings the device to the new plan ([`VxlanLink::refresh`](crate::VxlanLink::refresh));
//! a changed VNI, peer, MTU, pod or interface name deletes it and makes a new one, and
//! so does a device that is gone. Close deletes it while passing the Close on (the two
//! are independent, and a deletion waits for the kernel), then frees the client-side
//! VNI record.
//!
//! State: per connection of the client chain (needs `begin` there), the device and,
//! on the client's node, the allocator key it recorded.
//!
//! Failure handled: a VNI clash (the kernel's `EEXIST`) in the client's pod marks the
//! VNI reserved on this node and re-requests at most [`CLIENT_CLASH_RETRIES`] times with
//! `vni` cleared, so the server side picks another; a VNI the allocator already knows
//! as taken is treated the same way before the kernel is asked. A clash in the
//! endpoint's pod makes this node reserve the VNI and take another itself (the server
//! handler puts it in the answer). A malformed answer is Internal. When a first request
//! fails after the next hop answered, the next hop's connection is closed again and
//! the VNI record dropped, so nothing is left anywhere; a failed refresh keeps what
//! works.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::wire::params;
use nsm_sdk::{async_trait, Cx, Handler, Next, Result};
use nsm_sdk_kernel::mechanism::{is_bridged, kernel_mechanism, KernelClientEnd};
use nsm_sdk_kernel::{Error as KernelError, IfName, NetNs, Plan, PodSide};
use tracing::{debug, info, warn};

use super::tunnel::Device;
use super::{
    client_mac, connection_key, is_kernel, is_vxlan, lower_context_mtu, min_mtu, optional, param,
    parse_ip, parse_mac, parse_mtu, parse_port, parse_vni, pod_plan, required, set, set_mac,
    vxlan_mechanism, RemoteEnd, Tunnel, DST_MAC, SRC_MAC,
};
use crate::error::Error;
use crate::link::VxlanSpec;
use crate::vni::Vni;

/// How often the client's node asks the server side for another VNI after a clash in
/// the client's pod before the request fails (Unavailable).
pub const CLIENT_CLASH_RETRIES: usize = 2;

/// How often the endpoint's node picks another VNI itself after a clash.
const ENDPOINT_CLASH_RETRIES: usize = 8;

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct VxlanForwarderClient {
    tunnel: Tunnel,
}

/// The pod ends of VXLAN on the node of `tunnel`; see the [module docs](self).
pub fn vxlan_forwarder_client(tunnel: Tunnel) -> VxlanForwarderClient {
    VxlanForwarderClient { tunnel }
}

/// Which pod (namespace device and inode) and interface a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EndId {
    dev: u64,
    ino: u64,
    ifname: IfName,
}

#[derive(Debug)]
struct Held {
    device: Box<dyn Device>,
    end: EndId,
}

/// The device of one connection; `begin` runs one operation per connection at a time,
/// so taking it out for an operation and putting it back cannot race.
#[derive(Debug, Default)]
struct DeviceSlot {
    held: Mutex<Option<Held>>,
    /// The key under which the client's node recorded the VNI in its allocator.
    recorded: Mutex<Option<String>>,
    established: AtomicBool,
}

impl DeviceSlot {
    fn take(&self) -> Option<Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
    fn put(&self, held: Held) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(held);
    }
    /// The hardware address the connection's device was born with.
    fn mac(&self) -> Option<[u8; 6]> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|h| h.device.mac())
    }
    fn set_recorded(&self, key: Option<String>) -> Option<String> {
        std::mem::replace(
            &mut *self.recorded.lock().unwrap_or_else(|p| p.into_inner()),
            key,
        )
    }
}

/// Why making the device failed: a VNI clash, or anything else.
enum Failure {
    Clash(Vni),
    Other(nsm_sdk::Error),
}

impl From<nsm_sdk::Error> for Failure {
    fn from(e: nsm_sdk::Error) -> Failure {
        Failure::Other(e)
    }
}

fn bad_answer(what: String) -> nsm_sdk::Error {
    nsm_sdk::Error::internal(format!("the remote forwarder's answer: {what}"))
}

impl VxlanForwarderClient {
    /// Makes, refreshes or replaces the connection's device in `pod`.
    async fn place(
        &self,
        slot: &DeviceSlot,
        pod: &NetNs,
        spec: VxlanSpec,
        plan: Plan,
    ) -> crate::Result<()> {
        let end = EndId {
            dev: pod.dev(),
            ino: pod.inode(),
            ifname: plan.ifname().clone(),
        };
        match slot.take() {
            Some(mut held) if held.end == end && held.device.spec() == &spec => {
                match held.device.refresh(plan.clone()).await {
                    Ok(()) => {
                        slot.put(held);
                        return Ok(());
                    }
                    Err(Error::Kernel(KernelError::LinkNotFound { name, netns })) => {
                        warn!(%name, %netns, "the VXLAN device is gone, making a new one");
                        if let Err(e) = held.device.down().await {
                            warn!(error = %e, "deleting what is left of the old device failed");
                        }
                    }
                    Err(e) => {
                        slot.put(held);
                        return Err(e);
                    }
                }
            }
            Some(held) => {
                info!(
                    old = ?held.device.spec(), new = ?spec, ifname = %end.ifname,
                    "the tunnel or the pod of the connection changed, replacing its VXLAN device"
                );
                if let Err(e) = held.device.down().await {
                    warn!(error = %e, "deleting the old VXLAN device failed");
                }
            }
            None => {}
        }
        let device = self.tunnel.devices().up(pod, &spec, plan).await?;
        slot.put(Held { device, end });
        Ok(())
    }

    /// Deletes the connection's device, if it has one.
    async fn remove(&self, slot: &DeviceSlot) -> crate::Result<()> {
        match slot.take() {
            Some(held) => held.device.down().await,
            None => Ok(()),
        }
    }

    /// Drops the client-side VNI record of the connection.
    fn forget(&self, slot: &DeviceSlot) {
        if let Some(key) = slot.set_recorded(None) {
            self.tunnel.allocator().free(&key);
        }
    }

    /// The client's node: the device in the client's pod for the answer `out`.
    async fn client_end_up(
        &self,
        end: &KernelClientEnd,
        key: &str,
        out: &mut Connection,
        slot: &DeviceSlot,
    ) -> Result<(), Failure> {
        let Some(m) = out.mechanism.as_ref() else {
            return Err(bad_answer("no mechanism".into()).into());
        };
        let dst_ip = required(m, params::DST_IP, parse_ip).map_err(|e| bad_answer(e.0))?;
        let dst_port = optional(m, params::DST_PORT, parse_port).map_err(|e| bad_answer(e.0))?;
        let vni = required(m, params::VNI, parse_vni).map_err(|e| bad_answer(e.0))?;
        let answered_mtu = optional(m, params::MTU, parse_mtu).map_err(|e| bad_answer(e.0))?;
        let dst_mac = optional(m, DST_MAC, parse_mac).map_err(|e| bad_answer(e.0))?;
        if dst_port.is_some_and(|p| p != self.tunnel.port()) {
            return Err(bad_answer(format!(
                "dst_port {dst_port:?} differs from this node's port {}",
                self.tunnel.port()
            ))
            .into());
        }
        if dst_ip.is_ipv4() != self.tunnel.ip().is_ipv4() {
            return Err(bad_answer(format!("dst_ip {dst_ip} is of another address family")).into());
        }
        let alloc = self.tunnel.allocator();
        match alloc.adopt(key, vni) {
            Ok(()) => {
                slot.set_recorded(Some(key.to_string()));
            }
            Err(Error::VniTaken { holder, .. }) => {
                debug!(%vni, %holder, "the answered VNI is taken on this node");
                return Err(Failure::Clash(vni));
            }
            Err(e) => return Err(nsm_sdk::Error::from(e).into()),
        }
        let mtu = min_mtu(self.tunnel.mtu(), answered_mtu);
        lower_context_mtu(out, mtu);
        let mut plan = pod_plan(
            out,
            PodSide::Client,
            end.ifname().as_str(),
            end.bridged(),
            dst_mac,
        )?;
        if let Some(mac) = own_mac(end, out) {
            plan = plan.with_mac(mac);
        }
        let spec = VxlanSpec::new(vni, self.tunnel.ip(), dst_ip, mtu).with_port(self.tunnel.port());
        match self.place(slot, end.netns(), spec, plan).await {
            Ok(()) => Ok(()),
            Err(Error::VniClash { vni: clashed, .. }) => {
                // Another device of this node has it: never again from here.
                if let Ok(v) = Vni::new(clashed) {
                    alloc.reserve(v);
                }
                slot.set_recorded(None);
                Err(Failure::Clash(vni))
            }
            Err(e) => Err(nsm_sdk::Error::from(e).into()),
        }
    }

    /// The client's node; see the [module docs](self).
    async fn client_side(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
        end: KernelClientEnd,
    ) -> Result<Connection> {
        let slot = slot(cx)?;
        let conn = req.connection.get_or_insert_with(Default::default);
        let key = conn.id.clone();
        let ctx_mtu = conn
            .context
            .as_ref()
            .and_then(|c| nsm_sdk_kernel::Mtu::new(c.mtu).ok());
        let offer_mtu = min_mtu(min_mtu(self.tunnel.mtu(), end.mtu()), ctx_mtu);
        let mac = own_mac(&end, conn);
        match conn.mechanism.as_mut() {
            Some(m) if is_vxlan(m) => self.fill_offer(m, offer_mtu, mac),
            Some(_) => {}
            None => {
                if !req.mechanism_preferences.iter().any(is_vxlan) {
                    let mut m = vxlan_mechanism();
                    self.fill_offer(&mut m, offer_mtu, mac);
                    req.mechanism_preferences.push(m);
                }
            }
        }
        let first = !slot.established.load(Ordering::SeqCst);
        let mut out = next.clone().request(cx, req).await?;
        let mut clashes = 0;
        loop {
            if !out.mechanism.as_ref().is_some_and(is_vxlan) {
                // Not a tunnel: a local endpoint answered, the kernel handler makes the
                // pair. A tunnel this connection had before is not needed any more.
                if let Err(e) = self.remove(&slot).await {
                    warn!(error = %e, "deleting the connection's old VXLAN device failed");
                }
                self.forget(&slot);
                return Ok(out);
            }
            let err = match self.client_end_up(&end, &key, &mut out, &slot).await {
                Ok(()) => {
                    slot.established.store(true, Ordering::SeqCst);
                    return Ok(out);
                }
                Err(Failure::Clash(vni)) if clashes < CLIENT_CLASH_RETRIES => {
                    clashes += 1;
                    warn!(%vni, attempt = clashes, "VNI clash in the client's pod, asking the remote side for another");
                    let mut again = out.clone();
                    if let Some(m) = again.mechanism.as_mut() {
                        set(m, params::VNI, "");
                    }
                    let retry = NetworkServiceRequest {
                        connection: Some(again),
                        mechanism_preferences: Vec::new(),
                    };
                    match next.clone().request(cx, retry).await {
                        Ok(o) => {
                            out = o;
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Err(Failure::Clash(vni)) => nsm_sdk::Error::from(Error::VniClash {
                    vni: vni.get(),
                    port: self.tunnel.port(),
                    netns: self.tunnel.netns().to_string(),
                }),
                Err(Failure::Other(e)) => e,
            };
            if first {
                self.undo_first(cx, &next, &slot, out).await;
            }
            return Err(err);
        }
    }

    fn fill_offer(
        &self,
        m: &mut nsm_sdk::proto::connection::Mechanism,
        mtu: nsm_sdk_kernel::Mtu,
        mac: Option<[u8; 6]>,
    ) {
        set(m, params::SRC_IP, self.tunnel.ip());
        set(m, params::SRC_PORT, self.tunnel.port());
        set(m, params::MTU, mtu.get());
        set_mac(m, SRC_MAC, mac);
    }

    /// A failed first request leaves nothing behind: the device and the VNI record go,
    /// and the next hop's connection is closed again.
    async fn undo_first(&self, cx: &mut Cx, next: &Next, slot: &DeviceSlot, out: Connection) {
        if let Err(e) = self.remove(slot).await {
            warn!(error = %e, "deleting the VXLAN device after a failed request failed");
        }
        self.forget(slot);
        if let Err(ce) = next.clone().close(cx, out).await {
            debug!(error = %ce, "closing the next hop after a failed request failed");
        }
    }

    /// The endpoint's node: the device in the endpoint's pod for the answer `out`.
    async fn endpoint_end_up(
        &self,
        remote: &RemoteEnd,
        out: &mut Connection,
        slot: &DeviceSlot,
    ) -> Result<()> {
        let m = out.mechanism.as_ref().filter(|m| is_kernel(m)).ok_or_else(|| {
            nsm_sdk::Error::internal(format!(
                "the endpoint answered with mechanism {:?}; a VXLAN tunnel ends in a KERNEL interface",
                out.mechanism.as_ref().map(|m| m.r#type.as_str())
            ))
        })?;
        let name = param(m, params::NAME).ok_or_else(|| {
            nsm_sdk::Error::internal("the endpoint's KERNEL mechanism has no interface name")
        })?;
        let url = param(m, params::INODE_URL).ok_or_else(|| {
            nsm_sdk::Error::internal("the endpoint's KERNEL mechanism has no inodeURL")
        })?;
        let (ifname, bridged) = (name.to_string(), is_bridged(m));
        let pod = NetNs::from_url(url)?;
        lower_context_mtu(out, remote.0.mtu);
        let plan = pod_plan(out, PodSide::Endpoint, &ifname, bridged, remote.0.peer_mac)?;
        let mut clashes = 0;
        loop {
            let vni = remote.vni();
            let spec = VxlanSpec::new(vni, self.tunnel.ip(), remote.0.peer, remote.0.mtu)
                .with_port(self.tunnel.port());
            match self.place(slot, &pod, spec, plan.clone()).await {
                Ok(()) => {
                    remote.set_own_mac(slot.mac());
                    return Ok(());
                }
                Err(Error::VniClash { .. }) if clashes < ENDPOINT_CLASH_RETRIES => {
                    clashes += 1;
                    let new = self
                        .tunnel
                        .allocator()
                        .reserve_after_clash(&remote.0.key, vni)?;
                    warn!(clashed = %vni, %new, "VNI clash in the endpoint's pod, moved on");
                    remote.set_vni(new);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The endpoint's node; see the [module docs](self).
    async fn endpoint_side(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
        remote: RemoteEnd,
    ) -> Result<Connection> {
        let slot = slot(cx)?;
        let conn = req.connection.get_or_insert_with(Default::default);
        if conn.mechanism.is_none() && !req.mechanism_preferences.iter().any(is_kernel) {
            req.mechanism_preferences.push(kernel_mechanism());
        }
        let first = !slot.established.load(Ordering::SeqCst);
        let mut out = next.clone().request(cx, req).await?;
        match self.endpoint_end_up(&remote, &mut out, &slot).await {
            Ok(()) => {
                slot.established.store(true, Ordering::SeqCst);
                Ok(out)
            }
            Err(e) => {
                if first {
                    self.undo_first(cx, &next, &slot, out).await;
                }
                Err(e)
            }
        }
    }
}

/// The hardware address of the client's device of `conn` ([`client_mac`]); none for a
/// bridged end, whose device does not answer for the client's addresses.
fn own_mac(end: &KernelClientEnd, conn: &Connection) -> Option<[u8; 6]> {
    (!end.bridged()).then(|| client_mac(connection_key(conn)))
}

fn slot(cx: &Cx) -> Result<std::sync::Arc<DeviceSlot>> {
    cx.conn()
        .map(|h| h.state::<DeviceSlot>())
        .ok_or_else(|| nsm_sdk::Error::internal("vxlan forwarder client needs `begin` before it"))
}

#[async_trait]
impl Handler for VxlanForwarderClient {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        if let Some(end) = KernelClientEnd::from_cx(cx) {
            return self.client_side(cx, req, next, end).await;
        }
        if let Some(remote) = cx.ext().get::<RemoteEnd>().cloned() {
            return self.endpoint_side(cx, req, next, remote).await;
        }
        // Neither side is ours (NOOP, say).
        next.request(cx, req).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let slot = cx.conn().and_then(|h| h.get_state::<DeviceSlot>());
        let held = slot.as_ref().and_then(|s| s.take());
        let delete = async {
            match held {
                Some(h) => h.device.down().await.map_err(nsm_sdk::Error::from),
                None => Ok(()),
            }
        };
        // The device and the next hop's side are independent: a device's deletion
        // waits for the kernel (RCU), so both go at once.
        let (deleted, rest) = tokio::join!(delete, next.close(cx, conn));
        if let Some(s) = &slot {
            self.forget(s);
        }
        deleted.and(rest)
    }
}
