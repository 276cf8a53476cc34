//! Plan, then apply: the desired kernel state of one side of a connection as data.
//!
//! A [`Plan`] says what one pod interface should look like: its name, MTU, addresses,
//! routes and static neighbours. [`plan_from_context`] computes it from a connection's
//! `ConnectionContext` with NSM's rules (docs/KERNEL.md 2.2), [`Plan::changes`] diffs two
//! plans into the [`Op`]s that turn one into the other, and [`crate::apply()`] runs them
//! through a [`crate::Netlink`]. Everything here is pure, so it is tested without root.
//!
//! Which addresses and routes go where (`src` = client, `dst` = endpoint):
//!
//! | | client interface ([`PodSide::Client`]) | endpoint interface ([`PodSide::Endpoint`]) |
//! |---|---|---|
//! | addresses | `src_ip_addrs` | `dst_ip_addrs` |
//! | link-scope routes | each `dst_ip_addr` not inside an own prefix | each `src_ip_addr` not inside an own prefix |
//! | universe routes | `src_routes`, next hop = its own, else the first `dst_ip_addr` of the family unless the prefix is inside a `dst` net | `dst_routes`, the same with `src_ip_addrs` |
//! | neighbours | `ip_neighbors` | `ip_neighbors` |
//! | policy routes | `policies` | — |
//!
//! Route destinations are masked and keyed like the kernel keys them (by destination
//! in the main table), so a later route to the same destination replaces an earlier
//! one; routes with a gateway are installed `onlink`.
//!
//! # Policy routes
//!
//! Each `PolicyRoute { from, proto, dst_port, src_port, routes }` of the context
//! becomes a [`Policy`] of the client's plan, as Go's sdk-kernel `iprule` element does
//! on the client (NSC) side only (docs/KERNEL.md 2.3): a routing table of its own holding
//! the policy's routes through the interface (a default route when it has none), and
//! a rule
//! `from <from> [ipproto <proto>] [sport <src_port>] [dport <dst_port>] lookup <table>`
//! with the action "to table" set explicitly (docs/KERNEL.md 5.3: a rule without it
//! installs but makes every matching packet fail with EINVAL).
//!
//! Table ids are chosen when the plan is applied ([`crate::update`], which calls
//! [`Plan::assign_tables`]) and remembered in the plan: a policy keeps the table of
//! the same policy (same rule) in the previous plan, takes over the table of an
//! identical rule already in the kernel (left by a forwarder that died), or gets the
//! lowest id from [`POLICY_TABLE_BASE`] up that no rule and no route of the namespace
//! uses. So an unchanged refresh changes nothing, a changed policy replaces the old
//! one, and undoing the plan removes its rules and their tables' routes. Two policies
//! with the same rule are one (the later one wins), as Go keys them.

mod context;
mod diff;
mod policy;
mod types;

pub use context::{parse_mac, plan_from_context, policy_from_context};
pub use diff::{stable_mac, Op};
pub use policy::{Family, Policy, PortRange, Rule};
pub use types::{
    fmt_mac, IfName, Mtu, Neighbour, PodSide, Route, RouteScope, MAIN_TABLE, MAX_ALIAS_LEN,
    POLICY_TABLE_BASE,
};

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::error::{Error, Result};

/// The desired state of one pod interface. Built with [`plan_from_context`] or by hand
/// with the `with_*` methods; each keeps the plan normalized (no duplicate address,
/// one route per destination, one neighbour per IP), so two plans that mean the same
/// kernel state compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Plan {
    ifname: IfName,
    alias: Option<String>,
    mtu: Option<Mtu>,
    mac: Option<[u8; 6]>,
    addresses: Vec<IpNet>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
    policies: Vec<Policy>,
}

impl Plan {
    /// An empty plan for `ifname`: the link up, nothing else.
    pub fn new(ifname: IfName) -> Plan {
        Plan {
            ifname,
            alias: None,
            mtu: None,
            mac: None,
            addresses: Vec::new(),
            routes: Vec::new(),
            neighbours: Vec::new(),
            policies: Vec::new(),
        }
    }

    /// Marks the interface with `alias`, the connection that owns it (see
    /// [`crate::veth_alias`]). The alias is not an [`Op`]: whoever creates the link
    /// sets it ([`crate::veth_up`], [`crate::Created::refresh`]), and it lets a later
    /// creation recognise a leftover of the same connection.
    pub fn with_alias(mut self, alias: impl Into<String>) -> Plan {
        self.alias = Some(alias.into());
        self
    }

    /// Sets the MTU (without one, the link keeps the MTU it has).
    pub fn with_mtu(mut self, mtu: Mtu) -> Plan {
        self.mtu = Some(mtu);
        self
    }

    /// Gives the link this hardware address when it is created (a refresh leaves the
    /// address of a live link alone).
    pub fn with_mac(mut self, mac: [u8; 6]) -> Plan {
        self.mac = Some(mac);
        self
    }

    /// The hardware address the link gets when created, if the plan sets one.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    /// Adds an address (with its prefix length, host bits kept: `192.0.2.1/24`).
    pub fn with_address(mut self, addr: IpNet) -> Plan {
        if !self.addresses.contains(&addr) {
            self.addresses.push(addr);
        }
        self
    }

    /// Adds a route (in the main table); it replaces an earlier route to the same
    /// destination, as the kernel's `route replace` would.
    pub fn with_route(mut self, route: Route) -> Plan {
        let route = route.in_table(MAIN_TABLE);
        match self.routes.iter_mut().find(|r| r.dst == route.dst) {
            Some(r) => *r = route,
            None => self.routes.push(route),
        }
        self
    }

    /// Adds a static neighbour; it replaces an earlier entry for the same IP.
    pub fn with_neighbour(mut self, n: Neighbour) -> Plan {
        match self.neighbours.iter_mut().find(|x| x.ip == n.ip) {
            Some(x) => *x = n,
            None => self.neighbours.push(n),
        }
        self
    }

    /// Adds a policy route; it replaces an earlier policy whose rule matches the same
    /// packets.
    pub fn with_policy(mut self, policy: Policy) -> Plan {
        match self
            .policies
            .iter_mut()
            .find(|p| p.rule.same_match(&policy.rule))
        {
            Some(p) => *p = policy,
            None => self.policies.push(policy),
        }
        self
    }

    /// The interface.
    pub fn ifname(&self) -> &IfName {
        &self.ifname
    }

    /// The alias, if the plan sets one.
    pub fn alias(&self) -> Option<&str> {
        self.alias.as_deref()
    }

    /// The MTU, if the plan sets one.
    pub fn mtu(&self) -> Option<Mtu> {
        self.mtu
    }

    /// The addresses, in order.
    pub fn addresses(&self) -> &[IpNet] {
        &self.addresses
    }

    /// The routes, link-scope ones first when built from a context.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The static neighbours.
    pub fn neighbours(&self) -> &[Neighbour] {
        &self.neighbours
    }

    /// The policy routes, with their tables once [`Plan::assign_tables`] chose them.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The previous plan's policies, when it is a plan of the same interface.
    fn same_link<'a>(&self, old: Option<&'a Plan>) -> &'a [Policy] {
        old.filter(|o| o.ifname == self.ifname)
            .map_or(&[], |o| o.policies.as_slice())
    }

    /// Whether some policy needs a new table, i.e. [`Plan::assign_tables`] needs to
    /// know the tables and rules of the namespace.
    pub fn needs_tables(&self, old: Option<&Plan>) -> bool {
        let old = self.same_link(old);
        self.policies.iter().any(|p| {
            p.table().is_none()
                && !old
                    .iter()
                    .any(|o| o.table().is_some() && o.rule.same_match(&p.rule))
        })
    }

    /// Chooses the table of every policy that has none, and returns the plan with
    /// them (the tables are remembered in the plan, for the next diff and for undo):
    ///
    /// 1. the table of the policy with the same rule in `old` (a refresh);
    /// 2. else the table of an identical rule already in the kernel (`rules`, left by
    ///    a forwarder that died), when it is at least [`POLICY_TABLE_BASE`];
    /// 3. else the lowest id from [`POLICY_TABLE_BASE`] up that is not in `in_use`
    ///    (tables that hold a route or that a rule looks up), not one of `old`'s and
    ///    not taken by another policy of this plan; 253 to 255 are skipped.
    ///
    /// `in_use` and `rules` matter only when [`Plan::needs_tables`] is true.
    pub fn assign_tables(
        mut self,
        old: Option<&Plan>,
        in_use: &BTreeSet<u32>,
        rules: &[Rule],
    ) -> Result<Plan> {
        let old = self.same_link(old);
        let mut claimed: BTreeSet<u32> = self.policies.iter().filter_map(Policy::table).collect();
        let mut avoid: BTreeSet<u32> = in_use.clone();
        avoid.extend(old.iter().filter_map(Policy::table));
        let ours = |t: u32| t >= POLICY_TABLE_BASE && !(253..=255).contains(&t);
        for i in 0..self.policies.len() {
            let p = &self.policies[i];
            if p.table().is_some() {
                continue;
            }
            let from_old = old
                .iter()
                .filter(|o| o.rule.same_match(&p.rule))
                .find_map(Policy::table)
                .filter(|t| !claimed.contains(t));
            let recovered = || {
                rules
                    .iter()
                    .filter(|r| r.same_match(&p.rule))
                    .map(Rule::table)
                    .find(|t| ours(*t) && !claimed.contains(t))
            };
            let table = match from_old.or_else(recovered) {
                Some(t) => t,
                None => {
                    let mut t = POLICY_TABLE_BASE;
                    while !ours(t) || avoid.contains(&t) || claimed.contains(&t) {
                        t = t.checked_add(1).ok_or_else(|| Error::InvalidContext {
                            field: "ip_context.policies",
                            value: p.rule.to_string(),
                            reason: "has no free routing table left",
                        })?;
                    }
                    t
                }
            };
            claimed.insert(table);
            self.policies[i] = self.policies[i].clone().with_table(table);
        }
        Ok(self)
    }

    /// Checks what only the whole plan shows: an MTU below 1280 with an IPv6 address
    /// (the kernel would silently disable IPv6 on the link), and an alias the kernel
    /// would refuse (empty, over [`MAX_ALIAS_LEN`] bytes, or with a NUL byte).
    pub fn check(&self) -> Result<()> {
        if let Some(alias) = &self.alias {
            let reason = if alias.is_empty() {
                Some("empty (an empty alias removes it)")
            } else if alias.len() > MAX_ALIAS_LEN {
                Some("longer than 255 bytes")
            } else if alias.contains('\0') {
                Some("contains a NUL byte")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Error::InvalidAlias {
                    alias: alias.clone(),
                    reason,
                });
            }
        }
        let has_v6 = self.addresses.iter().any(|a| matches!(a, IpNet::V6(_)));
        match self.mtu {
            Some(m) if has_v6 && m.get() < Mtu::MIN_IPV6 => Err(Error::InvalidMtu {
                mtu: m.get(),
                reason: "below 1280, the IPv6 minimum, on an interface with IPv6 addresses",
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
