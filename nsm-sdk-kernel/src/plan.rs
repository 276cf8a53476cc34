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
//!
//! Route destinations are masked and keyed like the kernel keys them (by destination
//! in the main table), so a later route to the same destination replaces an earlier
//! one; routes with a gateway are installed `onlink`.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_proto::connectioncontext::{ConnectionContext, IpNeighbor, Route as ProtoRoute};

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
    pub const MAX_LEN: usize = nsm_sdk::tools::constants::MAX_INTERFACE_NAME_LEN;

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

/// A route through the interface of a plan. The destination is always masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    dst: IpNet,
    via: Option<IpAddr>,
    scope: RouteScope,
}

impl Route {
    /// A link-scope route to `dst` (the peer's address is on the wire).
    pub fn link(dst: IpNet) -> Route {
        Route {
            dst: dst.trunc(),
            via: None,
            scope: RouteScope::Link,
        }
    }

    /// A universe-scope route to `dst`, through the gateway `via` (installed `onlink`)
    /// or, without one, straight out of the interface.
    pub fn universe(dst: IpNet, via: Option<IpAddr>) -> Route {
        Route {
            dst: dst.trunc(),
            via,
            scope: RouteScope::Universe,
        }
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
        Ok(())
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
    addresses: Vec<IpNet>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
}

impl Plan {
    /// An empty plan for `ifname`: the link up, nothing else.
    pub fn new(ifname: IfName) -> Plan {
        Plan {
            ifname,
            alias: None,
            mtu: None,
            addresses: Vec::new(),
            routes: Vec::new(),
            neighbours: Vec::new(),
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

    /// Adds an address (with its prefix length, host bits kept: `192.0.2.1/24`).
    pub fn with_address(mut self, addr: IpNet) -> Plan {
        if !self.addresses.contains(&addr) {
            self.addresses.push(addr);
        }
        self
    }

    /// Adds a route; it replaces an earlier route to the same destination, as the
    /// kernel's `route replace` would.
    pub fn with_route(mut self, route: Route) -> Plan {
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
    pub fn changes(old: Option<&Plan>, new: &Plan) -> Vec<Op> {
        let Some(old) = old.filter(|o| o.ifname == new.ifname) else {
            let mut ops = Vec::new();
            if let Some(mtu) = new.mtu {
                ops.push(Op::SetMtu { mtu, prev: None });
            }
            ops.push(Op::SetUp);
            ops.extend(new.addresses.iter().copied().map(Op::AddAddress));
            ops.extend(new.routes.iter().copied().map(Op::AddRoute));
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
        ops.extend(
            old.routes
                .iter()
                .filter(|r| !kept(r))
                .copied()
                .map(Op::DelRoute),
        );
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
        ops.extend(
            new.neighbours
                .iter()
                .filter(|n| !old.neighbours.contains(n))
                .copied()
                .map(Op::AddNeighbour),
        );
        ops
    }

    /// The operations that remove what this plan added: neighbours, routes, then
    /// addresses. The link itself, its MTU and its up state are left alone (the link is
    /// deleted by whoever created it).
    pub fn undo(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        ops.extend(self.neighbours.iter().copied().map(Op::DelNeighbour));
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
            Op::SetUp => return None,
            Op::AddAddress(a) => Op::DelAddress(a),
            Op::DelAddress(a) => Op::AddAddress(a),
            Op::AddRoute(r) => Op::DelRoute(r),
            Op::DelRoute(r) => Op::AddRoute(r),
            Op::AddNeighbour(n) => Op::DelNeighbour(n),
            Op::DelNeighbour(n) => Op::AddNeighbour(n),
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::SetMtu { mtu, .. } => write!(f, "set mtu {}", mtu.get()),
            Op::SetUp => write!(f, "set up"),
            Op::AddAddress(a) => write!(f, "add address {a}"),
            Op::DelAddress(a) => write!(f, "delete address {a}"),
            Op::AddRoute(r) => write!(f, "add route {r}"),
            Op::DelRoute(r) => write!(f, "delete route {r}"),
            Op::AddNeighbour(n) => write!(f, "add neighbour {n}"),
            Op::DelNeighbour(n) => write!(f, "delete neighbour {n}"),
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
    plan.check()?;
    Ok(plan)
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
