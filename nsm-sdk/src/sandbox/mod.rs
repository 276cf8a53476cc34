//! In-process meshes for tests and demos (feature `sandbox`): nodes with a manager and
//! forwarders, a registry, endpoints and clients, all over real gRPC in one process;
//! any component can be killed and restarted on the same URL. Also counting and
//! error-injecting handlers for tests.

pub mod testing;

pub use testing::{counter, inject, Counter, Inject};
