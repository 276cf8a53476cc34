//! The VXLAN remote mechanism for nsm-sdk: VNI allocation and VXLAN devices created
//! inside pod namespaces with the underlay socket in the node namespace.
//!
//! This crate is a placeholder until the VXLAN data plane lands (issue 5); it exports
//! nothing yet.

#![deny(missing_docs)]
