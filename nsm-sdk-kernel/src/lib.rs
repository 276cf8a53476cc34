//! The KERNEL mechanism for nsm-sdk: network namespace handles, veth interfaces and
//! connection-context programming through rtnetlink.
//!
//! This crate is a placeholder until the kernel data plane lands (issue 4); it exports
//! nothing yet.

#![deny(missing_docs)]
