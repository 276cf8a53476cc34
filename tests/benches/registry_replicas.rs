//! The registry on etcd against the memory store, as processes (issue 15's Performance
//! section): `nsm-registry` replicas over mTLS on unix sockets, this bench their client.
//!
//! For each store (`NSM_BENCH_STORES`, default `etcd,memory`), with
//! `NSM_BENCH_ENDPOINTS` endpoints (default 10,000) registered through replica A, in
//! services of `NSM_BENCH_PER_SERVICE` endpoints each (default 10), it prints on stderr:
//!
//! * `populate`: how long registering them all took (32 Registers in flight);
//! * `register`: one Register at a time of a new endpoint through A (`NSM_BENCH_SAMPLES`
//!   / 2 of them);
//! * `find`: a Find of one service (a different one each time) through replica B, the
//!   registry's answer read whole (`NSM_BENCH_SAMPLES`, default 1,000), and one Find of
//!   everything;
//! * `watch`: from sending a Register of a new endpoint through A to a watching Find of
//!   its service on B seeing it (`NSM_BENCH_SAMPLES` / 5). Memory replicas share
//!   nothing, so on memory both are replica A (the number is the store's own cost);
//! * `rss`: the resident memory of each replica (`VmRSS`) holding them, and of the etcd
//!   member;
//! * `failover` (etcd only; memory replicas share nothing to fail over to): a manager
//!   given both URLs, with a forwarder and an endpoint; its replica SIGSTOPped, then
//!   (A woken) the other SIGKILLed: how long after each a new client's Request succeeds
//!   (the manager's find cache usually answers its lookups) and how long a Find through
//!   the manager that its cache cannot answer takes (the registry client's failover:
//!   about the try timeout, 500 ms, for a hung replica).
//!
//! Targets: find p99 <= 5 ms, watch p99 <= 100 ms, failover <= 1 s.
//!
//! The programs are the example binaries next to this bench's executable, built with
//! etcd: build them first with the same profile. Dev profile, small N (a check that it
//! runs):
//!
//! ```text
//! cargo build -p nsm-examples --features etcd --bins
//! NSM_BENCH_ENDPOINTS=1000 NSM_BENCH_SAMPLES=200 \
//!   cargo bench --profile dev -p nsm-tests --features etcd --bench registry_replicas
//! ```
//!
//! The numbers (release):
//!
//! ```text
//! cargo build --release -p nsm-examples --features etcd --bins
//! cargo bench -p nsm-tests --features etcd --bench registry_replicas
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::chains::{client as client_chain, ClientOptions, Security};
use nsm_sdk::registry::{Query, RegistryChain};
use nsm_sdk::security::PolicySet;
use nsm_sdk::transport::{grpc_registry, RegistryUrls};
use nsm_sdk::{Chain, Cx};
use nsm_testkit::bench::{ms, Stats};
use nsm_testkit::etcd::EtcdCluster;
use nsm_tests::{start, Proc, TempDir};

const READY: Duration = Duration::from_secs(30);
const IN_FLIGHT: usize = 32;
const SERVICE: &str = "icmp-responder";

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cx() -> Cx {
    Cx::client().with_timeout(Duration::from_secs(10))
}

/// A registry replica on `etcd` (memory when `None`); endpoints stay an hour.
fn replica(dir: &TempDir, name: &str, etcd: Option<&str>) -> (Proc, String) {
    let url = dir.unix(&format!("{name}.sock"));
    let mut env = vec![("NSM_LISTEN_ON", url.as_str()), ("NSM_EXPIRE_AFTER", "1h")];
    if let Some(etcd) = etcd {
        env.push(("NSM_ETCD_ENDPOINTS", etcd));
    }
    let mut p = start(dir, "nsm-registry", name, &env, false, READY);
    if etcd.is_some() {
        // A binary built without etcd refuses NSM_ETCD_ENDPOINTS: this line never comes.
        p.wait_for_log(&["registry on etcd"]);
    }
    p.wait_for_log(&["serving", &url]);
    (p, url)
}

/// A registry client of `url` as `spiffe://nsm.test/<who>`.
fn client(dir: &TempDir, who: &str, url: &str) -> RegistryChain<NetworkServiceEndpoint> {
    let identity = dir.ca().identity(who).expect("an SVID").fixed();
    let security = Security::with_identity(identity, PolicySet::defaults().expect("policies"))
        .expect("security");
    let url: RegistryUrls = url.parse().expect("a registry URL");
    RegistryChain::builder()
        .push(grpc_registry::<NetworkServiceEndpoint>(
            security.channels(),
            url,
        ))
        .build()
}

fn nse(name: String, service: String) -> NetworkServiceEndpoint {
    let labels: BTreeMap<String, String> = [("app", "bench"), ("zone", "z1")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    NetworkServiceEndpoint {
        url: format!("tcp://10.0.{}.1:5000", name.len()),
        network_service_labels: [(
            service.clone(),
            NetworkServiceLabels {
                labels: labels.into_iter().collect(),
            },
        )]
        .into(),
        network_service_names: vec![service],
        name,
        ..Default::default()
    }
}

fn by_service(service: String) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        network_service_names: vec![service],
        ..Default::default()
    }
}

/// The resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn bench_store(store: &str, n: usize, per_service: usize, samples: usize) {
    let etcd = match store {
        "etcd" => Some(EtcdCluster::start(1).await),
        _ => None,
    };
    let etcd_env = etcd.as_ref().map(EtcdCluster::endpoints_env);
    let dir = TempDir::new("bench", &format!("registry-{store}"));
    let (a, a_url) = replica(&dir, "registry-a", etcd_env.as_deref());
    let (b, b_url) = match &etcd_env {
        Some(e) => {
            let (b, url) = replica(&dir, "registry-b", Some(e));
            (Some(b), url)
        }
        None => (None, a_url.clone()),
    };
    let through_a = client(&dir, "bench", &a_url);
    let through_b = client(&dir, "bench-reader", &b_url);
    let services = n.div_ceil(per_service);

    let started = Instant::now();
    let errors: Vec<String> = futures::stream::iter(0..n)
        .map(|i| {
            let reg = through_a.clone();
            async move {
                reg.register(
                    &mut cx(),
                    nse(format!("nse-{i}"), format!("svc-{}", i / per_service)),
                )
                .await
                .err()
                .map(|e| e.to_string())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter_map(std::future::ready)
        .collect()
        .await;
    let took = started.elapsed();
    eprintln!(
        "{store} populate: {n} endpoints in {services} services, {:.1} s ({:.0}/s, {IN_FLIGHT} in flight), {} failed{}",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        errors.len(),
        errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
    );

    let mut register = Vec::new();
    for i in 0..(samples / 2).max(1) {
        let e = nse(format!("extra-{i}"), format!("svc-{}", i % services));
        let t = Instant::now();
        through_a.register(&mut cx(), e).await.expect("a Register");
        register.push(t.elapsed());
    }
    eprintln!(
        "{store} register (through A): {}",
        Stats::of(&register).line()
    );

    let mut find = Vec::new();
    let mut found = 0;
    for i in 0..samples {
        let service = format!("svc-{}", (i * 7919) % services);
        let t = Instant::now();
        let items = through_b
            .list(&mut cx(), by_service(service))
            .await
            .expect("a Find");
        find.push(t.elapsed());
        found += items.len();
    }
    let t = Instant::now();
    let all = through_b
        .list(&mut cx(), NetworkServiceEndpoint::default())
        .await
        .expect("a Find of everything");
    let all_took = t.elapsed();
    eprintln!(
        "{store} find one service (through {}): {} ({:.1} endpoints each); everything: {} endpoints in {:.1} ms",
        if b.is_some() { "B" } else { "A" },
        Stats::of(&find).line(),
        found as f64 / samples.max(1) as f64,
        all.len(),
        ms(all_took)
    );

    let mut watch = through_b
        .find(
            &mut Cx::client(),
            Query {
                template: by_service("watched".into()),
                watch: true,
            },
        )
        .await
        .expect("a watching Find");
    let mut seen = Vec::new();
    for i in 0..(samples / 5).max(1) {
        let name = format!("watched-{i}");
        let t = Instant::now();
        through_a
            .register(&mut cx(), nse(name.clone(), "watched".into()))
            .await
            .expect("a Register");
        loop {
            let item = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("the watch sees it within 5 s")
                .expect("the watch is open")
                .expect("no error");
            if item.resource.name == name {
                seen.push(t.elapsed());
                break;
            }
        }
    }
    eprintln!(
        "{store} watch (Register sent through A -> seen by a watch on {}): {}",
        if b.is_some() { "B" } else { "A" },
        Stats::of(&seen).line()
    );
    drop(watch);

    let mut rss = format!("A {:.1} MiB", rss_mib(a.pid()));
    if let Some(b) = &b {
        rss.push_str(&format!(", B {:.1} MiB", rss_mib(b.pid())));
    }
    if let Some(pid) = etcd.as_ref().and_then(|e| e.pid(0)) {
        rss.push_str(&format!(" (the etcd member {:.1} MiB)", rss_mib(pid)));
    }
    eprintln!(
        "{store} rss (replicas holding {} endpoints): {rss}",
        all.len()
    );

    if let Some(b) = b {
        failover(&dir, a, b, &a_url, &b_url).await;
    }
}

/// A client (NOOP mechanism) of the manager at `url` as `spiffe://nsm.test/<who>`.
fn nsc(dir: &TempDir, who: &str, url: &str) -> Chain {
    let identity = dir.ca().identity(who).expect("an SVID").fixed();
    let security = Security::with_identity(identity, PolicySet::defaults().expect("policies"))
        .expect("security");
    client_chain(
        ClientOptions::new(who, url.parse().expect("the manager's URL"))
            .security(&security)
            .tokens(security.tokens(Duration::from_secs(60))),
    )
}

fn request() -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: SERVICE.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How long after `fail` a new client of the manager connects (tries again until it
/// does, for at most 10 s), and how long a Find through the manager's registry front
/// of an endpoint it has not looked up before (its find cache cannot answer: the call
/// goes to a replica) takes.
async fn after_failure(dir: &TempDir, who: &str, mgr_url: &str, fail: impl FnOnce()) -> String {
    let client = nsc(dir, who, mgr_url);
    let front = self::client(dir, &format!("{who}-finder"), mgr_url);
    fail();
    let t = Instant::now();
    let connect = async {
        let mut tries = 0;
        while t.elapsed() < Duration::from_secs(10) {
            tries += 1;
            let mut cx = Cx::client().with_timeout(Duration::from_secs(2));
            if let Ok(conn) = client.request(&mut cx, request()).await {
                let took = t.elapsed();
                let _ = client.close(&mut self::cx(), conn).await;
                return format!("{:.1} ms ({tries} tries)", ms(took));
            }
        }
        format!("none within 10 s ({tries} tries)")
    };
    let find = async {
        let template = NetworkServiceEndpoint {
            name: format!("never-asked-{who}"),
            ..Default::default()
        };
        let out = front.list(&mut self::cx(), template).await;
        let took = t.elapsed();
        match out {
            Ok(_) => format!("{:.1} ms", ms(took)),
            Err(e) => format!("failed after {:.1} ms: {e}", ms(took)),
        }
    };
    let (connect, find) = tokio::join!(connect, find);
    format!(
        "a new client connected after {connect}; an uncached Find through the manager took {find}"
    )
}

async fn failover(dir: &TempDir, a: Proc, mut b: Proc, a_url: &str, b_url: &str) {
    let both = format!("{a_url},{b_url}");
    let mgr_url = dir.unix("nsmgr.sock");
    let mut mgr = start(
        dir,
        "nsmgr",
        "nsmgr",
        &[
            ("NSM_NAME", "nsmgr"),
            ("NSM_LISTEN_ON", &mgr_url),
            ("NSM_REGISTRY_URL", &both),
        ],
        false,
        READY,
    );
    mgr.wait_for_log(&["serving", &mgr_url]);
    let mut fwd = start(
        dir,
        "nsm-forwarder",
        "forwarder",
        &[
            ("NSM_NAME", "forwarder"),
            ("NSM_LISTEN_ON", &dir.unix("fwd.sock")),
            ("NSM_CONNECT_TO", &mgr_url),
        ],
        false,
        READY,
    );
    fwd.wait_for_log(&["registered endpoint", "name=forwarder"]);
    let mut endpoint = start(
        dir,
        "nse-icmp-responder",
        "nse",
        &[
            ("NSM_NAME", "nse"),
            ("NSM_LISTEN_ON", &dir.unix("nse.sock")),
            ("NSM_CONNECT_TO", &mgr_url),
            ("NSM_SERVICE_NAMES", SERVICE),
            ("NSM_CIDR_PREFIX", "172.16.1.0/24"),
        ],
        false,
        READY,
    );
    endpoint.wait_for_log(&["registered endpoint", "name=nse"]);
    let first = nsc(dir, "nsc-0", &mgr_url);
    first
        .request(&mut cx(), request())
        .await
        .expect("a first client connects");

    let stopped = after_failure(dir, "nsc-1", &mgr_url, || a.signal("STOP")).await;
    eprintln!("etcd failover (the manager's replica SIGSTOPped): {stopped}");
    a.signal("CONT");
    // The manager is on B now: B is its replica.
    let killed = after_failure(dir, "nsc-2", &mgr_url, || b.kill9()).await;
    eprintln!("etcd failover (the manager's replica SIGKILLed): {killed}");
    drop(a);
}

fn main() -> ExitCode {
    let n = setting("NSM_BENCH_ENDPOINTS", 10_000);
    let per_service = setting("NSM_BENCH_PER_SERVICE", 10).max(1);
    let samples = setting("NSM_BENCH_SAMPLES", 1_000).max(5);
    let stores = std::env::var("NSM_BENCH_STORES").unwrap_or_else(|_| "etcd,memory".into());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "registry_replicas: {n} endpoints, {per_service} per service, {samples} samples, machine: {}",
        nsm_testkit::bench::machine()
    );
    for store in stores.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        runtime.block_on(bench_store(store, n, per_service, samples));
    }
    ExitCode::SUCCESS
}
