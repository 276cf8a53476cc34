//! `Fanout`: asks other DNS servers, in parallel, for a name this server does not hold.
//!
//! What it does: sends one query (UDP; again over TCP to a server whose UDP answer came
//! truncated) to every server of its list at once, **without** "recursion desired", and
//! returns the first answer that is NOERROR (records, or none for a name that exists
//! without that type). The others are dropped. The whole fanout is bounded by its
//! timeout. The receiving [`DnsServer`](crate::DnsServer) answers such a query from its
//! own records only, so a fanout never comes back around (no loops).
//!
//! State: the list of servers (shared by clones, replaced at run time with
//! [`Fanout::set_servers`], e.g. when endpoints of a network come and go) and the
//! timeout. No task is spawned: the queries are futures of the caller, dropped with it.
//!
//! Failure handled: a server that refuses, fails, answers garbage or does not answer in
//! time is skipped; when none gives a good answer the result is `None`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

/// The UDP payload size a fanout query offers (EDNS), the size DNS flag day 2020 set.
const PAYLOAD: u16 = 1232;

/// See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Fanout {
    servers: Arc<RwLock<Vec<SocketAddr>>>,
    timeout: Duration,
}

impl Fanout {
    /// A fanout to `servers`, each whole fanout bounded by `timeout`.
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Fanout {
        Fanout {
            servers: Arc::new(RwLock::new(servers)),
            timeout,
        }
    }

    /// Replaces the list of servers (seen by the next query).
    pub fn set_servers(&self, servers: Vec<SocketAddr>) {
        *self.servers.write().unwrap_or_else(|p| p.into_inner()) = servers;
    }

    /// The servers asked.
    pub fn servers(&self) -> Vec<SocketAddr> {
        self.servers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The timeout of one fanout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Asks every server for (`name`, `rtype`); the first NOERROR answer, or `None`.
    pub async fn query(&self, name: &Name, rtype: RecordType) -> Option<Message> {
        let servers = self.servers();
        if servers.is_empty() {
            return None;
        }
        let mut asks: FuturesUnordered<_> = servers
            .into_iter()
            .map(|server| async move { (server, exchange(server, name, rtype).await) })
            .collect();
        let first_good = async {
            while let Some((server, answer)) = asks.next().await {
                match answer {
                    Ok(m) if m.metadata.response_code == ResponseCode::NoError => {
                        debug!(%server, %name, ?rtype, answers = m.answers.len(), "fanout answer");
                        return Some(m);
                    }
                    Ok(m) => {
                        debug!(%server, %name, ?rtype, code = ?m.metadata.response_code, "fanout: no")
                    }
                    Err(e) => debug!(%server, %name, ?rtype, error = %e, "fanout: failed"),
                }
            }
            None
        };
        tokio::time::timeout(self.timeout, first_good)
            .await
            .ok()
            .flatten()
    }
}

/// One query to `server`: UDP, then TCP when the UDP answer is truncated.
async fn exchange(server: SocketAddr, name: &Name, rtype: RecordType) -> std::io::Result<Message> {
    let mut q = Message::query();
    q.metadata.recursion_desired = false;
    q.add_query(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(PAYLOAD);
    q.set_edns(edns);
    let bytes = q.to_vec().map_err(std::io::Error::other)?;
    let answer = udp(server, &bytes, &q).await?;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    tcp(server, &bytes, &q).await
}

/// Whether `m` answers `q` (same id, a response, the same question).
fn answers(m: &Message, q: &Message) -> bool {
    m.metadata.id == q.metadata.id
        && m.metadata.message_type == MessageType::Response
        && m.queries == q.queries
}

async fn udp(server: SocketAddr, bytes: &[u8], q: &Message) -> std::io::Result<Message> {
    let any: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0)).await?;
    // Connected: only datagrams from the server are received.
    socket.connect(server).await?;
    socket.send(bytes).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Garbage or an answer to something else is ignored; the caller's timeout
        // bounds the wait.
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if answers(&m, q) {
                return Ok(m);
            }
        }
    }
}

async fn tcp(server: SocketAddr, bytes: &[u8], q: &Message) -> std::io::Result<Message> {
    let mut stream = TcpStream::connect(server).await?;
    let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    stream.write_all(&out).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    let m = Message::from_vec(&buf).map_err(std::io::Error::other)?;
    if answers(&m, q) {
        Ok(m)
    } else {
        Err(std::io::Error::other("an answer to another question"))
    }
}
