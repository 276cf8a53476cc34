//! Transports: tonic over `tcp://` and `unix://`, and an in-memory transport for tests;
//! the gRPC edges of chains (servers and the client at the end of a client chain).

/// A generated tonic client or server with both message limits set to
/// [`MAX_MESSAGE_SIZE`](crate::wire::bounds::MAX_MESSAGE_SIZE): tonic's defaults are 4 MiB
/// to decode and no limit to encode, and every end of every link says the same.
macro_rules! sized {
    ($service:expr) => {
        $service
            .max_decoding_message_size($crate::wire::bounds::MAX_MESSAGE_SIZE)
            .max_encoding_message_size($crate::wire::bounds::MAX_MESSAGE_SIZE)
    };
}

mod authority;
pub mod channels;
pub mod client;
pub mod dns;
mod edge;
mod frames;
mod listener;
pub mod memory;
pub mod metadata;
pub mod prefix_client;
pub mod registry_client;
pub mod server;
pub mod tls;

/// The URL types live in core so the registry can use them; re-exported where dialing
/// and serving use them.
pub use crate::core::url::{ClientUrl, RegistryUrls, Url};
pub use channels::{monitor_connections, Channels, DEFAULT_CONNECT_TIMEOUT};
pub use client::{grpc_client, GrpcClient};
pub use dns::{DnsRegistries, DomainResolver};
pub use prefix_client::{prefix_client, PrefixClient};
pub use registry_client::{grpc_registries, grpc_registry, GrpcRegistry};
pub use server::{serve, Server, Services};
pub use tls::Tls;

#[cfg(test)]
mod tests;
