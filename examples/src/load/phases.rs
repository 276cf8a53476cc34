//! The run: warm-up, setup, soak and close ([`run_load`]), with the processes sampled
//! at each stage.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::wire::params;
use nsm_sdk::Cx;
use nsm_sdk_kernel::mechanism::kernel_mechanism;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::count_requests::{Counts, PHASE_CLOSE, PHASE_DONE, PHASE_SETUP, PHASE_SOAK};
use super::histogram::Latency;
use super::mesh::{start_mesh, wait_until, Mesh};
use super::options::{options_json, LoadOptions};
use super::pings;
use super::progress::Progress;
use super::report::{merge, Pings, Report, Restart};
use crate::metrics::{sample, scrape};
use crate::process::Failure;

/// How long after the last rotation the manager's served certificate is checked: the
/// programs poll their identity files every 500 ms.
const ROTATION_SETTLE: Duration = Duration::from_millis(1500);

/// The request of client `n` (0 is the warm-up's).
pub(super) fn request(opts: &LoadOptions, mesh: &Mesh, n: usize) -> NetworkServiceRequest {
    let mechanism_preferences = match mesh.netns_urls.get(n) {
        Some(netns) => {
            let mut kernel = kernel_mechanism();
            kernel
                .parameters
                .insert(params::NAME.into(), KERNEL_IFNAME.into());
            kernel
                .parameters
                .insert(params::INODE_URL.into(), netns.clone());
            vec![kernel]
        }
        None => Vec::new(),
    };
    NetworkServiceRequest {
        connection: Some(Connection {
            id: uuid::Uuid::new_v4().to_string(),
            network_service: opts.network_service.clone(),
            labels: opts.labels.clone(),
            ..Default::default()
        }),
        mechanism_preferences,
    }
}

/// The started forwarder's name (`--kill-forwarder-after` restarts it).
const FORWARDER: &str = "forwarder";

/// The interface each KERNEL client gets in its namespace.
pub(super) const KERNEL_IFNAME: &str = "nsm-1";

pub(super) fn code_name(e: &nsm_sdk::Error) -> String {
    format!("{:?}", e.code())
}

/// Samples every process at `stage`.
pub(super) async fn sample_all(mesh: &Mesh, report: &mut Report, stage: &str) {
    report.stages.push(stage.to_string());
    let scrapes = mesh.metrics.iter().map(|(name, url)| async move {
        match scrape(url).await {
            Ok(m) => Some((name.clone(), m)),
            Err(e) => {
                warn!(process = %name, error = %e, "no metrics");
                None
            }
        }
    });
    for (name, m) in futures::future::join_all(scrapes)
        .await
        .into_iter()
        .flatten()
    {
        report
            .processes
            .entry(name)
            .or_default()
            .insert(stage.to_string(), m);
    }
    if mesh.sample_self {
        let own = crate::metrics::parse_text(&crate::metrics::render(&sample()));
        report
            .processes
            .entry("nsm-load".to_string())
            .or_default()
            .insert(stage.to_string(), own);
    }
}

/// Runs the load; `stop` cuts the soak short (everything is still closed).
pub async fn run_load(opts: LoadOptions, stop: CancellationToken) -> Result<Report, Failure> {
    let counts = Arc::new(Counts::default());
    let mut report = Report {
        options: options_json(&opts),
        ..Default::default()
    };
    let mut mesh = start_mesh(&opts, &counts).await?;
    sample_all(&mesh, &mut report, "idle").await;

    let progress = opts
        .progress
        .then(|| Progress::start(counts.clone(), &opts));
    let outcome = phases(&opts, &mut mesh, &counts, &mut report, &stop).await;
    counts.phase.store(PHASE_DONE, Ordering::Relaxed);
    if let Some(p) = progress {
        p.stop().await;
    }
    report.shutdown = mesh.children.stop().await;
    outcome?;
    drop(mesh);
    Ok(report)
}

pub(super) async fn phases(
    opts: &LoadOptions,
    mesh: &mut Mesh,
    counts: &Arc<Counts>,
    report: &mut Report,
    stop: &CancellationToken,
) -> Result<(), Failure> {
    let chain = &mesh.client;
    let timeout = opts.request_timeout;
    // Warm-up: the mesh is ready (retry waits for the endpoint's registration) and the
    // channel is up.
    let started = Instant::now();
    let warm = async {
        let conn = chain
            .request(
                &mut Cx::client().with_timeout(timeout),
                request(opts, mesh, 0),
            )
            .await?;
        chain
            .close(&mut Cx::client().with_timeout(timeout), conn)
            .await
    };
    match tokio::select! { r = warm => Some(r), _ = stop.cancelled() => None } {
        Some(Ok(())) => report.warmup_ms = Some(started.elapsed().as_secs_f64() * 1e3),
        Some(Err(e)) => return Err(Failure::runtime(format!("the warm-up request failed: {e}"))),
        None => return Err(Failure::runtime("stopped during the warm-up")),
    }
    sample_all(mesh, report, "start").await;

    // Setup.
    counts.phase.store(PHASE_SETUP, Ordering::Relaxed);
    let started = Instant::now();
    let results: Vec<(usize, Duration, nsm_sdk::Result<Connection>)> =
        stream::iter((1..=opts.clients).map(|n| {
            let req = request(opts, mesh, n);
            let counts = counts.clone();
            async move {
                let t = Instant::now();
                let r = chain
                    .request(&mut Cx::client().with_timeout(timeout), req)
                    .await;
                counts.setup_done.fetch_add(1, Ordering::Relaxed);
                if r.is_err() {
                    counts.setup_failed.fetch_add(1, Ordering::Relaxed);
                }
                (n, t.elapsed(), r)
            }
        }))
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
    report.setup.seconds = started.elapsed().as_secs_f64();
    let mut conns = Vec::with_capacity(results.len());
    // The KERNEL connections with their clients' namespaces, for pings.
    let mut kernel_conns = Vec::new();
    let mut latency = Vec::with_capacity(results.len());
    for (n, d, r) in results {
        latency.push(d);
        match r {
            Ok(c) => {
                if let Some(url) = mesh.netns_urls.get(n) {
                    kernel_conns.push((c.clone(), url.clone()));
                }
                conns.push(c)
            }
            Err(e) => *report.setup.errors.entry(code_name(&e)).or_default() += 1,
        }
    }
    report.setup.ok = conns.len() as u64;
    report.setup.latency = Latency::of(&latency);
    merge(&mut report.other_refresh_errors, counts.take().errors);
    sample_all(mesh, report, "after_setup").await;

    // Soak.
    counts.phase.store(PHASE_SOAK, Ordering::Relaxed);
    let (broken0, healed0) = (
        counts.heal_broken.load(Ordering::Relaxed),
        counts.heal_healed.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    let end = started + opts.duration;
    let rotation = match (opts.rotate_every, &mesh.identities) {
        (Some(every), Some(ids)) => Some((every, ids)),
        (Some(_), None) => {
            return Err(Failure::config(
                "--rotate-every needs programs started by nsm-load with identities",
            ))
        }
        _ => None,
    };
    let mut next_sample = opts.sample_every.map(|every| started + every);
    let mut next_rotation = rotation.map(|(every, _)| started + every);
    let mut next_kill = match opts.kill_forwarder_after {
        Some(_) if mesh.children.specs.contains_key(FORWARDER) => {
            opts.kill_forwarder_after.map(|after| started + after)
        }
        Some(_) => {
            return Err(Failure::config(
                "--kill-forwarder-after needs the programs started by nsm-load (--processes)",
            ))
        }
        None => None,
    };
    let mut last_rotation = None;
    let (targets, skipped) = pings::sample(&kernel_conns, opts.ping_sample);
    let targets = Arc::new(targets);
    // After a restart: when each sampled connection answered a ping after its heal.
    let answered = Arc::new(std::sync::Mutex::new(vec![None; targets.len()]));
    let mut pinger: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    let mut restart: Option<(Instant, Instant)> = None;
    let mut restart_report = None;
    loop {
        let next = [next_sample, next_rotation, next_kill]
            .into_iter()
            .flatten()
            .fold(end, Instant::min);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => {
                report.interrupted = true;
                break;
            }
            _ = async {
                match pinger.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if pinger.is_some() => {
                pinger = None;
                continue;
            }
        }
        if next >= end {
            break;
        }
        if next_kill.is_some_and(|at| at <= next) {
            next_kill = None;
            let killed = Instant::now();
            warn!(after = ?(killed - started), "killing the forwarder (SIGKILL) and starting it again");
            let spawned = mesh
                .children
                .restart(FORWARDER, 1, opts.forwarder_down_for)
                .await?;
            restart = Some((killed, spawned));
            if !targets.is_empty() {
                pinger = Some(Box::pin(pings::ping_after_heal(
                    targets.clone(),
                    counts.clone(),
                    killed,
                    answered.clone(),
                )));
            }
            // Whether and when the new forwarder serves (its metrics answer).
            let url = mesh
                .metrics
                .iter()
                .find(|(n, _)| n == FORWARDER)
                .map(|(_, u)| u.clone());
            let serving = match url {
                Some(url) => wait_until(Duration::from_secs(20), || {
                    let url = url.clone();
                    async move { scrape(&url).await.is_ok() }
                })
                .await
                .ok()
                .map(|()| (Instant::now() - spawned).as_secs_f64()),
                None => None,
            };
            restart_report = Some(Restart {
                killed_at: (killed - started).as_secs_f64(),
                started_after_kill: (spawned - killed).as_secs_f64(),
                serving_after_start: serving,
                ping_sampled: targets.len(),
                ..Default::default()
            });
        }
        if let (Some(at), Some((every, ids))) = (next_rotation, rotation) {
            if at <= next {
                ids.rotate()?;
                report.soak.rotations += 1;
                last_rotation = Some(Instant::now());
                next_rotation = Some(at + every);
            }
        }
        if let (Some(at), Some(every)) = (next_sample, opts.sample_every) {
            if at <= next {
                let stage = format!("soak+{:.0}s", started.elapsed().as_secs_f64());
                sample_all(mesh, report, &stage).await;
                next_sample = Some(Instant::now() + every);
            }
        }
    }
    drop(pinger);
    if let (Some(mut r), Some((_, spawned))) = (restart_report, restart) {
        let since = |t: Instant| t.checked_duration_since(spawned).map(|d| d.as_secs_f64());
        r.last_healed_after_start = counts.heals.last_healed().and_then(since);
        let answered = answered.lock().unwrap_or_else(|p| p.into_inner());
        r.pinged = answered.iter().flatten().count();
        if r.pinged == targets.len() {
            r.last_ping_after_start = answered.iter().flatten().max().copied().and_then(since);
        }
        report.soak.restart = Some(r);
    }
    if !targets.is_empty() || skipped > 0 {
        report.soak.pings = Some(Pings {
            sampled: targets.len(),
            ok: pings::ping_all(&targets).await,
            skipped,
        });
    }
    report.soak.seconds = started.elapsed().as_secs_f64();
    if let (Some((_, ids)), Some(at)) = (rotation, last_rotation) {
        // The programs poll their files (FileSource, every 500 ms): give them that and
        // a margin before asking for a new handshake.
        tokio::time::sleep_until(at + ROTATION_SETTLE).await;
        report.soak.rotated_certificate_served = Some(ids.serves_newest().await?);
    }
    let window = counts.take();
    report.soak.refreshes = window.latency.count();
    report.soak.latency = window.latency.latency();
    report.soak.errors = window.errors;
    report.soak.heal_broken = counts.heal_broken.load(Ordering::Relaxed) - broken0;
    report.soak.heal_healed = counts.heal_healed.load(Ordering::Relaxed) - healed0;
    report.soak.heal = counts.heals.summary();
    sample_all(mesh, report, "end_of_soak").await;

    // Close.
    counts.phase.store(PHASE_CLOSE, Ordering::Relaxed);
    let started = Instant::now();
    let results: Vec<(Duration, nsm_sdk::Result<()>)> = stream::iter(conns.into_iter().map(|c| {
        let counts = counts.clone();
        async move {
            let t = Instant::now();
            let r = chain
                .close(&mut Cx::client().with_timeout(timeout), c)
                .await;
            counts.closed.fetch_add(1, Ordering::Relaxed);
            (t.elapsed(), r)
        }
    }))
    .buffer_unordered(opts.concurrency.max(1))
    .collect()
    .await;
    report.close.seconds = started.elapsed().as_secs_f64();
    let mut latency = Vec::with_capacity(results.len());
    for (d, r) in results {
        latency.push(d);
        match r {
            Ok(()) => report.close.ok += 1,
            Err(e) => *report.close.errors.entry(code_name(&e)).or_default() += 1,
        }
    }
    report.close.latency = Latency::of(&latency);
    merge(&mut report.other_refresh_errors, counts.take().errors);
    tokio::time::sleep(opts.settle).await;
    if let Some(ns) = &mesh._namespaces {
        let left = ns.leftover_links().await;
        for (netns, links) in left.iter().take(5) {
            warn!(%netns, ?links, "links left after Close");
        }
        report.left_after_close = Some(left.iter().map(|(_, l)| l.len() as u64).sum());
    }
    sample_all(mesh, report, "after_close").await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::options::{LoadMechanism, Target, STAGES};
    use nsm_sdk::sandbox::Transport;

    #[tokio::test]
    async fn kernel_clients_need_processes_not_the_sandbox() {
        let opts = LoadOptions {
            mechanism: LoadMechanism::Kernel,
            ..sandbox_options()
        };
        let err = run_load(opts, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, Failure::Config(_)), "{err}");
    }

    fn sandbox_options() -> LoadOptions {
        LoadOptions {
            clients: 50,
            concurrency: 10,
            duration: Duration::from_secs(5),
            token_lifetime: Duration::from_secs(10),
            network_service: "load-test".into(),
            settle: Duration::from_millis(100),
            ..LoadOptions::new(Target::Sandbox(Transport::Memory))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sandbox_run_connects_refreshes_and_closes_everything() {
        let opts = LoadOptions {
            sample_every: Some(Duration::from_secs(2)),
            ..sandbox_options()
        };
        let report = run_load(opts, CancellationToken::new()).await.unwrap();
        assert_eq!(report.errors_total(), 0, "{}", report.summary());
        assert_eq!(report.setup.ok, 50);
        assert_eq!(report.setup.latency.count, 50);
        assert_eq!(report.close.ok, 50);
        // 10 s tokens: every connection refreshes 2 to 4 s after its last Request, at
        // least a second before the manager's deadline (half the token: 5 s) even on a
        // loaded machine, so in 5 s each refreshes once or twice.
        assert!(
            report.soak.refreshes >= 25,
            "{} refreshes",
            report.soak.refreshes
        );
        assert_eq!(report.soak.heal_broken, 0);
        let own = &report.processes["nsm-load"];
        assert!(STAGES.iter().all(|s| own.contains_key(*s)), "{own:?}");
        // Two samples during the 5 s soak, in order between after_setup and end_of_soak.
        assert_eq!(report.stages.len(), 7, "{:?}", report.stages);
        assert_eq!(report.stages[2], "after_setup");
        assert!(report.stages[3].starts_with("soak+"), "{:?}", report.stages);
        assert!(report.stages[4].starts_with("soak+"), "{:?}", report.stages);
        assert_eq!(report.stages[5], "end_of_soak");
        // The SDK's tasks of the connections are gone after Close.
        assert!(
            own["after_setup"]["nsm_live_tasks"] > own["start"]["nsm_live_tasks"],
            "{own:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_cuts_the_soak_short_and_still_closes() {
        let opts = LoadOptions {
            duration: Duration::from_secs(3600),
            ..sandbox_options()
        };
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            stopper.cancel();
        });
        let report = tokio::time::timeout(Duration::from_secs(30), run_load(opts, stop))
            .await
            .expect("the stop ended the soak")
            .unwrap();
        assert!(report.interrupted);
        assert_eq!(report.close.ok, 50);
    }
}
