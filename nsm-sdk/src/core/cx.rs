//! `Cx`: what a call carries besides its message.

use std::fmt;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::Span;

use super::conn::ConnHandle;
use super::extensions::Extensions;
use crate::security::PeerIdentity;

/// Which side of a gRPC hop a chain runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A chain that receives calls (endpoint, nsmgr, forwarder, registry).
    Server,
    /// A chain that makes calls to the next hop (NSC, or the client half of a hop).
    Client,
}

/// Who called this hop, as far as the transport and the caller's metadata tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The remote address, when the transport has one.
    pub addr: Option<String>,
    /// The caller's token for this call (gRPC metadata `nsm-client-token`).
    pub token: Option<String>,
    /// When the caller's token expires (gRPC metadata `nsm-client-token-expires`).
    pub token_expires: Option<SystemTime>,
    /// The other side's SPIFFE identity, verified by the mTLS handshake of the link the
    /// call came on (on a server: the caller). `None` on a link without TLS.
    pub identity: Option<PeerIdentity>,
    /// The process at the other end of a unix socket (its `SO_PEERCRED`), as the kernel
    /// reported it when the connection was accepted. `None` on TCP and in memory.
    pub process: Option<PeerProcess>,
}

/// The process at the other end of a unix socket, as the kernel reports it
/// (`SO_PEERCRED`): what it was when it connected, not what the peer claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerProcess {
    /// Its process id, when the kernel could name it in this process's pid namespace.
    pub pid: Option<i32>,
    /// Its effective user id when it connected.
    pub uid: u32,
    /// Its effective group id when it connected.
    pub gid: u32,
    /// When it started ([`process_start_time`]), read when the connection was accepted
    /// while the process was proven alive (its `SO_PEERPIDFD`, where the kernel has
    /// it): with `pid`, what names this very process, so [`PeerProcess::still_there`]
    /// tells whether `pid` now names another one (the peer exited and its pid was
    /// reused). `None` when it could not be read.
    pub start_time: Option<u64>,
}

impl PeerProcess {
    /// A process of this pid namespace, by its pid; its start time is read now.
    pub fn of_pid(pid: i32, uid: u32, gid: u32) -> Self {
        PeerProcess {
            pid: Some(pid),
            uid,
            gid,
            start_time: process_start_time(pid),
        }
    }

    /// Whether `pid` still names the process that connected: it started when the
    /// connection recorded. What a handler reads in `/proc/<pid>/` before this says
    /// yes belongs to the peer (a pid is reused only after its process is gone, and the
    /// new process has a later start time). Unknown pid or start time: no.
    pub fn still_there(&self) -> bool {
        match (self.pid, self.start_time) {
            (Some(pid), Some(t)) => process_start_time(pid) == Some(t),
            _ => false,
        }
    }
}

/// When process `pid` (of this process's pid namespace) started, in clock ticks after
/// boot: field 22 of `/proc/<pid>/stat`. `None` when it does not exist.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything, even ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (the state): field 22 is its 20th word.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The per-call context handed to every handler.
///
/// It holds the side, the deadline, the tracing span, the caller's identity, the
/// per-connection handle that `begin` sets, and typed per-call values
/// ([`Cx::ext`]) through which handlers of one call talk to each other (for example
/// the URL `select` chose, which `connect` dials).
pub struct Cx {
    side: Side,
    deadline: Option<Instant>,
    span: Span,
    peer: Peer,
    conn: Option<ConnHandle>,
    ext: Extensions,
}

impl Cx {
    /// A context for a call received by a server chain.
    pub fn server() -> Self {
        Self::new(Side::Server)
    }

    /// A context for a call made by a client chain.
    pub fn client() -> Self {
        Self::new(Side::Client)
    }

    /// A context for `side` with no deadline, no peer and the current span.
    pub fn new(side: Side) -> Self {
        Cx {
            side,
            deadline: None,
            span: Span::current(),
            peer: Peer::default(),
            conn: None,
            ext: Extensions::new(),
        }
    }

    /// Sets the deadline `timeout` from now.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.deadline = Some(Instant::now() + timeout);
        self
    }

    /// Sets the deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the caller.
    #[must_use]
    pub fn with_peer(mut self, peer: Peer) -> Self {
        self.peer = peer;
        self
    }

    /// Sets the tracing span of this call.
    #[must_use]
    pub fn with_span(mut self, span: Span) -> Self {
        self.span = span;
        self
    }

    /// The side this call runs on.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Changes the side (a server hop calling its next hop switches to `Client`).
    pub fn set_side(&mut self, side: Side) {
        self.side = side;
    }

    /// When this call must be done, if anyone said.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Replaces the deadline.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// The time left before the deadline (`None`: no deadline; zero: already passed).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The tracing span of this call.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Replaces the tracing span.
    pub fn set_span(&mut self, span: Span) {
        self.span = span;
    }

    /// The caller, as the transport and its metadata describe it.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The caller, mutably.
    pub fn peer_mut(&mut self) -> &mut Peer {
        &mut self.peer
    }

    /// The connection handle `begin` set for this call, if a `begin` ran before.
    pub fn conn(&self) -> Option<&ConnHandle> {
        self.conn.as_ref()
    }

    /// Sets the connection handle (done by `begin`).
    pub fn set_conn(&mut self, conn: Option<ConnHandle>) {
        self.conn = conn;
    }

    /// Typed per-call values.
    pub fn ext(&self) -> &Extensions {
        &self.ext
    }

    /// Typed per-call values, mutably.
    pub fn ext_mut(&mut self) -> &mut Extensions {
        &mut self.ext
    }

    /// A copy of this context for a new call of the same connection: same side, span,
    /// peer, connection and values; the deadline is `timeout` from now.
    pub fn fork(&self, timeout: Option<Duration>) -> Cx {
        Cx {
            side: self.side,
            deadline: timeout.map(|t| Instant::now() + t),
            span: self.span.clone(),
            peer: self.peer.clone(),
            conn: self.conn.clone(),
            ext: self.ext.clone(),
        }
    }
}

impl Default for Cx {
    fn default() -> Self {
        Cx::server()
    }
}

impl Clone for Cx {
    fn clone(&self) -> Self {
        Cx {
            side: self.side,
            deadline: self.deadline,
            span: self.span.clone(),
            peer: self.peer.clone(),
            conn: self.conn.clone(),
            ext: self.ext.clone(),
        }
    }
}

impl fmt::Debug for Cx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cx")
            .field("side", &self.side)
            .field("deadline", &self.deadline)
            .field("peer", &self.peer)
            .field("conn", &self.conn.as_ref().map(|c| c.id().to_string()))
            .field("ext", &self.ext)
            .finish()
    }
}
