//! `vl3_client`: a vL3 endpoint announces its prefixes when it connects to another.
//!
//! What it does (client side, in the client chain a vL3 endpoint uses to reach the
//! other members of its vL3 network): it waits for the endpoint's own prefixes
//! ([`Vl3Prefixes`]; a Request before them waits, up to its deadline) and puts them
//! into the request's `dst_routes`, replacing the prefix routes (not host routes) an
//! earlier request put there. The other endpoint's [`vl3_ipam`](super::vl3_ipam)
//! recognises a router by them: it keeps them (so it routes this endpoint's prefixes
//! through the link) and answers with a route to its own prefixes only.
//!
//! State: none besides the shared prefixes. Failure handled: no prefix known by the
//! deadline is Unavailable.

use async_trait::async_trait;
use ipnet::IpNet;
use nsm_proto::connection::Connection;
use nsm_proto::connectioncontext::Route;
use nsm_proto::networkservice::NetworkServiceRequest;

use super::point_to_point::ip_context_mut;
use crate::core::{Cx, Handler, Next};
use crate::ipam::Vl3Prefixes;
use crate::Result;

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct Vl3Client {
    prefixes: Vl3Prefixes,
}

/// Announces `prefixes` to the vL3 endpoint the request goes to.
///
/// ```
/// use nsm_sdk::handlers::vl3_client;
/// use nsm_sdk::ipam::Vl3Prefixes;
/// let _announce = vl3_client(Vl3Prefixes::fixed(vec!["172.16.1.0/24".parse().unwrap()]));
/// ```
pub fn vl3_client(prefixes: Vl3Prefixes) -> Vl3Client {
    Vl3Client { prefixes }
}

fn is_prefix_route(r: &Route) -> bool {
    r.prefix
        .parse::<IpNet>()
        .is_ok_and(|n| n.prefix_len() != n.max_prefix_len())
}

/// Whether `conn` is a link from another vL3 endpoint: its `dst_routes` carry prefix
/// routes (not host routes), the announcement [`vl3_client`] puts there. An ordinary
/// client's request carries none.
///
/// ```
/// use nsm_proto::connection::Connection;
/// use nsm_sdk::handlers::vl3_client::announces_prefixes;
/// assert!(!announces_prefixes(&Connection::default()));
/// ```
pub fn announces_prefixes(conn: &Connection) -> bool {
    conn.context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .is_some_and(|ip| ip.dst_routes.iter().any(is_prefix_route))
}

#[async_trait]
impl Handler for Vl3Client {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let own = self.prefixes.known(cx.deadline()).await?;
        let ipc = ip_context_mut(req.connection.get_or_insert_with(Default::default));
        ipc.dst_routes.retain(|r| !is_prefix_route(r));
        for p in own {
            ipc.dst_routes.push(Route {
                prefix: p.to_string(),
                ..Default::default()
            });
        }
        next.request(cx, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use nsm_proto::connectioncontext::{ConnectionContext, IpContext};

    #[tokio::test]
    async fn it_announces_the_current_prefixes_and_drops_the_old_ones() {
        let prefixes = Vl3Prefixes::fixed(vec!["172.16.1.0/24".parse().unwrap()]);
        let chain = Chain::builder().push(vl3_client(prefixes.clone())).build();
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                context: Some(ConnectionContext {
                    ip_context: Some(IpContext {
                        dst_routes: vec![
                            Route {
                                prefix: "172.16.7.0/24".into(),
                                ..Default::default()
                            },
                            Route {
                                prefix: "172.16.2.2/32".into(),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        prefixes.set(vec![
            "172.16.3.0/24".parse().unwrap(),
            "fd10::/120".parse().unwrap(),
        ]);
        let conn = chain.request(&mut Cx::client(), req).await.unwrap();
        let got: Vec<String> = conn
            .context
            .unwrap()
            .ip_context
            .unwrap()
            .dst_routes
            .into_iter()
            .map(|r| r.prefix)
            .collect();
        assert_eq!(got, ["172.16.2.2/32", "172.16.3.0/24", "fd10::/120"]);
    }

    #[test]
    fn a_link_is_told_from_a_client_by_its_prefix_routes() {
        let with = |routes: &[&str]| Connection {
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    dst_routes: routes
                        .iter()
                        .map(|p| Route {
                            prefix: p.to_string(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(announces_prefixes(&with(&[
            "172.16.2.2/32",
            "172.16.3.0/24"
        ])));
        assert!(!announces_prefixes(&with(&[
            "172.16.2.2/32",
            "fd10::2/128"
        ])));
        assert!(!announces_prefixes(&with(&["junk"])));
    }
}
