//! The cost of the chain core.
//!
//! - `chain/passthrough/N`: a Request through a chain of N handlers that only pass it on
//!   (N = 1, 10, 50), to the end of the chain. The cost of one handler is the slope
//!   (t(50) - t(1)) / 49, printed at the end as `ns per handler`.
//! - `chain/update_path_begin/*`: Request + Close of a fresh connection id through
//!   `update_path` + `begin` (what every hop runs first), on a current-thread and on a
//!   two-worker runtime; `chain/update_path/request_close` is `update_path` alone, so
//!   the difference is what `begin` costs (it runs each operation in a spawned task).
//!
//! Run: `cargo bench -p nsm-sdk --bench chain -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{criterion_group, BenchmarkId, Criterion};
use nsm_sdk::handlers::{begin, update_path};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::{Chain, Cx, Handler};
use tokio::runtime::{Builder, Runtime};

/// A handler that passes every call on (the trait's defaults).
struct Pass;

#[async_trait]
impl Handler for Pass {}

fn passthrough_chain(n: usize) -> Chain {
    (0..n).fold(Chain::builder(), |b, _| b.push(Pass)).build()
}

fn request() -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            id: "bench".to_string(),
            network_service: "ns".to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Request with no id and no path: `update_path` gives it a fresh id.
fn fresh_request() -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: "ns".to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn current_thread() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

fn multi_thread() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn request_close(chain: &Chain) {
    let conn = chain
        .request(&mut Cx::server(), fresh_request())
        .await
        .expect("request");
    chain.close(&mut Cx::server(), conn).await.expect("close");
}

fn bench_passthrough(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("chain/passthrough");
    for n in [1usize, 10, 50] {
        let chain = passthrough_chain(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &chain, |b, chain| {
            b.to_async(&rt).iter(|| async {
                let mut cx = Cx::server();
                black_box(chain.request(&mut cx, request()).await.unwrap())
            })
        });
    }
    g.finish();
}

fn bench_begin(c: &mut Criterion) {
    let mut g = c.benchmark_group("chain/update_path_begin");
    for (name, rt) in [
        ("current_thread", current_thread()),
        ("multi_thread_2", multi_thread()),
    ] {
        // `begin` spawns: build the chain inside the runtime it runs on.
        let chain = rt.block_on(async {
            Chain::builder()
                .push(update_path("bench"))
                .push(begin())
                .build()
        });
        g.bench_function(BenchmarkId::new("request_close", name), |b| {
            b.to_async(&rt).iter(|| request_close(&chain))
        });
    }
    g.finish();

    let rt = current_thread();
    let chain = Chain::builder().push(update_path("bench")).build();
    c.bench_function("chain/update_path/request_close", |b| {
        b.to_async(&rt).iter(|| request_close(&chain))
    });
}

/// Plain timing loop: mean ns of one Request through N pass-through handlers, and the
/// slope per handler, printed to stderr.
fn summary() {
    eprintln!("summary loadavg before: {}", loadavg());
    let rt = current_thread();
    let iters = 200_000u32;
    let mut means = Vec::new();
    for n in [1usize, 10, 50] {
        let chain = passthrough_chain(n);
        let mean = rt.block_on(async {
            for _ in 0..10_000 {
                black_box(chain.request(&mut Cx::server(), request()).await.unwrap());
            }
            let start = Instant::now();
            for _ in 0..iters {
                black_box(chain.request(&mut Cx::server(), request()).await.unwrap());
            }
            start.elapsed().as_nanos() as f64 / f64::from(iters)
        });
        eprintln!("summary chain/passthrough/{n}: {mean:.1} ns per Request");
        means.push((n, mean));
    }
    let (n1, t1) = means[0];
    let (n50, t50) = means[2];
    eprintln!(
        "summary chain/passthrough: {:.2} ns per handler (slope (t50 - t1) / {})",
        (t50 - t1) / (n50 - n1) as f64,
        n50 - n1
    );

    for (name, rt) in [
        ("current_thread", current_thread()),
        ("multi_thread_2", multi_thread()),
    ] {
        let chain = rt.block_on(async {
            Chain::builder()
                .push(update_path("bench"))
                .push(begin())
                .build()
        });
        let (mean, p50, p99) = rt.block_on(async {
            for _ in 0..1_000 {
                request_close(&chain).await;
            }
            let mut samples = Vec::with_capacity(20_000);
            for _ in 0..20_000 {
                let t = Instant::now();
                request_close(&chain).await;
                samples.push(t.elapsed());
            }
            stats(&mut samples)
        });
        eprintln!(
            "summary chain/update_path_begin/{name}: Request+Close mean {:.2} us, p50 {:.2} us, p99 {:.2} us",
            us(mean),
            us(p50),
            us(p99)
        );
    }
}

/// A minimal boxed-future chain (`async_trait`, one `Arc<dyn _>` per level, the payload
/// moved by value like a request), to tell what a level costs by itself and with a
/// payload as large as a `NetworkServiceRequest`.
#[async_trait]
trait Step<P: Send + 'static>: Send + Sync {
    async fn call(&self, p: P, rest: &[std::sync::Arc<dyn Step<P>>]) -> P;
}

struct PassStep;

#[async_trait]
impl<P: Send + 'static> Step<P> for PassStep {
    async fn call(&self, p: P, rest: &[std::sync::Arc<dyn Step<P>>]) -> P {
        match rest.split_first() {
            Some((h, rest)) => h.call(p, rest).await,
            None => p,
        }
    }
}

const REQUEST_SIZE: usize = std::mem::size_of::<NetworkServiceRequest>();

fn step_slope<P: Send + 'static>(rt: &Runtime, make: impl Fn() -> P) -> f64 {
    let iters = 200_000u32;
    let mut t = Vec::new();
    for n in [1usize, 50] {
        let steps: Vec<std::sync::Arc<dyn Step<P>>> = (0..n)
            .map(|_| std::sync::Arc::new(PassStep) as std::sync::Arc<dyn Step<P>>)
            .collect();
        t.push(rt.block_on(async {
            for _ in 0..10_000 {
                black_box(steps[0].call(make(), &steps[1..]).await);
            }
            let start = Instant::now();
            for _ in 0..iters {
                black_box(steps[0].call(make(), &steps[1..]).await);
            }
            start.elapsed().as_nanos() as f64 / f64::from(iters)
        }));
    }
    (t[1] - t[0]) / 49.0
}

fn baseline() {
    let rt = current_thread();
    eprintln!(
        "summary sizes: NetworkServiceRequest {} bytes, Connection {} bytes, Cx {} bytes",
        REQUEST_SIZE,
        std::mem::size_of::<Connection>(),
        std::mem::size_of::<Cx>()
    );
    eprintln!(
        "summary baseline boxed-future level, 8-byte payload: {:.2} ns per level",
        step_slope(&rt, || 0u64)
    );
    eprintln!(
        "summary baseline boxed-future level, {REQUEST_SIZE}-byte payload: {:.2} ns per level",
        step_slope(&rt, || [0u8; REQUEST_SIZE])
    );
}

fn stats(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort();
    let n = samples.len();
    let mean = samples.iter().sum::<Duration>() / n as u32;
    (mean, samples[n / 2], samples[(n * 99).div_ceil(100) - 1])
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1_000.0
}

criterion_group!(benches, bench_passthrough, bench_begin);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
    baseline();
}

/// The machine's load average (`/proc/loadavg`), printed with the results: the machine
/// may be shared.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}
