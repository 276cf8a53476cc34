//! mTLS on the transport's links: [`Tls`] holds the rustls server and client configs of
//! one identity, and the handshakes the listener and the channel pool run with them.
//!
//! Every link is mutual: a server requires a client SVID, a client requires a server
//! SVID, both verified SPIFFE-style against the current trust bundle
//! ([`security::tls`](crate::security::tls)); the identity on the other side becomes the
//! [`Peer::identity`](crate::core::Peer::identity) of each call. The configs read the
//! identity watch at every handshake, so a rotated SVID or bundle is used by the next
//! handshake and established links are left alone.
//!
//! State: the two configs, shared. Failures handled: a handshake that fails (no
//! certificate, another CA, expired, not an SVID) or takes longer than
//! [`HANDSHAKE_TIMEOUT`] is an I/O error; the listener drops that connection and goes on,
//! a client call fails with `Unavailable`.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::security::tls::{client_config, server_config, Authorize, PeerIdentity};
use crate::security::{FileSource, Identity};
use crate::Result;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The name a client sends in its ClientHello (SNI). Servers do not look at it: peers
/// are told apart by the SPIFFE ID in their certificates, not by host names.
const SNI: &str = "nsm.invalid";

/// The mTLS configs of one identity, for [`Services::tls`](super::Services::tls) and
/// [`Channels::tls`](super::Channels::tls). Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: watch::Receiver<Identity>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Configs that present whatever SVID `identity` holds at each handshake and verify
    /// peers against its current bundle; servers accept any SPIFFE ID the bundle
    /// vouches for (what a caller may do is for the policies to say).
    pub fn new(identity: watch::Receiver<Identity>) -> Result<Tls> {
        Ok(Tls {
            server: Arc::new(server_config(identity.clone())?),
            client: Arc::new(client_config(identity.clone(), Authorize::Any)?),
            identity,
        })
    }

    /// [`Tls::new`] over the identity a [`FileSource`] keeps current.
    pub fn from_source(source: &FileSource) -> Result<Tls> {
        Tls::new(source.watch())
    }

    /// The server side of a handshake over `io`, bounded by [`HANDSHAKE_TIMEOUT`].
    pub(crate) async fn accept<S>(
        &self,
        io: S,
    ) -> io::Result<(tokio_rustls::server::TlsStream<S>, PeerIdentity)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let presented = self.presenting();
        let accept = TlsAcceptor::from(self.server.clone()).accept(io);
        let stream = bounded(accept).await?;
        let peer = self.verified(PeerIdentity::from_connection(stream.get_ref().1), presented)?;
        Ok((stream, peer))
    }

    /// The client side of a handshake over `io`, bounded by [`HANDSHAKE_TIMEOUT`].
    pub(crate) async fn connect<S>(
        &self,
        io: S,
    ) -> io::Result<(tokio_rustls::client::TlsStream<S>, PeerIdentity)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(SNI).map_err(other)?;
        let presented = self.presenting();
        let connect = TlsConnector::from(self.client.clone()).connect(name, io);
        let stream = bounded(connect).await?;
        let peer = self.verified(PeerIdentity::from_connection(stream.get_ref().1), presented)?;
        Ok((stream, peer))
    }
}

impl Tls {
    /// The leaf the configs present now (they read the watch during the handshake).
    fn presenting(&self) -> CertificateDer<'static> {
        self.identity.borrow().svid.leaf().clone()
    }

    /// The handshake's peer, with the bundle it was verified against and the leaf this
    /// side presented: the one read before the handshake, if the watch still holds it
    /// (a rotation during the handshake leaves it unknown, and tokens then carry their
    /// chain).
    fn verified(
        &self,
        peer: std::result::Result<PeerIdentity, crate::security::SecurityError>,
        before: CertificateDer<'static>,
    ) -> io::Result<PeerIdentity> {
        let mut peer = peer.map_err(other)?;
        let identity = self.identity.borrow();
        peer.bundle = Some(identity.bundle.clone());
        peer.presented = (*identity.svid.leaf() == before).then(|| Arc::new(before));
        Ok(peer)
    }
}

async fn bounded<T>(handshake: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

fn other(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, e.to_string())
}
