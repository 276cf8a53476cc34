//! docs/SCENARIOS.md 5.1 item 11: request, Close and unregister leave no task behind.
//!
//! Alone in its test binary on purpose: `live_tasks()` counts the whole process, so no
//! other test may run beside it. Checked by counting, not by sleeping: the count is
//! polled until it is back or a deadline passes.

use std::time::Duration;

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::core::live_tasks;
use nsm_sdk::sandbox::{EndpointSpec, Sandbox};
use nsm_sdk::Cx;

async fn settles_at(expected: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = live_tasks();
        if now == expected || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn request_close_and_unregister_leave_no_task_behind() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    let before = settles_at(live_tasks()).await;
    for remote in [false, true] {
        let nse = mesh
            .node(0)
            .endpoint(EndpointSpec::new("nse", "svc").ipam("10.60.0.0/24".parse().unwrap()))
            .await
            .unwrap();
        assert!(
            live_tasks() > before,
            "the registration's expiry timer is counted"
        );
        let nsc = mesh.node(if remote { 1 } else { 0 }).client("nsc");
        let conn = nsc
            .request(
                &mut Cx::client(),
                NetworkServiceRequest {
                    connection: Some(Connection {
                        network_service: "svc".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        nsc.close(&mut Cx::client(), conn).await.unwrap();
        nse.unregister().await.unwrap();
        drop(nse);
        assert_eq!(
            settles_at(before).await,
            before,
            "tasks left after close and unregister (remote: {remote})"
        );
    }
}
