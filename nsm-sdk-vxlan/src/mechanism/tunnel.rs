//! [`Tunnel`]: what a forwarder's VXLAN handlers share on one node.
//!
//! What it is: the node namespace where the underlay lives (the VXLAN devices' UDP
//! sockets and their VNIs are there), this node's tunnel IP and UDP port, the tunnel
//! MTU (the MTU of the link that holds the tunnel IP, or a given underlay MTU, minus
//! the VXLAN overhead, [`tunnel_mtu`]) and one [`VniAllocator`] for the server and the
//! client side of the node's forwarder.
//!
//! State: a netlink socket of the node namespace (opened by [`TunnelBuilder::build`],
//! owned by the tunnel) and the allocator.
//!
//! Failure handled: a tunnel IP that no link of the node namespace holds (when the
//! underlay MTU is not given) or an underlay MTU too small for the overhead is
//! [`Error::InvalidTunnel`] at build time, so a misconfigured forwarder fails at start
//! and not on its first remote connection. When a pod's end is made, an interface of
//! the wanted name whose alias names the same connection (left by a forwarder that
//! died, [`veth_alias`](nsm_sdk_kernel::veth_alias)) is replaced; one of anything else
//! is left alone and the request fails (InvalidArgument naming that link's alias).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use nsm_sdk::async_trait;
use nsm_sdk_kernel::liveness::allow_ping;
use nsm_sdk_kernel::{Error as KernelError, Mtu, NetNs, Netlink, Plan, RtNetlink};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::link::{tunnel_mtu, vxlan_up, VxlanLink, VxlanSpec, DEFAULT_PORT};
use crate::vni::VniAllocator;

/// See the [module docs](self). Cheap to clone (shared).
#[derive(Clone)]
pub struct Tunnel {
    inner: Arc<Inner>,
}

struct Inner {
    ip: IpAddr,
    port: u16,
    mtu: Mtu,
    netns: String,
    allocator: Arc<VniAllocator>,
    devices: Arc<dyn Devices>,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("ip", &self.inner.ip)
            .field("port", &self.inner.port)
            .field("mtu", &self.inner.mtu)
            .field("netns", &self.inner.netns)
            .field("vnis_in_use", &self.inner.allocator.len())
            .finish()
    }
}

impl Tunnel {
    /// A tunnel from this node's address `ip`; see [`TunnelBuilder`].
    pub fn builder(ip: IpAddr) -> TunnelBuilder {
        TunnelBuilder {
            ip,
            netns: None,
            port: DEFAULT_PORT,
            underlay_mtu: None,
            allocator: None,
        }
    }

    /// This node's tunnel IP (`src_ip` on the client side, `dst_ip` on the server side).
    pub fn ip(&self) -> IpAddr {
        self.inner.ip
    }

    /// The UDP port of this node's VXLAN devices.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The MTU of this node's VXLAN devices (underlay MTU minus the overhead).
    pub fn mtu(&self) -> Mtu {
        self.inner.mtu
    }

    /// The node namespace, for messages.
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// The node's VNI allocator (shared by the server and client sides).
    pub fn allocator(&self) -> &Arc<VniAllocator> {
        &self.inner.allocator
    }

    pub(crate) fn devices(&self) -> &dyn Devices {
        self.inner.devices.as_ref()
    }

    /// A tunnel whose devices are made by `devices` (tests use a fake).
    #[cfg(test)]
    pub(crate) fn with_devices(
        ip: IpAddr,
        mtu: Mtu,
        allocator: Arc<VniAllocator>,
        devices: Arc<dyn Devices>,
    ) -> Tunnel {
        Tunnel {
            inner: Arc::new(Inner {
                ip,
                port: DEFAULT_PORT,
                mtu,
                netns: "fake".into(),
                allocator,
                devices,
            }),
        }
    }
}

/// Options of a [`Tunnel`]; [`TunnelBuilder::build`] makes it.
#[must_use]
pub struct TunnelBuilder {
    ip: IpAddr,
    netns: Option<NetNs>,
    port: u16,
    underlay_mtu: Option<u32>,
    allocator: Option<Arc<VniAllocator>>,
}

impl fmt::Debug for TunnelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelBuilder")
            .field("ip", &self.ip)
            .field("netns", &self.netns)
            .field("port", &self.port)
            .field("underlay_mtu", &self.underlay_mtu)
            .finish_non_exhaustive()
    }
}

impl TunnelBuilder {
    /// The node namespace (default: the caller's own).
    pub fn netns(mut self, netns: NetNs) -> Self {
        self.netns = Some(netns);
        self
    }

    /// The UDP port (default [`DEFAULT_PORT`], 4789). A kernel VXLAN device sends to
    /// and listens on one port, so every node of a mesh uses the same one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// The underlay MTU (default: the MTU of the link that holds the tunnel IP).
    pub fn underlay_mtu(mut self, mtu: u32) -> Self {
        self.underlay_mtu = Some(mtu);
        self
    }

    /// The VNI allocator (default: a new one with every VNI).
    pub fn allocator(mut self, allocator: Arc<VniAllocator>) -> Self {
        self.allocator = Some(allocator);
        self
    }

    /// Opens a netlink socket in the node namespace and works out the tunnel MTU.
    pub async fn build(self) -> Result<Tunnel> {
        let netns = match self.netns {
            Some(ns) => ns,
            None => NetNs::current()?,
        };
        if self.ip.is_unspecified() || self.ip.is_multicast() {
            return Err(Error::InvalidTunnel(format!(
                "{} cannot be a tunnel IP",
                self.ip
            )));
        }
        if self.port == 0 {
            return Err(Error::InvalidTunnel("port 0".into()));
        }
        let node = RtNetlink::open(&netns).await?;
        let underlay = match self.underlay_mtu {
            Some(mtu) => mtu,
            None => underlay_mtu(&node, self.ip).await?,
        };
        let mtu = tunnel_mtu(underlay, self.ip)?;
        info!(ip = %self.ip, port = self.port, underlay_mtu = underlay, mtu = mtu.get(), netns = %netns, "VXLAN tunnel ready");
        Ok(Tunnel {
            inner: Arc::new(Inner {
                ip: self.ip,
                port: self.port,
                mtu,
                netns: netns.to_string(),
                allocator: self.allocator.unwrap_or_default(),
                devices: Arc::new(KernelDevices { node }),
            }),
        })
    }
}

/// The MTU of the link of `node` that holds `ip`.
async fn underlay_mtu(node: &RtNetlink, ip: IpAddr) -> Result<u32> {
    for link in node.links().await? {
        let Ok(name) = nsm_sdk_kernel::IfName::new(link.name.as_str()) else {
            continue;
        };
        // A link can vanish between the listing and this call: skip it.
        let addrs = node.addresses(&name).await.unwrap_or_default();
        if addrs.iter().any(|a| a.addr() == ip) {
            return Ok(link.mtu);
        }
    }
    Err(Error::InvalidTunnel(format!(
        "no link in {} holds the tunnel IP {ip}",
        node.netns()
    )))
}

/// Makes one side's VXLAN device; the kernel in production, a fake in unit tests.
#[async_trait]
pub(crate) trait Devices: Send + Sync {
    /// Creates the device for `spec` in `pod`, programmed from `plan`.
    async fn up(&self, pod: &NetNs, spec: &VxlanSpec, plan: Plan) -> Result<Box<dyn Device>>;
}

/// A device made by [`Devices::up`].
#[async_trait]
pub(crate) trait Device: Send + Sync + fmt::Debug {
    /// The tunnel it was made with.
    fn spec(&self) -> &VxlanSpec;
    /// The hardware address it was born with, if its plan gave it one.
    fn mac(&self) -> Option<[u8; 6]>;
    /// Brings its configuration to `plan`.
    async fn refresh(&mut self, plan: Plan) -> Result<()>;
    /// Deletes it.
    async fn down(self: Box<Self>) -> Result<()>;
}

/// The kernel's devices, made from a netlink socket of the node namespace.
struct KernelDevices {
    node: RtNetlink,
}

#[async_trait]
impl Devices for KernelDevices {
    async fn up(&self, pod: &NetNs, spec: &VxlanSpec, plan: Plan) -> Result<Box<dyn Device>> {
        // Only a liveness check needs it and the connection works without: done
        // beside the device, whatever becomes of it.
        let (made, ping) = tokio::join!(self.make(pod, spec, plan), allow_ping(pod));
        if let Err(e) = ping {
            warn!(netns = %pod, error = %e, "could not open ping_group_range");
        }
        Ok(Box::new(made?))
    }
}

impl KernelDevices {
    async fn make(&self, pod: &NetNs, spec: &VxlanSpec, plan: Plan) -> Result<VxlanLink> {
        Ok(match vxlan_up(&self.node, pod, spec, plan.clone()).await {
            // The name is held by a device marked for this very connection: one a
            // previous forwarder left behind (it died, or the connection moved).
            Err(Error::Kernel(KernelError::LinkExists {
                alias: Some(alias), ..
            })) if !alias.is_empty() && plan.alias() == Some(alias.as_str()) => {
                warn!(ifname = %plan.ifname(), netns = %pod, %alias, "replacing the device a previous forwarder left for this connection");
                let nl = RtNetlink::open(pod).await?;
                match nl.delete_link(plan.ifname()).await {
                    Ok(()) | Err(KernelError::LinkNotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                vxlan_up(&self.node, pod, spec, plan).await?
            }
            other => other?,
        })
    }
}

#[async_trait]
impl Device for VxlanLink {
    fn spec(&self) -> &VxlanSpec {
        VxlanLink::spec(self)
    }
    fn mac(&self) -> Option<[u8; 6]> {
        VxlanLink::mac(self)
    }
    async fn refresh(&mut self, plan: Plan) -> Result<()> {
        VxlanLink::refresh(self, plan).await
    }
    async fn down(self: Box<Self>) -> Result<()> {
        VxlanLink::down(*self).await
    }
}
