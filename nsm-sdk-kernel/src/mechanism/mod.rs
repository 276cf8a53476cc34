//! The KERNEL mechanism handlers: a kernel interface in each pod, made by the forwarder.
//!
//! Three roles, one handler (or pair) each:
//!
//! - **NSC** ([`kernel_client`]): offers `{cls: LOCAL, type: KERNEL}` with `inodeURL` =
//!   the client's network namespace and `name` = the interface it wants.
//! - **NSE** ([`kernel_endpoint`], under [`mechanisms`](nsm_sdk::handlers::mechanisms())):
//!   writes its own side into the connection's KERNEL mechanism — `inodeURL` = the
//!   endpoint's namespace, `name` = the endpoint's interface for this connection — so
//!   the forwarder learns where to put the endpoint's end (docs/KERNEL.md 1.5).
//! - **forwarder** ([`kernel_forwarder_mechanisms`]): the server side
//!   ([`kernel_forwarder_server`]) reads the client's side from the incoming mechanism;
//!   the client side ([`kernel_forwarder_client`], in the chain towards the endpoint)
//!   offers an empty KERNEL preference, reads the endpoint's side from the answer and
//!   then creates the connection's veth pair with [`kernel_side_up`](crate::kernel_side_up),
//!   each end born in its pod and programmed from the connection context.
//!
//! With NOOP beside KERNEL, for a mesh where some hops cannot make kernel interfaces:
//! [`endpoint_mechanisms`] (an endpoint serving both), [`preferences()`] (a client
//! offering KERNEL then NOOP for a `kernel://` NS URL, NOOP for any other) and
//! [`KernelClient::only_when_offered`]; the forwarder's counterpart, with VXLAN, is
//! `nsm_sdk_vxlan::forwarder_mechanisms`.
//!
//! A passthrough NSE in a service chain (a firewall) asks for [`BRIDGED`] ends on both
//! sides and joins them per connection with [`bridge_xconnect`] ([`xconnect`]).
//!
//! ```no_run
//! use nsm_sdk::chains::{client, endpoint, forwarder, ClientOptions, EndpointOptions, ForwarderOptions};
//! use nsm_sdk::handlers::{mechanisms, point_to_point};
//! use nsm_sdk::wire::types;
//! use nsm_sdk_kernel::mechanism::{kernel_client, kernel_endpoint, kernel_forwarder_mechanisms};
//! # fn demo(nsmgr: nsm_sdk::transport::Url) {
//! let (server, client_side) = kernel_forwarder_mechanisms();
//! let fwd = forwarder(
//!     ForwarderOptions::new("forwarder", nsmgr.clone())
//!         .server_mechanisms(server)
//!         .client_mechanisms(client_side),
//! );
//! let nse = endpoint(
//!     "nse",
//!     EndpointOptions::new()
//!         .handler(point_to_point(vec!["172.16.50.0/24".parse().unwrap()]))
//!         .handler(mechanisms().with(types::KERNEL, kernel_endpoint("file:///run/netns/nse"))),
//! );
//! let nsc = client(
//!     ClientOptions::new("nsc", nsmgr)
//!         .mechanisms(vec![])
//!         .handler(kernel_client("file:///run/netns/nsc").ifname("nsm-1")),
//! );
//! # }
//! ```
//!
//! Namespaces are named by `file://` URLs the forwarder can open (`/proc/<pid>/ns/net`,
//! `/run/netns/<name>`): this is the local case with the forwarder sharing the pods'
//! host (`hostPID`), without NSM's fd passing over the unix socket (`inode://` URLs).

pub mod client;
pub mod endpoint;
pub mod forwarder;
pub mod preferences;
pub mod xconnect;

pub use client::{kernel_client, netns_inode_of, own_netns_url, KernelClient};
pub use endpoint::{endpoint_mechanisms, kernel_endpoint, KernelEndpoint};
pub use forwarder::{
    kernel_forwarder_client, kernel_forwarder_mechanisms, kernel_forwarder_server, KernelClientEnd,
    KernelForwarderClient, KernelForwarderServer, DEFAULT_MTU,
};
pub use preferences::{preferences, MechanismChoice};
pub use xconnect::{
    bridge_xconnect, bridge_xconnect_client, bridged_client, BridgeXconnect, BridgeXconnectClient,
};

use nsm_sdk::proto::connection::Mechanism;
use nsm_sdk::proto::connectioncontext::ConnectionContext;
use nsm_sdk::wire::{cls, types, MAX_INTERFACE_NAME_LEN};

use crate::{plan_from_context, IfName, Mtu, Plan, PodSide};

/// KERNEL mechanism parameter: `"true"` when the pod bridges this interface to another
/// one (a firewall in the middle of a service chain) instead of terminating the
/// connection. The forwarder then gives this end its name, MTU and state only, and
/// none of the connection context's addresses, routes, neighbours or policy rules:
/// those belong to the pods at the two ends of the chain, and the same address on a
/// bump in the wire would answer ARP for them. Set it with
/// [`KernelClient::bridged`] and [`KernelEndpoint::bridged`].
pub const BRIDGED: &str = "bridged";

/// Whether a KERNEL mechanism asks for a bridged end ([`BRIDGED`] = `"true"`).
pub fn is_bridged(m: &Mechanism) -> bool {
    m.parameters.get(BRIDGED).is_some_and(|v| v == "true")
}

/// The plan of one pod's end of a connection: [`plan_from_context`] for `side`, or,
/// when the pod's mechanism says [`BRIDGED`], only the name and the context's MTU.
/// The forwarders of every mechanism (veth, VXLAN) build their ends with it.
pub fn end_plan(
    ctx: &ConnectionContext,
    side: PodSide,
    ifname: &str,
    bridged: bool,
) -> crate::Result<Plan> {
    if !bridged {
        return plan_from_context(ctx, side, ifname);
    }
    let mut plan = Plan::new(IfName::new(ifname)?);
    if ctx.mtu != 0 {
        plan = plan.with_mtu(Mtu::new(ctx.mtu)?);
    }
    Ok(plan)
}
use rand::distr::{Alphanumeric, SampleString};

/// The KERNEL mechanism with no parameters: `{cls: LOCAL, type: KERNEL}`.
pub fn kernel_mechanism() -> Mechanism {
    Mechanism {
        cls: cls::LOCAL.to_string(),
        r#type: types::KERNEL.to_string(),
        ..Default::default()
    }
}

fn is_kernel(m: &Mechanism) -> bool {
    m.r#type == types::KERNEL
}

/// How many bytes of the network service name start a generated interface name.
const SERVICE_PREFIX_LEN: usize = MAX_INTERFACE_NAME_LEN - 5;

/// A random interface name for a connection to `service`, as NSM's
/// `GenerateLinuxInterfaceName` makes it: the service name cut to 10 bytes, `-`, and
/// random `[0-9A-Za-z]` up to exactly 15 bytes (`icmp-responder` → `icmp-respo-Xy3k`).
///
/// Characters an interface name cannot have (`/`, `:`, whitespace, anything outside
/// printable ASCII) are left out of the prefix; an empty prefix becomes `nsm`.
pub fn generate_ifname(service: &str) -> String {
    let mut prefix: String = service
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '/' && *c != ':')
        .take(SERVICE_PREFIX_LEN)
        .collect();
    if prefix.is_empty() {
        prefix.push_str("nsm");
    }
    prefix.push('-');
    let random = MAX_INTERFACE_NAME_LEN - prefix.len();
    Alphanumeric.append_string(&mut rand::rng(), &mut prefix, random);
    prefix
}

#[cfg(test)]
pub(crate) mod tests_support {
    //! Handlers that stand in for the next hop in unit tests.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use nsm_sdk::proto::connection::{Connection, Mechanism};
    use nsm_sdk::proto::networkservice::NetworkServiceRequest;
    use nsm_sdk::{async_trait, Cx, Error, Handler, Next, Result};

    /// What a request looked like when it reached [`Grab`].
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Seen {
        pub(crate) mechanism: Option<Mechanism>,
        pub(crate) prefs: Vec<Mechanism>,
    }

    /// Records each request and answers with its connection (after failing the first
    /// `fail_first` requests with Unavailable).
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Grab {
        seen: Arc<Mutex<Vec<Seen>>>,
        fail_first: Arc<AtomicUsize>,
    }

    impl Grab {
        pub(crate) fn failing_first(n: usize) -> Grab {
            let g = Grab::default();
            g.fail_first.store(n, Ordering::SeqCst);
            g
        }
        pub(crate) fn all(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
        pub(crate) fn last(&self) -> Seen {
            self.all().pop().unwrap_or_default()
        }
    }

    #[async_trait]
    impl Handler for Grab {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let conn = req.connection.clone().unwrap_or_default();
            self.seen.lock().unwrap().push(Seen {
                mechanism: conn.mechanism.clone(),
                prefs: req.mechanism_preferences.clone(),
            });
            let left = self.fail_first.load(Ordering::SeqCst);
            if left > 0 {
                self.fail_first.store(left - 1, Ordering::SeqCst);
                return Err(Error::unavailable("not yet"));
            }
            if next.remaining() > 0 {
                return next.request(cx, req).await;
            }
            Ok(conn)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IfName;

    #[test]
    fn generated_names_are_the_service_cut_to_10_a_dash_and_random_up_to_15_bytes() {
        let name = generate_ifname("icmp-responder");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("icmp-respo-"), "{name}");
        assert!(name[11..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert!(IfName::new(name.as_str()).is_ok());

        let short = generate_ifname("ns");
        assert_eq!(short.len(), 15);
        assert!(short.starts_with("ns-"), "{short}");

        assert_ne!(
            generate_ifname("icmp-responder"),
            generate_ifname("icmp-responder"),
            "random part"
        );
    }

    #[test]
    fn a_bridged_end_gets_name_and_mtu_but_no_addresses_routes_or_rules() {
        use nsm_sdk::proto::connectioncontext::IpContext;
        let ctx = ConnectionContext {
            mtu: 1400,
            ip_context: Some(IpContext {
                src_ip_addrs: vec!["172.16.0.1/32".into()],
                dst_ip_addrs: vec!["172.16.0.0/32".into()],
                src_routes: vec![nsm_sdk::proto::connectioncontext::Route {
                    prefix: "10.10.0.0/16".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        for side in [PodSide::Client, PodSide::Endpoint] {
            let full = end_plan(&ctx, side, "nsm-1", false).unwrap();
            assert_eq!(full, plan_from_context(&ctx, side, "nsm-1").unwrap());
            assert!(!full.addresses().is_empty());
            let bare = end_plan(&ctx, side, "nsm-1", true).unwrap();
            assert_eq!(
                bare,
                Plan::new(IfName::new("nsm-1").unwrap()).with_mtu(Mtu::new(1400).unwrap())
            );
        }
        let mut m = kernel_mechanism();
        assert!(!is_bridged(&m));
        m.parameters.insert(BRIDGED.into(), "true".into());
        assert!(is_bridged(&m));
        m.parameters.insert(BRIDGED.into(), "no".into());
        assert!(!is_bridged(&m));
    }

    #[test]
    fn characters_an_interface_cannot_have_are_left_out_of_the_prefix() {
        let name = generate_ifname("a b/c:dé@x.example");
        assert!(name.starts_with("abcd@x.exa-"), "{name}");
        assert!(IfName::new(name.as_str()).is_ok());
        let name = generate_ifname("");
        assert!(name.starts_with("nsm-") && name.len() == 15, "{name}");
    }
}
