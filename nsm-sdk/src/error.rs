//! The crate's error type and its mapping to and from gRPC status codes.

use tonic::{Code, Status};

/// Result type of every fallible operation in the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a chain, a registry or a transport.
///
/// Each variant maps to one gRPC status code at the edge (see [`Error::code`]); a status
/// received from a peer comes back as [`Error::Remote`] with its code preserved, so a
/// failure keeps its meaning across hops.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request is malformed: a bad field, a path that does not fit, an address that
    /// does not parse.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A network service, endpoint or forwarder that the request needs does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A peer cannot be reached or refused the call; worth retrying elsewhere.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The operation ran out of time.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The caller is not allowed to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request asks for something this hop does not implement (for example a
    /// mechanism it does not support).
    #[error("unimplemented: {0}")]
    Unimplemented(String),
    /// The caller went away or the connection was closed while the operation ran.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A failure inside this hop that the caller cannot fix.
    #[error("internal: {0}")]
    Internal(String),
    /// A status returned by a remote peer.
    #[error("remote {code:?}: {message}")]
    Remote {
        /// The gRPC code the peer returned.
        code: Code,
        /// The peer's message.
        message: String,
    },
}

impl Error {
    /// The same error (same kind, same gRPC code) with `prefix` put in front of its
    /// message: `"network service icmp: "` + `"no forwarder"`.
    pub fn prefixed(self, prefix: &str) -> Error {
        let with = |m: String| format!("{prefix}{m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(with(m)),
            Error::NotFound(m) => Error::NotFound(with(m)),
            Error::Unavailable(m) => Error::Unavailable(with(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(with(m)),
            Error::PermissionDenied(m) => Error::PermissionDenied(with(m)),
            Error::Unimplemented(m) => Error::Unimplemented(with(m)),
            Error::Cancelled(m) => Error::Cancelled(with(m)),
            Error::Internal(m) => Error::Internal(with(m)),
            Error::Remote { code, message } => Error::Remote {
                code,
                message: with(message),
            },
        }
    }

    /// The gRPC status code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Cancelled(_) => Code::Cancelled,
            Error::Internal(_) => Code::Internal,
            Error::Remote { code, .. } => *code,
        }
    }

    /// Whether trying again (later, or with another candidate) may succeed. Used by
    /// retry, failover across candidates and heal.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self.code(),
            Code::InvalidArgument | Code::PermissionDenied | Code::Unimplemented | Code::Cancelled
        )
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(msg: impl Into<String>) -> Self {
        Error::NotFound(msg.into())
    }

    /// Shorthand for [`Error::Unavailable`].
    pub fn unavailable(msg: impl Into<String>) -> Self {
        Error::Unavailable(msg.into())
    }

    /// Shorthand for [`Error::Internal`].
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Remote { code, message } => Status::new(code, message),
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        Error::Remote {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Error {
        Error::Unavailable(format!("transport: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefixed_error_keeps_its_kind_and_code() {
        let e = Error::not_found("no forwarder").prefixed("network service icmp: ");
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(
            e.to_string(),
            "not found: network service icmp: no forwarder"
        );
        let remote = Error::Remote {
            code: Code::Aborted,
            message: "gone".into(),
        }
        .prefixed("hop: ");
        assert_eq!(remote.code(), Code::Aborted);
        assert!(remote.to_string().ends_with("hop: gone"), "{remote}");
    }

    #[test]
    fn codes_survive_a_round_trip_through_status() {
        for e in [
            Error::invalid("x"),
            Error::not_found("x"),
            Error::unavailable("x"),
            Error::DeadlineExceeded("x".into()),
            Error::PermissionDenied("x".into()),
            Error::Unimplemented("x".into()),
        ] {
            let code = e.code();
            let back = Error::from(Status::from(e));
            assert_eq!(back.code(), code);
        }
    }

    #[test]
    fn bad_input_is_not_retryable_but_unavailability_is() {
        assert!(!Error::invalid("x").is_retryable());
        assert!(Error::unavailable("x").is_retryable());
        assert!(Error::from(Status::unavailable("down")).is_retryable());
        assert!(!Error::from(Status::invalid_argument("bad")).is_retryable());
    }
}
