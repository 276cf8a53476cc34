//! DNS for nsm-sdk connections: what an endpoint serves and what a client pod sees.
//!
//! # Pieces
//!
//! - [`Records`] ([`records`]): an in-memory set of A/AAAA records, updated concurrently
//!   by handlers (one owner per entry, so two connections can hold the same name).
//! - [`DnsServer`] ([`server`]): a DNS server (hickory-server) on UDP and TCP serving
//!   [`Records`]; names it does not hold are answered by **fanout** to other servers
//!   ([`fanout`]: in parallel, first good answer wins, bounded timeout), remembered in a
//!   small TTL-bound [`cache`]. A fanout query goes out without "recursion desired" and
//!   a query without it is never fanned out again, so two servers that fan out to each
//!   other never loop. It never recurses to the internet.
//! - [`dns_names`] ([`mod@dns_names`]): the endpoint-side handler that registers each
//!   client's name (a [`NameTemplate`] over the request) -> the client's addresses, and
//!   puts the endpoint's DNS config into the connection's `dns_context`.
//! - [`dns_context`] ([`mod@dns_context`]): the client-side handler that keeps the DNS
//!   configs of all the client's connections and applies them to the client's pod as a
//!   resolv.conf ([`ResolvConf`]: `/etc/netns/<pod>/resolv.conf` for a named network
//!   namespace, which `ip netns exec` bind-mounts over `/etc/resolv.conf`).
//! - [`vl3_dns`] ([`mod@vl3_dns`]): names in a vL3 network: `dns_names` for the
//!   endpoint's clients, and a fanout to every vL3 endpoint it is linked with.
//!
//! docs/DNS.md in the repository says what a pod sees and the limits.
//!
//! # Errors
//!
//! [`Error`]: a name or a template that does not parse is `InvalidArgument`, a socket
//! or a file that cannot be used is `Internal` (through `From<Error> for nsm_sdk::Error`).

#![deny(missing_docs)]
#![warn(rust_2018_idioms, unreachable_pub)]

pub mod cache;
pub mod dns_context;
pub mod dns_names;
pub mod fanout;
pub mod records;
pub mod resolv_conf;
pub mod server;
pub mod template;
pub mod vl3_dns;

pub use cache::Cache;
pub use dns_context::{dns_context, DnsContext};
pub use dns_names::{dns_names, DnsNames};
pub use fanout::Fanout;
pub use records::Records;
pub use resolv_conf::{parse_server, ResolvConf};
pub use server::{DnsServer, DnsServerBuilder};
pub use template::NameTemplate;
pub use vl3_dns::{vl3_dns, Vl3Dns, Vl3DnsLinks};

/// The DNS messages of the NSM API (`connectioncontext.DNSConfig`, `DNSContext`).
pub use nsm_proto::connectioncontext::{DnsConfig, DnsContext as DnsContextMsg};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A DNS name that does not parse or is too long.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// A name template that does not parse.
    #[error("invalid name template {template:?}: {reason}")]
    InvalidTemplate {
        /// The template as given.
        template: String,
        /// Why it is refused.
        reason: String,
    },
    /// A socket could not be bound or configured.
    #[error("DNS server socket {addr}: {source}")]
    Socket {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A resolv.conf could not be read, written or removed.
    #[error("resolv.conf {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl From<Error> for nsm_sdk::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidName { .. } | Error::InvalidTemplate { .. } => {
                nsm_sdk::Error::InvalidArgument(e.to_string())
            }
            Error::Socket { .. } | Error::File { .. } => nsm_sdk::Error::Internal(e.to_string()),
        }
    }
}

/// Parses `name` as an absolute, lower-case DNS name (a trailing dot is optional).
pub(crate) fn fqdn(name: &str) -> Result<hickory_proto::rr::Name> {
    let bad = |reason: String| Error::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.trim().is_empty() {
        return Err(bad("empty".into()));
    }
    let mut n = hickory_proto::rr::Name::from_ascii(name).map_err(|e| bad(e.to_string()))?;
    n.set_fqdn(true);
    Ok(n.to_lowercase())
}

/// What the handlers' unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use nsm_proto::connection::Connection;
    use nsm_proto::networkservice::NetworkServiceRequest;

    /// A Request of connection `id` to the service `vl3`, labelled `podName=pod` when
    /// given.
    pub(crate) fn request(id: &str, pod: Option<&str>) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                network_service: "vl3".into(),
                labels: pod
                    .map(|p| [("podName".to_string(), p.to_string())].into())
                    .unwrap_or_default(),
                ..Default::default()
            }),
            mechanism_preferences: vec![],
        }
    }
}

/// The README's example, compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
