//! [`Vl3Mesh`]: a vL3 endpoint connects to the other endpoints of its vL3 network.
//!
//! What it does: it watches the registry for the endpoints of the vL3 service (a Find
//! with `watch`) and keeps one connection to each other endpoint whose name sorts after
//! its own (so each pair of endpoints has exactly one link, made by the one whose name
//! sorts first), through a client chain the caller builds with
//! [`vl3_client`](crate::handlers::vl3_client) (the announcement of this endpoint's
//! prefixes), the data plane mechanism, and `heal` with [`Vl3Mesh::heal_options`]. Each
//! request names its peer (`network_service_endpoint_name`), so the link goes to that
//! endpoint and no other.
//!
//! - A peer that appears (or re-registers at another URL) is connected; a request that
//!   fails is tried again with the SDK's backoff while the peer stays registered.
//! - A peer that is unregistered or expires is disconnected (Close: the link and its
//!   routes go away on both sides).
//! - A link that breaks (heal says Broken: the peer died) is closed at once, so no
//!   route leads to a dead router, then requested again while the peer stays
//!   registered (a restarted peer is back as soon as it serves).
//! - When this endpoint's prefixes change, each link is requested again (a refresh
//!   carrying the new announcement).
//!
//! State: per peer, the connection id, the URL it was registered at, the last good
//! connection and the task that requests it; one task (owned: [`Vl3Mesh::stop`] or
//! dropping the mesh ends it, and [`Vl3Mesh::close_all`] closes every link).
//!
//! Failure handled: a registry watch that ends or fails is opened again after a
//! backoff (put `watch_reconnect` in the registry chain to also learn what was deleted
//! meanwhile).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::NetworkServiceEndpoint;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::core::rt::Backoff;
use crate::core::{Chain, Cx};
use crate::handlers::{HealEvent, HealOptions};
use crate::ipam::Vl3Prefixes;
use crate::registry::{Query, RegistryChain};
use crate::transport::Channels;

/// How long one request of a link may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the Close of a link may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// See the [module docs](self).
#[derive(Clone)]
pub struct Vl3Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    service: String,
    peers: Mutex<HashMap<String, Peer>>,
    broken_tx: mpsc::UnboundedSender<String>,
    broken_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

struct Peer {
    id: String,
    url: String,
    conn: Arc<Mutex<Option<Connection>>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Vl3Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vl3Mesh")
            .field("name", &self.inner.name)
            .field("service", &self.inner.service)
            .field("links", &self.links())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self
            .task
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
        for (_, p) in self
            .peers
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            p.task.abort();
        }
    }
}

impl Vl3Mesh {
    /// The mesh of the endpoint `name` in the vL3 service `service`.
    pub fn new(name: impl Into<String>, service: impl Into<String>) -> Self {
        let (broken_tx, broken_rx) = mpsc::unbounded_channel();
        Vl3Mesh {
            inner: Arc::new(Inner {
                name: name.into(),
                service: service.into(),
                peers: Mutex::new(HashMap::new()),
                broken_tx,
                broken_rx: Mutex::new(Some(broken_rx)),
                cancel: CancellationToken::new(),
                task: Mutex::new(None),
            }),
        }
    }

    /// The options of the `heal` to put in the mesh's client chain: a reselect that
    /// keeps the peer's name (a link never moves to another endpoint), and an observer
    /// that tells the mesh when a link breaks.
    pub fn heal_options(&self, channels: Channels) -> HealOptions {
        let tx = self.inner.broken_tx.clone();
        HealOptions::new(channels)
            .reselect(|req: &mut NetworkServiceRequest| {
                if let Some(conn) = req.connection.as_mut() {
                    conn.mechanism = None;
                }
            })
            .observer(move |event, id| {
                if event == HealEvent::Broken {
                    let _ = tx.send(id.to_string());
                }
            })
    }

    /// The peers with a working link now.
    pub fn links(&self) -> Vec<String> {
        let peers = self.inner.lock_peers();
        let mut out: Vec<String> = peers
            .iter()
            .filter(|(_, p)| p.conn.lock().unwrap_or_else(|e| e.into_inner()).is_some())
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    /// Starts watching `registry` for the service's endpoints and linking to them with
    /// `client`; the links announce `prefixes`. Runs until [`stop`](Self::stop), the
    /// mesh is dropped or `root` is cancelled. Starting twice does nothing.
    pub fn start(
        &self,
        client: Chain,
        registry: RegistryChain<NetworkServiceEndpoint>,
        prefixes: Vl3Prefixes,
        root: &CancellationToken,
    ) {
        let Some(broken) = self
            .inner
            .broken_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let root = root.clone();
        let cancel = self.inner.cancel.clone();
        let weak = Arc::downgrade(&self.inner);
        let span = tracing::info_span!("vl3_mesh", endpoint = %self.inner.name);
        let task = tokio::spawn(
            async move {
                tokio::select! {
                    _ = root.cancelled() => {}
                    _ = cancel.cancelled() => {}
                    _ = run(weak.clone(), client, registry, prefixes, broken) => {}
                }
                // Stopped: no link is requested any more (close_all closes them).
                if let Some(inner) = weak.upgrade() {
                    for p in inner.lock_peers().values() {
                        p.task.abort();
                    }
                }
            }
            .instrument(span),
        );
        *self.inner.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Stops watching and linking (the links stay until [`close_all`](Self::close_all)
    /// or their expiry).
    pub fn stop(&self) {
        self.inner.cancel.cancel();
    }

    /// Stops, then closes every link with `client` (the chain given to `start`).
    pub async fn close_all(&self, client: &Chain) {
        self.stop();
        let peers: Vec<(String, Peer)> = self.inner.lock_peers().drain().collect();
        for (name, p) in peers {
            close_peer(client, &name, p).await;
        }
    }
}

impl Inner {
    fn lock_peers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this endpoint makes the link to `peer`.
    fn links_to(&self, peer: &str) -> bool {
        self.name.as_str() < peer
    }
}

async fn close_peer(client: &Chain, name: &str, p: Peer) {
    p.task.abort();
    let conn = p
        .conn
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or(Connection {
            // Closing by id waits for a request still running behind `begin`.
            id: p.id.clone(),
            ..Default::default()
        });
    let mut cx = Cx::client().with_timeout(CLOSE_TIMEOUT);
    let closed = tokio::time::timeout(CLOSE_TIMEOUT, client.close(&mut cx, conn))
        .await
        .unwrap_or_else(|_| Err(crate::Error::DeadlineExceeded("closing a vL3 link".into())));
    match closed {
        Ok(()) => info!(peer = %name, "vL3 link closed"),
        Err(e) => debug!(peer = %name, error = %e, "closing a vL3 link failed"),
    }
}

/// Requests the link to `peer` until it works (or the task is aborted).
fn link(client: Chain, service: String, peer: String, id: String) -> Peer0 {
    let conn = Arc::new(Mutex::new(None));
    let slot = conn.clone();
    let name = peer.clone();
    let link_id = id.clone();
    let task = tokio::spawn(async move {
        let backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        let mut attempt = 0;
        loop {
            let req = NetworkServiceRequest {
                connection: Some(Connection {
                    id: link_id.clone(),
                    network_service: service.clone(),
                    network_service_endpoint_name: name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut cx = Cx::client().with_timeout(CALL_TIMEOUT);
            match client.request(&mut cx, req).await {
                Ok(c) => {
                    info!(peer = %name, "vL3 link up");
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                    return;
                }
                Err(e) => {
                    debug!(peer = %name, error = %e, "vL3 link request failed");
                    tokio::time::sleep(backoff.wait(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    });
    Peer0 { id, conn, task }
}

/// A peer without its URL yet.
struct Peer0 {
    id: String,
    conn: Arc<Mutex<Option<Connection>>>,
    task: JoinHandle<()>,
}

async fn run(
    inner: std::sync::Weak<Inner>,
    client: Chain,
    registry: RegistryChain<NetworkServiceEndpoint>,
    prefixes: Vl3Prefixes,
    mut broken: mpsc::UnboundedReceiver<String>,
) {
    let backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
    let mut attempt = 0;
    let mut own = prefixes.subscribe();
    own.borrow_and_update();
    loop {
        let Some(service) = inner.upgrade().map(|i| i.service.clone()) else {
            return;
        };
        let query = Query {
            template: NetworkServiceEndpoint {
                network_service_names: vec![service.clone()],
                ..Default::default()
            },
            watch: true,
        };
        let mut stream = match registry.find(&mut Cx::client(), query).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "vL3 mesh: the registry watch failed");
                tokio::time::sleep(backoff.wait(attempt)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        loop {
            tokio::select! {
                item = stream.next() => {
                    let found = match item {
                        Some(Ok(f)) => f,
                        Some(Err(e)) => {
                            warn!(error = %e, "vL3 mesh: the registry watch broke");
                            break;
                        }
                        None => break,
                    };
                    attempt = 0;
                    let Some(inner) = inner.upgrade() else { return };
                    let nse = found.resource;
                    if !inner.links_to(&nse.name) {
                        continue;
                    }
                    if found.deleted {
                        let gone = inner.lock_peers().remove(&nse.name);
                        if let Some(p) = gone {
                            info!(peer = %nse.name, "vL3 peer gone");
                            close_peer(&client, &nse.name, p).await;
                        }
                        continue;
                    }
                    let stale = {
                        let mut peers = inner.lock_peers();
                        match peers.get(&nse.name) {
                            Some(p) if p.url == nse.url => continue,
                            _ => peers.remove(&nse.name),
                        }
                    };
                    if let Some(p) = stale {
                        close_peer(&client, &nse.name, p).await;
                    }
                    info!(peer = %nse.name, url = %nse.url, "vL3 peer found");
                    let p = link(client.clone(), service.clone(), nse.name.clone(), new_id());
                    inner.lock_peers().insert(nse.name.clone(), Peer { id: p.id, url: nse.url, conn: p.conn, task: p.task });
                }
                Some(id) = broken.recv() => {
                    let Some(inner) = inner.upgrade() else { return };
                    let hit = {
                        let mut peers = inner.lock_peers();
                        let name = peers.iter().find(|(_, p)| p.id == id).map(|(n, _)| n.clone());
                        name.and_then(|n| peers.remove(&n).map(|p| (n, p)))
                    };
                    if let Some((name, p)) = hit {
                        info!(peer = %name, "vL3 link broken: closing it, then linking again");
                        let url = p.url.clone();
                        close_peer(&client, &name, p).await;
                        let p = link(client.clone(), service.clone(), name.clone(), new_id());
                        inner.lock_peers().insert(name, Peer { id: p.id, url, conn: p.conn, task: p.task });
                    }
                }
                Ok(()) = own.changed() => {
                    let Some(inner) = inner.upgrade() else { return };
                    let links: Vec<(Arc<Mutex<Option<Connection>>>, Connection)> = inner
                        .lock_peers()
                        .values()
                        .filter_map(|p| {
                            let conn = p.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
                            conn.map(|c| (p.conn.clone(), c))
                        })
                        .collect();
                    for (slot, conn) in links {
                        let req = NetworkServiceRequest { connection: Some(conn), ..Default::default() };
                        let mut cx = Cx::client().with_timeout(CALL_TIMEOUT);
                        match client.request(&mut cx, req).await {
                            Ok(c) => *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(c),
                            Err(e) => warn!(error = %e, "vL3 mesh: re-announcing the prefixes failed"),
                        }
                    }
                }
            }
        }
        tokio::time::sleep(backoff.wait(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
