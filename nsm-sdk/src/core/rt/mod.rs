//! The runtime layer under the handlers: what several handlers need and none should
//! write again: [`begin`](mod@begin), the per-connection runtime (one operation at a
//! time per connection, in order, and the events handlers queue from inside; it is the
//! implementation of [`EventSink`](super::EventSink)), [`Backoff`], the one retry
//! rule, and (inside the crate) `keyed_timers`, at most one timer per key with the calls
//! for one key in order, which the registry's `expire` and `registry_refresh` keep
//! their per-entry timers in.

pub mod backoff;
pub mod begin;
pub(crate) mod count_guard;
pub(crate) mod keyed_timers;

pub use backoff::Backoff;
pub use begin::{begin, Begin};
