//! Running a component as a program: serve its chain, keep it registered with its
//! node's manager, and stop cleanly.
//!
//! [`serve_endpoint`] is the whole life of an endpoint (NSE): it serves the endpoint's
//! chain ([`transport::serve`](crate::transport::serve)), registers its network services
//! (those the registry does not know yet) and itself through the manager at
//! [`ServeOptions`]' `connect_to`, keeps the registration fresh with
//! [`registry_refresh`](mod@crate::registry::registry_refresh) (jittered, owned timers), and
//! when the stop token is cancelled unregisters, then stops serving.
//! [`serve_forwarder`] does the same for a forwarder. [`stop_on_signal`] gives a program
//! the token that SIGTERM or SIGINT cancels, so its `main` is a few lines:
//!
//! ```no_run
//! use nsm_sdk::chains::{endpoint, EndpointOptions};
//! use nsm_sdk::serving::{serve_endpoint, stop_on_signal, ServeOptions};
//!
//! # async fn run() -> nsm_sdk::Result<()> {
//! let nse = endpoint("my-nse", EndpointOptions::new());
//! let opts = ServeOptions::new(
//!     "unix:///run/my-nse.sock".parse()?,
//!     "unix:///var/lib/networkservicemesh/nsm.io.sock".parse()?,
//! )
//! .network_service("my-service");
//! let stop = stop_on_signal().map_err(|e| nsm_sdk::Error::internal(e.to_string()))?;
//! serve_endpoint(&nse, opts, stop).await
//! # }
//! ```
//!
//! [`Vl3Mesh`] keeps a vL3 endpoint linked to the other endpoints of its service
//! (docs/VL3.md).
//!
//! A floor above [`chains`](crate::chains): it only assembles what the chains, the
//! registry handlers and the transport provide.

mod options;
mod registration;
mod serve;
mod signal;
mod vl3_mesh;

pub use options::{
    ServeOptions, DEFAULT_CALL_TIMEOUT, DEFAULT_MANAGER_URL, DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_STARTUP_TIMEOUT,
};
pub use registration::{ensure_network_service, registry_client, retry_startup, Registration};
pub use serve::{serve_endpoint, serve_forwarder};
pub use signal::stop_on_signal;
pub use vl3_mesh::Vl3Mesh;

#[cfg(test)]
mod tests;
