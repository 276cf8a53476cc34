//! Refresh load: 1,000 connections with 60 s tokens through one manager, kept for
//! 70 s. Prints how the refreshes spread over time (refreshes per second, as seen by
//! the endpoint) and the process CPU per refresh.
//!
//! `cargo bench -p nsm-sdk --features sandbox --bench refresh_load`
//! (`NSM_BENCH_CONNECTIONS` and `NSM_BENCH_SECONDS` change the defaults 1000 and 70.)

use std::time::Duration;

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::sandbox::{EndpointSpec, Sandbox};
use nsm_sdk::Cx;

fn cpu_ticks() -> u64 {
    // utime + stime of this process, in clock ticks (fields 14 and 15 of /proc/self/stat).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = env("NSM_BENCH_CONNECTIONS", 1000) as usize;
    let seconds = env("NSM_BENCH_SECONDS", 70);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mesh = Sandbox::builder()
            .nodes(1)
            .token_lifetime(Duration::from_secs(60))
            .build()
            .await
            .unwrap();
        let nse = mesh
            .node(0)
            .endpoint(EndpointSpec::new("nse", "svc").ipam("10.0.0.0/16".parse().unwrap()))
            .await
            .unwrap();
        let nsc = mesh.node(0).client("nsc");
        let started = tokio::time::Instant::now();
        let mut conns = Vec::with_capacity(n);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let nsc = nsc.clone();
            tasks.spawn(async move {
                let req = NetworkServiceRequest {
                    connection: Some(Connection {
                        network_service: "svc".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                nsc.request(&mut Cx::client(), req).await
            });
        }
        while let Some(r) = tasks.join_next().await {
            conns.push(r.unwrap().unwrap());
        }
        eprintln!(
            "summary refresh_load: {n} connections set up in {:?}",
            started.elapsed()
        );
        let base = nse.counter.requests();
        let cpu0 = cpu_ticks();
        let mut per_second = Vec::new();
        let mut last = base;
        for _ in 0..seconds {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = nse.counter.requests();
            per_second.push(now - last);
            last = now;
        }
        let cpu = cpu_ticks() - cpu0;
        let refreshes = last - base;
        let busy = per_second.iter().filter(|&&c| c > 0).count();
        let max = per_second.iter().copied().max().unwrap_or(0);
        eprintln!("summary refresh_load: refreshes per second over {seconds} s: {per_second:?}");
        eprintln!(
            "summary refresh_load: {refreshes} refreshes, {busy} seconds with refreshes, max {max}/s (a storm would put all {n} in one or two seconds); CPU {:.0} us per refresh (whole mesh, all threads), {} closes",
            cpu as f64 * 10_000.0 / refreshes.max(1) as f64,
            nse.counter.closes()
        );
        for c in conns {
            let _ = nsc.close(&mut Cx::client(), c).await;
        }
    });
}
