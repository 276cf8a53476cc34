//! # nsm-examples
//!
//! Example programs built on [`nsm_sdk`], configured like NSM's own commands: each
//! setting is an `NSM_*` environment variable that is also a `--flag`, and `--help`
//! lists them.
//!
//! | program | what it runs |
//! |---|---|
//! | `nsm-registry` | the registry server (`registry_server`) |
//! | `nsmgr` | a node manager, also its node's registry front |
//! | `nsm-forwarder` | a forwarder (KERNEL veth pairs, VXLAN to other nodes with `NSM_TUNNEL_IP`, NOOP), registered with its manager |
//! | `nse-icmp-responder` | an endpoint with point-to-point IPAM, registered with its manager |
//! | `nsc` | a client: requests NS URLs, prints each connection as a JSON line |
//! | `hello-endpoint` | the smallest "write your own endpoint" program |
//! | `nse-firewall` | a service-chain firewall: bridges each connection, filters it with nftables |
//! | `nse-vpn-gateway` | a VPN gateway NSE: addresses, a route to the corporate networks, NAT |
//! | `demo` | the README's first command: firewall + VPN gateway across two nodes ([`vpn_demo`]) |
//! | `nsm-load` | a load tool: N connections set up, refreshed and closed, measured ([`load`]) |
//!
//! `nsmgr`, `nsm-forwarder` and `nsm-registry` serve their process metrics (RSS, fds,
//! tasks) in the Prometheus text format with `NSM_METRICS_LISTEN_ON` ([`metrics`]).
//!
//! This library is what they share: parsing ([`Common`], [`parse_duration`],
//! [`parse_labels`]), the life of a program ([`run`]: logging, signals, exit statuses),
//! serving ([`serve_all`], [`shutdown_all`]), staying registered ([`registered_until`],
//! [`Registration`]),
//! running an endpoint ([`serve_endpoint`]), the mechanisms they serve and ask for
//! ([`forwarder_mechanisms`], [`endpoint_mechanisms`], [`preferences`]) and the handlers the programs add to their
//! chains ([`log_calls`], [`print_connections`]).
//!
//! Every program logs to stderr (level from `NSM_LOG_LEVEL`, else `RUST_LOG`, else
//! `info`), stops cleanly with exit status 0 on SIGTERM or SIGINT after undoing what
//! it did (unregistering, closing), and exits with status 2 and one line on stderr when
//! its configuration cannot work.

#![warn(missing_docs)]

mod cli;
mod connections;
mod endpoint;
mod firewall;
mod gateway;
pub mod load;
mod mechanisms;
pub mod metrics;
mod process;
mod registration;
mod service_file;
pub mod vpn_demo;

pub use cli::{
    parse_duration, parse_label, parse_labels, parse_worker_threads, program_name, Common,
    DEFAULT_NSM_SOCKET,
};
pub use connections::{print_connection, print_connections, PrintConnections};
pub use endpoint::{log_calls, registry_client, serve_endpoint, EndpointArgs, LogCalls};
pub use firewall::{apply_acl, firewall, nft, remove_acl, Acl, AclRule, Proto, Verdict, NFT_TABLE};
pub use gateway::{
    corporate_routes, nat_ruleset, route_to_corporate, stop_routing, vpn_gateway, CorporateRoutes,
    NAT_TABLE,
};
pub use mechanisms::{
    endpoint_mechanisms, forwarder_mechanisms, kernel_liveness, kernel_when_offered, preferences,
    KernelWhenOffered, MechanismChoice,
};
pub use process::{
    init_logging, run, runtime, serve_all, shutdown_all, stop_on_signal, terminate, Failure,
    SHUTDOWN_TIMEOUT,
};
pub use registration::{
    ensure_network_service, registered_until, Registration, CALL_TIMEOUT, DEFAULT_REFRESH,
    STARTUP_TIMEOUT,
};
pub use service_file::{register_services, ServiceFileArgs};
