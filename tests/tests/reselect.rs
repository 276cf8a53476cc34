//! Reselect and forwarder selection through restarts and deaths (docs/SCENARIOS.md 5.3: 26,
//! 29, 31; 5.4: 33, 34, 35; 5.5: 36-40; 5.2: 18).
//!
//! The NSC chain is the client chain with `heal` among the application handlers (after
//! `begin` and `retry`), then a [`Gate`], a counter of what heal lets through (the
//! caller's requests and closes, and heal's own, including the Close that `begin` sends
//! before a reselect) and a probe that records every successful answer.
//!
//! The Go tests restart or kill several components "at once" and rely on heal being
//! slower than the test. Where the order matters here (a restart must be complete, or an
//! endpoint dead, before heal's first attempt), the test closes the gate first: heal's
//! attempts wait there until the test has done every step, so each test runs one way
//! only. The gate changes nothing else: heal's attempts pass it unchanged.
//!
//! Forwarders count what passes their `begin` ([`Node::forwarder_counter`]), across
//! restarts, as the Go tests' forwarder `count.Server`s do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::NetworkServiceEndpoint;
use nsm_sdk::chains::{client, Store};
use nsm_sdk::handlers::{heal, HealOptions, LivenessFn};
use nsm_sdk::registry::select::FORWARDER_SERVICE;
use nsm_sdk::sandbox::{
    counter, inject, Counter, EndpointHandle, EndpointSpec, Inject, Node, Sandbox,
};
use nsm_sdk::{async_trait, Chain, Cx, Handler, Next};
use nsm_testkit::Answers;
use nsm_testkit::{eventually, names, refresh, request};
use tokio::sync::watch;

/// Holds requests while closed; closes pass.
#[derive(Clone)]
struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    fn open() -> Self {
        Gate(Arc::new(watch::Sender::new(true)))
    }
    fn set(&self, open: bool) {
        self.0.send_replace(open);
    }
}

#[async_trait]
impl Handler for Gate {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let mut open = self.0.subscribe();
        // The sender lives in `self`: waiting cannot fail.
        let _ = open.wait_for(|o| *o).await;
        next.request(cx, req).await
    }
}

/// An NSC with `heal(opts)`, a gate, a counter of what passes the gate (`attempts`),
/// an optional injector (after the counter, as the Go tests' client injectors) and the
/// answers probe.
struct Nsc {
    chain: Chain,
    gate: Gate,
    attempts: Counter,
    answers: Answers,
}

fn nsc_with(node: &Node, opts: HealOptions, inject: Option<Inject>, retry: bool) -> Nsc {
    let gate = Gate::open();
    let attempts = counter();
    let answers = Answers::default();
    let mut options = node
        .client_options("nsc")
        .handler(heal(opts))
        .handler(gate.clone())
        .handler(attempts.clone());
    if let Some(i) = inject {
        options = options.handler(i);
    }
    if !retry {
        options = options.retry(None);
    }
    let chain = client(options.handler(answers.clone()));
    Nsc {
        chain,
        gate,
        attempts,
        answers,
    }
}

/// An NSC with heal and retry on `node` whose every Close fails.
fn nsc_whose_closes_fail(node: &Node) -> Nsc {
    let fail_closes = inject();
    fail_closes.fail_closes(true);
    nsc_with(node, heal_options(node), Some(fail_closes), true)
}

fn nsc(node: &Node) -> Nsc {
    nsc_with(node, heal_options(node), None, true)
}

fn heal_options(node: &Node) -> HealOptions {
    HealOptions::new(node.channels())
}

impl Nsc {
    async fn request(&self, service: &str) -> Connection {
        self.chain
            .request(&mut Cx::client(), request(service))
            .await
            .unwrap()
    }
    async fn refresh(&self, conn: &Connection) -> Connection {
        self.chain
            .request(&mut Cx::client(), refresh(conn))
            .await
            .unwrap()
    }
    async fn close(&self, conn: &Connection) {
        self.chain
            .close(&mut Cx::client(), conn.clone())
            .await
            .unwrap();
    }
}

/// The name at path segment `i`.
fn at(conn: &Connection, i: usize) -> String {
    names(conn).get(i).cloned().unwrap_or_default()
}

/// Waits until the NSC's last answer came from `nse`.
async fn healed_to(nsc: &Nsc, nse: &str) {
    eventually(&format!("healed to {nse}"), Duration::from_secs(8), || {
        nsc.answers.last_endpoint() == nse
    })
    .await;
}

async fn endpoint(node: &Node, name: &str) -> EndpointHandle {
    node.endpoint(EndpointSpec::new(name, "icmp"))
        .await
        .unwrap()
}

fn fwd_counter(node: &Node, name: &str) -> Counter {
    node.forwarder_counter(name)
        .unwrap_or_else(|| panic!("no forwarder {name}"))
}

/// Waits until the registry lists `n` forwarders: after a registry restart each comes
/// back at its own (jittered) refresh, possibly after the endpoint.
async fn forwarders_registered(mesh: &Sandbox, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let query = NetworkServiceEndpoint {
        network_service_names: vec![FORWARDER_SERVICE.to_string()],
        ..Default::default()
    };
    loop {
        let found = mesh
            .registries()
            .nse
            .list(&mut Cx::client(), query.clone())
            .await
            .map_or(0, |f| f.len());
        if found >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registry lists {found} forwarders, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn labels() -> HashMap<String, String> {
    HashMap::new()
}

// ---------------------------------------------------------------------------------
// 5.3 item 26: TestNSMGR_HealNSMgr
// ---------------------------------------------------------------------------------

/// docs/SCENARIOS.md 26, Local Restored: the NSE is on another node; the NSC's own NSMgr
/// restarts (fresh state, same URL; the node's forwarder and endpoints register with
/// it again). Heal re-requests the same path through the restored NSMgr, which takes
/// the forwarder from the path: the NSE sees a refresh of the same connection
/// (requests 2, no Close); a refresh with the old object makes 3; Close reaches the
/// NSE once. The gate holds heal's re-request until the NSMgr is back: without it the
/// re-request may reach the dead NSMgr and heal reselects (no liveness check says the
/// data plane is fine), which closes and re-requests the NSE (Go's heal, which always
/// reselects without a liveness check, gives closes 2 in some versions for the same
/// reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heals_through_the_restarted_local_nsmgr_to_the_same_endpoint() {
    let mesh = Sandbox::builder().nodes(3).build().await.unwrap();
    let nse = endpoint(mesh.node(1), "nse-1").await;
    let nsc = nsc(mesh.node(0));
    let conn = nsc.request("icmp").await;
    assert_eq!(names(&conn).len(), 6);
    assert_eq!(nse.counter.requests(), 1);

    nsc.gate.set(false);
    mesh.node(0).kill_nsmgr();
    mesh.node(0).start_nsmgr().await.unwrap();
    nsc.gate.set(true);
    eventually(
        "healed through the restored NSMgr",
        Duration::from_secs(8),
        || nsc.answers.count() == 2,
    )
    .await;
    let healed = nsc.answers.last().unwrap();
    assert_eq!(names(&healed), names(&conn), "the same path");
    assert_eq!(nse.counter.requests(), 2);
    assert_eq!(nse.counter.unique_requests(), 1);
    assert_eq!(nse.counter.closes(), 0, "a re-request, not a reselect");

    nsc.refresh(&conn).await;
    assert_eq!(nse.counter.requests(), 3);
    nsc.close(&conn).await;
    assert_eq!(nse.counter.closes(), 1);
    assert_eq!(nse.counter.requests(), 3);
}

/// docs/SCENARIOS.md 26, Remote New: NSE-2 waits on a third node; the NSMgr of the NSE's node
/// dies for good. Heal moves the connection to NSE-2; a refresh with the old object
/// and the Close reach NSE-2; the unreachable NSE-1 gets nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heals_to_an_endpoint_on_a_third_node_when_the_remote_nsmgr_dies() {
    let mesh = Sandbox::builder().nodes(3).build().await.unwrap();
    let nse1 = endpoint(mesh.node(1), "nse-1").await;
    let nsc = nsc(mesh.node(0));
    let conn = nsc.request("icmp").await;
    assert_eq!(conn.network_service_endpoint_name, "nse-1");

    let nse2 = endpoint(mesh.node(2), "nse-2").await;
    mesh.node(1).kill_nsmgr();
    healed_to(&nsc, "nse-2").await;
    let healed = nsc.answers.last().unwrap();
    assert_eq!(at(&healed, 3), "nsmgr-2");
    assert_eq!(nse2.counter.requests(), 1);
    assert_eq!(nse2.counter.unique_requests(), 1);

    let again = nsc.refresh(&conn).await;
    assert_eq!(again.network_service_endpoint_name, "nse-2");
    assert_eq!(nse2.counter.requests(), 2);
    nsc.close(&conn).await;
    assert_eq!(nse2.counter.closes(), 1);
    assert_eq!(nse2.counter.unique_requests(), 1);
    assert_eq!((nse1.counter.requests(), nse1.counter.closes()), (1, 0));
}

// ---------------------------------------------------------------------------------
// 5.3 item 29: Test_ForwarderShouldBeSelectedCorrectlyOnNSMgrRestart
// ---------------------------------------------------------------------------------

/// docs/SCENARIOS.md 29: 10 times: refresh, restart the NSMgr of the NSE's node (it loses its
/// state; the node's NSE and forwarders register again), add another forwarder there.
/// The forwarder first selected stays in the path every time: the restarted NSMgr
/// takes it from the path (the segment after its own), although a new forwarder comes
/// first in its rotation now and then. The NSC has no heal, as in Go.
async fn forwarder_stays_selected_across_nsmgr_restarts(remote: bool) {
    let nodes = if remote { 2 } else { 1 };
    let mesh = Sandbox::builder().nodes(nodes).build().await.unwrap();
    let nse_node = mesh.node(nodes - 1);
    let _nse = endpoint(nse_node, "nse-1").await;
    let nsc = mesh.node(0).client("nsc");
    let segments = if remote { 6 } else { 4 };
    let expected = format!("forwarder-{}-0", nodes - 1);
    let mut conn = nsc
        .request(&mut Cx::client(), request("icmp"))
        .await
        .unwrap();
    assert_eq!(names(&conn).len(), segments);
    assert_eq!(at(&conn, segments - 2), expected);

    for i in 0..10 {
        conn = nsc
            .request(&mut Cx::client(), refresh(&conn))
            .await
            .unwrap_or_else(|e| panic!("refresh {i}: {e}"));
        assert_eq!(names(&conn).len(), segments);
        assert_eq!(at(&conn, segments - 2), expected, "iteration {i}");

        nse_node.kill_nsmgr();
        nse_node.start_nsmgr().await.unwrap();
        nse_node
            .add_forwarder(&format!("forwarder-extra-{i}"), labels())
            .await
            .unwrap();
    }
    conn = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(at(&conn, segments - 2), expected, "after the last restart");
    nsc.close(&mut Cx::client(), conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_forwarder_stays_selected_across_nsmgr_restarts() {
    forwarder_stays_selected_across_nsmgr_restarts(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_forwarder_stays_selected_across_nsmgr_restarts() {
    forwarder_stays_selected_across_nsmgr_restarts(true).await;
}

// ---------------------------------------------------------------------------------
// 5.4 items 33-35: reselect_test.go
// ---------------------------------------------------------------------------------

/// docs/SCENARIOS.md 33: restart the NSMgr(s) as configured, kill the NSE (it stays
/// registered), start NSE-2 on its node. After heal: the NSC sent exactly 1 Close
/// (`begin` closing the old path before the reselect), every forwarder got exactly 1
/// Close although a restarted NSMgr knows nothing to pass on (the forwarder closes its
/// old downstream itself when the reselect request reaches it in RESELECT_REQUESTED),
/// NSE-2 got none. A refresh adds no Close. The final Close goes all the way: NSE-2
/// gets 1, each forwarder 2 in all (1 connection id).
///
/// Heal's first attempt re-requests the old path, which fails at the dead NSE; the
/// reselect follows. The gate holds that first attempt until the restarts, the kill and
/// NSE-2 are done, so the path it meets is always the same.
async fn reselect_after_nsmgr_restart(nodes: usize, restart_local: bool, restart_remote: bool) {
    let mesh = Sandbox::builder().nodes(nodes).build().await.unwrap();
    let nse_node = mesh.node(nodes - 1);
    let nse1 = endpoint(nse_node, "nse-1").await;
    let nsc = nsc(mesh.node(0));
    let conn = nsc.request("icmp").await;
    assert_eq!(names(&conn).len(), if nodes > 1 { 6 } else { 4 });
    let fwds: Vec<Counter> = (0..nodes)
        .map(|i| fwd_counter(mesh.node(i), &format!("forwarder-{i}-0")))
        .collect();

    nsc.gate.set(false);
    if restart_local {
        mesh.node(0).kill_nsmgr();
        mesh.node(0).start_nsmgr().await.unwrap();
    }
    if restart_remote {
        mesh.node(1).kill_nsmgr();
        mesh.node(1).start_nsmgr().await.unwrap();
    }
    nse1.kill();
    let nse2 = endpoint(nse_node, "nse-2").await;
    nsc.gate.set(true);

    healed_to(&nsc, "nse-2").await;
    assert_eq!(nse2.counter.unique_requests(), 1);
    assert_eq!(
        nsc.attempts.closes(),
        1,
        "the NSC closes once before reselecting"
    );
    assert_eq!(nsc.attempts.unique_closes(), 1);
    for (i, f) in fwds.iter().enumerate() {
        assert_eq!(f.closes(), 1, "forwarder of node {i}");
    }
    assert_eq!(nse2.counter.closes(), 0, "the new NSE is not closed");

    nsc.refresh(&conn).await;
    assert_eq!(nse2.counter.closes(), 0);
    for (i, f) in fwds.iter().enumerate() {
        assert_eq!(f.closes(), 1, "forwarder of node {i} after the refresh");
    }

    nsc.close(&conn).await;
    assert_eq!(nsc.attempts.closes(), 2);
    assert_eq!(nse2.counter.closes(), 1);
    for (i, f) in fwds.iter().enumerate() {
        assert_eq!(f.closes(), 2, "forwarder of node {i} after Close");
        assert_eq!(f.unique_closes(), 1, "forwarder of node {i} after Close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reselect_closes_every_hop_once() {
    reselect_after_nsmgr_restart(1, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reselect_after_the_local_nsmgr_restarted_closes_every_forwarder_once() {
    reselect_after_nsmgr_restart(2, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reselect_after_the_remote_nsmgr_restarted_closes_every_forwarder_once() {
    reselect_after_nsmgr_restart(2, false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reselect_after_both_nsmgrs_restarted_closes_every_forwarder_once() {
    reselect_after_nsmgr_restart(2, true, true).await;
}

/// docs/SCENARIOS.md 34: the forwarder on the NSC's node restarts (fresh state, same name and
/// URL), the NSE dies, NSE-2 starts on its node. After heal the restarted forwarder got
/// no Close (it knows nothing of the connection, so its `begin` stops the Close), the
/// remote forwarder 1 (from its RESELECT_REQUESTED handling), NSE-2 none; a refresh
/// adds none; the final Close reaches NSE-2 and every forwarder.
async fn reselect_after_local_forwarder_restart(nodes: usize) {
    let mesh = Sandbox::builder().nodes(nodes).build().await.unwrap();
    let nse_node = mesh.node(nodes - 1);
    let nse1 = endpoint(nse_node, "nse-1").await;
    let nsc = nsc(mesh.node(0));
    let conn = nsc.request("icmp").await;
    let local = fwd_counter(mesh.node(0), "forwarder-0-0");
    let remote = (nodes > 1).then(|| fwd_counter(mesh.node(1), "forwarder-1-0"));

    nsc.gate.set(false);
    mesh.node(0)
        .restart_forwarder("forwarder-0-0")
        .await
        .unwrap();
    nse1.kill();
    let nse2 = endpoint(nse_node, "nse-2").await;
    nsc.gate.set(true);

    healed_to(&nsc, "nse-2").await;
    assert_eq!(nsc.attempts.unique_closes(), 1);
    assert_eq!(local.closes(), 0, "the restarted forwarder");
    if let Some(r) = &remote {
        assert_eq!(r.closes(), 1, "the remote forwarder");
    }
    assert_eq!(nse2.counter.closes(), 0);

    nsc.refresh(&conn).await;
    assert_eq!(nse2.counter.closes(), 0);
    assert_eq!(local.closes(), 0);
    if let Some(r) = &remote {
        assert_eq!(r.closes(), 1);
    }

    let closes = nsc.attempts.closes();
    nsc.close(&conn).await;
    assert_eq!(nsc.attempts.closes(), closes + 1);
    assert_eq!(nse2.counter.closes(), 1);
    assert_eq!(local.closes(), 1);
    if let Some(r) = &remote {
        assert_eq!(r.closes(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_forwarder_restart_then_endpoint_death_reselects() {
    reselect_after_local_forwarder_restart(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_path_local_forwarder_restart_then_endpoint_death_reselects() {
    reselect_after_local_forwarder_restart(2).await;
}

/// docs/SCENARIOS.md 35: the registry dies, then the NSC closes. The Close still reaches the
/// forwarder and the NSE, exactly once each: every hop remembers where it sent the
/// connection and needs no lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reaches_every_hop_after_the_registry_died() {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let nse = endpoint(mesh.node(0), "nse-1").await;
    let fwd = fwd_counter(mesh.node(0), "forwarder-0-0");
    let nsc = nsc(mesh.node(0));
    let conn = nsc.request("icmp").await;

    mesh.kill_registry();
    nsc.close(&conn).await;
    assert_eq!(nsc.attempts.closes(), 1);
    assert_eq!(fwd.closes(), 1);
    assert_eq!(nse.counter.closes(), 1);
}

// ---------------------------------------------------------------------------------
// 5.5 items 36-40: select_forwarder_test.go
// ---------------------------------------------------------------------------------

/// docs/SCENARIOS.md 36 (as the Go test): the NSE fails every request after the first, so a
/// refresh (1 s deadline) fails; every hop keeps the established connection, and the
/// caller's Close then reaches the NSE (1 Close). No heal, so nothing else closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_after_a_failed_refresh_reaches_the_endpoint() {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let nse = endpoint(mesh.node(0), "nse-1").await;
    nse.inject.fail_after(1);
    let nsc = mesh.node(0).client("nsc");
    let conn = nsc
        .request(&mut Cx::client(), request("icmp"))
        .await
        .unwrap();
    assert_eq!(nse.counter.requests(), 1);

    let failed = nsc
        .request(
            &mut Cx::client().with_timeout(Duration::from_secs(1)),
            refresh(&conn),
        )
        .await;
    assert!(failed.is_err(), "the refresh must fail");
    assert_eq!(nse.counter.closes(), 0);
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse.counter.closes(), 1);
}

/// docs/SCENARIOS.md 36 (as docs/SCENARIOS.md words it, with heal): the failed refresh leaves the
/// hops DOWN; heal re-requests, then reselects, and the reselect's Close of the old
/// path reaches the NSE (1 Close). Heal keeps trying (the NSE fails everything); the
/// caller's Close then succeeds without another NSE Close (the old path is gone) and
/// ends heal: the NSE sees no more requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_closes_the_endpoint_once_after_a_failed_refresh() {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let nse = endpoint(mesh.node(0), "nse-1").await;
    nse.inject.fail_after(1);
    let nsc = nsc(mesh.node(0));
    let conn = nsc.request("icmp").await;

    let failed = nsc
        .chain
        .request(
            &mut Cx::client().with_timeout(Duration::from_secs(1)),
            refresh(&conn),
        )
        .await;
    assert!(failed.is_err(), "the refresh must fail");
    eventually(
        "heal's reselect closed the NSE",
        Duration::from_secs(5),
        || nse.counter.closes() == 1,
    )
    .await;
    nsc.close(&conn).await;
    assert_eq!(nse.counter.closes(), 1, "no second Close");
    let requests = nse.counter.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(nse.counter.requests(), requests, "heal went on after Close");
}

/// docs/SCENARIOS.md 37: 10 forwarders; the NSE fails the first 5 requests, so the NSMgr fails
/// over forwarder by forwarder and the 6th carries the connection (6 requests, 6
/// connection ids: each failed forwarder made its own). Then, 3 times: Close, and
/// re-Request with the old connection while the NSE fails the next 2 requests. The
/// NSMgr (which forgot the connection at Close) first tries the forwarder named in the
/// path, which fails, then the next ones: the 3rd try passes, through a different
/// forwarder. Exactly 3 NSE requests per round, all with the connection id the NSE
/// already knows (the failed forwarders' segments are replaced in the path, the NSE's
/// segment stays). Go reaches a different forwarder only "by luck" and retries; here
/// the rotation makes it certain, so every round checks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_request_after_close_moves_to_another_forwarder_when_the_old_one_fails() {
    const FORWARDERS: usize = 10;
    let skip = FORWARDERS / 2;
    let mesh = Sandbox::builder()
        .nodes(1)
        .forwarders_per_node(FORWARDERS)
        .build()
        .await
        .unwrap();
    let nse = endpoint(mesh.node(0), "nse-1").await;
    nse.inject.fail_next(skip);
    let nsc = nsc(mesh.node(0));
    let mut conn = nsc.request("icmp").await;
    assert_eq!(nse.counter.unique_requests(), skip + 1);
    assert_eq!(nse.counter.requests(), skip + 1);

    for round in 0..3 {
        let before = at(&conn, 2);
        let requests = nse.counter.requests();
        nsc.close(&conn).await;
        nse.inject.fail_next(2);
        conn = nsc.refresh(&conn).await;
        assert_eq!(nse.counter.unique_requests(), skip + 1, "round {round}");
        assert_eq!(nse.counter.requests(), requests + 3, "round {round}");
        assert_ne!(at(&conn, 2), before, "round {round}: the same forwarder");
    }
    nsc.close(&conn).await;
}

/// docs/SCENARIOS.md 38: 10 forwarders; the NSC's Close always fails (Go: so that a Close from
/// heal cannot clear the forwarder name). The selected forwarder dies. Heal re-requests
/// the same path; the NSMgr, whose remembered forwarder does not answer, fails over to
/// another one within that request, which refreshes the same NSE connection: NSE
/// requests 2, unique 1, and no Close. (Go's heal, without a liveness check, always
/// reselects, and the NSE's `begin` closes the old connection on RESELECT_REQUESTED:
/// Go counts 1 Close there.) The caller's refresh with its old object stays on the new
/// forwarder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_moves_to_another_forwarder_when_the_selected_one_dies() {
    let mesh = Sandbox::builder()
        .nodes(1)
        .forwarders_per_node(10)
        .build()
        .await
        .unwrap();
    let nse = endpoint(mesh.node(0), "nse-1").await;
    let nsc = nsc_whose_closes_fail(mesh.node(0));
    let conn = nsc.request("icmp").await;
    assert_eq!(nse.counter.requests(), 1);
    let selected = at(&conn, 2);

    assert!(mesh.node(0).kill_forwarder(&selected));
    eventually(
        "healed through another forwarder",
        Duration::from_secs(8),
        || nsc.answers.last().is_some_and(|c| at(&c, 2) != selected),
    )
    .await;
    healed_then_refreshed(&nsc, &nse, &conn, 2, &selected, 0).await;
}

/// docs/SCENARIOS.md 39: one forwarder on the NSC's node, 10 on the NSE's; the NSC's Close
/// always fails. The registry restarts (empty; registrations come back at 2/3 of their
/// 3 s expiry), then the selected remote forwarder (segment 4) dies. Heal's re-request
/// fails (the registry does not know the NSE yet), so heal reselects until the
/// registrations are back; the reselect reaches the NSE in RESELECT_REQUESTED through
/// another remote forwarder, and the NSE's `begin` closes its old connection first:
/// NSE requests 2, unique 1, closes 1 (as in Go). A refresh keeps the new forwarder.
/// The registry is in memory whatever `NSM_SANDBOX_ETCD` says: the scenario is a
/// registry that restarts empty, which one on etcd does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_moves_to_another_remote_forwarder_when_the_selected_one_dies() {
    let mesh = Sandbox::builder()
        .nodes(2)
        .forwarders_per_node(0)
        .registry_expiry(Duration::from_secs(3))
        .registry_store(Store::Memory)
        .build()
        .await
        .unwrap();
    mesh.node(0)
        .add_forwarder("forwarder-local", labels())
        .await
        .unwrap();
    for i in 0..10 {
        mesh.node(1)
            .add_forwarder(&format!("forwarder-1-{i}"), labels())
            .await
            .unwrap();
    }
    let nse = endpoint(mesh.node(1), "nse-1").await;
    let nsc = nsc_whose_closes_fail(mesh.node(0));
    let conn = nsc.request("icmp").await;
    assert_eq!(nse.counter.requests(), 1);
    let selected = at(&conn, 4);

    mesh.kill_registry();
    mesh.start_registry().await.unwrap();
    assert!(mesh.node(1).kill_forwarder(&selected));
    eventually(
        "healed through another forwarder",
        Duration::from_secs(8),
        || nse.counter.requests() >= 2,
    )
    .await;
    eventually(
        "the NSC saw the healed path",
        Duration::from_secs(2),
        || nsc.answers.last().is_some_and(|c| at(&c, 4) != selected),
    )
    .await;
    healed_then_refreshed(&nsc, &nse, &conn, 4, &selected, 1).await;
}

/// After a heal away from the forwarder `selected` (segment `segment`): the NSE saw
/// one connection twice and `closes` Closes; a refresh with the caller's old object
/// stays off `selected` and reaches the NSE a third time, closing nothing more.
async fn healed_then_refreshed(
    nsc: &Nsc,
    nse: &EndpointHandle,
    conn: &Connection,
    segment: usize,
    selected: &str,
    closes: usize,
) {
    assert_eq!(nse.counter.unique_requests(), 1);
    assert_eq!(nse.counter.requests(), 2);
    assert_eq!(nse.counter.closes(), closes);

    let again = nsc.refresh(conn).await;
    assert_ne!(at(&again, segment), selected);
    assert_eq!(nse.counter.unique_requests(), 1);
    assert_eq!(nse.counter.requests(), 3);
    assert_eq!(nse.counter.closes(), closes);
}

/// A liveness check that says "dead" once `broken` is set and the connection goes
/// through `forwarder` (segment 2).
fn dead_through(forwarder: Arc<Mutex<String>>, broken: Arc<AtomicBool>) -> LivenessFn {
    Arc::new(move |conn: &Connection| -> BoxFuture<'static, bool> {
        let alive = !broken.load(Ordering::SeqCst) || at(conn, 2) != *forwarder.lock().unwrap();
        Box::pin(async move { alive })
    })
}

/// docs/SCENARIOS.md 40: 10 forwarders; the NSC's heal has a liveness check. The registry
/// restarts (registrations come back at 2/3 of their 3 s expiry) and the selected
/// forwarder restarts (same name and URL) while the data plane is reported alive. Heal
/// re-requests the same path until it works again, never reselecting while the data
/// plane is alive, and the NSMgr keeps the connection's forwarder while it answers (its
/// "endpoint not found" comes from further down): the connection keeps its forwarder,
/// exactly one re-request reaches the NSE (no Close; `refresh` does not retry heal's
/// failed attempts on its own). Then the data plane through that forwarder is reported
/// dead and the forwarder dies: heal moves to another forwarder. Ours gets there by
/// re-requesting (the NSMgr cannot reach the forwarder and fails over to another one
/// within the request, which refreshes the NSE: no Close) before the liveness check
/// (every 30 s here) is asked; Go's heal reselects after the liveness check and counts
/// at least one Close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_selected_forwarder_is_kept_while_the_data_plane_is_fine() {
    let mesh = Sandbox::builder()
        .nodes(1)
        .forwarders_per_node(10)
        .registry_expiry(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    let node = mesh.node(0);
    let nse = endpoint(node, "nse-1").await;
    let selected = Arc::new(Mutex::new(String::new()));
    let broken = Arc::new(AtomicBool::new(false));
    let opts = heal_options(node)
        .liveness(dead_through(selected.clone(), broken.clone()))
        .liveness_interval(Duration::from_secs(30));
    let nsc = nsc_with(node, opts, None, true);
    let conn = nsc.request("icmp").await;
    let first = at(&conn, 2);
    *selected.lock().unwrap() = first.clone();

    mesh.kill_registry();
    mesh.start_registry().await.unwrap();
    node.restart_forwarder(&first).await.unwrap();
    eventually(
        "healed through the restarted forwarder",
        Duration::from_secs(8),
        || nse.counter.requests() >= 2,
    )
    .await;
    assert_eq!(nse.counter.unique_requests(), 1);
    assert_eq!(nse.counter.requests(), 2);
    assert_eq!(nse.counter.closes(), 0);
    assert_eq!(at(&nsc.answers.last().unwrap(), 2), first);

    let again = nsc.refresh(&conn).await;
    assert_eq!(at(&again, 2), first, "the forwarder is kept");
    assert_eq!(nse.counter.requests(), 3);
    assert_eq!(nse.counter.closes(), 0);

    // The move below is a failover within heal's re-request: it needs the other
    // forwarders back in the restarted registry. With none of them there yet the
    // re-request fails, the liveness check says dead and heal reselects, which the NSE
    // counts as a Close (correct, but another scenario: 39).
    forwarders_registered(&mesh, 10).await;
    broken.store(true, Ordering::SeqCst);
    assert!(node.kill_forwarder(&first));
    eventually(
        "healed through another forwarder",
        Duration::from_secs(8),
        || nse.counter.requests() >= 4,
    )
    .await;
    let again = nsc.refresh(&conn).await;
    assert_ne!(at(&again, 2), first);
    assert_eq!(nse.counter.unique_requests(), 1);
    assert_eq!(nse.counter.requests(), 5);
    assert_eq!(nse.counter.closes(), 0);
}

// ---------------------------------------------------------------------------------
// 5.2 item 18: Test_RestartDuringRefresh
// ---------------------------------------------------------------------------------

/// Kills the node's forwarders while a request passes, once per `armed`.
#[derive(Clone)]
struct KillForwarders {
    mesh: Arc<Sandbox>,
    armed: Arc<AtomicBool>,
}

#[async_trait]
impl Handler for KillForwarders {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        if self.armed.swap(false, Ordering::SeqCst) {
            assert!(self.mesh.node(0).kill_forwarder("forwarder-0-0"));
        }
        next.request(cx, req).await
    }
}

/// docs/SCENARIOS.md 18 (5 rounds instead of 15): a midchain refresh (a Request event queued on
/// the NSC's connection, as the refresh timer does) is under way when the forwarder
/// dies: the NSE kills it while it handles the refresh, so the answer cannot get back.
/// The refresh returns an error; the forwarder is started again when it has returned;
/// heal re-establishes the connection (a new successful answer reaches the NSC).
///
/// The NSC has no `retry`: in Go the event does not pass the client's retry, so the
/// refresh fails. Ours sits after `begin`, where events pass it, so with it the refresh
/// itself would be retried and succeed once the forwarder is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_recovers_when_the_forwarder_dies_during_a_midchain_refresh() {
    let mesh = Arc::new(Sandbox::builder().nodes(1).build().await.unwrap());
    let armed = Arc::new(AtomicBool::new(false));
    let nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse-1", "icmp").handler(KillForwarders {
            mesh: mesh.clone(),
            armed: armed.clone(),
        }))
        .await
        .unwrap();
    let nsc = nsc_with(mesh.node(0), heal_options(mesh.node(0)), None, false);
    let conn = nsc.request("icmp").await;
    let handle = nsc.answers.handle();

    handle.request_event(None).await.unwrap();
    assert_eq!(nse.counter.requests(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(nse.counter.requests(), 2, "nothing else asks the NSE");

    for round in 0..5 {
        let answers = nsc.answers.count();
        armed.store(true, Ordering::SeqCst);
        let refreshed = handle.request_event(None).await;
        assert!(
            refreshed.is_err(),
            "round {round}: the refresh succeeded: {refreshed:?}"
        );
        assert!(!armed.load(Ordering::SeqCst), "round {round}: no kill");
        mesh.node(0)
            .restart_forwarder("forwarder-0-0")
            .await
            .unwrap();
        eventually(
            &format!("round {round}: heal re-established the connection"),
            Duration::from_secs(5),
            || nsc.answers.count() > answers,
        )
        .await;
    }
    assert_eq!(nse.counter.unique_requests(), 1);
    nsc.close(&conn).await;
}

/// docs/SCENARIOS.md 31 (refresh failed, control plane broken): a refresh is paused inside the
/// NSC's client chain (at the gate) when the forwarder dies; it then fails. A new
/// forwarder appears and heal delivers exactly one more request to the NSE. (Go
/// triggers the refresh with a mock clock; here it is the same Request event the
/// refresh timer queues.) The NSC has no `retry`, as in scenario 18.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_paused_while_the_forwarder_dies_fails_and_heal_delivers_one_request() {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse-1", "icmp"))
        .await
        .unwrap();
    let nsc = nsc_with(mesh.node(0), heal_options(mesh.node(0)), None, false);
    let conn = nsc.request("icmp").await;
    let handle = nsc.answers.handle();
    let before = nse.counter.requests();
    let attempts = nsc.attempts.requests();

    nsc.gate.set(false);
    let refresh = handle.request_event(None);
    // Let the refresh reach the gate (it has not passed it: the gate is closed).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        nsc.attempts.requests(),
        attempts,
        "the refresh passed a closed gate"
    );
    assert!(mesh.node(0).kill_forwarder("forwarder-0-0"));
    nsc.gate.set(true);
    assert!(
        refresh.await.is_err(),
        "the refresh through a dead forwarder succeeded"
    );
    assert_eq!(
        nse.counter.requests(),
        before,
        "the failed refresh reached the NSE"
    );

    mesh.node(0)
        .restart_forwarder("forwarder-0-0")
        .await
        .unwrap();
    eventually(
        "heal delivered a request to the NSE",
        Duration::from_secs(5),
        || nse.counter.requests() > before,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        nse.counter.requests(),
        before + 1,
        "heal delivered more than one request"
    );
    // Whether heal's first try re-requests the old path or, when the new forwarder is
    // not up yet, reselects (which closes the old path first) depends on timing; either
    // way exactly one request reached the NSE, and the final Close reaches it once.
    let closes = nse.counter.closes();
    assert!(closes <= 1, "{closes} closes before the final one");
    nsc.close(&conn).await;
    assert_eq!(nse.counter.closes(), closes + 1);
}
