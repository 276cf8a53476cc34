//! `swap_ip`: a domain's border swaps the tunnel addresses of its nodes between their
//! internal and public addresses (NSM's swapip with clusterinfo).
//!
//! What it does (in an nsmgr-proxy): nodes of a domain reach each other by internal
//! addresses and other domains only by public ones, so the tunnel endpoints a remote
//! mechanism (VXLAN) names in its `src_ip` and `dst_ip` parameters must change as they
//! cross the border. With this domain's map (internal -> public address of each node):
//! - on the way out (the Request and the Close going down): `src_ip` internal -> public
//!   (our client side's tunnel end), `dst_ip` public -> internal (on a refresh, our
//!   endpoint side's tunnel end as the other domain knows it);
//! - on the way back (the answer): the reverse, `src_ip` public -> internal and
//!   `dst_ip` internal -> public.
//!
//! Both proxies of a path run it with their own map, so each forwarder only ever sees
//! addresses it can reach. Addresses not in the map (the other domain's) pass
//! unchanged. It applies to the connection's mechanism and to every mechanism
//! preference.
//!
//! State: the map, behind a watch so it can be replaced while running
//! ([`SwapIp::update`]).
//!
//! Failure handled: none; a parameter that is not an address is left as it is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Mechanism};
use nsm_proto::networkservice::NetworkServiceRequest;
use tokio::sync::watch;

use crate::core::{Cx, Handler, Next};
use crate::wire::params::{DST_IP, SRC_IP};
use crate::Result;

/// Internal -> public address of each node of the domain.
pub type AddressMap = HashMap<IpAddr, IpAddr>;

/// Parses an address map as programs take it (`NSM_ADDRESS_MAP`): comma-separated
/// `internal=public` pairs, e.g. `10.0.0.2=198.51.100.2,10.0.0.3=198.51.100.3`; empty
/// is an empty map.
///
/// Fails with [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the bad
/// pair.
pub fn parse_address_map(s: &str) -> Result<AddressMap> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let bad = || {
                crate::Error::invalid(format!(
                    "address map entry {pair:?}: expected internal=public addresses"
                ))
            };
            let (i, p) = pair.split_once('=').ok_or_else(bad)?;
            Ok((
                i.trim().parse().map_err(|_| bad())?,
                p.trim().parse().map_err(|_| bad())?,
            ))
        })
        .collect()
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct SwapIp {
    map: Arc<watch::Sender<AddressMap>>,
}

/// The `swap_ip` handler with this domain's `map` (internal -> public).
pub fn swap_ip(map: AddressMap) -> SwapIp {
    SwapIp {
        map: Arc::new(watch::Sender::new(map)),
    }
}

#[derive(Clone, Copy)]
enum Way {
    Out,
    Back,
}

impl SwapIp {
    /// Replaces the map (e.g. after the domain's node list changed).
    pub fn update(&self, map: AddressMap) {
        self.map.send_replace(map);
    }

    fn swap(&self, m: &mut Mechanism, way: Way) {
        let map = self.map.borrow();
        let public = |ip: IpAddr| map.get(&ip).copied();
        let internal = |ip: IpAddr| map.iter().find(|(_, p)| **p == ip).map(|(i, _)| *i);
        let apply = |m: &mut Mechanism, key: &str, f: &dyn Fn(IpAddr) -> Option<IpAddr>| {
            let swapped = m
                .parameters
                .get(key)
                .and_then(|v| v.parse::<IpAddr>().ok())
                .and_then(f);
            if let Some(ip) = swapped {
                m.parameters.insert(key.to_string(), ip.to_string());
            }
        };
        match way {
            Way::Out => {
                apply(m, SRC_IP, &public);
                apply(m, DST_IP, &internal);
            }
            Way::Back => {
                apply(m, SRC_IP, &internal);
                apply(m, DST_IP, &public);
            }
        }
    }

    fn swap_conn(&self, conn: &mut Connection, way: Way) {
        if let Some(m) = conn.mechanism.as_mut() {
            self.swap(m, way);
        }
    }
}

#[async_trait]
impl Handler for SwapIp {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        if let Some(conn) = req.connection.as_mut() {
            self.swap_conn(conn, Way::Out);
        }
        for m in &mut req.mechanism_preferences {
            self.swap(m, Way::Out);
        }
        let mut conn = next.request(cx, req).await?;
        self.swap_conn(&mut conn, Way::Back);
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, mut conn: Connection, next: Next) -> Result<()> {
        self.swap_conn(&mut conn, Way::Out);
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::wire::{cls, types};
    use std::sync::Mutex;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn vxlan(src: &str, dst: &str) -> Mechanism {
        let mut m = Mechanism {
            cls: cls::REMOTE.into(),
            r#type: types::VXLAN.into(),
            ..Default::default()
        };
        if !src.is_empty() {
            m.parameters.insert(SRC_IP.into(), src.into());
        }
        if !dst.is_empty() {
            m.parameters.insert(DST_IP.into(), dst.into());
        }
        m
    }

    /// The next domain's side: records what arrived, answers with its tunnel end.
    #[derive(Default, Clone)]
    struct Far {
        seen: Arc<Mutex<Vec<Mechanism>>>,
        dst: &'static str,
    }

    #[async_trait]
    impl Handler for Far {
        async fn request(
            &self,
            _: &mut Cx,
            req: NetworkServiceRequest,
            _: Next,
        ) -> Result<Connection> {
            let mut m = req.mechanism_preferences[0].clone();
            self.seen.lock().unwrap().push(m.clone());
            m.parameters.insert(DST_IP.into(), self.dst.into());
            Ok(Connection {
                mechanism: Some(m),
                ..req.connection.unwrap_or_default()
            })
        }
        async fn close(&self, _: &mut Cx, conn: Connection, _: Next) -> Result<()> {
            self.seen.lock().unwrap().push(conn.mechanism.unwrap());
            Ok(())
        }
    }

    #[tokio::test]
    async fn tunnel_ends_cross_both_borders_as_the_other_side_can_reach_them() {
        // Domain 1: node 10.1.0.2 is public 198.51.100.2; domain 2: node 10.2.0.3 is
        // public 203.0.113.3.
        let p1 = swap_ip(HashMap::from([(ip("10.1.0.2"), ip("198.51.100.2"))]));
        let p2 = swap_ip(HashMap::from([(ip("10.2.0.3"), ip("203.0.113.3"))]));
        let far = Far {
            dst: "10.2.0.3",
            ..Default::default()
        };
        let chain = Chain::builder()
            .push(p1.clone())
            .push(p2.clone())
            .push(far.clone())
            .build();
        let req = NetworkServiceRequest {
            connection: Some(Connection::default()),
            mechanism_preferences: vec![vxlan("10.1.0.2", "")],
        };
        let conn = chain.request(&mut Cx::server(), req).await.unwrap();
        // Domain 2's forwarder saw domain 1's public address.
        assert_eq!(
            far.seen.lock().unwrap()[0].parameters[SRC_IP],
            "198.51.100.2"
        );
        // Domain 1's forwarder sees its own address and domain 2's public one.
        let m = conn.mechanism.clone().unwrap();
        assert_eq!(m.parameters[SRC_IP], "10.1.0.2");
        assert_eq!(m.parameters[DST_IP], "203.0.113.3");
        // A refresh (and a Close) with that mechanism reaches domain 2 as its own.
        chain.close(&mut Cx::server(), conn).await.unwrap();
        let closed = far.seen.lock().unwrap()[1].clone();
        assert_eq!(closed.parameters[SRC_IP], "198.51.100.2");
        assert_eq!(closed.parameters[DST_IP], "10.2.0.3");
    }

    #[test]
    fn address_maps_parse_from_pairs() {
        let m = parse_address_map(" 10.0.0.2=198.51.100.2, 10.0.0.3 = 198.51.100.3,").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[&ip("10.0.0.3")], ip("198.51.100.3"));
        assert!(parse_address_map("").unwrap().is_empty());
        let err = parse_address_map("10.0.0.2").unwrap_err();
        assert!(err.to_string().contains("10.0.0.2"), "{err}");
        assert!(parse_address_map("10.0.0.2=x").is_err());
    }

    #[tokio::test]
    async fn unknown_addresses_and_other_parameters_pass_and_the_map_can_change() {
        let p = swap_ip(AddressMap::new());
        let far = Far {
            dst: "192.0.2.9",
            ..Default::default()
        };
        let chain = Chain::builder().push(p.clone()).push(far.clone()).build();
        let mut odd = vxlan("not-an-ip", "");
        odd.parameters.insert("vni".into(), "7".into());
        let req = NetworkServiceRequest {
            connection: Some(Connection::default()),
            mechanism_preferences: vec![odd.clone()],
        };
        chain.request(&mut Cx::server(), req).await.unwrap();
        assert_eq!(far.seen.lock().unwrap()[0], odd);
        p.update(HashMap::from([(ip("10.0.0.1"), ip("192.0.2.1"))]));
        let req = NetworkServiceRequest {
            connection: Some(Connection::default()),
            mechanism_preferences: vec![vxlan("10.0.0.1", "")],
        };
        chain.request(&mut Cx::server(), req).await.unwrap();
        assert_eq!(far.seen.lock().unwrap()[1].parameters[SRC_IP], "192.0.2.1");
    }
}
