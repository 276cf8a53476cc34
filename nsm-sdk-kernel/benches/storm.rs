//! Storms of set-up and teardown: N KERNEL connections requested at once, then closed
//! at once, beside the kernel floor measured in the same run.
//!
//! Shape (as `nsm-load --mechanism kernel`): N client pods, one endpoint pod, every
//! pair joining a client pod to the endpoint pod (namespaces made by the bench,
//! `nsmt-<pid>-<n>`, deleted by their guards even on failure). Three measurements, in
//! this order, each leaving the pods empty:
//!
//! 1. **floor**: `ip -batch` creating the same N pairs (`link add <c> netns <client>
//!    type veth peer name <e> netns <endpoint>`), then deleting them one `link del` a
//!    line, then creating them again and deleting them as one link group (`link set
//!    <e> group G` for each, `link del group G`): what the kernel itself needs.
//! 2. **data plane**: N concurrent `kernel_side_up` (the forwarder's work for a
//!    Request: leftover check, creation, alias, MTU, up, address, route on each end),
//!    then N concurrent `down` (the Close's).
//! 3. **mesh**: N concurrent Requests through the in-process mesh (registry, manager,
//!    KERNEL forwarder, endpoint; unix sockets), then N concurrent Closes; every one
//!    must succeed and the pods must be empty afterwards.
//!
//! `NSM_STORM_N` sets N (default 1000); `NSM_STORM_MESH=0` skips the mesh part.
//! Needs root and `ip`. Run (root):
//! `cargo bench -p nsm-sdk-kernel --bench storm` (check it quickly in the dev profile:
//! `NSM_STORM_N=20 cargo bench -p nsm-sdk-kernel --bench storm --profile dev`).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nsm_sdk::chains::client;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::{down, kernel_side_up, IfName, Mtu, Plan, Route};
use nsm_testkit::bench::{machine, runtime, Res};
use nsm_testkit::kernel::{kernel_nsc, kernel_nse, kernel_sandbox};
use nsm_testkit::{request_with_context, Ns};

const SERVICE: &str = "storm-svc";
/// Room for 2 addresses per connection up to 2,000 connections.
const PREFIX: &str = "172.16.0.0/20";

/// Runs `ip [-n <ns>] -batch -` with these lines.
fn ip_batch(ns: Option<&Ns>, lines: &[String]) -> Res<Duration> {
    let started = Instant::now();
    let mut args = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns.name.as_str()]);
    }
    args.extend(["-batch", "-"]);
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(lines.join("\n").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!("ip -batch: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(started.elapsed())
}

fn floor(nscs: &[Ns], nse: &Ns) -> Res<()> {
    let add: Vec<String> = nscs
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            format!(
                "link add fl-c netns {} type veth peer name fl-{i} netns {}",
                ns.name, nse.name
            )
        })
        .collect();
    let n = nscs.len();
    let created = ip_batch(None, &add)?;
    let one_by_one: Vec<String> = (0..n).map(|i| format!("link del fl-{i}")).collect();
    let deleted = ip_batch(Some(nse), &one_by_one)?;
    ip_batch(None, &add)?;
    let mut group: Vec<String> = (0..n)
        .map(|i| format!("link set fl-{i} group 4242"))
        .collect();
    group.push("link del group 4242".to_string());
    let grouped = ip_batch(Some(nse), &group)?;
    eprintln!(
        "floor ({n} pairs, ip -batch): create {created:?}, delete one by one {deleted:?}, \
         delete as one group {grouped:?}"
    );
    Ok(())
}

fn net(s: String) -> Res<IpNet> {
    Ok(s.parse()?)
}

/// The plans of pair `i`: a /32 each and a link route to the other.
fn plans(i: usize) -> Res<(Plan, Plan)> {
    let (hi, lo) = (i / 127, (i % 127) * 2);
    let c = format!("172.20.{hi}.{}", lo + 1);
    let e = format!("172.20.{hi}.{}", lo + 2);
    let mtu = Mtu::new(1500)?;
    let client = Plan::new(IfName::new("nsm-1")?)
        .with_mtu(mtu)
        .with_address(net(format!("{c}/32"))?)
        .with_route(Route::link(net(format!("{e}/32"))?));
    let endpoint = Plan::new(IfName::new(format!("st-{i}"))?)
        .with_mtu(mtu)
        .with_address(net(format!("{e}/32"))?)
        .with_route(Route::link(net(format!("{c}/32"))?));
    Ok((client, endpoint))
}

async fn data_plane(nscs: &[Ns], nse: &Ns) -> Res<()> {
    let nse_ns = nse.open();
    let client_ns: Vec<_> = nscs.iter().map(Ns::open).collect();
    let mut jobs = Vec::new();
    for (i, ns) in client_ns.iter().enumerate() {
        let (c, e) = plans(i)?;
        jobs.push((ns, c, e));
    }
    let started = Instant::now();
    let made = futures::future::join_all(
        jobs.into_iter()
            .map(|(ns, c, e)| kernel_side_up(ns, &nse_ns, c, e)),
    )
    .await;
    let set_up = started.elapsed();
    let n = made.len();
    let created: Vec<_> = made.into_iter().collect::<Result<_, _>>()?;
    let started = Instant::now();
    let downs = futures::future::join_all(created.into_iter().map(down)).await;
    let torn_down = started.elapsed();
    let failed = downs.iter().filter(|r| r.is_err()).count();
    eprintln!(
        "data plane ({n} kernel_side_up / down at once): set up {set_up:?}, \
         torn down {torn_down:?}, {failed} failed"
    );
    if failed > 0 || nse.links().len() != 1 {
        return Err("the storm of downs left something".into());
    }
    Ok(())
}

async fn mesh(nscs: &[Ns], nse: &Ns) -> Res<()> {
    let sandbox = kernel_sandbox().build().await?;
    let _endpoint = sandbox
        .node(0)
        .endpoint(kernel_nse("nse", SERVICE, nse, PREFIX))
        .await?;
    let chains: Vec<Chain> = nscs
        .iter()
        .map(|ns| client(kernel_nsc(sandbox.node(0), ns, None)))
        .collect();
    let cx = || Cx::client().with_timeout(Duration::from_secs(60));
    let started = Instant::now();
    let results = futures::future::join_all(chains.iter().map(|c| async move {
        c.request(&mut cx(), request_with_context(SERVICE, None))
            .await
    }))
    .await;
    let set_up = started.elapsed();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(e) = failed.first() {
        return Err(format!("{} Requests failed, first: {e}", failed.len()).into());
    }
    let conns: Vec<Connection> = results.into_iter().collect::<Result<_, _>>()?;
    let started = Instant::now();
    let closed = futures::future::join_all(
        chains
            .iter()
            .zip(conns)
            .map(|(c, conn)| async move { c.close(&mut cx(), conn).await }),
    )
    .await;
    let torn_down = started.elapsed();
    let failed = closed.iter().filter(|r| r.is_err()).count();
    eprintln!(
        "mesh ({} Requests / Closes at once): set up {set_up:?}, closed {torn_down:?}, \
         {failed} Closes failed",
        nscs.len()
    );
    if failed > 0 || nse.links().len() != 1 || nscs.iter().any(|ns| ns.links().len() != 1) {
        return Err("the storm of Closes left something".into());
    }
    Ok(())
}

fn main() {
    eprintln!("machine: {}", machine());
    if !common::can_run() {
        return;
    }
    let n: usize = std::env::var("NSM_STORM_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let with_mesh = std::env::var("NSM_STORM_MESH").map_or(true, |v| v != "0");
    let result = (|| -> Res<()> {
        let nse = Ns::new();
        let nscs: Vec<Ns> = (0..n).map(|_| Ns::new()).collect();
        floor(&nscs, &nse)?;
        let rt = runtime("multi_thread_2")?;
        rt.block_on(data_plane(&nscs, &nse))?;
        if with_mesh {
            rt.block_on(mesh(&nscs, &nse))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("ERROR: {e}");
        std::process::exit(1);
    }
}
