//! Heal time in the sandbox: from killing the endpoint (or the client's forwarder) to
//! the client holding a working connection again, local and remote; median and p99.
//!
//! `cargo bench -p nsm-sdk --features sandbox --bench heal`

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::chains::client;
use nsm_sdk::handlers::{heal, HealOptions};
use nsm_sdk::sandbox::{EndpointSpec, Sandbox};
use nsm_sdk::transport::Channels;
use nsm_sdk::{Chain, Cx, Handler, Next};
use tokio::time::Instant;

const ITERATIONS: usize = 30;

/// Counts the successful answers the client chain got and remembers the last one.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<(usize, Option<Connection>)>>);

#[nsm_sdk::async_trait]
impl Handler for Answers {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let conn = next.request(cx, req).await?;
        let mut a = self.0.lock().unwrap();
        a.0 += 1;
        a.1 = Some(conn.clone());
        Ok(conn)
    }
}

impl Answers {
    fn count(&self) -> usize {
        self.0.lock().unwrap().0
    }
    fn endpoint(&self) -> String {
        self.0
            .lock()
            .unwrap()
            .1
            .as_ref()
            .map(|c| c.network_service_endpoint_name.clone())
            .unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Kill {
    Endpoint,
    Forwarder,
}

async fn once(remote: bool, kill: Kill) -> Duration {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    let nse_node = if remote { 1 } else { 0 };
    let nse1 = mesh
        .node(nse_node)
        .endpoint(EndpointSpec::new("nse-1", "svc"))
        .await
        .unwrap();
    let answers = Answers::default();
    let nsc: Chain = client(
        mesh.node(0)
            .client_options("nsc")
            .handler(heal(HealOptions::new(Channels::new())))
            .handler(answers.clone()),
    );
    let req = NetworkServiceRequest {
        connection: Some(Connection {
            network_service: "svc".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let conn = nsc.request(&mut Cx::client(), req).await.unwrap();
    let before = answers.count();
    let started;
    match kill {
        Kill::Endpoint => {
            let _nse2 = mesh
                .node(nse_node)
                .endpoint(EndpointSpec::new("nse-2", "svc"))
                .await
                .unwrap();
            started = Instant::now();
            nse1.kill();
            while answers.endpoint() != "nse-2" {
                assert!(started.elapsed() < Duration::from_secs(20), "no heal");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        Kill::Forwarder => {
            started = Instant::now();
            mesh.node(0).kill_forwarder("forwarder-0-0");
            mesh.node(0)
                .restart_forwarder("forwarder-0-0")
                .await
                .unwrap();
            while answers.count() == before {
                assert!(started.elapsed() < Duration::from_secs(20), "no heal");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    }
    let took = started.elapsed();
    let _ = nsc.close(&mut Cx::client(), conn).await;
    took
}

fn report(what: &str, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "summary heal/{what}: {} runs, median {:.1} ms, p99 {:.1} ms, max {:.1} ms; target median <= 500 ms: {}",
        v.len(),
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
        if p(0.5) <= Duration::from_millis(500) { "met" } else { "NOT met" }
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (what, remote, kill) in [
        ("endpoint-local", false, Kill::Endpoint),
        ("endpoint-remote", true, Kill::Endpoint),
        ("forwarder-local", false, Kill::Forwarder),
        ("forwarder-remote-path", true, Kill::Forwarder),
    ] {
        let times: Vec<Duration> = (0..ITERATIONS)
            .map(|_| rt.block_on(once(remote, kill)))
            .collect();
        report(what, times);
    }
}
