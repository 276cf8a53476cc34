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
/// next hop's certificate NotAfter, when known).
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
    sign_to(svid, Some(audience), audience_not_after, max_lifetime, now)
}

/// [`sign_at`] for an audience that may be unknown (no `aud` claim then): a hop that
/// does not know its peer yet (a client before its handshake, a peer without TLS) still
/// signs, as Go NSM does; the policies refuse such a token wherever a chain needs it.
pub fn sign_to(
    svid: &Svid,
    audience: Option<&SpiffeId>,
    audience_not_after: Option<SystemTime>,
    max_lifetime: Duration,
    now: SystemTime,
) -> Result<SignedToken, SecurityError> {
    let key = svid.es256().ok_or_else(|| {
        SecurityError::Token(
            "signing needs the SVID key as a P-256 key in PKCS#8 (BEGIN PRIVATE KEY)".into(),
        )
    })?;
    // `exp` is whole seconds: the lifetime is rounded up to the next second, so a short
    // lifetime (1 s) is not cut to nothing, then capped by both certificates (rounded
    // down: never past their NotAfter).
    let wanted = system_to_unix(now + max_lifetime + Duration::from_millis(999));
    let mut cap = svid.not_after();
    if let Some(peer) = audience_not_after {
        cap = cap.min(peer);
    }
    let claims = Claims {
        sub: svid.id().to_string(),
        aud: audience.map(|a| a.to_string()).into_iter().collect(),
        exp: wanted.min(system_to_unix(cap)),
    };
    // The signer's certificate chain travels in the header (`x5c`, RFC 7515): after a
    // rotation the peer still holds the certificate of the handshake, not the new one.
    let mut header = Header::new(Algorithm::ES256);
    header.x5c = Some(svid.chain().iter().map(|c| STANDARD.encode(c)).collect());
    let token = es256_encode(key, &header, &claims)?;
    Ok(SignedToken {
        token,
        expires: std::time::UNIX_EPOCH + Duration::from_secs(claims.exp.max(0).unsigned_abs()),
    })
}

/// Checks `token` against the certificate of its supposed signer (DER): the ES256
/// signature with the certificate's public key, and `exp` (no leeway).
pub fn verify(token: &str, signer_cert: &[u8]) -> Result<Claims, SecurityError> {
    let refused = |why: &str| SecurityError::Token(format!("refused: {why}"));
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
    let claims: Claims = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| refused("the claims are not base64url"))?,
    )
    .map_err(|e| refused(&format!("the claims do not decode: {e}")))?;
    if claims.exp < system_to_unix(SystemTime::now()) {
        return Err(refused("ExpiredSignature"));
    }
    Ok(claims)
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
    if leaf == &peer.leaf {
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

/// Reads a token's claims without checking anything (for policy input and logs).
pub fn decode_unverified(token: &str) -> Result<Claims, SecurityError> {
    jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
        .map(|data| data.claims)
        .map_err(|e| SecurityError::Token(format!("does not decode: {e}")))
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
