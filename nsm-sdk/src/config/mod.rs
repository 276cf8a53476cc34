//! What users write to configure a component: the NS URL an NSC names its network
//! service with ([`ns_url`]) and NetworkService definition files ([`ns_file`]).

pub mod interdomain;
pub mod ns_file;
pub mod ns_url;

pub use ns_url::{check_interface_name, NsUrl};
