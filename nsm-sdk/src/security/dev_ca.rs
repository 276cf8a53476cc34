//! A throw-away CA for demos, load runs, the sandbox and tests (feature `dev-ca`).
//!
//! [`DevCa::new`] makes a self-signed ECDSA P-256 CA for one trust domain; [`DevCa::issue`]
//! makes X.509-SVIDs (ECDSA P-256, serverAuth + clientAuth, one URI SAN) with a chosen
//! lifetime, [`DevCa::issue_expired`] one whose validity is over, for tests of refusal.
//! [`IssuedSvid::write`] puts an SVID and the bundle into a directory as the three PEM
//! files `NSM_TLS_CERT`, `NSM_TLS_KEY` and `NSM_TLS_CA` name, each replaced atomically
//! (written aside, then renamed), the key readable by its owner only (0600).
//!
//! State: the CA's key, in memory only, gone with the value. Not for production: nothing
//! revokes, nothing limits what it signs.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use super::error::SecurityError;
use super::identity::{SpiffeId, Svid, TrustBundle};
use super::source::{Identity, ENV_CA, ENV_CERT, ENV_KEY};

/// A CA made on the spot for one trust domain.
pub struct DevCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

/// An SVID as PEM text, and the bundle of the CA that issued it.
#[derive(Clone)]
pub struct IssuedSvid {
    /// The leaf certificate (the chain has no intermediates).
    pub cert_pem: String,
    /// The private key, PKCS#8.
    pub key_pem: String,
    /// The issuing CA's certificate: the trust bundle.
    pub bundle_pem: String,
}

impl IssuedSvid {
    /// This SVID with its bundle, loaded.
    pub fn identity(&self) -> Result<Identity, SecurityError> {
        Ok(Identity::new(
            Svid::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())?,
            TrustBundle::from_pem(self.bundle_pem.as_bytes())?,
        ))
    }
}

impl std::fmt::Debug for IssuedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedSvid").finish_non_exhaustive()
    }
}

/// Where [`IssuedSvid::write`] put the three files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidFiles {
    /// The certificate chain (`NSM_TLS_CERT`).
    pub cert: PathBuf,
    /// The private key (`NSM_TLS_KEY`), mode 0600.
    pub key: PathBuf,
    /// The trust bundle (`NSM_TLS_CA`).
    pub ca: PathBuf,
}

impl SvidFiles {
    /// The environment that gives a program these files: `NSM_TLS_CERT`, `NSM_TLS_KEY`
    /// and `NSM_TLS_CA`.
    pub fn env(&self) -> [(&'static str, String); 3] {
        let path = |p: &PathBuf| p.display().to_string();
        [
            (ENV_CERT, path(&self.cert)),
            (ENV_KEY, path(&self.key)),
            (ENV_CA, path(&self.ca)),
        ]
    }
}

fn rcgen_err(e: rcgen::Error) -> SecurityError {
    SecurityError::Certificate(format!("dev CA: {e}"))
}

impl DevCa {
    /// Makes a CA for `trust_domain` (e.g. `example.org`), valid for ten years from an hour
    /// ago (so clocks a little behind still accept it).
    pub fn new(trust_domain: &str) -> Result<DevCa, SecurityError> {
        // Validates the trust domain by the same rules as every SPIFFE ID.
        SpiffeId::parse(&format!("spiffe://{trust_domain}"))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("nsm dev CA {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(rcgen_err)?;
        Ok(DevCa {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate as PEM: the trust bundle of everything it issues.
    pub fn bundle_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// Issues an SVID for `id`, valid from a minute ago for `lifetime`.
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<IssuedSvid, SecurityError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(
            &[id.as_str()],
            &[],
            now - time::Duration::minutes(1),
            now + lifetime,
        )
    }

    /// Issues an SVID for `id` that also carries `dns_names` as DNS SANs (opt-in, for
    /// a server that clients of TLS stacks checking a host name reach, such as gRPC
    /// C-core's: docs/KUBERNETES.md); the SPIFFE ID stays its only URI SAN.
    pub fn issue_with_dns_names(
        &self,
        id: &SpiffeId,
        dns_names: &[&str],
        lifetime: Duration,
    ) -> Result<IssuedSvid, SecurityError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(
            &[id.as_str()],
            dns_names,
            now - time::Duration::minutes(1),
            now + lifetime,
        )
    }

    /// An identity for `spiffe://<trust domain>/<name>`, valid for a day, with this CA
    /// as its bundle: what a program, a sandbox component or a test runs with.
    pub fn identity(&self, name: &str) -> Result<Identity, SecurityError> {
        let id = SpiffeId::parse(&format!("spiffe://{}/{name}", self.trust_domain))?;
        self.issue(&id, Duration::from_secs(24 * 3600))?.identity()
    }

    /// Issues an SVID for `spiffe://<trust domain>/<name>`, valid for a day, and writes
    /// it into `dir` as [`IssuedSvid::write`] does: the files a program of that name is
    /// given with [`SvidFiles::env`].
    pub fn write_identity(&self, dir: &Path, name: &str) -> Result<SvidFiles, SecurityError> {
        let id = SpiffeId::parse(&format!("spiffe://{}/{name}", self.trust_domain))?;
        self.issue(&id, Duration::from_secs(24 * 3600))?
            .write(dir, name)
    }

    /// Issues an SVID for `id` that expired a minute ago (valid for one hour before that).
    pub fn issue_expired(&self, id: &SpiffeId) -> Result<IssuedSvid, SecurityError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(
            &[id.as_str()],
            &[],
            now - time::Duration::hours(1),
            now - time::Duration::minutes(1),
        )
    }

    /// Issues a leaf with exactly these URI SANs (none, or several): for tests of
    /// certificates that are not valid SVIDs.
    pub fn issue_with_uris(
        &self,
        uris: &[&str],
        lifetime: Duration,
    ) -> Result<IssuedSvid, SecurityError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(uris, &[], now - time::Duration::minutes(1), now + lifetime)
    }

    fn issue_between(
        &self,
        uris: &[&str],
        dns_names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedSvid, SecurityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
        for uri in uris {
            let ia5 = (*uri).try_into().map_err(rcgen_err)?;
            params.subject_alt_names.push(SanType::URI(ia5));
        }
        for name in dns_names {
            let ia5 = (*name).try_into().map_err(rcgen_err)?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .distinguished_name
            .push(DnType::OrganizationName, "nsm dev SVID");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_err)?;
        Ok(IssuedSvid {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            bundle_pem: self.cert_pem.clone(),
        })
    }
}

impl IssuedSvid {
    /// Writes `<name>.pem`, `<name>.key` (mode 0600) and `ca.pem` into `dir`, each
    /// replaced atomically; certificate first, then key, then bundle. A reader between
    /// two renames sees a certificate and a key that do not match, which a
    /// [`crate::security::FileSource`] tolerates.
    pub fn write(&self, dir: &Path, name: &str) -> Result<SvidFiles, SecurityError> {
        let files = SvidFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        };
        write_atomic("certificate", &files.cert, self.cert_pem.as_bytes(), 0o644)?;
        write_atomic("key", &files.key, self.key_pem.as_bytes(), 0o600)?;
        write_atomic("trust bundle", &files.ca, self.bundle_pem.as_bytes(), 0o644)?;
        Ok(files)
    }
}

fn write_atomic(
    what: &'static str,
    path: &Path,
    data: &[u8],
    mode: u32,
) -> Result<(), SecurityError> {
    let err = |source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// A fresh directory under the system temp dir, unique per process and call.
#[cfg(test)]
pub(crate) fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "nsm-sec-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::identity::{Svid, TrustBundle};
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn issued_svids_load_and_carry_the_asked_identity() {
        let ca = DevCa::new("dev.local").unwrap();
        let id = SpiffeId::parse("spiffe://dev.local/nse").unwrap();
        let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
        let svid = Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        assert_eq!(svid.id(), &id);
        let left = svid
            .not_after()
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(left <= Duration::from_secs(600) && left > Duration::from_secs(590));
    }

    #[test]
    fn an_svid_with_dns_names_keeps_its_spiffe_id_and_carries_the_names() {
        let ca = DevCa::new("dev.local").unwrap();
        let id = SpiffeId::parse("spiffe://dev.local/nsmgr").unwrap();
        let issued = ca
            .issue_with_dns_names(&id, &["nsmgr.dev.local"], Duration::from_secs(600))
            .unwrap();
        let svid = Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        assert_eq!(svid.id(), &id);
        use rustls_pki_types::pem::PemObject;
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let dns: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(dns, ["nsmgr.dev.local"]);
    }

    #[test]
    fn a_bad_trust_domain_is_refused() {
        assert!(DevCa::new("Bad Domain").is_err());
    }

    #[test]
    fn written_files_load_back_and_the_key_is_private() {
        let dir = super::tempdir();
        let ca = DevCa::new("dev.local").unwrap();
        let id = SpiffeId::parse("spiffe://dev.local/nsc").unwrap();
        let files = ca
            .issue(&id, Duration::from_secs(600))
            .unwrap()
            .write(&dir, "nsc")
            .unwrap();
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let svid = Svid::load(&files.cert, &files.key).unwrap();
        assert_eq!(svid.id(), &id);
        TrustBundle::load(&files.ca).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
