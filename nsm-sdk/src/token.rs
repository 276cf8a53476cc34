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
//! and to interoperate with peers that do not check tokens (insecure mode).
//! [`jwt_token`] signs: an ES256 JWT made with the hop's current SVID, `sub` its own
//! SPIFFE ID, `aud` the peer's (when known), checked by the `authorize` handlers.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::core::Peer;
use crate::security::{jwt, Identity, PeerIdentity, SpiffeId, Svid};
use crate::{Error, Result};

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

/// A generator of signed path tokens; see [`jwt_token`].
#[derive(Clone)]
#[must_use]
pub struct JwtToken {
    identity: watch::Receiver<Identity>,
    lifetime: Duration,
    recent: Arc<Mutex<Vec<Recent>>>,
}

/// A token made in the current second, for reuse within it: same signer (the very SVID),
/// same audience, same chain choice and same `exp` mean the same claims, so a new
/// signature would say nothing the last one does not.
struct Recent {
    svid: Arc<Svid>,
    audience: Option<SpiffeId>,
    carry_chain: bool,
    exp: i64,
    token: jwt::SignedToken,
}

/// Distinct (audience, chain) pairs kept; a hop talks to a handful of neighbours.
const RECENT: usize = 32;

impl fmt::Debug for JwtToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtToken")
            .field("id", self.identity.borrow().svid.id())
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// ES256 path tokens signed with the SVID `identity` holds *when each token is made*
/// (a rotated SVID signs the next token; nothing is rebuilt): `sub` is the SVID's SPIFFE
/// ID, `aud` the peer's verified identity ([`Peer::identity`]; no `aud` when it is not
/// known), and `exp` now + `lifetime` in whole seconds, but never after the SVID's or the
/// peer certificate's NotAfter; the expiry it returns (the segment's `expires`) is the
/// same to the nanosecond, never after `exp`. The certificate chain rides in the token only when the
/// peer did not see this SVID in the link's handshake ([`jwt::needs_chain`]). Tokens with
/// the same claims are made once: within one second, calls for the same peer get the
/// same token. `identity` is a [`FileSource::watch`](crate::security::FileSource::watch)
/// or an [`Identity::fixed`].
pub fn jwt_token(identity: watch::Receiver<Identity>, lifetime: Duration) -> JwtToken {
    JwtToken {
        identity,
        lifetime: lifetime.min(MAX_LIFETIME),
        recent: Arc::default(),
    }
}

impl TokenGenerator for JwtToken {
    fn generate(&self, peer: &Peer) -> Result<(String, SystemTime)> {
        // The Arc is cloned so no borrow of the watch is held while signing.
        let svid = self.identity.borrow().svid.clone();
        let audience = peer.identity.as_ref();
        let now = SystemTime::now();
        let audience_not_after = audience.map(PeerIdentity::not_after);
        let exp = jwt::expiry(&svid, audience_not_after, self.lifetime, now);
        let carry_chain = jwt::needs_chain(&svid, audience);
        let id = audience.map(|p| &p.id);
        let same = |r: &Recent| {
            Arc::ptr_eq(&r.svid, &svid) && r.audience.as_ref() == id && r.carry_chain == carry_chain
        };
        // The segment's expiry is this call's own, to the nanosecond (as Go NSM writes
        // it), never after the token's whole-second `exp`: `exp` cannot tell two
        // incarnations of a connection made within one second apart, and the monitor
        // relay's `floor` must.
        let expires = (now + self.lifetime).min(unix(exp));
        if let Some(r) = lock(&self.recent).iter().find(|r| same(r) && r.exp == exp) {
            return Ok((r.token.token.clone(), expires));
        }
        let signed = jwt::sign_to(
            &svid,
            id,
            audience_not_after,
            self.lifetime,
            now,
            carry_chain,
        )
        // Signing fails only on a local key problem: this hop cannot work, the
        // caller cannot fix it.
        .map_err(|e| Error::internal(e.to_string()))?;
        let out = (signed.token.clone(), expires);
        let mut recent = lock(&self.recent);
        recent.retain(|r| !same(r) && Arc::ptr_eq(&r.svid, &svid));
        if recent.len() >= RECENT {
            recent.remove(0);
        }
        recent.push(Recent {
            svid,
            audience: id.cloned(),
            carry_chain,
            exp,
            token: signed,
        });
        Ok(out)
    }
}

/// A unix time in whole seconds (`exp`) as a `SystemTime`.
fn unix(secs: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs())
}

fn lock(recent: &Mutex<Vec<Recent>>) -> std::sync::MutexGuard<'_, Vec<Recent>> {
    recent.lock().unwrap_or_else(|e| e.into_inner())
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

    mod signed {
        use super::*;
        use crate::security::dev_ca::{DevCa, IssuedSvid};
        use crate::security::{PeerIdentity, SpiffeId, Svid, TrustBundle};

        const HOUR: Duration = Duration::from_secs(3600);

        fn issue(ca: &DevCa, name: &str, lifetime: Duration) -> IssuedSvid {
            let id = SpiffeId::parse(&format!("spiffe://example.org/{name}")).unwrap();
            ca.issue(&id, lifetime).unwrap()
        }

        fn load(issued: &IssuedSvid) -> Svid {
            Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
        }

        fn identity(issued: &IssuedSvid) -> Identity {
            let bundle = TrustBundle::from_pem(issued.bundle_pem.as_bytes()).unwrap();
            Identity::new(load(issued), bundle)
        }

        fn peer(svid: &Svid) -> Peer {
            Peer {
                identity: Some(PeerIdentity::from_leaf(svid.leaf().clone()).unwrap()),
                ..Default::default()
            }
        }

        #[test]
        fn a_jwt_token_is_signed_by_the_hop_for_its_peer() {
            let ca = DevCa::new("example.org").unwrap();
            let issued = issue(&ca, "nsc", HOUR);
            let nsc = load(&issued);
            let nsmgr = load(&issue(&ca, "nsmgr", HOUR));
            let gen = jwt_token(identity(&issued).fixed(), Duration::from_secs(600));
            let before = SystemTime::now();
            let (token, expires) = gen.generate(&peer(&nsmgr)).unwrap();
            let claims = jwt::verify(&token, nsc.leaf()).unwrap();
            assert_eq!(claims.sub, "spiffe://example.org/nsc");
            assert_eq!(claims.aud, vec!["spiffe://example.org/nsmgr".to_string()]);
            assert!(expires > before + Duration::from_secs(598));
            // `exp` is whole seconds, the lifetime rounded up.
            assert!(expires <= SystemTime::now() + Duration::from_secs(601));
            // Another hop's certificate does not verify it.
            assert!(jwt::verify(&token, nsmgr.leaf()).is_err());
        }

        #[test]
        fn without_a_known_peer_the_token_has_no_audience() {
            let ca = DevCa::new("example.org").unwrap();
            let issued = issue(&ca, "nsc", HOUR);
            let nsc = load(&issued);
            let gen = jwt_token(identity(&issued).fixed(), HOUR);
            let (token, _) = gen.generate(&Peer::default()).unwrap();
            assert!(jwt::verify(&token, nsc.leaf()).unwrap().aud.is_empty());
        }

        #[test]
        fn a_token_never_outlives_the_svid_nor_the_peers_certificate() {
            let ca = DevCa::new("example.org").unwrap();
            let issued = issue(&ca, "short", Duration::from_secs(120));
            let short = load(&issued);
            let gen = jwt_token(identity(&issued).fixed(), HOUR);
            let (_, expires) = gen.generate(&Peer::default()).unwrap();
            assert!(expires <= short.not_after());
            let gen = jwt_token(identity(&issue(&ca, "long", HOUR * 24)).fixed(), HOUR);
            let (_, expires) = gen.generate(&peer(&short)).unwrap();
            assert!(expires <= short.not_after());
            assert!(expires + Duration::from_secs(300) < SystemTime::now() + HOUR);
        }

        #[test]
        fn a_rotated_svid_signs_the_next_token_without_a_rebuild() {
            let ca = DevCa::new("example.org").unwrap();
            let (old_issued, new_issued) = (issue(&ca, "nsc", HOUR), issue(&ca, "nsc", HOUR));
            let (old, new) = (load(&old_issued), load(&new_issued));
            let (tx, rx) = watch::channel(identity(&old_issued));
            let gen = jwt_token(rx, HOUR);
            let (before, _) = gen.generate(&Peer::default()).unwrap();
            assert!(jwt::verify(&before, old.leaf()).is_ok());
            tx.send(identity(&new_issued)).unwrap();
            let (after, _) = gen.generate(&Peer::default()).unwrap();
            assert!(jwt::verify(&after, new.leaf()).is_ok());
            assert!(
                jwt::verify(&after, old.leaf()).is_err(),
                "signed by the new key"
            );
        }
        /// The header of a compact JWS, as JSON.
        fn header(token: &str) -> serde_json::Value {
            use base64::Engine;
            let part = token.split('.').next().unwrap();
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap();
            serde_json::from_slice(&json).unwrap()
        }

        #[test]
        fn the_chain_rides_only_when_the_peer_did_not_see_the_signing_certificate() {
            let ca = DevCa::new("example.org").unwrap();
            let (old_issued, new_issued) = (issue(&ca, "nsc", HOUR), issue(&ca, "nsc", HOUR));
            let (old, new) = (load(&old_issued), load(&new_issued));
            let nsmgr = load(&issue(&ca, "nsmgr", HOUR));
            let (tx, rx) = watch::channel(identity(&old_issued));
            let gen = jwt_token(rx, HOUR);
            // The handshake of the link presented the old SVID.
            let mut link = peer(&nsmgr);
            if let Some(p) = link.identity.as_mut() {
                p.presented = Some(Arc::new(old.leaf().clone()));
                p.bundle = Some(Arc::new(
                    TrustBundle::from_pem(old_issued.bundle_pem.as_bytes()).unwrap(),
                ));
            }
            let (plain, _) = gen.generate(&link).unwrap();
            assert!(header(&plain).get("x5c").is_none(), "{}", header(&plain));
            // Unknown presentation: the chain goes along.
            let (carried, _) = gen.generate(&peer(&nsmgr)).unwrap();
            assert!(header(&carried)["x5c"].is_array());
            // Rotated: the new key signs, the chain goes along, and the peer, which holds
            // the old certificate from the handshake, accepts it through the chain.
            tx.send(identity(&new_issued)).unwrap();
            let (rotated, _) = gen.generate(&link).unwrap();
            assert!(header(&rotated)["x5c"].is_array());
            let mut seen = PeerIdentity::from_leaf(old.leaf().clone()).unwrap();
            seen.bundle = link.identity.as_ref().unwrap().bundle.clone();
            assert!(jwt::verify_by(&rotated, &seen, false).is_ok());
            assert!(jwt::verify(&rotated, new.leaf()).is_ok());
        }

        #[test]
        fn tokens_with_the_same_claims_are_signed_once() {
            let ca = DevCa::new("example.org").unwrap();
            let issued = issue(&ca, "nsmgr", HOUR);
            let (nsc, nse) = (
                load(&issue(&ca, "nsc", HOUR)),
                load(&issue(&ca, "nse", HOUR)),
            );
            // Shorter than the certificates, so `exp` follows the clock.
            let gen = jwt_token(identity(&issued).fixed(), Duration::from_secs(600));
            let unix = super::super::unix;
            // Retried until two calls fall in one second (exp is whole seconds).
            let exp = |t: &str| jwt::decode_unverified(t).unwrap().exp;
            let lifetime = Duration::from_secs(600);
            let (a, b, window, expires) = loop {
                let (a, _) = gen.generate(&peer(&nsc)).unwrap();
                let before = SystemTime::now();
                let (b, expires) = gen.generate(&peer(&nsc)).unwrap();
                let window = (before + lifetime, SystemTime::now() + lifetime);
                if exp(&a) == exp(&b) {
                    break (a, b, window, expires);
                }
            };
            assert_eq!(a, b, "same signer, audience and exp: one signature");
            // The reused token's call still gets its own expiry (the segment's, to the
            // nanosecond), never after the token's.
            assert!(
                window.0 <= expires && expires <= window.1,
                "{expires:?} {window:?}"
            );
            assert!(expires <= unix(exp(&b)));
            let (other, _) = gen.generate(&peer(&nse)).unwrap();
            assert_ne!(a, other);
            assert_eq!(
                jwt::decode_unverified(&other).unwrap().aud,
                ["spiffe://example.org/nse"]
            );
            // A later second makes a new token.
            std::thread::sleep(Duration::from_millis(1100));
            let (later, _) = gen.generate(&peer(&nsc)).unwrap();
            assert_ne!(a, later);
        }
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
