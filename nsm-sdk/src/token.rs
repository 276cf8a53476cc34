//! Tokens: what a hop puts in its path segment (`token`, `expires`) and sends to the
//! next hop (`nsm-client-token`, `nsm-client-token-expires`).
//!
//! How the pieces fit: a [`TokenGenerator`] makes a hop's token and its expiry;
//! [`update_token`](mod@crate::handlers::update_token) writes them into the hop's path
//! segment (and, on a server, copies the caller's into the segment before it); the
//! client-side [`refresh`](mod@crate::handlers::refresh) re-requests before the earliest
//! expiry in the path; the server-side [`timeout`](mod@crate::handlers::timeout) closes a
//! connection whose caller stopped doing so. So token expiry is what keeps a connection
//! alive, hop by hop.
//!
//! The default generator, [`lifetime_token`], signs nothing: it hands out one opaque
//! string and an expiry `lifetime` from now. It is enough to drive the lifecycles above
//! and to interoperate with peers that do not check tokens. Signed tokens (JWTs bound
//! to the hop's and the peer's identities, docs/SCENARIOS.md 6.3) plug in later behind the
//! same trait.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::core::Peer;
use crate::Result;

/// The default token lifetime: ten minutes.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// The token [`lifetime_token`] hands out unless told otherwise.
pub const DEFAULT_TOKEN: &str = "nsm-rs";

/// Lifetimes longer than this are capped (keeps time arithmetic from overflowing).
const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Makes a hop's token for a call and says when it expires.
///
/// `peer` is the other side of the call as far as this hop knows it (on a server, the
/// caller); a signing generator binds the token to it.
pub trait TokenGenerator: Send + Sync + 'static {
    /// The token and its expiry.
    fn generate(&self, peer: &Peer) -> Result<(String, SystemTime)>;
}

impl<F> TokenGenerator for F
where
    F: Fn(&Peer) -> Result<(String, SystemTime)> + Send + Sync + 'static,
{
    fn generate(&self, peer: &Peer) -> Result<(String, SystemTime)> {
        self(peer)
    }
}

/// A generator of unsigned tokens that expire `lifetime` after they are made; see the
/// [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct LifetimeToken {
    token: String,
    lifetime: Duration,
}

impl fmt::Debug for LifetimeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token itself stays out of logs.
        f.debug_struct("LifetimeToken")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// Unsigned tokens ([`DEFAULT_TOKEN`]) that expire `lifetime` after they are made.
pub fn lifetime_token(lifetime: Duration) -> LifetimeToken {
    LifetimeToken {
        token: DEFAULT_TOKEN.to_string(),
        lifetime: lifetime.min(MAX_LIFETIME),
    }
}

impl Default for LifetimeToken {
    fn default() -> Self {
        lifetime_token(DEFAULT_TOKEN_LIFETIME)
    }
}

impl LifetimeToken {
    /// Hands out `token` instead of [`DEFAULT_TOKEN`] (it goes on the wire as gRPC
    /// metadata, so it must be printable ASCII).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }

    /// How long each token lives.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

impl TokenGenerator for LifetimeToken {
    fn generate(&self, _peer: &Peer) -> Result<(String, SystemTime)> {
        let now = SystemTime::now();
        let expires = now.checked_add(self.lifetime).unwrap_or(now);
        Ok((self.token.clone(), expires))
    }
}

/// A per-call value ([`Cx::ext`](crate::Cx::ext)) that a client-side `update_token` sets:
/// the gRPC client at the end of the chain makes the outgoing token with this generator
/// once it knows who the next hop is (the identity in the server's certificate, as Go
/// NSM's per-RPC credentials do), writes it and its expiry into this hop's own path
/// segment and sends them as `nsm-client-token` / `nsm-client-token-expires`. Without
/// it, the client sends the token already in [`Cx::peer`](crate::Cx::peer).
#[derive(Clone)]
pub struct OutgoingToken(pub Arc<dyn TokenGenerator>);

impl fmt::Debug for OutgoingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingToken").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn a_lifetime_token_expires_its_lifetime_from_now() {
        let gen = lifetime_token(Duration::from_secs(60));
        let before = SystemTime::now();
        let (token, expires) = gen.generate(&Peer::default()).unwrap();
        let after = SystemTime::now();
        assert_eq!(token, DEFAULT_TOKEN);
        assert!(expires >= before + Duration::from_secs(60));
        assert!(expires <= after + Duration::from_secs(60));
    }

    #[test]
    fn the_token_string_can_be_chosen_and_stays_out_of_debug() {
        let gen = LifetimeToken::default().token("secret-ish");
        assert_eq!(gen.lifetime(), DEFAULT_TOKEN_LIFETIME);
        assert_eq!(gen.generate(&Peer::default()).unwrap().0, "secret-ish");
        assert!(!format!("{gen:?}").contains("secret-ish"));
    }

    #[test]
    fn an_absurd_lifetime_is_capped_instead_of_overflowing() {
        let gen = lifetime_token(Duration::MAX);
        let (_, expires) = gen.generate(&Peer::default()).unwrap();
        assert!(expires > SystemTime::now() + Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn a_closure_is_a_generator_and_its_errors_come_back() {
        let gen = |_: &Peer| -> Result<(String, SystemTime)> { Err(Error::internal("no key")) };
        assert!(matches!(
            gen.generate(&Peer::default()),
            Err(Error::Internal(_))
        ));
    }
}
