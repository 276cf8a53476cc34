//! The kernel data plane for nsm-sdk: network namespace handles, veth pairs and
//! connection-context programming (addresses, routes, neighbours, MTU) through
//! rtnetlink.
//!
//! # Layers
//!
//! - [`NetNs`] ([`netns`]): an owned handle on a network namespace, opened from an
//!   `inodeURL` (`file:///proc/<pid>/ns/net`, `file:///proc/<pid>/fd/<n>`), a
//!   `/run/netns/<name>` or any namespace path. Work inside a namespace happens on a
//!   short-lived OS thread, never on a tokio worker.
//! - [`Plan`] ([`plan`]): the desired state of one pod interface as data, computed from
//!   a `ConnectionContext` by [`plan_from_context`] with NSM's src/dst rules (policy
//!   routes included: a rule and a table of their own per `PolicyRoute`, on the
//!   client's side), and diffed by [`Plan::changes`] into [`Op`]s. Pure, tested
//!   without root.
//! - [`Netlink`] ([`apply`](mod@apply)): the handful of kernel operations, bound to one
//!   namespace, with [`RtNetlink`] (rtnetlink) and [`Recorder`] (an in-memory fake);
//!   [`apply()`] runs ops and rolls back on failure, [`undo()`] removes what a plan added.
//! - [`kernel_side_up`] / [`Created::refresh`] / [`down`] ([`veth`]): a local
//!   connection's veth pair, the entry points of the forwarder's KERNEL mechanism.
//! - [`reaper`]: group commit of link deletions — Closes that arrive while a deletion
//!   is in flight are deleted together as one link group per namespace (one kernel
//!   synchronisation instead of one per link); a lone Close goes out at once.
//! - [`ping_liveness`] ([`liveness`]): a liveness check for `heal` that pings the
//!   endpoint's address from the client's namespace ([`kernel_liveness`]: only the
//!   KERNEL connections).
//! - [`mechanism`]: the KERNEL mechanism handlers of the three roles —
//!   [`kernel_client`] (NSC), [`kernel_endpoint`] (NSE) and
//!   [`kernel_forwarder_mechanisms`] (forwarder), which make a Kernel2Kernel connection
//!   through the whole mesh; with NOOP beside KERNEL, [`endpoint_mechanisms`] and a
//!   client's [`preferences()`].
//!
//! A forwarder's KERNEL mechanism uses it like this (names and namespaces come from
//! the two connections' mechanism parameters, addresses from the connection context):
//!
//! ```no_run
//! use nsm_sdk::proto::connectioncontext::ConnectionContext;
//! use nsm_sdk_kernel::{down, kernel_side_up, plan_from_context, NetNs, PodSide};
//!
//! # async fn example(ctx: ConnectionContext) -> nsm_sdk_kernel::Result<()> {
//! let ns_client = NetNs::from_url("file:///proc/1234/fd/7")?;
//! let ns_endpoint = NetNs::from_url("file:///proc/1234/fd/8")?;
//! let client = plan_from_context(&ctx, PodSide::Client, "nsm-1")?;
//! let endpoint = plan_from_context(&ctx, PodSide::Endpoint, "icmp-respo-a1b2")?;
//! let mut created = kernel_side_up(&ns_client, &ns_endpoint, client, endpoint).await?;
//!
//! // A refresh: only what changed is touched.
//! let client = plan_from_context(&ctx, PodSide::Client, "nsm-1")?;
//! created.refresh(PodSide::Client, client).await?;
//!
//! // Close.
//! down(created).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Topology: one veth pair per local connection, each end born in its pod
//!
//! For a connection between a client pod and an endpoint pod on the same node, the
//! forwarder creates **one veth pair** whose client end is created directly inside the
//! client's namespace and whose endpoint end is created directly inside the endpoint's
//! namespace, both under their final names, by a single `RTM_NEWLINK` carrying
//! `IFLA_NET_NS_FD` on the link and on the peer (verified on the CI kernel, docs/KERNEL.md
//! 1.4 and 4). Each end is then programmed from its own side's plan by a netlink socket
//! opened inside that pod.
//!
//! The alternative is two veth pairs (pod ↔ forwarder namespace) cross-connected with
//! tc (`ingress`/`clsact` + u32 match-all + `mirred` redirect), which mirrors VPP's
//! two-interfaces-plus-xconnect design. We chose the single pair because:
//!
//! - it has half the devices and no tc state, no forwarder-side state at all, and
//!   nothing in the forwarder's namespace that a restart could leave behind;
//! - it is the fastest path (one veth hop, no redirect) and what NSM's own kernel
//!   forwarders (the archived kernel-forwarder, KubeSlice) do;
//! - born-in-place creation needs no temporary names and no rename, so it cannot clash
//!   with names in the forwarder namespace and never renames an UP link (EBUSY on
//!   older kernels).
//!
//! What "each side healable independently" means here, honestly: NSM models a local
//! connection as two connections (client ↔ forwarder and forwarder ↔ endpoint), and
//! each side's *configuration* is independent — its addresses, routes, neighbours and
//! MTU come from its own plan and are refreshed on their own
//! ([`Created::refresh`] with a [`PodSide`]), so a refresh of one side never touches
//! the other. The *device*, however, is shared: a veth pair lives and dies as one.
//! When the endpoint pod dies its namespace goes and the kernel deletes the client's
//! end with it; healing to a new endpoint therefore means creating a new pair
//! ([`down`] of the old one is then a no-op, [`kernel_side_up`] makes the new one).
//! The client keeps its interface *name* and gets its addresses and routes back, but
//! the interface is a new device (new ifindex and MAC, a brief carrier loss). The
//! forwarder can always recreate the pair idempotently: creation checks that both
//! names are free, and Close deletes only the link it created (matched by ifindex).
//! Each end carries an alias naming its connection ([`veth_alias`]), so a forwarder
//! that replaces a dead one recognises the pairs its predecessor left in the kernel:
//! when a connection is requested again and both ends are where its plans put them,
//! it adopts the pair in place ([`kernel_side_adopt`]: no deletion, no new device, the
//! data plane never stops); otherwise it deletes the leftovers and makes a new pair.
//! A link of anything else that holds a wanted name is left alone (docs/KERNEL.md 1.4).
//! A design that must keep the client's device across an endpoint change would use
//! the two-pair + tc variant; nothing in the plan/apply layers would change.
//!
//! # Errors
//!
//! [`Error`] maps into [`nsm_sdk::Error`]: bad input (URL, interface name, MTU,
//! malformed context, a name already taken) is `InvalidArgument`, a missing namespace
//! or link is `NotFound`, `EPERM` is `PermissionDenied`, other kernel failures are
//! `Internal`.

#![deny(missing_docs)]
#![warn(rust_2018_idioms, unreachable_pub)]

pub mod apply;
pub mod error;
mod group_commit;
pub mod liveness;
pub mod mechanism;
pub mod netns;
pub mod on_demand;
pub mod plan;
pub mod reaper;
pub mod recorder;
pub mod rtnl;
pub mod veth;

pub use crate::apply::{apply, undo, update, Link, Netlink, MESH_GROUP};
pub use crate::error::{Error, Result};
pub use crate::liveness::{kernel_liveness, ping, ping_liveness, PingOptions};
pub use crate::mechanism::{
    endpoint_mechanisms, kernel_client, kernel_endpoint, kernel_forwarder_client,
    kernel_forwarder_mechanisms, kernel_forwarder_server, preferences, MechanismChoice,
};
pub use crate::netns::NetNs;
pub use crate::on_demand::OnDemandNetlink;
pub use crate::plan::{
    fmt_mac, parse_mac, plan_from_context, policy_from_context, stable_mac, Family, IfName, Mtu,
    Neighbour, Op, Plan, PodSide, Policy, PortRange, Route, RouteScope, Rule, MAIN_TABLE,
    MAX_ALIAS_LEN, POLICY_TABLE_BASE,
};
pub use crate::reaper::groups_in_use;
pub use crate::recorder::Recorder;
pub use crate::rtnl::RtNetlink;
pub use crate::veth::{
    down, kernel_side_adopt, kernel_side_up, veth_alias, veth_up, with_peer_neighbours, Created,
    VethEnd,
};

/// The rtnetlink crate this one is built on (0.24), for operations not wrapped here.
pub use rtnetlink;
