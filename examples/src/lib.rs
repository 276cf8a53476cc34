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
//! | `nse-vl3` | a vL3 endpoint: a router in its pod, prefixes from `nsm-vl3-ipam`, linked to the other vL3 endpoints (docs/VL3.md) |
//! | `nsm-vl3-ipam` | the vL3 prefix server (`IPAM.ManagePrefixes`) |
//! | `nsc` | a client: requests NS URLs, prints each connection as a JSON line |
//! | `hello-endpoint` | the smallest "write your own endpoint" program |
//! | `embed-client` | an application using a network service through the SDK's client chain (guide) |
//! | `my-nsmgr` | the manager chain with a request counter inserted (guide) |
//! | `nse-firewall` | a service-chain firewall: bridges each connection, filters it with nftables |
//! | `nse-vpn-gateway` | a VPN gateway NSE: addresses, a route to the corporate networks, NAT |
//! | `demo` | the README's first command: firewall + VPN gateway across two nodes ([`vpn_demo`]); `demo --vl3`: a vL3 network on three nodes with names ([`vl3_demo`]); `demo --interdomain`: a VPN gateway of another cluster ([`interdomain_demo`]) |
//! | `nsm-load` | a load tool: N connections set up, refreshed and closed, measured ([`load`]) |
//!
//! `nsmgr`, `nsm-forwarder` and `nsm-registry` serve their process metrics (RSS, fds,
//! tasks) in the Prometheus text format with `NSM_METRICS_LISTEN_ON` ([`metrics`]).
//!
//! This library is what they share: parsing ([`Common`], [`parse_duration`],
//! [`parse_labels`]), the life of a program ([`run`]: logging, signals, exit statuses),
//! serving ([`serve_all`], [`shutdown_all`]), running an endpoint from its settings
//! ([`serve_endpoint`], over nsm-sdk's [`serving`](nsm_sdk::serving), which also keeps
//! the forwarder and the endpoints registered) and the handlers the programs add to their
//! chains ([`log_calls`], [`print_connections`]). The mechanisms they serve and ask for
//! come from the library crates: `nsm_sdk_vxlan::forwarder_mechanisms`,
//! `nsm_sdk_kernel::endpoint_mechanisms`, `nsm_sdk_kernel::preferences`.
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
pub mod interdomain_demo;
pub mod load;
pub mod metrics;
mod process;
mod service_file;
mod vl3;
pub mod vl3_demo;
pub mod vpn_demo;

pub use cli::{
    parse_duration, parse_label, parse_labels, parse_worker_threads, program_name, Common, DnsArgs,
    Vl3Networks, DEFAULT_NSM_SOCKET,
};
pub use connections::{print_connection, print_connections, PrintConnections};
pub use endpoint::{log_calls, serve_endpoint, EndpointArgs, LogCalls};
pub use firewall::{apply_acl, firewall, nft, remove_acl, Acl, AclRule, Proto, Verdict, NFT_TABLE};
pub use gateway::{
    corporate_routes, nat_ruleset, route_to_corporate, stop_routing, vpn_gateway, CorporateRoutes,
    NAT_TABLE,
};
/// Moved to nsm-sdk; re-exported for the bench and the load tool.
pub use nsm_sdk::serving::registry_client;
pub use process::{
    init_logging, run, runtime, security, serve_all, shutdown_all, stop_on_signal, terminate,
    Failure, SHUTDOWN_TIMEOUT,
};
pub use service_file::{register_services, ServiceFileArgs};
pub use vl3::{Vl3Endpoint, Vl3EndpointOptions, DEFAULT_DNS_LISTEN_ON};
