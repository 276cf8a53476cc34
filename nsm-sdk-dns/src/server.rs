//! `DnsServer`: a DNS server on UDP and TCP that serves [`Records`], answers other
//! names by [`Fanout`] and keeps those answers in a [`Cache`].
//!
//! How a query is answered (class IN, opcode QUERY; anything else is REFUSED or
//! NOTIMP):
//!
//! 1. a name in the records: NOERROR, authoritative, its A or AAAA records (none for
//!    another type or a family it has no address of: "no data", so a stub resolver
//!    asking AAAA first goes on to ask A);
//! 2. otherwise, when the query asks for recursion (every stub resolver does): the
//!    cache, then the fanout; its first NOERROR answer is returned (and cached);
//! 3. otherwise REFUSED, which makes glibc and other stub resolvers go on to the next
//!    nameserver of their resolv.conf. A query without "recursion desired" (as the
//!    fanout sends) is answered from the records only, so servers that fan out to each
//!    other never loop. Nothing ever goes to the internet.
//!
//! State: the records (shared with the handlers that update them), the fanout list, the
//! cache, and the listeners' tasks, owned by hickory's server (a `JoinSet`): they stop
//! when [`DnsServer::shutdown`] is called or the server is dropped.
//!
//! Failure handled: a socket that cannot be bound is [`Error::Socket`]; a query that
//! does not parse is answered FORMERR by hickory; a response that cannot be sent is
//! logged.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use async_trait::async_trait;
use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tracing::{debug, warn};

use crate::{Cache, Error, Fanout, Records, Result};

/// The TTL of the records served by default (seconds).
pub const DEFAULT_TTL: u32 = 10;
/// How long one fanout may take by default.
pub const DEFAULT_FANOUT_TIMEOUT: Duration = Duration::from_secs(2);
/// How many fanout answers the cache keeps by default.
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;
/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// Options of a [`DnsServer`], from [`DnsServer::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct DnsServerBuilder {
    records: Records,
    fanout: Vec<SocketAddr>,
    fanout_timeout: Duration,
    ttl: u32,
    cache_capacity: usize,
}

impl DnsServerBuilder {
    /// The servers asked for names this one does not hold (default none).
    pub fn fanout(mut self, servers: Vec<SocketAddr>) -> Self {
        self.fanout = servers;
        self
    }

    /// How long one fanout may take (default [`DEFAULT_FANOUT_TIMEOUT`]).
    pub fn fanout_timeout(mut self, timeout: Duration) -> Self {
        self.fanout_timeout = timeout;
        self
    }

    /// The TTL of the records this server holds, in seconds (default [`DEFAULT_TTL`]).
    pub fn ttl(mut self, seconds: u32) -> Self {
        self.ttl = seconds;
        self
    }

    /// How many fanout answers are cached (default [`DEFAULT_CACHE_CAPACITY`]; 0 keeps
    /// none).
    pub fn cache_capacity(mut self, n: usize) -> Self {
        self.cache_capacity = n;
        self
    }

    /// Binds UDP and TCP on `addr` (port 0: a free port, the same for both) in the
    /// calling thread's network namespace and serves.
    ///
    /// # Errors
    /// [`Error::Socket`] when either cannot be bound.
    pub async fn bind(self, addr: SocketAddr) -> Result<DnsServer> {
        let (udp, tcp) = bind_pair(addr)?;
        self.serve(udp, tcp)
    }

    /// Serves on sockets bound by the caller (e.g. inside a pod's network namespace,
    /// with `nsm_sdk_kernel::NetNs::run`: a socket stays in the namespace it was made
    /// in). Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Socket`] when a socket cannot be made non-blocking or registered.
    pub fn serve(self, udp: UdpSocket, tcp: TcpListener) -> Result<DnsServer> {
        let sock_err = |addr: String| move |source| Error::Socket { addr, source };
        let addr = udp.local_addr().map_err(sock_err("udp".into()))?;
        udp.set_nonblocking(true)
            .map_err(sock_err(addr.to_string()))?;
        tcp.set_nonblocking(true)
            .map_err(sock_err(addr.to_string()))?;
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(sock_err(addr.to_string()))?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(sock_err(addr.to_string()))?;
        let fanout = Fanout::new(self.fanout, self.fanout_timeout);
        let cache = Cache::new(self.cache_capacity);
        let answerer = Answerer {
            records: self.records.clone(),
            fanout: fanout.clone(),
            cache: cache.clone(),
            ttl: self.ttl,
        };
        let mut server = Server::new(answerer);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, 16);
        debug!(%addr, "DNS server serving");
        Ok(DnsServer {
            server,
            addr,
            records: self.records,
            fanout,
            cache,
        })
    }
}

/// UDP and TCP on the same address; with port 0, the port UDP got (tried a few times:
/// another socket may hold that TCP port).
fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
    let err = |source| Error::Socket {
        addr: addr.to_string(),
        source,
    };
    let mut last = None;
    for _ in 0..8 {
        let udp = UdpSocket::bind(addr).map_err(err)?;
        let bound = udp.local_addr().map_err(err)?;
        match TcpListener::bind(bound) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(e)
            }
            Err(e) => return Err(err(e)),
        }
    }
    Err(err(
        last.unwrap_or_else(|| std::io::Error::other("no free port"))
    ))
}

/// A running DNS server; see the [module docs](self). Dropping it stops its tasks.
pub struct DnsServer {
    server: Server<Answerer>,
    addr: SocketAddr,
    records: Records,
    fanout: Fanout,
    cache: Cache,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .field("records", &self.records)
            .field("fanout", &self.fanout)
            .finish()
    }
}

impl DnsServer {
    /// Options of a server of `records`.
    ///
    /// ```no_run
    /// # async fn f() -> nsm_sdk_dns::Result<()> {
    /// use nsm_sdk_dns::{DnsServer, Records};
    /// let records = Records::new();
    /// let server = DnsServer::builder(records.clone())
    ///     .fanout(vec!["10.0.0.2:53".parse().unwrap()])
    ///     .bind("0.0.0.0:53".parse().unwrap())
    ///     .await?;
    /// records.set("pod-1.vl3", "conn-1", vec!["10.0.0.5".parse().unwrap()])?;
    /// # drop(server); Ok(()) }
    /// ```
    pub fn builder(records: Records) -> DnsServerBuilder {
        DnsServerBuilder {
            records,
            fanout: Vec::new(),
            fanout_timeout: DEFAULT_FANOUT_TIMEOUT,
            ttl: DEFAULT_TTL,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        }
    }

    /// Where it listens (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The records it serves (clones share them).
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Its fanout (clones share the list: [`Fanout::set_servers`] changes it).
    pub fn fanout(&self) -> &Fanout {
        &self.fanout
    }

    /// Its cache of fanout answers.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Stops listening and waits for the listeners' tasks to end.
    pub async fn shutdown(mut self) {
        if let Err(e) = self.server.shutdown_gracefully().await {
            debug!(addr = %self.addr, error = %e, "DNS server stopped");
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // The listeners stop at the token; the JoinSet holding them aborts the rest
        // when it drops right after.
        self.server.shutdown_token().cancel();
    }
}

/// The request handler behind the listeners.
struct Answerer {
    records: Records,
    fanout: Fanout,
    cache: Cache,
    ttl: u32,
}

/// What a query gets: a code, whether this server is the authority, the answers.
struct Answer {
    code: ResponseCode,
    authoritative: bool,
    records: Vec<Record>,
}

impl Answer {
    fn code(code: ResponseCode) -> Answer {
        Answer {
            code,
            authoritative: false,
            records: Vec::new(),
        }
    }
}

impl Answerer {
    /// The records of `name` for `rtype` when the name is held here.
    fn local(&self, name: &Name, rtype: RecordType) -> Option<Vec<Record>> {
        let addrs = self.records.lookup_name(name)?;
        let records = addrs
            .into_iter()
            .filter_map(|ip| match (ip, rtype) {
                (std::net::IpAddr::V4(a), RecordType::A) => Some(RData::A(A(a))),
                (std::net::IpAddr::V6(a), RecordType::AAAA) => Some(RData::AAAA(AAAA(a))),
                _ => None,
            })
            .map(|data| Record::from_rdata(name.clone(), self.ttl, data))
            .collect();
        Some(records)
    }

    async fn answer(&self, request: &Request) -> Answer {
        if request.metadata.op_code != OpCode::Query {
            return Answer::code(ResponseCode::NotImp);
        }
        let Ok(info) = request.request_info() else {
            return Answer::code(ResponseCode::FormErr);
        };
        let query = info.query;
        if query.query_class() != DNSClass::IN {
            return Answer::code(ResponseCode::Refused);
        }
        let name = Name::from(query.name());
        let rtype = query.query_type();
        if let Some(records) = self.local(&name, rtype) {
            return Answer {
                code: ResponseCode::NoError,
                authoritative: true,
                records,
            };
        }
        if !request.metadata.recursion_desired {
            return Answer::code(ResponseCode::Refused);
        }
        if let Some(records) = self.cache.get(&name, rtype) {
            return Answer {
                code: ResponseCode::NoError,
                authoritative: false,
                records,
            };
        }
        match self.fanout.query(&name, rtype).await {
            Some(m) => {
                self.cache.put(&name, rtype, &m.answers);
                Answer {
                    code: ResponseCode::NoError,
                    authoritative: false,
                    records: m.answers,
                }
            }
            None => Answer::code(ResponseCode::Refused),
        }
    }
}

#[async_trait]
impl RequestHandler for Answerer {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let answer = self.answer(request).await;
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = answer.code;
        metadata.authoritative = answer.authoritative;
        metadata.recursion_available = !self.fanout.servers().is_empty();
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        debug!(src = %request.src(), code = ?answer.code, answers = answer.records.len(), "DNS answer");
        let response = builder.build(
            metadata,
            answer.records.iter(),
            std::iter::empty(),
            std::iter::empty(),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                warn!(src = %request.src(), error = %e, "DNS response not sent");
                let mut failed = Metadata::response_from_request(&request.metadata);
                failed.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_proto::op::Header {
                    metadata: failed,
                    counts: Default::default(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use hickory_proto::op::Message;
    use nsm_testkit::dns::lookup;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    async fn server(records: &Records) -> DnsServer {
        DnsServer::builder(records.clone())
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    /// One query over UDP with or without "recursion desired"; the answer.
    async fn ask(server: SocketAddr, name: &str, rtype: RecordType, rd: bool) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = rd;
        q.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            rtype,
        ));
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(server).await.unwrap();
        socket.send(&q.to_vec().unwrap()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    #[tokio::test]
    async fn it_serves_its_records_over_udp_and_tcp_and_follows_their_changes() {
        let records = Records::new();
        let s = server(&records).await;
        let at = [s.local_addr()];
        assert!(lookup(&at, &[], "web-1.vl3").await.is_err(), "not yet");
        records
            .set("web-1.vl3", "c1", vec![ip("172.16.0.2"), ip("fd00::2")])
            .unwrap();
        let mut got = lookup(&at, &[], "web-1.vl3").await.unwrap();
        got.sort();
        assert_eq!(got, [ip("172.16.0.2"), ip("fd00::2")]);
        // The search domain completes a short name.
        let mut got = lookup(&at, &["vl3".into()], "web-1").await.unwrap();
        got.sort();
        assert_eq!(got, [ip("172.16.0.2"), ip("fd00::2")]);

        let a = ask(s.local_addr(), "WEB-1.vl3.", RecordType::A, true).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.metadata.authoritative);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].ttl, DEFAULT_TTL);
        // A type it has nothing of: no data, not an error.
        let mx = ask(s.local_addr(), "web-1.vl3.", RecordType::MX, true).await;
        assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
        assert!(mx.answers.is_empty());

        // TCP, through the fanout's TCP path (a query without recursion).
        let m = fanout_tcp(s.local_addr(), "web-1.vl3.").await;
        assert_eq!(m.answers.len(), 1);

        records.remove("web-1.vl3", "c1");
        let gone = ask(s.local_addr(), "web-1.vl3.", RecordType::A, true).await;
        assert_eq!(gone.metadata.response_code, ResponseCode::Refused);
        assert!(lookup(&at, &[], "web-1.vl3").await.is_err());
        s.shutdown().await;
    }

    async fn fanout_tcp(server: SocketAddr, name: &str) -> Message {
        let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
        let mut q = Message::query();
        q.metadata.recursion_desired = false;
        q.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            RecordType::A,
        ));
        let bytes = q.to_vec().unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(&(bytes.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&bytes).await.unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).unwrap()
    }

    #[tokio::test]
    async fn a_name_of_another_server_comes_by_fanout_and_is_cached_for_its_ttl() {
        let (ra, rb) = (Records::new(), Records::new());
        let a = DnsServer::builder(ra.clone())
            .ttl(2)
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = DnsServer::builder(rb.clone())
            .fanout(vec![silent.local_addr().unwrap(), a.local_addr()])
            .fanout_timeout(Duration::from_millis(500))
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        ra.set("db.net", "c1", vec![ip("10.1.0.5")]).unwrap();
        rb.set("web.net", "c2", vec![ip("10.2.0.5")]).unwrap();
        let at_b = [b.local_addr()];
        // A server that never answers does not hold up the one that does.
        let started = std::time::Instant::now();
        let first = ask(b.local_addr(), "db.net.", RecordType::A, true).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "first good answer wins"
        );
        assert_eq!(first.answers.len(), 1);
        assert!(!first.metadata.authoritative);
        assert_eq!(b.cache().len(), 1, "the fanout answer is cached");

        // Gone at A: B answers from its cache until the TTL (2 s) ends, then not.
        ra.remove("db.net", "c1");
        let cached = ask(b.local_addr(), "db.net.", RecordType::A, true).await;
        assert_eq!(cached.answers.len(), 1, "cached");
        assert_eq!(
            lookup(&at_b, &[], "web.net").await.unwrap(),
            [ip("10.2.0.5")]
        );
        assert!(lookup(&at_b, &[], "nobody.net").await.is_err());
        tokio::time::sleep(Duration::from_millis(2100).saturating_sub(started.elapsed())).await;
        let after = ask(b.local_addr(), "db.net.", RecordType::A, true).await;
        assert_eq!(after.metadata.response_code, ResponseCode::Refused);
        ra.set("db.net", "c1", vec![ip("10.1.0.6")]).unwrap();
        assert_eq!(
            lookup(&at_b, &[], "db.net").await.unwrap(),
            [ip("10.1.0.6")]
        );
    }

    #[tokio::test]
    async fn servers_that_fan_out_to_each_other_never_loop() {
        let (ra, rb) = (Records::new(), Records::new());
        let a = server(&ra).await;
        let b = DnsServer::builder(rb.clone())
            .fanout(vec![a.local_addr()])
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        a.fanout().set_servers(vec![b.local_addr()]);
        ra.set("a.net", "x", vec![ip("10.0.0.1")]).unwrap();
        rb.set("b.net", "x", vec![ip("10.0.0.2")]).unwrap();
        assert_eq!(
            lookup(&[a.local_addr()], &[], "b.net").await.unwrap(),
            [ip("10.0.0.2")]
        );
        assert_eq!(
            lookup(&[b.local_addr()], &[], "a.net").await.unwrap(),
            [ip("10.0.0.1")]
        );
        // Nobody's name: each asks the other once, without recursion; the other
        // refuses at once instead of asking back (a loop would run into the timeout).
        let started = std::time::Instant::now();
        let m = ask(a.local_addr(), "none.net.", RecordType::A, true).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(
            started.elapsed() < DEFAULT_FANOUT_TIMEOUT,
            "answered before the fanout timeout: {:?}",
            started.elapsed()
        );
        // Without recursion, a server answers from its records only.
        let m = ask(a.local_addr(), "b.net.", RecordType::A, false).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[tokio::test]
    async fn dropping_the_server_stops_its_listeners() {
        let records = Records::new();
        records.set("x.net", "c", vec![ip("10.0.0.1")]).unwrap();
        let s = server(&records).await;
        let addr = s.local_addr();
        assert!(lookup(&[addr], &[], "x.net").await.is_ok());
        drop(s);
        // The port is free again: both listeners are closed.
        nsm_testkit::eventually("the listeners closed", Duration::from_secs(2), || {
            std::net::UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok()
        })
        .await;
        let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = DnsServer::builder(Records::new())
            .bind(busy.local_addr().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Socket { .. }), "{e}");
    }
}
