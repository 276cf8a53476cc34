//! Listening for the server: binding a [`Url`], the accept stream tonic serves, and
//! the wrapper that breaks every accepted connection when the server is killed.
//!
//! State: the listener lives in a slot shared by the accept stream and the
//! [`Server`](super::Server), so `kill` closes it synchronously (the URL is free when
//! `kill` returns). A unix socket file is removed with its listener.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::ready;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use super::authority::FixAuthority;
use super::frames::Unvectored;
use super::memory::{self, MemoryListener};
use super::tls::Tls;
use crate::core::url::Url;
use crate::core::PeerProcess;
use crate::security::PeerIdentity;
use crate::{Error, Result};

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        /// Removed when the listener goes.
        _file: SocketFile,
    },
    Memory(MemoryListener),
}

/// A unix socket file this server created; removed when the listener goes, unless
/// another server has replaced it meanwhile.
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                debug!(path = %self.path.display(), error = %e, "cannot remove socket file");
            }
        }
    }
}

pub(crate) async fn bind(url: &Url) -> Result<(Listener, Url)> {
    let fail = |e: &dyn fmt::Display| Error::unavailable(format!("cannot listen on {url}: {e}"));
    match url {
        Url::Tcp { host, port } => {
            let l = TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(|e| fail(&e))?;
            let port = l.local_addr().map_err(|e| fail(&e))?.port();
            let actual = Url::Tcp {
                host: host.clone(),
                port,
            };
            Ok((Listener::Tcp(l), actual))
        }
        Url::Unix(path) => {
            prepare_socket_path(path).await.map_err(|e| fail(&e))?;
            let l = bind_private(path).map_err(|e| fail(&e))?;
            let meta = std::fs::symlink_metadata(path).map_err(|e| fail(&e))?;
            let file = SocketFile {
                path: path.clone(),
                dev: meta.dev(),
                ino: meta.ino(),
            };
            Ok((
                Listener::Unix {
                    listener: l,
                    _file: file,
                },
                url.clone(),
            ))
        }
        Url::Memory(name) => Ok((Listener::Memory(memory::listen(name)?), url.clone())),
    }
}

/// Who may connect to a unix socket of ours: its owner and its group, nobody else.
pub(crate) const SOCKET_MODE: u32 = 0o660;

/// Binds a unix socket at `path` that only its owner and group can connect to. The
/// socket is bound under a temporary name beside `path`, restricted, then renamed into
/// place, so there is no moment at which `path` accepts anybody else (a chmod after
/// binding at `path` would leave one).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.binding", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(listener)
}

/// Creates the parent directories and removes a stale socket file; refuses to remove
/// anything that is not a socket.
async fn prepare_socket_path(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    match tokio::fs::symlink_metadata(path).await {
        Ok(meta) if meta.file_type().is_socket() => {
            debug!(path = %path.display(), "removing stale socket file");
            tokio::fs::remove_file(path).await
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// How many TLS handshakes a server runs at once; beyond that it stops accepting until
/// one finishes (each is bounded by [`HANDSHAKE_TIMEOUT`](super::tls::HANDSHAKE_TIMEOUT)).
const MAX_HANDSHAKES: usize = 1024;

/// The accept loop's stream of connections, each wrapped so the kill token breaks it;
/// with TLS, each yielded once its handshake succeeded (handshakes run concurrently, a
/// slow or failing one holds up nobody).
pub(crate) struct Incoming {
    listener: Arc<Mutex<Option<Listener>>>,
    killed: CancellationToken,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    tls: Option<Tls>,
    handshakes: FuturesUnordered<BoxFuture<'static, Option<ServerIo>>>,
}

impl Incoming {
    /// The accept stream over the listener in `listener`; connections break when
    /// `killed` fires; with `tls`, every connection is mTLS.
    pub(crate) fn new(
        listener: Arc<Mutex<Option<Listener>>>,
        killed: CancellationToken,
        tls: Option<Tls>,
    ) -> Self {
        Incoming {
            listener,
            killed,
            backoff: None,
            tls,
            handshakes: FuturesUnordered::new(),
        }
    }

    /// Accepts one connection: `Ready(None)` when the listener is gone.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Accepted>>> {
        if let Some(sleep) = &mut self.backoff {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.backoff = None;
        }
        let mut slot = lock(&self.listener);
        let Some(listener) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        let accepted = match listener {
            Listener::Tcp(l) => match ready!(l.poll_accept(cx)) {
                Ok((s, addr)) => {
                    if let Err(e) = s.set_nodelay(true) {
                        debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    Ok(Accepted::new(
                        Box::new(s),
                        Some(addr.to_string()),
                        None,
                        false,
                    ))
                }
                Err(e) => Err(e),
            },
            Listener::Unix { listener: l, .. } => match ready!(l.poll_accept(cx)) {
                Ok((s, addr)) => {
                    let remote = addr
                        .as_pathname()
                        .map(|p| format!("unix://{}", p.display()));
                    let process = peer_process(&s);
                    Ok(Accepted::new(Box::new(s), remote, process, true).unix())
                }
                Err(e) => Err(e),
            },
            Listener::Memory(l) => match ready!(l.poll_accept(cx)) {
                Some(s) => Ok(Accepted::new(Box::new(s), None, None, true)),
                None => return Poll::Ready(None),
            },
        };
        drop(slot);
        if let Err(e) = &accepted {
            // Out of descriptors and the like: wait a little instead of spinning.
            warn!(error = %e, "accept failed");
            let mut sleep = Box::pin(tokio::time::sleep(Duration::from_millis(50)));
            let _ = sleep.as_mut().poll(cx);
            self.backoff = Some(sleep);
        }
        Poll::Ready(Some(accepted))
    }
}

/// A connection just accepted, before any handshake.
struct Accepted {
    io: Box<dyn Io>,
    info: ConnInfo,
    /// Unix sockets and memory pipes go without vectored writes (one write per gRPC
    /// message, see `frames`); TCP as it is.
    local: bool,
    /// A unix socket: header blocks go through [`FixAuthority`] (clients of other gRPC
    /// stacks send the socket path as `:authority`).
    unix: bool,
}

impl Accepted {
    fn new(
        io: Box<dyn Io>,
        remote: Option<String>,
        process: Option<PeerProcess>,
        local: bool,
    ) -> Self {
        let info = ConnInfo {
            id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            remote,
            identity: None,
            process,
        };
        debug!(conn = info.id, remote = ?info.remote, "connection accepted");
        Accepted {
            io,
            info,
            local,
            unix: false,
        }
    }

    fn unix(mut self) -> Self {
        self.unix = true;
        self
    }

    /// The connection as h2 reads it: unvectored when local, authorities fixed on a
    /// unix socket.
    fn finish(io: Box<dyn Io>, local: bool, unix: bool) -> Box<dyn Io> {
        let io: Box<dyn Io> = if unix {
            Box::new(FixAuthority::new(io))
        } else {
            io
        };
        if local {
            Box::new(Unvectored(io))
        } else {
            io
        }
    }

    fn plain(self, killed: &CancellationToken) -> ServerIo {
        let io = Self::finish(self.io, self.local, self.unix);
        ServerIo::new(io, self.info, killed)
    }

    /// The handshake, then the connection with the peer's identity; `None` when the
    /// handshake fails or the server is killed meanwhile.
    fn secure(self, tls: Tls, killed: CancellationToken) -> BoxFuture<'static, Option<ServerIo>> {
        Box::pin(async move {
            let Accepted {
                io,
                mut info,
                local,
                unix,
            } = self;
            let handshake = tokio::select! {
                _ = killed.cancelled() => return None,
                handshake = tls.accept(io) => handshake,
            };
            match handshake {
                Ok((stream, peer)) => {
                    debug!(conn = info.id, peer = %peer.id, "TLS peer verified");
                    info.identity = Some(peer);
                    let io = Self::finish(Box::new(stream), local, unix);
                    Some(ServerIo::new(io, info, &killed))
                }
                Err(e) => {
                    info!(conn = info.id, remote = ?info.remote, error = %e, "TLS handshake refused");
                    None
                }
            }
        })
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Stream for Incoming {
    type Item = io::Result<ServerIo>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            while let Poll::Ready(Some(done)) = this.handshakes.poll_next_unpin(cx) {
                if let Some(io) = done {
                    return Poll::Ready(Some(Ok(io)));
                }
            }
            if this.handshakes.len() >= MAX_HANDSHAKES {
                // Woken when a handshake finishes.
                return Poll::Pending;
            }
            let accepted = match ready!(this.poll_accept(cx)) {
                None => return Poll::Ready(None),
                // Already logged; the backoff is armed.
                Some(Err(_)) => return Poll::Pending,
                Some(Ok(accepted)) => accepted,
            };
            match &this.tls {
                None => return Poll::Ready(Some(Ok(accepted.plain(&this.killed)))),
                Some(tls) => this
                    .handshakes
                    .push(accepted.secure(tls.clone(), this.killed.clone())),
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Tonic drops the stream when it stops accepting: close the listener then.
        drop(lock(&self.listener).take());
    }
}

/// The credentials the kernel recorded for the peer of a unix socket, with the start
/// time of the process its pid names.
///
/// The pid is the one the peer had when it connected; it may have exited since and its
/// pid be reused. Where the kernel gives the peer's pidfd (`SO_PEERPIDFD`, Linux 6.5),
/// the start time is read and then the pidfd polled: a pidfd becomes readable when its
/// process exits, so a pidfd not readable after the read proves the start time was the
/// peer's own. Without it (older kernels) the start time is read at once, which leaves
/// only the moment between the peer's `connect` and this accept.
pub(crate) fn peer_process(s: &tokio::net::UnixStream) -> Option<PeerProcess> {
    let c = match s.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "cannot read the peer credentials of a unix socket");
            return None;
        }
    };
    let pidfd = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerPidfd).ok();
    let mut start_time = c.pid().and_then(crate::core::process_start_time);
    if let Some(fd) = &pidfd {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let exited = match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => n > 0,
            Err(_) => true,
        };
        if exited {
            debug!(pid = ?c.pid(), "the peer of a unix socket exited before it was accepted");
            start_time = None;
        }
    }
    Some(PeerProcess {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
        start_time,
    })
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What tonic puts in each request's extensions about the transport connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) id: u64,
    pub(crate) remote: Option<String>,
    /// The peer's verified identity, on a TLS link.
    pub(crate) identity: Option<PeerIdentity>,
    /// The peer process, on a unix socket.
    pub(crate) process: Option<PeerProcess>,
}

/// An accepted connection that fails every read and write once the server is killed,
/// waking whoever waits on it, so tonic's connection task ends at once.
pub(crate) struct ServerIo {
    io: Box<dyn Io>,
    info: ConnInfo,
    killed: CancellationToken,
    read_kill: Pin<Box<WaitForCancellationFutureOwned>>,
    write_kill: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl ServerIo {
    fn new(io: Box<dyn Io>, info: ConnInfo, killed: &CancellationToken) -> Self {
        ServerIo {
            io,
            info,
            killed: killed.clone(),
            read_kill: Box::pin(killed.clone().cancelled_owned()),
            write_kill: Box::pin(killed.clone().cancelled_owned()),
        }
    }

    fn broken() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, "server killed")
    }
}

fn fired(
    token: &CancellationToken,
    wait: &mut Pin<Box<WaitForCancellationFutureOwned>>,
    cx: &mut Context<'_>,
) -> bool {
    token.is_cancelled() || wait.as_mut().poll(cx).is_ready()
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if fired(&this.killed, &mut this.read_kill, cx) {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if fired(&this.killed, &mut this.write_kill, cx) {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if fired(&this.killed, &mut this.write_kill, cx) {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed.is_cancelled() {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for ServerIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unix-socket peer is recorded with its pid and start time, which prove it is
    /// still there; a start time that is not its own (a reused pid) does not.
    #[tokio::test]
    async fn a_unix_peer_is_recorded_with_its_start_time() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let p = peer_process(&a).unwrap();
        assert_eq!(p.pid, Some(std::process::id() as i32));
        assert!(p.start_time.is_some());
        assert_eq!(
            p.start_time,
            crate::core::process_start_time(std::process::id() as i32)
        );
        assert!(p.still_there());
        let reused = PeerProcess {
            start_time: p.start_time.map(|t| t + 1),
            ..p
        };
        assert!(!reused.still_there());
        assert_eq!(crate::core::process_start_time(i32::MAX), None);
    }
}
