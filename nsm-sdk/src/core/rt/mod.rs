//! The runtime layer under the handlers: what several handlers need and none should
//! write again. [`Backoff`] is the one retry rule.

pub mod backoff;

pub use backoff::Backoff;
