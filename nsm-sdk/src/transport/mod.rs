//! Transports: tonic over `tcp://` and `unix://`, and an in-memory transport for tests;
//! the gRPC edges of chains (servers and the client at the end of a client chain).

pub mod url;

pub use url::{ClientUrl, Url};
