//! In-process meshes for tests and demos (feature `sandbox`): nodes with a manager and
//! forwarders, a registry, endpoints and clients, all over real gRPC in one process;
//! any component can be killed and restarted on the same URL. Also counting and
//! error-injecting handlers for tests.
//!
//! ```
//! # async fn demo() -> nsm_sdk::Result<()> {
//! use nsm_sdk::sandbox::{EndpointSpec, Sandbox};
//! use nsm_sdk::Cx;
//! let mesh = Sandbox::builder().nodes(1).build().await?;
//! let nse = mesh.node(0).endpoint(EndpointSpec::new("nse", "icmp")).await?;
//! let nsc = mesh.node(0).client("nsc");
//! let req = nsm_sdk::config::NsUrl::parse("kernel://icmp")?.to_request();
//! let conn = nsc.request(&mut Cx::client(), req).await?;
//! assert_eq!(conn.path.as_ref().unwrap().path_segments.len(), 4);
//! nsc.close(&mut Cx::client(), conn).await?;
//! assert_eq!(nse.counter.closes(), 1);
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

pub mod interdomain;
pub mod mesh;
pub mod testing;

pub use interdomain::{Domain, Interdomain, InterdomainBuilder};
pub use mesh::{
    EndpointHandle, EndpointSpec, ForwarderMechanisms, Node, Sandbox, SandboxBuilder, Transport,
    Vl3Spec, ETCD_ENV,
};
pub use testing::{counter, inject, Counter, Inject};
