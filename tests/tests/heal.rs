//! Heal scenarios through a sandbox mesh (docs/SCENARIOS.md 5.3: 21, 22, 23, 24, 25 local and remote, 28, 30, 32).
//!
//! The NSC chain is the client chain with `heal` among the application handlers, that
//! is after `begin` and `retry` (see the `heal` module docs for why after `retry`), and
//! a probe after it that records every answer. The managers and forwarders relay their
//! downstream's monitor events (`monitor_relay` in their `connect` client chains), so the
//! death of any hop reaches the NSC as DOWN.
//!
//! Each test prints its heal time, from the kill to the first successful request on the
//! healed path (`cargo test --test heal -- --nocapture`).
//!
//! Every test runs on a runtime of its own that is dropped before the next test may
//! start a test that counts live tasks (`live_tasks` is process-wide).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use nsm_proto::connection::{Connection, State};
use nsm_sdk::chains::client;
use nsm_sdk::core::live_tasks;
use nsm_sdk::handlers::{default_reselect, heal, HealEvent, HealOptions, LivenessFn};
use nsm_sdk::sandbox::{counter, Counter, EndpointHandle, EndpointSpec, Node, Sandbox};
use nsm_sdk::{Chain, Cx};
use nsm_testkit::Answers;
use nsm_testkit::{eventually, names, refresh, request};
use tokio::time::Instant;

/// Serialises the tests that count live tasks against all others.
static TASKS: RwLock<()> = RwLock::new(());

/// Runs `test` on a runtime of its own; `counts_tasks` runs it alone.
fn scenario(counts_tasks: bool, test: impl Future<Output = ()>) {
    let _shared;
    let _alone;
    if counts_tasks {
        _alone = TASKS.write().unwrap_or_else(|p| p.into_inner());
    } else {
        _shared = TASKS.read().unwrap_or_else(|p| p.into_inner());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(test);
    // Every task of this test is gone before the lock is released.
    drop(rt);
}

/// An NSC on `node` with `heal(opts)`; `attempts` counts the requests heal lets through
/// (the caller's and heal's own), `answers` the successful ones.
struct Nsc {
    chain: Chain,
    attempts: Counter,
    answers: Answers,
}

fn nsc(node: &Node, opts: HealOptions) -> Nsc {
    let attempts = counter();
    let answers = Answers::default();
    let chain = client(
        node.client_options("nsc")
            .handler(heal(opts))
            .handler(attempts.clone())
            .handler(answers.clone()),
    );
    Nsc {
        chain,
        attempts,
        answers,
    }
}

fn heal_options(node: &Node) -> HealOptions {
    HealOptions::new(node.channels())
}

/// Waits until the NSC's last answer came from `nse` and prints the heal time.
async fn healed_to(nsc: &Nsc, nse: &str, since: Instant, what: &str) -> Duration {
    eventually(&format!("healed to {nse}"), Duration::from_secs(8), || {
        nsc.answers.last_endpoint() == nse
    })
    .await;
    let took = since.elapsed();
    eprintln!("heal time ({what}): {took:?}");
    took
}

/// A liveness check that says "dead" while `broken` is set and the connection's
/// endpoint is `bad`.
fn dead_while_on(bad: &'static str, broken: Arc<AtomicBool>) -> LivenessFn {
    Arc::new(move |conn: &Connection| -> BoxFuture<'static, bool> {
        let alive = !(broken.load(Ordering::SeqCst) && conn.network_service_endpoint_name == bad);
        Box::pin(async move { alive })
    })
}

async fn endpoint(node: &Node, name: &str) -> EndpointHandle {
    node.endpoint(EndpointSpec::new(name, "icmp"))
        .await
        .unwrap()
}

/// docs/SCENARIOS.md 21: the NSE dies (and the registry notices); a new NSE appears on its
/// node. Heal moves the connection to it; a refresh with the caller's old connection
/// object works and reaches the new NSE; Close with the old object reaches it once.
async fn heals_to_a_new_endpoint_after_the_endpoint_dies(remote: bool) {
    let mesh = Sandbox::builder()
        .nodes(if remote { 2 } else { 1 })
        .build()
        .await
        .unwrap();
    let nse_node = mesh.node(0);
    let nsc_node = mesh.node(if remote { 1 } else { 0 });
    let nse1 = endpoint(nse_node, "nse-1").await;
    let nsc = nsc(nsc_node, heal_options(nsc_node));
    let conn = nsc
        .chain
        .request(&mut Cx::client(), request("icmp"))
        .await
        .unwrap();
    assert_eq!(names(&conn).len(), if remote { 6 } else { 4 });
    assert_eq!(conn.network_service_endpoint_name, "nse-1");

    let killed = Instant::now();
    nse1.kill();
    nse1.unregister().await.unwrap();
    let nse2 = endpoint(nse_node, "nse-2").await;
    healed_to(
        &nsc,
        "nse-2",
        killed,
        if remote { "21 remote" } else { "21 local" },
    )
    .await;
    assert_eq!(nse2.counter.requests(), 1);
    assert_eq!(nse2.counter.unique_requests(), 1);
    let healed = nsc.answers.last().unwrap();
    assert_eq!(names(&healed).last().map(String::as_str), Some("nse-2"));
    assert_eq!(healed.id, conn.id, "the connection keeps its id");

    // The caller still holds the old object.
    let again = nsc
        .chain
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(again.network_service_endpoint_name, "nse-2");
    assert_eq!(nse2.counter.requests(), 2);
    assert_eq!(nse2.counter.unique_requests(), 1);

    nsc.chain.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse2.counter.closes(), 1);
    assert_eq!(nse1.counter.closes(), 0, "the dead NSE got nothing");
}

#[test]
fn heals_to_a_new_local_endpoint_after_the_endpoint_dies() {
    scenario(
        false,
        heals_to_a_new_endpoint_after_the_endpoint_dies(false),
    );
}

#[test]
fn heals_to_a_new_remote_endpoint_after_the_endpoint_dies() {
    scenario(false, heals_to_a_new_endpoint_after_the_endpoint_dies(true));
}

/// An NSC on `node` connected to `nse-1` (started here), whose liveness check fails
/// while it is on `nse-1` once the returned flag is set.
async fn on_nse1_until_broken(node: &Node) -> (EndpointHandle, Arc<AtomicBool>, Nsc, Connection) {
    let nse1 = endpoint(node, "nse-1").await;
    let broken = Arc::new(AtomicBool::new(false));
    let nsc = nsc(
        node,
        heal_options(node)
            .liveness(dead_while_on("nse-1", broken.clone()))
            .liveness_interval(Duration::from_millis(100)),
    );
    let conn = nsc
        .chain
        .request(&mut Cx::client(), request("icmp"))
        .await
        .unwrap();
    assert_eq!(conn.network_service_endpoint_name, "nse-1");
    (nse1, broken, nsc, conn)
}

/// docs/SCENARIOS.md 22: the NSE dies and the data plane to it is dead too (the liveness check
/// fails while the connection is on NSE-1); the dead NSE stays registered. Heal
/// reselects to NSE-2.
#[test]
fn a_dead_endpoint_and_data_plane_reselect_to_the_second_endpoint() {
    scenario(false, async {
        let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
        let node = mesh.node(0);
        let (nse1, broken, nsc, conn) = on_nse1_until_broken(node).await;

        let nse2 = endpoint(node, "nse-2").await;
        let killed = Instant::now();
        nse1.kill();
        broken.store(true, Ordering::SeqCst);
        healed_to(&nsc, "nse-2", killed, "22").await;
        assert_eq!(nse2.counter.unique_requests(), 1);

        let again = nsc
            .chain
            .request(&mut Cx::client(), refresh(&conn))
            .await
            .unwrap();
        assert_eq!(again.network_service_endpoint_name, "nse-2");
        nsc.chain.close(&mut Cx::client(), conn).await.unwrap();
        assert_eq!(nse2.counter.closes(), 1);
    });
}

/// docs/SCENARIOS.md 23: the NSE is alive but the data plane to it breaks (the liveness check
/// fails). Heal reselects anyway: the old path is closed (NSE-1 gets its Close) and
/// the connection lands on NSE-2; refresh and Close behave as in 21.
#[test]
fn a_broken_data_plane_to_a_live_endpoint_reselects_to_the_second_endpoint() {
    scenario(false, async {
        let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
        let node = mesh.node(0);
        let (nse1, broken, nsc, conn) = on_nse1_until_broken(node).await;
        let nse2 = endpoint(node, "nse-2").await;

        let broke = Instant::now();
        broken.store(true, Ordering::SeqCst);
        healed_to(&nsc, "nse-2", broke, "23").await;
        // Round robin may offer NSE-1 again before NSE-2: each visit there is closed
        // by the next reselect.
        assert!(nse1.counter.closes() >= 1, "the old path was not closed");
        assert_eq!(nse1.counter.closes(), nse1.counter.requests());
        assert_eq!(nse2.counter.unique_requests(), 1);

        let before = nse2.counter.requests();
        let again = nsc
            .chain
            .request(&mut Cx::client(), refresh(&conn))
            .await
            .unwrap();
        assert_eq!(again.network_service_endpoint_name, "nse-2");
        assert_eq!(nse2.counter.requests(), before + 1);
        let nse1_closes = nse1.counter.closes();
        nsc.chain.close(&mut Cx::client(), conn).await.unwrap();
        assert_eq!(nse2.counter.closes(), 1);
        assert_eq!(nse1.counter.closes(), nse1_closes);
    });
}

/// docs/SCENARIOS.md 25: the NSE is remote (node 0, the NSC on node 1); the forwarder of the
/// path on `node` dies and a new one starts there: on the NSC's node (Local, segment 2)
/// or on the NSE's (Remote, segment 4). Heal re-routes through it to the same NSE
/// connection (one unique id: the NSE's segment keeps its id because the NSE keeps its
/// name, so it sees a refresh, requests 2); a refresh and the Close reach the NSE.
async fn heals_through_a_new_forwarder(node: usize, what: &str) {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    let nse = endpoint(mesh.node(0), "nse").await;
    let nsc = nsc(mesh.node(1), heal_options(mesh.node(1)));
    let segment = if node == 1 { 2 } else { 4 };
    let (old, new) = (format!("forwarder-{node}-0"), format!("forwarder-{node}-1"));
    let conn = nsc
        .chain
        .request(&mut Cx::client(), request("icmp"))
        .await
        .unwrap();
    assert_eq!(names(&conn)[segment], old);
    assert_eq!(nse.counter.requests(), 1);

    let killed = Instant::now();
    assert!(mesh.node(node).kill_forwarder(&old));
    mesh.node(node)
        .add_forwarder(&new, HashMap::new())
        .await
        .unwrap();
    eventually(
        &format!("healed through {new}"),
        Duration::from_secs(8),
        || {
            nsc.answers
                .last()
                .is_some_and(|c| names(&c).get(segment) == Some(&new))
        },
    )
    .await;
    eprintln!("heal time ({what}): {:?}", killed.elapsed());
    assert_eq!(nse.counter.requests(), 2);
    assert_eq!(nse.counter.unique_requests(), 1, "the same NSE connection");

    let again = nsc
        .chain
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(names(&again)[segment], new);
    assert_eq!(nse.counter.requests(), 3);
    let closes = nse.counter.closes();
    nsc.chain.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse.counter.closes(), closes + 1);
}

#[test]
fn heals_through_a_new_forwarder_on_the_clients_node() {
    scenario(false, heals_through_a_new_forwarder(1, "25 local"));
}

#[test]
fn heals_through_a_new_forwarder_on_the_endpoints_node() {
    scenario(false, heals_through_a_new_forwarder(0, "25 remote"));
}

/// docs/SCENARIOS.md 28: the NSE dies and nothing can replace it, so heal keeps trying; then
/// the NSC closes. Every task heal and the relays started ends (the live task count
/// returns to where it was before the connection). `unregister`: the registry noticed
/// the death (the variant "NSE expired" of the Go test).
async fn close_ends_every_heal_task(unregister: bool) {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let node = mesh.node(0);
    let before_nse = live_tasks();
    let nse = endpoint(node, "nse-1").await;
    let baseline = if unregister { before_nse } else { live_tasks() };
    let nsc = nsc(node, heal_options(node));
    let conn = nsc
        .chain
        .request(&mut Cx::client(), request("icmp"))
        .await
        .unwrap();
    // heal at the NSC, relays at the manager and the forwarder.
    eventually("heal and relays run", Duration::from_secs(5), || {
        live_tasks() >= baseline + 3
    })
    .await;

    nse.kill();
    if unregister {
        nse.unregister().await.unwrap();
    }
    let first = nsc.attempts.requests();
    eventually("heal is trying", Duration::from_secs(5), || {
        nsc.attempts.requests() >= first + 3
    })
    .await;
    nsc.chain.close(&mut Cx::client(), conn).await.unwrap();
    eventually(
        &format!(
            "the task count returns to {baseline} (it is {})",
            live_tasks()
        ),
        Duration::from_secs(5),
        || live_tasks() == baseline,
    )
    .await;
    // And stays there: nothing comes back to life.
    let attempts = nsc.attempts.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(live_tasks(), baseline);
    assert_eq!(
        nsc.attempts.requests(),
        attempts,
        "heal went on after Close"
    );
}

#[test]
fn close_ends_every_heal_task_while_the_endpoint_is_dead() {
    scenario(true, close_ends_every_heal_task(false));
}

#[test]
fn close_ends_every_heal_task_after_the_registry_forgot_the_endpoint() {
    scenario(true, close_ends_every_heal_task(true));
}

/// docs/SCENARIOS.md 32: the NSC's reselect function adds a label (and clears the NSE name, as
/// the default does); after the NSE dies, the request that reaches NSE-2 carries it.
#[test]
fn a_custom_reselect_function_shapes_the_reselect_request() {
    scenario(false, async {
        let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
        let node = mesh.node(0);
        let nse1 = endpoint(node, "nse-1").await;
        let nsc = nsc(
            node,
            heal_options(node).reselect(|req| {
                default_reselect(req);
                if let Some(c) = req.connection.as_mut() {
                    c.labels.insert("reselected".into(), "yes".into());
                }
            }),
        );
        let conn = nsc
            .chain
            .request(&mut Cx::client(), request("icmp"))
            .await
            .unwrap();
        assert!(!conn.labels.contains_key("reselected"));

        let killed = Instant::now();
        nse1.kill();
        nse1.unregister().await.unwrap();
        let nse2 = endpoint(node, "nse-2").await;
        healed_to(&nsc, "nse-2", killed, "32").await;
        let seen = nse2.counter.last().unwrap();
        assert_eq!(
            seen.labels.get("reselected").map(String::as_str),
            Some("yes")
        );
        assert_eq!(seen.state, State::ReselectRequested as i32);
        nsc.chain.close(&mut Cx::client(), conn).await.unwrap();
        assert_eq!(nse2.counter.closes(), 1);
    });
}

/// docs/SCENARIOS.md 30 (refresh failed, data plane broken). Go advances a mock clock past the
/// refresh point of a 15-minute token; here the tokens live 6 s, so the first refresh
/// comes 1.2-2.4 s after the request, in real time. NSE-1 fails every request after the
/// first, so that refresh fails; heal keeps re-requesting while the liveness check says
/// the data plane works, and once it reports it dead, heal reselects to NSE-2 exactly
/// once (no repeated heals: NSE-2 sees one request until its own first refresh, which
/// cannot come before 1.2 s).
#[test]
fn a_failed_refresh_then_a_dead_data_plane_reselects_exactly_once() {
    scenario(false, async {
        let mesh = Sandbox::builder()
            .nodes(1)
            .token_lifetime(Duration::from_secs(6))
            .build()
            .await
            .unwrap();
        let nse1 = endpoint(mesh.node(0), "nse-1").await;
        nse1.inject.fail_after(1);
        let broken = Arc::new(AtomicBool::new(false));
        let nsc = nsc(
            mesh.node(0),
            heal_options(mesh.node(0))
                .liveness(dead_while_on("nse-1", broken.clone()))
                .liveness_interval(Duration::from_millis(100)),
        );
        let conn = nsc
            .chain
            .request(&mut Cx::client(), request("icmp"))
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "nse-1");
        let nse2 = endpoint(mesh.node(0), "nse-2").await;
        eventually("the refresh reached nse-1", Duration::from_secs(5), || {
            nse1.counter.requests() >= 2
        })
        .await;
        assert_eq!(
            nse2.counter.requests(),
            0,
            "moved before the data plane died"
        );
        let since = Instant::now();
        broken.store(true, Ordering::SeqCst);
        healed_to(&nsc, "nse-2", since, "refresh failed, data plane broken").await;
        assert_eq!(nse2.counter.requests(), 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            nse2.counter.requests(),
            1,
            "heal reached NSE-2 more than once"
        );
        nsc.chain.close(&mut Cx::client(), conn).await.unwrap();
        assert_eq!(nse2.counter.closes(), 1);
    });
}

/// docs/SCENARIOS.md 24 (skipped in Go, issue #1573): the NSE dies but the liveness check says
/// the data plane is healthy: the NSC must not move to the new NSE. Our heal keeps
/// re-requesting the same path (with backoff) while the data plane is reported alive,
/// and reselects only once it is reported dead.
#[test]
fn a_healthy_data_plane_keeps_the_connection_on_its_endpoint_when_the_control_plane_dies() {
    scenario(false, async {
        let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
        let nse1 = endpoint(mesh.node(0), "nse-1").await;
        let broken = Arc::new(AtomicBool::new(false));
        let nsc = nsc(
            mesh.node(0),
            heal_options(mesh.node(0))
                .liveness(dead_while_on("nse-1", broken.clone()))
                .liveness_interval(Duration::from_millis(50)),
        );
        let conn = nsc
            .chain
            .request(&mut Cx::client(), request("icmp"))
            .await
            .unwrap();
        let nse2 = endpoint(mesh.node(0), "nse-2").await;
        nse1.kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            nse2.counter.requests(),
            0,
            "moved although the data plane is healthy"
        );
        assert_eq!(nsc.answers.last_endpoint(), "nse-1");
        // Once the data plane is reported dead, heal moves.
        let since = Instant::now();
        broken.store(true, Ordering::SeqCst);
        healed_to(&nsc, "nse-2", since, "24: data plane reported dead").await;
        nsc.chain.close(&mut Cx::client(), conn).await.unwrap();
        assert_eq!(nse2.counter.closes(), 1);
    });
}

/// Issue 16: the forwarder dies under several connections and stays away while every
/// connection's heal fails and pauses for longer than the test (each pause at least
/// 48 s). A new forwarder comes; once one connection heals (its caller refreshes it),
/// the others, still in their pauses, are woken and heal too, each with one more
/// attempt, told by heal's observer.
#[test]
fn a_heal_wakes_the_connections_waiting_for_the_forwarder() {
    scenario(false, async {
        let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
        let node = mesh.node(0);
        let nse = endpoint(node, "nse").await;
        let healed = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let broken = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let (h, b) = (healed.clone(), broken.clone());
        let long = Duration::from_secs(60);
        let nsc = nsc(
            node,
            heal_options(node)
                .backoff(long, long)
                .observer(move |e, id| match e {
                    HealEvent::Healed => {
                        h.lock().unwrap().insert(id.to_string());
                    }
                    HealEvent::Broken => {
                        b.lock().unwrap().insert(id.to_string());
                    }
                    _ => {}
                }),
        );
        let mut conns = Vec::new();
        for _ in 0..6 {
            let c = nsc
                .chain
                .request(&mut Cx::client(), request("icmp"))
                .await
                .unwrap();
            conns.push(c);
        }
        // A refresh each, which their watches see: heal knows the path worked, so it
        // heals at once when it breaks (no pause first).
        for c in &mut conns {
            *c = nsc
                .chain
                .request(&mut Cx::client(), refresh(c))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(node.kill_forwarder("forwarder-0-0"));
        eventually("every connection broke", Duration::from_secs(8), || {
            broken.lock().unwrap().len() == conns.len()
        })
        .await;
        // Each re-requests, then reselects (no forwarder: both fail), then pauses.
        eventually("every attempt failed", Duration::from_secs(8), || {
            nsc.attempts.requests() >= conns.len() * 3
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = nsc.attempts.requests();
        assert!(healed.lock().unwrap().is_empty());
        node.add_forwarder("forwarder-0-1", HashMap::new())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(nsc.attempts.requests(), before, "all still pausing");
        let first = nsc
            .chain
            .request(&mut Cx::client(), refresh(&conns[0]))
            .await
            .unwrap();
        assert_eq!(names(&first)[2], "forwarder-0-1");
        eventually("every connection healed", Duration::from_secs(8), || {
            healed.lock().unwrap().len() == conns.len()
        })
        .await;
        assert_eq!(
            nsc.attempts.requests(),
            before + conns.len(),
            "one attempt each after the forwarder came back"
        );
        let closes = nse.counter.closes();
        let n = conns.len();
        nsc.chain.close(&mut Cx::client(), first).await.unwrap();
        for c in conns.into_iter().skip(1) {
            nsc.chain.close(&mut Cx::client(), c).await.unwrap();
        }
        assert_eq!(
            nse.counter.closes(),
            closes + n,
            "each Close reached the endpoint"
        );
    });
}
