//! `kernel_endpoint`: the NSE side of KERNEL — tells the forwarder where the endpoint's
//! end of the connection goes.
//!
//! What it does: the forwarder offers an empty KERNEL mechanism; this handler writes the
//! endpoint's own side into the connection's mechanism before passing the Request on —
//! `inodeURL` = the endpoint's network namespace (with `netnsInode`, its inode, when
//! readable: the forwarder checks what it opens against it), `name` = the endpoint's interface for
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
//! Also the set of names its live connections hold, shared by all of them: a
//! generated name has only 4 random characters for a long service name
//! (`icmp-respo-Xy3k`, 62^4 names), so among 1,000 connections into one endpoint pod
//! two draw the same name in about 3 % of runs; the second veth pair then cannot be
//! made (the name is taken in the pod) and its Request failed with InvalidArgument
//! (seen once in a storm of 1,000 Requests). A name held by another live connection
//! is therefore drawn again; a connection's name is released when its state goes
//! (after its Close, or a first Request that failed).
//!
//! Failure handled: a Request with neither a KERNEL mechanism nor a KERNEL preference,
//! or with another mechanism type, is InvalidArgument; a bad configured name or
//! namespace URL is InvalidArgument.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

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
    names: Names,
    generate: fn(&str) -> String,
}

/// The interface names the live connections of one endpoint hold.
type Names = Arc<Mutex<HashSet<String>>>;

/// The NSE side of KERNEL for an endpoint whose pod namespace is `netns_url` (a
/// `file://` URL the forwarder can open).
pub fn kernel_endpoint(netns_url: impl Into<String>) -> KernelEndpoint {
    KernelEndpoint {
        netns_url: netns_url.into(),
        ifname: None,
        bridged: false,
        names: Names::default(),
        generate: generate_ifname,
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
struct EndpointName(Mutex<Option<Lease>>);

/// A name held in the endpoint's [`Names`] until dropped.
#[derive(Debug)]
struct Lease {
    name: String,
    names: Names,
}

impl Drop for Lease {
    fn drop(&mut self) {
        lock(&self.names).remove(&self.name);
    }
}

fn lock(names: &Names) -> std::sync::MutexGuard<'_, HashSet<String>> {
    names.lock().unwrap_or_else(|p| p.into_inner())
}

impl KernelEndpoint {
    /// Holds `carried` (the name the connection had, after a heal or a restart) if no
    /// other live connection holds it, else a fresh generated name no live connection
    /// holds.
    fn lease(&self, carried: Option<String>, service: &str) -> Lease {
        let mut held = lock(&self.names);
        let name = match carried {
            Some(n) if !held.contains(&n) => n,
            _ => loop {
                let n = (self.generate)(service);
                if !held.contains(&n) {
                    break n;
                }
            },
        };
        held.insert(name.clone());
        Lease {
            name,
            names: self.names.clone(),
        }
    }
}

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
                .get_or_insert_with(|| self.lease(carried, &service))
                .name
                .clone(),
            (None, None) => carried.unwrap_or_else(|| generate_ifname(&service)),
        };
        check_interface_name(&name)?;
        debug!(ifname = %name, netns = %self.netns_url, "endpoint side of KERNEL");
        mechanism.parameters.insert(params::NAME.into(), name);
        mechanism
            .parameters
            .insert(params::INODE_URL.into(), self.netns_url.clone());
        // Its inode too: the forwarder checks the namespace it opens against it, so an
        // endpoint whose URL names another namespace there (a pid namespace of its own)
        // gets an error, not an interface in someone else's namespace.
        match super::netns_inode_of(&self.netns_url) {
            Some(inode) => mechanism
                .parameters
                .insert(params::NETNS_INODE.into(), inode.to_string()),
            None => mechanism.parameters.remove(params::NETNS_INODE),
        };
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

    /// Draws `icmp-respo-AAAA` twice, then `-BBBB`, then `-CCCC`, ...
    fn colliding(_: &str) -> String {
        static N: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let c = char::from(b'A' + n.saturating_sub(1) % 26);
        format!("icmp-respo-{}", c.to_string().repeat(4))
    }

    #[tokio::test]
    async fn a_generated_name_held_by_another_live_connection_is_drawn_again_and_freed_by_close() {
        let mut h = kernel_endpoint("file:///run/netns/nse");
        h.generate = colliding;
        let chain = server(h);
        let mut names = Vec::new();
        let mut conns = Vec::new();
        for id in ["a", "b", "c"] {
            let mut r = req(vec![kernel_mechanism()]);
            r.connection.as_mut().unwrap().id = id.into();
            let conn = chain.request(&mut Cx::server(), r).await.unwrap();
            names.push(param(&conn, params::NAME));
            conns.push(conn);
        }
        let distinct: HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), 3, "{names:?}");

        // A Close frees the name: a connection that carries it (a heal) gets it back.
        let closed = conns.remove(0);
        chain
            .close(&mut Cx::server(), closed.clone())
            .await
            .unwrap();
        let mut healed = req(vec![]);
        let mut c = closed.clone();
        c.id = "d".into();
        healed.connection = Some(c);
        let again = chain.request(&mut Cx::server(), healed).await.unwrap();
        assert_eq!(param(&again, params::NAME), names[0]);
        // ... but not a name another live connection holds.
        let mut stolen = conns[0].clone();
        stolen.id = "e".into();
        let other = chain
            .request(
                &mut Cx::server(),
                NetworkServiceRequest {
                    connection: Some(stolen),
                    mechanism_preferences: vec![],
                },
            )
            .await
            .unwrap();
        assert!(!names.contains(&param(&other, params::NAME)), "{names:?}");
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
