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
//!
//! State: one process-wide lock, held by [`update()`] only while it chooses routing
//! tables for new policy routes and installs them, so that two connections in the same
//! namespace never take the same free table (the kernel's rules and routes are the
//! record of which tables are taken; Go keeps a per-namespace map for the same
//! reason).

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_sdk::async_trait;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::plan::{IfName, Mtu, Neighbour, Op, Plan, Route, Rule};

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
    /// The link's group (`IFLA_GROUP`, `ip link set <dev> group <n>`); 0 is the
    /// kernel's default group.
    pub group: u32,
}

/// The link group (`IFLA_GROUP`) every link the mesh creates is born in.
///
/// The kernel ignores an alias in `RTM_NEWLINK` but honours a group, on a veth pair's
/// both ends too: so a link holding this group and no alias is a device the mesh began
/// to make and never marked (its forwarder died, or the Request's future was dropped,
/// between the creation and the alias). A later Request for a device of that name
/// replaces it instead of failing on a link "not made by the mesh". `"NSM"` in ASCII:
/// below the numbers the [reaper](crate::reaper) takes for deletions (high bit set),
/// and far from the small numbers people give groups by hand.
pub const MESH_GROUP: u32 = 0x004e_534d;

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

    /// Lets go of what the handle holds open between batches of operations (a socket);
    /// the next operation opens it again. Nothing for handles that hold nothing.
    fn release(&self) {}

    /// Which namespace this handle works in (device and inode of its nsfs file), when
    /// it knows: deletions in one namespace can then share one group deletion
    /// ([`crate::reaper`]). `None` (the default) keeps every deletion on its own.
    fn netns_id(&self) -> Option<(u64, u64)> {
        None
    }

    /// Puts the link with interface index `index` into link group `group`
    /// (`ip link set <dev> group <n>`). A missing link is [`Error::LinkNotFound`];
    /// handles without groups answer [`Error::Unsupported`].
    async fn set_group(&self, index: u32, group: u32) -> Result<()> {
        let _ = (index, group);
        Err(Error::Unsupported {
            op: "set a link group",
            netns: self.netns().to_string(),
        })
    }

    /// Deletes every link of link group `group` in the namespace with one request
    /// (`ip link del group <n>`: `RTM_DELLINK` with index 0 and `IFLA_GROUP`); the
    /// kernel deletes a veth's peer with it, in whatever namespace the peer is, and
    /// waits for its own synchronisation once for the whole group instead of once per
    /// link. Handles without groups answer [`Error::Unsupported`].
    async fn delete_group(&self, group: u32) -> Result<()> {
        let _ = group;
        Err(Error::Unsupported {
            op: "delete a link group",
            netns: self.netns().to_string(),
        })
    }

    /// Creates a veth pair whose end `a` is born in `ns_a` and whose end `b` is born in
    /// `ns_b` (both with `IFLA_NET_NS_FD`, so this handle's own namespace does not
    /// matter), under their final names, with `mtu` on both ends if given, both in link
    /// group [`MESH_GROUP`]. A name that is taken is [`Error::LinkExists`].
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

    /// Sets the link's hardware address.
    async fn set_mac(&self, name: &IfName, mac: [u8; 6]) -> Result<()>;

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

    /// Adds (replaces) a route through the link, in the route's table
    /// ([`Route::table`], the main table unless set).
    async fn add_route(&self, name: &IfName, route: &Route) -> Result<()>;

    /// Removes the route to `route`'s destination through the link, in the route's
    /// table.
    async fn del_route(&self, name: &IfName, route: &Route) -> Result<()>;

    /// The routes through the link in every table but `local`, each with its table,
    /// without the kernel's own (`proto kernel`) routes.
    async fn routes(&self, name: &IfName) -> Result<Vec<Route>>;

    /// Adds a policy rule with the action "to table"
    /// (`ip rule add ... lookup <table>`). An identical rule already there is left as
    /// is (the kernel itself would add a duplicate).
    async fn add_rule(&self, rule: &Rule) -> Result<()>;

    /// Removes the policy rules identical to `rule`; none is not an error.
    async fn del_rule(&self, rule: &Rule) -> Result<()>;

    /// The policy rules of the namespace (IPv4 and IPv6) that a [`Rule`] can express:
    /// action "to table", matching on nothing but source prefix, IP protocol and
    /// ports. Other rules are left out.
    async fn rules(&self) -> Result<Vec<Rule>>;

    /// Every routing table id of the namespace that holds a route (through any link)
    /// or that any rule looks up.
    async fn tables_in_use(&self) -> Result<BTreeSet<u32>>;

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
        Op::SetMac(m) => nl.set_mac(ifname, *m).await,
        Op::SetUp => nl.set_up(ifname).await,
        Op::AddAddress(a) => nl.add_address(ifname, *a).await,
        Op::DelAddress(a) => nl.del_address(ifname, *a).await,
        Op::AddRoute(r) => nl.add_route(ifname, r).await,
        Op::DelRoute(r) => nl.del_route(ifname, r).await,
        Op::AddNeighbour(n) => nl.add_neighbour(ifname, n).await,
        Op::DelNeighbour(n) => nl.del_neighbour(ifname, n.ip).await,
        Op::AddRule(r) => nl.add_rule(r).await,
        Op::DelRule(r) => nl.del_rule(r).await,
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

/// Held while tables are chosen for new policies and the plan using them is applied.
static TABLES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Brings the kernel state of `new.ifname()` from `old` (the plan an earlier
/// `update` returned) to `new`, and returns `new` with the routing tables of its
/// policies chosen ([`Plan::assign_tables`]): keep that plan for the next refresh and
/// for [`undo()`]. A refresh with an unchanged plan does nothing.
///
/// When a policy needs a new table, the namespace's rules and tables are read and the
/// whole apply runs under a process-wide lock, so that parallel connections in one
/// namespace get different tables.
pub async fn update(old: Option<&Plan>, new: &Plan, nl: &dyn Netlink) -> Result<Plan> {
    new.check()?;
    if !new.needs_tables(old) {
        let new = new.clone().assign_tables(old, &BTreeSet::new(), &[])?;
        apply(new.ifname(), &Plan::changes(old, &new), nl).await?;
        return Ok(new);
    }
    let _tables = TABLES.lock().await;
    let in_use = nl.tables_in_use().await?;
    let rules = nl.rules().await?;
    let new = new.clone().assign_tables(old, &in_use, &rules)?;
    debug!(netns = nl.netns(), ifname = %new.ifname(), tables = ?new.policies().iter().filter_map(|p| p.table()).collect::<Vec<_>>(), "policy tables");
    apply(new.ifname(), &Plan::changes(old, &new), nl).await?;
    Ok(new)
}

/// Removes what `plan` added (policy rules, neighbours, routes, addresses), for a
/// Close when the link itself is not ours to delete. Every step is tried; once the
/// link is found gone, the steps on it are skipped (the kernel removed what was on
/// it) but the rules, which outlive links, are still removed. The first error is
/// returned.
pub async fn undo(plan: &Plan, nl: &dyn Netlink) -> Result<()> {
    let mut first = None;
    let mut link_gone = false;
    for op in plan.undo() {
        let on_link = !matches!(op, Op::AddRule(_) | Op::DelRule(_));
        if on_link && link_gone {
            continue;
        }
        match run_op(plan.ifname(), &op, nl).await {
            Ok(()) => {}
            Err(Error::LinkNotFound { .. }) if on_link => link_gone = true,
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
    use crate::plan::{Family, Policy, PortRange, MAIN_TABLE};
    use crate::Recorder;

    fn policy(dport: u16) -> Policy {
        let rule = Rule::new(Family::V4)
            .with_from("192.0.2.2/32".parse().unwrap())
            .with_proto(6)
            .with_dst_port(PortRange::new(dport, dport).unwrap());
        Policy::new(rule).with_route(Route::universe(
            "198.51.100.0/24".parse().unwrap(),
            Some("192.0.2.1".parse().unwrap()),
        ))
    }

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
        let plan = update(None, &plan, &nl).await.unwrap();
        undo(&plan, &nl).await.unwrap();
        assert!(nl.addresses(&name).await.unwrap().is_empty());
        assert!(nl.routes(&name).await.unwrap().is_empty());
        assert!(nl.neighbours(&name).await.unwrap().is_empty());
        assert!(nl.link(&name).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn undo_of_a_link_that_is_gone_succeeds() {
        let (nl, name, plan) = setup();
        let plan = update(None, &plan, &nl).await.unwrap();
        nl.delete_link(&name).await.unwrap();
        undo(&plan, &nl).await.unwrap();
    }

    #[tokio::test]
    async fn undo_tries_every_step_and_reports_the_first_failure() {
        let (nl, name, plan) = setup();
        let plan = update(None, &plan, &nl).await.unwrap();
        nl.fail_on("del_route", 16);
        let err = undo(&plan, &nl).await.unwrap_err();
        assert_eq!(err.errno(), Some(16));
        assert!(
            nl.addresses(&name).await.unwrap().is_empty(),
            "the address step still ran"
        );
    }

    #[tokio::test]
    async fn update_takes_the_lowest_free_table_and_a_refresh_keeps_it_without_a_call() {
        let (nl, name, plan) = setup();
        // Tables 100 (a rule) and 101 (a route) are somebody else's.
        nl.add_rule(&Rule::new(Family::V4).with_table(100))
            .await
            .unwrap();
        let foreign = Route::universe("203.0.113.0/24".parse().unwrap(), None).in_table(101);
        nl.add_route(&name, &foreign).await.unwrap();
        let plan = plan.with_policy(policy(8080));
        let applied = update(None, &plan, &nl).await.unwrap();
        assert_eq!(applied.policies()[0].table(), Some(102));
        let calls = nl.calls();
        let tail: Vec<&str> = calls
            .iter()
            .rev()
            .take(3)
            .rev()
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            [
                "pod add_route nsm-1 198.51.100.0/24 via 192.0.2.1 table 102",
                "pod add_rule from 192.0.2.2/32 ipproto 6 dport 8080 lookup 102",
                "pod add_neighbour nsm-1 192.0.2.1 lladdr 02:00:00:00:00:01",
            ]
        );
        let routes = nl.routes(&name).await.unwrap();
        assert!(
            routes.contains(&applied.policies()[0].routes()[0]),
            "{routes:?}"
        );
        assert!(routes.iter().any(|r| r.table() == MAIN_TABLE));

        let before = nl.calls().len();
        let again = update(Some(&applied), &plan, &nl).await.unwrap();
        assert_eq!(again, applied, "the table is remembered");
        assert_eq!(
            nl.calls().len(),
            before,
            "an unchanged refresh makes no call"
        );
    }

    #[tokio::test]
    async fn a_changed_policy_replaces_the_old_rule_and_table() {
        let (nl, name, plan) = setup();
        let first = update(None, &plan.clone().with_policy(policy(8080)), &nl)
            .await
            .unwrap();
        let second = update(Some(&first), &plan.with_policy(policy(9090)), &nl)
            .await
            .unwrap();
        assert_eq!(first.policies()[0].table(), Some(100));
        assert_eq!(second.policies()[0].table(), Some(101));
        assert_eq!(nl.rules().await.unwrap(), [*second.policies()[0].rule()]);
        let tables: Vec<u32> = nl
            .routes(&name)
            .await
            .unwrap()
            .iter()
            .map(Route::table)
            .filter(|t| *t != MAIN_TABLE)
            .collect();
        assert_eq!(tables, [101], "table 100 was emptied");
    }

    #[tokio::test]
    async fn parallel_updates_in_one_namespace_take_different_tables() {
        let ns = NetNs::current().unwrap();
        let nl = Recorder::new("pod", &ns).yielding();
        let names = [IfName::new("nsm-1").unwrap(), IfName::new("nsm-2").unwrap()];
        let (p1, p2) = (IfName::new("p1").unwrap(), IfName::new("p2").unwrap());
        nl.create_veth_pair(&names[0], &ns, &p1, &ns, None)
            .await
            .unwrap();
        nl.create_veth_pair(&names[1], &ns, &p2, &ns, None)
            .await
            .unwrap();
        let a = Plan::new(names[0].clone()).with_policy(policy(8080));
        let b = Plan::new(names[1].clone()).with_policy(policy(9090));
        let (a, b) = tokio::join!(update(None, &a, &nl), update(None, &b, &nl));
        let mut tables = [a.unwrap(), b.unwrap()].map(|p| p.policies()[0].table());
        tables.sort();
        assert_eq!(tables, [Some(100), Some(101)]);
    }

    #[tokio::test]
    async fn a_rule_the_kernel_refuses_takes_its_table_routes_back_out() {
        let (nl, name, plan) = setup();
        nl.fail_on("add_rule", 22);
        let err = update(None, &plan.with_policy(policy(8080)), &nl)
            .await
            .unwrap_err();
        assert_eq!(err.errno(), Some(22));
        assert!(nl
            .calls()
            .contains(&"pod del_route nsm-1 198.51.100.0/24 table 100".to_string()));
        assert!(nl.routes(&name).await.unwrap().is_empty());
        assert!(nl.rules().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn undo_removes_the_rules_even_when_the_link_is_gone() {
        let (nl, name, plan) = setup();
        let plan = update(None, &plan.with_policy(policy(8080)), &nl)
            .await
            .unwrap();
        assert_eq!(nl.rules().await.unwrap().len(), 1);
        nl.delete_link(&name).await.unwrap();
        undo(&plan, &nl).await.unwrap();
        assert!(nl.rules().await.unwrap().is_empty());
    }
}
