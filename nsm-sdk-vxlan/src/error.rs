//! The crate's error type and its mapping to [`nsm_sdk::Error`].
//!
//! The kernel answers a second VXLAN device with the same VNI and UDP port in one
//! namespace with a bare `EEXIST` (its explanatory text is not shown by rtnetlink,
//! docs/KERNEL.md 5.3). [`crate::vxlan_up`] checks that the interface name is free in the
//! pod first, so an `EEXIST` on the creation itself is reported as
//! [`Error::VniClash`]: the caller picks another VNI.

use crate::vni::Parity;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while allocating VNIs or making VXLAN devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VNI is already used by another VXLAN device on this UDP port in the node
    /// namespace (the kernel's `EEXIST`, "A VXLAN device with the specified VNI
    /// already exists"). Pick another VNI
    /// ([`crate::VniAllocator::reserve_after_clash`]) and try again.
    #[error("VNI {vni} is already used on udp/{port} in network namespace {netns}")]
    VniClash {
        /// The refused VNI.
        vni: u32,
        /// The UDP destination port of the device.
        port: u16,
        /// The node namespace the device was created from.
        netns: String,
    },
    /// A value that is not a usable VNI (0 or wider than 24 bits).
    #[error("invalid VNI {value}: {reason}")]
    InvalidVni {
        /// The value as given.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The VNI is held by another connection on this node.
    #[error("VNI {vni} is already allocated to connection {holder:?}")]
    VniTaken {
        /// The VNI.
        vni: u32,
        /// The connection that holds it (empty when it was reserved after a clash).
        holder: String,
    },
    /// Every VNI of this parity is in use on this node.
    #[error("no free {parity:?} VNI left on this node")]
    VniExhausted {
        /// The parity asked for.
        parity: Parity,
    },
    /// Tunnel endpoints or parameters that cannot make a VXLAN device.
    #[error("invalid VXLAN parameters: {0}")]
    InvalidTunnel(String),
    /// A failure of the kernel layer (namespaces, links, addresses, routes).
    #[error(transparent)]
    Kernel(#[from] nsm_sdk_kernel::Error),
}

impl From<Error> for nsm_sdk::Error {
    fn from(e: Error) -> nsm_sdk::Error {
        match e {
            Error::Kernel(k) => k.into(),
            Error::InvalidVni { .. } | Error::InvalidTunnel(_) => {
                nsm_sdk::Error::InvalidArgument(e.to_string())
            }
            // Another VNI (chosen by the server again, or by this node after
            // `reserve_after_clash`) can succeed: retryable.
            Error::VniClash { .. } | Error::VniTaken { .. } | Error::VniExhausted { .. } => {
                nsm_sdk::Error::Unavailable(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vni_clash_is_retryable_and_a_bad_vni_is_not() {
        let clash: nsm_sdk::Error = Error::VniClash {
            vni: 5000,
            port: 4789,
            netns: "n1".into(),
        }
        .into();
        assert!(matches!(clash, nsm_sdk::Error::Unavailable(_)));
        assert!(clash.is_retryable());
        let bad: nsm_sdk::Error = Error::InvalidVni {
            value: 0,
            reason: "0 means unset",
        }
        .into();
        assert!(matches!(bad, nsm_sdk::Error::InvalidArgument(_)));
        assert!(!bad.is_retryable());
    }
}
