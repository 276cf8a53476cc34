//! Signed path tokens: ES256 JWTs as Go NSM makes them.
//!
//! Each hop puts a token into its path segment: `sub` is the hop's own SPIFFE ID, `aud`
//! the next hop's, `exp` the earliest of now + the token lifetime, the hop's own
//! certificate NotAfter and the next hop's certificate NotAfter (a token never outlives
//! the identities it binds). [`sign`] makes one with the SVID's key; [`verify`] checks one
//! against the signer's certificate (signature with the certificate's public key, and
//! `exp`); [`decode_unverified`] reads the claims for policy input.
//!
//! State: none. Failures handled: a key that cannot sign ES256 (not P-256 or not PKCS#8),
//! a token signed by another key, an expired token, a certificate that is not P-256;
//! each is a [`SecurityError::Token`] (PermissionDenied at the edge). The audience is
//! not checked by [`verify`]: the policies check the chain of `aud` and `sub`
//! ([`Claims::is_for`] for a direct check).

use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x509_parser::prelude::{FromDer, X509Certificate};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rustls::pki_types::{CertificateDer, UnixTime};

use super::error::SecurityError;
use super::identity::{system_to_unix, SpiffeId, Svid};
use super::tls::{verify_chain, PeerIdentity};

/// The claims of a path token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The signer's SPIFFE ID.
    pub sub: String,
    /// The SPIFFE IDs the token is meant for (one, the next hop, when made here). Go's
    /// JWT library writes a single audience as a string; both forms are read.
    #[serde(
        serialize_with = "audience_out",
        deserialize_with = "audience_in",
        default
    )]
    pub aud: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
}

impl Claims {
    /// Whether `id` is one of the token's audiences.
    pub fn is_for(&self, id: &SpiffeId) -> bool {
        self.aud.iter().any(|a| a == id.as_str())
    }
}

fn audience_out<S: Serializer>(aud: &[String], s: S) -> Result<S::Ok, S::Error> {
    match aud {
        [one] => s.serialize_str(one),
        many => many.serialize(s),
    }
}

fn audience_in<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Aud::deserialize(d)? {
        Aud::One(a) => vec![a],
        Aud::Many(a) => a,
    })
}

/// A token and its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedToken {
    /// The compact JWT.
    pub token: String,
    /// The expiry written into it (whole seconds).
    pub expires: SystemTime,
}

/// Signs a token for `audience` (the next hop) with `svid`'s key, expiring at the
/// earliest of now + `max_lifetime`, the SVID's NotAfter and `audience_not_after` (the
/// next hop's certificate NotAfter, when known). The token carries the signer's chain
/// (`x5c`); [`sign_to`] can leave it out.
pub fn sign(
    svid: &Svid,
    audience: &SpiffeId,
    audience_not_after: Option<SystemTime>,
    max_lifetime: Duration,
) -> Result<SignedToken, SecurityError> {
    sign_at(
        svid,
        audience,
        audience_not_after,
        max_lifetime,
        SystemTime::now(),
    )
}

/// [`sign`] as if the time were `now` (tests make expired tokens with it).
pub fn sign_at(
    svid: &Svid,
    audience: &SpiffeId,
    audience_not_after: Option<SystemTime>,
    max_lifetime: Duration,
    now: SystemTime,
) -> Result<SignedToken, SecurityError> {
    sign_to(
        svid,
        Some(audience),
        audience_not_after,
        max_lifetime,
        now,
        true,
    )
}

/// [`sign_at`] for an audience that may be unknown (no `aud` claim then): a hop that
/// does not know its peer yet (a client before its handshake, a peer without TLS) still
/// signs, as Go NSM does; the policies refuse such a token wherever a chain needs it.
/// `carry_chain`: whether the header carries the signer's certificate chain (`x5c`);
/// see [`needs_chain`].
pub fn sign_to(
    svid: &Svid,
    audience: Option<&SpiffeId>,
    audience_not_after: Option<SystemTime>,
    max_lifetime: Duration,
    now: SystemTime,
    carry_chain: bool,
) -> Result<SignedToken, SecurityError> {
    let key = svid.es256().ok_or_else(|| {
        SecurityError::Token(
            "signing needs the SVID key as a P-256 key in PKCS#8 (BEGIN PRIVATE KEY)".into(),
        )
    })?;
    let claims = Claims {
        sub: svid.id().to_string(),
        aud: audience.map(|a| a.to_string()).into_iter().collect(),
        exp: expiry(svid, audience_not_after, max_lifetime, now),
    };
    let mut header = Header::new(Algorithm::ES256);
    if carry_chain {
        header.x5c = Some(svid.chain().iter().map(|c| STANDARD.encode(c)).collect());
    }
    let token = es256_encode(key, &header, &claims)?;
    Ok(SignedToken {
        token,
        expires: std::time::UNIX_EPOCH + Duration::from_secs(claims.exp.max(0).unsigned_abs()),
    })
}

/// The `exp` (unix seconds) of a token signed at `now`: whole seconds, the lifetime
/// rounded up to the next second (so a short lifetime of 1 s is not cut to nothing),
/// then capped by both certificates (rounded down: never past their NotAfter). Two
/// tokens of one signer for one audience with the same `exp` have the same claims.
pub fn expiry(
    svid: &Svid,
    audience_not_after: Option<SystemTime>,
    max_lifetime: Duration,
    now: SystemTime,
) -> i64 {
    let wanted = system_to_unix(now + max_lifetime + Duration::from_millis(999));
    let mut cap = svid.not_after();
    if let Some(peer) = audience_not_after {
        cap = cap.min(peer);
    }
    wanted.min(system_to_unix(cap))
}

/// Whether a token `svid` signs for `peer` must carry its certificate chain (`x5c`,
/// RFC 7515): yes unless the peer verified this very certificate in the link's
/// handshake ([`PeerIdentity::presented`]). After a rotation the peer still holds the
/// certificate of the handshake, not the new one, and needs the chain to check the new
/// signature ([`verify_by`]); otherwise the chain is a kilobyte per token for nothing.
pub fn needs_chain(svid: &Svid, peer: Option<&PeerIdentity>) -> bool {
    peer.and_then(|p| p.presented.as_deref()) != Some(svid.leaf())
}

/// Checks `token` against the certificate of its supposed signer (DER): the ES256
/// signature with the certificate's public key, and `exp` (no leeway).
///
/// A signature that verified once is remembered for the pair (token, certificate), in
/// a small bounded cache shared by the process: signers reuse a token within its
/// second ([`expiry`]), so a hop under load sees the same token many times and checks
/// its signature once. `exp` is checked again on every call.
pub fn verify(token: &str, signer_cert: &[u8]) -> Result<Claims, SecurityError> {
    if let Some(claims) = verified::get(token, signer_cert) {
        return unexpired(claims);
    }
    let claims = verify_signature(token, signer_cert)?;
    verified::put(token, signer_cert, &claims);
    unexpired(claims)
}

fn refused(why: &str) -> SecurityError {
    SecurityError::Token(format!("refused: {why}"))
}

fn unexpired(claims: Claims) -> Result<Claims, SecurityError> {
    if claims.exp < system_to_unix(SystemTime::now()) {
        return Err(refused("ExpiredSignature"));
    }
    Ok(claims)
}

/// The signature and the claims' shape, not the expiry.
fn verify_signature(token: &str, signer_cert: &[u8]) -> Result<Claims, SecurityError> {
    let point = p256_public_key(signer_cert)?;
    let (signed, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| refused("not a compact JWS"))?;
    let (header, payload) = signed
        .split_once('.')
        .ok_or_else(|| refused("not a compact JWS"))?;
    let header: Header = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| refused("the header is not base64url"))?,
    )
    .map_err(|_| refused("the header is not a JWS header"))?;
    if header.alg != Algorithm::ES256 {
        return Err(refused("not ES256"));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| refused("the signature is not base64url"))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| refused("InvalidSignature"))?;
    // The policies check the audience chain; sub and exp must be there (serde says so).
    claims_of(payload).map_err(|e| refused(&format!("the claims do not decode: {e}")))
}

/// The claims of a token's payload part (base64url JSON).
fn claims_of(payload: &str) -> Result<Claims, String> {
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| "not base64url".to_string())?;
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

/// Signatures that verified: (token, signer certificate) -> claims. Only what verified
/// goes in, so a peer cannot fill it with garbage; it is bounded, and cleared when full
/// (tokens are remade every second at most, so what it loses is soon seen again).
mod verified {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};

    use super::Claims;

    /// Enough for the tokens of a busy hop's neighbours in one second.
    const CAPACITY: usize = 256;

    type Map = HashMap<Box<str>, (Box<[u8]>, Claims)>;

    static CACHE: LazyLock<Mutex<Map>> = LazyLock::new(Mutex::default);

    fn lock() -> std::sync::MutexGuard<'static, Map> {
        CACHE.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn get(token: &str, cert: &[u8]) -> Option<Claims> {
        match lock().get(token) {
            Some((signer, claims)) if **signer == *cert => Some(claims.clone()),
            _ => None,
        }
    }

    pub(super) fn put(token: &str, cert: &[u8], claims: &Claims) {
        let mut cache = lock();
        if cache.len() >= CAPACITY {
            cache.clear();
        }
        cache.insert(token.into(), (cert.into(), claims.clone()));
    }
}

/// A compact ES256 JWS of `claims` with `header`, signed with ring (fixed r||s).
fn es256_encode(
    key: &EcdsaKeyPair,
    header: &Header,
    claims: &Claims,
) -> Result<String, SecurityError> {
    let part = |v: Result<Vec<u8>, serde_json::Error>| {
        v.map(|bytes| URL_SAFE_NO_PAD.encode(bytes))
            .map_err(|e| SecurityError::Token(format!("cannot sign: {e}")))
    };
    let signed = format!(
        "{}.{}",
        part(serde_json::to_vec(header))?,
        part(serde_json::to_vec(claims))?
    );
    let signature = key
        .sign(&SystemRandom::new(), signed.as_bytes())
        .map_err(|_| SecurityError::Token("cannot sign: the key refused".into()))?;
    Ok(format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}

/// Checks `token` as signed by the TLS peer `peer`: with the certificate of the
/// handshake, or, when the peer's SVID was rotated since, with the certificate the
/// token carries (`x5c`) if that chains to the bundle the handshake used, is valid now
/// for the peer's role (`server`: it authenticated as a server) and names the same
/// SPIFFE ID. So a refresh that coincides with a rotation is not refused.
pub fn verify_by(token: &str, peer: &PeerIdentity, server: bool) -> Result<Claims, SecurityError> {
    let first = match verify(token, &peer.leaf) {
        Ok(claims) => return Ok(claims),
        Err(e) => e,
    };
    let (Some(bundle), Ok(header)) = (&peer.bundle, jsonwebtoken::decode_header(token)) else {
        return Err(first);
    };
    let chain: Vec<CertificateDer<'static>> = header
        .x5c
        .unwrap_or_default()
        .iter()
        .filter_map(|c| STANDARD.decode(c).ok())
        .map(CertificateDer::from)
        .collect();
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(first);
    };
    if *leaf == *peer.leaf {
        return Err(first);
    }
    let id = verify_chain(leaf, intermediates, bundle, UnixTime::now(), server)?;
    if id != peer.id {
        return Err(SecurityError::Token(format!(
            "refused: signed by {id}, not by the peer {}",
            peer.id
        )));
    }
    verify(token, leaf)
}

/// Reads a token's claims without checking anything (for policy input and logs): only
/// the payload part is decoded, not the header (which may carry a certificate chain).
pub fn decode_unverified(token: &str) -> Result<Claims, SecurityError> {
    let payload = token
        .split('.')
        .nth(1)
        .filter(|_| token.split('.').count() == 3)
        .ok_or_else(|| SecurityError::Token("does not decode: not a compact JWS".into()))?;
    claims_of(payload).map_err(|e| SecurityError::Token(format!("does not decode: {e}")))
}

/// The uncompressed P-256 point of a certificate's public key.
fn p256_public_key(cert: &[u8]) -> Result<Vec<u8>, SecurityError> {
    let (_, cert) = X509Certificate::from_der(cert)
        .map_err(|e| SecurityError::Token(format!("signer certificate does not parse: {e}")))?;
    let spki = cert.public_key();
    let is_p256 = spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == x509_parser::oid_registry::OID_EC_P256);
    if !is_p256 {
        return Err(SecurityError::Token(
            "signer certificate key is not ECDSA P-256 (ES256)".into(),
        ));
    }
    Ok(spki.subject_public_key.data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::dev_ca::DevCa;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn svid(ca: &DevCa, name: &str, lifetime: Duration) -> Svid {
        let issued = ca
            .issue(&id(&format!("spiffe://example.org/{name}")), lifetime)
            .unwrap();
        Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_signed_token_verifies_against_the_signers_certificate() {
        let ca = DevCa::new("example.org").unwrap();
        let nsc = svid(&ca, "nsc", HOUR);
        let nsmgr = id("spiffe://example.org/nsmgr");
        let signed = sign(&nsc, &nsmgr, None, Duration::from_secs(600)).unwrap();
        let claims = verify(&signed.token, nsc.leaf()).unwrap();
        assert_eq!(claims.sub, "spiffe://example.org/nsc");
        assert!(claims.is_for(&nsmgr));
        assert_eq!(claims.exp, system_to_unix(signed.expires));
        assert_eq!(decode_unverified(&signed.token).unwrap(), claims);
        // Go writes a single audience as a string.
        let raw = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&signed.token)
            .unwrap()
            .claims;
        assert_eq!(raw["aud"], "spiffe://example.org/nsmgr");
    }

    #[test]
    fn tokens_interoperate_with_another_jose_library_both_ways() {
        use rustls::pki_types::pem::PemObject;
        let ca = DevCa::new("example.org").unwrap();
        let issued = ca.issue(&id("spiffe://example.org/nsc"), HOUR).unwrap();
        let nsc = Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let to = id("spiffe://example.org/nsmgr");
        // Ours, read by jsonwebtoken with the certificate's key.
        let ours = sign(&nsc, &to, None, HOUR).unwrap();
        let point = p256_public_key(nsc.leaf()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.validate_aud = false;
        let theirs = jsonwebtoken::decode::<Claims>(
            &ours.token,
            &jsonwebtoken::DecodingKey::from_ec_der(&point),
            &validation,
        )
        .unwrap();
        assert_eq!(theirs.claims.sub, "spiffe://example.org/nsc");
        // jsonwebtoken's, verified here.
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(issued.key_pem.as_bytes())
            .unwrap();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &theirs.claims,
            &jsonwebtoken::EncodingKey::from_ec_der(der.secret_pkcs8_der()),
        )
        .unwrap();
        assert_eq!(verify(&token, nsc.leaf()).unwrap(), theirs.claims);
        // A token whose signature was cut is refused, not a panic.
        let cut = &token[..token.len() - 10];
        assert!(verify(cut, nsc.leaf()).is_err());
        assert!(verify("a.b", nsc.leaf()).is_err());
    }

    /// The peer of a handshake with `svid`, checked against `ca`'s bundle.
    fn peer_of(ca: &DevCa, svid: &Svid) -> PeerIdentity {
        let mut peer = PeerIdentity::from_leaf(svid.leaf().clone()).unwrap();
        let bundle = crate::security::TrustBundle::from_pem(ca.bundle_pem().as_bytes()).unwrap();
        peer.bundle = Some(std::sync::Arc::new(bundle));
        peer
    }

    #[test]
    fn a_token_signed_with_a_rotated_svid_of_the_peers_identity_verifies() {
        let ca = DevCa::new("example.org").unwrap();
        let before = svid(&ca, "nsc", HOUR);
        let rotated = svid(&ca, "nsc", HOUR);
        let peer = peer_of(&ca, &before);
        let to = id("spiffe://example.org/nsmgr");
        let token = sign(&rotated, &to, None, HOUR).unwrap().token;
        assert!(verify(&token, &peer.leaf).is_err(), "another key");
        assert_eq!(
            verify_by(&token, &peer, false).unwrap().sub,
            "spiffe://example.org/nsc"
        );
        // The handshake's own certificate still verifies.
        let token = sign(&before, &to, None, HOUR).unwrap().token;
        verify_by(&token, &peer, false).unwrap();
        // Another identity of the same CA carrying its own certificate: refused.
        let other = svid(&ca, "forger", HOUR);
        let token = sign(&other, &to, None, HOUR).unwrap().token;
        let err = verify_by(&token, &peer, false).unwrap_err();
        assert!(err.to_string().contains("not by the peer"), "{err}");
        // The same identity from another CA: its certificate does not chain.
        let rogue = DevCa::new("example.org").unwrap();
        let token = sign(&svid(&rogue, "nsc", HOUR), &to, None, HOUR)
            .unwrap()
            .token;
        assert!(verify_by(&token, &peer, false).is_err());
        // Without the handshake's bundle nothing but the handshake's certificate counts.
        let token = sign(&rotated, &to, None, HOUR).unwrap().token;
        let mut bare = peer.clone();
        bare.bundle = None;
        assert!(verify_by(&token, &bare, false).is_err());
    }

    #[test]
    fn a_token_signed_by_another_key_is_refused() {
        let ca = DevCa::new("example.org").unwrap();
        let nsc = svid(&ca, "nsc", HOUR);
        let forger = svid(&ca, "forger", HOUR);
        let forged = sign(&forger, &id("spiffe://example.org/nsmgr"), None, HOUR).unwrap();
        let err = verify(&forged.token, nsc.leaf()).unwrap_err();
        assert!(err.to_string().contains("InvalidSignature"), "{err}");
        // Claims rewritten after signing break the signature too.
        let good = sign(&nsc, &id("spiffe://example.org/nsmgr"), None, HOUR).unwrap();
        let mut parts: Vec<&str> = good.token.split('.').collect();
        let other = sign(&nsc, &id("spiffe://example.org/evil"), None, HOUR).unwrap();
        parts[1] = other.token.split('.').nth(1).unwrap();
        assert!(verify(&parts.join("."), nsc.leaf()).is_err());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let ca = DevCa::new("example.org").unwrap();
        let nsc = svid(&ca, "nsc", HOUR);
        let old = sign_at(
            &nsc,
            &id("spiffe://example.org/nsmgr"),
            None,
            Duration::from_secs(60),
            SystemTime::now() - Duration::from_secs(120),
        )
        .unwrap();
        let err = verify(&old.token, nsc.leaf()).unwrap_err();
        assert!(err.to_string().contains("ExpiredSignature"), "{err}");
    }

    #[test]
    fn a_remembered_signature_counts_only_for_its_signer_and_expiry_is_checked_each_time() {
        let ca = DevCa::new("example.org").unwrap();
        let nsc = svid(&ca, "nsc", HOUR);
        let forger = svid(&ca, "forger", HOUR);
        let to = id("spiffe://example.org/nsmgr");
        let token = sign(&nsc, &to, None, HOUR).unwrap().token;
        assert!(verify(&token, nsc.leaf()).is_ok());
        assert!(verified::get(&token, nsc.leaf()).is_some(), "remembered");
        // The same token presented as another identity's: not from the cache.
        let err = verify(&token, forger.leaf()).unwrap_err();
        assert!(err.to_string().contains("InvalidSignature"), "{err}");
        assert!(verify(&token, nsc.leaf()).is_ok());
        // An expired token whose signature is good: refused on every call.
        let old = sign_at(
            &nsc,
            &to,
            None,
            Duration::from_secs(1),
            SystemTime::now() - HOUR,
        )
        .unwrap()
        .token;
        for _ in 0..2 {
            let err = verify(&old, nsc.leaf()).unwrap_err();
            assert!(err.to_string().contains("ExpiredSignature"), "{err}");
        }
        // A tampered copy of a remembered token is checked, and refused.
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[2] = parts[2].chars().rev().collect();
        assert!(verify(&parts.join("."), nsc.leaf()).is_err());
    }

    #[test]
    fn decoding_reads_the_claims_of_a_token_with_or_without_its_chain() {
        let ca = DevCa::new("example.org").unwrap();
        let nsc = svid(&ca, "nsc", HOUR);
        let to = id("spiffe://example.org/nsmgr");
        for carry in [true, false] {
            let t = sign_to(&nsc, Some(&to), None, HOUR, SystemTime::now(), carry).unwrap();
            let claims = decode_unverified(&t.token).unwrap();
            assert_eq!(claims.sub, "spiffe://example.org/nsc");
            assert_eq!(claims, verify(&t.token, nsc.leaf()).unwrap());
        }
        assert!(decode_unverified("a.b").is_err());
        assert!(decode_unverified("a.b.c.d").is_err());
    }

    #[test]
    fn a_wrong_audience_is_detectable() {
        let ca = DevCa::new("example.org").unwrap();
        let nsc = svid(&ca, "nsc", HOUR);
        let t = sign(&nsc, &id("spiffe://example.org/nsmgr-1"), None, HOUR).unwrap();
        let claims = verify(&t.token, nsc.leaf()).unwrap();
        assert!(!claims.is_for(&id("spiffe://example.org/nsmgr-2")));
    }

    #[test]
    fn expiry_is_bounded_by_both_certificates() {
        let ca = DevCa::new("example.org").unwrap();
        let short = svid(&ca, "short", Duration::from_secs(300));
        let t = sign(&short, &id("spiffe://example.org/x"), None, HOUR).unwrap();
        assert_eq!(system_to_unix(t.expires), system_to_unix(short.not_after()));
        let long = svid(&ca, "long", HOUR * 24);
        let peer_end = SystemTime::now() + Duration::from_secs(100);
        let t = sign(&long, &id("spiffe://example.org/x"), Some(peer_end), HOUR).unwrap();
        assert_eq!(system_to_unix(t.expires), system_to_unix(peer_end));
        let t = sign(
            &long,
            &id("spiffe://example.org/x"),
            None,
            Duration::from_secs(60),
        )
        .unwrap();
        let left = t.expires.duration_since(SystemTime::now()).unwrap();
        // Whole seconds: the lifetime rounded up, never cut short.
        assert!(left <= Duration::from_secs(61), "{left:?}");
        assert!(left >= Duration::from_secs(59), "{left:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_unverified("not.a.token").is_err());
        assert!(decode_unverified("").is_err());
        let ca = DevCa::new("example.org").unwrap();
        let nsc = svid(&ca, "nsc", HOUR);
        assert!(verify("a.b.c", nsc.leaf()).is_err());
        assert!(verify("x", b"not a certificate").is_err());
    }
}
