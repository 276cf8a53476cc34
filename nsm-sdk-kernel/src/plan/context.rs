//! A plan from a connection's `ConnectionContext`: [`plan_from_context`] and
//! [`policy_from_context`] (see the [module docs](super) for which fields go where).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nsm_proto::connectioncontext::{
    ConnectionContext, IpNeighbor, PolicyRoute, Route as ProtoRoute,
};

use crate::error::{Error, Result};

use super::{
    stable_mac, Family, IfName, Mtu, Neighbour, Plan, PodSide, Policy, PortRange, Route, Rule,
};

/// The plan of one side's interface `ifname` for a connection context (see the
/// [module docs](super) for which fields go where).
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

/// A hardware address written `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff`; `None` for
/// anything else.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
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
