//! The security module's error type and its mapping into [`crate::Error`].

use std::path::PathBuf;

/// Everything that can go wrong while loading an identity, verifying a peer, signing or
/// checking a token, or evaluating a policy.
///
/// Converted into [`crate::Error`]: a refusal of a peer, a token or a policy becomes
/// [`crate::Error::PermissionDenied`]; a bad local identity or configuration becomes
/// [`crate::Error::Internal`] (this hop cannot work, the caller cannot fix it).
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// An identity file could not be read.
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        /// Which file: "certificate", "key" or "trust bundle".
        what: &'static str,
        /// The file's path.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The configuration names no identity and insecure mode is not asked for.
    #[error(
        "no identity: set NSM_TLS_CERT, NSM_TLS_KEY and NSM_TLS_CA \
         (or NSM_INSECURE=true to run without security); missing: {missing}"
    )]
    MissingConfig {
        /// The variables that are not set.
        missing: String,
    },
    /// PEM text that does not hold what it should.
    #[error("bad PEM in {what}: {reason}")]
    Pem {
        /// Which input: "certificate", "key" or "trust bundle".
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A certificate that does not parse or lacks something it needs.
    #[error("bad certificate: {0}")]
    Certificate(String),
    /// The private key does not belong to the leaf certificate.
    #[error("the private key does not match the certificate: {0}")]
    KeyMismatch(String),
    /// The leaf certificate has no `spiffe://` URI SAN.
    #[error("the certificate has no SPIFFE ID (no spiffe:// URI SAN)")]
    NoSpiffeId,
    /// The leaf certificate has several `spiffe://` URI SANs.
    #[error("the certificate has {0} SPIFFE IDs; an SVID has exactly one")]
    SeveralSpiffeIds(usize),
    /// A SPIFFE ID that breaks the SPIFFE ID rules.
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSpiffeId {
        /// The ID, cut to 256 bytes.
        id: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The leaf certificate is past its NotAfter.
    #[error("the certificate expired at {not_after} (unix seconds)")]
    Expired {
        /// NotAfter, in seconds since the Unix epoch.
        not_after: i64,
    },
    /// TLS configuration or verification failed.
    #[error("tls: {0}")]
    Tls(String),
    /// A peer's identity is not the one expected.
    #[error("peer {peer} is not authorized: {reason}")]
    Unauthorized {
        /// The peer's SPIFFE ID.
        peer: String,
        /// What was expected.
        reason: String,
    },
    /// A path token could not be made or was refused.
    #[error("token: {0}")]
    Token(String),
    /// A policy could not be loaded or evaluated.
    #[error("policy: {0}")]
    Policy(String),
    /// A policy refused the input.
    #[error("policy {policy} refused the request")]
    Denied {
        /// The name of the first policy that refused.
        policy: String,
    },
}

impl From<SecurityError> for crate::Error {
    fn from(e: SecurityError) -> crate::Error {
        match e {
            SecurityError::Unauthorized { .. }
            | SecurityError::Token(_)
            | SecurityError::Denied { .. } => crate::Error::PermissionDenied(e.to_string()),
            other => crate::Error::Internal(other.to_string()),
        }
    }
}

/// One helper for every peer string quoted in an error or a log line.
pub(crate) use crate::wire::bounds::cut;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_permission_denied_and_local_faults_internal() {
        let denied = crate::Error::from(SecurityError::Denied {
            policy: "tokens_valid".into(),
        });
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.to_string().contains("tokens_valid"));
        let local = crate::Error::from(SecurityError::NoSpiffeId);
        assert_eq!(local.code(), tonic::Code::Internal);
    }

    #[test]
    fn missing_config_names_the_three_variables() {
        let msg = SecurityError::MissingConfig {
            missing: "NSM_TLS_CA".into(),
        }
        .to_string();
        for var in ["NSM_TLS_CERT", "NSM_TLS_KEY", "NSM_TLS_CA", "NSM_INSECURE"] {
            assert!(msg.contains(var), "{msg}");
        }
    }
}
