//! The one rustls crypto provider of the security module: ring, made once and passed
//! explicitly to every config and key loader (no process-wide default is assumed or
//! installed). State: the provider, made on first use.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The rustls crypto provider used everywhere in the security module: ring, made once and passed
/// explicitly (no process-wide default is assumed or installed).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    // Deprecated only because ring has no post-quantum key exchange (aws-lc-rs has);
    // ring is the project's choice: it builds with no C toolchain beyond cc.
    #[allow(deprecated)]
    let make = rustls::crypto::ring::default_provider;
    PROVIDER.get_or_init(|| Arc::new(make())).clone()
}
