//! The crate's error type and its mapping to [`nsm_sdk::Error`].
//!
//! Kernel errors carry only an errno (the kernel's explanatory text is not shown by
//! rtnetlink), so each variant is raised where the context is known: an `EEXIST` on a
//! veth creation becomes [`Error::LinkExists`] naming the interface and namespace, a
//! missing link becomes [`Error::LinkNotFound`], and so on.

use std::io;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening namespaces, planning or programming
/// the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A network namespace URL or path that cannot name a namespace.
    #[error("invalid network namespace URL {url:?}: {reason}")]
    InvalidNetnsUrl {
        /// The URL or path as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The namespace file does not exist (the pod or process is gone).
    #[error("network namespace {path} does not exist")]
    NetnsNotFound {
        /// The path that was opened.
        path: String,
    },
    /// The file exists but is not a network namespace.
    #[error("{path} is not a network namespace")]
    NotANetns {
        /// The path that was opened.
        path: String,
    },
    /// Opening or entering a namespace failed for another reason.
    #[error("network namespace {path}: {source}")]
    NetnsIo {
        /// The namespace's path.
        path: String,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// An interface name the kernel would refuse.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidInterfaceName {
        /// The name as given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An MTU the interface cannot take.
    #[error("invalid MTU {mtu}: {reason}")]
    InvalidMtu {
        /// The MTU as given.
        mtu: u32,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A malformed field of the connection context.
    #[error("{field}: {value:?} {reason}")]
    InvalidContext {
        /// The field, e.g. `ip_context.src_ip_addrs`.
        field: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The interface name is already taken in the target namespace, by a link that is
    /// not a leftover of the same connection.
    #[error("interface {name} already exists in network namespace {netns}{}", holder(.alias))]
    LinkExists {
        /// The interface name.
        name: String,
        /// The namespace it clashes in.
        netns: String,
        /// What holds the name, when it was looked at: `Some(alias)` of the link
        /// there (`Some("")` for a link without alias, made by something else than the
        /// mesh); `None` when the kernel refused the creation without telling which
        /// link clashed.
        alias: Option<String>,
    },
    /// A link alias the kernel would refuse.
    #[error("invalid interface alias {alias:?}: {reason}")]
    InvalidAlias {
        /// The alias as given.
        alias: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The interface does not exist (any more) in the namespace.
    #[error("no interface {name} in network namespace {netns}")]
    LinkNotFound {
        /// The interface name.
        name: String,
        /// The namespace that was searched.
        netns: String,
    },
    /// A ping could not be tried (no ICMP socket, no sending).
    #[error("ping {target} in network namespace {netns}: {source}")]
    Ping {
        /// The address that was to be pinged.
        target: std::net::IpAddr,
        /// The namespace pinged from.
        netns: String,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// The handle cannot do this operation (a test double without link groups).
    #[error("{op} is not supported by the netlink handle of {netns}")]
    Unsupported {
        /// What was asked.
        op: &'static str,
        /// The namespace of the handle.
        netns: String,
    },
    /// A netlink request failed.
    #[error("netlink {op} in network namespace {netns}: {message}")]
    Netlink {
        /// What was being done (`add address 192.0.2.1/32 to nsm-1`, ...).
        op: String,
        /// The namespace the socket belongs to.
        netns: String,
        /// The errno the kernel returned, if it returned one.
        errno: Option<i32>,
        /// The error as rtnetlink reports it.
        message: String,
    },
}

impl Error {
    /// The errno of a failed netlink request, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Netlink { errno, .. } => *errno,
            Error::NetnsIo { source, .. } | Error::Ping { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// A failed rtnetlink request, with the errno extracted when the kernel sent one.
    pub(crate) fn netlink(op: impl Into<String>, netns: &str, e: rtnetlink::Error) -> Self {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
            _ => None,
        };
        Error::Netlink {
            op: op.into(),
            netns: netns.to_string(),
            errno,
            message: e.to_string(),
        }
    }
}

/// How a [`Error::LinkExists`] names what holds the interface name.
fn holder(alias: &Option<String>) -> String {
    match alias.as_deref() {
        None => String::new(),
        Some("") => " (a link without alias: not made by the mesh)".to_string(),
        Some(a) => format!(" (alias {a:?}: not this connection's)"),
    }
}

const EPERM: i32 = 1;
const EACCES: i32 = 13;

impl From<Error> for nsm_sdk::Error {
    fn from(e: Error) -> nsm_sdk::Error {
        let msg = e.to_string();
        match e {
            Error::InvalidNetnsUrl { .. }
            | Error::NotANetns { .. }
            | Error::InvalidInterfaceName { .. }
            | Error::InvalidMtu { .. }
            | Error::InvalidContext { .. }
            | Error::InvalidAlias { .. }
            // The requested name clashes with what is already in the pod: trying again
            // elsewhere cannot help, the request has to change.
            | Error::LinkExists { .. } => nsm_sdk::Error::InvalidArgument(msg),
            Error::NetnsNotFound { .. } | Error::LinkNotFound { .. } => {
                nsm_sdk::Error::NotFound(msg)
            }
            ref other => match other.errno() {
                Some(EPERM | EACCES) => nsm_sdk::Error::PermissionDenied(msg),
                _ => nsm_sdk::Error::Internal(msg),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_sdk::Error as Sdk;

    #[test]
    fn bad_input_maps_to_invalid_argument_and_missing_things_to_not_found() {
        let invalid = [
            Error::InvalidNetnsUrl {
                url: "http://x".into(),
                reason: "scheme".into(),
            },
            Error::InvalidMtu {
                mtu: 1,
                reason: "small",
            },
            Error::LinkExists {
                name: "nsm-1".into(),
                netns: "x".into(),
                alias: None,
            },
            Error::InvalidAlias {
                alias: "x".repeat(300),
                reason: "long",
            },
        ];
        for e in invalid {
            assert!(matches!(Sdk::from(e), Sdk::InvalidArgument(_)));
        }
        let missing = [
            Error::NetnsNotFound { path: "/x".into() },
            Error::LinkNotFound {
                name: "nsm-1".into(),
                netns: "x".into(),
            },
        ];
        for e in missing {
            assert!(matches!(Sdk::from(e), Sdk::NotFound(_)));
        }
    }

    #[test]
    fn a_taken_name_says_what_holds_it() {
        let e = |alias: Option<&str>| {
            Error::LinkExists {
                name: "nsm-1".into(),
                netns: "pod".into(),
                alias: alias.map(str::to_string),
            }
            .to_string()
        };
        assert_eq!(
            e(None),
            "interface nsm-1 already exists in network namespace pod"
        );
        assert!(e(Some("")).ends_with("(a link without alias: not made by the mesh)"));
        assert!(e(Some("nsm-client-other"))
            .ends_with("(alias \"nsm-client-other\": not this connection's)"));
    }

    #[test]
    fn netlink_permission_errors_are_permission_denied_others_internal() {
        let e = |errno| Error::Netlink {
            op: "add".into(),
            netns: "x".into(),
            errno: Some(errno),
            message: String::new(),
        };
        assert!(matches!(Sdk::from(e(EPERM)), Sdk::PermissionDenied(_)));
        assert!(matches!(Sdk::from(e(22)), Sdk::Internal(_)));
    }
}
