//! Plan, then apply: the desired kernel state of one side of a connection as data.
//!
//! A [`Plan`] says what one pod interface should look like: its name, MTU, addresses,
//! routes and static neighbours. [`plan_from_context`] computes it from a connection's
//! `ConnectionContext` with NSM's rules (KERNEL.md 2.2), [`Plan::changes`] diffs two
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
//! on the client (NSC) side only (KERNEL.md 2.3): a routing table of its own holding
//! the policy's routes through the interface (a default route when it has none), and
//! a rule
//! `from <from> [ipproto <proto>] [sport <src_port>] [dport <dst_port>] lookup <table>`
//! with the action "to table" set explicitly (KERNEL.md 5.3: a rule without it
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

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nsm_proto::connectioncontext::{
    ConnectionContext, IpNeighbor, PolicyRoute, Route as ProtoRoute,
};

use crate::error::{Error, Result};

/// Which pod of a connection an interface belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PodSide {
    /// The client (NSC): gets `src_ip_addrs` and `src_routes`.
    Client,
    /// The endpoint (NSE): gets `dst_ip_addrs` and `dst_routes`.
    Endpoint,
}

/// A Linux interface name the kernel accepts: 1 to 15 bytes, not `.` or `..`, without
/// `/`, `:` or whitespace (the kernel's `dev_valid_name`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    /// The longest name, in bytes (`IFNAMSIZ` - 1).
    pub const MAX_LEN: usize = nsm_sdk::wire::MAX_INTERFACE_NAME_LEN;

    /// Validates `name`; a bad one is [`Error::InvalidInterfaceName`].
    pub fn new(name: impl Into<String>) -> Result<IfName> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("empty")
        } else if name.len() > Self::MAX_LEN {
            Some("longer than 15 bytes")
        } else if name == "." || name == ".." {
            Some("not a name")
        } else if name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            Some("contains '/', ':' or whitespace")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidInterfaceName { name, reason }),
            None => Ok(IfName(name)),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IfName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An interface MTU in `68..=65535` (the IPv4 minimum up to the largest veth MTU).
/// A plan with IPv6 addresses also needs at least 1280 ([`Plan::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mtu(u32);

impl Mtu {
    /// The smallest MTU an IPv4 interface may have.
    pub const MIN: u32 = 68;
    /// The largest MTU of an Ethernet-like device (`ETH_MAX_MTU`).
    pub const MAX: u32 = 65535;
    /// The smallest MTU with which the kernel keeps IPv6 enabled on a link.
    pub const MIN_IPV6: u32 = 1280;

    /// Validates `mtu`; out of range is [`Error::InvalidMtu`].
    pub fn new(mtu: u32) -> Result<Mtu> {
        if (Self::MIN..=Self::MAX).contains(&mtu) {
            Ok(Mtu(mtu))
        } else {
            Err(Error::InvalidMtu {
                mtu,
                reason: "outside 68..=65535",
            })
        }
    }

    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// The longest link alias the kernel takes, in bytes (`IFALIASZ` - 1).
pub const MAX_ALIAS_LEN: usize = 255;

/// The scope of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteScope {
    /// Directly reachable on the link (no gateway): `scope link`.
    Link,
    /// A normal route (`scope global`), with or without a gateway.
    Universe,
}

/// The kernel's main routing table (`RT_TABLE_MAIN`), where routes go by default.
pub const MAIN_TABLE: u32 = 254;

/// The lowest routing table id a [`Policy`] gets; ids 253 to 255 (the kernel's
/// `default`, `main` and `local` tables) are never taken.
pub const POLICY_TABLE_BASE: u32 = 100;

/// A route through the interface of a plan, in the main table unless
/// [`Route::in_table`] says otherwise. The destination is always masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    dst: IpNet,
    via: Option<IpAddr>,
    scope: RouteScope,
    table: u32,
}

impl Route {
    /// A link-scope route to `dst` (the peer's address is on the wire).
    pub fn link(dst: IpNet) -> Route {
        Route {
            dst: dst.trunc(),
            via: None,
            scope: RouteScope::Link,
            table: MAIN_TABLE,
        }
    }

    /// A universe-scope route to `dst`, through the gateway `via` (installed `onlink`)
    /// or, without one, straight out of the interface.
    pub fn universe(dst: IpNet, via: Option<IpAddr>) -> Route {
        Route {
            dst: dst.trunc(),
            via,
            scope: RouteScope::Universe,
            table: MAIN_TABLE,
        }
    }

    /// The same route in routing table `table` ([`MAIN_TABLE`] by default).
    pub fn in_table(mut self, table: u32) -> Route {
        self.table = table;
        self
    }

    /// The routing table.
    pub fn table(&self) -> u32 {
        self.table
    }

    /// The (masked) destination.
    pub fn dst(&self) -> IpNet {
        self.dst
    }

    /// The gateway, if any.
    pub fn via(&self) -> Option<IpAddr> {
        self.via
    }

    /// The scope.
    pub fn scope(&self) -> RouteScope {
        self.scope
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        if self.scope == RouteScope::Link {
            write!(f, " scope link")?;
        }
        if self.table != MAIN_TABLE {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

/// The IP version of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`ip -4 rule`).
    V4,
    /// IPv6 (`ip -6 rule`).
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A port range of a rule, `start..=end`, that the kernel accepts: it refuses port 0
/// and port 65535 in a rule (`Invalid dport range`), so `1 <= start <= end <= 65534`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// The largest port a rule can name.
    pub const MAX: u16 = 65534;

    /// `start..=end`, if the kernel would take it.
    pub fn new(start: u16, end: u16) -> Option<PortRange> {
        (start >= 1 && start <= end && end <= Self::MAX).then_some(PortRange { start, end })
    }

    /// Parses `"N"` or `"N-M"` (as NSM's `ParsePortRange`); `None` when malformed or
    /// out of range.
    pub fn parse(s: &str) -> Option<PortRange> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let port = |p: &str| {
            if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            p.parse::<u16>().ok()
        };
        PortRange::new(port(a)?, port(b)?)
    }

    /// The first port.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// The last port.
    pub fn end(&self) -> u16 {
        self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// A routing policy rule,
/// `from <prefix> [ipproto P] [sport R] [dport R] lookup <table>`, always with the
/// action "to table". What is not set matches anything. Table 0 means "not chosen
/// yet" ([`Plan::assign_tables`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    family: Family,
    from: Option<IpNet>,
    proto: Option<u8>,
    dst_port: Option<PortRange>,
    src_port: Option<PortRange>,
    table: u32,
}

impl Rule {
    /// A rule of `family` that matches every packet, with no table yet.
    pub fn new(family: Family) -> Rule {
        Rule {
            family,
            from: None,
            proto: None,
            dst_port: None,
            src_port: None,
            table: 0,
        }
    }

    /// Matches packets from `from` (masked); the rule takes its family.
    pub fn with_from(mut self, from: IpNet) -> Rule {
        self.family = Family::of(from.addr());
        self.from = Some(from.trunc());
        self
    }

    /// Matches IP protocol `proto` (6 = tcp, 17 = udp, ...).
    pub fn with_proto(mut self, proto: u8) -> Rule {
        self.proto = Some(proto);
        self
    }

    /// Matches destination ports `ports`.
    pub fn with_dst_port(mut self, ports: PortRange) -> Rule {
        self.dst_port = Some(ports);
        self
    }

    /// Matches source ports `ports`.
    pub fn with_src_port(mut self, ports: PortRange) -> Rule {
        self.src_port = Some(ports);
        self
    }

    /// Looks up routing table `table`.
    pub fn with_table(mut self, table: u32) -> Rule {
        self.table = table;
        self
    }

    /// The IP version.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The source prefix, if the rule has one.
    pub fn from(&self) -> Option<IpNet> {
        self.from
    }

    /// The IP protocol number, if the rule has one.
    pub fn proto(&self) -> Option<u8> {
        self.proto
    }

    /// The destination ports, if the rule has them.
    pub fn dst_port(&self) -> Option<PortRange> {
        self.dst_port
    }

    /// The source ports, if the rule has them.
    pub fn src_port(&self) -> Option<PortRange> {
        self.src_port
    }

    /// The table looked up (0: not chosen yet).
    pub fn table(&self) -> u32 {
        self.table
    }

    /// Whether both rules match the same packets (they may look up other tables).
    pub fn same_match(&self, other: &Rule) -> bool {
        self.with_table(0) == other.with_table(0)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.from, self.family) {
            (Some(from), _) => write!(f, "from {from}")?,
            (None, Family::V4) => write!(f, "from 0.0.0.0/0")?,
            (None, Family::V6) => write!(f, "from ::/0")?,
        }
        if let Some(p) = self.proto {
            write!(f, " ipproto {p}")?;
        }
        if let Some(r) = self.src_port {
            write!(f, " sport {r}")?;
        }
        if let Some(r) = self.dst_port {
            write!(f, " dport {r}")?;
        }
        write!(f, " lookup {}", self.table)
    }
}

/// A policy route of the client's interface: a [`Rule`] and the routes of the table
/// it looks up, all through the plan's interface. The table is chosen when the plan is
/// applied ([`Plan::assign_tables`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rule: Rule,
    routes: Vec<Route>,
}

impl Policy {
    /// A policy for `rule`, with no route yet.
    pub fn new(rule: Rule) -> Policy {
        Policy {
            rule,
            routes: Vec::new(),
        }
    }

    /// Adds a route to the policy's table; it replaces an earlier route to the same
    /// destination.
    pub fn with_route(mut self, route: Route) -> Policy {
        let route = route.in_table(self.rule.table);
        match self.routes.iter_mut().find(|r| r.dst == route.dst) {
            Some(r) => *r = route,
            None => self.routes.push(route),
        }
        self
    }

    /// The same policy with its rule and routes in table `table`.
    pub fn with_table(mut self, table: u32) -> Policy {
        self.rule.table = table;
        for r in &mut self.routes {
            r.table = table;
        }
        self
    }

    /// The rule.
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// The routes of its table.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The table, once chosen.
    pub fn table(&self) -> Option<u32> {
        (self.rule.table != 0).then_some(self.rule.table)
    }
}

/// A static (permanent) neighbour entry: `ip` is at `mac` on the interface's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Neighbour {
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its Ethernet address.
    pub mac: [u8; 6],
}

impl fmt::Display for Neighbour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.mac;
        write!(
            f,
            "{} lladdr {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            self.ip, m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

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

fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
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

/// The plan of one side's interface `ifname` for a connection context (see the
/// [module docs](self) for which fields go where).
///
/// A malformed address, prefix, next hop or MAC is [`Error::InvalidContext`] naming
/// the field and the value; a bad name or MTU (`context.MTU`, 0 = leave as is) is
/// [`Error::InvalidInterfaceName`] or [`Error::InvalidMtu`]. Plain addresses without a
/// prefix length are taken as host prefixes (/32, /128).
///
/// `ip_context.policies` go to the client's plan only (see [`policy_from_context`]);
/// the endpoint's plan ignores them, as Go's client-side chain has no `iprule`.
pub fn plan_from_context(ctx: &ConnectionContext, side: PodSide, ifname: &str) -> Result<Plan> {
    let mut plan = Plan::new(IfName::new(ifname)?);
    if ctx.mtu != 0 {
        plan = plan.with_mtu(Mtu::new(ctx.mtu)?);
    }
    let ipc = ctx.ip_context.clone().unwrap_or_default();
    let src = parse_nets("ip_context.src_ip_addrs", &ipc.src_ip_addrs)?;
    let dst = parse_nets("ip_context.dst_ip_addrs", &ipc.dst_ip_addrs)?;
    let src_routes = parse_routes("ip_context.src_routes", &ipc.src_routes)?;
    let dst_routes = parse_routes("ip_context.dst_routes", &ipc.dst_routes)?;
    let neighbours = parse_neighbours(&ipc.ip_neighbors)?;
    let (own, peer, routes) = match side {
        PodSide::Client => (src, dst, src_routes),
        PodSide::Endpoint => (dst, src, dst_routes),
    };
    if let Some(first) = own.first() {
        plan = plan.with_mac(stable_mac(first.addr()));
    }
    for a in &own {
        plan = plan.with_address(*a);
    }
    for p in &peer {
        if !own.iter().any(|o| o.contains(&p.addr())) {
            plan = plan.with_route(Route::link(*p));
        }
    }
    for (prefix, next_hop) in routes {
        let via = next_hop.or_else(|| {
            let same_family: Vec<&IpNet> = peer
                .iter()
                .filter(|p| p.addr().is_ipv4() == prefix.addr().is_ipv4())
                .collect();
            let first = same_family.first()?;
            let inside_peer = same_family.iter().any(|p| p.contains(&prefix.addr()));
            (!inside_peer).then(|| first.addr())
        });
        plan = plan.with_route(Route::universe(prefix, via));
    }
    for n in neighbours {
        plan = plan.with_neighbour(n);
    }
    if side == PodSide::Client {
        for p in &ipc.policies {
            plan = plan.with_policy(policy_from_context(p)?);
        }
    }
    plan.check()?;
    Ok(plan)
}

/// The [`Policy`] for one `PolicyRoute` of the context (without a table yet):
///
/// - `from`: a prefix or a plain address (a host prefix), empty = any source;
/// - `proto`: `tcp`, `udp`, `icmp`, `icmpv6`, `sctp` (any case) or a protocol number
///   1-255, empty = any;
/// - `dst_port`, `src_port`: `"N"` or `"N-M"` with `1 <= N <= M <= 65534` (what the
///   kernel takes), empty = any;
/// - `routes`: through the interface, with the route's own next hop (`onlink`) or
///   none; without routes, a default route of the rule's family (Go installs
///   `0.0.0.0/0` even for an IPv6 `from`, which leaves IPv6 traffic unrouted).
///
/// The rule's family is that of `from`; without `from` it is IPv6 when every route is
/// IPv6, else IPv4. A bad value is [`Error::InvalidContext`] naming the field
/// (`ip_context.policies.proto`, ...).
pub fn policy_from_context(p: &PolicyRoute) -> Result<Policy> {
    let routes = parse_routes("ip_context.policies.routes", &p.routes)?;
    let from = match p.from.as_str() {
        "" => None,
        s => Some(parse_net("ip_context.policies.from", s)?),
    };
    let family = match from {
        Some(net) => Family::of(net.addr()),
        None if !routes.is_empty() && routes.iter().all(|(n, _)| n.addr().is_ipv6()) => Family::V6,
        None => Family::V4,
    };
    let mut rule = Rule::new(family);
    if let Some(net) = from {
        rule = rule.with_from(net);
    }
    if !p.proto.is_empty() {
        rule = rule.with_proto(parse_proto(&p.proto)?);
    }
    let ports = |field: &'static str, s: &str| -> Result<Option<PortRange>> {
        if s.is_empty() {
            return Ok(None);
        }
        PortRange::parse(s)
            .map(Some)
            .ok_or_else(|| Error::InvalidContext {
                field,
                value: s.to_string(),
                reason: "is not a port or port range (N or N-M, 1 <= N <= M <= 65534)",
            })
    };
    if let Some(r) = ports("ip_context.policies.dst_port", &p.dst_port)? {
        rule = rule.with_dst_port(r);
    }
    if let Some(r) = ports("ip_context.policies.src_port", &p.src_port)? {
        rule = rule.with_src_port(r);
    }
    let mut policy = Policy::new(rule);
    if routes.is_empty() {
        let any = match family {
            Family::V4 => IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            Family::V6 => IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        if let Ok(any) = any {
            policy = policy.with_route(Route::universe(any, None));
        }
    }
    for (prefix, via) in routes {
        policy = policy.with_route(Route::universe(prefix, via));
    }
    Ok(policy)
}

/// An IP protocol by name or number (1-255).
fn parse_proto(s: &str) -> Result<u8> {
    let by_name = match s.to_ascii_lowercase().as_str() {
        "icmp" => Some(1),
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmpv6" | "ipv6-icmp" => Some(58),
        "sctp" => Some(132),
        _ => None,
    };
    by_name
        .or_else(|| s.parse::<u8>().ok().filter(|n| *n != 0))
        .ok_or_else(|| Error::InvalidContext {
            field: "ip_context.policies.proto",
            value: s.to_string(),
            reason: "is not an IP protocol (tcp, udp, icmp, icmpv6, sctp or a number 1-255)",
        })
}

fn parse_net(field: &'static str, s: &str) -> Result<IpNet> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| Error::InvalidContext {
            field,
            value: s.to_string(),
            reason: "is not an address or prefix (addr/len)",
        })
}

fn parse_nets(field: &'static str, list: &[String]) -> Result<Vec<IpNet>> {
    list.iter().map(|s| parse_net(field, s)).collect()
}

fn parse_routes(field: &'static str, list: &[ProtoRoute]) -> Result<Vec<(IpNet, Option<IpAddr>)>> {
    list.iter()
        .map(|r| {
            let prefix = parse_net(field, &r.prefix)?;
            let via = match r.next_hop.as_str() {
                "" => None,
                s => Some(s.parse::<IpAddr>().map_err(|_| Error::InvalidContext {
                    field,
                    value: s.to_string(),
                    reason: "is not a next hop address",
                })?),
            };
            Ok((prefix, via))
        })
        .collect()
}

fn parse_neighbours(list: &[IpNeighbor]) -> Result<Vec<Neighbour>> {
    list.iter()
        .map(|n| {
            let ip = n.ip.parse::<IpAddr>().map_err(|_| Error::InvalidContext {
                field: "ip_context.ip_neighbors",
                value: n.ip.clone(),
                reason: "is not an IP address",
            })?;
            let mac = parse_mac(&n.hardware_address).ok_or_else(|| Error::InvalidContext {
                field: "ip_context.ip_neighbors",
                value: n.hardware_address.clone(),
                reason: "is not an Ethernet address (aa:bb:cc:dd:ee:ff)",
            })?;
            Ok(Neighbour { ip, mac })
        })
        .collect()
}

/// `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests;
