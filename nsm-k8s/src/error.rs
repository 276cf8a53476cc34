//! The errors of nsm-k8s.

/// What can go wrong starting or running the webhook.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A socket or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The result of nsm-k8s operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
