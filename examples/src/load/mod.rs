//! The load tool's logic (`nsm-load`): N client connections against a mesh, kept
//! refreshing for a while, then closed, with what it took measured.
//!
//! The mesh is one of: an in-process [`Sandbox`](nsm_sdk::sandbox::Sandbox) (one
//! node, NOOP), the example programs started as child processes on unix sockets in a
//! temporary directory (`nsm-registry`, `nsmgr`, `nsm-forwarder`, `nse-icmp-responder`,
//! each serving its metrics), or a mesh already running (a manager's URL).
//!
//! Phases: a warm-up Request + Close (the mesh is ready, the channel is up); **setup**
//! (N Requests, at most `concurrency` in flight, each timed); **soak** (the connections
//! are left to refresh for the duration: the client's path tokens live
//! `token_lifetime`, so each connection refreshes every 20 to 40 % of it); **close**
//! (N Closes). Every connection shares one client chain (one client process with N
//! connections: `begin`, `refresh`, `retry`, `heal` unless turned off, and a counting
//! handler after heal).
//!
//! Measured: setup and close latency (p50/p90/p99/max), errors by gRPC code of each
//! phase (refreshes included: the counting handler sees every re-request and its
//! outcome), refreshes per second and their latency, heal events (connections found
//! broken, and healed), and, for each process whose metrics endpoint is known, RSS,
//! open fds, threads, CPU and tasks at each stage: `idle` (before the warm-up),
//! `start` (0 connections), `after_setup`, `end_of_soak`, `after_close`.
//!
//! State: the counters shared with the counting handler and the progress line, the
//! connections held, the child processes (killed when the run ends, failed or not).
//! Failures handled: a failed Request, refresh or Close is counted by code and the run
//! goes on; a stop signal cuts the soak short and still closes everything; a metrics
//! endpoint that does not answer leaves its sample out.
//!
//! One concern per file: [`LoadOptions`] (`options`), the percentiles ([`Latency`],
//! [`Histogram`]), the KERNEL clients' network namespaces (`namespaces`), the started
//! programs (`children`), the mesh and its client chain (`mesh`), the counting handler
//! (`count_requests`), the phases ([`run_load`]), the progress line (`progress`) and
//! the [`Report`].

mod children;
mod count_requests;
mod heal_times;
mod histogram;
mod mesh;
mod namespaces;
mod options;
mod phases;
mod pings;
mod progress;
mod report;

pub use heal_times::HealSummary;
pub use histogram::{Histogram, Latency};
pub use options::{LoadMechanism, LoadOptions, Target, STAGES};
pub use phases::run_load;
pub use report::{write_json, Errors, Phase, Pings, Report, Restart, Soak};
