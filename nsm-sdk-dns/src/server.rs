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
    Err(err(last.unwrap_or_else(|| std::io::Error::other("no free port"))))
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
