//! Tools that are not handlers: the wire constants of mechanisms, the NS URL that
//! NSC configuration uses, NetworkService definition files, and token generators.

pub mod constants;
pub mod nsfile;
pub mod nsurl;
pub mod select_mechanism;
pub mod token;

pub use constants::{cls, params, payload, types, MAX_INTERFACE_NAME_LEN};
pub use nsurl::{check_interface_name, NsUrl};
pub use select_mechanism::select_mechanism;
pub use token::{lifetime_token, LifetimeToken, TokenGenerator, DEFAULT_TOKEN_LIFETIME};
