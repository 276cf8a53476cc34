use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::BoxStream;
use nsm_proto::connection::{Path, PathSegment};

use super::*;
use crate::core::Chain;
use crate::handlers::{begin, update_path};
use crate::Error;

/// The end of the test chain: fails Requests and/or Closes on demand, and records
/// whether it found the monitor in the call's context.
#[derive(Default)]
struct Switch {
    fail_request: AtomicBool,
    fail_close: AtomicBool,
    saw_monitor: AtomicBool,
}

#[async_trait]
impl Handler for Switch {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        self.saw_monitor
            .store(cx.ext().get::<Monitor>().is_some(), Ordering::SeqCst);
        if self.fail_request.load(Ordering::SeqCst) {
            return Err(Error::unavailable("injected request failure"));
        }
        next.request(cx, req).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        if self.fail_close.load(Ordering::SeqCst) {
            return Err(Error::unavailable("injected close failure"));
        }
        next.close(cx, conn).await
    }
}

struct Fixture {
    monitor: Monitor,
    switch: Arc<Switch>,
    chain: Chain,
}

fn fixture_with(monitor: Monitor) -> Fixture {
    let switch = Arc::new(Switch::default());
    let chain = Chain::builder()
        .push(update_path("nse"))
        .push(begin())
        .push(monitor.clone())
        .push_arc(switch.clone())
        .build();
    Fixture {
        monitor,
        switch,
        chain,
    }
}

fn fixture() -> Fixture {
    fixture_with(monitor())
}

fn seg(name: &str, id: &str) -> PathSegment {
    PathSegment {
        name: name.into(),
        id: id.into(),
        ..Default::default()
    }
}

/// A Request from the client "nsc" with id `id`, for network service `ns`.
fn request(id: &str, ns: &str) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            id: id.into(),
            network_service: ns.into(),
            path: Some(Path {
                index: 0,
                path_segments: vec![seg("nsc", id)],
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The id the "nse" hop uses for a connection returned to the client.
fn hop_id(conn: &Connection) -> String {
    conn.path
        .as_ref()
        .and_then(|p| p.path_segments.last())
        .map(|s| s.id.clone())
        .unwrap_or_default()
}

impl Fixture {
    async fn request(&self, req: NetworkServiceRequest) -> Result<Connection> {
        self.chain.request(&mut Cx::server(), req).await
    }

    async fn close(&self, conn: Connection) -> Result<()> {
        self.chain.close(&mut Cx::server(), conn).await
    }

    fn subscribe(
        &self,
        selector: MonitorScopeSelector,
    ) -> BoxStream<'static, Result<ConnectionEvent>> {
        self.monitor.source().subscribe(selector)
    }
}

async fn recv(stream: &mut BoxStream<'static, Result<ConnectionEvent>>) -> ConnectionEvent {
    match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// A connection of service `ns` with the path `segs`, published as a marker.
fn marker(ns: &str, segs: Vec<PathSegment>) -> Connection {
    Connection {
        id: format!("marker-{ns}"),
        network_service: ns.into(),
        path: Some(Path {
            index: 0,
            path_segments: segs,
        }),
        ..Default::default()
    }
}

/// Proves that nothing was sent to `stream` before `marker` (which its selector must
/// match) by publishing the marker and expecting it as the next event.
async fn nothing_before(
    monitor: &Monitor,
    stream: &mut BoxStream<'static, Result<ConnectionEvent>>,
    marker: Connection,
) {
    monitor.publish(ConnectionEventType::Update, marker.clone());
    let event = recv(stream).await;
    assert_eq!(event.r#type, ConnectionEventType::Update as i32);
    assert_eq!(event.connections.keys().collect::<Vec<_>>(), [&marker.id]);
}

fn kind(event: &ConnectionEvent) -> ConnectionEventType {
    ConnectionEventType::try_from(event.r#type).unwrap()
}

fn state_of(event: &ConnectionEvent, id: &str) -> State {
    State::try_from(event.connections[id].state).unwrap()
}

#[tokio::test]
async fn initial_transfer_then_update_then_delete() {
    let f = fixture();
    let mut events = f.subscribe(MonitorScopeSelector::default());
    let initial = recv(&mut events).await;
    assert_eq!(kind(&initial), ConnectionEventType::InitialStateTransfer);
    assert!(initial.connections.is_empty());

    let conn = f.request(request("c1", "vpn")).await.unwrap();
    let id = hop_id(&conn);
    let update = recv(&mut events).await;
    assert_eq!(kind(&update), ConnectionEventType::Update);
    let stored = &update.connections[&id];
    assert_eq!(stored.id, id, "stored under this hop's id");
    assert_eq!(stored.path.as_ref().unwrap().index, 1);
    assert_eq!(state_of(&update, &id), State::Up);
    assert_eq!(f.monitor.get(&id).as_ref(), Some(stored));

    // A late subscriber gets the connection in its initial transfer.
    let mut late = f.subscribe(MonitorScopeSelector::default());
    assert_eq!(recv(&mut late).await.connections[&id], *stored);

    f.close(conn).await.unwrap();
    let delete = recv(&mut events).await;
    assert_eq!(kind(&delete), ConnectionEventType::Delete);
    assert!(delete.connections.contains_key(&id));
    assert!(f.monitor.is_empty());
    assert_eq!(kind(&recv(&mut late).await), ConnectionEventType::Delete);
}

#[tokio::test]
async fn the_returned_connection_equals_the_monitored_one() {
    let f = fixture();
    let mut events = f.subscribe(MonitorScopeSelector::default());
    recv(&mut events).await;
    // A first hop: the caller's view and the hop's view are the same.
    let req = NetworkServiceRequest {
        connection: Some(Connection {
            network_service: "vpn".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let conn = f.request(req).await.unwrap();
    let update = recv(&mut events).await;
    assert_eq!(update.connections[&conn.id], conn);
}

#[tokio::test]
async fn the_initial_transfer_is_sent_when_nothing_matches() {
    let f = fixture();
    f.request(request("c1", "vpn")).await.unwrap();
    let mut events = f.subscribe(MonitorScopeSelector {
        network_services: vec!["other".into()],
        ..Default::default()
    });
    let initial = recv(&mut events).await;
    assert_eq!(kind(&initial), ConnectionEventType::InitialStateTransfer);
    assert!(initial.connections.is_empty());
}

#[tokio::test]
async fn subscribers_see_only_what_their_selector_matches() {
    let f = fixture();
    let by_ns = |ns: &str| MonitorScopeSelector {
        network_services: vec![ns.into()],
        ..Default::default()
    };
    let by_path = |segs: Vec<PathSegment>| MonitorScopeSelector {
        path_segments: segs,
        ..Default::default()
    };
    let mut vpn = f.subscribe(by_ns("vpn"));
    let mut other = f.subscribe(by_ns("other"));
    // Contiguous [nsmgr "m1", nse *] with wildcards: matches.
    let mut contiguous = f.subscribe(by_path(vec![seg("", "m1"), seg("nse", "")]));
    // [nsc, nse] skips nsmgr: must not match.
    let mut gapped = f.subscribe(by_path(vec![seg("nsc", ""), seg("nse", "")]));
    for s in [&mut vpn, &mut other, &mut contiguous, &mut gapped] {
        assert!(recv(s).await.connections.is_empty());
    }

    // The request arrives from an nsmgr: path [nsc c1, nsmgr m1] + nse.
    let mut req = request("m1", "vpn");
    if let Some(c) = req.connection.as_mut() {
        c.path = Some(Path {
            index: 1,
            path_segments: vec![seg("nsc", "c1"), seg("nsmgr", "m1")],
        });
    }
    let conn = f.request(req).await.unwrap();
    let id = hop_id(&conn);
    assert!(recv(&mut vpn).await.connections.contains_key(&id));
    assert!(recv(&mut contiguous).await.connections.contains_key(&id));
    nothing_before(&f.monitor, &mut other, marker("other", vec![])).await;
    nothing_before(
        &f.monitor,
        &mut gapped,
        marker("x", vec![seg("nsc", "n"), seg("nse", "e")]),
    )
    .await;
}

#[tokio::test]
async fn a_failed_refresh_of_an_established_connection_publishes_down() {
    let f = fixture();
    let conn = f.request(request("c1", "vpn")).await.unwrap();
    let id = hop_id(&conn);
    let mut events = f.subscribe(MonitorScopeSelector::default());
    assert_eq!(state_of(&recv(&mut events).await, &id), State::Up);

    f.switch.fail_request.store(true, Ordering::SeqCst);
    let refresh = NetworkServiceRequest {
        connection: Some(conn.clone()),
        ..Default::default()
    };
    assert!(f.request(refresh.clone()).await.is_err());
    let down = recv(&mut events).await;
    assert_eq!(kind(&down), ConnectionEventType::Update);
    assert_eq!(state_of(&down, &id), State::Down);
    assert_eq!(f.monitor.get(&id).unwrap().state, State::Down as i32);

    // A successful refresh brings it back UP.
    f.switch.fail_request.store(false, Ordering::SeqCst);
    f.request(refresh).await.unwrap();
    assert_eq!(state_of(&recv(&mut events).await, &id), State::Up);
}

#[tokio::test]
async fn a_failed_first_request_publishes_nothing() {
    let f = fixture();
    let mut events = f.subscribe(MonitorScopeSelector::default());
    recv(&mut events).await;
    f.switch.fail_request.store(true, Ordering::SeqCst);
    assert!(f.request(request("c1", "vpn")).await.is_err());
    assert!(f.monitor.is_empty());
    nothing_before(&f.monitor, &mut events, marker("vpn", vec![])).await;
}

#[tokio::test]
async fn delete_is_published_even_when_the_downstream_close_fails() {
    let f = fixture();
    let conn = f.request(request("c1", "vpn")).await.unwrap();
    let id = hop_id(&conn);
    let mut events = f.subscribe(MonitorScopeSelector::default());
    recv(&mut events).await;
    f.switch.fail_close.store(true, Ordering::SeqCst);
    assert!(f.close(conn).await.is_err());
    let delete = recv(&mut events).await;
    assert_eq!(kind(&delete), ConnectionEventType::Delete);
    assert!(delete.connections.contains_key(&id));
    assert!(f.monitor.is_empty());
}

#[tokio::test]
async fn later_handlers_find_the_monitor_and_can_publish_refresh_requested() {
    let f = fixture();
    let conn = f.request(request("c1", "vpn")).await.unwrap();
    assert!(f.switch.saw_monitor.load(Ordering::SeqCst));
    let id = hop_id(&conn);
    let mut events = f.subscribe(MonitorScopeSelector::default());
    recv(&mut events).await;
    let mut asked = f.monitor.get(&id).unwrap();
    asked.state = State::RefreshRequested as i32;
    f.monitor.publish(ConnectionEventType::Update, asked);
    assert_eq!(
        state_of(&recv(&mut events).await, &id),
        State::RefreshRequested
    );
}

#[tokio::test]
async fn publishing_an_initial_transfer_is_ignored() {
    let f = fixture();
    let mut events = f.subscribe(MonitorScopeSelector::default());
    recv(&mut events).await;
    let conn = Connection {
        id: "x".into(),
        ..Default::default()
    };
    f.monitor
        .publish(ConnectionEventType::InitialStateTransfer, conn);
    f.monitor
        .publish(ConnectionEventType::Update, Connection::default());
    assert!(f.monitor.is_empty());
    nothing_before(&f.monitor, &mut events, marker("vpn", vec![])).await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_blocks_nobody_and_later_resyncs() {
    let f = fixture();
    let mut stalled = f.subscribe(MonitorScopeSelector::default());
    let mut conns = HashMap::new();
    let work = async {
        for i in 0..1000 {
            let id = format!("c{}", i % 10);
            // The first Request of each id, then refreshes with what it returned.
            let req = match conns.get(&id) {
                Some(conn) => NetworkServiceRequest {
                    connection: Some(Connection::clone(conn)),
                    ..Default::default()
                },
                None => request(&id, "vpn"),
            };
            let conn = f.request(req).await.unwrap();
            conns.insert(id, conn);
        }
        for i in 0..5 {
            let conn = conns.remove(&format!("c{i}")).unwrap();
            f.close(conn).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .expect("publishers must not wait for a stalled subscriber");
    assert_eq!(f.monitor.len(), 5);

    // The stale initial transfer it never read, then a re-sync of the current table:
    // the five closed connections are not in it, so no DELETE is silently lost.
    let stale = recv(&mut stalled).await;
    assert_eq!(kind(&stale), ConnectionEventType::InitialStateTransfer);
    assert!(stale.connections.is_empty());
    let resync = recv(&mut stalled).await;
    assert_eq!(kind(&resync), ConnectionEventType::InitialStateTransfer);
    let mut got: Vec<_> = resync.connections.keys().cloned().collect();
    got.sort();
    let mut want: Vec<_> = conns.values().map(hop_id).collect();
    want.sort();
    assert_eq!(got, want);
    // And it is live again.
    nothing_before(&f.monitor, &mut stalled, marker("vpn", vec![])).await;
}

#[tokio::test]
async fn a_dropped_subscriber_leaves_nothing_behind() {
    // A subscription spawns no task: it is only a registered queue, counted here.
    let f = fixture();
    let mut events = f.subscribe(MonitorScopeSelector::default());
    recv(&mut events).await;
    assert_eq!(f.monitor.subscriber_count(), 1);
    drop(events);
    assert_eq!(f.monitor.subscriber_count(), 0);
    f.request(request("c1", "vpn")).await.unwrap();
}

#[tokio::test]
async fn streams_end_on_shutdown_and_when_the_monitor_is_gone() {
    let token = CancellationToken::new();
    let monitor = Monitor::builder()
        .shutdown(token.clone())
        .capacity(0)
        .build();
    let mut events = monitor.source().subscribe(MonitorScopeSelector::default());
    recv(&mut events).await;
    token.cancel();
    assert!(events.next().await.is_none());

    let monitor = super::monitor();
    let mut events = monitor.source().subscribe(MonitorScopeSelector::default());
    recv(&mut events).await;
    drop(monitor);
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn the_client_filter_gives_the_client_its_own_view_and_maps_delete_to_down() {
    let f = fixture();
    let conn = f.request(request("c1", "vpn")).await.unwrap();
    let client = ClientFilter::new("c1", "nsc", 0);
    let mut events = filter_events("c1", "nsc", 0, f.subscribe(client.selector()));

    let up = recv(&mut events).await;
    assert_eq!(kind(&up), ConnectionEventType::Update);
    let mine = &up.connections["c1"];
    assert_eq!(mine.id, "c1");
    let path = mine.path.as_ref().unwrap();
    assert_eq!(path.index, 0);
    assert_eq!(
        path.path_segments.len(),
        2,
        "the downstream path comes along"
    );
    assert_eq!(
        *mine, conn,
        "the client's view is what its Request returned"
    );

    f.close(conn).await.unwrap();
    let down = recv(&mut events).await;
    assert_eq!(kind(&down), ConnectionEventType::Update);
    assert_eq!(state_of(&down, "c1"), State::Down);
}

#[tokio::test]
async fn events_of_other_connections_never_reach_a_subscriber_of_one() {
    // A queue of one event: with every event queued for every subscriber, the first
    // event of another connection would fill it and force a re-synchronisation.
    let f = fixture_with(Monitor::builder().capacity(1).build());
    let mine = f.request(request("mine", "vpn")).await.unwrap();
    let mut events = f.subscribe(ClientFilter::new("mine", "nsc", 0).selector());
    let initial = recv(&mut events).await;
    assert_eq!(kind(&initial), ConnectionEventType::InitialStateTransfer);
    assert_eq!(initial.connections.len(), 1);
    for i in 0..50 {
        f.request(request(&format!("other-{i}"), "vpn"))
            .await
            .unwrap();
    }
    // Its own next event comes straight, not after a re-synchronisation.
    f.request(NetworkServiceRequest {
        connection: Some(mine.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let next = recv(&mut events).await;
    assert_eq!(kind(&next), ConnectionEventType::Update);
    assert_eq!(next.connections.len(), 1);
    // A subscriber of everything still sees them all (from its initial transfer).
    let mut all = f.subscribe(MonitorScopeSelector::default());
    assert_eq!(recv(&mut all).await.connections.len(), 51);
    f.close(mine).await.unwrap();
    assert_eq!(kind(&recv(&mut events).await), ConnectionEventType::Delete);
}
