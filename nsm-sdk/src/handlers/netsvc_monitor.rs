//! `netsvc_monitor`: a connection does not stay on an endpoint that its network service
//! no longer allows (docs/SCENARIOS.md 5.1 item 3).
//!
//! Where it goes: in the chain of the hop that selects endpoints, right after
//! `discover` (the forwarder here; the Go SDK has it in the manager, which selects
//! there):
//!
//! ```text
//! update_path, begin, ..., monitor, ..., discover, netsvc_monitor, round_robin, connect
//! ```
//!
//! What it does:
//! - **check**: a Request that names its endpoint (a refresh, a heal re-request, a
//!   remote hop further down) is refused with NotFound when that endpoint no longer
//!   satisfies the network service's `matches` for the connection's labels
//!   ([`match_endpoints`] applied to the endpoint's registration alone). It reads what
//!   `discover` found ([`Candidates`]), so it costs no registry call. A request that
//!   names no endpoint is not checked: `discover` only offered eligible endpoints.
//! - **watch**: after each successful Request the connection joins the watch of its
//!   network service in the registry (Find with `watch = true`, through the hop's
//!   [`Registries`]), one watch per service shared by all the connections of that
//!   service at this handler. On every version of the service the watch looks the
//!   connections' endpoints up and applies the same rule to each connection. For a
//!   connection whose endpoint is no longer allowed it queues a re-request at this hop
//!   ([`ConnHandle::request_event`]): the check above refuses it, so the refresh fails,
//!   this hop's `monitor` reports the connection DOWN upstream, and the client's `heal`
//!   re-requests, is refused again and reselects (RESELECT_REQUESTED: every hop closes
//!   the old path first, and `discover` selects among the endpoints the service now
//!   allows). A connection that joins a watch already running is judged at once by the
//!   last version the watch received; one that joins while the watch is still opening
//!   (or opening again after a break) is judged by the first version that arrives.
//!
//! Why a re-request and not a Close: the event runs in `begin`'s order with the
//! connection's other operations and replays the *last good* request. Had the
//! client's reselect to an allowed endpoint got in first, the re-request is a harmless
//! refresh of the new path, whereas a queued Close would tear that new path down.
//! While a connection's re-request is pending it is not judged again; after it
//! succeeded (the service changed back, or the connection moved meanwhile) it is judged
//! again by later versions; after it failed it is left alone until its next successful
//! Request (the client's heal moves it).
//!
//! State: per network service and handler (clones of one `netsvc_monitor(..)` share
//! them), the watch: a task owning the upstream Find, the last version of the service,
//! and a map from connection id to a small entry (the connection's handle, endpoint,
//! labels, a generation number fencing off replaced entries, whether a re-request is
//! pending, and a child of the connection's cancellation token). Per connection, in
//! `begin`'s handle, only which watch and generation it belongs to. An entry goes away
//! on Close, when its connection ends any other way (the watch waits on the
//! connection's cancellation token: a failed first request, the end of the hop), and
//! when a re-request moves the connection to another service, endpoint or labels. A
//! watch whose last entry goes away stops at once (its task and its upstream Find);
//! dropping the handler stops every watch. [`NetsvcMonitor::watched_services`] and
//! [`NetsvcMonitor::watched_connections`] count them.
//!
//! Cost: per network service one task and one watching Find (a gRPC stream when the
//! registry is remote), whatever the number of connections. Per connection the entry,
//! the future waiting for its end, its child token and the registration in its handle:
//! ~1.6 KB of heap measured with 1,000 connections of one service (in-memory registry,
//! one label each), where a task and a watch per connection held ~9.3 KB. A version of
//! a service costs one lookup per distinct endpoint of its connections (at most
//! [`LOOKUPS_AT_ONCE`] at a time), then an in-memory judgement per connection.
//!
//! Failure handled: a network service changed so that the chosen endpoint is no longer
//! eligible; a watch stream that breaks or ends (the registry or the manager in front
//! of it restarted), or an endpoint lookup that fails, makes the watch open again after
//! a backoff with jitter, and the first version it sends is judged again for every
//! connection, so a change made meanwhile is not missed. A registry that matches names
//! loosely (a regular expression, a substring) may send other services: only the
//! connections' own service is judged. A deleted service and an endpoint that cannot be
//! found are not judged (the endpoint's death is heal's business). Without a `begin`
//! before it there is no connection handle to re-request or to end an entry: the
//! handler only checks.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::core::rt::Backoff;
use crate::core::{spawn_owned, ConnHandle, Cx, Handler, Next, Side};
use crate::handlers::selection::{fmt_labels, Candidates};
use crate::registry::select::match_endpoints;
use crate::registry::{FindStream, Query, Registries};
use crate::{Error, Result};

/// Default time opening a watch or looking an endpoint up may take.
pub const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default first pause before a broken watch is opened again.
pub const DEFAULT_BACKOFF_START: Duration = Duration::from_millis(100);
/// Default longest pause before a broken watch is opened again.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How many endpoints a watch looks up at once when it judges a version.
pub const LOOKUPS_AT_ONCE: usize = 16;

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct NetsvcMonitor {
    settings: Settings,
    watches: Arc<Watches>,
}

/// What a watch needs from its handler: where to look and how patiently.
#[derive(Clone)]
struct Settings {
    registries: Registries,
    registry_timeout: Duration,
    backoff: Backoff,
}

impl fmt::Debug for NetsvcMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetsvcMonitor")
            .field("registry_timeout", &self.settings.registry_timeout)
            .field("backoff", &self.settings.backoff)
            .field("watched_services", &self.watched_services())
            .finish_non_exhaustive()
    }
}

/// The `netsvc_monitor` handler, watching network services and looking endpoints up in
/// `registries` (the same the hop's `discover` uses).
pub fn netsvc_monitor(registries: Registries) -> NetsvcMonitor {
    NetsvcMonitor {
        settings: Settings {
            registries,
            registry_timeout: DEFAULT_REGISTRY_TIMEOUT,
            backoff: Backoff::new(DEFAULT_BACKOFF_START, DEFAULT_BACKOFF_MAX),
        },
        watches: Arc::default(),
    }
}

impl NetsvcMonitor {
    /// How long opening a watch or looking an endpoint up may take (default
    /// [`DEFAULT_REGISTRY_TIMEOUT`]); a watch that cannot be opened in time counts as
    /// broken.
    pub fn registry_timeout(mut self, timeout: Duration) -> Self {
        self.settings.registry_timeout = timeout;
        self
    }

    /// The pause before a broken watch is opened again, and the longest pause; each
    /// failure in a row doubles it, with the jitter of [`Backoff`] (defaults
    /// [`DEFAULT_BACKOFF_START`], [`DEFAULT_BACKOFF_MAX`]).
    pub fn backoff(mut self, start: Duration, max: Duration) -> Self {
        self.settings.backoff = Backoff::new(start, max);
        self
    }

    /// How many network services are watched now (one task and one upstream Find
    /// each).
    pub fn watched_services(&self) -> usize {
        self.watches.lock().len()
    }

    /// How many connections the watches judge now.
    pub fn watched_connections(&self) -> usize {
        let watches: Vec<_> = self.watches.lock().values().cloned().collect();
        watches.iter().map(|w| w.lock().entries.len()).sum()
    }

    /// Makes `handle` judged by the watch of `key.service` for `key`'s endpoint and
    /// labels, unless it already is.
    fn watch(&self, handle: &ConnHandle, key: Key) {
        let registration = handle.state::<Registration>();
        let mut current = registration.lock();
        if let Some(reg) = current.as_ref() {
            if let Some(watch) = reg.watch.upgrade() {
                if watch.service == key.service && watch.keep(handle.id(), reg.generation, &key) {
                    return;
                }
            }
        }
        let old = current.take();
        if !handle.is_closed() {
            // Joining first: a move within one service does not stop its watch.
            *current = Some(self.watches.join(&self.settings, handle, key));
        }
        if let Some(old) = old {
            self.watches.leave(handle.id(), &old);
        }
    }
}

/// Whether `nse` may serve a connection with `labels` under `ns`'s matches.
fn eligible(
    ns: &NetworkService,
    labels: &HashMap<String, String>,
    nse: &NetworkServiceEndpoint,
) -> bool {
    !match_endpoints(ns, labels, std::slice::from_ref(nse)).is_empty()
}

/// What a connection is judged on: its service, its endpoint and its labels.
#[derive(Debug, Clone, PartialEq)]
struct Key {
    service: String,
    endpoint: String,
    labels: HashMap<String, String>,
}

/// Per connection, in its handle: the watch it belongs to and the generation of its
/// entry there.
#[derive(Default)]
struct Registration(Mutex<Option<Registered>>);

struct Registered {
    watch: Weak<ServiceWatch>,
    generation: u64,
}

impl Registration {
    fn lock(&self) -> MutexGuard<'_, Option<Registered>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The watches of one handler, by network service name. Lock order: a connection's
/// [`Registration`], then this map, then a [`ServiceWatch`]'s state.
#[derive(Default)]
struct Watches {
    by_service: Mutex<HashMap<String, Arc<ServiceWatch>>>,
    generations: AtomicU64,
}

impl Watches {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<ServiceWatch>>> {
        self.by_service.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `handle`'s entry to the watch of `key.service`, starting that watch if
    /// none runs. An entry of the same connection id there is replaced.
    fn join(self: &Arc<Self>, settings: &Settings, handle: &ConnHandle, key: Key) -> Registered {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let ended = handle.cancel_token().child_token();
        let id = handle.id().to_string();
        let mut map = self.lock();
        let watch = match map.get(&key.service) {
            Some(w) if !w.commands.is_closed() => w.clone(),
            _ => {
                let w = ServiceWatch::start(self, settings, key.service.clone());
                map.insert(key.service.clone(), w.clone());
                w
            }
        };
        let entry = Entry {
            handle: handle.clone(),
            endpoint: key.endpoint,
            labels: key.labels,
            generation,
            judging: CheckState::Active,
            ended: ended.clone(),
        };
        if let Some(replaced) = watch.lock().entries.insert(id.clone(), entry) {
            replaced.ended.cancel();
        }
        // The task holds the receiver as long as the watch is in the map.
        let _ = watch.commands.send(Command {
            id,
            generation,
            track: Some(ended),
        });
        drop(map);
        debug!(connection.id = %handle.id(), service = %watch.service, "netsvc_monitor: the connection joins the watch of its service");
        Registered {
            watch: Arc::downgrade(&watch),
            generation,
        }
    }

    /// Removes the entry `reg` points at (if it is still there) and stops its watch
    /// when that was the last entry.
    fn leave(&self, id: &str, reg: &Registered) {
        if let Some(watch) = reg.watch.upgrade() {
            self.remove(&watch, id, reg.generation);
        }
    }

    fn remove(&self, watch: &Arc<ServiceWatch>, id: &str, generation: u64) {
        let mut map = self.lock();
        let empty = {
            let mut state = watch.lock();
            if state
                .entries
                .get(id)
                .is_some_and(|e| e.generation == generation)
            {
                if let Some(entry) = state.entries.remove(id) {
                    entry.ended.cancel();
                }
            }
            state.entries.is_empty()
        };
        if empty && !watch.token.is_cancelled() {
            if map
                .get(&watch.service)
                .is_some_and(|w| Arc::ptr_eq(w, watch))
            {
                map.remove(&watch.service);
            }
            watch.token.cancel();
            debug!(service = %watch.service, "netsvc_monitor: no connection left; the watch stops");
        }
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        for watch in self.lock().values() {
            watch.token.cancel();
        }
    }
}

/// The shared watch of one network service.
struct ServiceWatch {
    service: String,
    /// Stops the task and with it the upstream Find.
    token: CancellationToken,
    /// Entries the task has to track and judge.
    commands: mpsc::UnboundedSender<Command>,
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    /// By connection id.
    entries: HashMap<String, Entry>,
    /// The last version of the service; none while the watch opens.
    latest: Option<NetworkService>,
}

/// One connection judged by a watch.
struct Entry {
    handle: ConnHandle,
    endpoint: String,
    labels: HashMap<String, String>,
    generation: u64,
    judging: CheckState,
    /// Fires when the connection ends or the entry is removed; the task waits on it.
    ended: CancellationToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckState {
    /// Judged by every version.
    Active,
    /// Its re-request is pending: not judged until it has run.
    Requested,
    /// Its re-request failed: not judged until the connection's next successful
    /// Request.
    Parked,
}

/// Asks the task to judge an entry by the latest version (and, when it is new, to
/// wait for its end).
struct Command {
    id: String,
    generation: u64,
    track: Option<CancellationToken>,
}

impl ServiceWatch {
    fn start(watches: &Arc<Watches>, settings: &Settings, service: String) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let watch = Arc::new(ServiceWatch {
            service,
            token: CancellationToken::new(),
            commands: tx,
            state: Mutex::default(),
        });
        let books = Bookkeeping {
            watch: watch.clone(),
            watches: Arc::downgrade(watches),
            commands: rx,
            entry_events: FuturesUnordered::new(),
            unjudged: Vec::new(),
        };
        let task = WatchTask {
            watch: watch.clone(),
            settings: settings.clone(),
        };
        info!(service = %watch.service, "netsvc_monitor: watching the network service");
        spawn_owned(watch.token.clone(), task.run(books));
        watch
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the entry `generation` of `id` judges `key` already (a parked one is
    /// judged again by the latest version).
    fn keep(&self, id: &str, generation: u64, key: &Key) -> bool {
        if self.token.is_cancelled() {
            return false;
        }
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(id) else {
            return false;
        };
        if entry.generation != generation
            || entry.endpoint != key.endpoint
            || entry.labels != key.labels
        {
            return false;
        }
        if entry.judging == CheckState::Parked {
            entry.judging = CheckState::Active;
            let _ = self.commands.send(Command {
                id: id.to_string(),
                generation,
                track: None,
            });
        }
        true
    }
}

/// What woke the task besides the watch stream.
enum EntryEvent {
    /// An entry's connection ended or the entry was removed.
    Ended { id: String, generation: u64 },
    /// An entry's re-request ran.
    Outcome {
        id: String,
        generation: u64,
        ok: bool,
    },
}

/// The task's bookkeeping, done whatever else it waits for.
struct Bookkeeping {
    watch: Arc<ServiceWatch>,
    watches: Weak<Watches>,
    commands: mpsc::UnboundedReceiver<Command>,
    entry_events: FuturesUnordered<BoxFuture<'static, EntryEvent>>,
    /// Entries not judged yet by the version they joined under.
    unjudged: Vec<(String, u64)>,
}

impl Bookkeeping {
    /// Awaits `fut`, doing the books that come meanwhile.
    async fn during<T>(&mut self, fut: impl Future<Output = T>) -> T {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return out,
                Some(command) = self.commands.recv() => self.take(command),
                Some(event) = self.entry_events.next() => self.on_entry_event(event),
            }
        }
    }

    fn take(&mut self, command: Command) {
        let Command {
            id,
            generation,
            track,
        } = command;
        if let Some(ended) = track {
            let id = id.clone();
            self.entry_events.push(
                ended
                    .cancelled_owned()
                    .map(move |()| EntryEvent::Ended { id, generation })
                    .boxed(),
            );
        }
        self.unjudged.push((id, generation));
    }

    fn on_entry_event(&self, event: EntryEvent) {
        match event {
            EntryEvent::Ended { id, generation } => {
                if let Some(watches) = self.watches.upgrade() {
                    watches.remove(&self.watch, &id, generation);
                }
            }
            EntryEvent::Outcome { id, generation, ok } => {
                let mut state = self.watch.lock();
                if let Some(entry) = state.entries.get_mut(&id) {
                    if entry.generation == generation && entry.judging == CheckState::Requested {
                        entry.judging = if ok {
                            CheckState::Active
                        } else {
                            CheckState::Parked
                        };
                    }
                }
                if !ok {
                    debug!(connection.id = %id, "netsvc_monitor: the re-request failed as expected; the client reselects");
                }
            }
        }
    }
}

/// The watch task's work: open the Find, judge versions, open again when it breaks.
struct WatchTask {
    watch: Arc<ServiceWatch>,
    settings: Settings,
}

impl WatchTask {
    fn service(&self) -> &str {
        &self.watch.service
    }

    /// A registry call context: no deadline for a watch (it lives as long as its
    /// connections), `timeout` for a lookup.
    fn registry_cx(timeout: Option<Duration>) -> Cx {
        let cx = Cx::new(Side::Client);
        match timeout {
            Some(t) => cx.with_timeout(t),
            None => cx,
        }
    }

    async fn subscribe(&self) -> Result<FindStream<NetworkService>> {
        let query = Query {
            template: NetworkService {
                name: self.service().to_string(),
                ..Default::default()
            },
            watch: true,
        };
        let timeout = self.settings.registry_timeout;
        let mut cx = Self::registry_cx(None);
        tokio::time::timeout(timeout, self.settings.registries.ns.find(&mut cx, query))
            .await
            .map_err(|_| {
                Error::DeadlineExceeded(format!(
                    "opening a watch of network service {} took longer than {timeout:?}",
                    self.service()
                ))
            })?
    }

    async fn endpoint(&self, name: &str) -> Result<Option<NetworkServiceEndpoint>> {
        let template = NetworkServiceEndpoint {
            name: name.to_string(),
            ..Default::default()
        };
        let mut cx = Self::registry_cx(Some(self.settings.registry_timeout));
        let found = self.settings.registries.nse.list(&mut cx, template).await?;
        Ok(found.into_iter().find(|nse| nse.name == name))
    }

    async fn run(self, mut books: Bookkeeping) {
        let mut failures = 0;
        loop {
            match books.during(self.subscribe()).await {
                Ok(mut versions) => loop {
                    if let Err(e) = self.judge_unjudged(&mut books).await {
                        warn!(service = %self.service(), error = %e, "netsvc_monitor: cannot look an endpoint up; watching again");
                        break;
                    }
                    let next = tokio::select! {
                        next = versions.next() => next,
                        Some(command) = books.commands.recv() => {
                            books.take(command);
                            continue;
                        }
                        Some(event) = books.entry_events.next() => {
                            books.on_entry_event(event);
                            continue;
                        }
                    };
                    match next {
                        Some(Ok(found)) => {
                            if found.deleted || found.resource.name != self.service() {
                                continue;
                            }
                            failures = 0;
                            self.watch.lock().latest = Some(found.resource.clone());
                            books.unjudged.clear();
                            if let Err(e) = self.judge(&mut books, &found.resource, None).await {
                                warn!(service = %self.service(), error = %e, "netsvc_monitor: cannot look an endpoint up; watching again");
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            warn!(service = %self.service(), error = %e, "netsvc_monitor: the watch broke");
                            break;
                        }
                        None => {
                            debug!(service = %self.service(), "netsvc_monitor: the watch ended");
                            break;
                        }
                    }
                },
                Err(e) => {
                    warn!(service = %self.service(), error = %e, "netsvc_monitor: cannot watch the network service");
                }
            }
            // Until the next watch sends its first version, which judges every entry.
            self.watch.lock().latest = None;
            books.unjudged.clear();
            let pause = self.pause(&mut failures);
            books.during(tokio::time::sleep(pause)).await;
        }
    }

    /// Judges the entries that joined since the latest version was judged, by that
    /// version; with no version yet, the first one judges them.
    async fn judge_unjudged(&self, books: &mut Bookkeeping) -> Result<()> {
        if books.unjudged.is_empty() {
            return Ok(());
        }
        let Some(latest) = self.watch.lock().latest.clone() else {
            return Ok(());
        };
        let which: HashSet<(String, u64)> = books.unjudged.drain(..).collect();
        self.judge(books, &latest, Some(&which)).await
    }

    /// Judges by `ns` the active entries (those in `which`, or all), and queues a
    /// re-request for each whose endpoint `ns` no longer allows.
    async fn judge(
        &self,
        books: &mut Bookkeeping,
        ns: &NetworkService,
        which: Option<&HashSet<(String, u64)>>,
    ) -> Result<()> {
        // The entries to judge, by id: those in `which` (looked up, not searched for:
        // a connection joining a watch of n connections costs one entry, not n), or
        // every active one.
        let judged = |e: &Entry, generation: Option<u64>| {
            e.judging == CheckState::Active && generation.is_none_or(|g| g == e.generation)
        };
        let (ids, names): (Vec<(String, u64)>, HashSet<String>) = {
            let state = self.watch.lock();
            let mut ids = Vec::new();
            let mut names = HashSet::new();
            let mut take = |id: &String, e: &Entry| {
                ids.push((id.clone(), e.generation));
                if !names.contains(&e.endpoint) {
                    names.insert(e.endpoint.clone());
                }
            };
            match which {
                Some(which) => {
                    for (id, generation) in which {
                        if let Some(e) = state.entries.get(id) {
                            if judged(e, Some(*generation)) {
                                take(id, e);
                            }
                        }
                    }
                }
                None => {
                    for (id, e) in state.entries.iter() {
                        if judged(e, None) {
                            take(id, e);
                        }
                    }
                }
            }
            (ids, names)
        };
        if names.is_empty() {
            return Ok(());
        }
        let lookups = futures::stream::iter(names)
            .map(|name| async move {
                let found = self.endpoint(&name).await;
                (name, found)
            })
            .buffer_unordered(LOOKUPS_AT_ONCE)
            .collect::<Vec<_>>();
        let mut nses = HashMap::new();
        for (name, found) in books.during(lookups).await {
            match found? {
                Some(nse) => {
                    nses.insert(name, nse);
                }
                None => {
                    debug!(service = %self.service(), endpoint = %name, "netsvc_monitor: the endpoint is not registered; nothing to judge");
                }
            }
        }
        let mut excluded = Vec::new();
        {
            let mut state = self.watch.lock();
            for (id, generation) in ids {
                let Some(entry) = state.entries.get_mut(&id) else {
                    continue;
                };
                // Still the entry that was picked, and still judged by versions.
                if !judged(entry, Some(generation)) {
                    continue;
                }
                let Some(nse) = nses.get(&entry.endpoint) else {
                    continue;
                };
                if !eligible(ns, &entry.labels, nse) {
                    entry.judging = CheckState::Requested;
                    excluded.push((
                        id,
                        entry.generation,
                        entry.handle.clone(),
                        entry.endpoint.clone(),
                        fmt_labels(&entry.labels),
                    ));
                }
            }
        }
        for (id, generation, handle, endpoint, labels) in excluded {
            info!(
                connection.id = %id,
                service = %self.service(),
                endpoint = %endpoint,
                labels = %labels,
                "netsvc_monitor: the network service no longer allows the endpoint; re-requesting"
            );
            let receipt = handle.request_event(None);
            books.entry_events.push(
                async move {
                    let ok = receipt.await.is_ok();
                    EntryEvent::Outcome { id, generation, ok }
                }
                .boxed(),
            );
        }
        Ok(())
    }

    fn pause(&self, failures: &mut u32) -> Duration {
        let pause = self.settings.backoff.wait(*failures);
        *failures = failures.saturating_add(1);
        debug!(service = %self.service(), ?pause, "netsvc_monitor: watching again after a pause");
        pause
    }
}

/// The NotFound of a request whose named endpoint the service no longer allows.
fn refuse(conn: &Connection) -> Error {
    Error::not_found(format!(
        "endpoint {} no longer matches network service {} for labels {}",
        conn.network_service_endpoint_name,
        conn.network_service,
        fmt_labels(&conn.labels)
    ))
}

#[async_trait]
impl Handler for NetsvcMonitor {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let empty = Connection::default();
        let asked = req.connection.as_ref().unwrap_or(&empty);
        let named = asked.network_service_endpoint_name.as_str();
        if !named.is_empty() {
            let candidates = cx.ext().get::<Candidates>();
            let nse = candidates.and_then(|c| c.nses.iter().find(|n| n.name == named));
            if let (Some(c), Some(nse)) = (candidates, nse) {
                if !eligible(&c.ns, &asked.labels, nse) {
                    let e = refuse(asked);
                    warn!(connection.id = %asked.id, error = %e, "netsvc_monitor: request refused");
                    return Err(e);
                }
            }
        }
        // What selection judged: the labels of the request.
        let labels = cx.conn().map(|_| asked.labels.clone());
        let conn = next.request(cx, req).await?;
        if let (Some(handle), Some(labels)) = (cx.conn(), labels) {
            if !conn.network_service_endpoint_name.is_empty() {
                self.watch(
                    handle,
                    Key {
                        service: conn.network_service.clone(),
                        endpoint: conn.network_service_endpoint_name.clone(),
                        labels,
                    },
                );
            }
        }
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        if let Some(handle) = cx.conn() {
            let old = handle
                .get_state::<Registration>()
                .and_then(|r| r.lock().take());
            if let Some(old) = old {
                self.watches.leave(handle.id(), &old);
            }
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rt::begin::begin;
    use crate::core::Chain;
    use crate::handlers::test_support::{eventually, TestHop};
    use crate::handlers::{discover, monitor, round_robin, update_path, Monitor};
    use crate::registry::{memory, Found, Memory, RegistryChain, RegistryHandler, RegistryNext};
    use nsm_proto::connection::State;
    use nsm_proto::registry::{Destination, Match, NetworkServiceLabels};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// In front of the service store: a registry that matches names loosely (every
    /// service for any name), whose first watch ends after its first answer, and whose
    /// watches open only when the gate lets them through.
    #[derive(Clone, Default)]
    struct Front {
        loose: bool,
        break_first: bool,
        gate: Option<Arc<tokio::sync::Semaphore>>,
        /// Watching Finds asked for, opened or not.
        asked: Arc<AtomicUsize>,
        /// Watching Finds opened.
        watches: Arc<AtomicUsize>,
        /// When set, what Finds without `watch` answer (a view lagging behind).
        stale: Arc<Mutex<Option<NetworkService>>>,
    }

    #[async_trait]
    impl RegistryHandler<NetworkService> for Front {
        async fn find(
            &self,
            cx: &mut Cx,
            mut query: Query<NetworkService>,
            next: RegistryNext<NetworkService>,
        ) -> Result<FindStream<NetworkService>> {
            if self.loose {
                query.template.name.clear();
            }
            let watch = query.watch;
            if let Some(ns) = self.stale.lock().unwrap().clone().filter(|_| !watch) {
                let found = Found {
                    resource: ns,
                    deleted: false,
                };
                return Ok(futures::stream::iter([Ok(found)]).boxed());
            }
            if watch {
                self.asked.fetch_add(1, Ordering::SeqCst);
                if let Some(gate) = &self.gate {
                    gate.acquire().await.unwrap().forget();
                }
            }
            let stream = next.find(cx, query).await?;
            if watch && self.watches.fetch_add(1, Ordering::SeqCst) == 0 && self.break_first {
                return Ok(stream.take(1).boxed());
            }
            Ok(stream)
        }
    }

    /// A forwarder-like hop: monitor, discover, netsvc_monitor, round_robin, endpoint.
    struct Hop {
        chain: Chain,
        monitor: Monitor,
        netsvc: NetsvcMonitor,
        services: Memory<NetworkService>,
        registries: Registries,
        /// The end of the chain: what reaches the endpoint.
        endpoint: Arc<TestHop>,
        front: Front,
        root: CancellationToken,
    }

    fn hop(front: Front) -> Hop {
        let services = memory::<NetworkService>();
        let registries = Registries {
            ns: RegistryChain::builder()
                .push(front.clone())
                .push(services.clone())
                .build(),
            nse: RegistryChain::builder()
                .push(memory::<NetworkServiceEndpoint>())
                .build(),
        };
        let monitor = monitor();
        let endpoint = Arc::new(TestHop::default());
        let root = CancellationToken::new();
        let netsvc = netsvc_monitor(registries.clone())
            .backoff(Duration::from_millis(10), Duration::from_millis(50));
        let chain = Chain::builder()
            .push(update_path("fwd"))
            .push(
                begin()
                    .root(root.clone())
                    .default_timeout(Duration::from_secs(5)),
            )
            .push(monitor.clone())
            .push(discover(registries.clone()))
            .push(netsvc.clone())
            .push(round_robin())
            .push(endpoint.clone())
            .build();
        Hop {
            chain,
            monitor,
            netsvc,
            services,
            registries,
            endpoint,
            front,
            root,
        }
    }

    fn service(name: &str, matches: Vec<Match>) -> NetworkService {
        NetworkService {
            name: name.into(),
            payload: "IP".into(),
            matches,
            ..Default::default()
        }
    }

    /// A match that allows only the endpoints labelled `experimental=<value>`.
    fn only_experimental(value: &str) -> Vec<Match> {
        vec![Match {
            routes: vec![Destination {
                destination_selector: [("experimental".to_string(), value.to_string())].into(),
                ..Default::default()
            }],
            ..Default::default()
        }]
    }

    fn endpoint(name: &str, services: &[&str], labels: &[(&str, &str)]) -> NetworkServiceEndpoint {
        let labels = NetworkServiceLabels {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: services.iter().map(|s| s.to_string()).collect(),
            network_service_labels: services
                .iter()
                .map(|s| (s.to_string(), labels.clone()))
                .collect(),
            url: format!("inmem://{name}"),
            ..Default::default()
        }
    }

    impl Hop {
        async fn put_service(&self, ns: NetworkService) {
            self.registries
                .ns
                .register(&mut Cx::client(), ns)
                .await
                .unwrap();
        }
        async fn put_endpoint(&self, nse: NetworkServiceEndpoint) {
            self.registries
                .nse
                .register(&mut Cx::client(), nse)
                .await
                .unwrap();
        }
        fn state(&self, id: &str) -> Option<i32> {
            self.monitor.get(id).map(|c| c.state)
        }
    }

    fn request(service: &str, endpoint: &str) -> NetworkServiceRequest {
        request_of("conn", service, endpoint)
    }

    fn request_of(id: &str, service: &str, endpoint: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                network_service: service.into(),
                network_service_endpoint_name: endpoint.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn reselect(conn: &Connection) -> NetworkServiceRequest {
        let mut c = conn.clone();
        c.network_service_endpoint_name.clear();
        c.state = State::ReselectRequested as i32;
        NetworkServiceRequest {
            connection: Some(c),
            ..Default::default()
        }
    }

    /// Two endpoints, the connection on nse-1 (registered alone first).
    async fn connected(hop: &Hop) -> Connection {
        hop.put_service(service("svc", vec![])).await;
        hop.put_endpoint(endpoint("nse-1", &["svc"], &[])).await;
        let conn = hop
            .chain
            .request(&mut Cx::server(), request("svc", ""))
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "nse-1");
        hop.put_endpoint(endpoint("nse-2", &["svc"], &[("experimental", "true")]))
            .await;
        eventually("the hop watches the service", || {
            hop.services.watchers() == 1
        })
        .await;
        conn
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_change_that_excludes_the_endpoint_reports_the_connection_down() {
        let hop = hop(Front::default());
        let conn = connected(&hop).await;
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
        assert_eq!(
            hop.endpoint.passed_endpoints(),
            ["nse-1"],
            "the re-request was refused before it reached the endpoint"
        );
        assert_eq!(
            hop.endpoint.closes(),
            0,
            "the client decides: nothing closed yet"
        );

        // The client's heal reselects: the old path is closed, nse-2 is selected.
        let moved = hop
            .chain
            .request(&mut Cx::server(), reselect(&conn))
            .await
            .unwrap();
        assert_eq!(moved.network_service_endpoint_name, "nse-2");
        assert_eq!(hop.endpoint.closes(), 1);
        assert_eq!(hop.state(&conn.id), Some(State::Up as i32));

        // The watch follows the new endpoint: excluding it is noticed again.
        hop.put_service(service("svc", only_experimental("false")))
            .await;
        eventually("the moved connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
        assert_eq!(hop.endpoint.passed_endpoints(), ["nse-1", "nse-2"]);
        hop.chain.close(&mut Cx::server(), moved).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_naming_an_excluded_endpoint_is_not_found() {
        let hop = hop(Front::default());
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        hop.put_endpoint(endpoint("nse-1", &["svc"], &[])).await;
        let err = hop
            .chain
            .request(&mut Cx::server(), request("svc", "nse-1"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        assert!(err.to_string().contains("no longer matches"), "{err}");
        assert!(hop.endpoint.passed_endpoints().is_empty());
        // An allowed endpoint named by the request goes through.
        hop.put_endpoint(endpoint("nse-2", &["svc"], &[("experimental", "true")]))
            .await;
        let conn = hop
            .chain
            .request(&mut Cx::server(), request("svc", "nse-2"))
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "nse-2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_that_keeps_the_endpoint_allowed_does_nothing() {
        let hop = hop(Front::default());
        let conn = connected(&hop).await;
        // Still allowed: a route that every endpoint satisfies.
        hop.put_service(service(
            "svc",
            vec![Match {
                routes: vec![Destination::default()],
                ..Default::default()
            }],
        ))
        .await;
        // The watch judges versions in order: once the excluding one is acted on, the
        // allowing one was judged before.
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
        assert_eq!(
            hop.endpoint.passed_endpoints(),
            ["nse-1"],
            "the allowing version caused no re-request"
        );
    }

    /// docs/SCENARIOS.md 5.10 "netsvcmonitor: groups of similar NSs".
    #[tokio::test(start_paused = true)]
    async fn a_similarly_named_service_is_not_judged() {
        let hop = hop(Front {
            loose: true,
            ..Default::default()
        });
        let conn = connected(&hop).await;
        hop.put_service(service("svc-2", only_experimental("true")))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(hop.state(&conn.id), Some(State::Up as i32));
        assert_eq!(hop.endpoint.passed_endpoints(), ["nse-1"]);
        // The watch was alive all along.
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_watch_is_opened_again_and_misses_nothing() {
        let hop = hop(Front {
            break_first: true,
            ..Default::default()
        });
        let conn = connected(&hop).await;
        eventually("watching again", || {
            hop.front.watches.load(Ordering::SeqCst) >= 2 && hop.services.watchers() == 1
        })
        .await;
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
    }

    /// docs/SCENARIOS.md 5.10 "netsvcmonitor: no leak without Close".
    #[tokio::test(start_paused = true)]
    async fn the_watch_ends_with_the_connection_and_with_the_hop() {
        let hop = hop(Front::default());
        let conn = connected(&hop).await;
        hop.chain.close(&mut Cx::server(), conn).await.unwrap();
        eventually("the watch ended with Close", || {
            hop.services.watchers() == 0
        })
        .await;

        hop.chain
            .request(&mut Cx::server(), request("svc", ""))
            .await
            .unwrap();
        eventually("watching again", || hop.services.watchers() == 1).await;
        hop.root.cancel();
        eventually("the watch ended with the hop", || {
            hop.services.watchers() == 0
        })
        .await;
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    #[tokio::test(start_paused = true)]
    async fn connections_of_one_service_share_one_watch_and_each_is_judged() {
        let hop = hop(Front::default());
        hop.put_service(service("svc", vec![])).await;
        hop.put_endpoint(endpoint("nse-1", &["svc"], &[])).await;
        let mut conns = Vec::new();
        for id in ["a", "b"] {
            let conn = hop
                .chain
                .request(&mut Cx::server(), request_of(id, "svc", ""))
                .await
                .unwrap();
            assert_eq!(conn.network_service_endpoint_name, "nse-1");
            conns.push(conn);
        }
        hop.put_endpoint(endpoint("nse-2", &["svc"], &[("experimental", "true")]))
            .await;
        eventually("the hop watches the service", || {
            hop.services.watchers() == 1
        })
        .await;
        assert_eq!(
            hop.front.watches.load(Ordering::SeqCst),
            1,
            "one upstream watch"
        );
        assert_eq!(
            (
                hop.netsvc.watched_services(),
                hop.netsvc.watched_connections()
            ),
            (1, 2)
        );

        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("both connections are reported DOWN", || {
            conns
                .iter()
                .all(|c| hop.state(&c.id) == Some(State::Down as i32))
        })
        .await;

        // Both move to nse-2; the watch goes on judging them, still one watch.
        let mut moved = Vec::new();
        for conn in &conns {
            let m = hop
                .chain
                .request(&mut Cx::server(), reselect(conn))
                .await
                .unwrap();
            assert_eq!(m.network_service_endpoint_name, "nse-2");
            moved.push(m);
        }
        assert_eq!(
            (
                hop.netsvc.watched_services(),
                hop.netsvc.watched_connections()
            ),
            (1, 2)
        );
        hop.put_service(service("svc", only_experimental("false")))
            .await;
        eventually("both moved connections are reported DOWN", || {
            moved
                .iter()
                .all(|c| hop.state(&c.id) == Some(State::Down as i32))
        })
        .await;
        assert_eq!(
            hop.front.watches.load(Ordering::SeqCst),
            1,
            "never reopened"
        );

        // The first Close leaves the watch to the other connection; the last stops it.
        let mut moved = moved.into_iter();
        hop.chain
            .close(&mut Cx::server(), moved.next().unwrap())
            .await
            .unwrap();
        assert_eq!(
            (
                hop.netsvc.watched_services(),
                hop.netsvc.watched_connections()
            ),
            (1, 1)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(hop.services.watchers(), 1, "still watching for the other");
        hop.chain
            .close(&mut Cx::server(), moved.next().unwrap())
            .await
            .unwrap();
        assert_eq!(
            (
                hop.netsvc.watched_services(),
                hop.netsvc.watched_connections()
            ),
            (0, 0)
        );
        eventually("the watch stopped with the last Close", || {
            hop.services.watchers() == 0
        })
        .await;
    }

    /// Gates the opening of watches; `a` is connected (on nse-1) before `b` joins.
    async fn joins_while_opening(hop: &Hop, gate: &tokio::sync::Semaphore, opened_before: usize) {
        eventually("the watch waits at the gate", || {
            hop.front.asked.load(Ordering::SeqCst) > opened_before
        })
        .await;
        let b = hop
            .chain
            .request(&mut Cx::server(), request_of("b", "svc", ""))
            .await
            .unwrap();
        assert_eq!(b.network_service_endpoint_name, "nse-1");
        assert_eq!(hop.netsvc.watched_connections(), 2);
        // Changed while nobody watches: the first version must bring it.
        hop.put_endpoint(endpoint("nse-2", &["svc"], &[("experimental", "true")]))
            .await;
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(hop.state("b"), Some(State::Up as i32));
        gate.add_permits(1_000);
        eventually("both connections are reported DOWN", || {
            hop.state("a") == Some(State::Down as i32) && hop.state("b") == Some(State::Down as i32)
        })
        .await;
    }

    async fn connect_a(hop: &Hop) {
        hop.put_service(service("svc", vec![])).await;
        hop.put_endpoint(endpoint("nse-1", &["svc"], &[])).await;
        let a = hop
            .chain
            .request(&mut Cx::server(), request_of("a", "svc", ""))
            .await
            .unwrap();
        assert_eq!(a.network_service_endpoint_name, "nse-1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_joins_while_the_watch_opens_is_judged_by_its_first_version() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let hop = hop(Front {
            gate: Some(gate.clone()),
            ..Default::default()
        });
        connect_a(&hop).await;
        joins_while_opening(&hop, &gate, 0).await;
        assert_eq!(hop.services.watchers(), 1, "one watch for both");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_joins_while_the_watch_reopens_is_judged_by_its_first_version() {
        // The first watch opens, sends a version and ends; the next waits at the gate.
        let gate = Arc::new(tokio::sync::Semaphore::new(1));
        let hop = hop(Front {
            break_first: true,
            gate: Some(gate.clone()),
            ..Default::default()
        });
        connect_a(&hop).await;
        eventually("the first watch opened", || {
            hop.front.watches.load(Ordering::SeqCst) == 1
        })
        .await;
        joins_while_opening(&hop, &gate, 1).await;
        assert_eq!(hop.services.watchers(), 1, "one watch for both");
    }

    /// docs/SCENARIOS.md 5.10 "netsvcmonitor: no leak without Close", for many connections.
    #[tokio::test(start_paused = true)]
    async fn connections_that_come_and_go_leave_no_entry_and_no_task() {
        let hop = hop(Front::default());
        hop.put_service(service("svc", vec![])).await;
        hop.put_service(service("svc-b", vec![])).await;
        hop.put_endpoint(endpoint("nse-1", &["svc", "svc-b"], &[]))
            .await;
        // Without begin: each connection is a handle of our own, ended at will.
        let chain = Chain::builder()
            .push(discover(hop.registries.clone()))
            .push(hop.netsvc.clone())
            .push(round_robin())
            .build();
        let root = CancellationToken::new();
        let sink: std::sync::Weak<dyn crate::core::EventSink> =
            std::sync::Weak::<crate::core::conn::NoSink>::new();
        let before = alive_tasks();
        for round in 0..3 {
            let mut conns = Vec::new();
            for i in 0..40 {
                let id = format!("c{round}-{i}");
                let handle = ConnHandle::new(id.clone(), &root, sink.clone());
                let mut cx = Cx::server();
                cx.set_conn(Some(handle.clone()));
                let svc = if i % 2 == 0 { "svc" } else { "svc-b" };
                let conn = chain
                    .request(&mut cx, request_of(&id, svc, ""))
                    .await
                    .unwrap();
                // Refreshes of the same connection make no new entry.
                chain
                    .request(&mut cx, request_of(&id, svc, "nse-1"))
                    .await
                    .unwrap();
                conns.push((handle, conn));
            }
            assert_eq!(
                (
                    hop.netsvc.watched_services(),
                    hop.netsvc.watched_connections()
                ),
                (2, 40)
            );
            assert_eq!(alive_tasks(), before + 2, "one task per service");
            eventually("one upstream watch per service", || {
                hop.services.watchers() == 2
            })
            .await;
            for (i, (handle, conn)) in conns.into_iter().enumerate() {
                match i % 4 {
                    // Closed.
                    0 => {
                        let mut cx = Cx::server();
                        cx.set_conn(Some(handle));
                        chain.close(&mut cx, conn).await.unwrap();
                    }
                    // Moved to the other service by a re-request, then ended.
                    1 => {
                        let mut cx = Cx::server();
                        cx.set_conn(Some(handle.clone()));
                        chain
                            .request(&mut cx, request_of(handle.id(), "svc", "nse-1"))
                            .await
                            .unwrap();
                        handle.end();
                    }
                    // Ended without a Close (a failed first request, the hop's end).
                    _ => handle.end(),
                }
            }
            eventually("every entry, watch and task is gone", || {
                hop.netsvc.watched_connections() == 0
                    && hop.netsvc.watched_services() == 0
                    && alive_tasks() == before
                    && hop.services.watchers() == 0
            })
            .await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_re_request_to_another_service_stops_the_watch_it_leaves() {
        let hop = hop(Front::default());
        hop.put_service(service("svc", vec![])).await;
        hop.put_service(service("svc-b", vec![])).await;
        hop.put_endpoint(endpoint("nse-1", &["svc", "svc-b"], &[]))
            .await;
        let conn = hop
            .chain
            .request(&mut Cx::server(), request_of("a", "svc-b", ""))
            .await
            .unwrap();
        eventually("watching svc-b", || hop.services.watchers() == 1).await;
        let moved = hop
            .chain
            .request(&mut Cx::server(), request_of("a", "svc", "nse-1"))
            .await
            .unwrap();
        assert_eq!(moved.network_service, "svc");
        assert_eq!(
            (
                hop.netsvc.watched_services(),
                hop.netsvc.watched_connections()
            ),
            (1, 1)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            hop.services.watchers(),
            1,
            "svc-b's watch stopped, svc's runs"
        );
        // The watch judges the connection under its new service.
        hop.put_endpoint(endpoint("nse-2", &["svc"], &[("experimental", "true")]))
            .await;
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
    }

    /// `discover` may see an older version than the watch (a cache in front of it that
    /// lags): a connection that joins the running watch is judged by its latest
    /// version, not only by the next one.
    #[tokio::test(start_paused = true)]
    async fn a_connection_that_joins_a_running_watch_is_judged_by_its_latest_version() {
        let hop = hop(Front::default());
        hop.put_service(service("svc", vec![])).await;
        hop.put_endpoint(endpoint("nse-1", &["svc"], &[])).await;
        hop.chain
            .request(&mut Cx::server(), request_of("a", "svc", ""))
            .await
            .unwrap();
        eventually("the hop watches the service", || {
            hop.services.watchers() == 1
        })
        .await;
        *hop.front.stale.lock().unwrap() = Some(service("svc", vec![]));
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        // Judged and re-requested; the lagging view lets the re-request through.
        eventually("a is re-requested", || {
            hop.endpoint.passed_endpoints().len() == 2
        })
        .await;

        hop.chain
            .request(&mut Cx::server(), request_of("b", "svc", ""))
            .await
            .unwrap();
        eventually("b is re-requested", || {
            hop.endpoint.passed_endpoints().len() == 4
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            hop.endpoint.passed_endpoints().len(),
            4,
            "each judged once per version: no loop of re-requests"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_handler_stops_its_watches() {
        let hop = hop(Front::default());
        hop.put_service(service("svc", vec![])).await;
        hop.put_endpoint(endpoint("nse-1", &["svc"], &[])).await;
        let netsvc = netsvc_monitor(hop.registries.clone());
        let chain = Chain::builder()
            .push(discover(hop.registries.clone()))
            .push(netsvc.clone())
            .push(round_robin())
            .build();
        let root = CancellationToken::new();
        let sink: std::sync::Weak<dyn crate::core::EventSink> =
            std::sync::Weak::<crate::core::conn::NoSink>::new();
        let handle = ConnHandle::new("a", &root, sink);
        let before = alive_tasks();
        let mut cx = Cx::server();
        cx.set_conn(Some(handle.clone()));
        chain
            .request(&mut cx, request_of("a", "svc", ""))
            .await
            .unwrap();
        eventually("watching", || hop.services.watchers() == 1).await;
        assert_eq!(alive_tasks(), before + 1);
        drop((chain, netsvc, cx));
        eventually("the watch stopped with the handler", || {
            hop.services.watchers() == 0 && alive_tasks() == before
        })
        .await;
        assert!(!handle.is_closed(), "the connection itself goes on");
    }
}
