//! `point_to_point`: an endpoint's IPAM that gives each connection a pair of host
//! addresses.
//!
//! What it does (server side, at the NSE): for each address family among its prefixes,
//! it gives the connection two addresses from the first prefix of that family with
//! room: `dst` for the endpoint and `src` for the client, as /32 (IPv4) or /128 (IPv6).
//! It writes them into the request's IP context: `src_ip_addrs += src`,
//! `dst_ip_addrs += dst`, `src_routes += dst` (the client reaches the endpoint) and
//! `dst_routes += src` (docs/KERNEL.md 2.2). Host addresses and host routes inside its
//! prefixes that are not the connection's (left over from a previous endpoint) are
//! removed, so a healed connection never carries two or swapped addresses.
//!
//! - IPv4 prefixes shorter than /31 never hand out their network and broadcast
//!   addresses.
//! - Nothing inside the request's `excluded_prefixes` is ever handed out; a refresh
//!   whose exclusions now cover the connection's addresses gets new ones.
//! - A refresh (same connection id) keeps its addresses.
//! - **Recovery**: a connection this instance does not know (say, after the endpoint
//!   restarted) whose request already carries a `src`/`dst` pair inside one prefix that
//!   is free gets exactly that pair back.
//! - Allocation is amortized O(1): each prefix keeps a cursor over addresses never
//!   handed out and a list of spare ranges behind it (freed addresses, and excluded
//!   ranges a request skipped); only when the cursor has swept the prefix are the
//!   spare ranges used.
//!
//! State: the allocations (connection id -> addresses, and the set of addresses in
//! use) behind a `std::sync::Mutex` that is never held across an await. Close frees a
//! connection's addresses; so does a failed first Request.
//!
//! Failure handled: a malformed address or prefix in the request's IP context is an
//! InvalidArgument naming the field and value; no free pair is Unavailable
//! ("no free addresses in ...").

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ipnet::IpNet;
use nsm_proto::connection::Connection;
use nsm_proto::connectioncontext::{IpContext, Route};
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::debug;

use crate::core::{Cx, Handler, Next};
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct PointToPoint {
    prefixes: Arc<[IpNet]>,
    state: Arc<Mutex<State>>,
    strict: bool,
}

/// The point-to-point IPAM handing out pairs from `prefixes` (tried in order, per
/// family).
///
/// ```
/// use nsm_sdk::handlers::point_to_point;
/// let ipam = point_to_point(vec!["10.0.0.0/24".parse().unwrap(), "fd00::/120".parse().unwrap()]);
/// assert_eq!(ipam.connections(), 0);
/// ```
pub fn point_to_point(prefixes: Vec<IpNet>) -> PointToPoint {
    let prefixes: Vec<IpNet> = prefixes.into_iter().map(|p| p.trunc()).collect();
    let pools = prefixes.iter().map(|p| Pool::new(*p)).collect();
    PointToPoint {
        prefixes: prefixes.into(),
        state: Arc::new(Mutex::new(State {
            pools,
            conns: HashMap::new(),
            in_use: HashSet::new(),
        })),
        strict: false,
    }
}

impl PointToPoint {
    /// Strict: drop every host address and host route of the request's context that
    /// this IPAM did not hand out, not only those inside its own prefixes. An endpoint
    /// that is the only IPAM of its connections wants this: after a reselect from
    /// another endpoint, the client's request still carries the old endpoint's pair,
    /// which would otherwise stay configured beside the new one.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Never hands out the first address of an IPv6 prefix (its Subnet-Router anycast
    /// address, RFC 4291 2.6.1), as IPv4 prefixes never hand out their network address.
    /// The vL3 IPAM wants it: a route to the vL3 network through an endpoint whose
    /// address is the network's own would be installed without its next hop
    /// (docs/KERNEL.md 2.2). Call it on a new IPAM, before any allocation.
    pub fn skip_v6_network_address(self) -> Self {
        {
            let mut state = self.lock();
            for pool in &mut state.pools {
                if pool.range.family == Family::V6
                    && pool.net.prefix_len() < 127
                    && pool.next == Some(pool.range.lo)
                {
                    pool.range.lo += 1;
                    pool.next = Some(pool.range.lo);
                }
            }
        }
        self
    }

    /// The prefixes addresses come from.
    pub fn prefixes(&self) -> &[IpNet] {
        &self.prefixes
    }

    /// How many connections hold addresses.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for PointToPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PointToPoint")
            .field("prefixes", &self.prefixes)
            .field("connections", &self.connections())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

/// An address as a number, with its family.
type Addr = (Family, u128);

fn to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    }
}

fn to_ip((family, n): Addr) -> IpAddr {
    match family {
        // Every V4 number came from a u32.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

fn host(a: Addr) -> String {
    let len = match a.0 {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    format!("{}/{len}", to_ip(a))
}

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy)]
struct Range {
    family: Family,
    lo: u128,
    hi: u128,
}

impl Range {
    fn of(net: &IpNet) -> Range {
        let (family, lo) = to_addr(net.network());
        let (_, hi) = to_addr(net.broadcast());
        Range { family, lo, hi }
    }

    fn contains(&self, (family, n): Addr) -> bool {
        self.family == family && self.lo <= n && n <= self.hi
    }
}

/// The last address of the excluded range that holds `a`, if one does.
fn excluded_until(excluded: &[Range], a: Addr) -> Option<u128> {
    excluded
        .iter()
        .filter(|r| r.contains(a))
        .map(|r| r.hi)
        .max()
}

/// One prefix: the addresses it may hand out, a cursor over those never handed out
/// and spare ranges behind the cursor that may be free.
struct Pool {
    net: IpNet,
    range: Range,
    /// The next address never handed out; `None` once the prefix is swept.
    next: Option<u128>,
    spare: VecDeque<(u128, u128)>,
}

impl Pool {
    fn new(net: IpNet) -> Pool {
        let mut range = Range::of(&net);
        if range.family == Family::V4 && net.prefix_len() < 31 {
            range.lo += 1;
            range.hi -= 1;
        }
        Pool {
            net,
            range,
            next: Some(range.lo),
            spare: VecDeque::new(),
        }
    }

    fn family(&self) -> Family {
        self.range.family
    }

    /// Takes one address that is neither in use nor excluded.
    fn take(&mut self, in_use: &mut HashSet<Addr>, excluded: &[Range]) -> Option<Addr> {
        let f = self.family();
        while let Some(n) = self.next {
            if n > self.range.hi {
                self.next = None;
                break;
            }
            if in_use.contains(&(f, n)) {
                self.next = n.checked_add(1);
                continue;
            }
            if let Some(hi) = excluded_until(excluded, (f, n)) {
                // Free for other requests: keep the skipped range as spare.
                let hi = hi.min(self.range.hi);
                self.spare.push_back((n, hi));
                self.next = hi.checked_add(1);
                continue;
            }
            in_use.insert((f, n));
            self.next = n.checked_add(1);
            return Some((f, n));
        }
        for _ in 0..self.spare.len() {
            let Some((mut lo, hi)) = self.spare.pop_front() else {
                break;
            };
            loop {
                if lo > hi {
                    break;
                }
                if in_use.contains(&(f, lo)) {
                    // In use: it comes back as spare when it is freed.
                    match lo.checked_add(1) {
                        Some(n) => lo = n,
                        None => break,
                    }
                    continue;
                }
                if let Some(ehi) = excluded_until(excluded, (f, lo)) {
                    let ehi = ehi.min(hi);
                    self.spare.push_back((lo, ehi));
                    match ehi.checked_add(1) {
                        Some(n) => lo = n,
                        None => break,
                    }
                    continue;
                }
                in_use.insert((f, lo));
                if lo < hi {
                    self.spare.push_front((lo + 1, hi));
                }
                return Some((f, lo));
            }
        }
        None
    }

    fn free(&mut self, in_use: &mut HashSet<Addr>, a: Addr) {
        in_use.remove(&a);
        if self.next.is_none_or(|n| a.1 < n) {
            self.spare.push_back((a.1, a.1));
        }
    }

    fn may_hand_out(&self, a: Addr) -> bool {
        self.range.contains(a)
    }
}

/// The addresses of one connection in one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pair {
    pool: usize,
    src: Addr,
    dst: Addr,
}

struct State {
    pools: Vec<Pool>,
    conns: HashMap<String, Vec<Pair>>,
    in_use: HashSet<Addr>,
}

/// The parsed parts of a request's IP context that allocation looks at.
struct Wanted {
    src: Vec<Addr>,
    dst: Vec<Addr>,
    excluded: Vec<Range>,
}

impl State {
    fn families(&self) -> Vec<Family> {
        let mut out = Vec::new();
        for p in &self.pools {
            if !out.contains(&p.family()) {
                out.push(p.family());
            }
        }
        out
    }

    fn release(&mut self, pairs: &[Pair]) {
        for p in pairs {
            let pool = &mut self.pools[p.pool];
            // dst first: a freed pair comes back in the same roles.
            pool.free(&mut self.in_use, p.dst);
            pool.free(&mut self.in_use, p.src);
        }
    }

    /// The pairs of connection `id`: kept on refresh, recovered from the request, or
    /// new. The flag says whether they were taken by this call.
    fn assign(&mut self, id: &str, wanted: &Wanted) -> Result<(Vec<Pair>, bool)> {
        if let Some(pairs) = self.conns.get(id) {
            let excluded = pairs.iter().any(|p| {
                excluded_until(&wanted.excluded, p.src).is_some()
                    || excluded_until(&wanted.excluded, p.dst).is_some()
            });
            if !excluded {
                return Ok((pairs.clone(), false));
            }
            debug!(connection.id = %id, "addresses now excluded; allocating new ones");
            if let Some(pairs) = self.conns.remove(id) {
                self.release(&pairs);
            }
        }
        if self.pools.is_empty() {
            return Err(Error::internal("point_to_point IPAM has no prefixes"));
        }
        let mut pairs = Vec::new();
        for family in self.families() {
            let pair = match self.recover(family, wanted) {
                Some(p) => Some(p),
                None => self.allocate(family, &wanted.excluded),
            };
            match pair {
                Some(p) => pairs.push(p),
                None => {
                    self.release(&pairs);
                    let nets: Vec<String> = self
                        .pools
                        .iter()
                        .filter(|p| p.family() == family)
                        .map(|p| p.net.to_string())
                        .collect();
                    let mut msg = format!("no free addresses in [{}]", nets.join(", "));
                    if !wanted.excluded.is_empty() {
                        msg.push_str(&format!(
                            " outside the {} excluded prefixes",
                            wanted.excluded.len()
                        ));
                    }
                    return Err(Error::unavailable(msg));
                }
            }
        }
        self.conns.insert(id.to_string(), pairs.clone());
        Ok((pairs, true))
    }

    /// A free pair the request already carries, inside one of our prefixes.
    fn recover(&mut self, family: Family, wanted: &Wanted) -> Option<Pair> {
        let usable = |s: &State, pool: &Pool, a: Addr| {
            pool.may_hand_out(a)
                && !s.in_use.contains(&a)
                && excluded_until(&wanted.excluded, a).is_none()
        };
        for (i, pool) in self.pools.iter().enumerate() {
            if pool.family() != family {
                continue;
            }
            for &src in &wanted.src {
                for &dst in &wanted.dst {
                    if src != dst && usable(self, pool, src) && usable(self, pool, dst) {
                        self.in_use.insert(src);
                        self.in_use.insert(dst);
                        return Some(Pair { pool: i, src, dst });
                    }
                }
            }
        }
        None
    }

    fn allocate(&mut self, family: Family, excluded: &[Range]) -> Option<Pair> {
        for (i, pool) in self.pools.iter_mut().enumerate() {
            if pool.family() != family {
                continue;
            }
            let Some(dst) = pool.take(&mut self.in_use, excluded) else {
                continue;
            };
            match pool.take(&mut self.in_use, excluded) {
                Some(src) => return Some(Pair { pool: i, src, dst }),
                None => pool.free(&mut self.in_use, dst),
            }
        }
        None
    }
}

/// The IP context of `conn`, made empty where it is missing.
pub(crate) fn ip_context_mut(conn: &mut Connection) -> &mut IpContext {
    conn.context
        .get_or_insert_with(Default::default)
        .ip_context
        .get_or_insert_with(Default::default)
}

fn parse_net(field: &str, s: &str) -> Result<IpNet> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            Error::invalid(format!(
                "ip_context.{field}: {s:?} is not an address or prefix (addr/len)"
            ))
        })
}

fn parse_addrs(field: &str, list: &[String]) -> Result<Vec<Addr>> {
    list.iter()
        .map(|s| parse_net(field, s).map(|n| to_addr(n.addr())))
        .collect()
}

/// Whether a host address or route `s` is inside one of `prefixes` and not in `ours`.
fn stale(field: &str, s: &str, prefixes: &[IpNet], strict: bool, ours: &[Addr]) -> Result<bool> {
    let net = parse_net(field, s)?;
    if net.prefix_len() != net.max_prefix_len() {
        return Ok(false);
    }
    let a = to_addr(net.addr());
    Ok((strict || prefixes.iter().any(|p| p.contains(&net.addr()))) && !ours.contains(&a))
}

/// Drops what a previous allocation left, then adds ours once.
fn write_context(
    ipc: &mut IpContext,
    prefixes: &[IpNet],
    strict: bool,
    pairs: &[Pair],
) -> Result<()> {
    let src: Vec<Addr> = pairs.iter().map(|p| p.src).collect();
    let dst: Vec<Addr> = pairs.iter().map(|p| p.dst).collect();
    let keep_addrs = |field: &str, list: &mut Vec<String>, ours: &[Addr]| -> Result<()> {
        let mut kept = Vec::with_capacity(list.len());
        for s in list.drain(..) {
            if !stale(field, &s, prefixes, strict, ours)? {
                kept.push(s);
            }
        }
        *list = kept;
        Ok(())
    };
    let keep_routes = |field: &str, list: &mut Vec<Route>, ours: &[Addr]| -> Result<()> {
        let mut kept = Vec::with_capacity(list.len());
        for r in list.drain(..) {
            if !stale(field, &r.prefix, prefixes, strict, ours)? {
                kept.push(r);
            }
        }
        *list = kept;
        Ok(())
    };
    keep_addrs("src_ip_addrs", &mut ipc.src_ip_addrs, &src)?;
    keep_addrs("dst_ip_addrs", &mut ipc.dst_ip_addrs, &dst)?;
    keep_routes("src_routes", &mut ipc.src_routes, &dst)?;
    keep_routes("dst_routes", &mut ipc.dst_routes, &src)?;

    let has_addr = |list: &[String], a: Addr| {
        list.iter()
            .any(|s| parse_net("", s).is_ok_and(|n| to_addr(n.addr()) == a))
    };
    let has_route = |list: &[Route], a: Addr| {
        list.iter().any(|r| {
            parse_net("", &r.prefix)
                .is_ok_and(|n| n.prefix_len() == n.max_prefix_len() && to_addr(n.addr()) == a)
        })
    };
    for p in pairs {
        if !has_addr(&ipc.src_ip_addrs, p.src) {
            ipc.src_ip_addrs.push(host(p.src));
        }
        if !has_addr(&ipc.dst_ip_addrs, p.dst) {
            ipc.dst_ip_addrs.push(host(p.dst));
        }
        if !has_route(&ipc.src_routes, p.dst) {
            ipc.src_routes.push(Route {
                prefix: host(p.dst),
                ..Default::default()
            });
        }
        if !has_route(&ipc.dst_routes, p.src) {
            ipc.dst_routes.push(Route {
                prefix: host(p.src),
                ..Default::default()
            });
        }
    }
    Ok(())
}

#[async_trait]
impl Handler for PointToPoint {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        if conn.id.is_empty() {
            return Err(Error::invalid(
                "point_to_point IPAM needs a connection id (put it after update_path)",
            ));
        }
        let id = conn.id.clone();
        let ipc = ip_context_mut(conn);
        let wanted = Wanted {
            src: parse_addrs("src_ip_addrs", &ipc.src_ip_addrs)?,
            dst: parse_addrs("dst_ip_addrs", &ipc.dst_ip_addrs)?,
            excluded: ipc
                .excluded_prefixes
                .iter()
                .map(|s| parse_net("excluded_prefixes", s).map(|n| Range::of(&n.trunc())))
                .collect::<Result<_>>()?,
        };
        let (pairs, fresh) = self.lock().assign(&id, &wanted)?;
        if let Err(e) = write_context(ipc, &self.prefixes, self.strict, &pairs) {
            if fresh {
                self.forget(&id);
            }
            return Err(e);
        }
        if fresh {
            debug!(
                connection.id = %id,
                src = ?ipc.src_ip_addrs,
                dst = ?ipc.dst_ip_addrs,
                "point_to_point: addresses assigned"
            );
        }
        match next.request(cx, req).await {
            Ok(conn) => Ok(conn),
            Err(e) => {
                if fresh {
                    self.forget(&id);
                }
                Err(e)
            }
        }
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let id = conn.id.clone();
        let out = next.close(cx, conn).await;
        self.forget(&id);
        out
    }
}

impl PointToPoint {
    fn forget(&self, id: &str) {
        let mut state = self.lock();
        if let Some(pairs) = state.conns.remove(id) {
            state.release(&pairs);
            debug!(connection.id = %id, "point_to_point: addresses freed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::handlers::test_support::request;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    async fn run(ipam: &PointToPoint, id: &str, ipc: IpContext) -> Result<IpContext> {
        let conn = Chain::builder()
            .push(ipam.clone())
            .build()
            .request(&mut Cx::server(), request(id, ipc))
            .await?;
        Ok(conn.context.unwrap().ip_context.unwrap())
    }

    fn routes(list: &[Route]) -> Vec<&str> {
        list.iter().map(|r| r.prefix.as_str()).collect()
    }

    async fn close(ipam: &PointToPoint, id: &str) {
        let conn = Connection {
            id: id.into(),
            ..Default::default()
        };
        Chain::builder()
            .push(ipam.clone())
            .build()
            .close(&mut Cx::server(), conn)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn gives_a_pair_with_routes_to_each_other_and_keeps_it_on_refresh() {
        let ipam = point_to_point(nets(&["10.0.0.0/24"]));
        let ipc = run(&ipam, "c1", IpContext::default()).await.unwrap();
        assert_eq!(ipc.dst_ip_addrs, ["10.0.0.1/32"]);
        assert_eq!(ipc.src_ip_addrs, ["10.0.0.2/32"]);
        assert_eq!(routes(&ipc.src_routes), ["10.0.0.1/32"]);
        assert_eq!(routes(&ipc.dst_routes), ["10.0.0.2/32"]);

        let again = run(&ipam, "c1", ipc.clone()).await.unwrap();
        assert_eq!(again, ipc);
        assert_eq!(ipam.connections(), 1);
    }

    #[tokio::test]
    async fn dual_stack_gets_a_pair_per_family() {
        let ipam = point_to_point(nets(&["fd00::/126", "192.168.0.0/31"]));
        let ipc = run(&ipam, "c1", IpContext::default()).await.unwrap();
        assert_eq!(ipc.dst_ip_addrs, ["fd00::/128", "192.168.0.0/32"]);
        assert_eq!(ipc.src_ip_addrs, ["fd00::1/128", "192.168.0.1/32"]);
    }

    #[tokio::test]
    async fn network_and_broadcast_are_skipped_and_exhaustion_is_unavailable() {
        let ipam = point_to_point(nets(&["10.0.0.0/30"]));
        let ipc = run(&ipam, "c1", IpContext::default()).await.unwrap();
        assert_eq!(ipc.dst_ip_addrs, ["10.0.0.1/32"]);
        assert_eq!(ipc.src_ip_addrs, ["10.0.0.2/32"]);
        let err = run(&ipam, "c2", IpContext::default()).await.unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable(m) if m == "no free addresses in [10.0.0.0/30]"),
            "{err}"
        );
        close(&ipam, "c1").await;
        assert_eq!(ipam.connections(), 0);
        let ipc = run(&ipam, "c2", IpContext::default()).await.unwrap();
        assert_eq!(ipc.dst_ip_addrs, ["10.0.0.1/32"]);
    }

    #[tokio::test]
    async fn the_next_prefix_is_used_when_the_first_is_full() {
        let ipam = point_to_point(nets(&["10.0.0.0/30", "10.1.0.0/30"]));
        run(&ipam, "c1", IpContext::default()).await.unwrap();
        let ipc = run(&ipam, "c2", IpContext::default()).await.unwrap();
        assert_eq!(ipc.dst_ip_addrs, ["10.1.0.1/32"]);
    }

    #[tokio::test]
    async fn excluded_prefixes_are_never_handed_out() {
        let ipam = point_to_point(nets(&["10.0.0.0/28"]));
        let excluding = || IpContext {
            excluded_prefixes: vec!["10.0.0.0/29".into(), "10.0.0.9".into()],
            ..Default::default()
        };
        let ipc = run(&ipam, "c1", excluding()).await.unwrap();
        assert_eq!(ipc.dst_ip_addrs, ["10.0.0.8/32"]);
        assert_eq!(ipc.src_ip_addrs, ["10.0.0.10/32"]);
        // Others may still have what c1's request excluded, once the rest is used up.
        for i in 2..=6 {
            run(&ipam, &format!("c{i}"), IpContext::default())
                .await
                .unwrap();
        }
        let mut all = HashSet::new();
        for i in 1..=6 {
            let ipc = run(&ipam, &format!("c{i}"), IpContext::default())
                .await
                .unwrap();
            all.extend(ipc.src_ip_addrs);
            all.extend(ipc.dst_ip_addrs);
        }
        // 14 usable addresses, 12 handed out, all different.
        assert_eq!(all.len(), 12);
        // An exclusion covering what is left fails without leaking a half pair.
        let err = run(&ipam, "c7", excluding()).await.unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable(m) if m.contains("excluded")),
            "{err}"
        );
        assert_eq!(ipam.connections(), 6);
    }

    #[tokio::test]
    async fn a_refresh_whose_exclusions_cover_its_addresses_gets_new_ones() {
        let ipam = point_to_point(nets(&["10.0.0.0/24"]));
        let ipc = run(&ipam, "c1", IpContext::default()).await.unwrap();
        let mut refresh = ipc.clone();
        refresh.excluded_prefixes = vec!["10.0.0.0/30".into()];
        let ipc = run(&ipam, "c1", refresh).await.unwrap();
        assert_eq!(ipc.dst_ip_addrs, ["10.0.0.4/32"]);
        assert_eq!(ipc.src_ip_addrs, ["10.0.0.5/32"]);
        assert_eq!(routes(&ipc.src_routes), ["10.0.0.4/32"]);
        assert_eq!(routes(&ipc.dst_routes), ["10.0.0.5/32"]);
    }

    #[tokio::test]
    async fn a_restarted_endpoint_recovers_the_addresses_the_request_carries() {
        let before = point_to_point(nets(&["10.0.0.0/24"]));
        for i in 0..5 {
            run(&before, &format!("other{i}"), IpContext::default())
                .await
                .unwrap();
        }
        let ipc = run(&before, "c1", IpContext::default()).await.unwrap();
        assert_eq!(ipc.dst_ip_addrs, ["10.0.0.11/32"]);

        let after = point_to_point(nets(&["10.0.0.0/24"]));
        let recovered = run(&after, "c1", ipc.clone()).await.unwrap();
        assert_eq!(recovered, ipc, "same addresses and routes, nothing doubled");
        // New connections do not get the recovered addresses.
        let fresh = run(&after, "c2", IpContext::default()).await.unwrap();
        assert_eq!(fresh.dst_ip_addrs, ["10.0.0.1/32"]);
        assert_eq!(fresh.src_ip_addrs, ["10.0.0.2/32"]);
        let next = run(&after, "c3", IpContext::default()).await.unwrap();
        assert_eq!(next.dst_ip_addrs, ["10.0.0.3/32"]);
        // Freed, the recovered pair is handed out again later, not lost.
        close(&after, "c1").await;
        assert_eq!(after.connections(), 2);
    }

    #[tokio::test]
    async fn addresses_taken_by_another_connection_are_replaced_not_doubled() {
        let ipam = point_to_point(nets(&["10.0.0.0/24"]));
        let first = run(&ipam, "c1", IpContext::default()).await.unwrap();
        // c2 arrives carrying c1's addresses (say from an endpoint it healed away from),
        // swapped, plus an address of another IPAM that must stay.
        let mut carried = IpContext {
            src_ip_addrs: first.dst_ip_addrs.clone(),
            dst_ip_addrs: first.src_ip_addrs.clone(),
            src_routes: first.dst_routes.clone(),
            dst_routes: first.src_routes.clone(),
            ..Default::default()
        };
        carried.src_ip_addrs.push("172.16.0.2/32".into());
        let ipc = run(&ipam, "c2", carried).await.unwrap();
        assert_eq!(ipc.src_ip_addrs, ["172.16.0.2/32", "10.0.0.4/32"]);
        assert_eq!(ipc.dst_ip_addrs, ["10.0.0.3/32"]);
        assert_eq!(routes(&ipc.src_routes), ["10.0.0.3/32"]);
        assert_eq!(routes(&ipc.dst_routes), ["10.0.0.4/32"]);
    }

    #[tokio::test]
    async fn malformed_addresses_name_the_field_and_value() {
        let ipam = point_to_point(nets(&["10.0.0.0/24"]));
        for (ipc, field, value) in [
            (
                IpContext {
                    src_ip_addrs: vec!["bogus".into()],
                    ..Default::default()
                },
                "src_ip_addrs",
                "bogus",
            ),
            (
                IpContext {
                    excluded_prefixes: vec!["10.0.0.0/40".into()],
                    ..Default::default()
                },
                "excluded_prefixes",
                "10.0.0.0/40",
            ),
            (
                IpContext {
                    dst_routes: vec![Route {
                        prefix: "x/1".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "dst_routes",
                "x/1",
            ),
        ] {
            let err = run(&ipam, "c1", ipc).await.unwrap_err();
            match err {
                Error::InvalidArgument(m) => {
                    assert!(m.contains(field) && m.contains(value), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(ipam.connections(), 0);
    }

    #[tokio::test]
    async fn a_thousand_connections_get_unique_addresses_and_close_frees_them() {
        let ipam = point_to_point(nets(&["10.0.0.0/21"]));
        let mut seen = HashSet::new();
        for i in 0..1000 {
            let ipc = run(&ipam, &format!("c{i}"), IpContext::default())
                .await
                .unwrap();
            for a in ipc.src_ip_addrs.into_iter().chain(ipc.dst_ip_addrs) {
                assert!(seen.insert(a.clone()), "{a} handed out twice");
            }
        }
        assert_eq!(seen.len(), 2000);
        for i in 0..1000 {
            close(&ipam, &format!("c{i}")).await;
        }
        assert_eq!(ipam.connections(), 0);
        assert!(ipam.lock().in_use.is_empty());
        // 2046 usable: after the sweep, freed addresses are handed out again.
        for i in 0..1023 {
            run(&ipam, &format!("d{i}"), IpContext::default())
                .await
                .unwrap();
        }
        assert!(run(&ipam, "one-too-many", IpContext::default())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_failed_first_request_frees_its_addresses() {
        struct Refuse;
        #[async_trait]
        impl Handler for Refuse {
            async fn request(
                &self,
                _: &mut Cx,
                _: NetworkServiceRequest,
                _: Next,
            ) -> Result<Connection> {
                Err(Error::unavailable("refused"))
            }
        }
        let ipam = point_to_point(nets(&["10.0.0.0/30"]));
        let chain = Chain::builder().push(ipam.clone()).push(Refuse).build();
        assert!(chain
            .request(&mut Cx::server(), request("c1", IpContext::default()))
            .await
            .is_err());
        assert_eq!(ipam.connections(), 0);
        run(&ipam, "c2", IpContext::default()).await.unwrap();
    }

    #[tokio::test]
    async fn strict_drops_a_previous_endpoints_pair_and_plain_keeps_it() {
        for (strict, expect_src) in [(true, 1), (false, 2)] {
            let ipam = point_to_point(vec!["10.1.0.0/24".parse().unwrap()]).strict(strict);
            let chain = crate::core::Chain::builder().push(ipam).build();
            let mut conn = Connection {
                id: "c".into(),
                ..Default::default()
            };
            conn.context = Some(nsm_proto::connectioncontext::ConnectionContext {
                ip_context: Some(IpContext {
                    src_ip_addrs: vec!["10.9.0.2/32".into()],
                    dst_ip_addrs: vec!["10.9.0.1/32".into()],
                    src_routes: vec![Route {
                        prefix: "10.9.0.1/32".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            });
            let out = chain
                .request(
                    &mut Cx::server(),
                    NetworkServiceRequest {
                        connection: Some(conn),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let ipc = out.context.unwrap().ip_context.unwrap();
            assert_eq!(
                ipc.src_ip_addrs.len(),
                expect_src,
                "strict {strict}: {ipc:?}"
            );
            assert_eq!(ipc.src_routes.len(), expect_src, "strict {strict}: {ipc:?}");
            assert!(ipc.src_ip_addrs.iter().any(|a| a.starts_with("10.1.0.")));
        }
    }
}
