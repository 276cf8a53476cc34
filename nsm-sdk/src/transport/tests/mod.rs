//! The transport over real gRPC: servers on tcp (127.0.0.1 only), unix sockets in a
//! temporary directory and `inmem://`, called through the client edge.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector,
};
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery};
use tokio::sync::broadcast;
use tokio::time::{timeout, Instant};
use tokio_stream::wrappers::BroadcastStream;
use tonic::Code;

use super::*;
use crate::core::{Chain, Cx, Handler, MonitorSource, Next, Peer};
use crate::registry::{
    FindStream, Found, Query, RegistryChain, RegistryHandler, RegistryNext, Resource,
};
use crate::{Error, Result};

mod tls;

const PROMPTLY: Duration = Duration::from_secs(1);

/// A fresh unix socket path in its own directory under the system temp dir; the
/// directory is removed when the guard drops.
struct TempSocket {
    dir: PathBuf,
}

impl TempSocket {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("nsm-rs-transport-{}", uuid::Uuid::new_v4()));
        TempSocket { dir }
    }
    fn url(&self) -> Url {
        Url::Unix(self.dir.join("sub").join("nsm.sock"))
    }
}

impl Drop for TempSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn inmem_url() -> Url {
    Url::Memory(format!("transport-test-{}", uuid::Uuid::new_v4()))
}

fn tcp_url() -> Url {
    "tcp://127.0.0.1:0".parse().unwrap()
}

/// One URL of each kind to listen on (the guard keeps the unix directory alive).
fn every_kind() -> (TempSocket, Vec<Url>) {
    let sock = TempSocket::new();
    let urls = vec![tcp_url(), sock.url(), inmem_url()];
    (sock, urls)
}

/// What the server chain saw of a call.
#[derive(Debug, Clone)]
struct Seen {
    remaining: Option<Duration>,
    peer: Peer,
    id: String,
}

/// The server's application: labels the connection, records what it saw, and fails with
/// the configured error when the request asks for it (label `fail`).
#[derive(Default, Clone)]
struct Echo {
    seen: Arc<Mutex<Vec<Seen>>>,
    closed: Arc<Mutex<Vec<String>>>,
}

impl Echo {
    fn record(&self, cx: &Cx, id: &str) {
        self.seen.lock().unwrap().push(Seen {
            remaining: cx.remaining(),
            peer: cx.peer().clone(),
            id: id.to_string(),
        });
    }
    fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

#[async_trait]
impl Handler for Echo {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.clone().unwrap_or_default();
        self.record(cx, &conn.id);
        match conn.labels.get("fail").map(String::as_str) {
            Some("permission") => return Err(Error::PermissionDenied("not you".into())),
            Some("not-found") => return Err(Error::not_found("no such service")),
            Some("slow") => tokio::time::sleep(Duration::from_secs(5)).await,
            _ => {}
        }
        let mut conn = next.request(cx, req).await?;
        conn.labels.insert("served".into(), "yes".into());
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        self.record(cx, &conn.id);
        self.closed.lock().unwrap().push(conn.id.clone());
        next.close(cx, conn).await
    }
}

/// Sends one INITIAL_STATE_TRANSFER, then nothing: a monitor stream that stays open.
struct QuietMonitor;

impl MonitorSource for QuietMonitor {
    fn subscribe(
        &self,
        _selector: MonitorScopeSelector,
    ) -> BoxStream<'static, Result<ConnectionEvent>> {
        let first = ConnectionEvent {
            r#type: ConnectionEventType::InitialStateTransfer as i32,
            ..Default::default()
        };
        stream::once(async move { Ok(first) })
            .chain(stream::pending())
            .boxed()
    }
}

fn services(echo: &Echo) -> Services {
    Services::new()
        .network_service(Chain::builder().push(echo.clone()).build())
        .monitor(Arc::new(QuietMonitor))
}

fn client_chain(channels: &Channels) -> Chain {
    Chain::builder().push(grpc_client(channels.clone())).build()
}

fn cx_for(url: &Url) -> Cx {
    let mut cx = Cx::client();
    cx.ext_mut().insert(ClientUrl(url.clone()));
    cx
}

fn request_with(id: &str, labels: &[(&str, &str)]) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn request_and_close_round_trip_over_tcp_unix_and_inmem() {
    let (_sock, urls) = every_kind();
    let channels = Channels::new();
    let client = client_chain(&channels);
    for url in urls {
        let echo = Echo::default();
        let server = serve(&url, services(&echo)).await.unwrap();
        if let Url::Tcp { port, .. } = server.url() {
            assert_ne!(*port, 0, "the server reports the port it got");
        }

        let mut cx = cx_for(server.url());
        let conn = client
            .request(&mut cx, request_with("c-1", &[]))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(conn.id, "c-1");
        // Over a unix socket the client learns who answered (SO_PEERCRED): this process.
        let answered_by = cx.peer().process.as_ref().and_then(|p| p.pid);
        match url {
            Url::Unix(_) => assert_eq!(answered_by, Some(std::process::id() as i32)),
            _ => assert_eq!(answered_by, None, "{url}"),
        }
        assert_eq!(
            conn.labels.get("served").map(String::as_str),
            Some("yes"),
            "{url}"
        );

        client.close(&mut cx_for(server.url()), conn).await.unwrap();
        assert_eq!(*echo.closed.lock().unwrap(), ["c-1"], "{url}");
    }
    assert_eq!(channels.len(), 3, "one channel per peer");
}

#[tokio::test]
async fn chain_errors_arrive_with_their_code() {
    let echo = Echo::default();
    let server = serve(&inmem_url(), services(&echo)).await.unwrap();
    let client = client_chain(&Channels::new());
    for (fail, code) in [
        ("permission", Code::PermissionDenied),
        ("not-found", Code::NotFound),
    ] {
        let err = client
            .request(
                &mut cx_for(server.url()),
                request_with("c", &[("fail", fail)]),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Remote { .. }), "{err:?}");
        assert_eq!(err.code(), code);
    }
}

#[tokio::test]
async fn a_call_past_its_deadline_fails_with_deadline_exceeded() {
    let server = serve(&inmem_url(), services(&Echo::default()))
        .await
        .unwrap();
    let started = Instant::now();
    let mut cx = cx_for(server.url()).with_timeout(Duration::from_millis(200));
    let err = client_chain(&Channels::new())
        .request(&mut cx, request_with("c", &[("fail", "slow")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(started.elapsed() < PROMPTLY);
}

#[tokio::test]
async fn the_server_sees_the_client_deadline_and_token() {
    let echo = Echo::default();
    let server = serve(&tcp_url(), services(&echo)).await.unwrap();
    let client = client_chain(&Channels::new());
    let expires = SystemTime::now() + Duration::from_secs(3600);

    let mut cx = cx_for(server.url()).with_timeout(Duration::from_secs(5));
    cx.peer_mut().token = Some("header.payload.signature".into());
    cx.peer_mut().token_expires = Some(expires);
    client
        .request(&mut cx, request_with("c-7", &[]))
        .await
        .unwrap();

    let seen = echo.last();
    assert_eq!(seen.id, "c-7");
    let left = seen.remaining.expect("the server has the deadline");
    assert!(
        left <= Duration::from_secs(5) && left > Duration::from_secs(4),
        "{left:?}"
    );
    assert_eq!(seen.peer.token.as_deref(), Some("header.payload.signature"));
    assert_eq!(seen.peer.token_expires, Some(expires));
    assert!(
        seen.peer
            .addr
            .as_deref()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{:?}",
        seen.peer.addr
    );

    // Without a deadline or token, the server sees none.
    client
        .close(&mut cx_for(server.url()), Connection::default())
        .await
        .unwrap();
    let seen = echo.last();
    assert_eq!(seen.remaining, None);
    assert_eq!(seen.peer.token, None);
    assert_eq!(seen.peer.token_expires, None);
}

#[tokio::test]
async fn kill_breaks_open_monitor_streams_at_once_and_the_url_serves_again() {
    let (_sock, urls) = every_kind();
    let channels = Channels::new();
    for url in urls {
        let server = serve(&url, services(&Echo::default())).await.unwrap();
        let url = server.url().clone();
        let mut events = monitor_connections(&channels, &url, MonitorScopeSelector::default())
            .await
            .unwrap();
        let first = events.next().await.unwrap().unwrap();
        assert_eq!(
            first.r#type,
            ConnectionEventType::InitialStateTransfer as i32
        );

        let killed_at = Instant::now();
        server.kill();
        let end = timeout(PROMPTLY, events.next())
            .await
            .unwrap_or_else(|_| panic!("{url}: the stream is still open 1 s after kill"));
        match end {
            Some(Err(e)) => assert_eq!(e.code(), Code::Unavailable, "{url}: {e}"),
            None => panic!("{url}: the stream ended quietly; a broken connection is an error"),
            Some(Ok(ev)) => panic!("{url}: unexpected event after kill: {ev:?}"),
        }
        assert!(killed_at.elapsed() < PROMPTLY);

        // A refresh to the dead peer fails fast on the channel it used.
        let err = timeout(
            PROMPTLY,
            client_chain(&channels).request(&mut cx_for(&url), request_with("refresh", &[])),
        )
        .await
        .unwrap_or_else(|_| panic!("{url}: a request to a killed server hangs"))
        .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{url}: {err}");
        drop(server);

        // The same URL at once, through the same channel pool.
        let echo = Echo::default();
        let again = serve(&url, services(&echo)).await.unwrap();
        assert_eq!(again.url(), &url);
        let mut events = monitor_connections(&channels, &url, MonitorScopeSelector::default())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(events.next().await.unwrap().is_ok());
        let conn = client_chain(&channels)
            .request(&mut cx_for(&url), request_with("after-restart", &[]))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(conn.labels.get("served").map(String::as_str), Some("yes"));
    }
}

#[tokio::test]
async fn kill_frees_the_socket_file_and_a_stale_one_is_replaced() {
    let sock = TempSocket::new();
    let url = sock.url();
    let Url::Unix(path) = &url else {
        unreachable!()
    };

    let server = serve(&url, Services::new()).await.unwrap();
    assert!(path.exists());
    server.kill();
    assert!(!path.exists(), "kill removes the socket file");
    drop(server);

    // A socket file left by a dead process.
    drop(std::os::unix::net::UnixListener::bind(path).unwrap());
    assert!(path.exists());
    let echo = Echo::default();
    let server = serve(&url, services(&echo)).await.unwrap();
    client_chain(&Channels::new())
        .request(&mut cx_for(&url), request_with("c", &[]))
        .await
        .unwrap();
    drop(server);
    assert!(
        !path.exists(),
        "drop kills, and kill removes the socket file"
    );

    // Something that is not a socket is never removed.
    std::fs::write(path, b"precious").unwrap();
    let err = serve(&url, Services::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(std::fs::read(path).unwrap(), b"precious");
}

#[tokio::test]
async fn a_unix_socket_admits_only_its_owner_and_group() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let sock = TempSocket::new();
    let url = sock.url();
    let Url::Unix(path) = &url else {
        unreachable!()
    };
    let echo = Echo::default();
    let server = serve(&url, services(&echo)).await.unwrap();
    let meta = std::fs::symlink_metadata(path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        super::listener::SOCKET_MODE,
        "owner and group only, whatever the umask"
    );
    let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("nsm.sock")],
        "no staging name left"
    );
    client_chain(&Channels::new())
        .request(&mut cx_for(&url), request_with("c", &[]))
        .await
        .unwrap();
    drop(server);
}

#[tokio::test]
async fn a_request_where_nothing_listens_fails_fast_with_unavailable() {
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let sock = TempSocket::new();
    let channels = Channels::new();
    let client = client_chain(&channels);
    for url in [
        Url::Tcp {
            host: "127.0.0.1".into(),
            port: closed_port,
        },
        sock.url(),
        inmem_url(),
    ] {
        let started = Instant::now();
        let err = timeout(
            PROMPTLY,
            client.request(&mut cx_for(&url), request_with("c", &[])),
        )
        .await
        .unwrap_or_else(|_| panic!("{url}: no answer within 1 s"))
        .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{url}: {err}");
        assert!(started.elapsed() < PROMPTLY);
    }
    let err = client
        .request(&mut cx_for(&inmem_url()), request_with("c", &[]))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("nothing listens on inmem://"),
        "{err}"
    );
}

#[tokio::test]
async fn a_client_chain_without_a_url_is_an_internal_error() {
    let err = client_chain(&Channels::new())
        .request(&mut Cx::client(), request_with("c", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.to_string().contains("ClientUrl"), "{err}");
}

#[tokio::test]
async fn missing_fields_and_bad_metadata_do_not_panic_the_server() {
    let echo = Echo::default();
    let server = serve(
        &inmem_url(),
        services(&echo).nse_registry(RegistryChain::builder().build()),
    )
    .await
    .unwrap();
    let channel = Channels::new().channel(server.url()).unwrap();

    let mut ns = NetworkServiceClient::new(channel.clone());
    let conn = ns
        .request(NetworkServiceRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conn.labels.get("served").map(String::as_str), Some("yes"));

    let mut bad = tonic::Request::new(NetworkServiceRequest::default());
    bad.metadata_mut().insert(
        metadata::CLIENT_TOKEN_EXPIRES,
        "next tuesday".parse().unwrap(),
    );
    let status = ns.request(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let mut nse = NetworkServiceEndpointRegistryClient::new(channel);
    let mut found = nse
        .find(NetworkServiceEndpointQuery::default())
        .await
        .unwrap()
        .into_inner();
    assert!(found.next().await.is_none(), "an empty chain finds nothing");
}

#[tokio::test]
async fn graceful_shutdown_ends_open_streams_and_frees_the_url() {
    let url = inmem_url();
    let channels = Channels::new();
    let server = serve(&url, services(&Echo::default())).await.unwrap();
    let mut events = monitor_connections(&channels, &url, MonitorScopeSelector::default())
        .await
        .unwrap();
    events.next().await.unwrap().unwrap();

    timeout(PROMPTLY, server.shutdown())
        .await
        .expect("shutdown finishes");
    let end = timeout(PROMPTLY, events.next()).await.unwrap();
    assert_eq!(end.unwrap().unwrap_err().code(), Code::Unavailable);
    let _again = serve(&url, Services::new()).await.unwrap();
}

/// A test registry: entries in a Vec, watchers on a broadcast channel.
struct VecStore<R: Resource> {
    entries: Mutex<Vec<R>>,
    changes: broadcast::Sender<Found<R>>,
}

impl<R: Resource> VecStore<R> {
    fn new() -> Self {
        VecStore {
            entries: Mutex::new(Vec::new()),
            changes: broadcast::channel(16).0,
        }
    }
}

fn matches<R: Resource>(template: &R, r: &R) -> bool {
    template.name().is_empty() || template.name() == r.name()
}

#[async_trait]
impl<R: Resource> RegistryHandler<R> for VecStore<R> {
    async fn register(&self, _cx: &mut Cx, r: R, _next: RegistryNext<R>) -> Result<R> {
        let mut entries = self.entries.lock().unwrap();
        entries.retain(|e| e.name() != r.name());
        entries.push(r.clone());
        let _ = self.changes.send(Found {
            resource: r.clone(),
            deleted: false,
        });
        Ok(r)
    }

    async fn find(
        &self,
        _cx: &mut Cx,
        query: Query<R>,
        _next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        let changes = BroadcastStream::new(self.changes.subscribe());
        let current: Vec<_> = self
            .entries
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches(&query.template, r))
            .map(|r| {
                Ok(Found {
                    resource: r.clone(),
                    deleted: false,
                })
            })
            .collect();
        let current = stream::iter(current);
        if !query.watch {
            return Ok(current.boxed());
        }
        let template = query.template;
        let later = changes.filter_map(move |c| {
            let item = c.ok().filter(|f| matches(&template, &f.resource)).map(Ok);
            async move { item }
        });
        Ok(current.chain(later).boxed())
    }

    async fn unregister(&self, _cx: &mut Cx, r: R, _next: RegistryNext<R>) -> Result<()> {
        self.entries
            .lock()
            .unwrap()
            .retain(|e| e.name() != r.name());
        let _ = self.changes.send(Found {
            resource: r,
            deleted: true,
        });
        Ok(())
    }
}

async fn next_found<R: Resource>(watch: &mut FindStream<R>) -> Found<R> {
    timeout(PROMPTLY, watch.next())
        .await
        .expect("a watch event within 1 s")
        .expect("the watch is open")
        .expect("an entry")
}

fn nse(name: &str) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: name.into(),
        network_service_names: vec!["icmp".into()],
        url: "tcp://127.0.0.1:5002".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn registry_register_find_watch_unregister_through_grpc_registry() {
    let sock = TempSocket::new();
    let server = serve(
        &sock.url(),
        Services::new()
            .nse_registry(RegistryChain::builder().push(VecStore::new()).build())
            .ns_registry(RegistryChain::builder().push(VecStore::new()).build()),
    )
    .await
    .unwrap();
    let channels = Channels::new();
    let nses: RegistryChain<NetworkServiceEndpoint> = RegistryChain::builder()
        .push(grpc_registry(channels.clone(), server.url().clone()))
        .build();
    let nss: RegistryChain<NetworkService> = RegistryChain::builder()
        .push(grpc_registry(channels.clone(), server.url().clone()))
        .build();
    let cx = || Cx::client().with_timeout(Duration::from_secs(5));

    assert_eq!(
        nses.register(&mut cx(), nse("nse-1")).await.unwrap(),
        nse("nse-1")
    );
    let mut watch = nses
        .find(
            &mut cx(),
            Query {
                template: NetworkServiceEndpoint::default(),
                watch: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        next_found(&mut watch).await,
        Found {
            resource: nse("nse-1"),
            deleted: false
        }
    );

    nses.register(&mut cx(), nse("nse-2")).await.unwrap();
    assert_eq!(
        next_found(&mut watch).await,
        Found {
            resource: nse("nse-2"),
            deleted: false
        }
    );

    nses.unregister(&mut cx(), nse("nse-1")).await.unwrap();
    assert_eq!(
        next_found(&mut watch).await,
        Found {
            resource: nse("nse-1"),
            deleted: true
        }
    );

    assert_eq!(
        nses.list(&mut cx(), NetworkServiceEndpoint::default())
            .await
            .unwrap(),
        [nse("nse-2")]
    );

    let ns = NetworkService {
        name: "icmp".into(),
        payload: "ETHERNET".into(),
        ..Default::default()
    };
    nss.register(&mut cx(), ns.clone()).await.unwrap();
    let template = NetworkService {
        name: "icmp".into(),
        ..Default::default()
    };
    assert_eq!(
        nss.list(&mut cx(), template.clone()).await.unwrap(),
        std::slice::from_ref(&ns)
    );
    nss.unregister(&mut cx(), ns).await.unwrap();
    assert!(nss.list(&mut cx(), template).await.unwrap().is_empty());
}
