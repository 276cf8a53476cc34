//! vL3 prefixes: the prefix server's allocation logic ([`PrefixServer`], what the
//! `IPAM.ManagePrefixes` service of NSM's optional `ipam` package answers with) and the
//! prefixes a vL3 endpoint holds ([`Vl3Prefixes`], what its handlers read).
//!
//! A vL3 network is one prefix per address family (`172.16.0.0/16`, `fd10::/112`);
//! each vL3 endpoint gets one child prefix of it per family (`172.16.3.0/24`) from the
//! prefix server and hands out its clients' addresses from it (docs/VL3.md). The gRPC
//! edges live in the transport floor (`transport::serve` with
//! [`Services::ipam`](crate::transport::Services::ipam), `transport::prefix_client`).

mod pool;
mod prefixes;

pub use pool::{PrefixServer, PrefixServerBuilder, PrefixSession, DEFAULT_RESERVE_FOR};
pub use prefixes::Vl3Prefixes;
