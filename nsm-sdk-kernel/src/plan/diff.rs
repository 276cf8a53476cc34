//! The diff of two plans into [`Op`]s ([`Plan::changes`]) and what undoes a plan
//! ([`Plan::undo`]).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::types::fmt_mac;
use super::{Mtu, Neighbour, Plan, Policy, Route, Rule};

impl Plan {
    /// The operations that turn the kernel state `old` (what an earlier apply left,
    /// or `None` for a fresh interface) into `new`.
    ///
    /// - `None`: set the MTU, set the link up, add every address, route, neighbour.
    /// - An unchanged plan gives no operation at all.
    /// - Otherwise: new addresses are added *before* old ones are removed (removing a
    ///   link's last IPv4 address makes the kernel flush every route through it),
    ///   stale neighbours and routes are removed, and new or changed ones are added.
    ///   A changed route or neighbour is removed and re-added, so that every operation
    ///   has an exact inverse and a failed refresh can be rolled back. When the last
    ///   IPv4 address goes, the IPv4 routes are removed and re-added around it too.
    /// - A plan for another interface name is treated like `None` (that other link is
    ///   not this plan's business).
    /// - The alias is not compared: it is set by whoever creates the link.
    /// - Policies are compared by rule, table included: a removed or changed policy
    ///   loses its rule first, then its table's routes; a new one gets its routes,
    ///   then its rule (so a rule never sends traffic to an empty table). Policies
    ///   without a table ([`Plan::assign_tables`]) are not part of the diff.
    pub fn changes(old: Option<&Plan>, new: &Plan) -> Vec<Op> {
        let Some(old) = old.filter(|o| o.ifname == new.ifname) else {
            let mut ops = Vec::new();
            if let Some(mtu) = new.mtu {
                ops.push(Op::SetMtu { mtu, prev: None });
            }
            if let Some(mac) = new.mac {
                ops.push(Op::SetMac(mac));
            }
            ops.push(Op::SetUp);
            ops.extend(new.addresses.iter().copied().map(Op::AddAddress));
            ops.extend(new.routes.iter().copied().map(Op::AddRoute));
            for p in new.policies.iter().filter(|p| p.table().is_some()) {
                ops.extend(p.routes.iter().copied().map(Op::AddRoute));
                ops.push(Op::AddRule(p.rule));
            }
            ops.extend(new.neighbours.iter().copied().map(Op::AddNeighbour));
            return ops;
        };
        let mut ops = Vec::new();
        if let Some(mtu) = new.mtu.filter(|m| Some(*m) != old.mtu) {
            ops.push(Op::SetMtu { mtu, prev: old.mtu });
        }
        let added = |from: &[IpNet], to: &[IpNet]| -> Vec<IpNet> {
            to.iter().filter(|a| !from.contains(a)).copied().collect()
        };
        ops.extend(
            added(&old.addresses, &new.addresses)
                .into_iter()
                .map(Op::AddAddress),
        );
        ops.extend(
            old.neighbours
                .iter()
                .filter(|n| !new.neighbours.contains(n))
                .copied()
                .map(Op::DelNeighbour),
        );
        // Without any IPv4 address left the kernel flushes the link's IPv4 routes, so
        // those count as changed even when the plans agree on them.
        let v4 = |a: &IpNet| matches!(a, IpNet::V4(_));
        let v4_flushed = old.addresses.iter().any(v4) && !new.addresses.iter().any(v4);
        let kept = |r: &Route| {
            old.routes.contains(r) && new.routes.contains(r) && !(v4_flushed && v4(&r.dst))
        };
        // Policies: the same rule (table included) in both plans keeps its rule and
        // diffs its routes like the main table's.
        let assigned = |p: &&Policy| p.table().is_some();
        let counterpart = |p: &Policy, other: &Plan| -> Option<Vec<Route>> {
            other
                .policies
                .iter()
                .filter(assigned)
                .find(|o| o.rule == p.rule)
                .map(|o| o.routes.clone())
        };
        let policy_kept = |r: &Route, a: &Option<Vec<Route>>| {
            a.as_ref().is_some_and(|a| a.contains(r)) && !(v4_flushed && v4(&r.dst))
        };
        let mut del_policy_routes = Vec::new();
        for p in old.policies.iter().filter(assigned) {
            let there = counterpart(p, new);
            if there.is_none() {
                ops.push(Op::DelRule(p.rule));
            }
            del_policy_routes.extend(
                p.routes
                    .iter()
                    .filter(|r| !policy_kept(r, &there))
                    .copied()
                    .map(Op::DelRoute),
            );
        }
        ops.extend(
            old.routes
                .iter()
                .filter(|r| !kept(r))
                .copied()
                .map(Op::DelRoute),
        );
        ops.extend(del_policy_routes);
        ops.extend(
            added(&new.addresses, &old.addresses)
                .into_iter()
                .map(Op::DelAddress),
        );
        ops.extend(
            new.routes
                .iter()
                .filter(|r| !kept(r))
                .copied()
                .map(Op::AddRoute),
        );
        for p in new.policies.iter().filter(assigned) {
            let before = counterpart(p, old);
            ops.extend(
                p.routes
                    .iter()
                    .filter(|r| !policy_kept(r, &before))
                    .copied()
                    .map(Op::AddRoute),
            );
            if before.is_none() {
                ops.push(Op::AddRule(p.rule));
            }
        }
        ops.extend(
            new.neighbours
                .iter()
                .filter(|n| !old.neighbours.contains(n))
                .copied()
                .map(Op::AddNeighbour),
        );
        ops
    }

    /// The operations that remove what this plan added: policy rules, neighbours,
    /// policy tables' routes, routes, then addresses. The link itself, its MTU and its
    /// up state are left alone (the link is deleted by whoever created it). The rules
    /// come first: they are not tied to the link and must go even when it is gone.
    pub fn undo(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        let assigned = || self.policies.iter().filter(|p| p.table().is_some());
        ops.extend(assigned().map(|p| Op::DelRule(p.rule)));
        ops.extend(self.neighbours.iter().copied().map(Op::DelNeighbour));
        for p in assigned() {
            ops.extend(p.routes.iter().rev().copied().map(Op::DelRoute));
        }
        ops.extend(self.routes.iter().rev().copied().map(Op::DelRoute));
        ops.extend(self.addresses.iter().copied().map(Op::DelAddress));
        ops
    }
}

/// One kernel change on the interface of a plan. Adds have replace semantics and
/// deletes of something absent succeed, so every operation is idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Set the MTU; `prev` is what the plan had before, for rollback.
    SetMtu {
        /// The new MTU.
        mtu: Mtu,
        /// The MTU the previous plan set, if any.
        prev: Option<Mtu>,
    },
    /// Set the link's hardware address (only on a link just made, before it is up).
    SetMac([u8; 6]),
    /// Set the link up.
    SetUp,
    /// Add (replace) an address; IPv4 permanent, IPv6 permanent and without DAD.
    AddAddress(IpNet),
    /// Remove an address.
    DelAddress(IpNet),
    /// Add (replace) a route.
    AddRoute(Route),
    /// Remove the route to this destination through the interface.
    DelRoute(Route),
    /// Add (replace) a permanent neighbour entry.
    AddNeighbour(Neighbour),
    /// Remove a neighbour entry.
    DelNeighbour(Neighbour),
    /// Add a policy rule (nothing when an identical one is there). Not tied to the
    /// interface.
    AddRule(Rule),
    /// Remove a policy rule.
    DelRule(Rule),
}

impl Op {
    /// The operation that undoes this one, if it can be undone: adds and deletes swap,
    /// an MTU change goes back to the previous plan's MTU. Setting the link up and an
    /// MTU with no previous value are not undone.
    pub fn inverse(&self) -> Option<Op> {
        Some(match *self {
            Op::SetMtu { mtu, prev } => Op::SetMtu {
                mtu: prev?,
                prev: Some(mtu),
            },
            Op::SetUp | Op::SetMac(_) => return None,
            Op::AddAddress(a) => Op::DelAddress(a),
            Op::DelAddress(a) => Op::AddAddress(a),
            Op::AddRoute(r) => Op::DelRoute(r),
            Op::DelRoute(r) => Op::AddRoute(r),
            Op::AddNeighbour(n) => Op::DelNeighbour(n),
            Op::DelNeighbour(n) => Op::AddNeighbour(n),
            Op::AddRule(r) => Op::DelRule(r),
            Op::DelRule(r) => Op::AddRule(r),
        })
    }
}

/// The hardware address a pod interface gets from its first IP address: locally
/// administered unicast `02:fe:` followed by the IPv4 address, or by the last four
/// bytes of an IPv6 address.
///
/// Why: when heal replaces an endpoint (or a forwarder replaces a pair), the new
/// interface carries the same IP address; with the same hardware address too, the
/// peer's neighbour (ARP/NDP) entry stays right and traffic flows again at once,
/// instead of after the kernel's neighbour entry goes stale (15 to 45 s, measured
/// 46 s in the demo before this). Two interfaces of one connection never share an IP,
/// so they never share a hardware address.
pub fn stable_mac(ip: IpAddr) -> [u8; 6] {
    let tail = match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    [0x02, 0xfe, tail[0], tail[1], tail[2], tail[3]]
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::SetMtu { mtu, .. } => write!(f, "set mtu {}", mtu.get()),
            Op::SetMac(m) => write!(f, "set address {}", fmt_mac(m)),
            Op::SetUp => write!(f, "set up"),
            Op::AddAddress(a) => write!(f, "add address {a}"),
            Op::DelAddress(a) => write!(f, "delete address {a}"),
            Op::AddRoute(r) => write!(f, "add route {r}"),
            Op::DelRoute(r) => write!(f, "delete route {r}"),
            Op::AddNeighbour(n) => write!(f, "add neighbour {n}"),
            Op::DelNeighbour(n) => write!(f, "delete neighbour {n}"),
            Op::AddRule(r) => write!(f, "add rule {r}"),
            Op::DelRule(r) => write!(f, "delete rule {r}"),
        }
    }
}
