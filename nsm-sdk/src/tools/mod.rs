//! Tools that are not handlers: the wire constants of mechanisms and the NS URL that
//! NSC configuration uses.

pub mod constants;
pub mod nsurl;

pub use constants::{cls, params, payload, types, MAX_INTERFACE_NAME_LEN};
pub use nsurl::{check_interface_name, NsUrl};
