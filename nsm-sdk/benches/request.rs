//! A full local Request + Close through a mesh of the assembled chains, in one process.
//!
//! The mesh: `registry_server`, `nsmgr`, `forwarder` (NOOP), an `endpoint` with
//! `point_to_point` IPAM and `mechanisms().with(NOOP, noop_server())`, and a `client`
//! (no retry), each served with `transport::serve` (the client is not served). The
//! forwarder and the endpoint register through the nsmgr's registry front, and the
//! network service is registered there too. A Request from the client goes
//! nsc -> nsmgr -> forwarder -> nse (the 4-segment local path) over gRPC, with the
//! registry lookups of `discover_forwarder` and `discover` on the way; Close goes the
//! same way.
//!
//! Two transports: (i) `inmem://` URLs, (ii) unix sockets in a temp dir; each on two
//! runtimes for the whole mesh: two worker threads (`multi_thread_2`, the main
//! figure) and `current_thread`. One mesh runs at a time.
//! `NSM_BENCH_FILTER=unix/multi` runs only the configurations whose name contains it.
//!
//! Criterion gives mean/median of Request+Close; a plain loop of 1,000 Request+Close
//! per transport then prints p50/p99 to stderr (`summary ...` lines).
//! Target: p50 <= 1 ms over unix sockets.
//!
//! Run: `cargo bench -p nsm-sdk --bench request -- --warm-up-time 1 --measurement-time 3`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use nsm_sdk::chains::{
    client, endpoint, forwarder, nsmgr, registry_server, ClientOptions, EndpointOptions,
    ForwarderOptions, NsmgrOptions,
};
use nsm_sdk::handlers::{mechanisms, noop_server, point_to_point};
use nsm_sdk::proto::connection::{Connection, State};
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::proto::registry::{NetworkService, NetworkServiceEndpoint};
use nsm_sdk::transport::{serve, Server, Url};
use nsm_sdk::wire::types;
use nsm_sdk::{Chain, Cx};
use tokio::runtime::{Builder, Runtime};

const SERVICE: &str = "bench-ns";
const SAMPLES: usize = 1_000;

/// A running mesh: its servers (dropping them kills them) and the client chain.
struct Mesh {
    client: Chain,
    _servers: Vec<Server>,
}

fn cx() -> Cx {
    Cx::client().with_timeout(Duration::from_secs(10))
}

/// Builds and serves the mesh; `url(name)` gives each component's listen URL.
async fn mesh(url: impl Fn(&str) -> Url) -> nsm_sdk::Result<Mesh> {
    let mut servers = Vec::new();

    let registry = registry_server(Duration::from_secs(3600));
    let registry_srv = serve(&url("registry"), registry.services()).await?;
    let registry_url = registry_srv.url().clone();
    servers.push(registry_srv);

    let nsmgr_url = url("nsmgr");
    let mgr = nsmgr(NsmgrOptions::new("nsmgr", nsmgr_url.clone(), registry_url));
    servers.push(serve(&nsmgr_url, mgr.services()).await?);

    let fwd_url = url("forwarder");
    let fwd = forwarder(ForwarderOptions::new("forwarder", nsmgr_url.clone()));
    servers.push(serve(&fwd_url, fwd.services()).await?);

    let nse_url = url("nse");
    let nse = endpoint(
        "nse",
        EndpointOptions::new()
            .handler(point_to_point(vec!["10.0.0.0/16".parse().unwrap()]))
            .handler(mechanisms().with(types::NOOP, noop_server())),
    );
    servers.push(serve(&nse_url, nse.services()).await?);

    let regs = mgr.registries();
    regs.ns
        .register(
            &mut cx(),
            NetworkService {
                name: SERVICE.to_string(),
                ..Default::default()
            },
        )
        .await?;
    regs.nse
        .register(&mut cx(), fwd.registration(&fwd_url))
        .await?;
    regs.nse
        .register(
            &mut cx(),
            NetworkServiceEndpoint {
                name: "nse".to_string(),
                network_service_names: vec![SERVICE.to_string()],
                url: nse_url.to_string(),
                ..Default::default()
            },
        )
        .await?;

    let client = client(ClientOptions::new("nsc", nsmgr_url).retry(None));
    Ok(Mesh {
        client,
        _servers: servers,
    })
}

fn request() -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: SERVICE.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One Request + Close of a fresh connection; returns the connection the Request got.
async fn request_close(client: &Chain) -> nsm_sdk::Result<Connection> {
    let conn = client.request(&mut cx(), request()).await?;
    client.close(&mut cx(), conn.clone()).await?;
    Ok(conn)
}

/// The runtime the whole mesh runs on: `multi_thread_2` (two workers, as many as the
/// machine's cores) or `current_thread` (no cross-thread wake-ups between hops).
fn runtime(kind: &str) -> Runtime {
    match kind {
        "current_thread" => Builder::new_current_thread().enable_all().build().unwrap(),
        _ => Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    }
}

/// Builds the mesh and checks one Request: 4-segment path, NOOP, addresses. `None` (after
/// printing the error) when the mesh cannot serve a Request.
fn start(rt: &Runtime, name: &str, url: impl Fn(&str) -> Url) -> Option<Mesh> {
    let mesh = match rt.block_on(mesh(url)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ERROR {name}: building the mesh failed: {e} ({e:?})");
            return None;
        }
    };
    match rt.block_on(request_close(&mesh.client)) {
        Ok(conn) => {
            let names: Vec<_> = conn
                .path
                .as_ref()
                .map(|p| p.path_segments.iter().map(|s| s.name.as_str()).collect())
                .unwrap_or_default();
            let ip = conn
                .context
                .as_ref()
                .and_then(|c| c.ip_context.as_ref())
                .map(|ip| (ip.src_ip_addrs.clone(), ip.dst_ip_addrs.clone()));
            eprintln!(
                "check {name}: path {names:?}, mechanism {:?}, state {:?}, addresses {ip:?}",
                conn.mechanism.as_ref().map(|m| m.r#type.as_str()),
                State::try_from(conn.state).ok()
            );
            assert_eq!(names, ["nsc", "nsmgr", "forwarder", "nse"], "{conn:?}");
            Some(mesh)
        }
        Err(e) => {
            eprintln!("ERROR {name}: Request+Close failed: {e} ({e:?})");
            None
        }
    }
}

fn summary(rt: &Runtime, name: &str, mesh: &Mesh, target_p50: Option<Duration>) {
    eprintln!("summary loadavg before: {}", loadavg());
    type Samples = (Vec<Duration>, Vec<Duration>, Vec<Duration>);
    let result: nsm_sdk::Result<Samples> = rt.block_on(async {
        for _ in 0..100 {
            request_close(&mesh.client).await?;
        }
        let (mut both, mut requests, mut closes) = (Vec::new(), Vec::new(), Vec::new());
        let cpu0 = cpu_time();
        let wall0 = Instant::now();
        for _ in 0..SAMPLES {
            let t = Instant::now();
            let conn = mesh.client.request(&mut cx(), request()).await?;
            let r = t.elapsed();
            mesh.client.close(&mut cx(), conn).await?;
            let rc = t.elapsed();
            both.push(rc);
            requests.push(r);
            closes.push(rc - r);
        }
        let wall = wall0.elapsed();
        if let (Some((u0, s0)), Some((u1, s1))) = (cpu0, cpu_time()) {
            eprintln!(
                "summary request/local_4_hops/{name}: process CPU time per Request+Close \
                 (all threads): user {:.1} us + system {:.1} us; wall {:.1} us",
                us(u1 - u0) / SAMPLES as f64,
                us(s1 - s0) / SAMPLES as f64,
                us(wall) / SAMPLES as f64
            );
        }
        // What the mesh burns when nothing happens.
        let idle0 = cpu_time();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let (Some((u0, s0)), Some((u1, s1))) = (idle0, cpu_time()) {
            eprintln!(
                "summary request/local_4_hops/{name}: idle mesh CPU over 1 s: {:.0} ms",
                (us(u1 - u0) + us(s1 - s0)) / 1000.0
            );
        }
        Ok((both, requests, closes))
    });
    let (mut both, mut requests, mut closes) = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ERROR {name}: Request+Close failed during the timing loop: {e} ({e:?})");
            return;
        }
    };
    let (n, mean, p50, p99, max) = stats(&mut both);
    let verdict = match target_p50 {
        Some(t) if p50 <= t => format!("; target p50 <= {} ms: met", t.as_millis()),
        Some(t) => format!("; target p50 <= {} ms: NOT met", t.as_millis()),
        None => String::new(),
    };
    eprintln!(
        "summary request/local_4_hops/{name}: {n} Request+Close, mean {:.1} us, p50 {:.1} us, p99 {:.1} us, max {:.1} us{verdict}",
        us(mean),
        us(p50),
        us(p99),
        us(max),
    );
    for (what, samples) in [("Request", &mut requests), ("Close", &mut closes)] {
        let (_, mean, p50, p99, _) = stats(samples);
        eprintln!(
            "summary request/local_4_hops/{name}: {what} alone: mean {:.1} us, p50 {:.1} us, p99 {:.1} us",
            us(mean),
            us(p50),
            us(p99),
        );
    }
}

/// Count, mean, p50, p99 and max of `samples` (sorted in place).
fn stats(samples: &mut [Duration]) -> (usize, Duration, Duration, Duration, Duration) {
    samples.sort();
    let n = samples.len();
    let mean = samples.iter().sum::<Duration>() / n as u32;
    (
        n,
        mean,
        samples[n / 2],
        samples[(n * 99).div_ceil(100) - 1],
        samples[n - 1],
    )
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1_000.0
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let pid = std::process::id();
    let dir: PathBuf = std::env::temp_dir().join(format!("nsm-bench-request-{pid}"));
    // NSM_BENCH_FILTER=unix (say) runs only the configurations whose name contains it.
    let filter = std::env::var("NSM_BENCH_FILTER").unwrap_or_default();
    for rt_kind in ["multi_thread_2", "current_thread"] {
        for transport in ["unix", "inmem"] {
            let name = format!("{transport}/{rt_kind}");
            if !name.contains(&filter) {
                continue;
            }
            let url = |n: &str| -> Url {
                match transport {
                    "unix" => format!("unix://{}/{rt_kind}/{n}.sock", dir.display()),
                    _ => format!("inmem://bench-{pid}-{rt_kind}-{n}"),
                }
                .parse()
                .unwrap()
            };
            let target = (transport == "unix").then_some(Duration::from_millis(1));
            let rt = runtime(rt_kind);
            let Some(mesh) = start(&rt, &name, url) else {
                continue;
            };
            c.benchmark_group("request/local_4_hops").bench_function(
                BenchmarkId::new("request_close", &name),
                |b| {
                    b.to_async(&rt).iter(|| async {
                        request_close(&mesh.client).await.expect("request+close")
                    })
                },
            );
            summary(&rt, &name, &mesh, target);
            // One mesh at a time; its servers go before their runtime.
            let guard = rt.enter();
            drop(mesh);
            drop(guard);
            drop(rt);
        }
    }
    c.final_summary();
    let _ = std::fs::remove_dir_all(dir);
}

/// CPU time of this process so far, all threads, as (user, system), from
/// `/proc/self/stat` (clock ticks, 100 per second as on Linux by default).
fn cpu_time() -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (in parentheses): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Option<Duration> {
        Some(Duration::from_millis(
            fields.get(i)?.parse::<u64>().ok()? * 10,
        ))
    };
    Some((tick(11)?, tick(12)?))
}

/// The machine's load average (`/proc/loadavg`), printed with the results: the machine
/// may be shared.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}
