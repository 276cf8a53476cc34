//! `etcd`: a registry store in etcd (feature `etcd`), the terminal handler of a registry
//! chain, shared by every registry replica on the same etcd cluster and prefix.
//!
//! What it does (the same contract as [`memory`](super::memory)):
//! - Entries are keys `<prefix>ns/<name>` and `<prefix>nse/<name>`; the value is a
//!   protobuf [`EtcdEntry`]: the resource's protobuf encoding and its owner's SPIFFE ID.
//!   An endpoint is also copied, for each service it names, to the **index** key
//!   `<prefix>idx/ns/<service>/<name>` (`/` and `%` in the service escaped as `%2F`,
//!   `%25`), written and deleted in the same transaction as the entry and under the
//!   same lease, so the index never disagrees with the entries and expires with them.
//!   A copy rather than a reference: a Find reads the index in one range read at one
//!   revision, which a watch then follows, with no second read per entry. Endpoints
//!   written by a version without the index are found by service only once they are
//!   registered again (their next refresh) through a version with it: every replica on
//!   one prefix should run a version with the index.
//! - **Register** reads the key, checks ownership (with policies), prepares the entry as
//!   memory does (initial registration time, default payload) and writes it in a
//!   transaction that succeeds only if the key is still at the revision it read
//!   (compare-and-swap; a lost race reads again). An endpoint with an
//!   `expiration_time` is written with an etcd **lease** of that many seconds (rounded
//!   up), so it disappears, and watchers hear a delete, even when no registry is alive.
//!   A refresh writes with a new lease and revokes the old one. Place
//!   [`expire`](super::expire)`(..).`[`stamp_only`](super::Expire::stamp_only) before
//!   this store: it sets the expiration; timers would race with other replicas.
//! - **Find** is one linearizable read (matches ([`Matches`](super::Matches)),
//!   endpoints whose expiration has passed left out) of only what can match: the one
//!   key when the template names the entry, the index of the first service the
//!   template names (`network_service_names`, exact), or else the whole directory.
//!   With `watch`, a watch of the same keys follows from the revision after that read, so
//!   the stream has no gap and no duplicate: a put that matches is `deleted = false`, a
//!   delete (Unregister or lease expiry) or a put that stops matching of an entry the
//!   stream reported is `deleted = true` with the entry as it was.
//! - **Unregister** deletes the key (compare-and-swap as Register) and revokes its lease;
//!   an unknown name is Ok.
//!
//! Name ownership ([`EtcdStore::policies`]): the owner is kept in the stored value, so it
//! holds across replicas: the policy
//! ([`policy::REGISTRY`](crate::security::policy::REGISTRY)) sees the owner as read, and
//! the compare-and-swap makes sure nobody changed the name in between. Two identities
//! racing for a free name cannot both win: the second transaction fails, reads the
//! first one's owner and is refused. An endpoint past its expiration counts as free;
//! expire's own cleanup ([`ExpiryCleanup`]) passes. Without policies the owner is empty
//! and nobody is checked (as memory without `authorize`).
//!
//! State: the etcd client (which fails over between the endpoints it was given); no
//! cache: every call reads etcd, so replicas agree.
//!
//! Failures handled: etcd unreachable or without quorum (Unavailable; a Register that
//! failed wrote nothing); a watch that breaks (it is re-opened from the revision after
//! the last event seen, for up to [`WATCH_RETRY`], then the stream ends with
//! Unavailable so the client finds again); a watch revision that etcd has compacted
//! (the stream **re-lists** as memory does for a lagging watcher: `deleted = true` for
//! every entry it had reported that is gone, then every current match); a value that is
//! not an entry (skipped, logged).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use prost::Message;
use tracing::{debug, warn};

use super::authorize::{allowed, caller};
use super::expire::ExpiryCleanup;
use super::memory::Stored;
use super::{FindStream, Found, Query, RegistryHandler, RegistryNext};
use crate::core::Cx;
use crate::security::policy::PolicySet;
use crate::security::SpiffeId;
use crate::wire::bounds::Shown;
use crate::{Error, Result};

/// The key prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "/nsm/";

/// How long a broken watch is re-opened before the Find stream ends with Unavailable.
pub const WATCH_RETRY: Duration = Duration::from_secs(10);

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a Register or Unregister reads again after losing a compare-and-swap.
const CAS_ATTEMPTS: usize = 16;

/// The stored value of a registry entry.
#[derive(Clone, PartialEq, Message)]
pub struct EtcdEntry {
    /// The resource (NetworkService or NetworkServiceEndpoint), protobuf-encoded.
    #[prost(bytes = "vec", tag = "1")]
    pub resource: Vec<u8>,
    /// The SPIFFE ID that registered it (empty without policies).
    #[prost(string, tag = "2")]
    pub owner: String,
}

/// What to connect to: etcd endpoints, the key prefix and optional TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://host:2379`, or `https://` with TLS).
    pub endpoints: Vec<String>,
    /// Prefix of every key (default [`DEFAULT_PREFIX`]).
    pub prefix: String,
    /// TLS to etcd.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that signed the members' certificates and, for client
/// certificate authentication, a certificate and key (PEM files).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EtcdTls {
    /// The CA bundle (`NSM_ETCD_CA`).
    pub ca: Option<PathBuf>,
    /// The client certificate (`NSM_ETCD_CERT`).
    pub cert: Option<PathBuf>,
    /// The client key (`NSM_ETCD_KEY`).
    pub key: Option<PathBuf>,
}

impl EtcdConfig {
    /// The configuration for `endpoints`, with the default prefix and no TLS.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_string(),
            tls: None,
        }
    }

    /// The key prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// What the environment says: `NSM_ETCD_ENDPOINTS` (comma-separated; unset or empty:
    /// `None`, the registry stays in memory), `NSM_ETCD_PREFIX`, and TLS from
    /// `NSM_ETCD_CA`, `NSM_ETCD_CERT`, `NSM_ETCD_KEY`.
    ///
    /// Fails with InvalidArgument when only one of the certificate and key is set.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let Some(endpoints) = var("NSM_ETCD_ENDPOINTS") else {
            return Ok(None);
        };
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        let mut config = EtcdConfig::new(endpoints);
        if let Some(prefix) = var("NSM_ETCD_PREFIX") {
            config.prefix = prefix;
        }
        let tls = EtcdTls {
            ca: var("NSM_ETCD_CA").map(PathBuf::from),
            cert: var("NSM_ETCD_CERT").map(PathBuf::from),
            key: var("NSM_ETCD_KEY").map(PathBuf::from),
        };
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(Error::invalid(
                "NSM_ETCD_CERT and NSM_ETCD_KEY go together (a client certificate and its key)",
            ));
        }
        if tls != EtcdTls::default() {
            config.tls = Some(tls);
        }
        Ok(Some(config))
    }
}

/// A connection to etcd under a prefix; makes the stores ([`Etcd::store`]).
#[derive(Clone)]
pub struct Etcd {
    /// Behind an `Arc`: the client is a few kilobytes, cloned for every store.
    client: Arc<Client>,
    prefix: Arc<str>,
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn unavailable(what: &str, e: impl fmt::Display) -> Error {
    Error::Unavailable(format!("etcd {what}: {e}"))
}

/// The error of a first call to etcd that failed: a TLS handshake refused for a
/// certificate is a configuration that cannot work (InvalidArgument, naming the
/// setting to fix); anything else is Unavailable.
fn refused(config: &EtcdConfig, endpoints: &str, e: etcd_client::Error) -> Error {
    let text = format!("{e:?} {e}");
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let tls = config.tls.as_ref();
    let file = |p: Option<&PathBuf>| p.map_or_else(|| "unset".into(), |p| p.display().to_string());
    if has(&["InvalidCertificate", "invalid peer certificate"]) {
        let ca = file(tls.and_then(|t| t.ca.as_ref()));
        return Error::invalid(format!(
            "etcd at {endpoints}: the members' certificate is not trusted: NSM_ETCD_CA \
             ({ca}) must be the CA that signed it ({e})"
        ));
    }
    if has(&[
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "certificate required",
    ]) {
        let cert = file(tls.and_then(|t| t.cert.as_ref()));
        return Error::invalid(format!(
            "etcd at {endpoints}: the members refused the client certificate: NSM_ETCD_CERT \
             and NSM_ETCD_KEY ({cert}) must be a certificate their CA signed ({e})"
        ));
    }
    let e = unavailable(&format!("at {endpoints}"), e);
    match tls {
        // TLS 1.3 tells a client without a certificate only by closing the connection.
        Some(t) if t.cert.is_none() => Error::Unavailable(format!(
            "{e} (no client certificate was given: NSM_ETCD_CERT and NSM_ETCD_KEY; etcd \
             members run with --client-cert-auth require one)"
        )),
        _ => e,
    }
}

fn read_pem(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::invalid(format!("{what} {}: {e}", path.display())))
}

impl Etcd {
    /// Connects to the etcd of `config` and checks that it answers (a linearizable read
    /// of the prefix, within `within`).
    ///
    /// Fails with InvalidArgument for a configuration that cannot work (no endpoint, a
    /// TLS file that cannot be read, a CA that did not sign the members' certificates,
    /// a client certificate they refuse) and Unavailable when etcd does not answer.
    pub async fn connect(config: &EtcdConfig, within: Duration) -> Result<Etcd> {
        if config.endpoints.is_empty() {
            return Err(Error::invalid("no etcd endpoint"));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(within.min(CALL_TIMEOUT))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &config.tls {
            let mut opts = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                opts = opts.ca_certificate(Certificate::from_pem(read_pem(ca, "NSM_ETCD_CA")?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                opts = opts.identity(Identity::from_pem(
                    read_pem(cert, "NSM_ETCD_CERT")?,
                    read_pem(key, "NSM_ETCD_KEY")?,
                ));
            }
            options = options.with_tls(opts);
        }
        let endpoints = config.endpoints.join(",");
        let failed = |e: etcd_client::Error| refused(config, &endpoints, e);
        let connect = async {
            let client = Client::connect(&config.endpoints, Some(options))
                .await
                .map_err(failed)?;
            let etcd = Etcd {
                client: Arc::new(client),
                prefix: config.prefix.as_str().into(),
            };
            etcd.client
                .kv_client()
                .get(
                    etcd.prefix.as_bytes(),
                    Some(GetOptions::new().with_count_only()),
                )
                .await
                .map_err(failed)?;
            Ok(etcd)
        };
        tokio::time::timeout(within, connect).await.map_err(|_| {
            Error::Unavailable(format!("etcd at {endpoints}: no answer within {within:?}"))
        })?
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The etcd client (for tools and tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A store of `R` under this prefix, without ownership checks.
    pub fn store<R: EtcdResource>(&self) -> EtcdStore<R> {
        EtcdStore {
            etcd: self.clone(),
            policies: None,
            _r: PhantomData,
        }
    }
}

/// A resource the etcd store keeps: where under the prefix, when it lapses and which
/// network services index it.
pub trait EtcdResource: Stored {
    /// The directory under the prefix (`ns/`, `nse/`).
    const DIR: &'static str;
    /// When the registration lapses (an endpoint's `expiration_time`); `None`: never.
    fn lapses(&self) -> Option<SystemTime>;
    /// The network services whose index holds this entry (an endpoint's
    /// `network_service_names`; none for others).
    fn services(&self) -> &[String] {
        &[]
    }
    /// The network service every match of `template` serves, if the template names
    /// one: a Find of it reads that service's index, not the whole directory.
    fn queried_service(_template: &Self) -> Option<&str> {
        None
    }
}

impl EtcdResource for NetworkService {
    const DIR: &'static str = "ns/";
    fn lapses(&self) -> Option<SystemTime> {
        None
    }
}

impl EtcdResource for NetworkServiceEndpoint {
    const DIR: &'static str = "nse/";
    fn lapses(&self) -> Option<SystemTime> {
        self.expiration_time
            .and_then(|t| SystemTime::try_from(t).ok())
    }
    fn services(&self) -> &[String] {
        &self.network_service_names
    }
    fn queried_service(template: &Self) -> Option<&str> {
        template.network_service_names.first().map(String::as_str)
    }
}

/// A service name as one key segment: `/` (and `%`, the escape) percent-encoded, so
/// that one service's index directory never contains another's.
fn segment(service: &str) -> String {
    service.replace('%', "%25").replace('/', "%2F")
}

/// What a Find reads and watches in etcd.
#[derive(Debug, Clone, PartialEq)]
enum Scope {
    /// One key: the query names the entry (`name`).
    Key { key: String, name: String },
    /// Every key under a directory (the resource's, or a service's index); the entry's
    /// name is the rest of its key.
    Dir(String),
}

impl Scope {
    /// The name of the entry at `key`, if the key is in this scope.
    fn name_of(&self, key: &[u8]) -> Option<String> {
        match self {
            Scope::Key { key: k, name } => (k.as_bytes() == key).then(|| name.clone()),
            Scope::Dir(dir) => key
                .strip_prefix(dir.as_bytes())
                .and_then(|n| std::str::from_utf8(n).ok())
                .map(str::to_string),
        }
    }
}

/// See the [module docs](self).
#[must_use]
pub struct EtcdStore<R: EtcdResource> {
    etcd: Etcd,
    policies: Option<Arc<PolicySet>>,
    _r: PhantomData<fn() -> R>,
}

impl<R: EtcdResource> Clone for EtcdStore<R> {
    fn clone(&self) -> Self {
        EtcdStore {
            etcd: self.etcd.clone(),
            policies: self.policies.clone(),
            _r: PhantomData,
        }
    }
}

impl<R: EtcdResource> fmt::Debug for EtcdStore<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("kind", &R::KIND)
            .field("prefix", &self.etcd.prefix)
            .field("owners", &self.policies.is_some())
            .finish()
    }
}

/// An entry as read: the resource, its owner and where it is in etcd's history.
struct Current<R> {
    resource: R,
    owner: Option<SpiffeId>,
    mod_revision: i64,
    lease: i64,
}

fn decode<R: EtcdResource>(kv: &KeyValue) -> Option<(R, String)> {
    let entry = EtcdEntry::decode(kv.value()).ok()?;
    let r = R::decode(entry.resource.as_slice()).ok()?;
    Some((r, entry.owner))
}

fn decode_logged<R: EtcdResource>(kv: &KeyValue) -> Option<(R, String)> {
    let out = decode::<R>(kv);
    if out.is_none() {
        warn!(kind = R::KIND, key = %Shown(&String::from_utf8_lossy(kv.key())), "etcd value is not a registry entry; skipped");
    }
    out
}

/// Whether the failed branch of a Register transaction read `value` under `lease`: the
/// write of an earlier try of the same transaction.
fn holds(resp: &etcd_client::TxnResponse, value: &[u8], lease: i64) -> bool {
    resp.op_responses().into_iter().any(|op| match op {
        etcd_client::TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == value && kv.lease() == lease),
        _ => false,
    })
}

/// Seconds of an etcd lease that lasts at least until `at` (at least 1).
fn lease_ttl(at: SystemTime, now: SystemTime) -> i64 {
    let d = at.duration_since(now).unwrap_or_default();
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Whether an etcd call failed before etcd decided anything it would not decide again:
/// a member that cannot be reached (the balanced channel tries another next) or a
/// cluster between leaders.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

/// Runs an etcd call, again while it fails transiently, for at most [`CALL_TIMEOUT`]:
/// so that a dead member costs a retry, not a failed registration. Calls must be safe
/// to repeat (reads, compare-and-swap transactions, lease grants that expire).
async fn timed<T, Fut>(what: &str, mut call: impl FnMut() -> Fut) -> Result<T>
where
    Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    let mut backoff = Duration::from_millis(20);
    loop {
        match tokio::time::timeout_at(deadline, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if transient(&e) && tokio::time::Instant::now() + backoff < deadline => {
                debug!(what, error = %e, "etcd call failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Ok(Err(e)) => return Err(unavailable(what, e)),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "etcd {what}: no answer within {CALL_TIMEOUT:?}"
                )))
            }
        }
    }
}

impl<R: EtcdResource> EtcdStore<R> {
    /// Names are owned by the identity that registered them, checked with `policies`
    /// (the [`policy::REGISTRY`](crate::security::policy::REGISTRY) list must be in the
    /// set) and the caller's mTLS identity.
    pub fn policies(mut self, policies: PolicySet) -> Self {
        self.policies = Some(Arc::new(policies));
        self
    }

    fn dir(&self) -> String {
        format!("{}{}", self.etcd.prefix, R::DIR)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{}{name}", self.etcd.prefix, R::DIR)
    }

    /// The index directory of `service`: a copy of each entry serving it.
    fn index_dir(&self, service: &str) -> String {
        format!("{}idx/ns/{}/", self.etcd.prefix, segment(service))
    }

    /// The index keys of `r`, one per service it names (each once).
    fn index_keys(&self, r: &R) -> Vec<String> {
        let mut keys: Vec<String> = r
            .services()
            .iter()
            .map(|s| format!("{}{}", self.index_dir(s), r.name()))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// What a Find of `template` reads: the entry's key when the template names it, the
    /// index of the service it names, or else the whole directory.
    fn scope(&self, template: &R) -> Scope {
        if !template.name().is_empty() {
            Scope::Key {
                key: self.key(template.name()),
                name: template.name().to_string(),
            }
        } else if let Some(service) = R::queried_service(template) {
            Scope::Dir(self.index_dir(service))
        } else {
            Scope::Dir(self.dir())
        }
    }

    async fn read(&self, key: &str) -> Result<Option<Current<R>>> {
        let kv = self.etcd.client.kv_client();
        let resp = timed("read", || {
            let mut kv = kv.clone();
            async move { kv.get(key, None).await }
        })
        .await?;
        let Some(found) = resp.kvs().first() else {
            return Ok(None);
        };
        let now = SystemTime::now();
        Ok(decode_logged::<R>(found).map(|(resource, owner)| Current {
            // An expired registration frees its name even before its lease ends.
            owner: SpiffeId::parse(&owner)
                .ok()
                .filter(|_| !resource.is_expired(now)),
            resource,
            mod_revision: found.mod_revision(),
            lease: found.lease(),
        }))
    }

    /// The compare of a compare-and-swap on `key` as `seen`.
    fn unchanged(key: &str, seen: Option<&Current<R>>) -> Compare {
        match seen {
            Some(c) => Compare::mod_revision(key, CompareOp::Equal, c.mod_revision),
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        }
    }

    async fn revoke(&self, lease: i64) {
        if lease == 0 {
            return;
        }
        let leases = self.etcd.client.lease_client();
        let revoke = || {
            let mut leases = leases.clone();
            async move { leases.revoke(lease).await }
        };
        if let Err(e) = timed("lease revoke", revoke).await {
            // It ends with its TTL anyway, and no key is attached to it any more.
            debug!(lease, error = %e, "etcd lease not revoked");
        }
    }

    async fn do_register(&self, cx: &Cx, r: R) -> Result<R> {
        if r.name().is_empty() {
            return Err(Error::invalid(format!("{} has no name", R::KIND)));
        }
        let name = r.name().to_string();
        let key = self.key(&name);
        let caller = match &self.policies {
            Some(_) => Some(caller::<R>(cx, &name)?),
            None => None,
        };
        for _ in 0..CAS_ATTEMPTS {
            let seen = self.read(&key).await?;
            // A shared definition registered as it is by another identity keeps its owner.
            let mut owner = caller.as_ref().map(|c| c.to_string()).unwrap_or_default();
            if let (Some(policies), Some(caller)) = (&self.policies, &caller) {
                let current = seen.as_ref().and_then(|c| c.owner.as_ref());
                let unchanged = seen
                    .as_ref()
                    .is_some_and(|c| r.same_definition(&c.resource));
                allowed::<R>(policies, caller, &name, current, unchanged)?;
                if let Some(other) = current.filter(|o| unchanged && *o != caller) {
                    owner = other.to_string();
                }
            }
            let now = SystemTime::now();
            let mut stored = r.clone();
            stored.prepare(seen.as_ref().map(|c| &c.resource), now);
            let lease = match stored.lapses() {
                Some(at) => {
                    let leases = self.etcd.client.lease_client();
                    let ttl = lease_ttl(at, now);
                    let grant = || {
                        let mut leases = leases.clone();
                        async move { leases.grant(ttl, None).await }
                    };
                    timed("lease grant", grant).await?.id()
                }
                None => 0,
            };
            let value = EtcdEntry {
                resource: stored.encode_to_vec(),
                owner,
            }
            .encode_to_vec();
            // The entry and its index keys in one transaction, under one lease: they
            // appear, change and expire together.
            let index = self.index_keys(&stored);
            let mut ops: Vec<TxnOp> = std::iter::once(&key)
                .chain(&index)
                .map(|k| {
                    let put = PutOptions::new().with_lease(lease);
                    TxnOp::put(k.as_str(), value.clone(), Some(put))
                })
                .collect();
            if let Some(old) = &seen {
                ops.extend(
                    self.index_keys(&old.resource)
                        .into_iter()
                        .filter(|k| !index.contains(k))
                        .map(|k| TxnOp::delete(k, None)),
                );
            }
            // On a lost race, the key as it is: a retried transaction whose first try
            // was applied finds its own value there.
            let txn = Txn::new()
                .when([Self::unchanged(&key, seen.as_ref())])
                .and_then(ops)
                .or_else([TxnOp::get(key.as_str(), None)]);
            let kv = self.etcd.client.kv_client();
            let register = || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            };
            // An unknown outcome is an error; the lease, if it holds the entry, ends
            // with its TTL, as a registration that was never refreshed.
            let resp = timed("register", register).await?;
            let done = resp.succeeded() || holds(&resp, &value, lease);
            if done {
                if let Some(old) = seen.filter(|c| c.lease != lease) {
                    self.revoke(old.lease).await;
                }
                debug!(kind = R::KIND, name = %Shown(&name), lease, "registered in etcd");
                return Ok(stored);
            }
            self.revoke(lease).await;
        }
        Err(Error::Unavailable(format!(
            "{} {}: changed by others {CAS_ATTEMPTS} times while registering",
            R::KIND,
            Shown(&name)
        )))
    }

    async fn do_unregister(&self, cx: &Cx, r: R) -> Result<()> {
        let name = r.name().to_string();
        let key = self.key(&name);
        let caller = match &self.policies {
            Some(_) if cx.ext().get::<ExpiryCleanup>().is_none() => Some(caller::<R>(cx, &name)?),
            _ => None,
        };
        for _ in 0..CAS_ATTEMPTS {
            let seen = self.read(&key).await?;
            if let (Some(policies), Some(caller)) = (&self.policies, &caller) {
                let owner = seen.as_ref().and_then(|c| c.owner.as_ref());
                allowed::<R>(policies, caller, &name, owner, false)?;
            }
            let Some(seen) = seen else {
                return Ok(());
            };
            let ops: Vec<TxnOp> = std::iter::once(key.clone())
                .chain(self.index_keys(&seen.resource))
                .map(|k| TxnOp::delete(k, None))
                .collect();
            let txn = Txn::new()
                .when([Self::unchanged(&key, Some(&seen))])
                .and_then(ops);
            let kv = self.etcd.client.kv_client();
            let unregister = || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            };
            if timed("unregister", unregister).await?.succeeded() {
                self.revoke(seen.lease).await;
                debug!(kind = R::KIND, name = %Shown(&name), "unregistered from etcd");
                return Ok(());
            }
        }
        Err(Error::Unavailable(format!(
            "{} {}: changed by others {CAS_ATTEMPTS} times while unregistering",
            R::KIND,
            Shown(&name)
        )))
    }

    /// Every current match of `template` and the revision they were read at.
    async fn list(&self, template: &R, scope: &Scope) -> Result<(Vec<R>, i64)> {
        let kv = self.etcd.client.kv_client();
        let (key, options) = match scope {
            Scope::Key { key, .. } => (key, None),
            Scope::Dir(dir) => (dir, Some(GetOptions::new().with_prefix())),
        };
        let resp = timed("find", || {
            let (mut kv, options) = (kv.clone(), options.clone());
            async move { kv.get(key.as_str(), options).await }
        })
        .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let now = SystemTime::now();
        let found = resp
            .kvs()
            .iter()
            .filter_map(decode_logged::<R>)
            .map(|(r, _)| r)
            .filter(|r| r.matches(template) && !r.is_expired(now))
            .collect();
        Ok((found, revision))
    }

    /// A watching Find that has told its client `known`, as of `revision`.
    fn follow(
        &self,
        template: R,
        scope: Scope,
        known: HashMap<String, R>,
        revision: i64,
    ) -> Follow<R> {
        Follow {
            store: self.clone(),
            template,
            scope,
            known,
            pending: VecDeque::new(),
            revision,
            watch: None,
            failing_since: None,
        }
    }
}

/// The state of a watching Find: what its client knows, what it has still to send,
/// and the watch that follows etcd from `revision + 1`.
struct Follow<R: EtcdResource> {
    store: EtcdStore<R>,
    template: R,
    /// What is watched: the same keys the first read read.
    scope: Scope,
    known: HashMap<String, R>,
    pending: VecDeque<Found<R>>,
    /// The revision everything known is as of.
    revision: i64,
    watch: Option<WatchStream>,
    /// Since when the watch has been failing (none: it works).
    failing_since: Option<tokio::time::Instant>,
}

impl<R: EtcdResource> Follow<R> {
    fn tell(&mut self, resource: R, deleted: bool) {
        if deleted {
            self.known.remove(resource.name());
        } else {
            self.known
                .insert(resource.name().to_string(), resource.clone());
        }
        self.pending.push_back(Found { resource, deleted });
    }

    /// Replaces what the client knows by the current state (a compacted revision).
    async fn relist(&mut self) -> Result<()> {
        let (current, revision) = self.store.list(&self.template, &self.scope).await?;
        let names: std::collections::HashSet<&str> = current.iter().map(|r| r.name()).collect();
        let gone: Vec<R> = self
            .known
            .values()
            .filter(|r| !names.contains(r.name()))
            .cloned()
            .collect();
        for r in gone {
            self.tell(r, true);
        }
        for r in current {
            self.tell(r, false);
        }
        self.revision = revision;
        debug!(
            kind = R::KIND,
            revision,
            items = self.pending.len(),
            "etcd watcher re-listed"
        );
        Ok(())
    }

    fn event(&mut self, kind: EventType, kv: &KeyValue, prev: Option<&KeyValue>) {
        self.revision = self.revision.max(kv.mod_revision());
        let Some(name) = self.scope.name_of(kv.key()) else {
            return;
        };
        match kind {
            EventType::Put => {
                let Some((r, _)) = decode_logged::<R>(kv) else {
                    return;
                };
                if r.matches(&self.template) {
                    self.tell(r, false);
                } else if let Some(old) = self.known.get(&name).cloned() {
                    self.tell(old, true);
                }
            }
            EventType::Delete => {
                if let Some(old) = self.known.get(&name).cloned() {
                    let last = prev.and_then(decode::<R>).map_or(old, |(r, _)| r);
                    self.tell(last, true);
                }
            }
        }
    }

    async fn open(&mut self) -> Result<WatchStream> {
        let options = WatchOptions::new()
            .with_prev_key()
            .with_start_revision(self.revision + 1);
        let (key, options) = match &self.scope {
            Scope::Key { key, .. } => (key.clone(), options),
            Scope::Dir(dir) => (dir.clone(), options.with_prefix()),
        };
        let watch = self.store.etcd.client.watch_client();
        timed("watch", || {
            let (mut watch, key, options) = (watch.clone(), key.clone(), options.clone());
            async move { watch.watch(key, Some(options)).await }
        })
        .await
    }

    /// Handles one step of the watch; Err when it broke.
    async fn step(&mut self) -> Result<()> {
        let mut watch = match self.watch.take() {
            Some(w) => w,
            None => self.open().await?,
        };
        let resp = watch
            .message()
            .await
            .map_err(|e| unavailable("watch", e))?
            .ok_or_else(|| Error::Unavailable("etcd watch ended".into()))?;
        if resp.compact_revision() > 0 {
            // The revision we follow from is gone: start again from the current state.
            debug!(
                kind = R::KIND,
                compacted = resp.compact_revision(),
                "etcd watch compacted"
            );
            self.relist().await?;
            return Ok(());
        }
        if resp.canceled() {
            return Err(Error::Unavailable(format!(
                "etcd watch cancelled: {}",
                resp.cancel_reason()
            )));
        }
        for ev in resp.events() {
            if let Some(kv) = ev.kv() {
                self.event(ev.event_type(), kv, ev.prev_kv());
            }
        }
        self.watch = Some(watch);
        Ok(())
    }

    async fn next(&mut self) -> Option<Result<Found<R>>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            match self.step().await {
                Ok(()) => self.failing_since = None,
                Err(e) => {
                    let since = *self
                        .failing_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= WATCH_RETRY {
                        warn!(kind = R::KIND, error = %e, "etcd watch lost; the Find ends");
                        // Ends the stream after this error.
                        self.failing_since = None;
                        self.revision = -1;
                        return Some(Err(e));
                    }
                    debug!(kind = R::KIND, error = %e, "etcd watch broke; re-opening");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

#[async_trait]
impl<R: EtcdResource> RegistryHandler<R> for EtcdStore<R> {
    async fn register(&self, cx: &mut Cx, r: R, _next: RegistryNext<R>) -> Result<R> {
        self.do_register(cx, r).await
    }

    async fn find(
        &self,
        _cx: &mut Cx,
        query: Query<R>,
        _next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        let scope = self.scope(&query.template);
        let (current, revision) = self.list(&query.template, &scope).await?;
        if !query.watch {
            let items = current.into_iter().map(|resource| {
                Ok(Found {
                    resource,
                    deleted: false,
                })
            });
            return Ok(Box::pin(futures::stream::iter(items)));
        }
        let mut follow = self.follow(query.template, scope, HashMap::new(), revision);
        for r in current {
            follow.tell(r, false);
        }
        Ok(into_stream(follow))
    }

    async fn unregister(&self, cx: &mut Cx, r: R, _next: RegistryNext<R>) -> Result<()> {
        self.do_unregister(cx, r).await
    }
}

/// The Find stream of `follow`; dropping it drops the watch (no task is involved).
fn into_stream<R: EtcdResource>(follow: Follow<R>) -> FindStream<R> {
    Box::pin(futures::stream::unfold(follow, |mut f| async move {
        if f.revision < 0 {
            return None;
        }
        f.next().await.map(|item| (item, f))
    }))
}

#[cfg(test)]
mod tests {
    //! What needs no etcd; the store itself is tested against real etcd members in
    //! `tests/tests/etcd_store.rs` (nsm-testkit starts them, and nsm-testkit depends on
    //! this crate).
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| pairs.get(k).cloned()
    }

    #[test]
    fn the_environment_names_endpoints_prefix_and_tls() {
        assert_eq!(EtcdConfig::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(
            EtcdConfig::from_vars(vars(&[("NSM_ETCD_ENDPOINTS", " ")])).unwrap(),
            None
        );
        let c = EtcdConfig::from_vars(vars(&[(
            "NSM_ETCD_ENDPOINTS",
            "http://a:2379, http://b:2379,",
        )]))
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoints, ["http://a:2379", "http://b:2379"]);
        assert_eq!((c.prefix.as_str(), c.tls), (DEFAULT_PREFIX, None));

        let c = EtcdConfig::from_vars(vars(&[
            ("NSM_ETCD_ENDPOINTS", "https://a:2379"),
            ("NSM_ETCD_PREFIX", "/mesh-1/"),
            ("NSM_ETCD_CA", "/ca.pem"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.prefix, "/mesh-1/");
        assert_eq!(
            c.tls,
            Some(EtcdTls {
                ca: Some("/ca.pem".into()),
                ..Default::default()
            })
        );
        let e = EtcdConfig::from_vars(vars(&[
            ("NSM_ETCD_ENDPOINTS", "https://a:2379"),
            ("NSM_ETCD_CERT", "/c.pem"),
        ]))
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_service_is_one_key_segment_and_a_scope_names_its_entries() {
        assert_eq!(segment("a/b"), "a%2Fb");
        assert_eq!(
            segment("a%2Fb"),
            "a%252Fb",
            "an escape in the name stays distinct"
        );
        assert_eq!(segment("plain"), "plain");
        let dir = Scope::Dir("/nsm/idx/ns/a%2Fb/".into());
        assert_eq!(
            dir.name_of(b"/nsm/idx/ns/a%2Fb/e/1").as_deref(),
            Some("e/1")
        );
        assert_eq!(dir.name_of(b"/nsm/idx/ns/a/e"), None);
        let key = Scope::Key {
            key: "/nsm/nse/e".into(),
            name: "e".into(),
        };
        assert_eq!(key.name_of(b"/nsm/nse/e").as_deref(), Some("e"));
        assert_eq!(key.name_of(b"/nsm/nse/e2"), None);
    }

    #[test]
    fn a_lease_lasts_at_least_until_the_expiration() {
        let now = SystemTime::now();
        assert_eq!(lease_ttl(now + Duration::from_secs(3), now), 3);
        assert_eq!(lease_ttl(now + Duration::from_millis(2100), now), 3);
        assert_eq!(lease_ttl(now, now), 1);
        assert_eq!(lease_ttl(now - Duration::from_secs(5), now), 1);
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_unavailable_within_the_time_given() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = EtcdConfig::new([format!("http://127.0.0.1:{port}")]);
        let started = std::time::Instant::now();
        let e = Etcd::connect(&config, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let e = Etcd::connect(
            &EtcdConfig::new(Vec::<String>::new()),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
