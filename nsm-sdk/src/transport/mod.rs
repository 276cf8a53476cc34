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
pub mod url;

pub use client::{grpc_client, monitor_connections, Channels, GrpcClient, DEFAULT_CONNECT_TIMEOUT};
pub use registry_client::{grpc_registry, GrpcRegistry};
pub use server::{serve, Server, Services};
pub use url::{ClientUrl, Url};

#[cfg(test)]
mod tests;
