//! What the nsm-rs test suites, benches and demo programs share, written once.

#![deny(missing_docs)]

pub mod lab;
