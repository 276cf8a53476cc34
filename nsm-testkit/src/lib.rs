//! What the nsm-rs test suites, benches and demo programs share, written once:
//!
//! - [`lab`]: a lab of named network namespaces (pid-unique prefixes, veth links,
//!   addresses, `ip netns exec`), deleted on drop even when a test fails;
//! - [`clusters`]: two clusters of nodes joined only by a public link (1:1 NAT), for
//!   the interdomain kernel tests and demo;
//! - [`Ns`]: one pid-unique namespace (a "pod" or a "node") read through `ip -j`, and
//!   [`underlay`]: two nodes joined by a veth underlay; [`switched_underlay`]: n nodes
//!   on one bridge;
//! - `dns` (feature `dns`): lookups through DNS configs with a real stub resolver;
//! - `etcd` (feature `etcd`): real etcd members on loopback for the registry's store;
//! - [`dnsmasq`]: a real DNS server (dnsmasq) with the SRV records of interdomain meshes;
//! - [`can_run`] / [`require_root!`]: whether the kernel tests can run here (root, `ip`,
//!   `ping`), saying why they skip when not;
//! - [`eventually`]: waiting for a condition, on tokio's clock (paused time works);
//! - [`Answers`]: a probe of what a client chain answered;
//! - [`request`] and friends: the requests and path reads every suite builds;
//! - [`kernel`]: the KERNEL mesh of the data-plane suites, built on the sandbox;
//! - [`bench`](mod@bench): statistics, runtimes, the timing handler and the `iperf3`
//!   comparison of the benches;
//! - [`sandbox`]: `nsm_sdk::sandbox` (the in-process mesh), re-exported so a suite
//!   imports its whole kit from one place.

#![deny(missing_docs)]

mod answers;
pub mod bench;
pub mod clusters;
#[cfg(feature = "dns")]
pub mod dns;
pub mod dnsmasq;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod kernel;
pub mod lab;
mod ns;
mod req;
mod skip;
mod wait;

pub use answers::Answers;
pub use dnsmasq::DnsServer;
pub use lab::{Lab, LabError, LabResult};
pub use ns::{switched_underlay, underlay, underlay_addr, unique, Ns, UNDERLAY};
pub use nsm_sdk::sandbox;
pub use req::{
    client_without_refresh, labels, names, refresh, request, request_labelled, request_with_context,
};
pub use skip::can_run;
pub use wait::eventually;
