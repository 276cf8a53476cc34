//! `kernel_endpoint`: the NSE side of KERNEL — tells the forwarder where the endpoint's
//! end of the connection goes.
//!
//! What it does: the forwarder offers an empty KERNEL mechanism; this handler writes the
//! endpoint's own side into the connection's mechanism before passing the Request on —
//! `inodeURL` = the endpoint's network namespace, `name` = the endpoint's interface for
//! this connection — so the forwarder reads both from the answer and creates the
//! endpoint's end there (docs/KERNEL.md 1.5). The name is the one set with
//! [`KernelEndpoint::ifname`] (then the endpoint serves one connection at a time: a
//! second one would need the same name in the same namespace), else one generated per
//! connection from the network service ([`generate_ifname`]).
//! Register it with `mechanisms().with(types::KERNEL, kernel_endpoint(url))`; used on
//! its own it takes the request's KERNEL preference when the connection has no
//! mechanism yet.
//!
//! State: the interface name of each connection (needs `begin` before it), so a
//! refresh keeps it; without `begin`, a name the mechanism already carries is kept.
//!
//! Failure handled: a Request with neither a KERNEL mechanism nor a KERNEL preference,
//! or with another mechanism type, is InvalidArgument; a bad configured name or
//! namespace URL is InvalidArgument.

use std::sync::Mutex;

use nsm_sdk::config::check_interface_name;
use nsm_sdk::handlers::{mechanisms, noop_server, select_mechanism, Mechanisms};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::wire::{params, types};
use nsm_sdk::{async_trait, Cx, Handler, Next, Result};
use tracing::debug;

use super::client::check_netns_url;
use super::generate_ifname;

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct KernelEndpoint {
    netns_url: String,
    ifname: Option<String>,
    bridged: bool,
}

/// The NSE side of KERNEL for an endpoint whose pod namespace is `netns_url` (a
/// `file://` URL the forwarder can open).
pub fn kernel_endpoint(netns_url: impl Into<String>) -> KernelEndpoint {
    KernelEndpoint {
        netns_url: netns_url.into(),
        ifname: None,
        bridged: false,
    }
}

/// An endpoint's mechanisms: KERNEL with its end in the namespace `netns_url` (a
/// `file://` URL the forwarder can open, like [`own_netns_url()`](super::own_netns_url)),
/// and NOOP, for a client or forwarder that cannot make KERNEL.
pub fn endpoint_mechanisms(netns_url: impl Into<String>) -> Mechanisms {
    mechanisms()
        .with(types::KERNEL, kernel_endpoint(netns_url))
        .with(types::NOOP, noop_server())
}

impl KernelEndpoint {
    /// Uses this interface name for every connection (one connection at a time).
    pub fn ifname(mut self, name: impl Into<String>) -> Self {
        self.ifname = Some(name.into());
        self
    }

    /// Marks this endpoint's interfaces [`BRIDGED`](super::BRIDGED): the endpoint
    /// bridges them onward (a firewall in a service chain), so the forwarder puts no
    /// addresses, routes or rules on them.
    pub fn bridged(mut self) -> Self {
        self.bridged = true;
        self
    }
}

/// The endpoint-side interface name of one connection.
#[derive(Debug, Default)]
struct EndpointName(Mutex<Option<String>>);

#[async_trait]
impl Handler for KernelEndpoint {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        check_netns_url(&self.netns_url)?;
        let service = req
            .connection
            .as_ref()
            .map(|c| c.network_service.clone())
            .unwrap_or_default();
        let mechanism = select_mechanism(&mut req, types::KERNEL, "kernel endpoint")?;
        let carried = mechanism.parameters.get(params::NAME).cloned();
        let name = match (&self.ifname, cx.conn()) {
            (Some(fixed), _) => fixed.clone(),
            (None, Some(h)) => h
                .state::<EndpointName>()
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| carried.unwrap_or_else(|| generate_ifname(&service)))
                .clone(),
            (None, None) => carried.unwrap_or_else(|| generate_ifname(&service)),
        };
        check_interface_name(&name)?;
        debug!(ifname = %name, netns = %self.netns_url, "endpoint side of KERNEL");
        mechanism.parameters.insert(params::NAME.into(), name);
        mechanism
            .parameters
            .insert(params::INODE_URL.into(), self.netns_url.clone());
        if self.bridged {
            mechanism
                .parameters
                .insert(super::BRIDGED.into(), "true".into());
        }
        next.request(cx, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mechanism::kernel_mechanism;
    use nsm_sdk::handlers::begin;
    use nsm_sdk::proto::connection::Mechanism;
    use nsm_sdk::Chain;
    use nsm_sdk::Error;

    fn req(prefs: Vec<Mechanism>) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "c".into(),
                network_service: "icmp-responder".into(),
                ..Default::default()
            }),
            mechanism_preferences: prefs,
        }
    }

    fn server(h: KernelEndpoint) -> Chain {
        Chain::builder()
            .push(begin())
            .push(mechanisms().with(types::KERNEL, h))
            .build()
    }

    #[test]
    fn the_endpoint_mechanisms_are_kernel_and_noop() {
        assert_eq!(
            endpoint_mechanisms("file:///run/netns/x").supported(),
            ["KERNEL", "NOOP"]
        );
    }

    fn param(conn: &Connection, key: &str) -> String {
        conn.mechanism.as_ref().unwrap().parameters[key].clone()
    }

    #[tokio::test]
    async fn fills_its_own_namespace_and_a_generated_name_into_the_mechanism() {
        let chain = server(kernel_endpoint("file:///run/netns/nse"));
        let conn = chain
            .request(&mut Cx::server(), req(vec![kernel_mechanism()]))
            .await
            .unwrap();
        assert_eq!(param(&conn, params::INODE_URL), "file:///run/netns/nse");
        let name = param(&conn, params::NAME);
        assert!(
            name.starts_with("icmp-respo-") && name.len() == 15,
            "{name}"
        );
    }

    #[tokio::test]
    async fn a_refresh_keeps_the_name_and_other_connections_get_other_names() {
        let chain = server(kernel_endpoint("file:///run/netns/nse"));
        let first = chain
            .request(&mut Cx::server(), req(vec![kernel_mechanism()]))
            .await
            .unwrap();
        let mut stripped = first.clone();
        // Even if the caller drops the parameter, the connection keeps its name.
        stripped
            .mechanism
            .as_mut()
            .unwrap()
            .parameters
            .remove(params::NAME);
        let again = chain
            .request(
                &mut Cx::server(),
                NetworkServiceRequest {
                    connection: Some(stripped),
                    mechanism_preferences: vec![],
                },
            )
            .await
            .unwrap();
        assert_eq!(param(&again, params::NAME), param(&first, params::NAME));

        let mut other = req(vec![kernel_mechanism()]);
        other.connection.as_mut().unwrap().id = "d".into();
        let other = chain.request(&mut Cx::server(), other).await.unwrap();
        assert_ne!(param(&other, params::NAME), param(&first, params::NAME));
    }

    #[tokio::test]
    async fn a_configured_name_is_used_and_checked() {
        let chain = server(kernel_endpoint("file:///run/netns/nse").ifname("nse-1"));
        let conn = chain
            .request(&mut Cx::server(), req(vec![kernel_mechanism()]))
            .await
            .unwrap();
        assert_eq!(param(&conn, params::NAME), "nse-1");

        let chain = server(kernel_endpoint("file:///run/netns/nse").ifname("sixteen-bytes-xx"));
        let err = chain
            .request(&mut Cx::server(), req(vec![kernel_mechanism()]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[tokio::test]
    async fn on_its_own_it_refuses_a_request_without_kernel() {
        let chain = Chain::builder()
            .push(kernel_endpoint("file:///run/netns/nse"))
            .build();
        let err = chain
            .request(&mut Cx::server(), req(vec![]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let conn = chain
            .request(&mut Cx::server(), req(vec![kernel_mechanism()]))
            .await
            .unwrap();
        assert_eq!(param(&conn, params::INODE_URL), "file:///run/netns/nse");
    }
}
