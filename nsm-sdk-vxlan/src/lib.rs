//! The VXLAN remote mechanism for nsm-sdk: VNI allocation and VXLAN devices created
//! inside pod namespaces with the underlay socket in the node namespace.
//!
//! # Layers
//!
//! - [`VniAllocator`] ([`vni`]): 24-bit VNIs, never 0, unique per node, with NSM's
//!   parity rule (even when `src_ip ≤ dst_ip` byte-wise, odd otherwise), kept per
//!   connection id across refreshes, freed on Close, and moved on after a kernel clash.
//! - [`vxlan_up`] / [`VxlanLink`] ([`link`]): one side's VXLAN device, created by a
//!   netlink socket of the **node** namespace directly inside the **pod** namespace
//!   (`IFLA_NET_NS_FD`), so its UDP socket stays on the node's underlay while the pod
//!   sees the device (docs/KERNEL.md 3.4, 3.5 design C1/D). Addresses and routes are then
//!   programmed inside the pod with nsm-sdk-kernel's plan/apply.
//! - [`mechanism`]: the forwarder's VXLAN handlers on top of both
//!   ([`vxlan_forwarder_mechanisms`] with a node's [`Tunnel`]): a KERNEL client on one
//!   node reaches a KERNEL endpoint on another, each pod's end a VXLAN device made by
//!   its node's forwarder (parameters `src_ip`/`dst_ip`/`src_port`/`dst_port`/`vni`/`MTU`);
//!   [`forwarder_mechanisms`] serves NOOP beside KERNEL and VXLAN, the tunnel optional.
//!
//! # Errors
//!
//! [`Error::VniClash`] means the kernel refused the VNI on that port in the node
//! namespace (another device holds it): the caller marks it with
//! [`VniAllocator::reserve_after_clash`] and tries another VNI. It maps to
//! `Unavailable` (retryable); bad input maps to `InvalidArgument`; kernel failures
//! map as nsm-sdk-kernel's errors do.

#![deny(missing_docs)]
#![warn(rust_2018_idioms, unreachable_pub)]

pub mod error;
pub mod link;
pub mod mechanism;
pub mod vni;

pub use crate::error::{Error, Result};
pub use crate::link::{
    tunnel_mtu, vxlan_up, VxlanLink, VxlanSpec, DEFAULT_PORT, VXLAN_OVERHEAD_V4, VXLAN_OVERHEAD_V6,
};
pub use crate::mechanism::{
    forwarder_mechanisms, vxlan_forwarder_client, vxlan_forwarder_mechanisms,
    vxlan_forwarder_server, Tunnel,
};
pub use crate::vni::{parity_for, Parity, Vni, VniAllocator};
