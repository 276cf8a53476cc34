//! The runtime layer under the handlers: what several handlers need and none should
//! write again: [`begin`](mod@begin), the per-connection runtime (one operation at a
//! time per connection, in order, and the events handlers queue from inside; it is the
//! implementation of [`EventSink`](super::EventSink)), [`Backoff`], the one retry
//! rule; and, inside the crate, `keyed_lock` (a value per key behind a fair lock, the
//! calls for one key in order: `begin`'s connections, the keyed timers' slots),
//! `keyed_timers` (at most one timer per key: the registry's `expire` and
//! `registry_refresh`), `conn_task` (the
//! one background task a handler runs for a connection, fenced by a generation: `heal`
//! and `upstream_refresh`) and `count_guard` (a live count of timers or tasks).

pub mod backoff;
pub mod begin;
pub(crate) mod conn_task;
pub(crate) mod count_guard;
pub(crate) mod keyed_lock;
pub(crate) mod keyed_timers;

pub use backoff::Backoff;
pub use begin::{begin, Begin};
