//! One side's VXLAN device: [`vxlan_up`], [`VxlanLink::refresh`], [`VxlanLink::down`].
//!
//! What it does: a netlink socket of the **node** namespace creates the device
//! directly inside the **pod** namespace (`IFLA_NET_NS_FD`), under its final name,
//! with `id <vni> local <node underlay IP> remote <peer node underlay IP> dstport
//! <port>` and the tunnel MTU set explicitly. The device keeps its UDP socket in the
//! namespace it was created from, so the encapsulated traffic uses the node's
//! underlay while the pod only sees the device (docs/KERNEL.md 3.4/3.5, verified by
//! `kernel-e2e-recipe.sh` and the rtnetlink probe's `remote` mode). It is then marked
//! with the plan's alias (`nsm-client-<id>` / `nsm-endpoint-<id>`, see
//! [`nsm_sdk_kernel::veth_alias`]; the kernel ignores an alias in `RTM_NEWLINK`, so
//! the device is born in link group [`MESH_GROUP`] instead, which marks it as the
//! mesh's until the alias is there) and programmed from its [`Plan`] (MTU, up, addresses, routes, neighbours, policies)
//! by nsm-sdk-kernel's [`update`] through a socket inside the pod.
//!
//! MTU: without `dev` the kernel gives a VXLAN device MTU 1500 and, since the outer
//! DF bit is clear, silently fragments oversize packets on the underlay. The device is
//! therefore created with [`VxlanSpec::mtu`] (use [`tunnel_mtu`]: underlay − 50 for
//! IPv4, − 70 for IPv6), and the plan's MTU is lowered to it when higher or absent.
//!
//! State: [`VxlanLink`] holds the pod's netlink handle, the applied plan and the
//! interface index the device was born with, so a refresh is a diff and Close deletes
//! exactly this device.
//!
//! Failure handled: the interface name already taken in the pod is
//! [`nsm_sdk_kernel::Error::LinkExists`] before anything is created, unless the device
//! holding it is a half-made one of the mesh (group [`MESH_GROUP`], no alias: its
//! forwarder died before the alias), which is replaced; an `EEXIST` on
//! the creation itself (the name was free) is [`Error::VniClash`]: another device in
//! the node namespace has this VNI on this port. Any failure after the device exists
//! deletes it and returns the original error.

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use nsm_sdk_kernel::{
    undo, update, Error as KernelError, IfName, Mtu, NetNs, Netlink, Plan, RtNetlink, MESH_GROUP,
};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::LinkVxlan;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::vni::Vni;

/// The IANA VXLAN port, used unless the mechanism says otherwise (the kernel's own
/// default, 8472, is never relied on).
pub const DEFAULT_PORT: u16 = 4789;
/// VXLAN encapsulation over IPv4: 20 IP + 8 UDP + 8 VXLAN + 14 inner Ethernet.
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// VXLAN encapsulation over IPv6: 40 IP + 8 UDP + 8 VXLAN + 14 inner Ethernet.
pub const VXLAN_OVERHEAD_V6: u32 = 70;

const EEXIST: i32 = 17;

/// The MTU of a VXLAN device whose underlay interface has `underlay_mtu` and whose
/// tunnel endpoints are of `underlay`'s family: underlay − 50 (IPv4) or − 70 (IPv6).
pub fn tunnel_mtu(underlay_mtu: u32, underlay: IpAddr) -> Result<Mtu> {
    let overhead = match underlay {
        IpAddr::V4(_) => VXLAN_OVERHEAD_V4,
        IpAddr::V6(_) => VXLAN_OVERHEAD_V6,
    };
    let mtu = underlay_mtu.checked_sub(overhead).ok_or_else(|| {
        Error::InvalidTunnel(format!(
            "underlay MTU {underlay_mtu} is smaller than the VXLAN overhead {overhead}"
        ))
    })?;
    Ok(Mtu::new(mtu)?)
}

/// The tunnel of one side: VNI, this node's and the peer node's underlay addresses,
/// UDP destination port and the device MTU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    /// The VXLAN network identifier.
    pub vni: Vni,
    /// This node's underlay address (`local`): `src_ip` on the client side, `dst_ip`
    /// on the server side.
    pub local: IpAddr,
    /// The peer node's underlay address (`remote`).
    pub remote: IpAddr,
    /// UDP destination port ([`DEFAULT_PORT`] unless negotiated otherwise).
    pub port: u16,
    /// The device MTU ([`tunnel_mtu`]).
    pub mtu: Mtu,
}

impl VxlanSpec {
    /// A spec on [`DEFAULT_PORT`].
    pub fn new(vni: Vni, local: IpAddr, remote: IpAddr, mtu: Mtu) -> VxlanSpec {
        VxlanSpec {
            vni,
            local,
            remote,
            port: DEFAULT_PORT,
            mtu,
        }
    }

    /// The same spec on another UDP port.
    pub fn with_port(mut self, port: u16) -> VxlanSpec {
        self.port = port;
        self
    }

    /// Refuses what cannot make a unicast tunnel.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: &str| Err(Error::InvalidTunnel(format!("{self:?}: {reason}")));
        if self.local.is_ipv4() != self.remote.is_ipv4() {
            return bad("local and remote are of different address families");
        }
        if self.local.is_unspecified() || self.remote.is_unspecified() {
            return bad("an unspecified tunnel address");
        }
        if self.remote.is_multicast() || self.local.is_multicast() {
            return bad("a multicast tunnel address");
        }
        if self.port == 0 {
            return bad("port 0");
        }
        Ok(())
    }
}

/// A VXLAN device made by [`vxlan_up`]: give it back to [`VxlanLink::down`] on Close.
///
/// Dropping it without `down` leaves the device in the kernel (a forwarder that stops
/// must not cut its pods' data plane).
#[derive(Debug)]
#[must_use = "the VXLAN device stays in the kernel until `down` is called"]
pub struct VxlanLink {
    netlink: Arc<RtNetlink>,
    plan: Plan,
    index: u32,
    spec: VxlanSpec,
    /// The hardware address the device was born with (its first plan's).
    mac: Option<[u8; 6]>,
}

impl VxlanLink {
    /// The plan applied to the device (with its policies' routing tables).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The interface index the device was born with in the pod.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The tunnel the device was created with.
    pub fn spec(&self) -> &VxlanSpec {
        &self.spec
    }

    /// The hardware address the device was given at its birth (the first plan's
    /// [`Plan::mac`]); a refresh never changes it. `None` when that plan had none
    /// (the kernel's random one).
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    /// The netlink handle inside the pod.
    pub fn netlink(&self) -> &RtNetlink {
        &self.netlink
    }

    /// Brings the device's configuration from its current plan to `plan` (a
    /// refresh; the MTU is capped at the tunnel's as at creation). The interface name
    /// cannot change; a device that is gone (or is not this one any more) is
    /// [`nsm_sdk_kernel::Error::LinkNotFound`]. On failure the previous plan is kept
    /// (nsm-sdk-kernel's `apply` rolls back).
    pub async fn refresh(&mut self, plan: Plan) -> Result<()> {
        if plan.ifname() != self.plan.ifname() {
            return Err(KernelError::InvalidInterfaceName {
                name: plan.ifname().to_string(),
                reason: "differs from the interface of this connection (needs a new device)",
            }
            .into());
        }
        let plan = cap_mtu(plan, self.spec.mtu);
        self.ensure_ours().await?;
        if let Some(alias) = plan.alias().filter(|a| Some(*a) != self.plan.alias()) {
            self.netlink.set_alias(plan.ifname(), alias).await?;
        }
        self.plan = update(Some(&self.plan), &plan, self.netlink.as_ref()).await?;
        Ok(())
    }

    async fn ensure_ours(&self) -> Result<()> {
        match self.netlink.link(self.plan.ifname()).await? {
            Some(l) if l.index == self.index => Ok(()),
            _ => Err(KernelError::LinkNotFound {
                name: self.plan.ifname().to_string(),
                netns: self.netlink.netns().to_string(),
            }
            .into()),
        }
    }

    /// Close: deletes the device (which takes its addresses, routes and neighbours
    /// along and releases the VNI in the node namespace) and the policy rules its
    /// plan added. A device already gone (the pod died) is not an error; a device of
    /// the same name that is not this one is left alone.
    pub async fn down(self) -> Result<()> {
        let name = self.plan.ifname();
        // Through the reaper: Closes that arrive together delete their devices as one
        // link group per pod (one kernel synchronisation instead of one per device).
        let netlink: Arc<dyn Netlink> = self.netlink.clone();
        nsm_sdk_kernel::reaper::delete_link(netlink, name.clone(), self.index).await?;
        // The link is gone: only the rules (which outlive links) remain to remove.
        undo(&self.plan, self.netlink.as_ref()).await?;
        info!(ifname = %name, vni = %self.spec.vni, "VXLAN device deleted");
        Ok(())
    }
}

fn cap_mtu(plan: Plan, tunnel: Mtu) -> Plan {
    match plan.mtu() {
        Some(m) if m.get() <= tunnel.get() => plan,
        _ => plan.with_mtu(tunnel),
    }
}

/// Creates one side's VXLAN device inside `pod` from `node` (a netlink socket of the
/// node namespace, where the underlay lives and the VNI is reserved), named after
/// `plan`, and programs it from `plan` through a new socket inside the pod.
pub async fn vxlan_up(
    node: &RtNetlink,
    pod: &NetNs,
    spec: &VxlanSpec,
    plan: Plan,
) -> Result<VxlanLink> {
    spec.check()?;
    plan.check()?;
    let plan = cap_mtu(plan, spec.mtu);
    let pod_nl = RtNetlink::open(pod).await?;
    let name = plan.ifname().clone();
    match pod_nl.link(&name).await? {
        // Half-made by the mesh (born in its group, killed before its alias): replaced.
        Some(l) if l.alias.is_none() && l.group == MESH_GROUP => {
            warn!(ifname = %name, netns = %pod, "a half-made device of the mesh (no alias) holds the name: replacing it");
            match pod_nl.delete_link(&name).await {
                Ok(()) | Err(KernelError::LinkNotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Some(l) => {
            return Err(KernelError::LinkExists {
                name: name.to_string(),
                netns: pod.to_string(),
                alias: Some(l.alias.unwrap_or_default()),
            }
            .into())
        }
        None => {}
    }
    create(node, pod, &name, spec).await?;
    match program(&pod_nl, &name, &plan).await {
        Ok((index, plan)) => {
            info!(ifname = %name, netns = %pod, vni = %spec.vni, local = %spec.local, remote = %spec.remote, port = spec.port, "VXLAN device up");
            Ok(VxlanLink {
                netlink: Arc::new(pod_nl),
                mac: plan.mac(),
                plan,
                index,
                spec: spec.clone(),
            })
        }
        Err(e) => {
            warn!(ifname = %name, netns = %pod, error = %e, "programming the VXLAN device failed, deleting it");
            if let Err(de) = pod_nl.delete_link(&name).await {
                warn!(ifname = %name, error = %de, "could not delete the VXLAN device");
            }
            Err(e)
        }
    }
}

async fn create(node: &RtNetlink, pod: &NetNs, name: &IfName, spec: &VxlanSpec) -> Result<()> {
    let mut b = LinkVxlan::new(name.as_str(), spec.vni.get());
    b = match (spec.local, spec.remote) {
        (IpAddr::V4(l), IpAddr::V4(r)) => b.local(l).remote(r),
        (IpAddr::V6(l), IpAddr::V6(r)) => b.local6(l).remote6(r),
        _ => unreachable_mix()?,
    };
    let mut msg = b
        .port(spec.port)
        .mtu(spec.mtu.get())
        .setns_by_fd(pod.as_fd().as_raw_fd())
        .build();
    // Born in the mesh's group: recognisable as ours before the alias is set.
    msg.attributes.push(LinkAttribute::Group(MESH_GROUP));
    match node.handle().link().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) => {
            let errno = match &e {
                rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
                _ => None,
            };
            if errno == Some(EEXIST) {
                return Err(Error::VniClash {
                    vni: spec.vni.get(),
                    port: spec.port,
                    netns: node.netns().to_string(),
                });
            }
            Err(KernelError::Netlink {
                op: format!("create vxlan {name} (vni {}) in {pod}", spec.vni),
                netns: node.netns().to_string(),
                errno,
                message: e.to_string(),
            }
            .into())
        }
    }
}

/// `check` refuses mixed families; kept as an error rather than a panic.
fn unreachable_mix<T>() -> Result<T> {
    Err(Error::InvalidTunnel(
        "local and remote are of different address families".into(),
    ))
}

async fn program(nl: &RtNetlink, name: &IfName, plan: &Plan) -> Result<(u32, Plan)> {
    let index = match nl.link(name).await? {
        Some(l) => l.index,
        None => {
            return Err(KernelError::LinkNotFound {
                name: name.to_string(),
                netns: nl.netns().to_string(),
            }
            .into())
        }
    };
    if let Some(alias) = plan.alias() {
        nl.set_alias(name, alias).await?;
    }
    let applied = update(None, plan, nl).await?;
    Ok((index, applied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_mtu_is_the_underlay_minus_50_or_70() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(tunnel_mtu(1500, v4).unwrap().get(), 1450);
        assert_eq!(tunnel_mtu(1500, v6).unwrap().get(), 1430);
        assert_eq!(tunnel_mtu(9000, v4).unwrap().get(), 8950);
        assert!(tunnel_mtu(40, v4).is_err());
        assert!(
            tunnel_mtu(100, v4).is_err(),
            "50 is below the minimum MTU 68"
        );
    }

    #[test]
    fn a_spec_with_mixed_families_a_zero_port_or_no_address_is_refused() {
        let vni = Vni::new(5000).unwrap();
        let mtu = Mtu::new(1450).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let ok = VxlanSpec::new(vni, ip("192.0.2.1"), ip("192.0.2.2"), mtu);
        assert_eq!(ok.port, DEFAULT_PORT);
        ok.check().unwrap();
        for bad in [
            VxlanSpec::new(vni, ip("192.0.2.1"), ip("2001:db8::2"), mtu),
            VxlanSpec::new(vni, ip("0.0.0.0"), ip("192.0.2.2"), mtu),
            VxlanSpec::new(vni, ip("192.0.2.1"), ip("239.1.1.1"), mtu),
            ok.clone().with_port(0),
        ] {
            assert!(
                matches!(bad.check(), Err(Error::InvalidTunnel(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_plan_mtu_is_capped_at_the_tunnel_mtu() {
        let tunnel = Mtu::new(1450).unwrap();
        let plan = || Plan::new(IfName::new("nsm-1").unwrap());
        assert_eq!(cap_mtu(plan(), tunnel).mtu(), Some(tunnel));
        let big = plan().with_mtu(Mtu::new(1500).unwrap());
        assert_eq!(cap_mtu(big, tunnel).mtu(), Some(tunnel));
        let small = plan().with_mtu(Mtu::new(1400).unwrap());
        assert_eq!(cap_mtu(small, tunnel).mtu().map(Mtu::get), Some(1400));
    }
}
