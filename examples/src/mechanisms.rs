//! The mechanisms the example programs serve and ask for: KERNEL (an interface in
//! each pod, made by the forwarder with [`nsm_sdk_kernel`]) with NOOP beside it.
//!
//! - the forwarder serves both ([`forwarder_mechanisms`]): KERNEL makes a veth pair
//!   between the client's and the endpoint's namespaces, NOOP builds nothing; with a
//!   [`Tunnel`] (`NSM_TUNNEL_IP`) it also serves VXLAN, so a KERNEL client reaches a
//!   KERNEL endpoint on another node through a VXLAN device in each pod;
//! - the endpoint serves both ([`endpoint_mechanisms`]), its KERNEL end in its own
//!   namespace;
//! - the client asks for what its NS URL's scheme names ([`preferences`]):
//!   `kernel://service/nsm-1` offers KERNEL (interface `nsm-1` in the client's own
//!   namespace, filled in by [`kernel_when_offered`]) first and NOOP second, so a mesh
//!   that cannot make a kernel interface still connects; `noop://` offers NOOP only,
//!   and so does any other scheme (no other mechanism exists here) or
//!   [`MechanismChoice::Noop`];
//! - the client's optional liveness check ([`kernel_liveness`]) pings the endpoint
//!   of each KERNEL connection from the client's namespace.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Mechanism};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::config::NsUrl;
use nsm_sdk::handlers::{
    mechanisms, noop_client, noop_mechanism, noop_server, LivenessFn, Mechanisms,
};
use nsm_sdk::wire::types;
use nsm_sdk::{Cx, Handler, Next};
use nsm_sdk_kernel::mechanism::KernelClient;
use nsm_sdk_kernel::{
    kernel_endpoint, kernel_forwarder_client, kernel_forwarder_server, ping_liveness, PingOptions,
};
use nsm_sdk_vxlan::{vxlan_forwarder_client, vxlan_forwarder_server, Tunnel};
use tracing::info;

/// The forwarder's mechanisms: KERNEL (the handlers of
/// [`kernel_forwarder_mechanisms`](nsm_sdk_kernel::kernel_forwarder_mechanisms)) and NOOP,
/// plus VXLAN ([`vxlan_forwarder_mechanisms`](nsm_sdk_vxlan::vxlan_forwarder_mechanisms))
/// when this node has a `tunnel`, as server-side dispatcher and client-side handlers
/// for `ForwarderOptions::server_mechanisms` and `client_mechanisms`.
///
/// On the way to the endpoint a KERNEL connection offers KERNEL (then VXLAN with a
/// tunnel) then NOOP, a NOOP one NOOP only; another node's manager keeps only the
/// VXLAN offer. A KERNEL attempt that fails retryably (an endpoint that answers NOOP,
/// say) makes the server side fall back to the caller's next preference.
pub fn forwarder_mechanisms(tunnel: Option<Tunnel>) -> (Mechanisms, Vec<Arc<dyn Handler>>) {
    let mut client: Vec<Arc<dyn Handler>> = vec![Arc::new(kernel_forwarder_client())];
    let mut server = mechanisms()
        .with(types::KERNEL, kernel_forwarder_server())
        .with(types::NOOP, noop_server());
    if let Some(tunnel) = tunnel {
        client.push(Arc::new(vxlan_forwarder_client(tunnel.clone())));
        server = server.with(types::VXLAN, vxlan_forwarder_server(tunnel));
    }
    client.push(Arc::new(noop_client()));
    (server, client)
}

/// The endpoint's mechanisms: KERNEL with its end in the namespace `netns_url` (a
/// `file://` URL the forwarder can open, like
/// [`own_netns_url()`](nsm_sdk_kernel::mechanism::own_netns_url)), and NOOP.
pub fn endpoint_mechanisms(netns_url: impl Into<String>) -> Mechanisms {
    mechanisms()
        .with(types::KERNEL, kernel_endpoint(netns_url))
        .with(types::NOOP, noop_server())
}

/// Which mechanism a client asks for (`NSM_MECHANISM`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MechanismChoice {
    /// What the NS URL's scheme names: `kernel://` is KERNEL (NOOP offered second),
    /// anything else NOOP.
    #[default]
    FromUrl,
    /// NOOP for every NS URL: a control-plane-only client, e.g. one outside any pod.
    Noop,
}

/// The mechanism preferences of a request for `url`.
///
/// `kernel://` (with [`MechanismChoice::FromUrl`]): the URL's KERNEL mechanism (with its
/// interface name, if the URL has one) then NOOP. Anything else: NOOP only, logged at
/// info when the URL asked for another mechanism.
pub fn preferences(url: &NsUrl, choice: MechanismChoice) -> Vec<Mechanism> {
    let wanted = url.mechanism_type();
    match (choice, wanted) {
        (MechanismChoice::FromUrl, types::KERNEL) => vec![url.mechanism(), noop_mechanism()],
        (_, types::NOOP) => vec![noop_mechanism()],
        (MechanismChoice::Noop, _) => {
            info!(url = %url, mechanism = wanted, "NSM_MECHANISM=noop: requesting NOOP instead");
            vec![noop_mechanism()]
        }
        (MechanismChoice::FromUrl, _) => {
            info!(
                url = %url,
                mechanism = wanted,
                "this mechanism is not implemented: requesting NOOP instead"
            );
            vec![noop_mechanism()]
        }
    }
}

/// See [`kernel_when_offered`].
#[derive(Debug, Clone)]
pub struct KernelWhenOffered {
    kernel: KernelClient,
}

/// A client-side handler that runs `kernel` ([`kernel_client`](nsm_sdk_kernel::kernel_client))
/// only for requests that offer or carry KERNEL, and passes every other request on
/// untouched (a lone `kernel_client` would add KERNEL to a NOOP-only request).
///
/// State: none of its own (`kernel` keeps the chosen interface name per connection).
pub fn kernel_when_offered(kernel: KernelClient) -> KernelWhenOffered {
    KernelWhenOffered { kernel }
}

fn is_kernel(m: &Mechanism) -> bool {
    m.r#type == types::KERNEL
}

#[async_trait]
impl Handler for KernelWhenOffered {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let kernel = match req.connection.as_ref().and_then(|c| c.mechanism.as_ref()) {
            Some(m) => is_kernel(m),
            None => req.mechanism_preferences.iter().any(is_kernel),
        };
        if kernel {
            self.kernel.request(cx, req, next).await
        } else {
            next.request(cx, req).await
        }
    }
}

/// A liveness check for `heal` that pings the endpoint's address of each KERNEL
/// connection from the caller's own namespace ([`ping_liveness`]); a connection with
/// another mechanism has no data plane to ping and counts as alive.
pub fn kernel_liveness(options: PingOptions) -> LivenessFn {
    let ping = ping_liveness(options);
    Arc::new(move |conn: &Connection| {
        if conn.mechanism.as_ref().is_some_and(is_kernel) {
            ping(conn)
        } else {
            Box::pin(async { true })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_sdk::wire::params;
    use nsm_sdk::Chain;
    use nsm_sdk_kernel::kernel_client;
    use std::sync::Mutex;

    fn url(s: &str) -> NsUrl {
        NsUrl::parse(s).unwrap()
    }

    fn types_of(prefs: &[Mechanism]) -> Vec<&str> {
        prefs.iter().map(|m| m.r#type.as_str()).collect()
    }

    #[test]
    fn a_kernel_url_offers_kernel_with_its_interface_then_noop() {
        let prefs = preferences(
            &url("kernel://icmp-responder/nsm-1"),
            MechanismChoice::FromUrl,
        );
        assert_eq!(types_of(&prefs), ["KERNEL", "NOOP"]);
        assert_eq!(prefs[0].parameters[params::NAME], "nsm-1");
        let prefs = preferences(&url("kernel://icmp-responder"), MechanismChoice::FromUrl);
        assert_eq!(types_of(&prefs), ["KERNEL", "NOOP"]);
        assert!(!prefs[0].parameters.contains_key(params::NAME));
    }

    #[test]
    fn other_schemes_and_the_noop_choice_offer_noop_only() {
        for (u, choice) in [
            ("noop://icmp-responder", MechanismChoice::FromUrl),
            ("memif://icmp-responder/m1", MechanismChoice::FromUrl),
            ("kernel://icmp-responder/nsm-1", MechanismChoice::Noop),
        ] {
            let prefs = preferences(&url(u), choice);
            assert_eq!(prefs, [noop_mechanism()], "{u} {choice:?}");
        }
    }

    #[test]
    fn the_forwarder_and_endpoint_serve_kernel_and_noop() {
        let (server, client) = forwarder_mechanisms(None);
        assert_eq!(server.supported(), ["KERNEL", "NOOP"]);
        assert_eq!(client.len(), 2);
        assert_eq!(
            endpoint_mechanisms("file:///run/netns/x").supported(),
            ["KERNEL", "NOOP"]
        );
    }

    #[tokio::test]
    async fn with_a_tunnel_the_forwarder_also_serves_vxlan() {
        // Opening the node's netlink socket needs the rights a forwarder has.
        let tunnel = match Tunnel::builder("192.0.2.1".parse().unwrap())
            .underlay_mtu(1500)
            .build()
            .await
        {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipped: cannot open a netlink socket here: {e}");
                return;
            }
        };
        assert_eq!(tunnel.mtu().get(), 1450);
        let (server, client) = forwarder_mechanisms(Some(tunnel));
        assert_eq!(server.supported(), ["KERNEL", "NOOP", "VXLAN"]);
        assert_eq!(client.len(), 3);
    }

    /// Records the preferences and mechanism a request arrives with.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<NetworkServiceRequest>>>);

    #[async_trait]
    impl Handler for Seen {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> nsm_sdk::Result<Connection> {
            self.0.lock().unwrap().push(req.clone());
            Ok(req.connection.unwrap_or_default())
        }
    }

    async fn through_kernel_when_offered(req: NetworkServiceRequest) -> NetworkServiceRequest {
        let seen = Seen::default();
        let chain = Chain::builder()
            .push(kernel_when_offered(kernel_client("file:///run/netns/pod")))
            .push(seen.clone())
            .build();
        chain.request(&mut Cx::client(), req).await.unwrap();
        let out = seen.0.lock().unwrap().pop().unwrap();
        out
    }

    #[tokio::test]
    async fn a_kernel_request_gets_the_clients_namespace_and_a_noop_one_is_untouched() {
        let mut req = url("kernel://svc/nsm-1").to_request();
        req.mechanism_preferences = preferences(&url("kernel://svc/nsm-1"), Default::default());
        let out = through_kernel_when_offered(req).await;
        assert_eq!(types_of(&out.mechanism_preferences), ["KERNEL", "NOOP"]);
        let kernel = &out.mechanism_preferences[0].parameters;
        assert_eq!(kernel[params::NAME], "nsm-1");
        assert_eq!(kernel[params::INODE_URL], "file:///run/netns/pod");

        let mut req = url("noop://svc").to_request();
        req.mechanism_preferences = vec![noop_mechanism()];
        let out = through_kernel_when_offered(req.clone()).await;
        assert_eq!(out, req);
    }
}
