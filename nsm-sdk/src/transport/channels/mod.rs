//! The pool of gRPC channels to peers ([`Channels`]), how a call on one is made (the
//! deadline and token of its [`Cx`] go out, a status comes back as an [`Error`]), the
//! monitor subscription ([`monitor_connections`]) and the monitor streams the pool shares
//! among the connections to a peer ([`shared_monitor`]).
//!
//! Each call carries the deadline of its [`Cx`] (`grpc-timeout`, and enforced locally
//! too) and the token in its [`Peer`](crate::core::Peer) (`nsm-client-token`,
//! `nsm-client-token-expires`). A status the peer returned comes back as
//! [`Error::Remote`] with its code; a peer that cannot be reached, or a connection that
//! breaks, as [`Error::Unavailable`].

pub mod shared_monitor;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use hyper_util::rt::TokioIo;
use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_proto::connection::{ConnectionEvent, MonitorScopeSelector};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;
use tower::service_fn;
use tracing::debug;

use self::shared_monitor::SharedMonitors;
use super::frames::Unvectored;
use super::listener::peer_process;
use super::memory;
use super::metadata;
use super::tls::Tls;
use crate::core::url::Url;
use crate::core::{Cx, PeerProcess};
use crate::security::PeerIdentity;
use crate::{Error, Result};

/// How long opening a connection to a peer may take before the call fails.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A pool of gRPC channels, one per peer [`Url`], shared by every connection to that
/// peer. Cheap to clone; clones share the pool.
///
/// Channels are created on first use without connecting (creation never blocks); they
/// connect on the first call and reconnect after a failure, each attempt bounded by the
/// connect timeout, so a call to a dead peer fails fast. TCP_NODELAY is on.
///
/// With [`Channels::tls`], every link is mTLS and the pool remembers, per peer, the
/// identity the last handshake verified ([`Channels::connected`] connects first when it
/// does not know it yet), so a client can sign its token for the next hop.
#[derive(Clone)]
pub struct Channels {
    inner: Arc<Pool>,
}

struct Pool {
    connect_timeout: Duration,
    tls: Option<Tls>,
    channels: Mutex<HashMap<Url, Entry>>,
    monitors: Arc<SharedMonitors>,
}

/// One peer's channel and what the handshakes on it learned.
#[derive(Clone)]
struct Entry {
    channel: Channel,
    /// The identity of the peer's last verified handshake (TLS only).
    server: Arc<Mutex<Option<PeerIdentity>>>,
    /// The process at the other end of the last unix-socket connection (`SO_PEERCRED`).
    process: Arc<Mutex<Option<PeerProcess>>>,
    /// Held while a first connection is made to learn `server`, so concurrent first
    /// calls make one connection, not one each.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for Channels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channels")
            .field("connect_timeout", &self.inner.connect_timeout)
            .field("tls", &self.inner.tls.is_some())
            .field("peers", &self.len())
            .finish()
    }
}

impl Default for Channels {
    fn default() -> Self {
        Self::new()
    }
}

impl Channels {
    /// An empty pool with the default connect timeout ([`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn new() -> Self {
        Self::with_connect_timeout(DEFAULT_CONNECT_TIMEOUT)
    }

    /// An empty pool whose connection attempts give up after `timeout`.
    pub fn with_connect_timeout(timeout: Duration) -> Self {
        Self::make(timeout, None)
    }

    /// A new, empty pool like this one whose links are all mTLS with `tls` (the pool it
    /// is called on is not changed).
    pub fn tls(&self, tls: Tls) -> Self {
        Self::make(self.inner.connect_timeout, Some(tls))
    }

    fn make(connect_timeout: Duration, tls: Option<Tls>) -> Self {
        Channels {
            inner: Arc::new(Pool {
                connect_timeout,
                tls,
                channels: Mutex::new(HashMap::new()),
                monitors: Arc::default(),
            }),
        }
    }

    /// Whether this pool's links are mTLS.
    pub fn is_secure(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// The shared monitor streams of this pool ([`shared_monitor`]).
    pub(crate) fn monitors(&self) -> Arc<SharedMonitors> {
        self.inner.monitors.clone()
    }

    /// The connect timeout of this pool.
    pub fn connect_timeout(&self) -> Duration {
        self.inner.connect_timeout
    }

    /// The channel to `url`, created (not connected) on first use. Must be called
    /// inside a tokio runtime.
    pub fn channel(&self, url: &Url) -> Result<Channel> {
        Ok(self.entry(url)?.channel)
    }

    /// The channel to `url` and, on an mTLS pool, the identity of the peer there: when
    /// no handshake with it has been made yet, connects first (bounded by the connect
    /// timeout; a peer that cannot be reached is [`Error::Unavailable`]). On a plaintext
    /// pool this is [`Channels::channel`] and no identity.
    pub async fn connected(&self, url: &Url) -> Result<(Channel, Option<PeerIdentity>)> {
        let entry = self.entry(url)?;
        let Some(tls) = &self.inner.tls else {
            return Ok((entry.channel, None));
        };
        if let Some(id) = lock(&entry.server).clone() {
            return Ok((entry.channel, Some(id)));
        }
        let _connecting = entry.connecting.lock().await;
        // Another call may have connected while this one waited.
        let entry = self.entry(url)?;
        if let Some(id) = lock(&entry.server).clone() {
            return Ok((entry.channel, Some(id)));
        }
        let endpoint = endpoint(url, self.inner.connect_timeout)?;
        let connector = connector(
            url,
            Some(tls.clone()),
            entry.server.clone(),
            entry.process.clone(),
        );
        let channel = tokio::time::timeout(
            self.inner.connect_timeout,
            endpoint.connect_with_connector(connector),
        )
        .await
        .map_err(|_| Error::unavailable(format!("cannot connect to {url}: timed out")))?
        .map_err(|e| Error::unavailable(format!("cannot connect to {url}: {}", chain(&e))))?;
        let id = lock(&entry.server).clone().ok_or_else(|| {
            Error::unavailable(format!("{url}: connected without a verified peer"))
        })?;
        // The connected channel replaces the lazy one (calls in flight on that go on).
        let mut map = self.lock();
        if let Some(e) = map.get_mut(url) {
            if Arc::ptr_eq(&e.server, &entry.server) {
                e.channel = channel.clone();
            }
        }
        Ok((channel, Some(id)))
    }

    fn entry(&self, url: &Url) -> Result<Entry> {
        let mut map = self.lock();
        if let Some(e) = map.get(url) {
            return Ok(e.clone());
        }
        // A channel runs a task; without a runtime creating one would panic.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::internal(format!(
                "cannot dial {url}: channels are made inside a tokio runtime"
            )));
        }
        let server = Arc::new(Mutex::new(None));
        let process = Arc::new(Mutex::new(None));
        let endpoint = endpoint(url, self.inner.connect_timeout)?;
        let channel = match (url, &self.inner.tls) {
            // tonic's own connector: TCP as it is, TCP_NODELAY on.
            (Url::Tcp { .. }, None) => endpoint.connect_lazy(),
            (_, tls) => endpoint.connect_with_connector_lazy(connector(
                url,
                tls.clone(),
                server.clone(),
                process.clone(),
            )),
        };
        debug!(url = %url, tls = self.inner.tls.is_some(), "new channel");
        let entry = Entry {
            channel,
            server,
            process,
            connecting: Arc::default(),
        };
        map.insert(url.clone(), entry.clone());
        Ok(entry)
    }

    /// The process serving `url`, a unix socket, as the kernel reported it
    /// (`SO_PEERCRED`) when the pool last connected there; `None` before the first
    /// connection and for TCP and memory peers.
    pub fn peer_process(&self, url: &Url) -> Option<PeerProcess> {
        let entry = self.lock().get(url).map(|e| e.process.clone())?;
        let process = *lock(&entry);
        process
    }

    /// The identity the pool's last verified handshake with `url` showed (TLS only);
    /// `None` before the first one. A call that made the channel reconnect (the peer
    /// restarted, perhaps with a new certificate) was answered over that handshake.
    pub fn peer_identity(&self, url: &Url) -> Option<PeerIdentity> {
        let entry = self.lock().get(url).map(|e| e.server.clone())?;
        let identity = lock(&entry).clone();
        identity
    }

    /// Drops the pool's channel to `url` (calls in flight on it go on); returns whether
    /// there was one. The next call to that peer makes a new channel.
    pub fn forget(&self, url: &Url) -> bool {
        self.lock().remove(url).is_some()
    }

    /// How many peers have a channel.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no peer has a channel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Url, Entry>> {
        lock(&self.inner.channels)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The tonic endpoint of `url`. Unix sockets and memory pipes are reached through a
/// custom connector; their URI only names the `:authority`, as gRPC over unix sockets
/// does elsewhere.
fn endpoint(url: &Url, connect_timeout: Duration) -> Result<Endpoint> {
    let bad = |e: &dyn fmt::Display| Error::invalid(format!("cannot dial {url}: {e}"));
    let endpoint = match url {
        Url::Tcp { host, port } => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            Endpoint::from_shared(format!("http://{host}:{port}"))
                .map_err(|e| bad(&e))?
                .tcp_nodelay(true)
        }
        Url::Unix(_) | Url::Memory(_) => Endpoint::from_static("http://localhost"),
    };
    Ok(endpoint.connect_timeout(connect_timeout))
}

type BoxedIo = TokioIo<Box<dyn Io>>;

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Opens a connection to `url`: the stream (a unix socket's peer credentials go into
/// `process`), then with `tls` the handshake, whose verified peer goes into `server`. Unix sockets and memory pipes without vectored writes (see
/// `frames`).
fn connector(
    url: &Url,
    tls: Option<Tls>,
    server: Arc<Mutex<Option<PeerIdentity>>>,
    process: Arc<Mutex<Option<PeerProcess>>>,
) -> impl tower::Service<
    Uri,
    Response = BoxedIo,
    Error = std::io::Error,
    Future = BoxFuture<'static, std::io::Result<BoxedIo>>,
> + Clone
       + Send
       + 'static {
    let url = url.clone();
    service_fn(move |_: Uri| {
        let (url, tls, server, process) =
            (url.clone(), tls.clone(), server.clone(), process.clone());
        let connecting: BoxFuture<'static, std::io::Result<BoxedIo>> = Box::pin(async move {
            let (raw, local): (Box<dyn Io>, bool) = match &url {
                Url::Tcp { host, port } => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
                    (Box::new(s), false)
                }
                Url::Unix(path) => {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    *lock(&process) = peer_process(&s);
                    (Box::new(s), true)
                }
                Url::Memory(name) => {
                    let pipe = memory::connect(name).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())
                    })?;
                    (Box::new(pipe), true)
                }
            };
            let io: Box<dyn Io> = match tls {
                None => raw,
                Some(tls) => {
                    let (stream, peer) = tls.connect(raw).await?;
                    debug!(url = %url, peer = %peer.id, "TLS server verified");
                    *lock(&server) = Some(peer);
                    Box::new(stream)
                }
            };
            Ok(TokioIo::new(if local {
                Box::new(Unvectored(io))
            } else {
                io
            }))
        });
        connecting
    })
}

/// A status from a call: the peer's own answer is [`Error::Remote`]; a failure of the
/// transport (tonic made the status from an error it saw locally) is
/// [`Error::Unavailable`].
pub(crate) fn from_status(url: &Url, s: Status) -> Error {
    if std::error::Error::source(&s).is_some() {
        Error::unavailable(format!("{url}: {}", s.message()))
    } else {
        Error::from(s)
    }
}

/// A request carrying the deadline and token of `cx`.
pub(crate) fn outgoing<T>(cx: &Cx, url: &Url, what: &str, msg: T) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(msg);
    if let Some(left) = cx.remaining() {
        if left.is_zero() {
            return Err(Error::DeadlineExceeded(format!(
                "{what} to {url}: the deadline passed before the call"
            )));
        }
        request.set_timeout(left);
    }
    let peer = cx.peer();
    metadata::write_token(
        request.metadata_mut(),
        peer.token.as_deref(),
        peer.token_expires,
    )?;
    Ok(request)
}

/// Awaits a call, bounded by the deadline of `cx`.
pub(crate) async fn answer<T>(
    cx: &Cx,
    url: &Url,
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T> {
    let out = match cx.remaining() {
        Some(left) => tokio::time::timeout(left, call).await.map_err(|_| {
            Error::DeadlineExceeded(format!("{what} to {url}: no answer within the deadline"))
        })?,
        None => call.await,
    };
    out.map(tonic::Response::into_inner).map_err(|s| {
        if cx.remaining().is_some_and(|left| left.is_zero()) {
            // The peer gave up on our deadline (tonic servers say Cancelled).
            Error::DeadlineExceeded(format!("{what} to {url}: {}", s.message()))
        } else {
            from_status(url, s)
        }
    })
}

/// Subscribes to the `MonitorConnection` service at `url`: the stream yields the peer's
/// events (INITIAL_STATE_TRANSFER first) and ends with an error when the connection
/// breaks ([`Error::Unavailable`]) or the peer ends it with a status.
pub async fn monitor_connections(
    channels: &Channels,
    url: &Url,
    selector: MonitorScopeSelector,
) -> Result<BoxStream<'static, Result<ConnectionEvent>>> {
    let channel = channels.channel(url)?;
    let mut client = sized!(MonitorConnectionClient::new(channel));
    let events = client
        .monitor_connections(selector)
        .await
        .map_err(|s| from_status(url, s))?
        .into_inner();
    let url = url.clone();
    Ok(events
        .map(move |r| r.map_err(|s| from_status(&url, s)))
        .boxed())
}
