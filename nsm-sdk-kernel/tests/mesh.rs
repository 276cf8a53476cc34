//! Kernel2Kernel through the whole mesh, as root.
//!
//! Every component runs in this test process, in a sandbox served over unix sockets: a
//! registry, a manager, a forwarder with the KERNEL mechanism (in the host namespace,
//! creating interfaces inside the pods), an endpoint with point-to-point IPAM and
//! `kernel_endpoint`, and clients with `kernel_client`. The "pods" are
//! namespaces made by the test (`ip netns add nsmt-<pid>-<n>`, deleted by a guard even
//! when the test fails) and named `file:///run/netns/<name>`. What the kernel holds is
//! read with `ip -j` (an independent observer), traffic checked with `ping` from inside
//! a pod. Without root (or without `ip`/`ping`) each test prints a skip line and passes.

use std::time::Instant;

use nsm_sdk::chains::client;
use nsm_sdk::proto::connection::{Connection, Mechanism};
use nsm_sdk::proto::connectioncontext::ConnectionContext;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::sandbox::{EndpointHandle, Sandbox};
use nsm_sdk::wire::{params, types};
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::kernel_client;
use nsm_sdk_kernel::mechanism::{kernel_mechanism, KernelClient};
use nsm_testkit::bench::ip_of;
use nsm_testkit::kernel::{kernel_nse, kernel_sandbox};
use nsm_testkit::{refresh, request_with_context, unique, Ns};
use tonic::Code;

const SERVICE: &str = "kernel-svc";
const PREFIX: &str = "172.16.50.0/24";
/// Connections of the many-clients test: 100 client pods, as issue 4 asks (about 7-18 s).
const CONNECTIONS: usize = 100;

macro_rules! require_root {
    () => {
        nsm_testkit::require_root!("kernel mesh tests")
    };
}

/// A sandbox with a KERNEL forwarder and one KERNEL endpoint in `nse`; its counter
/// counts what reaches the endpoint's application handlers.
struct Mesh {
    sandbox: Sandbox,
    nse: EndpointHandle,
}

impl Mesh {
    async fn start(nse: &Ns) -> Mesh {
        let sandbox = kernel_sandbox().build().await.unwrap();
        let nse = sandbox
            .node(0)
            .endpoint(kernel_nse("nse", SERVICE, nse, PREFIX))
            .await
            .unwrap();
        Mesh { sandbox, nse }
    }

    /// A client chain offering only what `kernel` (or `mechanisms`) says, no retry.
    fn client(&self, kernel: Option<KernelClient>, mechanisms: Vec<Mechanism>) -> Chain {
        let mut opts = self
            .sandbox
            .node(0)
            .client_options("nsc")
            .retry(None)
            .mechanisms(mechanisms);
        if let Some(k) = kernel {
            opts = opts.handler(k);
        }
        client(opts)
    }
}

fn request(ctx: Option<ConnectionContext>) -> NetworkServiceRequest {
    request_with_context(SERVICE, ctx)
}

/// The client's and the endpoint's address (`a.b.c.d/32`) of a connection.
fn addrs(conn: &Connection) -> (String, String) {
    nsm_testkit::bench::addrs(conn).expect("the IPAM filled the IP context")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_connection_pings_survives_a_refresh_unchanged_and_leaves_nothing_after_close() {
    require_root!();
    let (nsc, nse) = (Ns::new(), Ns::new());
    let baseline = (nsc.everything(), nse.everything());
    let mesh = Mesh::start(&nse).await;
    let chain = mesh.client(Some(kernel_client(nsc.url()).ifname("nsm-1")), vec![]);

    let ctx = ConnectionContext {
        mtu: 1400,
        ..Default::default()
    };
    let conn = chain
        .request(&mut Cx::client(), request(Some(ctx)))
        .await
        .unwrap();
    let m = conn.mechanism.as_ref().unwrap();
    assert_eq!(m.r#type, types::KERNEL);
    assert_eq!(m.parameters[params::NAME], "nsm-1");
    assert_eq!(m.parameters[params::INODE_URL], nsc.url());
    assert_eq!(conn.context.as_ref().unwrap().mtu, 1400);
    let (client_addr, endpoint_addr) = addrs(&conn);

    assert_eq!(nsc.links(), ["lo", "nsm-1"]);
    assert_eq!(nsc.addresses("nsm-1"), std::slice::from_ref(&client_addr));
    assert_eq!(nsc.link("nsm-1")["mtu"], 1400);
    let nse_if = nse.mesh_link();
    assert!(
        nse_if.starts_with(&format!("{SERVICE}-")) && nse_if.len() == 15,
        "the endpoint's generated name: {nse_if}"
    );
    assert_eq!(nse.addresses(&nse_if), std::slice::from_ref(&endpoint_addr));
    assert_eq!(nse.link(&nse_if)["mtu"], 1400);
    assert!(nsc.ping(ip_of(&endpoint_addr)).await, "client -> endpoint");
    assert!(nse.ping(ip_of(&client_addr)).await, "endpoint -> client");

    let before = (nsc.state(), nse.state());
    let again = chain
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(addrs(&again), addrs(&conn));
    assert_eq!(
        (nsc.state(), nse.state()),
        before,
        "a refresh changes nothing"
    );
    assert!(nsc.ping(ip_of(&endpoint_addr)).await, "after the refresh");

    chain.close(&mut Cx::client(), again).await.unwrap();
    assert_eq!(mesh.nse.counter.closes(), 1);
    assert_eq!(nsc.everything(), baseline.0, "client pod after Close");
    assert_eq!(nse.everything(), baseline.1, "endpoint pod after Close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_reach_one_endpoint_and_close_leaves_every_pod_as_it_was() {
    require_root!();
    let started = Instant::now();
    let nse = Ns::new();
    let nscs: Vec<Ns> = (0..CONNECTIONS).map(|_| Ns::new()).collect();
    let baseline: Vec<Vec<String>> = nscs.iter().map(Ns::everything).collect();
    let nse_baseline = nse.everything();
    let mesh = Mesh::start(&nse).await;

    let chains: Vec<Chain> = nscs
        .iter()
        .map(|ns| mesh.client(Some(kernel_client(ns.url())), vec![]))
        .collect();
    let conns: Vec<Connection> = futures::future::join_all(
        chains
            .iter()
            .map(|c| async move { c.request(&mut Cx::client(), request(None)).await }),
    )
    .await
    .into_iter()
    .collect::<Result<_, _>>()
    .unwrap();
    let set_up = started.elapsed();

    assert_eq!(
        nse.links().len(),
        CONNECTIONS + 1,
        "one interface per connection"
    );
    let pings = futures::future::join_all(nscs.iter().zip(&conns).map(|(ns, conn)| async move {
        let (client_addr, endpoint_addr) = addrs(conn);
        let ifname = ns.mesh_link();
        assert!(ifname.starts_with(&format!("{SERVICE}-")), "{ifname}");
        assert_eq!(ns.addresses(&ifname), [client_addr]);
        assert_eq!(ns.link(&ifname)["mtu"], 1500, "the default MTU");
        ns.ping(ip_of(&endpoint_addr)).await
    }))
    .await;
    assert!(pings.iter().all(|p| *p), "pings: {pings:?}");

    futures::future::join_all(
        chains
            .iter()
            .zip(conns)
            .map(|(c, conn)| async move { c.close(&mut Cx::client(), conn).await }),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<()>, _>>()
    .unwrap();
    assert_eq!(mesh.nse.counter.closes(), CONNECTIONS);
    for (ns, base) in nscs.iter().zip(&baseline) {
        assert_eq!(&ns.everything(), base, "{} after Close", ns.name);
    }
    assert_eq!(nse.everything(), nse_baseline, "endpoint pod after Close");
    eprintln!(
        "{CONNECTIONS} connections: set up in {set_up:?}, all done in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_the_right_code_and_leaves_nothing() {
    require_root!();
    let (nsc, nse) = (Ns::new(), Ns::new());
    let baseline = (nsc.everything(), nse.everything());
    let mesh = Mesh::start(&nse).await;
    let nothing_left = |what: &str| {
        assert_eq!(nsc.everything(), baseline.0, "client pod after {what}");
        assert_eq!(nse.everything(), baseline.1, "endpoint pod after {what}");
    };

    // The client's namespace does not exist: NotFound, and the endpoint never hears of it.
    let missing = format!("file:///run/netns/{}", unique("missing"));
    let err = mesh
        .client(Some(kernel_client(missing)), vec![])
        .request(&mut Cx::client(), request(None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert_eq!(mesh.nse.counter.requests(), 0);
    nothing_left("a missing namespace");

    // An interface name over 15 bytes, refused by the forwarder (sent as is) ...
    let mut long = kernel_mechanism();
    long.parameters
        .insert(params::NAME.into(), "sixteen-bytes-xx".into());
    long.parameters.insert(params::INODE_URL.into(), nsc.url());
    let err = mesh
        .client(None, vec![long])
        .request(&mut Cx::client(), request(None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(mesh.nse.counter.requests(), 0);
    // ... and by the client handler before anything is sent.
    let err = mesh
        .client(
            Some(kernel_client(nsc.url()).ifname("sixteen-bytes-xx")),
            vec![],
        )
        .request(&mut Cx::client(), request(None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    nothing_left("a long interface name");

    // An MTU out of range in the context: the endpoint answered, so its connection is
    // closed again.
    let ctx = ConnectionContext {
        mtu: 70_000,
        ..Default::default()
    };
    let err = mesh
        .client(Some(kernel_client(nsc.url())), vec![])
        .request(&mut Cx::client(), request(Some(ctx)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(mesh.nse.counter.requests(), 1);
    assert_eq!(mesh.nse.counter.closes(), 1);
    nothing_left("an MTU out of range");

    // The mesh is still fine: a good request works and closes cleanly.
    let chain = mesh.client(Some(kernel_client(nsc.url())), vec![]);
    let conn = chain
        .request(&mut Cx::client(), request(None))
        .await
        .unwrap();
    assert!(nsc.ping(ip_of(&addrs(&conn).1)).await);
    chain.close(&mut Cx::client(), conn).await.unwrap();
    nothing_left("a good connection");
}
