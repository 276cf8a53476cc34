//! The chain core: the [`Handler`] trait, [`Next`], [`Chain`], the per-call context
//! [`Cx`], per-connection handles, the runtime layer ([`rt`]), the [`Url`]s of peers and
//! the tower adapters. The core knows no handler.

pub mod conn;
pub mod cx;
pub mod extensions;
pub mod handler;
pub mod monitor;
pub mod rt;
pub mod tower;
pub mod url;

pub use conn::{
    live_handles, live_tasks, spawn_owned, ConnEvent, ConnHandle, EventOutcome, EventReceipt,
    EventSink,
};
pub use cx::{process_start_time, Cx, Peer, PeerProcess, Side};
pub use extensions::Extensions;
pub use handler::{Chain, ChainBuilder, Cursor, Handler, Next};
pub use monitor::MonitorSource;
pub use url::{ClientUrl, RegistryUrls, Url};
