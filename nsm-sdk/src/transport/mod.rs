//! Transports: tonic over `tcp://` and `unix://`, and an in-memory transport for tests;
//! the gRPC edges of chains (servers and the client at the end of a client chain).

pub mod channels;
pub mod client;
mod edge;
mod frames;
mod listener;
pub mod memory;
pub mod metadata;
pub mod registry_client;
pub mod server;
pub mod tls;

/// The URL types live in core so the registry can use them; re-exported where dialing
/// and serving use them.
pub use crate::core::url::{ClientUrl, Url};
pub use channels::{monitor_connections, Channels, DEFAULT_CONNECT_TIMEOUT};
pub use client::{grpc_client, GrpcClient};
pub use registry_client::{grpc_registry, GrpcRegistry};
pub use server::{serve, Server, Services};
pub use tls::Tls;

#[cfg(test)]
mod tests;
