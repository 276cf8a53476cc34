//! The mesh under load: a sandbox, the example programs as child processes, or a
//! running mesh; and the client chain the connections share.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nsm_sdk::chains::{client, ClientOptions, Security};
use nsm_sdk::handlers::{heal, HealEvent, HealOptions};
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox};
use nsm_sdk::security::dev_ca::{DevCa, SvidFiles};
use nsm_sdk::security::PolicySet;
use nsm_sdk::security::{FileSource, Svid};
use nsm_sdk::transport::Tls;
use nsm_sdk::transport::{Channels, Url};
use nsm_sdk::Chain;
use tokio::time::Instant;
use tracing::info;

use super::children::{Children, Spec};
use super::count_requests::{CountRequests, Counts};
use super::namespaces::Namespaces;
use super::options::{LoadMechanism, LoadOptions, Target};
use crate::metrics::scrape;
use crate::process::Failure;

/// The mesh under load, and the processes to sample.
pub(super) struct Mesh {
    pub(super) client: Chain,
    pub(super) metrics: Vec<(String, Url)>,
    /// Sample this process too (it is the whole mesh in sandbox mode).
    pub(super) sample_self: bool,
    pub(super) _sandbox: Option<(Sandbox, EndpointHandle)>,
    pub(super) children: Children,
    /// The namespaces of KERNEL clients: the URL of each (warm-up first), and the guard
    /// that deletes them (after the children are gone: fields drop in order).
    pub(super) netns_urls: Vec<String>,
    pub(super) _namespaces: Option<Namespaces>,
    /// The identity files of the started programs and the client (secure processes
    /// only), for rotation.
    pub(super) identities: Option<Identities>,
}

/// The identity files nsm-load wrote for the programs it started and for itself, and
/// the CA that issued them.
pub(super) struct Identities {
    ca: DevCa,
    dir: PathBuf,
    /// The names with files: every program, then the client.
    names: Vec<String>,
    /// The manager's URL and files, whose served certificate
    /// [`Identities::serves_newest`] checks.
    nsmgr: (Url, SvidFiles),
    /// The client's TLS, for that check.
    tls: Tls,
}

impl Identities {
    /// Rewrites every identity file with a new SVID (new key, same SPIFFE ID), each set
    /// atomically file by file as a rotating agent does.
    pub(super) fn rotate(&self) -> Result<(), Failure> {
        for name in &self.names {
            self.ca
                .write_identity(&self.dir, name)
                .map_err(|e| Failure::runtime(format!("cannot rotate {name}'s SVID: {e}")))?;
        }
        Ok(())
    }

    /// Whether a new handshake with the manager gets the certificate now in its file.
    pub(super) async fn serves_newest(&self) -> Result<bool, Failure> {
        let (url, files) = &self.nsmgr;
        let newest = Svid::load(&files.cert, &files.key)
            .map_err(|e| Failure::runtime(format!("cannot read the manager's SVID: {e}")))?;
        let (_, served) = Channels::new()
            .tls(self.tls.clone())
            .connected(url)
            .await
            .map_err(|e| Failure::runtime(format!("cannot reach the manager: {e}")))?;
        Ok(served.is_some_and(|p| *p.leaf == *newest.leaf()))
    }
}

/// The trust domain of the throw-away CA of the programs nsm-load starts.
const TRUST_DOMAIN: &str = "nsm.load";

pub(super) fn client_options(
    opts: &LoadOptions,
    connect_to: Url,
    security: &Security,
    counts: &Arc<Counts>,
) -> ClientOptions {
    let channels = security.channels();
    with_handlers(
        ClientOptions::new(&opts.name, connect_to)
            .security(security)
            .channels(channels.clone())
            .tokens(security.tokens(opts.token_lifetime)),
        opts,
        channels,
        counts,
    )
}

pub(super) fn with_handlers(
    base: ClientOptions,
    opts: &LoadOptions,
    channels: Channels,
    counts: &Arc<Counts>,
) -> ClientOptions {
    let mut o = base
        .retry(Some(opts.request_timeout))
        .timeout(opts.request_timeout);
    if opts.mechanism == LoadMechanism::Kernel {
        // Each request carries its client's KERNEL preference (see `request`).
        o = o.mechanisms(Vec::new());
    }
    if opts.heal {
        let c = counts.clone();
        let mut h = HealOptions::new(channels);
        if !opts.heal_wake_up {
            h = h.no_wake_up();
        }
        o = o.handler(heal(h.observer(move |e, id| {
            let n = match e {
                HealEvent::Broken => {
                    c.heals.broken(id);
                    &c.heal_broken
                }
                HealEvent::Healed => {
                    c.heals.healed(id);
                    &c.heal_healed
                }
                _ => return,
            };
            n.fetch_add(1, Ordering::Relaxed);
        })));
    }
    o.handler(CountRequests(counts.clone()))
}

pub(super) async fn start_mesh(opts: &LoadOptions, counts: &Arc<Counts>) -> Result<Mesh, Failure> {
    let kernel = opts.mechanism == LoadMechanism::Kernel;
    if kernel && matches!(opts.target, Target::Sandbox(_)) {
        return Err(Failure::config(
            "the sandbox has no KERNEL data plane: use --processes or --connect-to",
        ));
    }
    // One namespace per client, one for the warm-up, one for a spawned endpoint.
    let namespaces = if kernel {
        // Blocks this thread for a moment before anything else runs.
        Some(Namespaces::create(opts.clients + 2)?)
    } else {
        None
    };
    let netns_urls = namespaces
        .as_ref()
        .map(|ns| (0..=opts.clients).map(|n| ns.url(n)).collect())
        .unwrap_or_default();
    let nse_netns = namespaces
        .as_ref()
        .map(|ns| ns.names[opts.clients + 1].clone());
    let mut mesh = start_mesh_in(opts, counts, nse_netns).await?;
    mesh.netns_urls = netns_urls;
    mesh._namespaces = namespaces;
    Ok(mesh)
}

pub(super) async fn start_mesh_in(
    opts: &LoadOptions,
    counts: &Arc<Counts>,
    nse_netns: Option<String>,
) -> Result<Mesh, Failure> {
    let mut metrics = opts.metrics.clone();
    match &opts.target {
        Target::Connect(url) => Ok(Mesh {
            client: client(client_options(opts, url.clone(), &opts.security, counts)),
            metrics,
            sample_self: true,
            _sandbox: None,
            children: Children::none(),
            netns_urls: Vec::new(),
            _namespaces: None,
            identities: None,
        }),
        Target::Sandbox(transport) => {
            let mesh = Sandbox::builder()
                .nodes(1)
                .transport(*transport)
                .token_lifetime(opts.token_lifetime)
                .build()
                .await
                .map_err(|e| Failure::runtime(format!("cannot start the sandbox: {e}")))?;
            let prefix = "10.0.0.0/8"
                .parse()
                .map_err(|_| Failure::config("prefix"))?;
            let nse = mesh
                .node(0)
                .endpoint(EndpointSpec::new("nse", &opts.network_service).ipam(prefix))
                .await
                .map_err(|e| Failure::runtime(format!("cannot start the endpoint: {e}")))?;
            let base = mesh.node(0).client_options(&opts.name);
            let client = client(with_handlers(base, opts, mesh.channels(), counts));
            Ok(Mesh {
                client,
                metrics,
                sample_self: true,
                _sandbox: Some((mesh, nse)),
                children: Children::none(),
                netns_urls: Vec::new(),
                _namespaces: None,
                identities: None,
            })
        }
        Target::Processes(bin_dir) => {
            let (children, nsmgr, spawned, security, identities) =
                spawn_mesh(opts, bin_dir, nse_netns).await?;
            metrics.extend(spawned);
            Ok(Mesh {
                client: client(client_options(opts, nsmgr, &security, counts)),
                metrics,
                sample_self: true,
                _sandbox: None,
                children,
                netns_urls: Vec::new(),
                _namespaces: None,
                identities,
            })
        }
    }
}

/// Starts registry, nsmgr, forwarder and icmp responder on unix sockets in a new
/// temporary directory, each with its metrics endpoint and (unless `opts.insecure`) an
/// SVID of its own from a throw-away CA; returns them, the manager's URL, the metrics
/// endpoints and the client's security (an SVID from the same CA).
pub(super) async fn spawn_mesh(
    opts: &LoadOptions,
    bin_dir: &Path,
    nse_netns: Option<String>,
) -> Result<
    (
        Children,
        Url,
        Vec<(String, Url)>,
        Security,
        Option<Identities>,
    ),
    Failure,
> {
    let dir = std::env::temp_dir().join(format!("nsm-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::runtime(format!("cannot create {}: {e}", dir.display())))?;
    let mut children = Children {
        procs: Vec::new(),
        specs: Default::default(),
        dir: Some(dir.clone()),
        keep: opts.keep_dir,
    };
    let sock = |name: &str| format!("unix://{}", dir.join(name).display());
    let (reg, nsmgr) = (sock("registry.sock"), sock("nsmgr.sock"));
    let mut metrics = Vec::new();
    let ca = if opts.insecure {
        None
    } else {
        Some(DevCa::new(TRUST_DOMAIN).map_err(|e| Failure::runtime(e.to_string()))?)
    };
    let mut written: Vec<(String, SvidFiles)> = Vec::new();
    // Each program's security: its own SVID, or plaintext said explicitly.
    let mut security_env = |name: &str| -> Result<Vec<(&'static str, String)>, Failure> {
        match &ca {
            None => Ok(vec![("NSM_INSECURE", "true".to_string())]),
            Some(ca) => {
                let files = ca
                    .write_identity(&dir, name)
                    .map_err(|e| Failure::runtime(e.to_string()))?;
                let env = files.env().to_vec();
                written.push((name.to_string(), files));
                Ok(env)
            }
        }
    };
    // (program, name, settings)
    type Program<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);
    let programs: [Program<'_>; 4] = [
        (
            "nsm-registry",
            "registry",
            vec![("NSM_LISTEN_ON", reg.clone())],
        ),
        (
            "nsmgr",
            "nsmgr",
            vec![
                ("NSM_LISTEN_ON", nsmgr.clone()),
                ("NSM_REGISTRY_URL", reg.clone()),
            ],
        ),
        (
            "nsm-forwarder",
            "forwarder",
            vec![
                ("NSM_LISTEN_ON", sock("forwarder.sock")),
                ("NSM_CONNECT_TO", nsmgr.clone()),
            ],
        ),
        (
            "nse-icmp-responder",
            "nse",
            vec![
                ("NSM_LISTEN_ON", sock("nse.sock")),
                ("NSM_CONNECT_TO", nsmgr.clone()),
                ("NSM_SERVICE_NAMES", opts.network_service.clone()),
                // Room for 2 addresses per connection.
                ("NSM_CIDR_PREFIX", "172.20.0.0/14".to_string()),
            ],
        ),
    ];
    for (program, name, env) in programs {
        let exe = bin_dir.join(program);
        let log = std::fs::File::create(dir.join(format!("{name}.log")))
            .map_err(|e| Failure::runtime(format!("cannot create a log file: {e}")))?;
        let metrics_sock = dir.join(format!("{name}.metrics.sock"));
        // The endpoint serves no metrics.
        let serves_metrics = name != "nse";
        let mut spec_env: Vec<(String, String)> = vec![
            ("NSM_NAME".into(), name.into()),
            ("NSM_LOG_LEVEL".into(), opts.mesh_log_level.clone()),
        ];
        for (k, v) in security_env(name)?.into_iter().chain(env) {
            spec_env.push((k.to_string(), v));
        }
        if let Some(n) = opts.mesh_worker_threads {
            spec_env.push(("NSM_WORKER_THREADS".into(), n.to_string()));
        }
        if serves_metrics {
            spec_env.push((
                "NSM_METRICS_LISTEN_ON".into(),
                metrics_sock.display().to_string(),
            ));
        }
        let spec = Spec {
            exe,
            // The endpoint's ends of the veth pairs go into its own namespace.
            netns: nse_netns.clone().filter(|_| name == "nse"),
            env: spec_env,
        };
        let child = spec.spawn(log)?;
        children.specs.insert(name.to_string(), spec);
        children.procs.push((name.to_string(), child));
        if serves_metrics {
            let url = Url::Unix(metrics_sock);
            wait_until(Duration::from_secs(20), || async {
                scrape(&url).await.is_ok()
            })
            .await
            .map_err(|()| Failure::runtime(format!("{program} did not start (log: {name}.log)")))?;
            metrics.push((name.to_string(), url));
        }
        // Each program needs the one before it (its registry or manager) serving; the
        // warm-up request waits for the forwarder and the endpoint to register.
        if name == "registry" || name == "nsmgr" {
            let listen = if name == "registry" { &reg } else { &nsmgr };
            let path = PathBuf::from(listen.trim_start_matches("unix://"));
            wait_until(Duration::from_secs(20), || {
                let ready = path.exists();
                async move { ready }
            })
            .await
            .map_err(|()| Failure::runtime(format!("{program} does not listen")))?;
        }
    }
    info!(dir = %dir.display(), "mesh processes started");
    let nsmgr = nsmgr
        .parse()
        .map_err(|e| Failure::runtime(format!("{e}")))?;
    let Some(ca) = ca else {
        return Ok((children, nsmgr, metrics, Security::insecure(), None));
    };
    // The client's identity is a file set too, watched, so it rotates with the rest.
    let runtime = |e: &dyn std::fmt::Display| Failure::runtime(e.to_string());
    let own = ca
        .write_identity(&dir, &opts.name)
        .map_err(|e| runtime(&e))?;
    let source = FileSource::start(&own.cert, &own.key, &own.ca).map_err(|e| runtime(&e))?;
    let policies = PolicySet::defaults().map_err(|e| runtime(&e))?;
    let security = Security::watching(source, policies).map_err(|e| runtime(&e))?;
    written.push((opts.name.clone(), own));
    let nsmgr_files = written
        .iter()
        .find(|(n, _)| n == "nsmgr")
        .map(|(_, f)| f.clone())
        .ok_or_else(|| Failure::runtime("the manager has no identity files"))?;
    let tls = security
        .tls()
        .cloned()
        .ok_or_else(|| Failure::runtime("a secure client without TLS"))?;
    let identities = Identities {
        ca,
        dir: dir.clone(),
        names: written.into_iter().map(|(n, _)| n).collect(),
        nsmgr: (nsmgr.clone(), nsmgr_files),
        tls,
    };
    Ok((children, nsmgr, metrics, security, Some(identities)))
}

pub(super) async fn wait_until<F, Fut>(within: Duration, mut ready: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + within;
    while !ready().await {
        if Instant::now() > until {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
