//! The Network Service Mesh API v1 on the wire: prost messages and tonic stubs for the
//! packages `connection`, `connectioncontext`, `networkservice`, `registry` and `ipam`, written
//! field for field from the project's wire contract (`docs/WIRE.md`).
//!
//! Module names are the proto package names. The protobuf JSON mapping of any message is
//! available through [`json`], backed by the compiled descriptors.

#![deny(missing_docs)]
#![allow(clippy::large_enum_variant)]

/// Package `connectioncontext`: addresses, routes, DNS, ethernet and MTU of a connection.
#[allow(missing_docs, unreachable_pub)]
pub mod connectioncontext {
    include!(concat!(env!("OUT_DIR"), "/connectioncontext.rs"));
}

/// Package `connection`: connections, mechanisms, paths and the monitor service.
#[allow(missing_docs, unreachable_pub)]
pub mod connection {
    include!(concat!(env!("OUT_DIR"), "/connection.rs"));
}

/// Package `networkservice`: the `NetworkService` service (Request and Close).
#[allow(missing_docs, unreachable_pub)]
pub mod networkservice {
    include!(concat!(env!("OUT_DIR"), "/networkservice.rs"));
}

/// Package `registry`: network services and endpoints, and their registries.
#[allow(missing_docs, unreachable_pub)]
pub mod registry {
    include!(concat!(env!("OUT_DIR"), "/registry.rs"));
}

/// Package `ipam` (optional in NSM API v1): the vL3 prefix server's `IPAM` service
/// (`ManagePrefixes`), as NSM's `ipam-vl3` speaks it.
#[allow(missing_docs, unreachable_pub)]
pub mod ipam {
    include!(concat!(env!("OUT_DIR"), "/ipam.rs"));
}

mod access;
pub mod codec;
pub mod json;

/// The encoded `FileDescriptorSet` of every proto file of this crate.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nsm_descriptor.bin"));
