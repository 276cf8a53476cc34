//! What happens upstream when the service or the endpoint changes its mind
//! (docs/SCENARIOS.md 5.1 item 3; 5.6: 41, 42, 43).
//!
//! - A network service that stops allowing a connection's endpoint: the forwarder's
//!   `netsvc_monitor` notices it in the registry and the NSC's `heal` moves the
//!   connection (item 3).
//! - An endpoint that asks its clients to refresh (state REFRESH_REQUESTED on its
//!   monitor): the managers and forwarders relay the state, and an NSC with
//!   `upstream_refresh` re-requests (41); with local notifications its other
//!   connections refresh too (42); a request made while the NSC is still returning
//!   from its Request is not lost (43).
//!
//! The test endpoints' behaviours (an MTU-keeping endpoint, one that asks once) are
//! small handlers below. Waits poll with a deadline; the only fixed pauses check that
//! nothing more happens.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use ipnet::IpNet;
use nsm_proto::connection::{Connection, ConnectionEventType, State};
use nsm_proto::connectioncontext::ConnectionContext;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{Destination, Match, NetworkService};
use nsm_sdk::chains::client;
use nsm_sdk::handlers::{heal, upstream_refresh, HealOptions, Monitor, UpstreamRefreshOptions};
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Node, Sandbox};
use nsm_sdk::{async_trait, Chain, Cx, Handler, Next};
use nsm_testkit::eventually;
use nsm_testkit::Answers;
use tokio::time::Instant;

fn request(service: &str, mtu: u32) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: service.into(),
            context: Some(ConnectionContext {
                mtu,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn refresh(conn: &Connection) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(conn.clone()),
        ..Default::default()
    }
}

fn mtu(conn: &Connection) -> u32 {
    conn.context.as_ref().map_or(0, |c| c.mtu)
}

fn src_ips(conn: &Connection) -> Vec<String> {
    conn.context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .map(|ip| ip.src_ip_addrs.clone())
        .unwrap_or_default()
}

/// Whether every address (`addr/len`) is inside `pool`, and there is one.
fn all_in(addrs: &[String], pool: &IpNet) -> bool {
    !addrs.is_empty()
        && addrs.iter().all(|a| {
            a.parse::<IpNet>()
                .map(|net| pool.contains(&net.addr()))
                .unwrap_or(false)
        })
}

/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

/// An NSC on `node` with `upstream_refresh(opts)`, then `extra` (nearer the wire), and a
/// probe of its answers.
fn refreshing_nsc(
    node: &Node,
    name: &str,
    opts: UpstreamRefreshOptions,
    extra: Option<Arc<dyn Handler>>,
) -> (Chain, Answers) {
    let answers = Answers::default();
    let mut options = node
        .client_options(name)
        .handler(upstream_refresh(opts))
        .handler(answers.clone());
    if let Some(h) = extra {
        options = options.handler(h);
    }
    (client(options), answers)
}

fn upstream_options(node: &Node) -> UpstreamRefreshOptions {
    UpstreamRefreshOptions::new(node.channels())
}

/// Drops the addresses and routes of the request's IP context that are outside `pool`,
/// as the Go SDK's `strictipam` does: after a reselect the request still carries the
/// previous endpoint's addresses, which this endpoint must not keep. It sits after the
/// endpoint's IPAM.
#[derive(Clone)]
struct StrictPool(IpNet);

impl StrictPool {
    fn inside(&self, addr: &str) -> bool {
        addr.parse::<IpNet>()
            .is_ok_and(|net| self.0.contains(&net.addr()))
    }
}

#[async_trait]
impl Handler for StrictPool {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        if let Some(ip) = req
            .connection
            .as_mut()
            .and_then(|c| c.context.as_mut())
            .and_then(|c| c.ip_context.as_mut())
        {
            ip.src_ip_addrs.retain(|a| self.inside(a));
            ip.dst_ip_addrs.retain(|a| self.inside(a));
            ip.src_routes.retain(|r| self.inside(&r.prefix));
            ip.dst_routes.retain(|r| self.inside(&r.prefix));
        }
        next.request(cx, req).await
    }
}

fn strict_endpoint(name: &str, service: &str, pool: IpNet) -> EndpointSpec {
    EndpointSpec::new(name, service)
        .ipam(pool)
        .handler(StrictPool(pool))
}

/// docs/SCENARIOS.md 3: the NSC is connected to nse-1 (addresses from pool 1). The network
/// service gets a match that only nse-2 (`experimental=true`) satisfies. The
/// forwarder's netsvc_monitor notices, the NSC's heal moves the connection, and the
/// next refresh lands on nse-2 with addresses from pool 2 only (the endpoints keep to
/// their pools, as in the Go test). nse-1 got exactly one Close (the reselect closed the
/// old path).
async fn moves_when_the_service_no_longer_allows_the_endpoint(remote: bool) {
    let mesh = Sandbox::builder()
        .nodes(if remote { 2 } else { 1 })
        .build()
        .await
        .unwrap();
    let nse_node = mesh.node(0);
    let nsc_node = mesh.node(if remote { 1 } else { 0 });
    let pool1: IpNet = "10.1.0.0/24".parse().unwrap();
    let pool2: IpNet = "10.2.0.0/24".parse().unwrap();
    let nse1 = nse_node
        .endpoint(strict_endpoint("nse-1", "svc", pool1))
        .await
        .unwrap();
    let answers = Answers::default();
    let nsc = client(
        nsc_node
            .client_options("nsc")
            .handler(heal(HealOptions::new(nsc_node.channels())))
            .handler(answers.clone()),
    );
    let conn = nsc
        .request(&mut Cx::client(), request("svc", 0))
        .await
        .unwrap();
    assert_eq!(conn.network_service_endpoint_name, "nse-1");
    assert_eq!(
        conn.path.as_ref().unwrap().path_segments.len(),
        if remote { 6 } else { 4 }
    );
    assert!(all_in(&src_ips(&conn), &pool1), "{:?}", src_ips(&conn));

    let nse2 = nse_node
        .endpoint(strict_endpoint("nse-2", "svc", pool2).label("experimental", "true"))
        .await
        .unwrap();
    let changed = Instant::now();
    mesh.register_service(NetworkService {
        name: "svc".into(),
        payload: "IP".into(),
        matches: vec![Match {
            routes: vec![Destination {
                destination_selector: [("experimental".to_string(), "true".to_string())].into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    eventually(
        "the connection moved to nse-2",
        Duration::from_secs(5),
        || {
            answers
                .last()
                .is_some_and(|c| c.network_service_endpoint_name == "nse-2")
        },
    )
    .await;
    eprintln!(
        "moved after the service changed ({}): {:?}",
        if remote { "remote" } else { "local" },
        changed.elapsed()
    );
    assert_eq!(nse1.counter.closes(), 1, "the old path was closed once");
    assert_eq!(nse1.counter.requests(), 1, "nse-1 was not asked again");

    // The caller refreshes with the object it holds.
    let again = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(again.network_service_endpoint_name, "nse-2");
    assert_eq!(again.id, conn.id);
    assert_eq!(
        again.path.as_ref().unwrap().path_segments.len(),
        if remote { 6 } else { 4 }
    );
    assert!(all_in(&src_ips(&again), &pool2), "{:?}", src_ips(&again));
    assert_eq!(nse2.counter.requests(), 2);
    assert_eq!(nse2.counter.unique_requests(), 1);

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse2.counter.closes(), 1);
    assert_eq!(nse1.counter.closes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_connection_moves_when_the_service_no_longer_allows_its_endpoint() {
    moves_when_the_service_no_longer_allows_the_endpoint(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_connection_moves_when_the_service_no_longer_allows_its_endpoint() {
    moves_when_the_service_no_longer_allows_the_endpoint(true).await;
}

/// An endpoint that gives every connection the smallest MTU asked for so far. When a
/// new connection asks for a smaller one, it asks its other connections to refresh
/// (state REFRESH_REQUESTED through its monitor), so they pick the new MTU up.
#[derive(Clone, Default)]
struct SmallestMtu(Arc<Mutex<MtuState>>);

#[derive(Default)]
struct MtuState {
    smallest: Option<u32>,
    connections: HashSet<String>,
}

#[async_trait]
impl Handler for SmallestMtu {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let asked = req.connection.as_ref().map_or(0, mtu);
        let lowered = {
            let mut st = self.0.lock().unwrap();
            let lower = asked > 0 && st.smallest.is_none_or(|m| asked < m);
            let had = st.smallest.is_some();
            if lower {
                st.smallest = Some(asked);
            }
            lower && had
        };
        let mut conn = next.request(cx, req).await?;
        let others: Vec<String> = {
            let mut st = self.0.lock().unwrap();
            if let Some(m) = st.smallest {
                conn.context.get_or_insert_with(Default::default).mtu = m;
            }
            st.connections.insert(conn.id.clone());
            st.connections
                .iter()
                .filter(|id| **id != conn.id)
                .cloned()
                .collect()
        };
        if lowered {
            let monitor = cx.ext().get::<Monitor>().expect("the endpoint's monitor");
            for id in others {
                if let Some(mut other) = monitor.get(&id) {
                    other.state = State::RefreshRequested as i32;
                    monitor.publish(ConnectionEventType::Update, other);
                }
            }
        }
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        self.0.lock().unwrap().connections.remove(&conn.id);
        next.close(cx, conn).await
    }
}

async fn mtu_endpoint(node: &Node, name: &str, service: &str) -> EndpointHandle {
    node.endpoint(EndpointSpec::new(name, service).handler(SmallestMtu::default()))
        .await
        .unwrap()
}

/// docs/SCENARIOS.md 41: NSC-1 (with upstream_refresh) connects with MTU 1500; NSC-2 (without)
/// connects with MTU 1000. The endpoint asks NSC-1's connection to refresh, across the
/// remote path, and NSC-1 refreshes by itself: 3 requests at the endpoint, and NSC-1's
/// connection now has the MTU 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refreshes_when_the_endpoint_asks() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    let nse = mtu_endpoint(mesh.node(0), "nse", "svc").await;
    let (nsc1, answers1) =
        refreshing_nsc(mesh.node(1), "nsc-1", upstream_options(mesh.node(1)), None);
    let conn1 = nsc1
        .request(&mut Cx::client(), request("svc", 1500))
        .await
        .unwrap();
    assert_eq!(conn1.path.as_ref().unwrap().path_segments.len(), 6);
    assert_eq!(mtu(&conn1), 1500);

    let nsc2 = mesh.node(1).client("nsc-2");
    let conn2 = nsc2
        .request(&mut Cx::client(), request("svc", 1000))
        .await
        .unwrap();
    assert_eq!(mtu(&conn2), 1000);
    eventually("NSC-1 refreshed", Duration::from_secs(5), || {
        nse.counter.requests() == 3
    })
    .await;
    assert_eq!(nse.counter.unique_requests(), 2);
    eventually("NSC-1 has the new MTU", Duration::from_secs(5), || {
        answers1.last_of(&conn1.id).is_some_and(|c| mtu(&c) == 1000)
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(nse.counter.requests(), 3, "one refresh, no loop");

    nsc1.close(&mut Cx::client(), conn1).await.unwrap();
    nsc2.close(&mut Cx::client(), conn2).await.unwrap();
    assert_eq!(nse.counter.closes(), 2);
}

/// docs/SCENARIOS.md 42: NSC-1 holds a connection to NSE-1 (which asks for refreshes) and one
/// to NSE-2. When NSE-1 asks NSC-1's connection to refresh, the other connection
/// refreshes too with local notifications, and only then.
async fn local_notifications(on: bool) {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let node = mesh.node(0);
    let nse1 = mtu_endpoint(node, "nse-1", "svc-1").await;
    let nse2 = node
        .endpoint(EndpointSpec::new("nse-2", "svc-2"))
        .await
        .unwrap();
    let (nsc1, _) = refreshing_nsc(
        node,
        "nsc-1",
        upstream_options(node).local_notifications(on),
        None,
    );
    let to1 = nsc1
        .request(&mut Cx::client(), request("svc-1", 1500))
        .await
        .unwrap();
    let to2 = nsc1
        .request(&mut Cx::client(), request("svc-2", 1500))
        .await
        .unwrap();
    assert_eq!(to2.network_service_endpoint_name, "nse-2");

    let nsc2 = node.client("nsc-2");
    let other = nsc2
        .request(&mut Cx::client(), request("svc-1", 1000))
        .await
        .unwrap();
    eventually(
        "NSC-1's connection to NSE-1 refreshed",
        Duration::from_secs(5),
        || nse1.counter.requests() == 3,
    )
    .await;
    if on {
        eventually(
            "NSC-1's connection to NSE-2 refreshed",
            Duration::from_secs(5),
            || nse2.counter.requests() == 2,
        )
        .await;
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(nse1.counter.requests(), 3);
    assert_eq!(nse2.counter.requests(), if on { 2 } else { 1 });
    assert_eq!(nse2.counter.unique_requests(), 1);

    nsc1.close(&mut Cx::client(), to1).await.unwrap();
    nsc1.close(&mut Cx::client(), to2).await.unwrap();
    nsc2.close(&mut Cx::client(), other).await.unwrap();
    assert_eq!(nse1.counter.closes(), 2);
    assert_eq!(nse2.counter.closes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_local_notifications_the_clients_other_connections_refresh_too() {
    local_notifications(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_local_notifications_only_the_asked_connection_refreshes() {
    local_notifications(false).await;
}

/// What [`OnFirstAnswer`] does with the first answer: starts something with the call's
/// context, then waits for the future it gives before the answer goes on.
type FirstAct = Arc<dyn Fn(&mut Cx, &Connection) -> BoxFuture<'static, ()> + Send + Sync>;

/// Runs its act on the first answer that passes it, and never again.
#[derive(Clone)]
struct OnFirstAnswer {
    done: Arc<AtomicBool>,
    act: FirstAct,
}

#[async_trait]
impl Handler for OnFirstAnswer {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let conn = next.request(cx, req).await?;
        if !self.done.swap(true, Ordering::SeqCst) {
            (self.act)(cx, &conn).await;
        }
        Ok(conn)
    }
}

/// An endpoint handler that asks its first connection to refresh as soon as its
/// monitor has announced it (so while the request is still on its way back to the
/// client); `sent` is set once it asked.
fn asks_once(sent: Arc<AtomicBool>) -> OnFirstAnswer {
    let act: FirstAct = Arc::new(move |cx: &mut Cx, conn: &Connection| {
        let monitor = cx
            .ext()
            .get::<Monitor>()
            .expect("the endpoint's monitor")
            .clone();
        let handle = cx.conn().expect("a begin before").clone();
        let sent = sent.clone();
        let id = conn.id.clone();
        handle.spawn(async move {
            // The monitor announces the connection once this request returns.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Some(mut c) = monitor.get(&id) {
                    c.state = State::RefreshRequested as i32;
                    monitor.publish(ConnectionEventType::Update, c);
                    sent.store(true, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        Box::pin(async {})
    });
    OnFirstAnswer {
        done: Arc::default(),
        act,
    }
}

/// Holds the first answer on its way back to the client until the endpoint has asked
/// for a refresh (`sent`), and a little longer so that the managers and forwarders
/// relay it.
fn holds_first_answer(sent: Arc<AtomicBool>) -> OnFirstAnswer {
    let act: FirstAct = Arc::new(move |_: &mut Cx, _: &Connection| {
        let sent = sent.clone();
        Box::pin(async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !sent.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        })
    });
    OnFirstAnswer {
        done: Arc::default(),
        act,
    }
}

/// docs/SCENARIOS.md 43: the endpoint asks for a refresh while the NSC is still on the return
/// path of its Request (its upstream_refresh does not follow the next hop yet). The
/// refresh is not lost: the managers and forwarders keep the state the endpoint
/// published, and the NSC's subscription starts with it. NSE requests = 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_asked_while_the_client_still_returns_is_not_lost() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    let sent = Arc::new(AtomicBool::new(false));
    let nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse", "svc").handler(asks_once(sent.clone())))
        .await
        .unwrap();
    let hold = holds_first_answer(sent.clone());
    let (nsc, answers) = refreshing_nsc(
        mesh.node(1),
        "nsc",
        upstream_options(mesh.node(1)),
        Some(Arc::new(hold)),
    );
    let conn = nsc
        .request(&mut Cx::client(), request("svc", 0))
        .await
        .unwrap();
    assert!(sent.load(Ordering::SeqCst), "asked during the return path");
    eventually("the NSC refreshed", Duration::from_secs(5), || {
        nse.counter.requests() == 2
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(nse.counter.requests(), 2, "one refresh, no loop");
    assert_eq!(nse.counter.unique_requests(), 1);
    assert_eq!(answers.count(), 2);

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse.counter.closes(), 1);
}
