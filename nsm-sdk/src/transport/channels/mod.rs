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

use futures::stream::{BoxStream, StreamExt};
use hyper_util::rt::TokioIo;
use nsm_proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_proto::connection::{ConnectionEvent, MonitorScopeSelector};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;
use tower::service_fn;
use tracing::debug;

use self::shared_monitor::SharedMonitors;
use super::frames::Unvectored;
use super::memory;
use super::metadata;
use crate::core::url::Url;
use crate::core::Cx;
use crate::{Error, Result};

/// How long opening a connection to a peer may take before the call fails.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A pool of gRPC channels, one per peer [`Url`], shared by every connection to that
/// peer. Cheap to clone; clones share the pool.
///
/// Channels are created on first use without connecting (creation never blocks); they
/// connect on the first call and reconnect after a failure, each attempt bounded by the
/// connect timeout, so a call to a dead peer fails fast. TCP_NODELAY is on.
#[derive(Clone)]
pub struct Channels {
    inner: Arc<Pool>,
}

struct Pool {
    connect_timeout: Duration,
    channels: Mutex<HashMap<Url, Channel>>,
    monitors: Arc<SharedMonitors>,
}

impl fmt::Debug for Channels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channels")
            .field("connect_timeout", &self.inner.connect_timeout)
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
        Channels {
            inner: Arc::new(Pool {
                connect_timeout: timeout,
                channels: Mutex::new(HashMap::new()),
                monitors: Arc::default(),
            }),
        }
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
        let mut map = self.lock();
        if let Some(ch) = map.get(url) {
            return Ok(ch.clone());
        }
        // A channel runs a task; without a runtime creating one would panic.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::internal(format!(
                "cannot dial {url}: channels are made inside a tokio runtime"
            )));
        }
        let ch = new_channel(url, self.inner.connect_timeout)?;
        debug!(url = %url, "new channel");
        map.insert(url.clone(), ch.clone());
        Ok(ch)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Url, Channel>> {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn new_channel(url: &Url, connect_timeout: Duration) -> Result<Channel> {
    let bad = |e: &dyn fmt::Display| Error::invalid(format!("cannot dial {url}: {e}"));
    match url {
        Url::Tcp { host, port } => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))
                .map_err(|e| bad(&e))?
                .tcp_nodelay(true)
                .connect_timeout(connect_timeout);
            Ok(endpoint.connect_lazy())
        }
        Url::Unix(path) => {
            let path = path.clone();
            let endpoint = local_endpoint(connect_timeout);
            Ok(
                endpoint.connect_with_connector_lazy(service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(&path)
                            .await
                            .map(|s| TokioIo::new(Unvectored(s)))
                    }
                })),
            )
        }
        Url::Memory(name) => {
            let name = name.clone();
            let endpoint = local_endpoint(connect_timeout);
            Ok(
                endpoint.connect_with_connector_lazy(service_fn(move |_: Uri| {
                    let connected = memory::connect(&name).map(|s| TokioIo::new(Unvectored(s)));
                    async move { connected }
                })),
            )
        }
    }
}

/// The endpoint of a peer reached through a custom connector; the URI only names the
/// `:authority`, as gRPC over unix sockets does elsewhere.
fn local_endpoint(connect_timeout: Duration) -> Endpoint {
    Endpoint::from_static("http://localhost").connect_timeout(connect_timeout)
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
