//! X.509-SVIDs, trust bundles and SPIFFE IDs.
//!
//! An [`Svid`] is a certificate chain (leaf first) and its private key, read from PEM; its
//! identity is the [`SpiffeId`] in the leaf's only URI SAN. A [`TrustBundle`] is one or
//! more CA certificates, the roots a peer's chain must lead to.
//!
//! State: both are immutable once loaded; rotation makes new values (see
//! [`crate::security::source`]). Failures handled: unreadable or empty PEM, a key that does
//! not match the leaf, no SPIFFE ID or several URI SANs, an ID that breaks the SPIFFE
//! rules, and a leaf that has already expired, each with its own
//! [`SecurityError`] variant.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::crypto::provider;
use super::error::{cut, SecurityError};

/// Longest SPIFFE ID accepted, in bytes (the SPIFFE spec's URI limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes (a DNS name's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// A SPIFFE ID, `spiffe://<trust domain><path>`, parsed by the SPIFFE spec's rules.
///
/// The trust domain is lowercase letters, digits, `.`, `-` and `_` (no port, no user
/// info); the path is empty or `/`-separated non-empty segments of letters, digits, `.`,
/// `-` and `_`, none of them `.` or `..`, with no trailing `/`, query or fragment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (the end of the trust domain).
    path_at: usize,
}

impl SpiffeId {
    /// Parses `s` strictly; an error names the rule it breaks.
    pub fn parse(s: &str) -> Result<SpiffeId, SecurityError> {
        let bad = |reason| SecurityError::InvalidSpiffeId {
            id: cut(s, 256),
            reason,
        };
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        if td.is_empty() {
            return Err(bad("empty trust domain"));
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(bad("trust domain longer than 255 bytes"));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(bad(
                "trust domain may hold only lowercase letters, digits, '.', '-' and '_'",
            ));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return Err(bad("empty path segment (or trailing '/')"));
                }
                if segment == "." || segment == ".." {
                    return Err(bad("path segment '.' or '..'"));
                }
                if !segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(bad(
                        "path may hold only letters, digits, '.', '-', '_' and '/'",
                    ));
                }
            }
        }
        Ok(SpiffeId {
            id: s.to_string(),
            path_at: SCHEME.len() + td_len,
        })
    }

    /// The trust domain, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_at]
    }

    /// The path, e.g. `/ns/default/sa/nsc`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The SPIFFE ID of the only URI SAN of a DER certificate.
    pub fn from_certificate(der: &[u8]) -> Result<SpiffeId, SecurityError> {
        Ok(LeafInfo::parse(der)?.id)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SecurityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

/// What the SDK needs from a leaf certificate: its SPIFFE ID and validity period.
#[derive(Debug, Clone)]
pub(crate) struct LeafInfo {
    pub(crate) id: SpiffeId,
    pub(crate) not_after: SystemTime,
}

impl LeafInfo {
    pub(crate) fn parse(der: &[u8]) -> Result<LeafInfo, SecurityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| SecurityError::Certificate(format!("does not parse: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| SecurityError::Certificate(format!("bad subjectAltName: {e}")))?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        // The SPIFFE X.509-SVID spec: exactly one URI SAN, and it is the SPIFFE ID.
        let spiffe = uris
            .iter()
            .filter(|u| {
                u.get(..SCHEME.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(SCHEME))
            })
            .count();
        if spiffe == 0 {
            return Err(SecurityError::NoSpiffeId);
        }
        if uris.len() > 1 {
            return Err(SecurityError::SeveralSpiffeIds(uris.len()));
        }
        let id = SpiffeId::parse(uris[0])?;
        let not_after = unix_to_system(cert.validity().not_after.timestamp());
        Ok(LeafInfo { id, not_after })
    }
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Seconds since the Unix epoch (negative before it).
pub(crate) fn system_to_unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A certificate as PEM text (one `CERTIFICATE` block), as policies receive a peer's.
pub fn certificate_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// An X.509-SVID: a certificate chain whose leaf names one SPIFFE ID, and its key.
///
/// Holds the rustls form ([`CertifiedKey`], what TLS presents) and the key in the form
/// path tokens are signed with; both are made once, at load.
pub struct Svid {
    id: SpiffeId,
    not_after: SystemTime,
    certified: Arc<CertifiedKey>,
    /// The key, parsed once, for ES256 tokens (a P-256 key in PKCS#8 that ring takes).
    es256: Option<Arc<EcdsaKeyPair>>,
}

impl Svid {
    /// Reads an SVID from PEM: `cert_pem` holds the chain, leaf first; `key_pem` the
    /// private key (PKCS#8, SEC1 or PKCS#1). Refuses a key that does not match the leaf,
    /// a leaf without exactly one SPIFFE ID, and a leaf that has expired.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Svid, SecurityError> {
        Svid::parse(cert_pem, key_pem, true)
    }

    /// [`Svid::from_pem`] that keeps an expired leaf: for tests of what peers do with
    /// one.
    #[cfg(test)]
    pub(crate) fn from_pem_even_expired(
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Svid, SecurityError> {
        Svid::parse(cert_pem, key_pem, false)
    }

    fn parse(cert_pem: &[u8], key_pem: &[u8], fresh: bool) -> Result<Svid, SecurityError> {
        let chain = read_certificates(cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| SecurityError::Pem {
            what: "key",
            reason: e.to_string(),
        })?;
        let info = LeafInfo::parse(&chain[0])?;
        if fresh && info.not_after < SystemTime::now() {
            return Err(SecurityError::Expired {
                not_after: system_to_unix(info.not_after),
            });
        }
        let pkcs8 = match &key {
            PrivateKeyDer::Pkcs8(k) => Some(k.secret_pkcs8_der().to_vec()),
            _ => None,
        };
        let signing =
            provider()
                .key_provider
                .load_private_key(key)
                .map_err(|e| SecurityError::Pem {
                    what: "key",
                    reason: e.to_string(),
                })?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| SecurityError::KeyMismatch(e.to_string()))?;
        // Parsed once: signing a token with it then costs one ECDSA signature.
        let es256 = pkcs8.as_deref().and_then(|der| {
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .ok()
                .map(Arc::new)
        });
        Ok(Svid {
            id: info.id,
            not_after: info.not_after,
            certified: Arc::new(certified),
            es256,
        })
    }

    /// Reads an SVID from a certificate file and a key file.
    pub fn load(cert: &Path, key: &Path) -> Result<Svid, SecurityError> {
        let cert_pem = read_file("certificate", cert)?;
        let key_pem = read_file("key", key)?;
        Svid::from_pem(&cert_pem, &key_pem)
    }

    /// The SPIFFE ID this SVID proves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf's NotAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The chain, leaf first, as DER.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The leaf certificate, DER.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }

    /// What rustls presents in a handshake.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// The key as ring's ES256 signer, when it is a P-256 key in PKCS#8.
    pub(crate) fn es256(&self) -> Option<&EcdsaKeyPair> {
        self.es256.as_deref()
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("not_after", &system_to_unix(self.not_after))
            .field("chain_len", &self.certified.cert.len())
            .finish()
    }
}

/// The CA certificates a peer's chain must lead to.
#[derive(Clone)]
pub struct TrustBundle {
    certificates: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Reads one or more `CERTIFICATE` blocks.
    pub fn from_pem(pem: &[u8]) -> Result<TrustBundle, SecurityError> {
        let certificates = read_certificates(pem, "trust bundle")?;
        let anchors = certificates
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| SecurityError::Certificate(format!("trust bundle: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle {
            certificates,
            anchors,
        })
    }

    /// Reads a bundle file.
    pub fn load(path: &Path) -> Result<TrustBundle, SecurityError> {
        TrustBundle::from_pem(&read_file("trust bundle", path)?)
    }

    /// The CA certificates, DER.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// The same as webpki trust anchors, made once at load.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("certificates", &self.certificates.len())
            .finish()
    }
}

fn read_certificates(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SecurityError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(SecurityError::Pem {
            what,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::dev_ca::DevCa;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn spiffe_id_splits_trust_domain_and_path() {
        let i = id("spiffe://example.org/ns/default/sa/nsc");
        assert_eq!(i.trust_domain(), "example.org");
        assert_eq!(i.path(), "/ns/default/sa/nsc");
        assert_eq!(i.to_string(), "spiffe://example.org/ns/default/sa/nsc");
        assert_eq!(id("spiffe://td").path(), "");
    }

    #[test]
    fn spiffe_id_refuses_what_the_spec_forbids() {
        for bad in [
            "",
            "http://example.org/x",
            "SPIFFE://example.org/x",
            "spiffe://",
            "spiffe:///path",
            "spiffe://Example.org/x",
            "spiffe://example.org:8080/x",
            "spiffe://user@example.org/x",
            "spiffe://example.org/",
            "spiffe://example.org//x",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/./b",
            "spiffe://example.org/x?query",
            "spiffe://example.org/x#frag",
            "spiffe://example.org/x%20y",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        assert!(SpiffeId::parse(&long_td).is_err());
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        let err = SpiffeId::parse(&long).unwrap_err().to_string();
        assert!(
            err.len() < 400,
            "a long ID is cut in the error: {}",
            err.len()
        );
    }

    #[test]
    fn svid_from_pem_carries_its_spiffe_id_and_chain() {
        let ca = DevCa::new("example.org").unwrap();
        let issued = ca
            .issue(&id("spiffe://example.org/nsc"), Duration::from_secs(3600))
            .unwrap();
        let svid = Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        assert_eq!(svid.id(), &id("spiffe://example.org/nsc"));
        assert_eq!(svid.chain().len(), 1);
        assert!(svid.not_after() > SystemTime::now());
        assert!(svid.es256().is_some());
        assert!(!format!("{svid:?}").contains("PRIVATE"));
        let bundle = TrustBundle::from_pem(ca.bundle_pem().as_bytes()).unwrap();
        assert_eq!(bundle.anchors().len(), 1);
    }

    #[test]
    fn a_key_from_another_svid_is_refused() {
        let ca = DevCa::new("example.org").unwrap();
        let a = ca
            .issue(&id("spiffe://example.org/a"), Duration::from_secs(3600))
            .unwrap();
        let b = ca
            .issue(&id("spiffe://example.org/b"), Duration::from_secs(3600))
            .unwrap();
        let err = Svid::from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SecurityError::KeyMismatch(_)), "{err}");
    }

    #[test]
    fn an_expired_leaf_is_refused() {
        let ca = DevCa::new("example.org").unwrap();
        let old = ca.issue_expired(&id("spiffe://example.org/old")).unwrap();
        let err = Svid::from_pem(old.cert_pem.as_bytes(), old.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SecurityError::Expired { .. }), "{err}");
    }

    #[test]
    fn leaves_without_or_with_several_uri_sans_are_refused() {
        let ca = DevCa::new("example.org").unwrap();
        let none = ca.issue_with_uris(&[], Duration::from_secs(60)).unwrap();
        let err = Svid::from_pem(none.cert_pem.as_bytes(), none.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SecurityError::NoSpiffeId), "{err}");
        let two = ca
            .issue_with_uris(
                &["spiffe://example.org/a", "spiffe://example.org/b"],
                Duration::from_secs(60),
            )
            .unwrap();
        let err = Svid::from_pem(two.cert_pem.as_bytes(), two.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SecurityError::SeveralSpiffeIds(2)), "{err}");
    }

    #[test]
    fn missing_files_and_empty_pem_say_which_file() {
        let err = Svid::load(Path::new("/nonexistent/cert.pem"), Path::new("/k")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
        assert!(err.to_string().contains("certificate"), "{err}");
        let err = TrustBundle::from_pem(b"").unwrap_err();
        assert!(err.to_string().contains("trust bundle"), "{err}");
    }

    #[test]
    fn certificate_pem_round_trips_through_the_pem_reader() {
        let ca = DevCa::new("example.org").unwrap();
        let bundle = TrustBundle::from_pem(ca.bundle_pem().as_bytes()).unwrap();
        let der = &bundle.certificates()[0];
        let pem = certificate_pem(der);
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(&back, der);
    }
}
