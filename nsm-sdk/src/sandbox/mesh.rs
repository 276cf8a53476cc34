//! The sandbox mesh: a registry and N nodes (a manager and forwarders each), with
//! endpoints and clients, all served over real gRPC in one process.

use crate::chains::{Security, Store};
use crate::security::dev_ca::DevCa;
use crate::security::PolicySet;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use tokio_util::sync::CancellationToken;

use super::testing::{counter, inject, Counter, Inject};
use crate::chains::{
    client, endpoint, forwarder, nsmgr, ClientOptions, Endpoint, EndpointOptions, ForwarderOptions,
    NsmgrOptions,
};
use crate::core::{Chain, Cx, Handler};
use crate::handlers::{
    connect, heal, mechanisms, noop_server, passthrough, point_to_point, vl3_client, vl3_ipam,
    Mechanisms,
};
use crate::ipam::{PrefixServer, Vl3Prefixes};
use crate::registry::{watch_reconnect, Registries, RegistryChain};
use crate::serving::Vl3Mesh;
use crate::transport::{
    grpc_registry, prefix_client, serve, Channels, PrefixClient, Server, Services, Url,
};
use crate::wire::types;
use crate::{Error, Result};

static NEXT_SANDBOX: AtomicUsize = AtomicUsize::new(0);

/// How the sandbox's components talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `inmem://` URLs: no sockets, no ports.
    Memory,
    /// `unix://` sockets in a temporary directory.
    Unix,
}

/// The forwarder mechanisms of a node: the server-side dispatcher and the client-side
/// handlers, as [`ForwarderOptions::server_mechanisms`] and
/// [`ForwarderOptions::client_mechanisms`] take them.
pub type ForwarderMechanisms = (Mechanisms, Vec<Arc<dyn Handler>>);

/// Makes the mechanisms of each forwarder the sandbox starts (or restarts), given the
/// index of its node.
#[derive(Clone)]
struct MechanismsFn(Arc<dyn Fn(usize) -> ForwarderMechanisms + Send + Sync>);

impl std::fmt::Debug for MechanismsFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MechanismsFn")
    }
}

/// The trust domain of a secure sandbox's throw-away CA.
pub const TRUST_DOMAIN: &str = "nsm.sandbox";

/// The environment switch that puts the registry of every sandbox built without
/// [`SandboxBuilder::registry_store`] on etcd: the members' client URLs,
/// comma-separated (`http://127.0.0.1:2379`). Each sandbox keeps its entries under a
/// prefix of its own, `/nsm-sandbox/<uuid>/`, so sandboxes running at once on one etcd
/// never see each other's. Set with a build of nsm-sdk without the feature `etcd`, every
/// sandbox fails to build rather than run on memory unnoticed.
pub const ETCD_ENV: &str = "NSM_SANDBOX_ETCD";

/// Builds a [`Sandbox`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SandboxBuilder {
    nodes: usize,
    forwarders: usize,
    expiry: Duration,
    transport: Transport,
    token_lifetime: Duration,
    forwarder_mechanisms: Option<MechanismsFn>,
    secure: bool,
    store: Option<Store>,
    security: Option<Security>,
    registry_url: Option<Url>,
    registry_proxy: Option<Url>,
}

impl Default for SandboxBuilder {
    fn default() -> Self {
        SandboxBuilder {
            nodes: 1,
            forwarders: 1,
            expiry: crate::chains::registry_server::DEFAULT_EXPIRY,
            transport: Transport::Memory,
            token_lifetime: crate::token::DEFAULT_TOKEN_LIFETIME,
            forwarder_mechanisms: None,
            secure: true,
            store: None,
            security: None,
            registry_url: None,
            registry_proxy: None,
        }
    }
}

impl SandboxBuilder {
    /// How many nodes (default 1).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// How many forwarders each node starts with (default 1).
    pub fn forwarders_per_node(mut self, n: usize) -> Self {
        self.forwarders = n;
        self
    }

    /// How long registrations live without a refresh (default 60 s).
    pub fn registry_expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry;
        self
    }

    /// How long the path tokens of every hop live (default 10 minutes): clients refresh
    /// before, servers close when a client stops refreshing.
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    /// Runs the whole sandbox without security (plaintext, unsigned tokens, no
    /// policies). By default it is secure: a throw-away CA (trust domain
    /// [`TRUST_DOMAIN`]) issues one SVID, `spiffe://nsm.sandbox/sandbox`, that every
    /// component of the sandbox presents (they share one channel pool, as one process
    /// does); every link is mTLS, every token signed and every policy checked.
    pub fn insecure(mut self) -> Self {
        self.secure = false;
        self
    }

    /// Keeps the registry's entries in `store`, e.g. `Store::Etcd(..)` (feature `etcd`):
    /// then the entries (and their owners) outlive [`Sandbox::kill_registry`], as
    /// they do for a registry replica restarted on etcd, and endpoints expire through
    /// etcd leases. By default the registry is in memory, or on etcd when the
    /// environment says so ([`ETCD_ENV`]).
    pub fn registry_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Runs every component with `security` instead of a throw-away CA of its own: an
    /// interdomain mesh gives each domain an identity of its own trust domain whose
    /// bundle holds the CAs of the other domains (a federation).
    pub fn security(mut self, security: Security) -> Self {
        self.secure = security.is_secure();
        self.security = Some(security);
        self
    }

    /// Serves the registry at `url` (e.g. `tcp://127.0.0.1:<port>`, for a registry that
    /// other domains find by DNS) instead of the transport's own address.
    pub fn registry_url(mut self, url: Url) -> Self {
        self.registry_url = Some(url);
        self
    }

    /// Sends the registry's entries and queries that name other domains to the
    /// registry proxy at `url` ([`RegistryServer::route_interdomain`](crate::chains::RegistryServer::route_interdomain)).
    pub fn registry_proxy(mut self, url: Url) -> Self {
        self.registry_proxy = Some(url);
        self
    }

    /// The transport (default in-memory).
    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }

    /// The mechanisms of every forwarder, made by `make(node index)` each time a
    /// forwarder starts or restarts (a restart gets fresh mechanism state, as a new
    /// process would). By default a forwarder has the forwarder chain's defaults
    /// (NOOP). A data-plane suite gives its own here, e.g. the KERNEL mechanism, or
    /// VXLAN with a tunnel in each node's namespace.
    pub fn forwarder_mechanisms(
        mut self,
        make: impl Fn(usize) -> ForwarderMechanisms + Send + Sync + 'static,
    ) -> Self {
        self.forwarder_mechanisms = Some(MechanismsFn(Arc::new(make)));
        self
    }

    /// Starts the registry, then each node's manager and forwarders.
    pub async fn build(self) -> Result<Sandbox> {
        let id = NEXT_SANDBOX.fetch_add(1, Ordering::SeqCst);
        let dir = match self.transport {
            Transport::Memory => None,
            Transport::Unix => {
                let dir =
                    std::env::temp_dir().join(format!("nsm-sandbox-{}-{id}", std::process::id()));
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
                Some(dir)
            }
        };
        let security = if let Some(security) = self.security {
            security
        } else if self.secure {
            let ca = DevCa::new(TRUST_DOMAIN)?;
            Security::with_identity(ca.identity("sandbox")?.fixed(), PolicySet::defaults()?)?
        } else {
            Security::insecure()
        };
        let store = match self.store {
            Some(store) => store,
            None => store_from_env().await?,
        };
        let shared = Arc::new(Shared {
            prefix: format!("sandbox-{}-{id}", std::process::id()),
            store,
            dir,
            channels: security.channels(),
            root: CancellationToken::new(),
            expiry: self.expiry,
            tokens: security.tokens(self.token_lifetime),
            security,
            forwarder_mechanisms: self.forwarder_mechanisms,
            registry_proxy: self.registry_proxy,
        });
        let registry_url = self.registry_url.unwrap_or_else(|| shared.url("registry"));
        let registry = Component::new();
        let sandbox = Sandbox {
            shared: shared.clone(),
            registry_url: registry_url.clone(),
            registry,
            prefix_server: Component::new(),
            nodes: (0..self.nodes)
                .map(|i| Node::new(shared.clone(), i, registry_url.clone()))
                .collect(),
        };
        sandbox.start_registry().await?;
        for node in &sandbox.nodes {
            node.start_nsmgr().await?;
            for f in 0..self.forwarders {
                node.add_forwarder(&format!("forwarder-{}-{f}", node.index), HashMap::new())
                    .await?;
            }
        }
        Ok(sandbox)
    }
}

/// The registry store [`ETCD_ENV`] asks for: memory when it is unset or empty.
async fn store_from_env() -> Result<Store> {
    let Some(endpoints) = std::env::var(ETCD_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
    else {
        return Ok(Store::Memory);
    };
    on_etcd(&endpoints).await
}

#[cfg(feature = "etcd")]
async fn on_etcd(endpoints: &str) -> Result<Store> {
    use crate::registry::{Etcd, EtcdConfig};
    let config = EtcdConfig::new(
        endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty()),
    )
    .prefix(format!("/nsm-sandbox/{}/", uuid::Uuid::new_v4()));
    let etcd = Etcd::connect(&config, Duration::from_secs(10)).await?;
    Ok(Store::Etcd(etcd))
}

#[cfg(not(feature = "etcd"))]
async fn on_etcd(_endpoints: &str) -> Result<Store> {
    Err(Error::invalid(format!(
        "{ETCD_ENV} is set but nsm-sdk was built without its etcd feature"
    )))
}

struct Shared {
    prefix: String,
    /// Where the registry keeps its entries.
    store: Store,
    dir: Option<std::path::PathBuf>,
    channels: Channels,
    root: CancellationToken,
    expiry: Duration,
    tokens: Arc<dyn crate::token::TokenGenerator>,
    security: Security,
    forwarder_mechanisms: Option<MechanismsFn>,
    /// Where the registry sends what names other domains.
    registry_proxy: Option<Url>,
}

impl Shared {
    /// Drops the shared pool's channel to a component the sandbox killed, as its peers'
    /// processes would drop their connection to it: a call sent on the old connection
    /// just as the component comes back would otherwise fail, at random.
    fn forget(&self, url: &Url) {
        self.channels.forget(url);
    }

    fn url(&self, name: &str) -> Url {
        match &self.dir {
            None => Url::Memory(format!("{}-{name}", self.prefix)),
            Some(dir) => Url::Unix(dir.join(format!("{name}.sock"))),
        }
    }
}

/// A served component that can be killed and started again on the same URL.
pub(super) struct Component {
    running: Mutex<Option<(Server, CancellationToken)>>,
}

impl Component {
    pub(super) fn new() -> Self {
        Component {
            running: Mutex::new(None),
        }
    }

    pub(super) fn set(&self, server: Server, token: CancellationToken) {
        let old = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((server, token));
        if let Some((s, t)) = old {
            s.kill();
            t.cancel();
        }
    }

    pub(super) fn kill(&self) -> bool {
        let old = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match old {
            Some((s, t)) => {
                s.kill();
                t.cancel();
                true
            }
            None => false,
        }
    }
}

/// An in-process mesh; see the [module docs](super).
pub struct Sandbox {
    shared: Arc<Shared>,
    registry_url: Url,
    registry: Component,
    prefix_server: Component,
    nodes: Vec<Node>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("registry", &self.registry_url)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Sandbox {
    /// Starts describing a sandbox.
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    /// Node `i`.
    ///
    /// # Panics
    /// When there is no such node (a mistake in the test).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// The registry's URL.
    pub fn registry_url(&self) -> &Url {
        &self.registry_url
    }

    /// The channel pool every component of the sandbox shares: a client of the
    /// sandbox must use it (or one as secure) to be let in.
    pub fn channels(&self) -> Channels {
        self.shared.channels.clone()
    }

    /// The token generator every component of the sandbox signs with.
    pub(super) fn tokens(&self) -> Arc<dyn crate::token::TokenGenerator> {
        self.shared.tokens.clone()
    }

    /// The token every component's tasks are owned under.
    pub(super) fn root(&self) -> CancellationToken {
        self.shared.root.clone()
    }

    /// Drops the pool's channel to `url` (a component the sandbox killed).
    pub(super) fn forget(&self, url: &Url) {
        self.shared.forget(url);
    }

    /// The security every component of the sandbox runs with.
    pub fn security(&self) -> &Security {
        &self.shared.security
    }

    /// A gRPC client of the central registry.
    pub fn registries(&self) -> Registries {
        registries_at(&self.shared.channels, &self.registry_url)
    }

    /// Registers (or replaces) a network service in the central registry.
    pub async fn register_service(&self, ns: NetworkService) -> Result<NetworkService> {
        self.registries().ns.register(&mut Cx::client(), ns).await
    }

    /// Starts the registry (again) on its URL: with an empty store in memory, with
    /// the entries it had on etcd.
    pub async fn start_registry(&self) -> Result<()> {
        let token = self.shared.root.child_token();
        let mut reg = self
            .shared
            .security
            .registry_server_on(self.shared.store.clone(), self.shared.expiry);
        if let Some(proxy) = &self.shared.registry_proxy {
            reg = reg.route_interdomain(registries_at(&self.shared.channels, proxy));
        }
        let server = serve(
            &self.registry_url,
            self.shared.security.serve(reg.services()),
        )
        .await?;
        self.registry.set(server, token);
        Ok(())
    }

    /// Kills the registry (a memory store is lost; entries on etcd stay, as for a
    /// replica killed).
    pub fn kill_registry(&self) {
        self.registry.kill();
        self.shared.forget(&self.registry_url);
    }

    /// The URL of the sandbox's vL3 prefix server (`IPAM.ManagePrefixes`), which the
    /// vL3 endpoints of [`Vl3Spec::new`] hold their prefixes from.
    pub fn prefix_server_url(&self) -> Url {
        self.shared.url("prefix-server")
    }

    /// Serves `server` (again) as the sandbox's vL3 prefix server, with the sandbox's
    /// security (mTLS when secure). A restarted server is a new process: pass one built
    /// on the same state file to keep what it handed out.
    pub async fn start_prefix_server(&self, server: PrefixServer) -> Result<Url> {
        let url = self.prefix_server_url();
        let served = serve(
            &url,
            self.shared.security.serve(Services::new().ipam(server)),
        )
        .await?;
        self.prefix_server
            .set(served, self.shared.root.child_token());
        Ok(url)
    }

    /// Kills the vL3 prefix server (its streams break, as when its process dies).
    pub fn kill_prefix_server(&self) {
        self.prefix_server.kill();
        self.shared.forget(&self.prefix_server_url());
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.shared.root.cancel();
        self.registry.kill();
        self.prefix_server.kill();
        for n in &self.nodes {
            n.nsmgr.kill();
            for f in n
                .forwarders
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
            {
                f.component.kill();
            }
        }
        if let Some(dir) = &self.shared.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub(super) fn registries_at(channels: &Channels, url: &Url) -> Registries {
    crate::transport::grpc_registries(channels.clone(), url.clone())
}

struct ForwarderEntry {
    component: Component,
    url: Url,
    labels: HashMap<String, String>,
    /// Counts what passes its `begin`; kept across restarts.
    counter: Counter,
    /// The registration chain (it refreshes the registration while it lives).
    front: Option<Registries>,
}

/// One node: a manager and its forwarders.
pub struct Node {
    shared: Arc<Shared>,
    index: usize,
    registry_url: Url,
    nsmgr_url: Url,
    nsmgr: Component,
    forwarders: Mutex<HashMap<String, ForwarderEntry>>,
    endpoints: Mutex<Vec<NetworkServiceEndpoint>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("index", &self.index)
            .field("nsmgr", &self.nsmgr_url)
            .finish()
    }
}

/// Options of an endpoint started by [`Node::endpoint`].
#[derive(Clone, Default)]
#[must_use]
pub struct EndpointSpec {
    name: String,
    services: Vec<String>,
    labels: HashMap<String, String>,
    prefix: Option<IpNet>,
    mechanisms: Option<Mechanisms>,
    handlers: Vec<Arc<dyn Handler>>,
    register: bool,
    serve: bool,
    vl3: Option<Vl3Spec>,
}

/// What makes a sandbox endpoint a vL3 endpoint ([`EndpointSpec::vl3`]): the
/// [`vl3_ipam`] over its prefixes instead of a fixed IPAM, the prefixes held from the
/// sandbox's prefix server (or given by the test), and the [`Vl3Mesh`] linking it to
/// the other endpoints of its service.
#[derive(Debug, Clone)]
#[must_use]
pub struct Vl3Spec {
    networks: Vec<IpNet>,
    prefixes: Vl3Prefixes,
    from_server: bool,
    mesh: bool,
}

impl Vl3Spec {
    /// A vL3 endpoint in `networks` (one per family) holding one prefix of each from
    /// the sandbox's prefix server ([`Sandbox::start_prefix_server`]), linked to the
    /// service's other vL3 endpoints.
    pub fn new(networks: Vec<IpNet>) -> Self {
        Vl3Spec {
            networks,
            prefixes: Vl3Prefixes::new(),
            from_server: true,
            mesh: true,
        }
    }

    /// Its prefixes are `prefixes`, set by the test (no prefix server).
    pub fn prefixes(mut self, prefixes: Vl3Prefixes) -> Self {
        self.prefixes = prefixes;
        self.from_server = false;
        self
    }

    /// Whether it links to the other vL3 endpoints of its service (default yes).
    pub fn mesh(mut self, yes: bool) -> Self {
        self.mesh = yes;
        self
    }
}

impl std::fmt::Debug for EndpointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSpec")
            .field("name", &self.name)
            .field("services", &self.services)
            .field("labels", &self.labels)
            .finish()
    }
}

impl EndpointSpec {
    /// An endpoint called `name` serving `service`, registered and served.
    pub fn new(name: impl Into<String>, service: impl Into<String>) -> Self {
        EndpointSpec {
            name: name.into(),
            services: vec![service.into()],
            register: true,
            serve: true,
            ..Default::default()
        }
    }

    /// Also serves `service`.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.services.push(service.into());
        self
    }

    /// A label the endpoint registers for each of its services.
    pub fn label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// Hands out point-to-point addresses from `prefix`.
    pub fn ipam(mut self, prefix: IpNet) -> Self {
        self.prefix = Some(prefix);
        self
    }

    /// The endpoint's mechanisms (default: NOOP only), e.g. KERNEL into a pod.
    pub fn mechanisms(mut self, m: Mechanisms) -> Self {
        self.mechanisms = Some(m);
        self
    }

    /// Makes it a vL3 endpoint (see [`Vl3Spec`]); its IPAM is then the vL3 one, and
    /// handlers appended with [`handler`](Self::handler) (a vL3 DNS, say) come after
    /// it.
    pub fn vl3(mut self, vl3: Vl3Spec) -> Self {
        self.vl3 = Some(vl3);
        self
    }

    /// Appends an application handler (after IPAM and the mechanism).
    pub fn handler(mut self, h: impl Handler) -> Self {
        self.handlers.push(Arc::new(h));
        self
    }

    /// Whether to register the endpoint when it starts (default yes).
    pub fn register(mut self, yes: bool) -> Self {
        self.register = yes;
        self
    }

    /// Whether to serve the endpoint when it starts (default yes).
    pub fn serve(mut self, yes: bool) -> Self {
        self.serve = yes;
        self
    }
}

/// An endpoint started in the sandbox.
pub struct EndpointHandle {
    /// Its name.
    pub name: String,
    /// Where it listens.
    pub url: Url,
    /// Counts what reaches it (after `begin`).
    pub counter: Counter,
    /// Fails requests on demand.
    pub inject: Inject,
    endpoint: Endpoint,
    registration: NetworkServiceEndpoint,
    component: Component,
    front: Registries,
    root: CancellationToken,
    vl3: Option<Vl3Parts>,
}

/// The vL3 parts of an endpoint.
struct Vl3Parts {
    prefixes: Vl3Prefixes,
    _prefix_client: Option<PrefixClient>,
    mesh: Option<(Vl3Mesh, Chain)>,
}

impl std::fmt::Debug for EndpointHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointHandle")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

impl EndpointHandle {
    /// The endpoint's chain and monitor.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Starts serving (again) on its URL, with the same chain.
    pub async fn serve(&self) -> Result<()> {
        let server = serve(&self.url, self.endpoint.services()).await?;
        self.component.set(server, CancellationToken::new());
        Ok(())
    }

    /// Registers (again) through its node's manager.
    pub async fn register(&self) -> Result<NetworkServiceEndpoint> {
        self.front
            .nse
            .register(&mut Cx::client(), self.registration.clone())
            .await
    }

    /// Unregisters through its node's manager.
    pub async fn unregister(&self) -> Result<()> {
        self.front
            .nse
            .unregister(&mut Cx::client(), self.registration.clone())
            .await
    }

    /// A vL3 endpoint's prefixes (`None` for another endpoint).
    pub fn vl3_prefixes(&self) -> Option<&Vl3Prefixes> {
        self.vl3.as_ref().map(|v| &v.prefixes)
    }

    /// A vL3 endpoint's mesh (`None` without one).
    pub fn vl3_mesh(&self) -> Option<&Vl3Mesh> {
        self.vl3
            .as_ref()
            .and_then(|v| v.mesh.as_ref())
            .map(|(m, _)| m)
    }

    /// Closes the links of a vL3 endpoint's mesh (as the endpoint does when it stops).
    pub async fn close_vl3_links(&self) {
        if let Some((mesh, client)) = self.vl3.as_ref().and_then(|v| v.mesh.as_ref()) {
            mesh.close_all(client).await;
        }
    }

    /// Kills it as a process dies: the server stops at once, open connections break,
    /// and every task of its connections ends (it cannot serve again: start a new
    /// endpoint). It stays registered until it is unregistered or expires.
    pub fn kill(&self) {
        self.component.kill();
        self.root.cancel();
    }
}

impl Drop for EndpointHandle {
    fn drop(&mut self) {
        self.component.kill();
        self.root.cancel();
    }
}

impl Node {
    fn new(shared: Arc<Shared>, index: usize, registry_url: Url) -> Self {
        let nsmgr_url = shared.url(&format!("nsmgr-{index}"));
        Node {
            shared,
            index,
            registry_url,
            nsmgr_url,
            nsmgr: Component::new(),
            forwarders: Mutex::new(HashMap::new()),
            endpoints: Mutex::new(Vec::new()),
        }
    }

    /// The node's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The manager's name (`nsmgr-<index>`).
    pub fn nsmgr_name(&self) -> String {
        format!("nsmgr-{}", self.index)
    }

    /// The manager's URL.
    pub fn nsmgr_url(&self) -> &Url {
        &self.nsmgr_url
    }

    /// The channel pool of the sandbox ([`Sandbox::channels`]).
    pub fn channels(&self) -> Channels {
        self.shared.channels.clone()
    }

    /// A gRPC client of this node's registry front (the manager).
    pub fn registries(&self) -> Registries {
        registries_at(&self.shared.channels, &self.nsmgr_url)
    }

    /// A registration chain through this node's manager that keeps what it registers
    /// alive (`registry_refresh`) until it is unregistered or dropped.
    pub fn registration_front(&self) -> Registries {
        Registries {
            ns: RegistryChain::<NetworkService>::builder()
                .push(grpc_registry(
                    self.shared.channels.clone(),
                    self.nsmgr_url.clone(),
                ))
                .build(),
            nse: RegistryChain::<NetworkServiceEndpoint>::builder()
                .push(crate::registry::registry_refresh())
                .push(grpc_registry(
                    self.shared.channels.clone(),
                    self.nsmgr_url.clone(),
                ))
                .build(),
        }
    }

    /// Starts the manager (again, with fresh state) on its URL, and registers the
    /// node's forwarders and endpoints with it again.
    pub async fn start_nsmgr(&self) -> Result<()> {
        let token = self.shared.root.child_token();
        let mgr = nsmgr(
            NsmgrOptions::new(
                self.nsmgr_name(),
                self.nsmgr_url.clone(),
                self.registry_url.clone(),
            )
            .security(&self.shared.security)
            .channels(self.shared.channels.clone())
            .tokens(self.shared.tokens.clone())
            .root(token.clone()),
        );
        let server = serve(&self.nsmgr_url, mgr.services()).await?;
        self.nsmgr.set(server, token);
        let regs: Vec<NetworkServiceEndpoint> = {
            let fwds = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
            fwds.iter()
                .map(|(name, f)| forwarder_registration(name, &f.url, &f.labels))
                .collect()
        };
        let eps = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let front = self.registries();
        for r in regs.into_iter().chain(eps) {
            front.nse.register(&mut Cx::client(), r).await?;
        }
        Ok(())
    }

    /// Kills the manager (its state is lost).
    pub fn kill_nsmgr(&self) {
        self.nsmgr.kill();
        self.shared.forget(&self.nsmgr_url);
    }

    /// Starts a forwarder called `name` with `labels` (default `p2p=true` when empty),
    /// serves it and registers it with the manager. A forwarder of the same name is
    /// replaced (a restart: the old one is killed first, its counter goes on counting).
    pub async fn add_forwarder(&self, name: &str, labels: HashMap<String, String>) -> Result<Url> {
        let url = self.shared.url(name);
        let labels = if labels.is_empty() {
            HashMap::from([("p2p".to_string(), "true".to_string())])
        } else {
            labels
        };
        // The old one must be gone before its URL can be served again.
        let counter = {
            let fwds = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
            match fwds.get(name) {
                Some(old) => {
                    if old.component.kill() {
                        self.shared.forget(&url);
                    }
                    old.counter.clone()
                }
                None => counter(),
            }
        };
        let token = self.shared.root.child_token();
        let mut opts = ForwarderOptions::new(name, self.nsmgr_url.clone())
            .security(&self.shared.security)
            .channels(self.shared.channels.clone())
            .root(token.clone())
            .tokens(self.shared.tokens.clone())
            .labels(labels.clone())
            .handler(counter.clone());
        if let Some(make) = &self.shared.forwarder_mechanisms {
            let (server_side, client_side) = (make.0)(self.index);
            opts = opts
                .server_mechanisms(server_side)
                .client_mechanisms(client_side);
        }
        let fwd = forwarder(opts);
        let server = serve(&url, fwd.services()).await?;
        let component = Component::new();
        component.set(server, token);
        let old = self
            .forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.to_string(),
                ForwarderEntry {
                    component,
                    url: url.clone(),
                    labels: labels.clone(),
                    counter,
                    front: None,
                },
            );
        if let Some(old) = old {
            old.component.kill();
        }
        let front = self.registration_front();
        front
            .nse
            .register(&mut Cx::client(), fwd.registration(&url))
            .await?;
        if let Some(f) = self
            .forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(name)
        {
            f.front = Some(front);
        }
        Ok(url)
    }

    /// What passed the `begin` of the forwarder `name` (after `monitor`), counted
    /// across its restarts; `None` when there is no such forwarder.
    pub fn forwarder_counter(&self, name: &str) -> Option<Counter> {
        let fwds = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
        fwds.get(name).map(|f| f.counter.clone())
    }

    /// Kills the forwarder `name` (it stays registered).
    pub fn kill_forwarder(&self, name: &str) -> bool {
        let fwds = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
        let killed = fwds.get(name).is_some_and(|f| f.component.kill());
        if killed {
            self.shared.forget(&self.shared.url(name));
        }
        killed
    }

    /// Starts the forwarder `name` again (fresh state, same URL and labels).
    pub async fn restart_forwarder(&self, name: &str) -> Result<Url> {
        let labels = {
            let fwds = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
            fwds.get(name)
                .map(|f| f.labels.clone())
                .ok_or_else(|| Error::not_found(format!("no forwarder {name}")))?
        };
        self.add_forwarder(name, labels).await
    }

    /// Starts an endpoint on this node.
    pub async fn endpoint(&self, spec: EndpointSpec) -> Result<EndpointHandle> {
        let url = self.shared.url(&spec.name);
        let counter = counter();
        let inject = inject();
        let root = self.shared.root.child_token();
        let mut opts = EndpointOptions::new()
            .security(&self.shared.security)
            .root(root.clone())
            .tokens(self.shared.tokens.clone())
            .handler(counter.clone())
            .handler(inject.clone());
        if let Some(p) = spec.prefix {
            opts = opts.handler(point_to_point(vec![p]));
        }
        let mut vl3 = None;
        if let Some(v) = &spec.vl3 {
            opts = opts.handler(vl3_ipam(v.prefixes.clone(), v.networks.clone()));
            let client = v.from_server.then(|| {
                prefix_client(
                    self.shared.channels.clone(),
                    self.shared.url("prefix-server"),
                    v.networks.clone(),
                    Vec::new(),
                    v.prefixes.clone(),
                    &root,
                )
            });
            vl3 = Some(Vl3Parts {
                prefixes: v.prefixes.clone(),
                _prefix_client: client,
                mesh: None,
            });
        }
        opts = opts.handler(
            spec.mechanisms
                .unwrap_or_else(|| mechanisms().with(types::NOOP, noop_server())),
        );
        for h in spec.handlers {
            opts = opts.handler_arc(h);
        }
        let ep = endpoint(spec.name.clone(), opts);
        let labels = NetworkServiceLabels {
            labels: spec.labels.clone(),
        };
        let registration = NetworkServiceEndpoint {
            name: spec.name.clone(),
            network_service_names: spec.services.clone(),
            network_service_labels: spec
                .services
                .iter()
                .map(|s| (s.clone(), labels.clone()))
                .collect(),
            url: url.to_string(),
            ..Default::default()
        };
        if let (Some(parts), Some(v)) = (vl3.as_mut(), spec.vl3.as_ref().filter(|v| v.mesh)) {
            let service = spec.services.first().cloned().unwrap_or_default();
            let mesh = Vl3Mesh::new(spec.name.clone(), service);
            let client = client(
                self.client_options(&spec.name)
                    .root(root.child_token())
                    .retry(None)
                    .handler(heal(mesh.heal_options(self.shared.channels.clone())))
                    .handler(vl3_client(v.prefixes.clone())),
            );
            mesh.start(
                client.clone(),
                RegistryChain::<NetworkServiceEndpoint>::builder()
                    .push(watch_reconnect())
                    .push(grpc_registry(
                        self.shared.channels.clone(),
                        self.nsmgr_url.clone(),
                    ))
                    .build(),
                v.prefixes.clone(),
                &root,
            );
            parts.mesh = Some((mesh, client));
        }
        let handle = EndpointHandle {
            name: spec.name.clone(),
            url,
            counter,
            inject,
            endpoint: ep,
            registration: registration.clone(),
            component: Component::new(),
            front: self.registration_front(),
            root,
            vl3,
        };
        if spec.serve {
            handle.serve().await?;
        }
        if spec.register {
            for s in &spec.services {
                self.ensure_service(s).await?;
            }
            handle.register().await?;
            self.endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(registration);
        }
        Ok(handle)
    }

    /// Registers the network service `name` (payload IP) unless it exists.
    pub async fn ensure_service(&self, name: &str) -> Result<()> {
        let front = self.registries();
        let found = front
            .ns
            .list(
                &mut Cx::client(),
                NetworkService {
                    name: name.to_string(),
                    ..Default::default()
                },
            )
            .await?;
        if found.is_empty() {
            front
                .ns
                .register(
                    &mut Cx::client(),
                    NetworkService {
                        name: name.to_string(),
                        payload: "IP".into(),
                        ..Default::default()
                    },
                )
                .await?;
        }
        Ok(())
    }

    /// Client options for a client called `name` talking to this node's manager.
    pub fn client_options(&self, name: &str) -> ClientOptions {
        ClientOptions::new(name, self.nsmgr_url.clone())
            .security(&self.shared.security)
            .channels(self.shared.channels.clone())
            .tokens(self.shared.tokens.clone())
            .root(self.shared.root.child_token())
    }

    /// A client called `name` talking to this node's manager.
    pub fn client(&self, name: &str) -> Chain {
        client(self.client_options(name))
    }

    /// A passthrough endpoint: it forwards each connection, relabelled with `labels`,
    /// to the same network service through this node's manager (a service function
    /// chain hop). Its client's path segment is named `<name>-client`.
    pub fn passthrough_spec(
        &self,
        spec: EndpointSpec,
        labels: HashMap<String, String>,
    ) -> EndpointSpec {
        let name = spec.name.clone();
        let downstream = client(self.client_options(&format!("{name}-client")).retry(None));
        spec.handler(passthrough().labels(labels))
            .handler(connect(downstream))
    }
}

fn forwarder_registration(
    name: &str,
    url: &Url,
    labels: &HashMap<String, String>,
) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: name.to_string(),
        network_service_names: vec![crate::registry::select::FORWARDER_SERVICE.to_string()],
        network_service_labels: HashMap::from([(
            crate::registry::select::FORWARDER_SERVICE.to_string(),
            NetworkServiceLabels {
                labels: labels.clone(),
            },
        )]),
        url: url.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::noop_client;
    use nsm_proto::connection::Connection;
    use nsm_proto::networkservice::NetworkServiceRequest;

    fn request(service: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                network_service: service.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn forwarders_take_the_mechanisms_made_for_their_node_at_each_start() {
        let made = Arc::new(Mutex::new(Vec::new()));
        // The forwarder's client side counts what it sends on: proof the given
        // handlers, not the defaults, are in the chain.
        let sent = counter();
        let (m, s) = (made.clone(), sent.clone());
        let mesh = Sandbox::builder()
            .nodes(2)
            .forwarder_mechanisms(move |node| {
                m.lock().unwrap().push(node);
                let client_side: Vec<Arc<dyn Handler>> =
                    vec![Arc::new(s.clone()), Arc::new(noop_client())];
                (mechanisms().with(types::NOOP, noop_server()), client_side)
            })
            .build()
            .await
            .unwrap();
        assert_eq!(*made.lock().unwrap(), [0, 1]);
        let _nse = mesh
            .node(1)
            .endpoint(EndpointSpec::new("nse", "svc"))
            .await
            .unwrap();
        let nsc = mesh.node(0).client("nsc");
        let conn = nsc
            .request(&mut Cx::client(), request("svc"))
            .await
            .unwrap();
        // Both forwarders of the remote path send on through the given client side.
        assert_eq!(sent.requests(), 2);
        nsc.close(&mut Cx::client(), conn).await.unwrap();
        mesh.node(1)
            .restart_forwarder("forwarder-1-0")
            .await
            .unwrap();
        assert_eq!(
            *made.lock().unwrap(),
            [0, 1, 1],
            "a restart makes fresh ones"
        );
    }

    #[tokio::test]
    async fn an_endpoint_without_the_spec_mechanism_refuses_the_request() {
        let mesh = Sandbox::builder().build().await.unwrap();
        // An endpoint that only knows a mechanism nobody offers: the default NOOP is
        // replaced, not added to.
        let _nse = mesh
            .node(0)
            .endpoint(
                EndpointSpec::new("nse", "svc")
                    .mechanisms(mechanisms().with("UNKNOWN", noop_server())),
            )
            .await
            .unwrap();
        let nsc = client(mesh.node(0).client_options("nsc").retry(None));
        let err = nsc
            .request(&mut Cx::client(), request("svc"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("UNKNOWN"), "{err}");
    }
}
