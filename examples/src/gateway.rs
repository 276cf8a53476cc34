//! The VPN gateway of the service-function-chaining showcase: an endpoint that gives
//! each client a point-to-point pair of addresses and a route to the corporate
//! networks behind it ([`corporate_routes`]), and forwards there from its namespace
//! with masquerading ([`route_to_corporate`]), so the corporate hosts need no route
//! back to the clients.

use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;
use nsm_proto::connection::Connection;
use nsm_proto::connectioncontext::Route;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::chains::{endpoint, Endpoint, EndpointOptions};
use nsm_sdk::handlers::{mechanisms, point_to_point};
use nsm_sdk::wire::types;
use nsm_sdk::{Cx, Handler, Next};
use nsm_sdk_kernel::{kernel_endpoint, NetNs};

use crate::endpoint::log_calls;
use crate::firewall::nft;

/// The nftables table (family `inet`) the gateway owns in its namespace.
pub const NAT_TABLE: &str = "nsm-vpn-gateway";

/// See [`corporate_routes`].
#[derive(Debug, Clone)]
pub struct CorporateRoutes {
    prefixes: Vec<IpNet>,
}

/// An endpoint handler that adds a route to each of `prefixes` to the client's side of
/// every connection (`ip_context.src_routes`, without a next hop: the client's
/// forwarder routes it through the endpoint's address). It goes after the IPAM. A
/// refresh that already has them adds nothing. State: none.
pub fn corporate_routes(prefixes: Vec<IpNet>) -> CorporateRoutes {
    CorporateRoutes { prefixes }
}

#[async_trait]
impl Handler for CorporateRoutes {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        let ipc = conn
            .context
            .get_or_insert_with(Default::default)
            .ip_context
            .get_or_insert_with(Default::default);
        for p in &self.prefixes {
            let prefix = p.to_string();
            if !ipc.src_routes.iter().any(|r| r.prefix == prefix) {
                ipc.src_routes.push(Route {
                    prefix,
                    ..Default::default()
                });
            }
        }
        next.request(cx, req).await
    }
}

/// The nftables script that masquerades what leaves `ns` for `prefixes`.
pub fn nat_ruleset(prefixes: &[IpNet]) -> String {
    let mut rules = String::new();
    for p in prefixes {
        let family = if p.addr().is_ipv4() { "ip" } else { "ip6" };
        rules.push_str(&format!("    {family} daddr {p} masquerade\n"));
    }
    format!(
        "table inet {NAT_TABLE}\ndelete table inet {NAT_TABLE}\n\
         table inet {NAT_TABLE} {{\n  chain postrouting {{\n    \
         type nat hook postrouting priority srcnat; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// Makes the namespace `ns` a router towards `prefixes`: turns on IP forwarding (IPv6
/// too when a prefix is IPv6) and masquerades what it sends there.
pub async fn route_to_corporate(ns: &NetNs, prefixes: &[IpNet]) -> Result<(), String> {
    let v6 = prefixes.iter().any(|p| matches!(p.addr(), IpAddr::V6(_)));
    let written = ns
        .run(move || -> std::io::Result<()> {
            // /proc/sys/net follows the namespace of the thread that opens it.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            if v6 {
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?;
    written.map_err(|e| format!("cannot turn on IP forwarding: {e}"))?;
    nft(ns, nat_ruleset(prefixes)).await
}

/// Removes the gateway's masquerading from `ns` (forwarding stays on).
pub async fn stop_routing(ns: &NetNs) -> Result<(), String> {
    nft(
        ns,
        format!("table inet {NAT_TABLE}\ndelete table inet {NAT_TABLE}\n"),
    )
    .await
}

/// The VPN gateway endpoint `name` in the namespace `netns_url`: KERNEL connections,
/// addresses from `cidr` (strict point-to-point IPAM), a route to each `corporate`
/// prefix for the client.
pub fn vpn_gateway(
    name: &str,
    netns_url: &str,
    cidr: Vec<IpNet>,
    corporate: Vec<IpNet>,
    opts: EndpointOptions,
) -> Endpoint {
    endpoint(
        name,
        opts.handler(log_calls())
            .handler(point_to_point(cidr).strict(true))
            .handler(corporate_routes(corporate))
            .handler(mechanisms().with(types::KERNEL, kernel_endpoint(netns_url))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_sdk::Chain;

    #[tokio::test]
    async fn each_connection_gets_a_route_to_every_corporate_prefix_once() {
        let chain = Chain::builder()
            .push(corporate_routes(vec![
                "10.60.0.0/24".parse().unwrap(),
                "fd60::/64".parse().unwrap(),
            ]))
            .build();
        let conn = chain
            .request(&mut Cx::server(), NetworkServiceRequest::default())
            .await
            .unwrap();
        let again = chain
            .request(
                &mut Cx::server(),
                NetworkServiceRequest {
                    connection: Some(conn),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let routes: Vec<String> = again
            .context
            .unwrap()
            .ip_context
            .unwrap()
            .src_routes
            .into_iter()
            .map(|r| format!("{}{}", r.prefix, r.next_hop))
            .collect();
        assert_eq!(routes, ["10.60.0.0/24", "fd60::/64"]);
    }

    #[test]
    fn the_nat_ruleset_masquerades_each_prefix_in_its_family() {
        let rules = nat_ruleset(&[
            "10.60.0.0/24".parse().unwrap(),
            "fd60::/64".parse().unwrap(),
        ]);
        assert!(
            rules.starts_with("table inet nsm-vpn-gateway\ndelete table inet nsm-vpn-gateway\n")
        );
        assert!(rules.contains("type nat hook postrouting priority srcnat; policy accept;"));
        assert!(rules.contains("    ip daddr 10.60.0.0/24 masquerade\n"));
        assert!(rules.contains("    ip6 daddr fd60::/64 masquerade\n"));
    }
}
