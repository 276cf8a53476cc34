//! Serving against an in-process registry: registered, refreshed before expiry,
//! unregistered on stop, nothing left running.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::chains::registry_server::registry_server;
use crate::chains::{endpoint, EndpointOptions};
use crate::registry::{RegistryChain, RegistryHandler, RegistryNext};
use crate::transport::{serve, Url};
use crate::{Cx, Error, Result};

fn nse(name: &str) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: name.into(),
        network_service_names: vec!["svc".into()],
        url: format!("tcp://{name}:1"),
        ..Default::default()
    }
}

async fn names(chain: &RegistryChain<NetworkServiceEndpoint>) -> Vec<String> {
    chain
        .list(&mut Cx::client(), NetworkServiceEndpoint::default())
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

async fn settle(baseline: usize) {
    for _ in 0..100 {
        if alive_tasks() <= baseline {
            return;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(alive_tasks(), baseline, "tasks left running");
}

#[tokio::test(start_paused = true)]
async fn a_registration_outlives_the_expiry_until_it_unregisters() {
    let registry = registry_server(Duration::from_secs(3));
    let store = registry.registries().nse.clone();
    let baseline = alive_tasks();
    let stop = CancellationToken::new();
    let registration = Registration::start(store.clone(), nse("a"), &stop)
        .await
        .expect("registers")
        .expect("not stopped");
    assert!(registration.refreshing());
    assert_eq!(registration.entry().name, "a");

    // Five expiries later the entry is still there: it was refreshed before each.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(names(&store).await, ["a"]);

    registration.unregister().await;
    assert!(names(&store).await.is_empty());
    // No refresh brings it back, and no timer is left.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(names(&store).await.is_empty());
    drop(registry);
    settle(baseline).await;
}

#[tokio::test(start_paused = true)]
async fn dropping_a_registration_stops_its_refreshes() {
    let registry = registry_server(Duration::from_secs(3));
    let (chain, calls) = flaky(&registry.registries().nse, 0, Error::internal("unused"));
    let stop = CancellationToken::new();
    let baseline = alive_tasks();
    let registration = Registration::start(chain, nse("a"), &stop)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let registers = calls.load(Ordering::SeqCst);
    assert!(registers >= 2, "refreshed: {registers}");
    drop(registration);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        registers,
        "no refresh after drop"
    );
    drop(registry);
    settle(baseline).await;
}

/// Fails its first `failures` Registers with `error`, then passes them on.
struct Flaky {
    failures: usize,
    error: Error,
    calls: Arc<AtomicUsize>,
}

#[async_trait]
impl RegistryHandler<NetworkServiceEndpoint> for Flaky {
    async fn register(
        &self,
        cx: &mut Cx,
        r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<NetworkServiceEndpoint> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(self.error.clone());
        }
        next.register(cx, r).await
    }
}

fn flaky(
    store: &RegistryChain<NetworkServiceEndpoint>,
    failures: usize,
    error: Error,
) -> (RegistryChain<NetworkServiceEndpoint>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let chain = RegistryChain::builder()
        .push(Flaky {
            failures,
            error,
            calls: calls.clone(),
        })
        .push(store.clone())
        .build();
    (chain, calls)
}

#[tokio::test(start_paused = true)]
async fn start_retries_while_the_manager_is_unavailable() {
    let registry = registry_server(Duration::from_secs(60));
    let store = registry.registries().nse.clone();
    let (chain, calls) = flaky(&store, 3, Error::unavailable("starting"));
    let stop = CancellationToken::new();
    let registration = Registration::start(chain, nse("a"), &stop)
        .await
        .expect("registers after the manager came up")
        .expect("not stopped");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(names(&store).await, ["a"]);
    registration.unregister().await;
}

#[tokio::test(start_paused = true)]
async fn start_gives_up_on_a_refusal_or_after_the_startup_timeout() {
    let registry = registry_server(Duration::from_secs(60));
    let store = registry.registries().nse.clone();
    let stop = CancellationToken::new();

    let (chain, calls) = flaky(&store, 1, Error::invalid("no url"));
    let e = Registration::start(chain, nse("a"), &stop)
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a refusal is not retried");
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("registering a failed"), "{e}");

    let (chain, _) = flaky(&store, usize::MAX, Error::unavailable("down"));
    let started = tokio::time::Instant::now();
    let e = Registration::start(chain, nse("a"), &stop)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    assert!(started.elapsed() >= DEFAULT_STARTUP_TIMEOUT);
    assert!(names(&store).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn stop_during_startup_is_not_a_failure() {
    let registry = registry_server(Duration::from_secs(60));
    let (chain, _) = flaky(
        &registry.registries().nse,
        usize::MAX,
        Error::unavailable("down"),
    );
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        stopper.cancel();
    });
    let out = Registration::start(chain, nse("a"), &stop).await.unwrap();
    assert!(out.is_none());
}

fn inmem(prefix: &str) -> Url {
    Url::Memory(format!("{prefix}-{}", uuid::Uuid::new_v4()))
}

#[tokio::test]
async fn serve_endpoint_registers_and_unregisters_through_the_manager() {
    let registry = registry_server(Duration::from_secs(60));
    let manager_url = inmem("manager");
    let manager = serve(&manager_url, registry.services()).await.unwrap();
    let listen_on = inmem("nse");
    let nse = endpoint("hello", EndpointOptions::new());
    let stop = CancellationToken::new();
    let opts = ServeOptions::new(listen_on.clone(), manager_url.clone())
        .network_service("hello")
        .labels([("app".to_string(), "hi".to_string())].into());
    let serving = tokio::spawn({
        let (nse, stop) = (nse.clone(), stop.clone());
        async move { serve_endpoint(&nse, opts, stop).await }
    });

    let store = registry.registries().clone();
    let entry = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let found = store
                .nse
                .list(&mut Cx::client(), NetworkServiceEndpoint::default())
                .await
                .unwrap();
            if let Some(e) = found.into_iter().next() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the endpoint registers");
    assert_eq!(entry.name, "hello");
    assert_eq!(entry.url, listen_on.to_string());
    assert_eq!(entry.network_service_names, ["hello"]);
    assert_eq!(entry.network_service_labels["hello"].labels["app"], "hi");
    let services = store
        .ns
        .list(&mut Cx::client(), NetworkService::default())
        .await
        .unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].name, "hello");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("no failure");
    assert!(names(&store.nse).await.is_empty(), "unregistered");
    // The listener is gone: the URL can be served again.
    let again = serve(&listen_on, nse.services()).await.expect("URL free");
    again.kill();
    manager.kill();
}

#[tokio::test]
async fn an_endpoint_without_network_services_is_refused() {
    let nse = endpoint("hello", EndpointOptions::new());
    let opts = ServeOptions::new(inmem("nse"), inmem("manager"));
    let e = serve_endpoint(&nse, opts, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}
