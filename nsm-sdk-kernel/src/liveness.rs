//! [`ping_liveness`]: a liveness check for [`heal`](nsm_sdk::handlers::heal()) that pings
//! the endpoint through the data plane.
//!
//! What it does: for a connection, it takes the endpoint's address (the first
//! `dst_ip_addrs` entry of the connection's IP context) and sends ICMP echo requests
//! to it from the client's network namespace — the namespace given with
//! [`PingOptions::netns`], else the calling process's own (an NSC checking from inside
//! its pod). The check says alive at the first echo reply; it sends a new request every
//! [`DEFAULT_PING_RESEND`] (so one lost packet does not count) and says dead when no
//! reply came within [`PingOptions::timeout`], when there is no route to the address
//! (the interface is gone), or when the namespace cannot be entered.
//!
//! How it pings (the simplest way that works for both an unprivileged NSC and a root
//! test or forwarder): an ICMP **datagram** socket (`socket(AF_INET, SOCK_DGRAM,
//! IPPROTO_ICMP)`, what `ping` uses without privileges) when the namespace's
//! `net.ipv4.ping_group_range` admits the caller's group — the KERNEL forwarder opens
//! it for every group in the pods it serves, as NSM's `pinggrouprange` does — and a
//! **raw** ICMP socket otherwise (root, `CAP_NET_RAW`). The socket is created inside
//! the namespace on a short-lived thread ([`NetNs::run`], so nothing else ever runs in
//! the pod's namespace) and connected to the target, so the kernel delivers only that
//! host's ICMP to it; the whole exchange happens on that thread with a receive timeout,
//! never on a tokio worker. IPv4 and IPv6 (ICMPv6) are both handled.
//!
//! State: none; each check opens and closes its own socket.
//!
//! [`kernel_liveness`] is the same check for a client whose connections may also be
//! NOOP: only KERNEL connections are pinged.
//!
//! Failure handled: a connection without a (parsable) endpoint address has nothing to
//! check and counts as alive; so does a caller that may open neither kind of ICMP
//! socket (a warning says the check cannot judge: saying "dead" would make heal
//! reselect forever).

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ipnet::IpNet;
use nsm_sdk::handlers::LivenessFn;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::wire::types;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::netns::NetNs;

/// Default time one check may take; under heal's default liveness timeout (500 ms), so
/// the check answers "dead" itself rather than being cut off.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_millis(400);

/// Pause after which another echo request is sent when no reply came.
pub const DEFAULT_PING_RESEND: Duration = Duration::from_millis(100);

/// `ping_group_range` value that lets every group open ICMP datagram sockets.
pub const PING_GROUP_RANGE_ALL: &str = "0 2147483647";

/// What [`ping_liveness`] is made of.
#[derive(Debug, Clone)]
#[must_use]
pub struct PingOptions {
    netns: Option<Arc<NetNs>>,
    timeout: Duration,
}

impl Default for PingOptions {
    fn default() -> Self {
        PingOptions::new()
    }
}

impl PingOptions {
    /// Pings from the caller's own namespace, with [`DEFAULT_PING_TIMEOUT`].
    pub fn new() -> Self {
        PingOptions {
            netns: None,
            timeout: DEFAULT_PING_TIMEOUT,
        }
    }

    /// Pings from inside `netns` (entering it needs `CAP_SYS_ADMIN`): for a client
    /// whose pod is not the caller's namespace, such as a test's.
    pub fn netns(mut self, netns: NetNs) -> Self {
        self.netns = Some(Arc::new(netns));
        self
    }

    /// How long one check may wait for a reply (default [`DEFAULT_PING_TIMEOUT`]);
    /// keep it under heal's liveness timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Checks one connection; see the [module docs](self).
    pub async fn check(&self, conn: &Connection) -> bool {
        let Some(target) = endpoint_address(conn) else {
            debug!(connection.id = %conn.id, "ping liveness: no endpoint address, nothing to check");
            return true;
        };
        match ping(self.netns.as_deref(), target, self.timeout).await {
            Ok(alive) => {
                if !alive {
                    debug!(connection.id = %conn.id, %target, "ping liveness: no reply");
                }
                alive
            }
            Err(e) if is_permission(&e) => {
                warn!(connection.id = %conn.id, %target, error = %e, "ping liveness: may not open an ICMP socket; cannot judge, counting the connection alive");
                true
            }
            Err(e) => {
                warn!(connection.id = %conn.id, %target, error = %e, "ping liveness: ping failed");
                false
            }
        }
    }
}

/// A [`LivenessFn`] for [`HealOptions::liveness`](nsm_sdk::handlers::HealOptions::liveness)
/// that pings each connection's endpoint address; see the [module docs](self).
///
/// ```no_run
/// use nsm_sdk::handlers::HealOptions;
/// use nsm_sdk::transport::Channels;
/// use nsm_sdk_kernel::{ping_liveness, PingOptions};
///
/// let heal = HealOptions::new(Channels::new()).liveness(ping_liveness(PingOptions::new()));
/// ```
pub fn ping_liveness(options: PingOptions) -> LivenessFn {
    let options = Arc::new(options);
    Arc::new(move |conn: &Connection| -> BoxFuture<'static, bool> {
        let options = options.clone();
        let conn = conn.clone();
        Box::pin(async move { options.check(&conn).await })
    })
}

/// [`ping_liveness`] for the KERNEL connections only: a connection with another
/// mechanism (NOOP) has no data plane to ping and counts as alive. For a client that
/// asks for KERNEL or NOOP per NS URL.
pub fn kernel_liveness(options: PingOptions) -> LivenessFn {
    let ping = ping_liveness(options);
    Arc::new(move |conn: &Connection| {
        if conn
            .mechanism
            .as_ref()
            .is_some_and(|m| m.r#type == types::KERNEL)
        {
            ping(conn)
        } else {
            Box::pin(async { true })
        }
    })
}

/// The endpoint's address of a connection: its first `dst_ip_addrs` entry (with or
/// without a prefix length).
pub fn endpoint_address(conn: &Connection) -> Option<IpAddr> {
    let first = conn
        .context
        .as_ref()?
        .ip_context
        .as_ref()?
        .dst_ip_addrs
        .first()?;
    first
        .parse::<IpNet>()
        .map(|n| n.addr())
        .or_else(|_| first.parse::<IpAddr>())
        .ok()
}

/// Pings `target` from `netns` (`None`: the caller's namespace): `Ok(true)` at the
/// first echo reply, `Ok(false)` when none came within `timeout` or there is no route
/// to `target`. An error means the ping could not be tried (the namespace could not
/// be entered, no ICMP socket may be opened).
pub async fn ping(netns: Option<&NetNs>, target: IpAddr, timeout: Duration) -> Result<bool> {
    let resend = DEFAULT_PING_RESEND.min(timeout);
    let outcome = match netns {
        Some(ns) => {
            ns.run(move || ping_blocking(target, timeout, resend))
                .await?
        }
        // No setns here, so a pooled blocking thread is fine.
        None => tokio::task::spawn_blocking(move || ping_blocking(target, timeout, resend))
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r),
    };
    outcome.map_err(|source| Error::Ping {
        target,
        netns: netns.map_or_else(|| "of the caller".to_string(), |n| n.to_string()),
        source,
    })
}

/// Lets every group of `netns` open ICMP datagram sockets (writes
/// [`PING_GROUP_RANGE_ALL`] to `net.ipv4.ping_group_range` inside it), so an
/// unprivileged client can run the ping liveness check in its pod. NSM's forwarders do
/// the same for each pod they serve (sdk-kernel `pinggrouprange`); like them, it is
/// not undone on Close.
pub async fn allow_ping(netns: &NetNs) -> Result<()> {
    const SYSCTL: &str = "/proc/sys/net/ipv4/ping_group_range";
    // /proc/sys/net follows the namespace of the thread that opens it.
    netns
        .run(|| std::fs::write(SYSCTL, PING_GROUP_RANGE_ALL))
        .await?
        .map_err(|source| Error::NetnsIo {
            path: format!("{netns}: {SYSCTL}"),
            source,
        })
}

/// The caller may not open an ICMP socket there, or not enter the namespace.
fn is_permission(e: &Error) -> bool {
    match e {
        Error::NetnsIo { source, .. } | Error::Ping { source, .. } => {
            source.kind() == io::ErrorKind::PermissionDenied
        }
        _ => false,
    }
}

/// Errors that mean "the target cannot be reached from here", not "cannot ping".
fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::AddrNotAvailable
    )
}

/// Opens an ICMP socket: a datagram one if `ping_group_range` admits us, else a raw
/// one. Returns the socket and whether it is raw.
fn icmp_socket(v6: bool) -> io::Result<(Socket, bool)> {
    let (domain, protocol) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6)
    } else {
        (Domain::IPV4, Protocol::ICMPV4)
    };
    match Socket::new(domain, Type::DGRAM, Some(protocol)) {
        Ok(s) => Ok((s, false)),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Socket::new(domain, Type::RAW, Some(protocol)).map(|s| (s, true))
        }
        Err(e) => Err(e),
    }
}

const PAYLOAD: &[u8; 16] = b"nsm-rs liveness\0";

/// The whole ping, on a thread of its own (blocking).
fn ping_blocking(target: IpAddr, timeout: Duration, resend: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    let v6 = target.is_ipv6();
    let (socket, raw) = icmp_socket(v6)?;
    // Connected: the kernel hands this socket only ICMP from `target` (raw sockets
    // filter on the peer address too), and a missing route shows at once.
    match socket.connect(&SocketAddr::new(target, 0).into()) {
        Ok(()) => {}
        Err(e) if is_unreachable(&e) => return Ok(false),
        Err(e) => return Err(e),
    }
    // A datagram socket gets its identifier from the kernel (its "port") and only
    // sees replies carrying it; a raw socket sees every reply, so it checks ours.
    let ident = rand::random::<u16>();
    let mut seq: u16 = 0;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        seq = seq.wrapping_add(1);
        match socket.send(&echo_request(v6, ident, seq)) {
            Ok(_) => {}
            Err(e) if is_unreachable(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        let resend_at = (Instant::now() + resend).min(deadline);
        loop {
            let left = resend_at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            match (&socket).read(&mut buf) {
                Ok(n) if is_echo_reply(&buf[..n], v6, raw, ident) => return Ok(true),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                // An ICMP error for an earlier request (host unreachable, ...): no
                // reply to that one; keep waiting until the next resend.
                Err(e) if is_unreachable(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(false)
}

/// An ICMP (v4: type 8) or ICMPv6 (type 128) echo request. The IPv4 checksum is
/// computed here (a raw socket sends it as is); the kernel fills the ICMPv6 one.
fn echo_request(v6: bool, ident: u16, seq: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + PAYLOAD.len());
    p.extend_from_slice(&[if v6 { 128 } else { 8 }, 0, 0, 0]);
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    if !v6 {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether `buf` (as read from the socket: with the IPv4 header on a raw IPv4 socket,
/// without it otherwise) is an echo reply to one of our requests.
fn is_echo_reply(buf: &[u8], v6: bool, raw: bool, ident: u16) -> bool {
    let icmp = if raw && !v6 {
        let ihl = buf.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
        match buf.get(ihl..) {
            Some(icmp) if ihl >= 20 => icmp,
            _ => return false,
        }
    } else {
        buf
    };
    let reply_type = if v6 { 129 } else { 0 };
    icmp.len() >= 8 + PAYLOAD.len()
        && icmp[0] == reply_type
        && icmp[1] == 0
        && (!raw || icmp[4..6] == ident.to_be_bytes())
        && icmp[8..8 + PAYLOAD.len()] == PAYLOAD[..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_sdk::proto::connectioncontext::{ConnectionContext, IpContext};

    fn conn(dst: &[&str]) -> Connection {
        Connection {
            id: "c".into(),
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    dst_ip_addrs: dst.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn kernel_liveness_counts_a_noop_connection_alive_without_pinging() {
        // An address nothing answers: a ping of it would say dead.
        let mut c = conn(&["192.0.2.1/32"]);
        c.mechanism = Some(nsm_sdk::handlers::noop_mechanism());
        assert!(kernel_liveness(PingOptions::new())(&c).await);
    }

    #[test]
    fn the_target_is_the_first_endpoint_address_with_or_without_prefix() {
        assert_eq!(
            endpoint_address(&conn(&["172.16.50.0/32", "172.16.50.9/32"])),
            Some("172.16.50.0".parse().unwrap())
        );
        assert_eq!(
            endpoint_address(&conn(&["2001:db8::1"])),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(endpoint_address(&conn(&[])), None);
        assert_eq!(endpoint_address(&conn(&["not an address"])), None);
        assert_eq!(endpoint_address(&Connection::default()), None);
    }

    #[tokio::test]
    async fn loopback_answers_a_ping_from_the_callers_namespace() {
        // Only loopback: the caller's namespace may route anything else off the host
        // (the namespace tests in tests/ check the "no reply" cases).
        let lo = ping(
            None,
            "127.0.0.1".parse().unwrap(),
            Duration::from_millis(500),
        )
        .await;
        // Without root a raw socket is refused, and a datagram one unless the host's
        // ping_group_range admits us: then there is nothing to test here.
        if matches!(&lo, Err(e) if is_permission(e)) {
            eprintln!("skipped: may not open an ICMP socket");
            return;
        }
        assert!(lo.unwrap(), "127.0.0.1 answers");
    }

    #[tokio::test]
    async fn a_connection_without_an_endpoint_address_counts_as_alive() {
        let check = ping_liveness(PingOptions::new());
        assert!(check(&conn(&[])).await);
        assert!(check(&Connection::default()).await);
    }

    #[test]
    fn an_ipv4_echo_request_carries_a_valid_checksum() {
        let p = echo_request(false, 0x1234, 7);
        assert_eq!(&p[..2], &[8, 0]);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
        // A packet with a correct checksum sums to 0xffff, i.e. checksums to 0.
        assert_eq!(checksum(&p), 0);
        // The RFC 1071 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(checksum(&[0, 1, 0xf2, 3, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        let p6 = echo_request(true, 1, 1);
        assert_eq!(
            &p6[..4],
            &[128, 0, 0, 0],
            "the kernel fills ICMPv6 checksums"
        );
    }

    fn reply(of: &[u8], reply_type: u8) -> Vec<u8> {
        let mut r = of.to_vec();
        r[0] = reply_type;
        r
    }

    #[test]
    fn only_echo_replies_to_our_requests_count() {
        let req = echo_request(false, 0xbeef, 1);
        // Datagram socket: ICMP only; the kernel already matched the identifier.
        assert!(is_echo_reply(&reply(&req, 0), false, false, 0));
        assert!(!is_echo_reply(&req, false, false, 0), "our own request");
        assert!(
            !is_echo_reply(&reply(&req, 3), false, false, 0),
            "unreachable"
        );
        assert!(
            !is_echo_reply(&reply(&req, 0)[..10], false, false, 0),
            "short"
        );
        // Raw socket: with the IPv4 header in front, and the identifier must be ours.
        let mut with_header = vec![0x45];
        with_header.extend_from_slice(&[0; 19]);
        with_header.extend_from_slice(&reply(&req, 0));
        assert!(is_echo_reply(&with_header, false, true, 0xbeef));
        assert!(!is_echo_reply(&with_header, false, true, 0xbeee));
        assert!(
            !is_echo_reply(&[0x41, 0, 0], false, true, 0xbeef),
            "bad ihl"
        );
        // ICMPv6.
        let req6 = echo_request(true, 9, 1);
        assert!(is_echo_reply(&reply(&req6, 129), true, true, 9));
        assert!(!is_echo_reply(&reply(&req6, 0), true, false, 9));
    }
}
