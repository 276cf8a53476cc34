//! Transports: tonic over `tcp://` and `unix://`, and an in-memory transport for tests;
//! the gRPC edges of chains (servers and the client at the end of a client chain).

pub mod client;
mod edge;
mod frames;
mod listener;
pub mod memory;
pub mod metadata;
pub mod registry_client;
pub mod server;
pub mod shared_monitor;

/// The URL types live in core so the registry can use them; re-exported where dialing
/// and serving use them.
pub use crate::core::url::{ClientUrl, Url};
pub use client::{grpc_client, monitor_connections, Channels, GrpcClient, DEFAULT_CONNECT_TIMEOUT};
pub use registry_client::{grpc_registry, GrpcRegistry};
pub use server::{serve, Server, Services};

#[cfg(test)]
mod tests;
