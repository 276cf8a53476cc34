//! Heal with a real data plane, as root: Kernel2Kernel connections through the whole
//! mesh in this process (as in `mesh.rs`), where a component dies or the data plane
//! breaks, and the NSC's `heal` brings the ping back without the NSC doing anything.
//!
//! - a forwarder restart: the old forwarder's veth pair is still in the kernel, the
//!   new forwarder recognises it by its aliases and adopts it in place;
//! - an endpoint death: heal reselects a second endpoint with another IPAM prefix;
//! - a deleted interface: the ping liveness check fails, heal reselects.
//!
//! The pods are namespaces made by the test and deleted by a guard even when it fails;
//! only 172.16.x.x addresses are used inside them. Each test prints its heal time, from
//! the fault to the first successful `ping` (run by the `ping` binary inside the
//! client's pod, polled every 50 ms): `cargo test -p nsm-sdk-kernel --test heal --
//! --nocapture`. Without root (or without `ip`/`ping`) each test prints a skip line
//! and passes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nsm_sdk::chains::client;
use nsm_sdk::handlers::{heal, HealEvent, HealOptions, LivenessFn};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::sandbox::{EndpointHandle, Sandbox};
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::{kernel_client, ping_liveness, PingOptions};
use nsm_testkit::kernel::{kernel_nse, kernel_sandbox};
use nsm_testkit::Ns;

const SERVICE: &str = "kernel-heal";
/// How long a heal may take before the test fails.
const HEAL_WITHIN: Duration = Duration::from_secs(10);
/// How often the data plane is probed while waiting.
const POLL: Duration = Duration::from_millis(50);
/// The sandbox's one forwarder.
const FORWARDER: &str = "forwarder-0-0";

macro_rules! require_root {
    () => {
        nsm_testkit::require_root!("kernel heal tests")
    };
}

/// The links of `ns` other than `lo`: (name, ifindex, alias).
fn mesh_links(ns: &Ns) -> Vec<(String, u64, String)> {
    let mut v: Vec<_> = ns
        .json(&["link", "show"])
        .iter()
        .filter(|l| l["ifname"] != "lo")
        .map(|l| {
            (
                l["ifname"].as_str().unwrap_or("?").to_string(),
                l["ifindex"].as_u64().unwrap_or(0),
                l["ifalias"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// One echo request with a 200 ms wait, by the `ping` binary inside the pod.
async fn ping(ns: &Ns, addr: &str) -> bool {
    ns.ping_within(addr, "0.2").await
}

/// Polls every [`POLL`] until `ready` holds and a ping from `ns` to `addr` succeeds;
/// fails the test after [`HEAL_WITHIN`]. Returns the time since `since`.
async fn until_ping(
    ns: &Ns,
    addr: &str,
    since: Instant,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Duration {
    let deadline = since + HEAL_WITHIN;
    loop {
        if ready() && ping(ns, addr).await {
            let took = since.elapsed();
            eprintln!("heal time ({what}): {took:?}");
            return took;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no working ping to {addr} within {HEAL_WITHIN:?}; links {:?}",
            mesh_links(ns)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A sandbox over unix sockets with a KERNEL forwarder that can be killed and started
/// again on the same URL, and endpoints.
struct Mesh {
    sandbox: Sandbox,
    /// Connections the NSCs' heal reported healed.
    healed: Arc<AtomicUsize>,
}

impl Mesh {
    async fn start() -> Mesh {
        Mesh {
            sandbox: kernel_sandbox().build().await.unwrap(),
            healed: Arc::default(),
        }
    }

    /// Kills the forwarder (server stopped, every task cancelled) and starts a fresh
    /// one (no state from the old one) on the same URL.
    async fn restart_forwarder(&self) {
        assert!(self.sandbox.node(0).kill_forwarder(FORWARDER));
        self.sandbox
            .node(0)
            .restart_forwarder(FORWARDER)
            .await
            .unwrap();
    }

    /// Starts and registers endpoint `name` in pod `ns`, handing out `prefix`.
    async fn start_nse(&self, name: &str, ns: &Ns, prefix: &str) -> EndpointHandle {
        self.sandbox
            .node(0)
            .endpoint(kernel_nse(name, SERVICE, ns, prefix))
            .await
            .unwrap()
    }

    /// The endpoint dies and the registry learns of it.
    async fn kill_nse(&self, nse: EndpointHandle) {
        nse.kill();
        nse.unregister().await.unwrap();
    }

    /// An NSC in pod `ns` asking for interface `nsm-1`, with `heal` (and a liveness
    /// check if given) among its handlers.
    fn nsc(&self, ns: &Ns, liveness: Option<LivenessFn>) -> Chain {
        let healed = self.healed.clone();
        let mut opts = HealOptions::new(self.sandbox.channels()).observer(move |e, _| {
            if e == HealEvent::Healed {
                healed.fetch_add(1, Ordering::SeqCst);
            }
        });
        if let Some(check) = liveness {
            opts = opts
                .liveness(check)
                .liveness_interval(Duration::from_millis(100));
        }
        client(
            self.sandbox
                .node(0)
                .client_options("nsc")
                .mechanisms(vec![])
                .handler(heal(opts))
                .handler(kernel_client(ns.url()).ifname("nsm-1")),
        )
    }
}

fn request() -> NetworkServiceRequest {
    nsm_testkit::request(SERVICE)
}

/// The endpoint's address of a connection, without prefix length.
fn endpoint_ip(conn: &Connection) -> String {
    let ipc = conn
        .context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .expect("the IPAM filled the IP context");
    let first = &ipc.dst_ip_addrs[0];
    first.split('/').next().unwrap_or(first).to_string()
}

/// The forwarder dies (server stopped, every task cancelled) and a new one starts on
/// the same URL. The manager's relay reports the connection DOWN, the NSC's heal
/// re-requests it, and the new forwarder finds the pair its predecessor left with this
/// connection's aliases where the connection puts its ends: it adopts the pair (the
/// same devices: the data plane never stopped), and the ping works. Close through the
/// new forwarder removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_forwarder_adopts_the_pair_it_finds_and_the_ping_works() {
    require_root!();
    let (nsc_pod, nse_pod) = (Ns::new(), Ns::new());
    let mesh = Mesh::start().await;
    let _nse = mesh.start_nse("nse", &nse_pod, "172.16.70.0/24").await;
    let nsc = mesh.nsc(&nsc_pod, None);
    let conn = nsc.request(&mut Cx::client(), request()).await.unwrap();
    let addr = endpoint_ip(&conn);
    assert!(ping(&nsc_pod, &addr).await);
    let [(name, _, alias)] = &mesh_links(&nsc_pod)[..] else {
        panic!("{:?}", mesh_links(&nsc_pod))
    };
    assert_eq!(name, "nsm-1");
    let first_segment = &conn.path.as_ref().unwrap().path_segments[0].id;
    assert_eq!(alias, &format!("nsm-client-{first_segment}"));
    let old_nsc_link = mesh_links(&nsc_pod);
    let old_nse_link = mesh_links(&nse_pod);

    let killed = Instant::now();
    mesh.restart_forwarder().await;
    let healed = || mesh.healed.load(Ordering::SeqCst) >= 1;
    until_ping(&nsc_pod, &addr, killed, "forwarder restart", healed).await;

    let nse_links = mesh_links(&nse_pod);
    assert_eq!(nse_links.len(), 1, "one pair: {nse_links:?}");
    if nse_links[0].0 == old_nse_link[0].0 {
        // Heal's re-request reached the new forwarder and the endpoint kept the
        // connection: the same devices, adopted.
        assert_eq!(mesh_links(&nsc_pod), old_nsc_link, "the pair was adopted");
        assert_eq!(nse_links, old_nse_link, "the pair was adopted");
    } else {
        // A reselect made a new endpoint connection (another name): a new pair.
        eprintln!("forwarder restart: heal reselected, the pair was replaced");
        assert_eq!(&mesh_links(&nsc_pod)[0].2, alias, "the same connection");
    }

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert!(
        mesh_links(&nsc_pod).is_empty(),
        "{:?}",
        mesh_links(&nsc_pod)
    );
    assert!(
        mesh_links(&nse_pod).is_empty(),
        "{:?}",
        mesh_links(&nse_pod)
    );
}

/// The endpoint dies (server stopped, tasks cancelled, unregistered) and a second one
/// with another IPAM prefix starts in another pod. The NSC's heal reselects it; the
/// ping to the new endpoint's address works and the old pair is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_replaced_by_a_second_one_and_the_new_address_pings() {
    require_root!();
    let (nsc_pod, nse1_pod, nse2_pod) = (Ns::new(), Ns::new(), Ns::new());
    let mesh = Mesh::start().await;
    let nse1 = mesh.start_nse("nse-1", &nse1_pod, "172.16.80.0/24").await;
    let nsc = mesh.nsc(&nsc_pod, None);
    let conn = nsc.request(&mut Cx::client(), request()).await.unwrap();
    let old_addr = endpoint_ip(&conn);
    assert!(old_addr.starts_with("172.16.80."), "{old_addr}");
    assert!(ping(&nsc_pod, &old_addr).await);

    let killed = Instant::now();
    mesh.kill_nse(nse1).await;
    let _nse2 = mesh.start_nse("nse-2", &nse2_pod, "172.16.90.0/24").await;
    // The address the new endpoint's IPAM gave its own end. (The request still
    // carries the old endpoint's addresses, which this IPAM keeps: see below.)
    let new_addr = || {
        let (name, _, _) = mesh_links(&nse2_pod).into_iter().next()?;
        nse2_pod
            .addresses(&name)
            .into_iter()
            .find(|a| a.starts_with("172.16.90."))
            .map(|a| a.split('/').next().unwrap_or_default().to_string())
    };
    let mut target = None;
    let deadline = killed + HEAL_WITHIN;
    while target.is_none() {
        target = new_addr();
        assert!(
            Instant::now() < deadline,
            "no interface in the new endpoint's pod"
        );
        tokio::time::sleep(POLL).await;
    }
    let target = target.unwrap_or_default();
    assert!(target.starts_with("172.16.90."), "{target}");
    until_ping(
        &nsc_pod,
        &target,
        killed,
        "endpoint death, reselect",
        || true,
    )
    .await;

    assert!(
        mesh_links(&nse1_pod).is_empty(),
        "{:?}",
        mesh_links(&nse1_pod)
    );
    let nsc_links = mesh_links(&nsc_pod);
    assert_eq!(nsc_links.len(), 1, "{nsc_links:?}");
    let client_addrs = nsc_pod.addresses("nsm-1");
    assert!(
        client_addrs.iter().any(|a| a.starts_with("172.16.90.")),
        "{client_addrs:?}"
    );
    // point_to_point (like Go's point2pointipam) removes only addresses inside its
    // own prefixes, so both pods also keep the old endpoint's pair of addresses.
    eprintln!(
        "after the reselect: client addresses {client_addrs:?}, endpoint addresses {:?}",
        nse2_pod.addresses(&mesh_links(&nse2_pod)[0].0)
    );

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert!(mesh_links(&nsc_pod).is_empty());
    assert!(mesh_links(&nse2_pod).is_empty());
}

/// The NSC's interface is deleted behind the mesh's back. Nothing in the control plane
/// notices; the ping liveness check does, heal reselects, the forwarder makes a new
/// pair and the ping works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_interface_is_noticed_by_the_ping_liveness_check_and_healed() {
    require_root!();
    let (nsc_pod, nse_pod) = (Ns::new(), Ns::new());
    let mesh = Mesh::start().await;
    let _nse = mesh.start_nse("nse", &nse_pod, "172.16.100.0/24").await;
    let check = ping_liveness(
        PingOptions::new()
            .netns(nsc_pod.open())
            .timeout(Duration::from_millis(300)),
    );
    let nsc = mesh.nsc(&nsc_pod, Some(check));
    let conn = nsc.request(&mut Cx::client(), request()).await.unwrap();
    let addr = endpoint_ip(&conn);
    assert!(ping(&nsc_pod, &addr).await);
    // The liveness check keeps passing on a working connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let [(_, index, _)] = mesh_links(&nsc_pod)[..] else {
        panic!("{:?}", mesh_links(&nsc_pod))
    };

    let broke = Instant::now();
    nsc_pod.ip(&["link", "del", "nsm-1"]);
    assert!(!ping(&nsc_pod, &addr).await, "the data plane is broken");
    let replaced = || {
        mesh_links(&nsc_pod)
            .first()
            .is_some_and(|(name, i, _)| name == "nsm-1" && *i != index)
    };
    until_ping(
        &nsc_pod,
        &addr,
        broke,
        "deleted interface, liveness",
        replaced,
    )
    .await;
    assert_eq!(mesh_links(&nse_pod).len(), 1, "{:?}", mesh_links(&nse_pod));

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert!(mesh_links(&nsc_pod).is_empty());
    assert!(mesh_links(&nse_pod).is_empty());
}
