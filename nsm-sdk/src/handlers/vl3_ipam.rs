//! `vl3_ipam`: the addresses and routes a vL3 endpoint gives each connection.
//!
//! What it does (server side, at a vL3 endpoint): it waits for the endpoint's own
//! prefixes ([`Vl3Prefixes`], one per family, from the prefix server; a Request that
//! comes before them waits, up to its deadline), then hands out a host pair per family
//! from them through a strict [`point_to_point`](super::point_to_point) IPAM (`src` for
//! the client, `dst` for the endpoint's end of the link) and adds the vL3 routes to
//! `src_routes` (installed in the client's namespace via the endpoint's address):
//! The first address of an IPv6 prefix is never handed out (as IPv4's network address
//! is not): a client whose next hop were the vL3 network's own address would get its
//! route to the network without that next hop (docs/KERNEL.md 2.2).
//!
//! - an ordinary client gets a route to each vL3 network (`172.16.0.0/16`): every
//!   other member is reached through this endpoint, which routes;
//! - another vL3 endpoint announces its own prefixes in `dst_routes` (see
//!   [`vl3_client`](super::vl3_client)); it gets a route to this endpoint's prefixes
//!   only, and its announced prefixes stay in `dst_routes` (installed here, via its
//!   address): the two routers reach each other's clients through this link.
//!
//! vL3 routes from an earlier answer (a route inside a vL3 network that is not a host
//! route) are replaced, so a connection that moved from another endpoint, or whose
//! endpoint's prefix changed, carries only the current ones. **Strict**: when the
//! endpoint's prefixes change (the prefix server gave new ones), the next Request of
//! each connection (its refresh) gets a new pair from the new prefix and loses the old
//! one; later refreshes keep the new pair.
//!
//! State: the point-to-point IPAM of the current prefixes (rebuilt when they change)
//! behind a `std::sync::Mutex` never held across an await.
//!
//! Failure handled: no prefix known by the deadline is Unavailable; an announced prefix
//! that overlaps this endpoint's own (two endpoints on one prefix) is InvalidArgument;
//! a malformed route or address is InvalidArgument (from the IPAM).

use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ipnet::IpNet;
use nsm_proto::connection::Connection;
use nsm_proto::connectioncontext::Route;
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::debug;

use super::point_to_point::{ip_context_mut, point_to_point, PointToPoint};
use crate::core::{Cx, Handler, Next};
use crate::ipam::Vl3Prefixes;
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct Vl3Ipam {
    prefixes: Vl3Prefixes,
    networks: Arc<[IpNet]>,
    current: Arc<Mutex<Option<PointToPoint>>>,
}

impl fmt::Debug for Vl3Ipam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vl3Ipam")
            .field("prefixes", &self.prefixes)
            .field("networks", &self.networks)
            .finish()
    }
}

/// The vL3 IPAM of an endpoint holding `prefixes`, in the vL3 `networks` (one per
/// family; a family without a network routes only to the endpoint's own prefix).
///
/// ```
/// use nsm_sdk::handlers::vl3_ipam;
/// use nsm_sdk::ipam::Vl3Prefixes;
/// let prefixes = Vl3Prefixes::fixed(vec!["172.16.1.0/24".parse().unwrap()]);
/// let ipam = vl3_ipam(prefixes, vec!["172.16.0.0/16".parse().unwrap()]);
/// assert_eq!(ipam.connections(), 0);
/// ```
pub fn vl3_ipam(prefixes: Vl3Prefixes, networks: Vec<IpNet>) -> Vl3Ipam {
    Vl3Ipam {
        prefixes,
        networks: networks.into_iter().map(|n| n.trunc()).collect(),
        current: Arc::new(Mutex::new(None)),
    }
}

impl Vl3Ipam {
    /// How many connections hold addresses from the current prefixes.
    pub fn connections(&self) -> usize {
        self.lock().as_ref().map_or(0, |p| p.connections())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PointToPoint>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The IPAM of `own`, made anew when the prefixes changed.
    fn ipam_for(&self, own: &[IpNet]) -> PointToPoint {
        let mut cur = self.lock();
        match cur.as_ref() {
            Some(p) if p.prefixes() == own => p.clone(),
            _ => {
                debug!(prefixes = ?own, "vl3_ipam: new prefixes");
                let p = point_to_point(own.to_vec())
                    .strict(true)
                    .skip_v6_network_address();
                *cur = Some(p.clone());
                p
            }
        }
    }

    fn in_network(&self, net: &IpNet) -> bool {
        self.networks.iter().any(|n| n.contains(net))
    }

    /// What an ordinary client routes through this endpoint: the network of each
    /// family, or the endpoint's own prefix where the family has no network.
    fn client_routes(&self, own: &[IpNet]) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.networks.to_vec();
        for p in own {
            if !out.iter().any(|n| n.max_prefix_len() == p.max_prefix_len()) {
                out.push(*p);
            }
        }
        out
    }
}

fn parse_route(field: &str, r: &Route) -> Result<IpNet> {
    r.prefix
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| Error::invalid(format!("ip_context.{field}: {:?} is no prefix", r.prefix)))
}

fn is_host(n: &IpNet) -> bool {
    n.prefix_len() == n.max_prefix_len()
}

#[async_trait]
impl Handler for Vl3Ipam {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let own = self.prefixes.known(cx.deadline()).await?;
        let ipam = self.ipam_for(&own);
        let ipc = ip_context_mut(req.connection.get_or_insert_with(Default::default));
        // A peer router announces its prefixes as dst routes inside the network.
        let mut announced = Vec::new();
        for r in &ipc.dst_routes {
            let net = parse_route("dst_routes", r)?;
            if !is_host(&net) && self.in_network(&net) {
                if own.iter().any(|o| o.contains(&net) || net.contains(o)) {
                    return Err(Error::invalid(format!(
                        "announced vL3 prefix {net} overlaps this endpoint's {own:?}"
                    )));
                }
                announced.push(net);
            }
        }
        // Keep the current vL3 routes where they are, drop those of an earlier answer,
        // add the missing ones.
        let wanted = if announced.is_empty() {
            self.client_routes(&own)
        } else {
            own.clone()
        };
        let mut kept = Vec::with_capacity(ipc.src_routes.len() + wanted.len());
        let mut present = Vec::new();
        for r in ipc.src_routes.drain(..) {
            let net = parse_route("src_routes", &r)?;
            let vl3 = !is_host(&net) && (self.in_network(&net) || own.contains(&net));
            if !vl3 || (wanted.contains(&net) && !present.contains(&net)) {
                present.push(net);
                kept.push(r);
            }
        }
        for net in wanted {
            if !present.contains(&net) {
                kept.push(Route {
                    prefix: net.to_string(),
                    ..Default::default()
                });
            }
        }
        ipc.src_routes = kept;
        ipam.request(cx, req, next).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let cur = self.lock().clone();
        match cur {
            Some(ipam) => ipam.close(cx, conn, next).await,
            None => next.close(cx, conn).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::handlers::test_support::request;
    use nsm_proto::connectioncontext::IpContext;
    use std::time::Duration;

    fn ipc(conn: &Connection) -> IpContext {
        conn.context.clone().unwrap().ip_context.unwrap()
    }

    fn routes(list: &[Route]) -> Vec<String> {
        list.iter().map(|r| r.prefix.clone()).collect()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_client_gets_a_pair_from_the_prefix_and_a_route_to_each_network() {
        let prefixes = Vl3Prefixes::fixed(vec![net("172.16.1.0/24"), net("fd10::100/120")]);
        let ipam = vl3_ipam(prefixes, vec![net("172.16.0.0/16")]);
        let chain = Chain::builder().push(ipam.clone()).build();
        let conn = chain
            .request(&mut Cx::server(), request("c1", IpContext::default()))
            .await
            .unwrap();
        let ipc = ipc(&conn);
        assert_eq!(ipc.src_ip_addrs, ["172.16.1.2/32", "fd10::102/128"]);
        assert_eq!(ipc.dst_ip_addrs, ["172.16.1.1/32", "fd10::101/128"]);
        // The v4 network, the v6 family's own prefix (no v6 network), the pair's routes.
        assert_eq!(
            routes(&ipc.src_routes),
            [
                "172.16.0.0/16",
                "fd10::100/120",
                "172.16.1.1/32",
                "fd10::101/128"
            ]
        );
        assert_eq!(routes(&ipc.dst_routes), ["172.16.1.2/32", "fd10::102/128"]);
        // A refresh keeps everything, once.
        let again = chain
            .request(&mut Cx::server(), request("c1", ipc.clone()))
            .await
            .unwrap();
        assert_eq!(self::ipc(&again), ipc);
        chain.close(&mut Cx::server(), conn).await.unwrap();
        assert_eq!(ipam.connections(), 0);
    }

    #[tokio::test]
    async fn a_peer_router_gets_a_route_to_this_prefix_and_keeps_its_announcement() {
        let prefixes = Vl3Prefixes::fixed(vec![net("172.16.1.0/24")]);
        let chain = Chain::builder()
            .push(vl3_ipam(prefixes, vec![net("172.16.0.0/16")]))
            .build();
        let announce = IpContext {
            dst_routes: vec![Route {
                prefix: "172.16.2.0/24".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let conn = chain
            .request(&mut Cx::server(), request("peer", announce))
            .await
            .unwrap();
        let ipc = ipc(&conn);
        assert_eq!(routes(&ipc.src_routes), ["172.16.1.0/24", "172.16.1.1/32"]);
        assert_eq!(routes(&ipc.dst_routes), ["172.16.2.0/24", "172.16.1.2/32"]);
        // Announcing this endpoint's own prefix is refused.
        let own = IpContext {
            dst_routes: vec![Route {
                prefix: "172.16.1.0/25".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = chain
            .request(&mut Cx::server(), request("bad", own))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn strict_a_refresh_after_a_prefix_change_gets_a_pair_from_the_new_prefix() {
        let prefixes = Vl3Prefixes::fixed(vec![net("172.16.1.0/24")]);
        let chain = Chain::builder()
            .push(vl3_ipam(prefixes.clone(), vec![net("172.16.0.0/16")]))
            .build();
        let first = chain
            .request(&mut Cx::server(), request("c", IpContext::default()))
            .await
            .unwrap();
        prefixes.set(vec![net("172.16.5.0/24")]);
        let second = chain
            .request(&mut Cx::server(), request("c", ipc(&first)))
            .await
            .unwrap();
        let ipc2 = ipc(&second);
        assert_eq!(ipc2.src_ip_addrs, ["172.16.5.2/32"]);
        assert_eq!(ipc2.dst_ip_addrs, ["172.16.5.1/32"]);
        assert_eq!(routes(&ipc2.src_routes), ["172.16.0.0/16", "172.16.5.1/32"]);
        assert_eq!(routes(&ipc2.dst_routes), ["172.16.5.2/32"]);
        let third = chain
            .request(&mut Cx::server(), request("c", ipc2.clone()))
            .await
            .unwrap();
        assert_eq!(ipc(&third), ipc2, "later refreshes keep the new pair");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_the_prefix_up_to_its_deadline() {
        let prefixes = Vl3Prefixes::new();
        let chain = Chain::builder()
            .push(vl3_ipam(prefixes.clone(), vec![net("172.16.0.0/16")]))
            .build();
        let mut cx = Cx::server().with_timeout(Duration::from_millis(100));
        let err = chain
            .request(&mut cx, request("c", IpContext::default()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        let setter = prefixes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            setter.set(vec![net("172.16.9.0/24")]);
        });
        let mut cx = Cx::server().with_timeout(Duration::from_secs(1));
        let conn = chain
            .request(&mut cx, request("c", IpContext::default()))
            .await
            .unwrap();
        assert_eq!(ipc(&conn).src_ip_addrs, ["172.16.9.2/32"]);
    }
}
