//! The six guarantees of `begin`, each proven here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nsm_proto::connection::{Connection, State};
use nsm_proto::networkservice::NetworkServiceRequest;

use super::*;
use crate::core::{Chain, Cx, Handler, Next};
use crate::handlers::update_path;

/// Records what reaches the end of the chain; can be told to fail or to be slow.
#[derive(Default)]
struct Probe {
    log: Mutex<Vec<String>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    fail_requests: AtomicUsize,
    delay_ms: AtomicUsize,
    done: AtomicUsize,
    closes: Mutex<Vec<Connection>>,
    seen_conn_handle: AtomicUsize,
    services: Mutex<Vec<String>>,
}

#[async_trait]
impl Handler for Arc<Probe> {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        if cx.conn().is_some() {
            self.seen_conn_handle.fetch_add(1, Ordering::SeqCst);
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let conn = req.connection.clone().unwrap_or_default();
        self.services
            .lock()
            .unwrap()
            .push(conn.network_service.clone());
        self.log.lock().unwrap().push(format!(
            "req:{}",
            conn.labels.get("n").cloned().unwrap_or_default()
        ));
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
        if self
            .fail_requests
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::unavailable("injected failure"));
        }
        let mut out = next.request(cx, req).await?;
        out.labels.insert("built-by".into(), "probe".into());
        Ok(out)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        self.closes.lock().unwrap().push(conn.clone());
        next.close(cx, conn).await
    }
}

/// Counts calls that pass it (to see what runs before `begin`).
#[derive(Default)]
struct Count(AtomicUsize);

#[async_trait]
impl Handler for Arc<Count> {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        self.0.fetch_add(1, Ordering::SeqCst);
        next.request(cx, req).await
    }
}

fn setup() -> (Chain, Begin, Arc<Probe>, Arc<Count>) {
    let probe = Arc::new(Probe::default());
    let before = Arc::new(Count::default());
    let b = begin();
    let chain = Chain::builder()
        .push(update_path("hop"))
        .push(before.clone())
        .push(b.clone())
        .push(probe.clone())
        .build();
    (chain, b, probe, before)
}

fn req(id: &str, n: &str) -> NetworkServiceRequest {
    let mut conn = Connection {
        id: id.into(),
        network_service: "ns".into(),
        ..Default::default()
    };
    conn.labels.insert("n".into(), n.into());
    NetworkServiceRequest {
        connection: Some(conn),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn operations_on_one_id_run_one_at_a_time_in_arrival_order() {
    let (chain, _b, probe, _) = setup();
    probe.delay_ms.store(10, Ordering::SeqCst);
    chain
        .request(&mut Cx::server(), req("c1", "0"))
        .await
        .unwrap();
    probe.log.lock().unwrap().clear();
    let mut tasks = Vec::new();
    for i in 1..=20 {
        let chain = chain.clone();
        tasks.push(tokio::spawn(async move {
            chain
                .request(&mut Cx::server(), req("c1", &i.to_string()))
                .await
        }));
        // Let the task reach begin's queue before the next one arrives.
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        probe.max_running.load(Ordering::SeqCst),
        1,
        "two operations overlapped"
    );
    let expected: Vec<String> = (1..=20).map(|i| format!("req:{i}")).collect();
    assert_eq!(*probe.log.lock().unwrap(), expected);
}

#[tokio::test(start_paused = true)]
async fn different_ids_run_concurrently() {
    let (chain, b, probe, _) = setup();
    probe.delay_ms.store(100, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..10 {
        let chain = chain.clone();
        tasks.push(tokio::spawn(async move {
            chain
                .request(&mut Cx::server(), req(&format!("c{i}"), "x"))
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(probe.max_running.load(Ordering::SeqCst) > 1);
    assert_eq!(b.len(), 10);
}

#[tokio::test]
async fn close_uses_the_stored_connection_not_the_one_passed() {
    let (chain, b, probe, _) = setup();
    let conn = chain
        .request(&mut Cx::server(), req("c1", "a"))
        .await
        .unwrap();
    assert_eq!(conn.labels["built-by"], "probe");
    assert_eq!(probe.seen_conn_handle.load(Ordering::SeqCst), 1);
    // The caller closes with a bare connection: only the id and path.
    let bare = Connection {
        id: conn.id.clone(),
        path: conn.path.clone(),
        ..Default::default()
    };
    chain.close(&mut Cx::server(), bare).await.unwrap();
    let closes = probe.closes.lock().unwrap();
    assert_eq!(closes.len(), 1);
    assert_eq!(
        closes[0].labels["built-by"], "probe",
        "close got the caller's copy"
    );
    assert!(b.is_empty());
}

#[tokio::test]
async fn close_of_an_unknown_id_is_ok_and_goes_nowhere() {
    let (chain, _b, probe, _) = setup();
    chain
        .close(&mut Cx::server(), req("never-seen", "").connection.unwrap())
        .await
        .unwrap();
    assert!(probe.closes.lock().unwrap().is_empty());
    // A second close of a closed connection is also a no-op.
    let conn = chain
        .request(&mut Cx::server(), req("c1", "a"))
        .await
        .unwrap();
    chain.close(&mut Cx::server(), conn.clone()).await.unwrap();
    chain.close(&mut Cx::server(), conn).await.unwrap();
    assert_eq!(probe.closes.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_first_request_forgets_but_a_failed_refresh_keeps() {
    let (chain, b, probe, _) = setup();
    probe.fail_requests.store(1, Ordering::SeqCst);
    let err = chain
        .request(&mut Cx::server(), req("c1", "a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(b.is_empty(), "failed first request left state");
    chain
        .close(&mut Cx::server(), req("c1", "").connection.unwrap())
        .await
        .unwrap();
    assert!(probe.closes.lock().unwrap().is_empty());

    let conn = chain
        .request(&mut Cx::server(), req("c2", "a"))
        .await
        .unwrap();
    probe.fail_requests.store(1, Ordering::SeqCst);
    chain
        .request(
            &mut Cx::server(),
            NetworkServiceRequest {
                connection: Some(conn.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        b.len(),
        1,
        "a failed refresh dropped the established connection"
    );
    chain.close(&mut Cx::server(), conn).await.unwrap();
    assert_eq!(probe.closes.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_hangs_up_does_not_leave_the_operation_half_done() {
    let (chain, b, probe, _) = setup();
    probe.delay_ms.store(1000, Ordering::SeqCst);
    let hung_up = tokio::time::timeout(
        Duration::from_millis(10),
        chain.request(&mut Cx::server(), req("c1", "a")),
    )
    .await;
    assert!(hung_up.is_err(), "the call should have been abandoned");
    assert_eq!(probe.done.load(Ordering::SeqCst), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        probe.done.load(Ordering::SeqCst),
        1,
        "the operation did not finish"
    );
    assert_eq!(b.len(), 1, "the finished operation was not recorded");
    chain
        .close(&mut Cx::server(), req("c1", "").connection.unwrap())
        .await
        .unwrap();
    assert_eq!(probe.closes.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_operation_ends_on_its_deadline() {
    let (chain, b, probe, _) = setup();
    probe.delay_ms.store(10_000, Ordering::SeqCst);
    let mut cx = Cx::server().with_timeout(Duration::from_secs(1));
    let err = chain.request(&mut cx, req("c1", "a")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    assert!(b.is_empty());
}

#[tokio::test]
async fn events_re_enter_after_begin_in_order_and_close_ends_the_connection() {
    let (chain, b, probe, before) = setup();
    let mut cx = Cx::server();
    let conn = chain.request(&mut cx, req("c1", "a")).await.unwrap();
    let handle = cx
        .conn()
        .cloned()
        .expect("begin sets the connection handle");
    assert_eq!(before.0.load(Ordering::SeqCst), 1);

    let refreshed = handle.request_event(None).await.unwrap().unwrap();
    assert_eq!(refreshed.id, conn.id);
    assert_eq!(
        before.0.load(Ordering::SeqCst),
        1,
        "an event ran the handlers before begin"
    );
    assert_eq!(probe.log.lock().unwrap().len(), 2);

    // Two events queued together run one after the other.
    let r1 = handle.request_event(None);
    let r2 = handle.request_event(None);
    r1.await.unwrap();
    r2.await.unwrap();
    assert_eq!(probe.max_running.load(Ordering::SeqCst), 1);

    let task = handle.spawn(futures::future::pending());
    assert_eq!(handle.close_event().await.unwrap(), None);
    assert!(handle.is_closed());
    task.await.unwrap();
    assert!(b.is_empty());
    assert_eq!(probe.closes.lock().unwrap().len(), 1);
    // After close the connection is unknown to events.
    assert_eq!(
        handle.request_event(None).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}

#[tokio::test]
async fn reselect_requested_closes_the_old_downstream_first() {
    let (chain, _b, probe, _) = setup();
    let conn = chain
        .request(&mut Cx::server(), req("c1", "a"))
        .await
        .unwrap();
    let mut again = conn.clone();
    again.state = State::ReselectRequested as i32;
    again.labels.insert("n".into(), "b".into());
    let out = chain
        .request(
            &mut Cx::server(),
            NetworkServiceRequest {
                connection: Some(again),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let closes = probe.closes.lock().unwrap();
    assert_eq!(closes.len(), 1, "the old downstream was not closed");
    assert_eq!(
        closes[0].labels["n"], "a",
        "close did not use the old connection"
    );
    assert_eq!(*probe.log.lock().unwrap(), ["req:a", "req:b"]);
    assert_eq!(out.state, State::Up as i32);
}

#[tokio::test]
async fn a_client_re_request_merges_what_the_caller_changed_into_what_was_returned() {
    let probe = Arc::new(Probe::default());
    let chain = Chain::builder()
        .push(update_path("nsc"))
        .push(begin())
        .push(probe.clone())
        .build();
    let conn = chain
        .request(&mut Cx::client(), req("", "a"))
        .await
        .unwrap();
    assert!(!conn.id.is_empty());
    // The caller sends only id and changed labels; the rest comes from what was returned.
    let mut changed = Connection {
        id: conn.id.clone(),
        labels: conn.labels.clone(),
        path: conn.path.clone(),
        ..Default::default()
    };
    changed.labels.insert("extra".into(), "1".into());
    chain
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(changed),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let services = probe.services.lock().unwrap();
    assert_eq!(
        *services,
        ["ns", "ns"],
        "the re-request lost what was returned"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_client_reselect_keeps_the_connection_for_another_try() {
    let (chain, b, probe, _) = setup();
    let conn = chain
        .request(&mut Cx::client(), req("c1", "a"))
        .await
        .unwrap();
    let mut again = conn.clone();
    again.state = State::ReselectRequested as i32;
    let reselect = NetworkServiceRequest {
        connection: Some(again),
        ..Default::default()
    };
    probe.fail_requests.store(1, Ordering::SeqCst);
    chain
        .request(&mut Cx::client(), reselect.clone())
        .await
        .unwrap_err();
    assert_eq!(probe.closes.lock().unwrap().len(), 1, "old path closed");
    assert_eq!(b.len(), 1, "a failed reselect forgot the connection");
    // Another try does not close again (there is nothing left to close), and succeeds.
    chain.request(&mut Cx::client(), reselect).await.unwrap();
    assert_eq!(probe.closes.lock().unwrap().len(), 1);
    chain.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(probe.closes.lock().unwrap().len(), 2);
    assert!(b.is_empty());
}

#[tokio::test]
async fn a_stale_copy_from_the_caller_keeps_what_events_changed() {
    let (chain, _b, probe, _) = setup();
    let mut cx = Cx::client();
    let conn = chain.request(&mut cx, req("c1", "a")).await.unwrap();
    let handle = cx.conn().cloned().unwrap();
    // An event (heal) moves the connection: the caller does not see it.
    let mut moved = conn.clone();
    moved.labels.insert("n".into(), "b".into());
    moved.network_service_endpoint_name = "nse-2".into();
    handle
        .request_event(Some(NetworkServiceRequest {
            connection: Some(moved),
            ..Default::default()
        }))
        .await
        .unwrap();
    // The caller refreshes with its old copy: nothing it sends is a change.
    let fresh = chain
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(conn.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(*probe.log.lock().unwrap(), ["req:a", "req:b", "req:b"]);
    assert_eq!(fresh.network_service_endpoint_name, "nse-2");
    // What the caller does change still wins.
    let mut changed = fresh;
    changed.labels.insert("n".into(), "c".into());
    chain
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(changed),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(probe.log.lock().unwrap().last().unwrap(), "req:c");
    chain.close(&mut Cx::client(), conn).await.unwrap();
    let closes = probe.closes.lock().unwrap();
    assert_eq!(closes[0].network_service_endpoint_name, "nse-2");
}

#[test]
fn a_slot_is_small_until_established_and_established_holds_one_request_and_context() {
    use std::mem::size_of;
    // Every id this hop knows: a lock, a handle and a pointer; no room for a connection.
    assert!(
        size_of::<Slot>() <= 48,
        "Slot is {} bytes",
        size_of::<Slot>()
    );
    assert!(size_of::<tokio::sync::Mutex<Slot>>() <= 96);
    // Once established: the last request (which carries the connection), the context
    // and the rest of the chain, and a pointer for what a caller last saw.
    let parts = size_of::<NetworkServiceRequest>() + size_of::<Cx>() + size_of::<Next>();
    assert!(
        size_of::<Established>() <= parts + 16,
        "Established is {} bytes for {parts} of parts",
        size_of::<Established>()
    );
}

#[tokio::test]
async fn a_connection_is_stored_once_until_events_change_it() {
    let (chain, b, _probe, _) = setup();
    let mut cx = Cx::client();
    let conn = chain.request(&mut cx, req("c1", "a")).await.unwrap();
    let handle = cx.conn().cloned().unwrap();
    let stored = |b: &Begin| {
        let guard = b.inner.slots.try_lock("c1").unwrap();
        let est = guard.est.as_ref().expect("established");
        (
            est.req.connection.clone().unwrap(),
            est.seen.as_deref().cloned(),
        )
    };
    assert_eq!(
        stored(&b),
        (conn.clone(), None),
        "no second copy for the caller"
    );
    let mut moved = conn.clone();
    moved.labels.insert("n".into(), "b".into());
    let after = handle
        .request_event(Some(NetworkServiceRequest {
            connection: Some(moved),
            ..Default::default()
        }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored(&b),
        (after.clone(), Some(conn.clone())),
        "the caller's copy is kept once an event changed the connection"
    );
    let again = chain
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(after),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stored(&b), (again, None), "the caller is up to date again");
}
