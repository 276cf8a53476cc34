//! The runtime layer under the handlers: what several handlers need and none should
//! write again: [`begin`](mod@begin), the per-connection runtime (one operation at a
//! time per connection, in order, and the events handlers queue from inside; it is the
//! implementation of [`EventSink`](super::EventSink)), and [`Backoff`], the one retry
//! rule.

pub mod backoff;
pub mod begin;
pub(crate) mod keyed_timers;

pub use backoff::Backoff;
pub use begin::{begin, Begin};
