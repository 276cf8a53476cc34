//! Storms through a real KERNEL forwarder, as root: many Requests at once, then many
//! Closes at once (a node drain), then a lone Request and Close.
//!
//! The mesh runs in this process (a sandbox over unix sockets: registry, manager,
//! KERNEL forwarder, one KERNEL endpoint); every client has its own pod namespace and
//! all connections end in the one endpoint pod, the shape where a storm of Closes is
//! deleted as link groups. Pods are `ip netns add` namespaces deleted by their guards,
//! also when the test fails; what the kernel holds is read with `ip -j`. Without root
//! (or `ip`/`ping`) the test prints a skip line and passes.

use std::time::Instant;

use nsm_sdk::chains::client;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::sandbox::Sandbox;
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::groups_in_use;
use nsm_testkit::bench::ip_of;
use nsm_testkit::kernel::{kernel_nsc, kernel_nse, kernel_sandbox};
use nsm_testkit::{request_with_context, Ns};

const SERVICE: &str = "storm-svc";
/// Room for 2 addresses per connection.
const PREFIX: &str = "172.16.48.0/22";
/// Connections of the storm (1,000 in the bench; CI stays short).
const N: usize = 200;

fn client_chain(sandbox: &Sandbox, pod: &Ns) -> Chain {
    client(kernel_nsc(sandbox.node(0), pod, None))
}

/// The errors among `results`, as text.
fn errors<T>(results: &[Result<T, nsm_sdk::Error>]) -> Vec<String> {
    results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect()
}

/// The client's and the endpoint's address (`a.b.c.d/32`) of a connection.
fn addrs(conn: &Connection) -> (String, String) {
    nsm_testkit::bench::addrs(conn).expect("the IPAM filled the IP context")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_requests_then_a_storm_of_closes_all_succeed_and_leave_nothing() {
    nsm_testkit::require_root!("kernel storm tests");
    let nse = Ns::new();
    let nscs: Vec<Ns> = (0..N).map(|_| Ns::new()).collect();
    let baseline: Vec<Vec<String>> = nscs.iter().map(Ns::everything).collect();
    let nse_baseline = nse.everything();
    let sandbox = kernel_sandbox().build().await.unwrap();
    let _endpoint = sandbox
        .node(0)
        .endpoint(kernel_nse("nse", SERVICE, &nse, PREFIX))
        .await
        .unwrap();
    let chains: Vec<Chain> = nscs.iter().map(|ns| client_chain(&sandbox, ns)).collect();

    let started = Instant::now();
    let results = futures::future::join_all(chains.iter().map(|c| async move {
        c.request(&mut Cx::client(), request_with_context(SERVICE, None))
            .await
    }))
    .await;
    let set_up = started.elapsed();
    let failed = errors(&results);
    assert!(
        failed.is_empty(),
        "{} Requests failed: {failed:?}",
        failed.len()
    );
    let conns: Vec<Connection> = results.into_iter().map(Result::unwrap).collect();

    // Every client end is in its own pod with its address; every endpoint end in the
    // endpoint's pod, one per connection, each with its own name.
    let nse_links = nse.links();
    assert_eq!(
        nse_links.len(),
        N + 1,
        "lo and one interface per connection"
    );
    for (ns, conn) in nscs.iter().zip(&conns) {
        let (client_addr, _) = addrs(conn);
        let ifname = ns.mesh_link();
        assert_eq!(ns.links().len(), 2, "{}: lo and the connection's", ns.name);
        assert_eq!(ns.addresses(&ifname), [client_addr]);
    }
    let sample = futures::future::join_all(
        nscs.iter()
            .zip(&conns)
            .step_by(20)
            .map(|(ns, conn)| async move { ns.ping(ip_of(&addrs(conn).1)).await }),
    )
    .await;
    assert!(sample.iter().all(|p| *p), "sampled pings: {sample:?}");

    let started = Instant::now();
    let closed = futures::future::join_all(
        chains
            .iter()
            .zip(conns)
            .map(|(c, conn)| async move { c.close(&mut Cx::client(), conn).await }),
    )
    .await;
    let torn_down = started.elapsed();
    let failed = errors(&closed);
    assert!(
        failed.is_empty(),
        "{} Closes failed: {failed:?}",
        failed.len()
    );
    for (ns, base) in nscs.iter().zip(&baseline) {
        assert_eq!(&ns.everything(), base, "{} after Close", ns.name);
    }
    assert_eq!(nse.everything(), nse_baseline, "endpoint pod after Close");
    assert_eq!(groups_in_use(), 0, "every link group number released");
    eprintln!("{N} at once: set up in {set_up:?}, closed in {torn_down:?}");

    // A lone Request and Close after the storm: a plain deletion, nothing left.
    let lone = client_chain(&sandbox, &nscs[0]);
    let conn = lone
        .request(&mut Cx::client(), request_with_context(SERVICE, None))
        .await
        .unwrap();
    assert_eq!(nscs[0].links().len(), 2);
    let started = Instant::now();
    lone.close(&mut Cx::client(), conn).await.unwrap();
    eprintln!("a lone Close after the storm: {:?}", started.elapsed());
    assert_eq!(nscs[0].everything(), baseline[0], "after the lone Close");
    assert_eq!(
        nse.everything(),
        nse_baseline,
        "endpoint pod after the lone Close"
    );
    assert_eq!(groups_in_use(), 0);
}
