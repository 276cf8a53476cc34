//! The input bounds of issue 14 at a real server over gRPC: each bound passes just at the
//! bound and is refused with InvalidArgument one over, before any handler runs; whole
//! messages over 4 MiB are refused by tonic; and a peer's 10 KB string appears in no
//! log line longer than 256 bytes.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::stream::{self, BoxStream, StreamExt};
use nsm_sdk::chains::registry_server;
use nsm_sdk::core::MonitorSource;
use nsm_sdk::proto::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_sdk::proto::connection::{
    Connection, ConnectionEvent, Mechanism, MonitorScopeSelector, Path, PathSegment,
};
use nsm_sdk::proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_sdk::proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_sdk::proto::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery,
};
use nsm_sdk::transport::{metadata, serve, Channels, Server, Services, Url};
use nsm_sdk::wire::bounds::{
    MAX_LABELS, MAX_MESSAGE_SIZE, MAX_NAME_LEN, MAX_PATH_SEGMENTS, MAX_SHOWN, MAX_TOKEN_LEN,
    MAX_VALUE_LEN,
};
use nsm_sdk::{async_trait, Chain, Cx, Handler, Next, Result};
use tonic::transport::Channel;
use tonic::Code;

/// The server's only handler: counts the calls that reached it and answers.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

#[async_trait]
impl Handler for Counter {
    async fn request(
        &self,
        _cx: &mut Cx,
        req: NetworkServiceRequest,
        _next: Next,
    ) -> Result<Connection> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(req.connection.unwrap_or_default())
    }

    async fn close(&self, _cx: &mut Cx, _conn: Connection, _next: Next) -> Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A monitor with nothing to tell: subscribing works, the stream stays empty.
struct Quiet;

impl MonitorSource for Quiet {
    fn subscribe(&self, _: MonitorScopeSelector) -> BoxStream<'static, Result<ConnectionEvent>> {
        stream::pending().boxed()
    }
}

struct Mesh {
    _server: Server,
    channel: Channel,
    counter: Counter,
}

async fn server() -> Mesh {
    let counter = Counter::default();
    let chain = Chain::builder().push(counter.clone()).build();
    let registry = registry_server(std::time::Duration::from_secs(60));
    let url: Url = format!("inmem://bounds-{}", uuid::Uuid::new_v4())
        .parse()
        .unwrap();
    let server = serve(
        &url,
        Services::new()
            .network_service(chain)
            .monitor(Arc::new(Quiet))
            .registries(registry.registries().clone()),
    )
    .await
    .unwrap();
    let channel = Channels::new().channel(server.url()).unwrap();
    Mesh {
        _server: server,
        channel,
        counter,
    }
}

fn big(n: usize) -> String {
    "x".repeat(n)
}

fn set(n: usize) -> HashMap<String, String> {
    (0..n).map(|i| (format!("k{i}"), "v".into())).collect()
}

fn conn() -> Connection {
    Connection {
        id: "c-1".into(),
        network_service: "svc".into(),
        ..Default::default()
    }
}

fn request(conn: Connection) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(conn),
        mechanism_preferences: vec![],
    }
}

fn path(segments: Vec<PathSegment>) -> Option<Path> {
    Some(Path {
        index: 0,
        path_segments: segments,
    })
}

/// A connection just at one bound and one just over it, with what the refusal names.
fn connection_cases() -> Vec<(&'static str, Connection, Connection, &'static str)> {
    let seg = |name: String, token: String| PathSegment {
        name,
        token,
        ..Default::default()
    };
    vec![
        (
            "network service name",
            Connection {
                network_service: big(MAX_NAME_LEN),
                ..conn()
            },
            Connection {
                network_service: big(MAX_NAME_LEN + 1),
                ..conn()
            },
            "connection.network_service",
        ),
        (
            "endpoint name",
            Connection {
                network_service_endpoint_name: big(MAX_NAME_LEN),
                ..conn()
            },
            Connection {
                network_service_endpoint_name: big(MAX_NAME_LEN + 1),
                ..conn()
            },
            "connection.network_service_endpoint_name",
        ),
        (
            "label count",
            Connection {
                labels: set(MAX_LABELS),
                ..conn()
            },
            Connection {
                labels: set(MAX_LABELS + 1),
                ..conn()
            },
            "connection.labels",
        ),
        (
            "label key",
            Connection {
                labels: HashMap::from([(big(MAX_NAME_LEN), "v".into())]),
                ..conn()
            },
            Connection {
                labels: HashMap::from([(big(MAX_NAME_LEN + 1), "v".into())]),
                ..conn()
            },
            "connection.labels",
        ),
        (
            "label value",
            Connection {
                labels: HashMap::from([("k".into(), big(MAX_VALUE_LEN))]),
                ..conn()
            },
            Connection {
                labels: HashMap::from([("k".into(), big(MAX_VALUE_LEN + 1))]),
                ..conn()
            },
            "connection.labels",
        ),
        (
            "mechanism parameter",
            Connection {
                mechanism: Some(Mechanism {
                    cls: "LOCAL".into(),
                    r#type: "KERNEL".into(),
                    parameters: HashMap::from([("inodeURL".into(), big(MAX_VALUE_LEN))]),
                }),
                ..conn()
            },
            Connection {
                mechanism: Some(Mechanism {
                    cls: "LOCAL".into(),
                    r#type: "KERNEL".into(),
                    parameters: HashMap::from([("inodeURL".into(), big(MAX_VALUE_LEN + 1))]),
                }),
                ..conn()
            },
            "connection.mechanism",
        ),
        (
            "path length",
            Connection {
                path: path(vec![PathSegment::default(); MAX_PATH_SEGMENTS]),
                ..conn()
            },
            Connection {
                path: path(vec![PathSegment::default(); MAX_PATH_SEGMENTS + 1]),
                ..conn()
            },
            "connection.path",
        ),
        (
            "segment name",
            Connection {
                path: path(vec![seg(big(MAX_NAME_LEN), String::new())]),
                ..conn()
            },
            Connection {
                path: path(vec![seg(big(MAX_NAME_LEN + 1), String::new())]),
                ..conn()
            },
            "path_segments.name",
        ),
        (
            "segment token",
            Connection {
                path: path(vec![seg(String::new(), big(MAX_TOKEN_LEN))]),
                ..conn()
            },
            Connection {
                path: path(vec![seg(String::new(), big(MAX_TOKEN_LEN + 1))]),
                ..conn()
            },
            "path_segments.token",
        ),
    ]
}

fn assert_refused(status: &tonic::Status, field: &str, case: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    assert!(
        status.message().contains(field) && status.message().contains("at most"),
        "{case}: the refusal names neither {field} nor the bound: {}",
        status.message()
    );
    assert!(status.message().len() <= MAX_SHOWN, "{case}");
}

#[tokio::test]
async fn every_connection_bound_passes_at_the_bound_and_is_refused_one_over() {
    let mesh = server().await;
    let mut ns = NetworkServiceClient::new(mesh.channel.clone());
    for (case, at, over, field) in connection_cases() {
        let before = mesh.counter.0.load(Ordering::SeqCst);
        ns.request(request(at.clone()))
            .await
            .unwrap_or_else(|s| panic!("{case} at the bound: {s:?}"));
        ns.close(at)
            .await
            .unwrap_or_else(|s| panic!("{case} at the bound (Close): {s:?}"));
        let status = ns.request(request(over.clone())).await.unwrap_err();
        assert_refused(&status, field, case);
        let status = ns.close(over).await.unwrap_err();
        assert_refused(&status, field, case);
        assert_eq!(
            mesh.counter.0.load(Ordering::SeqCst),
            before + 2,
            "{case}: only the calls at the bound reached the handler"
        );
    }
}

#[tokio::test]
async fn a_request_with_10000_labels_is_refused_before_any_handler_runs() {
    let mesh = server().await;
    let mut ns = NetworkServiceClient::new(mesh.channel.clone());
    let flood = Connection {
        labels: set(10_000),
        ..conn()
    };
    let status = ns.request(request(flood)).await.unwrap_err();
    assert_refused(&status, "connection.labels", "10,000 labels");
    assert!(status.message().contains("10000 labels"), "{status:?}");
    assert_eq!(mesh.counter.0.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn too_many_mechanism_preferences_are_refused() {
    let mesh = server().await;
    let mut ns = NetworkServiceClient::new(mesh.channel.clone());
    let req = NetworkServiceRequest {
        connection: Some(conn()),
        mechanism_preferences: vec![Mechanism::default(); nsm_sdk::wire::bounds::MAX_LIST_LEN + 1],
    };
    let status = ns.request(req).await.unwrap_err();
    assert_refused(&status, "mechanism_preferences", "mechanisms");
}

#[tokio::test]
async fn a_message_over_4_mib_is_refused_by_the_server() {
    let mesh = server().await;
    // A raw tonic client without limits of its own: only the server's limit stands.
    let mut ns = NetworkServiceClient::new(mesh.channel.clone())
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    let huge = Connection {
        labels: HashMap::from([("k".into(), big(MAX_MESSAGE_SIZE + 1))]),
        ..conn()
    };
    let status = ns.request(request(huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    assert_eq!(mesh.counter.0.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_sdk_client_refuses_to_send_a_message_over_4_mib() {
    use nsm_sdk::handlers::client_url;
    use nsm_sdk::transport::grpc_client;
    let mesh = server().await;
    let client = Chain::builder()
        .push(client_url(mesh._server.url().clone()))
        .push(grpc_client(Channels::new()))
        .build();
    let huge = Connection {
        labels: HashMap::from([("k".into(), big(MAX_MESSAGE_SIZE + 1))]),
        ..conn()
    };
    let err = client
        .request(&mut Cx::client(), request(huge))
        .await
        .unwrap_err();
    // The client's own limit stops the body while encoding (tonic then resets the
    // stream: an h2 error), so the server never gets to say "decoded message length
    // too large" as it does to a client without a limit.
    assert!(!err.to_string().contains("decoded message"), "{err}");
    assert_eq!(mesh.counter.0.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn registry_entries_and_queries_have_the_same_bounds() {
    let mesh = server().await;
    let mut nse = NetworkServiceEndpointRegistryClient::new(mesh.channel.clone());
    let entry = |name: String, url: String| NetworkServiceEndpoint {
        name,
        url,
        network_service_names: vec!["svc".into()],
        ..Default::default()
    };
    nse.register(entry(big(MAX_NAME_LEN), big(MAX_VALUE_LEN)))
        .await
        .unwrap();
    let status = nse
        .register(entry(big(MAX_NAME_LEN + 1), "tcp://a:1".into()))
        .await
        .unwrap_err();
    assert_refused(&status, "network_service_endpoint.name", "nse name");
    let status = nse
        .register(entry("nse".into(), big(MAX_VALUE_LEN + 1)))
        .await
        .unwrap_err();
    assert_refused(&status, "network_service_endpoint.url", "nse url");
    let status = nse
        .unregister(entry(big(10_000), String::new()))
        .await
        .unwrap_err();
    assert_refused(&status, "network_service_endpoint.name", "unregister");
    let status = nse
        .find(NetworkServiceEndpointQuery {
            network_service_endpoint: Some(NetworkServiceEndpoint {
                network_service_names: vec![big(MAX_NAME_LEN + 1)],
                ..Default::default()
            }),
            watch: false,
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_refused(&status, "network_service_names", "find");

    let mut ns = NetworkServiceRegistryClient::new(mesh.channel.clone());
    ns.register(NetworkService {
        name: big(MAX_NAME_LEN),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = ns
        .register(NetworkService {
            name: big(MAX_NAME_LEN + 1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused(&status, "network_service.name", "ns name");
}

#[tokio::test]
async fn monitor_selectors_are_bounded() {
    let mesh = server().await;
    let mut monitor = MonitorConnectionClient::new(mesh.channel.clone());
    monitor
        .monitor_connections(MonitorScopeSelector {
            path_segments: vec![PathSegment::default(); MAX_PATH_SEGMENTS],
            network_services: vec![big(MAX_NAME_LEN)],
        })
        .await
        .unwrap();
    let status = monitor
        .monitor_connections(MonitorScopeSelector {
            path_segments: vec![PathSegment::default(); MAX_PATH_SEGMENTS + 1],
            network_services: vec![],
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_refused(&status, "selector.path_segments", "selector");
}

#[tokio::test]
async fn a_token_in_metadata_over_the_bound_is_refused() {
    let mesh = server().await;
    let mut ns = NetworkServiceClient::new(mesh.channel.clone());
    let mut call = tonic::Request::new(request(conn()));
    call.metadata_mut().insert(
        metadata::CLIENT_TOKEN,
        big(MAX_TOKEN_LEN + 1).parse().unwrap(),
    );
    let status = ns.request(call).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(mesh.counter.0.load(Ordering::SeqCst), 0);
}

/// Every line our crate logs, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The longest run of `c` in `text`.
fn longest_run(text: &str, c: char) -> usize {
    text.split(|x| x != c)
        .map(|run| run.len() / c.len_utf8())
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_10kb_string_from_a_peer_logs_at_most_256_bytes_of_itself() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("nsm_sdk=trace")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mesh = server().await;
    let huge = "z".repeat(10_000);
    let mut ns = NetworkServiceClient::new(mesh.channel.clone());
    for c in [
        Connection {
            id: huge.clone(),
            ..conn()
        },
        Connection {
            network_service: huge.clone(),
            ..conn()
        },
        Connection {
            labels: HashMap::from([(huge.clone(), huge.clone())]),
            ..conn()
        },
    ] {
        let status = ns.request(request(c.clone())).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(ns.close(c).await.is_err());
    }
    let mut expires = tonic::Request::new(request(conn()));
    expires
        .metadata_mut()
        .insert(metadata::CLIENT_TOKEN_EXPIRES, huge.parse().unwrap());
    assert!(ns.request(expires).await.is_err());
    let mut nse = NetworkServiceEndpointRegistryClient::new(mesh.channel.clone());
    let entry = NetworkServiceEndpoint {
        name: huge.clone(),
        url: huge.clone(),
        network_service_names: vec![huge.clone()],
        ..Default::default()
    };
    assert!(nse.register(entry.clone()).await.is_err());
    assert!(nse.unregister(entry).await.is_err());
    let mut reg = NetworkServiceRegistryClient::new(mesh.channel.clone());
    assert!(reg
        .register(NetworkService {
            name: huge.clone(),
            ..Default::default()
        })
        .await
        .is_err());

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("rejected call"),
        "the refusals are logged: {text}"
    );
    let longest = longest_run(&text, 'z');
    assert!(
        longest <= MAX_SHOWN,
        "a log line holds {longest} bytes of the peer's string"
    );
}
