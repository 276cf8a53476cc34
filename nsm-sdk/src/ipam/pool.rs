//! [`PrefixServer`]: carves child prefixes out of vL3 networks, one holder each.
//!
//! What it does: each network (one per address family, or more) is cut into children of
//! one length (`172.16.0.0/16` into /24s). A [`PrefixSession`] (one per
//! `ManagePrefixes` stream, so one per vL3 endpoint) asks with `ALLOCATE`:
//! - a `prefix` that is a free child (or one it, or nobody since a restart, holds) and
//!   outside the request's `exclude_prefixes` is given back as it is: an endpoint
//!   re-claims its prefix after the server or the stream restarted;
//! - any other `prefix` inside a network (the network itself, a child held by another
//!   endpoint, an address) or an empty one (the first network) gets the first free child
//!   of that network that overlaps no excluded prefix;
//! - a session holds one child per network: a new one replaces the old.
//!
//! `DELETE` frees the session's child; the end of the session (its stream broke: the
//! endpoint died) frees all it held, so no prefix stays taken by a dead endpoint.
//!
//! State: the children held, per network, by a session or *reserved* since a restart,
//! behind a `std::sync::Mutex` never held across an await. With a state file every
//! change is written (atomically: a temporary file renamed over it); a server started
//! on that file reserves what it lists for [`PrefixServerBuilder::reserve_for`]: only
//! the endpoint that re-claims such a child gets it, so nothing is handed out twice
//! across a restart. Without a state file a restarted server knows nothing, and an
//! endpoint re-claims its child only if nobody asked for a new one first.
//!
//! Failures: a request of type UNDEFINED, a prefix that does not parse or lies in no
//! network is InvalidArgument; a network with no free child is Unavailable ("no free
//! /24 in 172.16.0.0/16"); a state file that cannot be written is Internal (the
//! allocation is undone).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nsm_proto::ipam::{PrefixRequest, PrefixResponse, Type};
use tracing::{debug, info, warn};

use crate::{Error, Result};

/// How long a child listed in the state file stays reserved for its old holder after a
/// start, by default.
pub const DEFAULT_RESERVE_FOR: Duration = Duration::from_secs(60);

/// Who holds a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Session(u64),
    /// Listed in the state file at start: free for a re-claim, and for anyone after
    /// the instant.
    Reserved(Instant),
}

struct Pool {
    network: IpNet,
    child_len: u8,
    held: BTreeMap<IpNet, Holder>,
}

impl Pool {
    fn is_child(&self, p: &IpNet) -> bool {
        p.prefix_len() == self.child_len && *p == p.trunc() && self.network.contains(p)
    }

    /// Whether `session` may re-claim the child `p`: it is free, its own, or reserved
    /// since a restart.
    fn takable(&self, p: &IpNet, session: u64) -> bool {
        !matches!(self.held.get(p), Some(Holder::Session(s)) if *s != session)
    }

    /// The first child free for a new allocation (reservations not yet expired are
    /// not) that overlaps none of `excluded`.
    fn first_free(&self, excluded: &[IpNet], now: Instant) -> Option<IpNet> {
        let children = self.network.subnets(self.child_len).ok()?;
        children.into_iter().find(|c| {
            let free = match self.held.get(c) {
                None => true,
                Some(Holder::Session(_)) => false,
                Some(Holder::Reserved(until)) => *until <= now,
            };
            free && !overlaps_any(c, excluded)
        })
    }
}

fn overlaps_any(p: &IpNet, excluded: &[IpNet]) -> bool {
    excluded
        .iter()
        .any(|e| e.contains(&p.network()) || p.contains(&e.network()))
}

struct State {
    pools: Vec<Pool>,
    next_session: u64,
}

impl State {
    fn listed(&self) -> Vec<IpNet> {
        self.pools
            .iter()
            .flat_map(|p| p.held.keys().copied())
            .collect()
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct PrefixServer {
    state: Arc<Mutex<State>>,
    state_file: Option<Arc<Path>>,
}

impl fmt::Debug for PrefixServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("PrefixServer")
            .field(
                "networks",
                &s.pools.iter().map(|p| p.network).collect::<Vec<_>>(),
            )
            .field("held", &s.listed())
            .finish()
    }
}

/// Builds a [`PrefixServer`].
#[derive(Debug, Clone)]
#[must_use]
pub struct PrefixServerBuilder {
    networks: Vec<(IpNet, u8)>,
    state_file: Option<PathBuf>,
    reserve_for: Duration,
}

impl PrefixServerBuilder {
    /// Also carves `network` into children of length `child_len`.
    pub fn network(mut self, network: IpNet, child_len: u8) -> Self {
        self.networks.push((network.trunc(), child_len));
        self
    }

    /// Keeps the children held in `path`, and reserves those it lists at start.
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_file = Some(path.into());
        self
    }

    /// How long a child listed in the state file waits for its old holder to re-claim
    /// it (default [`DEFAULT_RESERVE_FOR`]).
    pub fn reserve_for(mut self, d: Duration) -> Self {
        self.reserve_for = d;
        self
    }

    /// The server; reads the state file when there is one.
    ///
    /// Fails (InvalidArgument) with no network, a child length not longer than its
    /// network's or beyond the family's, or networks that overlap; (Internal) with a
    /// state file that exists but cannot be read or holds a line that is no child.
    pub fn build(self) -> Result<PrefixServer> {
        if self.networks.is_empty() {
            return Err(Error::invalid("a prefix server needs at least one network"));
        }
        for (i, (net, len)) in self.networks.iter().enumerate() {
            if *len <= net.prefix_len() || *len > net.max_prefix_len() {
                return Err(Error::invalid(format!(
                    "child prefix length /{len} does not fit in {net}"
                )));
            }
            if self.networks[..i]
                .iter()
                .any(|(o, _)| o.contains(&net.network()) || net.contains(&o.network()))
            {
                return Err(Error::invalid(format!("network {net} overlaps another")));
            }
        }
        let mut pools: Vec<Pool> = self
            .networks
            .iter()
            .map(|(network, child_len)| Pool {
                network: *network,
                child_len: *child_len,
                held: BTreeMap::new(),
            })
            .collect();
        if let Some(path) = &self.state_file {
            let until = Instant::now() + self.reserve_for;
            for p in read_state(path)? {
                let pool = pools
                    .iter_mut()
                    .find(|pool| pool.is_child(&p))
                    .ok_or_else(|| {
                        Error::internal(format!(
                            "state file {}: {p} is no child of this server's networks",
                            path.display()
                        ))
                    })?;
                pool.held.insert(p, Holder::Reserved(until));
            }
            let n: usize = pools.iter().map(|p| p.held.len()).sum();
            if n > 0 {
                info!(reserved = n, file = %path.display(), "prefixes reserved for re-claims");
            }
        }
        Ok(PrefixServer {
            state: Arc::new(Mutex::new(State {
                pools,
                next_session: 0,
            })),
            state_file: self.state_file.map(Arc::from),
        })
    }
}

fn read_state(path: &Path) -> Result<Vec<IpNet>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::internal(format!(
                "reading state file {}: {e}",
                path.display()
            )))
        }
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse::<IpNet>().map_err(|_| {
                Error::internal(format!(
                    "state file {}: {l:?} is not a prefix",
                    path.display()
                ))
            })
        })
        .collect()
}

fn write_state(path: &Path, prefixes: &[IpNet]) -> Result<()> {
    let mut text = String::new();
    for p in prefixes {
        text.push_str(&p.to_string());
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::internal(format!("writing state file {}: {e}", path.display())))
}

impl PrefixServer {
    /// A server carving `network` into children of length `child_len`; add networks
    /// (another family) and a state file on the builder.
    ///
    /// ```
    /// use nsm_sdk::ipam::PrefixServer;
    /// let server = PrefixServer::builder("172.16.0.0/16".parse().unwrap(), 24)
    ///     .network("fd10::/64".parse().unwrap(), 112)
    ///     .build()
    ///     .unwrap();
    /// assert!(server.held().is_empty());
    /// ```
    pub fn builder(network: IpNet, child_len: u8) -> PrefixServerBuilder {
        PrefixServerBuilder {
            networks: Vec::new(),
            state_file: None,
            reserve_for: DEFAULT_RESERVE_FOR,
        }
        .network(network, child_len)
    }

    /// The networks it carves.
    pub fn networks(&self) -> Vec<IpNet> {
        self.lock().pools.iter().map(|p| p.network).collect()
    }

    /// Every child held or reserved.
    pub fn held(&self) -> Vec<IpNet> {
        self.lock().listed()
    }

    /// The children listed in the state file at start that nobody re-claimed yet.
    pub fn reserved(&self) -> Vec<IpNet> {
        self.lock()
            .pools
            .iter()
            .flat_map(|p| {
                p.held
                    .iter()
                    .filter(|(_, h)| matches!(h, Holder::Reserved(_)))
                    .map(|(c, _)| *c)
            })
            .collect()
    }

    /// A new session: what one `ManagePrefixes` stream holds.
    pub fn session(&self) -> PrefixSession {
        let id = {
            let mut s = self.lock();
            s.next_session += 1;
            s.next_session
        };
        PrefixSession {
            server: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, s: &State) -> Result<()> {
        match &self.state_file {
            Some(path) => write_state(path, &s.listed()),
            None => Ok(()),
        }
    }
}

/// What one stream (one vL3 endpoint) holds; dropping it frees its children. See the
/// [module docs](self).
pub struct PrefixSession {
    server: PrefixServer,
    id: u64,
}

impl fmt::Debug for PrefixSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefixSession")
            .field("id", &self.id)
            .finish()
    }
}

fn parse_prefix(field: &str, s: &str) -> Result<IpNet> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| Error::invalid(format!("{field}: {s:?} is not a prefix (addr/len)")))
}

impl PrefixSession {
    /// Answers one request of the stream.
    pub fn handle(&mut self, req: &PrefixRequest) -> Result<PrefixResponse> {
        let excluded = req
            .exclude_prefixes
            .iter()
            .map(|e| parse_prefix("exclude_prefixes", e))
            .collect::<Result<Vec<_>>>()?;
        let wanted = if req.prefix.is_empty() {
            None
        } else {
            Some(parse_prefix("prefix", &req.prefix)?)
        };
        let prefix = match Type::try_from(req.r#type) {
            Ok(Type::Allocate) => self.allocate(wanted, &excluded)?,
            Ok(Type::Delete) => {
                let p = wanted.ok_or_else(|| Error::invalid("DELETE without a prefix"))?;
                self.delete(p)?;
                p
            }
            _ => {
                return Err(Error::invalid(format!(
                    "type {}: a request ALLOCATEs or DELETEs",
                    req.r#type
                )))
            }
        };
        Ok(PrefixResponse {
            prefix: prefix.to_string(),
            exclude_prefixes: req.exclude_prefixes.clone(),
        })
    }

    fn allocate(&mut self, wanted: Option<IpNet>, excluded: &[IpNet]) -> Result<IpNet> {
        let server = self.server.clone();
        let mut s = server.lock();
        let now = Instant::now();
        let index = match wanted {
            None => 0,
            Some(w) => s
                .pools
                .iter()
                .position(|p| p.network.contains(&w.network()))
                .ok_or_else(|| {
                    Error::invalid(format!("prefix {w} is in no network of this server"))
                })?,
        };
        let pool = &mut s.pools[index];
        let reclaim = wanted
            .filter(|w| pool.is_child(w) && pool.takable(w, self.id) && !overlaps_any(w, excluded));
        let chosen = match reclaim {
            Some(p) => p,
            None => pool.first_free(excluded, now).ok_or_else(|| {
                Error::unavailable(format!(
                    "no free /{} in {}{}",
                    pool.child_len,
                    pool.network,
                    if excluded.is_empty() {
                        String::new()
                    } else {
                        format!(" outside {} excluded prefixes", excluded.len())
                    }
                ))
            })?,
        };
        let before = pool.held.clone();
        pool.held
            .retain(|p, h| *p == chosen || *h != Holder::Session(self.id));
        pool.held.insert(chosen, Holder::Session(self.id));
        if let Err(e) = server.persist(&s) {
            s.pools[index].held = before;
            return Err(e);
        }
        debug!(session = self.id, prefix = %chosen, reclaimed = reclaim.is_some(), "prefix allocated");
        Ok(chosen)
    }

    fn delete(&mut self, p: IpNet) -> Result<()> {
        let server = self.server.clone();
        let mut s = server.lock();
        let mut changed = false;
        for pool in &mut s.pools {
            if pool.held.get(&p) == Some(&Holder::Session(self.id)) {
                pool.held.remove(&p);
                changed = true;
            }
        }
        if changed {
            server.persist(&s)?;
        }
        Ok(())
    }
}

impl Drop for PrefixSession {
    fn drop(&mut self) {
        let server = self.server.clone();
        let mut s = server.lock();
        let mut changed = false;
        for pool in &mut s.pools {
            let n = pool.held.len();
            pool.held.retain(|_, h| *h != Holder::Session(self.id));
            changed |= pool.held.len() != n;
        }
        if changed {
            debug!(session = self.id, "session ended: its prefixes are free");
            if let Err(e) = server.persist(&s) {
                warn!(error = %e, "could not record freed prefixes");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(prefix: &str, excluded: &[&str]) -> PrefixRequest {
        PrefixRequest {
            r#type: Type::Allocate as i32,
            prefix: prefix.into(),
            exclude_prefixes: excluded.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn server() -> PrefixServer {
        PrefixServer::builder("10.0.0.0/16".parse().unwrap(), 24)
            .network("fd00::/64".parse().unwrap(), 120)
            .build()
            .unwrap()
    }

    #[test]
    fn sessions_get_distinct_children_per_family() {
        let srv = server();
        let (mut a, mut b) = (srv.session(), srv.session());
        assert_eq!(a.handle(&alloc("", &[])).unwrap().prefix, "10.0.0.0/24");
        assert_eq!(b.handle(&alloc("", &[])).unwrap().prefix, "10.0.1.0/24");
        assert_eq!(
            a.handle(&alloc("fd00::/64", &[])).unwrap().prefix,
            "fd00::/120"
        );
        assert_eq!(
            b.handle(&alloc("fd00::/64", &[])).unwrap().prefix,
            "fd00::100/120"
        );
        // Asking again keeps what the session holds.
        assert_eq!(
            a.handle(&alloc("10.0.0.0/24", &[])).unwrap().prefix,
            "10.0.0.0/24"
        );
        assert_eq!(srv.held().len(), 4);
    }

    #[test]
    fn a_child_held_by_another_is_never_given_and_excluded_ones_are_skipped() {
        let srv = server();
        let mut a = srv.session();
        let mut b = srv.session();
        a.handle(&alloc("", &[])).unwrap();
        let got = b
            .handle(&alloc("10.0.0.0/24", &["10.0.1.0/24", "10.0.2.7/32"]))
            .unwrap();
        assert_eq!(got.prefix, "10.0.3.0/24");
        assert_eq!(got.exclude_prefixes, ["10.0.1.0/24", "10.0.2.7/32"]);
    }

    #[test]
    fn a_freed_child_can_be_reclaimed_and_the_end_of_a_session_frees_it() {
        let srv = server();
        let mut a = srv.session();
        a.handle(&alloc("10.0.7.0/24", &[])).unwrap();
        drop(a);
        assert!(srv.held().is_empty());
        let mut b = srv.session();
        assert_eq!(
            b.handle(&alloc("10.0.7.0/24", &[])).unwrap().prefix,
            "10.0.7.0/24"
        );
        // A new child in the same network replaces the old one.
        b.handle(&alloc("10.0.9.0/24", &[])).unwrap();
        assert_eq!(srv.held(), ["10.0.9.0/24".parse::<IpNet>().unwrap()]);
        let del = PrefixRequest {
            r#type: Type::Delete as i32,
            prefix: "10.0.9.0/24".into(),
            ..Default::default()
        };
        b.handle(&del).unwrap();
        assert!(srv.held().is_empty());
    }

    #[test]
    fn bad_requests_are_invalid_and_a_full_network_unavailable() {
        let srv = PrefixServer::builder("10.0.0.0/23".parse().unwrap(), 24)
            .build()
            .unwrap();
        let mut s = srv.session();
        for (req, code) in [
            (alloc("nonsense", &[]), tonic::Code::InvalidArgument),
            (alloc("192.168.0.0/24", &[]), tonic::Code::InvalidArgument),
            (alloc("", &["x"]), tonic::Code::InvalidArgument),
            (PrefixRequest::default(), tonic::Code::InvalidArgument),
        ] {
            assert_eq!(s.handle(&req).unwrap_err().code(), code, "{req:?}");
        }
        let (mut a, mut b) = (srv.session(), srv.session());
        a.handle(&alloc("", &[])).unwrap();
        b.handle(&alloc("", &[])).unwrap();
        let err = s.handle(&alloc("", &[])).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.to_string().contains("no free /24 in 10.0.0.0/23"),
            "{err}"
        );
        assert!(PrefixServer::builder("10.0.0.0/24".parse().unwrap(), 24)
            .build()
            .is_err());
    }

    #[test]
    fn a_restarted_server_reserves_what_its_state_file_lists_for_the_old_holder() {
        let dir = std::env::temp_dir().join(format!("nsm-ipam-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("state");
        let _ = std::fs::remove_file(&file);
        let build = || {
            PrefixServer::builder("10.0.0.0/16".parse().unwrap(), 24)
                .state_file(&file)
                .build()
                .unwrap()
        };
        let first = build();
        let mut a = first.session();
        let mut b = first.session();
        a.handle(&alloc("", &[])).unwrap();
        b.handle(&alloc("", &[])).unwrap();
        // The process dies: its sessions never end.
        std::mem::forget(a);
        std::mem::forget(b);
        drop(first);
        let second = build();
        assert_eq!(second.held().len(), 2);
        assert_eq!(second.reserved().len(), 2);
        // A newcomer gets neither reserved child; the old holder re-claims its own.
        let mut c = second.session();
        assert_eq!(c.handle(&alloc("", &[])).unwrap().prefix, "10.0.2.0/24");
        let mut a2 = second.session();
        assert_eq!(
            a2.handle(&alloc("10.0.0.0/24", &[])).unwrap().prefix,
            "10.0.0.0/24"
        );
        assert_eq!(second.reserved(), ["10.0.1.0/24".parse::<IpNet>().unwrap()]);
        // Once the reservation runs out, a reserved child is free for anyone.
        let third = PrefixServer::builder("10.0.0.0/16".parse().unwrap(), 24)
            .state_file(&file)
            .reserve_for(Duration::ZERO)
            .build()
            .unwrap();
        let mut d = third.session();
        assert_eq!(d.handle(&alloc("", &[])).unwrap().prefix, "10.0.0.0/24");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
