//! rustls configs for mTLS, SPIFFE style.
//!
//! [`server_config`] and [`client_config`] build rustls configs (ring as the provider,
//! passed explicitly; TLS 1.3 and 1.2; ALPN `h2`) around an identity watch
//! ([`crate::security::FileSource::watch`]):
//! - the certificate resolvers read the watch on every handshake, so a rotated SVID is
//!   presented by the next handshake with nothing rebuilt, and established connections
//!   (which hold their own keys) are not touched;
//! - the verifiers check a peer's chain against the watch's *current* bundle with webpki
//!   path validation (signatures, CA constraints, validity period, EKU clientAuth or
//!   serverAuth) and no host-name check, then require exactly one SPIFFE ID in the leaf;
//!   servers require a client certificate; a client may also require a SPIFFE ID or
//!   trust domain of its server ([`Authorize`]).
//!
//! Session resumption is off on both sides, so every handshake verifies the current
//! chain against the current bundle (links are long-lived gRPC connections; the cost is
//! one full handshake per connection).
//!
//! State: none beyond the watch. Failures handled: a peer with no certificate, a chain
//! to another CA, an expired or not-yet-valid leaf, a leaf that is not an SVID: each
//! fails the handshake with a rustls certificate error.
//!
//! After the handshake, [`PeerIdentity::from_connection`] gives the peer's SPIFFE ID and
//! leaf; the transport will put it into `Cx` for the authorize handlers. The name a
//! client passes to rustls (SNI) is not checked by these verifiers; the transport can
//! pass any valid DNS name (e.g. the service's name) or the peer's IP.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use tokio::sync::watch;

pub use super::crypto::provider;
use super::error::SecurityError;
use super::identity::{certificate_pem, LeafInfo, SpiffeId, TrustBundle};
use super::source::Identity;

/// The ALPN protocol both sides offer: gRPC runs over HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// A verified peer: its SPIFFE ID and its leaf certificate.
///
/// Made after a handshake that one of this module's verifiers accepted; the transport
/// puts it into `Cx`, tokens are verified against [`PeerIdentity::leaf`] and policies
/// receive [`PeerIdentity::certificate_pem`] as `auth_info.certificate`. What calls
/// read often (the leaf's NotAfter and PEM) is worked out once, here, per handshake.
#[derive(Clone)]
pub struct PeerIdentity {
    /// The SPIFFE ID in the peer's leaf certificate.
    pub id: SpiffeId,
    /// The peer's leaf certificate, DER (shared: every call and every connection kept
    /// by a hop holds its peer's identity).
    pub leaf: Arc<CertificateDer<'static>>,
    /// The trust bundle the handshake verified the peer against (set by the transport):
    /// a token the peer signs with a rotated SVID of the same identity is checked
    /// against it ([`jwt::verify_by`](super::jwt::verify_by)).
    pub bundle: Option<Arc<TrustBundle>>,
    /// The leaf this side presented to the peer in the same handshake (set by the
    /// transport; `None` when unknown): a token signed with that certificate is
    /// verified by the peer with what it already holds, so it need not carry its chain.
    pub presented: Option<Arc<CertificateDer<'static>>>,
    not_after: SystemTime,
    pem: Arc<str>,
}

impl PeerIdentity {
    /// The identity of the peer of a finished handshake (client or server side).
    pub fn from_connection(conn: &rustls::CommonState) -> Result<PeerIdentity, SecurityError> {
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| SecurityError::Tls("the peer presented no certificate".into()))?;
        PeerIdentity::from_leaf(leaf.clone().into_owned())
    }

    /// The identity in a leaf certificate.
    pub fn from_leaf(leaf: CertificateDer<'static>) -> Result<PeerIdentity, SecurityError> {
        let info = LeafInfo::parse(&leaf)?;
        Ok(PeerIdentity {
            id: info.id,
            pem: certificate_pem(&leaf).into(),
            not_after: info.not_after,
            leaf: Arc::new(leaf),
            bundle: None,
            presented: None,
        })
    }

    /// The leaf as PEM, as policies receive it.
    pub fn certificate_pem(&self) -> &str {
        &self.pem
    }

    /// The leaf's NotAfter: no token made for this peer outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// Two identities are equal when their SPIFFE IDs and certificates are: the bundle is
/// how one was checked, not what it is.
impl PartialEq for PeerIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.leaf == other.leaf
    }
}

impl Eq for PeerIdentity {}

impl std::fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("id", &self.id)
            .finish()
    }
}

/// Which servers a client accepts, beyond a valid chain to the bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Authorize {
    /// Any SPIFFE ID.
    #[default]
    Any,
    /// Exactly this SPIFFE ID.
    Id(SpiffeId),
    /// Any SPIFFE ID in this trust domain.
    TrustDomain(String),
}

impl Authorize {
    fn check(&self, peer: &SpiffeId) -> Result<(), SecurityError> {
        let refuse = |reason: String| SecurityError::Unauthorized {
            peer: peer.to_string(),
            reason,
        };
        match self {
            Authorize::Any => Ok(()),
            Authorize::Id(want) if want == peer => Ok(()),
            Authorize::Id(want) => Err(refuse(format!("expected {want}"))),
            Authorize::TrustDomain(td) if td == peer.trust_domain() => Ok(()),
            Authorize::TrustDomain(td) => Err(refuse(format!("expected trust domain {td}"))),
        }
    }
}

/// A server config: presents the current SVID, requires and verifies a client SVID.
pub fn server_config(identity: watch::Receiver<Identity>) -> Result<ServerConfig, SecurityError> {
    let verifier = Arc::new(SpiffeVerifier::new(identity.clone(), Authorize::Any));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SecurityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SvidResolver { identity }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: a resumed session skips both certificates, so it would carry the
    // identities of the first handshake past a rotation or a bundle change.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config: presents the current SVID and accepts servers with a valid SVID
/// that `authorize` allows.
pub fn client_config(
    identity: watch::Receiver<Identity>,
    authorize: Authorize,
) -> Result<ClientConfig, SecurityError> {
    let verifier = Arc::new(SpiffeVerifier::new(identity.clone(), authorize));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SecurityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SvidResolver { identity }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Presents whatever SVID the watch holds at the moment of the handshake.
#[derive(Debug)]
struct SvidResolver {
    identity: watch::Receiver<Identity>,
}

impl SvidResolver {
    fn current(&self) -> Arc<CertifiedKey> {
        self.identity.borrow().svid.certified_key()
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a peer's chain against the current bundle, SPIFFE style (no host name).
#[derive(Debug)]
struct SpiffeVerifier {
    identity: watch::Receiver<Identity>,
    authorize: Authorize,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    fn new(identity: watch::Receiver<Identity>, authorize: Authorize) -> Self {
        SpiffeVerifier {
            identity,
            authorize,
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        // The bundle is cloned out (an Arc) so that no lock is held during validation.
        let bundle = self.identity.borrow().bundle.clone();
        chains_to(end_entity, intermediates, &bundle, now, usage).map_err(pki_error)?;
        let leaf = LeafInfo::parse(end_entity).map_err(other_error)?;
        self.authorize.check(&leaf.id).map_err(other_error)?;
        Ok(())
    }
}

/// The one webpki path validation of a leaf against a bundle, for handshakes and for
/// the certificates tokens carry.
fn chains_to(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), webpki::Error> {
    webpki::EndEntityCert::try_from(end_entity)?
        .verify_for_usage(
            provider().signature_verification_algorithms.all,
            bundle.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map(|_| ())
}

/// Checks that `end_entity` (with `intermediates`) chains to `bundle` at `now` for
/// client (`server` false) or server authentication; returns its SPIFFE ID.
pub(crate) fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
    server: bool,
) -> Result<SpiffeId, SecurityError> {
    let usage = if server {
        webpki::KeyUsage::server_auth()
    } else {
        webpki::KeyUsage::client_auth()
    };
    chains_to(end_entity, intermediates, bundle, now, usage)
        .map_err(|e| SecurityError::Tls(format!("certificate refused: {e}")))?;
    SpiffeId::from_certificate(end_entity)
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let cert = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert)
}

fn other_error(e: SecurityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The handshake-signature checks that both verifier traits ask for: the same on both
/// sides, with the provider's algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle can change under us; no hints, clients have one SVID anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::dev_ca::{tempdir, DevCa, IssuedSvid};
    use crate::security::identity::{Svid, TrustBundle};
    use crate::security::source::FileSource;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn identity_of(issued: &IssuedSvid) -> watch::Receiver<Identity> {
        let svid = Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let bundle = TrustBundle::from_pem(issued.bundle_pem.as_bytes()).unwrap();
        Identity::new(svid, bundle).fixed()
    }

    fn issue(ca: &DevCa, name: &str) -> IssuedSvid {
        ca.issue(
            &id(&format!("spiffe://{}/{name}", ca.trust_domain())),
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    /// A TLS server on loopback that accepts connections until dropped, echoes bytes, and
    /// reports each accepted peer's SPIFFE ID (or the handshake error).
    struct Server {
        addr: std::net::SocketAddr,
        peers: tokio::sync::mpsc::UnboundedReceiver<Result<SpiffeId, String>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(config: ServerConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, peers) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                conns.spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            let peer = PeerIdentity::from_connection(tls.get_ref().1)
                                .map(|p| p.id)
                                .map_err(|e| e.to_string());
                            let _ = tx.send(peer);
                            let mut buf = [0u8; 64];
                            while let Ok(n) = tls.read(&mut buf).await {
                                if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    }
                });
            }
        });
        Server { addr, peers, task }
    }

    async fn connect(
        config: ClientConfig,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("nsm.invalid").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        // TLS 1.3 reports a refused client certificate only on the first read.
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok(tls)
    }

    #[tokio::test]
    async fn same_ca_handshakes_and_each_side_sees_the_others_spiffe_id() {
        let ca = DevCa::new("example.org").unwrap();
        let mut server = serve(server_config(identity_of(&issue(&ca, "nsmgr"))).unwrap()).await;
        let client = client_config(identity_of(&issue(&ca, "nsc")), Authorize::Any).unwrap();
        let tls = connect(client, server.addr).await.unwrap();
        let seen_by_client = PeerIdentity::from_connection(tls.get_ref().1).unwrap();
        assert_eq!(seen_by_client.id, id("spiffe://example.org/nsmgr"));
        assert!(seen_by_client
            .certificate_pem()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        let seen_by_server = server.peers.recv().await.unwrap().unwrap();
        assert_eq!(seen_by_server, id("spiffe://example.org/nsc"));
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let ca = DevCa::new("example.org").unwrap();
        let mut server = serve(server_config(identity_of(&issue(&ca, "nsmgr"))).unwrap()).await;
        // Trusts the server's CA but has nothing to present.
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeVerifier::new(
                identity_of(&issue(&ca, "x")),
                Authorize::Any,
            )))
            .with_no_client_auth();
        assert!(connect(anonymous, server.addr).await.is_err());
        let refused = server.peers.recv().await.unwrap();
        assert!(refused.is_err(), "{refused:?}");
    }

    #[tokio::test]
    async fn a_client_from_another_ca_is_refused_and_so_is_its_ca_by_the_client() {
        let ca = DevCa::new("example.org").unwrap();
        let other = DevCa::new("example.org").unwrap();
        let mut server = serve(server_config(identity_of(&issue(&ca, "nsmgr"))).unwrap()).await;
        // The stranger trusts our CA, so only the server's check can refuse it.
        let stranger_svid = issue(&other, "nsc");
        let stranger = IssuedSvid {
            bundle_pem: ca.bundle_pem(),
            ..stranger_svid.clone()
        };
        let client = client_config(identity_of(&stranger), Authorize::Any).unwrap();
        assert!(connect(client, server.addr).await.is_err());
        let refused = server.peers.recv().await.unwrap().unwrap_err();
        // webpki finds a candidate issuer by name: the other CA has the same name, so the
        // chain fails on the signature; a differently named one fails as unknown.
        assert!(
            refused.contains("BadSignature") || refused.contains("UnknownIssuer"),
            "{refused}"
        );
        // A client of the other CA does not accept our server either.
        let client = client_config(identity_of(&stranger_svid), Authorize::Any).unwrap();
        let err = connect(client, server.addr).await.unwrap_err().to_string();
        assert!(
            err.contains("BadSignature") || err.contains("UnknownIssuer"),
            "{err}"
        );
        // A CA of another trust domain, differently named: unknown issuer.
        let foreign = DevCa::new("other.org").unwrap();
        let client = client_config(identity_of(&issue(&foreign, "nsc")), Authorize::Any).unwrap();
        let err = connect(client, server.addr).await.unwrap_err().to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn a_client_with_an_expired_svid_is_refused() {
        let ca = DevCa::new("example.org").unwrap();
        let mut server = serve(server_config(identity_of(&issue(&ca, "nsmgr"))).unwrap()).await;
        // Svid::from_pem refuses an expired leaf, so build the presented key by hand.
        let expired = ca.issue_expired(&id("spiffe://example.org/old")).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(expired.cert_pem.as_bytes()).unwrap()];
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(expired.key_pem.as_bytes()).unwrap();
        let certified = CertifiedKey::from_der(chain, key, &provider()).unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeVerifier::new(
                identity_of(&issue(&ca, "x")),
                Authorize::Any,
            )))
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        assert!(connect(client, server.addr).await.is_err());
        let refused = server.peers.recv().await.unwrap().unwrap_err();
        assert!(refused.contains("Expired"), "{refused}");
    }

    #[tokio::test]
    async fn the_client_refuses_a_server_its_authorizer_does_not_allow() {
        let ca = DevCa::new("example.org").unwrap();
        let server = serve(server_config(identity_of(&issue(&ca, "nsmgr"))).unwrap()).await;
        let nsc = issue(&ca, "nsc");
        let want = Authorize::Id(id("spiffe://example.org/registry"));
        let err = connect(client_config(identity_of(&nsc), want).unwrap(), server.addr)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Unauthorized"), "{err}");
        let td = Authorize::TrustDomain("example.org".into());
        connect(client_config(identity_of(&nsc), td).unwrap(), server.addr)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn rotated_files_are_presented_by_the_next_handshake_and_old_streams_keep_working() {
        let dir = tempdir();
        let ca = DevCa::new("example.org").unwrap();
        let files = issue(&ca, "nsmgr").write(&dir, "server").unwrap();
        let source = FileSource::start(&files.cert, &files.key, &files.ca).unwrap();
        let server = serve(server_config(source.watch()).unwrap()).await;
        let client = client_config(identity_of(&issue(&ca, "nsc")), Authorize::Any).unwrap();

        let mut old = connect(client.clone(), server.addr).await.unwrap();
        let first = PeerIdentity::from_connection(old.get_ref().1).unwrap();
        assert_eq!(first.id, id("spiffe://example.org/nsmgr"));

        let mut changes = source.watch();
        issue(&ca, "nsmgr-rotated").write(&dir, "server").unwrap();
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .expect("the source sees the new files")
            .unwrap();

        let new = connect(client, server.addr).await.unwrap();
        let second = PeerIdentity::from_connection(new.get_ref().1).unwrap();
        assert_eq!(second.id, id("spiffe://example.org/nsmgr-rotated"));
        assert_ne!(first.leaf, second.leaf);

        old.write_all(b"pong").await.unwrap();
        let mut buf = [0u8; 4];
        old.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        drop(source);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use rustls::pki_types::pem::PemObject as _;
}
