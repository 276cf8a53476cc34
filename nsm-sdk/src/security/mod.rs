//! Security foundation: SPIFFE identities, mTLS configs, signed path tokens and policies.
//!
//! The pieces, from the ground up:
//! - [`identity`]: an X.509-SVID (certificate chain and key) and a trust bundle read from
//!   PEM, and the [`SpiffeId`] in the leaf's URI SAN, parsed strictly.
//! - [`source`]: [`FileSource`] keeps the current identity read from the files named by
//!   `NSM_TLS_CERT`, `NSM_TLS_KEY` and `NSM_TLS_CA`, re-reads them when they change and
//!   publishes each good set on a [`tokio::sync::watch`]; [`SecurityConfig::from_env`]
//!   decides between that and insecure mode (`NSM_INSECURE=true`).
//! - [`tls`]: rustls server and client configs (ring, ALPN `h2`) that present the
//!   *current* SVID on every new handshake and verify peers SPIFFE-style against the
//!   *current* bundle; [`PeerIdentity`] is what a verified peer is.
//! - [`jwt`]: ES256 path tokens as Go NSM makes them (`sub`, `aud`, `exp`).
//! - [`policy`]: a [`PolicySet`] of Rego policies (Go NSM's defaults shipped in the crate,
//!   or a directory), compiled once and evaluated per call.
//! - `dev_ca` (feature `dev-ca`): a throw-away CA for demos, load runs and tests.
//!
//! # How the transport and the handlers will use it
//! Nothing here touches a socket or a chain yet. The transport will build its servers
//! from [`tls::server_config`] and its clients from [`tls::client_config`] (both take
//! the watch of a [`FileSource`], so rotation needs no rebuild), wrap TCP and unix
//! streams with tokio-rustls, and put the [`PeerIdentity`] of each accepted connection
//! into `Cx`. `update_token` will sign with [`jwt::sign`] using the current SVID and the
//! next hop's identity; an `authorize` handler will build the policy input with
//! [`policy::path_input`] and call [`PolicySet::check`] with [`policy::SERVER`],
//! [`policy::CLIENT`], [`policy::MONITOR`] or [`policy::REGISTRY`].

pub mod identity;
pub mod jwt;
pub mod policy;
pub mod source;
pub mod tls;

#[cfg(any(test, feature = "dev-ca"))]
pub mod dev_ca;

mod crypto;
mod error;

/// The rustls crypto provider (ring) every TLS config of the project is built with.
pub use crypto::provider as crypto_provider;
pub use error::SecurityError;
pub use identity::{SpiffeId, Svid, TrustBundle};
pub use policy::PolicySet;
pub use source::{FileSource, Identity, SecurityConfig};
pub use tls::PeerIdentity;
