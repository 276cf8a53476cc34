//! Registry Find with 10,000 endpoints registered.
//!
//! The registry is `chains::registry_server` (validate, expire, memory; expiry one hour
//! so nothing expires during the run). 10,000 endpoints `nse-00000`..`nse-09999` are
//! registered through it, endpoint i serving the network service `ns-(i % 100)`, so a
//! Find by service name matches 100 endpoints and a Find by endpoint name matches 1.
//! Each Find is timed until its stream has ended (every result received).
//!
//! Two paths: `in_process` (the registry chain called directly) and `grpc_unix` (the
//! same registry served with `transport::serve` on a unix socket, called through a
//! client chain ending in `grpc_registry`, as components call it).
//!
//! Criterion gives mean/median; a plain loop of 1,000 Finds per case then prints
//! p50/p99 to stderr (`summary ...` lines). Target: p99 <= 5 ms.
//!
//! Watchers: 1,000 watching Finds (by service, 100 matches each) over the same gRPC
//! connection plus one watcher that never reads its stream; then 20 rounds of one
//! endpoint of that service re-registered with a new label. Each round times, for every
//! watcher, the moment the update reaches it, and the Register call itself (a slow
//! watcher must block nobody). Target: every watcher within 100 ms p99.
//!
//! Run: `cargo bench -p nsm-sdk --bench registry -- --warm-up-time 1 --measurement-time 3`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use futures::StreamExt;
use nsm_sdk::chains::registry_server;
use nsm_sdk::proto::registry::{NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::registry::{Query, RegistryChain};
use nsm_sdk::transport::{grpc_registry, serve, Channels, Server, Url};
use nsm_sdk::Cx;
use tokio::runtime::{Builder, Runtime};

const ENDPOINTS: usize = 10_000;
const SERVICES: usize = 100;
const SAMPLES: usize = 1_000;

fn nse(i: usize) -> NetworkServiceEndpoint {
    let ns = format!("ns-{}", i % SERVICES);
    NetworkServiceEndpoint {
        name: format!("nse-{i:05}"),
        network_service_names: vec![ns.clone()],
        network_service_labels: HashMap::from([(
            ns,
            NetworkServiceLabels {
                labels: HashMap::from([("app".to_string(), format!("app-{}", i % 7))]),
            },
        )]),
        url: format!("tcp://10.0.{}.{}:5001", i / 250, i % 250),
        ..Default::default()
    }
}

fn by_service() -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        network_service_names: vec!["ns-42".to_string()],
        ..Default::default()
    }
}

fn by_name() -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: "nse-04242".to_string(),
        ..Default::default()
    }
}

/// One Find, to the end of its stream; returns how many endpoints came.
async fn find(
    chain: &RegistryChain<NetworkServiceEndpoint>,
    template: NetworkServiceEndpoint,
) -> usize {
    let mut cx = Cx::client().with_timeout(Duration::from_secs(10));
    let mut stream = chain
        .find(
            &mut cx,
            Query {
                template,
                watch: false,
            },
        )
        .await
        .expect("find");
    let mut n = 0;
    while let Some(item) = stream.next().await {
        item.expect("find item");
        n += 1;
    }
    n
}

struct Setup {
    rt: Runtime,
    in_process: RegistryChain<NetworkServiceEndpoint>,
    grpc: RegistryChain<NetworkServiceEndpoint>,
    _server: Server,
    dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let rt = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("nsm-bench-registry-{}", std::process::id()));
    let (in_process, grpc, server) = rt.block_on(async {
        let reg = registry_server(Duration::from_secs(3600));
        let chain = reg.registries().nse.clone();
        let t = Instant::now();
        for i in 0..ENDPOINTS {
            chain
                .register(&mut Cx::server(), nse(i))
                .await
                .expect("register");
        }
        eprintln!(
            "setup: registered {ENDPOINTS} endpoints in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let url: Url = format!("unix://{}/registry.sock", dir.display())
            .parse()
            .unwrap();
        let server = serve(&url, reg.services()).await.expect("serve");
        let grpc = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(Channels::new(), server.url().clone()))
            .build();
        (chain, grpc, server)
    });
    // Correctness before timing.
    rt.block_on(async {
        for chain in [&in_process, &grpc] {
            assert_eq!(find(chain, by_service()).await, ENDPOINTS / SERVICES);
            assert_eq!(find(chain, by_name()).await, 1);
        }
    });
    Setup {
        rt,
        in_process,
        grpc,
        _server: server,
        dir,
    }
}

/// A case: its name, the chain to call, the Find template.
type Case<'a> = (
    &'static str,
    &'a RegistryChain<NetworkServiceEndpoint>,
    fn() -> NetworkServiceEndpoint,
);

fn cases(s: &Setup) -> [Case<'_>; 4] {
    [
        ("in_process/by_service_100", &s.in_process, by_service),
        ("in_process/by_name_1", &s.in_process, by_name),
        ("grpc_unix/by_service_100", &s.grpc, by_service),
        ("grpc_unix/by_name_1", &s.grpc, by_name),
    ]
}

fn bench_find(c: &mut Criterion, s: &Setup) {
    let mut g = c.benchmark_group("registry/find_10k");
    for (name, chain, template) in cases(s) {
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(&s.rt).iter(|| find(chain, template()))
        });
    }
    g.finish();
}

fn summary(s: &Setup) {
    eprintln!("summary loadavg before: {}", loadavg());
    for (name, chain, template) in cases(s) {
        let mut samples = s.rt.block_on(async {
            for _ in 0..100 {
                find(chain, template()).await;
            }
            let mut samples = Vec::with_capacity(SAMPLES);
            for _ in 0..SAMPLES {
                let t = Instant::now();
                find(chain, template()).await;
                samples.push(t.elapsed());
            }
            samples
        });
        samples.sort();
        let n = samples.len();
        let mean = samples.iter().sum::<Duration>() / n as u32;
        let p50 = samples[n / 2];
        let p99 = samples[(n * 99).div_ceil(100) - 1];
        let max = samples[n - 1];
        eprintln!(
            "summary registry/find_10k/{name}: {n} Finds, mean {:.1} us, p50 {:.1} us, p99 {:.1} us, max {:.1} us; target p99 <= 5 ms: {}",
            us(mean),
            us(p50),
            us(p99),
            us(max),
            if p99 <= Duration::from_millis(5) { "met" } else { "NOT met" }
        );
    }
}

const WATCHERS: usize = 1_000;
const ROUNDS: usize = 20;

/// The watchers case; see the module docs.
fn watchers(s: &Setup) {
    let (lat, regs) = s.rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
        let watch = |chain: RegistryChain<NetworkServiceEndpoint>| async move {
            chain
                .find(
                    &mut Cx::client(),
                    Query {
                        template: by_service(),
                        watch: true,
                    },
                )
                .await
                .expect("watch")
        };
        // The slow one: opened, never read.
        let _slow = watch(s.grpc.clone()).await;
        let mut tasks = Vec::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..WATCHERS {
            let mut stream = watch(s.grpc.clone()).await;
            let (tx, ready) = (tx.clone(), ready_tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut initial = 0;
                while let Some(item) = stream.next().await {
                    let found = item.expect("watch item");
                    let round = found
                        .resource
                        .network_service_labels
                        .values()
                        .find_map(|l| l.labels.get("round"))
                        .and_then(|r| r.parse::<usize>().ok());
                    match round {
                        Some(r) => {
                            let _ = tx.send((r, Instant::now()));
                        }
                        None => {
                            initial += 1;
                            if initial == ENDPOINTS / SERVICES {
                                let _ = ready.send(());
                            }
                        }
                    }
                }
            }));
        }
        for _ in 0..WATCHERS {
            ready_rx
                .recv()
                .await
                .expect("every watcher got its initial state");
        }
        let mut lat = Vec::with_capacity(WATCHERS * ROUNDS);
        let mut regs = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            let mut update = nse(42);
            for l in update.network_service_labels.values_mut() {
                l.labels.insert("round".into(), round.to_string());
            }
            let t0 = Instant::now();
            s.in_process
                .register(&mut Cx::server(), update)
                .await
                .expect("register");
            regs.push(t0.elapsed());
            let mut got = 0;
            while got < WATCHERS {
                let (r, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("every watcher gets the update within 10 s")
                    .expect("watchers alive");
                if r == round {
                    lat.push(at - t0);
                    got += 1;
                }
            }
        }
        for t in tasks {
            t.abort();
        }
        (lat, regs)
    });
    let stats = |mut v: Vec<Duration>| {
        v.sort();
        let n = v.len();
        (v[n / 2], v[(n * 99).div_ceil(100) - 1], v[n - 1])
    };
    let (p50, p99, max) = stats(lat);
    let (r50, r99, rmax) = stats(regs);
    eprintln!(
        "summary registry/watchers: {WATCHERS} watchers (+1 never reading) x {ROUNDS} updates: delivery p50 {:.1} us, p99 {:.1} us, max {:.1} us; Register p50 {:.1} us, p99 {:.1} us, max {:.1} us; target p99 <= 100 ms: {}",
        us(p50),
        us(p99),
        us(max),
        us(r50),
        us(r99),
        us(rmax),
        if p99 <= Duration::from_millis(100) { "met" } else { "NOT met" }
    );
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1_000.0
}

fn benches() {
    let s = setup();
    let mut c = Criterion::default().configure_from_args();
    bench_find(&mut c, &s);
    c.final_summary();
    summary(&s);
    watchers(&s);
    let Setup {
        rt, _server, dir, ..
    } = s;
    drop(_server);
    drop(rt);
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    benches();
}

/// The machine's load average (`/proc/loadavg`), printed with the results: the machine
/// may be shared.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}
