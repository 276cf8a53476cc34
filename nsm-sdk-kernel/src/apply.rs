//! Applying plans: the [`Netlink`] trait, [`apply()`] with rollback, and [`undo()`].
//!
//! [`Netlink`] is the small set of kernel operations the data plane needs, bound to one
//! network namespace. [`crate::RtNetlink`] implements it with rtnetlink;
//! [`crate::Recorder`] is an in-memory fake that records calls and can inject failures,
//! so the apply and rollback logic is tested without root.
//!
//! Failure handled: when an operation fails, [`apply()`] undoes the operations it
//! already did, in reverse order, and returns the original error, so a failed apply
//! leaves the interface as it found it (up to its up state and a first MTU, which have
//! no known previous value).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_sdk::async_trait;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::plan::{IfName, Mtu, Neighbour, Op, Plan, Route};

/// A link as listed by [`Netlink::links`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The interface name.
    pub name: String,
    /// The interface index in its namespace.
    pub index: u32,
    /// The MTU.
    pub mtu: u32,
    /// Whether the link is administratively up.
    pub up: bool,
    /// The link kind (`veth`, `vxlan`, ...), if it has one.
    pub kind: Option<String>,
    /// The link's alias (`IFLA_IFALIAS`, `ip link set <dev> alias <text>`), if it has
    /// one: the mesh marks the devices it creates with the connection they serve
    /// ([`crate::veth_alias`]).
    pub alias: Option<String>,
}

/// The kernel operations of the data plane, bound to one network namespace.
///
/// Interfaces are named, not indexed: an index can change when a link moves between
/// namespaces. Every per-interface operation on a missing link is
/// [`Error::LinkNotFound`]. Adds replace what is there; deleting an address, route or
/// neighbour that is absent succeeds, so all operations are idempotent.
#[async_trait]
pub trait Netlink: Send + Sync + fmt::Debug {
    /// The namespace this handle works in, for messages.
    fn netns(&self) -> &str;

    /// Creates a veth pair whose end `a` is born in `ns_a` and whose end `b` is born in
    /// `ns_b` (both with `IFLA_NET_NS_FD`, so this handle's own namespace does not
    /// matter), under their final names, with `mtu` on both ends if given. A name that
    /// is taken is [`Error::LinkExists`].
    async fn create_veth_pair(
        &self,
        a: &IfName,
        ns_a: &NetNs,
        b: &IfName,
        ns_b: &NetNs,
        mtu: Option<Mtu>,
    ) -> Result<()>;

    /// Deletes a link (for a veth, the kernel deletes its peer too).
    async fn delete_link(&self, name: &IfName) -> Result<()>;

    /// The link called `name`, if there is one.
    async fn link(&self, name: &IfName) -> Result<Option<Link>>;

    /// Every link of the namespace.
    async fn links(&self) -> Result<Vec<Link>>;

    /// Sets the MTU.
    async fn set_mtu(&self, name: &IfName, mtu: Mtu) -> Result<()>;

    /// Sets the link up.
    async fn set_up(&self, name: &IfName) -> Result<()>;

    /// Sets the link's alias (`IFLA_IFALIAS`, at most [`crate::MAX_ALIAS_LEN`] bytes;
    /// longer is [`Error::InvalidAlias`]).
    async fn set_alias(&self, name: &IfName, alias: &str) -> Result<()>;

    /// Adds (replaces) an address.
    async fn add_address(&self, name: &IfName, addr: IpNet) -> Result<()>;

    /// Removes an address.
    async fn del_address(&self, name: &IfName, addr: IpNet) -> Result<()>;

    /// The global-scope addresses of the link (no `fe80::`).
    async fn addresses(&self, name: &IfName) -> Result<Vec<IpNet>>;

    /// Adds (replaces) a route through the link, in the main table.
    async fn add_route(&self, name: &IfName, route: &Route) -> Result<()>;

    /// Removes the route to `route`'s destination through the link.
    async fn del_route(&self, name: &IfName, route: &Route) -> Result<()>;

    /// The main-table routes through the link, without the kernel's own (`proto
    /// kernel`) routes.
    async fn routes(&self, name: &IfName) -> Result<Vec<Route>>;

    /// Adds (replaces) a permanent neighbour entry.
    async fn add_neighbour(&self, name: &IfName, n: &Neighbour) -> Result<()>;

    /// Removes a neighbour entry.
    async fn del_neighbour(&self, name: &IfName, ip: IpAddr) -> Result<()>;

    /// The permanent neighbour entries of the link.
    async fn neighbours(&self, name: &IfName) -> Result<Vec<Neighbour>>;
}

/// Runs one operation.
pub async fn run_op(ifname: &IfName, op: &Op, nl: &dyn Netlink) -> Result<()> {
    match op {
        Op::SetMtu { mtu, .. } => nl.set_mtu(ifname, *mtu).await,
        Op::SetUp => nl.set_up(ifname).await,
        Op::AddAddress(a) => nl.add_address(ifname, *a).await,
        Op::DelAddress(a) => nl.del_address(ifname, *a).await,
        Op::AddRoute(r) => nl.add_route(ifname, r).await,
        Op::DelRoute(r) => nl.del_route(ifname, r).await,
        Op::AddNeighbour(n) => nl.add_neighbour(ifname, n).await,
        Op::DelNeighbour(n) => nl.del_neighbour(ifname, n.ip).await,
    }
}

/// Runs `ops` on `ifname` in order. If one fails, the ones already done are undone in
/// reverse order (failures of the rollback are logged) and the error is returned.
pub async fn apply(ifname: &IfName, ops: &[Op], nl: &dyn Netlink) -> Result<()> {
    for (done, op) in ops.iter().enumerate() {
        debug!(netns = nl.netns(), %ifname, %op, "kernel op");
        if let Err(e) = run_op(ifname, op, nl).await {
            warn!(netns = nl.netns(), %ifname, %op, error = %e, "kernel op failed, rolling back");
            for undo in ops[..done].iter().rev().filter_map(Op::inverse) {
                if let Err(re) = run_op(ifname, &undo, nl).await {
                    warn!(netns = nl.netns(), %ifname, op = %undo, error = %re, "rollback op failed");
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Brings the kernel state of `new.ifname()` from `old` to `new`
/// ([`Plan::changes`] then [`apply()`]): a refresh with an unchanged plan does nothing.
pub async fn update(old: Option<&Plan>, new: &Plan, nl: &dyn Netlink) -> Result<()> {
    new.check()?;
    apply(new.ifname(), &Plan::changes(old, new), nl).await
}

/// Removes what `plan` added to its interface (neighbours, routes, addresses), for a
/// Close when the link itself is not ours to delete. Every step is tried; a link that
/// is already gone means there is nothing left to remove. The first error is returned.
pub async fn undo(plan: &Plan, nl: &dyn Netlink) -> Result<()> {
    let mut first = None;
    for op in plan.undo() {
        match run_op(plan.ifname(), &op, nl).await {
            Ok(()) => {}
            Err(Error::LinkNotFound { .. }) => return Ok(()),
            Err(e) => {
                warn!(netns = nl.netns(), ifname = %plan.ifname(), %op, error = %e, "undo op failed");
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Recorder;

    fn setup() -> (Recorder, IfName, Plan) {
        let ns = NetNs::current().unwrap();
        let nl = Recorder::new("pod", &ns);
        let (a, b) = (IfName::new("nsm-1").unwrap(), IfName::new("peer").unwrap());
        futures::executor::block_on(nl.create_veth_pair(&a, &ns, &b, &ns, None)).unwrap();
        let plan = Plan::new(a.clone())
            .with_address("192.0.2.2/32".parse().unwrap())
            .with_route(Route::link("192.0.2.1/32".parse().unwrap()))
            .with_neighbour(Neighbour {
                ip: "192.0.2.1".parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 1],
            });
        (nl, a, plan)
    }

    #[tokio::test]
    async fn a_failing_op_undoes_the_ops_before_it_in_reverse_order() {
        let (nl, name, plan) = setup();
        nl.fail_on("add_neighbour", 22);
        let err = update(None, &plan, &nl).await.unwrap_err();
        assert_eq!(err.errno(), Some(22));
        assert_eq!(
            nl.calls()[1..],
            [
                "pod set_up nsm-1",
                "pod add_address nsm-1 192.0.2.2/32",
                "pod add_route nsm-1 192.0.2.1/32 scope link",
                "pod add_neighbour nsm-1 192.0.2.1 lladdr 02:00:00:00:00:01",
                "pod del_route nsm-1 192.0.2.1/32",
                "pod del_address nsm-1 192.0.2.2/32",
            ]
        );
        assert!(nl.addresses(&name).await.unwrap().is_empty());
        assert!(nl.routes(&name).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn undo_removes_what_the_plan_added_and_keeps_the_link() {
        let (nl, name, plan) = setup();
        update(None, &plan, &nl).await.unwrap();
        undo(&plan, &nl).await.unwrap();
        assert!(nl.addresses(&name).await.unwrap().is_empty());
        assert!(nl.routes(&name).await.unwrap().is_empty());
        assert!(nl.neighbours(&name).await.unwrap().is_empty());
        assert!(nl.link(&name).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn undo_of_a_link_that_is_gone_succeeds() {
        let (nl, name, plan) = setup();
        update(None, &plan, &nl).await.unwrap();
        nl.delete_link(&name).await.unwrap();
        undo(&plan, &nl).await.unwrap();
    }

    #[tokio::test]
    async fn undo_tries_every_step_and_reports_the_first_failure() {
        let (nl, name, plan) = setup();
        update(None, &plan, &nl).await.unwrap();
        nl.fail_on("del_route", 16);
        let err = undo(&plan, &nl).await.unwrap_err();
        assert_eq!(err.errno(), Some(16));
        assert!(
            nl.addresses(&name).await.unwrap().is_empty(),
            "the address step still ran"
        );
    }
}
