//! mTLS on every kind of link, with certificates from a real (throw-away) CA: who gets
//! in, who does not, and what each side learns of the other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use super::*;
use crate::security::dev_ca::DevCa;
use crate::security::{Identity, SpiffeId, Svid, TrustBundle};
use crate::token::OutgoingToken;

fn tls(identity: Identity) -> Tls {
    Tls::new(identity.fixed()).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A server on `url` that answers over mTLS as `spiffe://example.org/server`.
async fn secure_server(ca: &DevCa, url: &Url, echo: &Echo) -> Server {
    let identity = ca.identity("server").unwrap();
    serve(url, services(echo).tls(tls(identity))).await.unwrap()
}

#[tokio::test]
async fn each_side_of_an_mtls_link_learns_the_others_spiffe_id() {
    let ca = DevCa::new("example.org").unwrap();
    let channels = Channels::new().tls(tls(ca.identity("client").unwrap()));
    assert!(channels.is_secure());
    let client = client_chain(&channels);
    let (_sock, urls) = every_kind();
    for url in urls {
        let echo = Echo::default();
        let server = secure_server(&ca, &url, &echo).await;
        let mut cx = cx_for(server.url());
        let conn = client
            .request(&mut cx, request_with("c-1", &[]))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(conn.labels["served"], "yes", "{url}");
        let seen = echo
            .last()
            .peer
            .identity
            .expect("the server knows its caller");
        assert_eq!(seen.id, id("spiffe://example.org/client"), "{url}");
        let known = cx
            .peer()
            .identity
            .clone()
            .expect("the client knows its server");
        assert_eq!(known.id, id("spiffe://example.org/server"), "{url}");
        client.close(&mut cx_for(server.url()), conn).await.unwrap();
        assert_eq!(*echo.closed.lock().unwrap(), ["c-1"], "{url}");
    }
}

/// Counts the calls that reach the server's chain.
#[derive(Clone, Default)]
struct Reached(Arc<AtomicUsize>);

#[async_trait]
impl Handler for Reached {
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

/// Calls a server that runs as `spiffe://example.org/server` with `channels`; the
/// caller must be refused before the server's chain sees anything.
async fn refused(channels: Channels, url: &Url, server_ca: &DevCa) -> Error {
    let reached = Reached::default();
    let chain = Chain::builder().push(reached.clone()).build();
    let identity = server_ca.identity("server").unwrap();
    let server = serve(
        url,
        Services::new().network_service(chain).tls(tls(identity)),
    )
    .await
    .unwrap();
    let err = client_chain(&channels)
        .request(&mut cx_for(server.url()), request_with("c", &[]))
        .await
        .unwrap_err();
    assert_eq!(
        reached.0.load(Ordering::SeqCst),
        0,
        "{url}: nothing is made"
    );
    err
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_and_nothing_is_made() {
    let ca = DevCa::new("example.org").unwrap();
    let (_sock, urls) = every_kind();
    for url in urls {
        let err = refused(Channels::new(), &url, &ca).await;
        assert_eq!(err.code(), Code::Unavailable, "{url}: {err}");
    }
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused_and_nothing_is_made() {
    let ca = DevCa::new("example.org").unwrap();
    let other = DevCa::new("example.org").unwrap();
    let (_sock, urls) = every_kind();
    for url in urls {
        let channels = Channels::new().tls(tls(other.identity("intruder").unwrap()));
        let err = refused(channels, &url, &ca).await;
        assert_eq!(err.code(), Code::Unavailable, "{url}: {err}");
    }
}

#[tokio::test]
async fn a_client_with_an_expired_certificate_is_refused_and_nothing_is_made() {
    let ca = DevCa::new("example.org").unwrap();
    let issued = ca.issue_expired(&id("spiffe://example.org/late")).unwrap();
    let expired = Identity::new(
        Svid::from_pem_even_expired(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap(),
        TrustBundle::from_pem(issued.bundle_pem.as_bytes()).unwrap(),
    );
    let (_sock, urls) = every_kind();
    for url in urls {
        let channels = Channels::new().tls(tls(expired.clone()));
        let err = refused(channels, &url, &ca).await;
        assert_eq!(err.code(), Code::Unavailable, "{url}: {err}");
    }
}

#[tokio::test]
async fn a_client_refuses_a_server_from_another_ca() {
    let ca = DevCa::new("example.org").unwrap();
    let rogue = DevCa::new("example.org").unwrap();
    let echo = Echo::default();
    let server = secure_server(&rogue, &inmem_url(), &echo).await;
    let channels = Channels::new().tls(tls(ca.identity("client").unwrap()));
    let err = client_chain(&channels)
        .request(&mut cx_for(server.url()), request_with("c", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(echo.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_plaintext_client_cannot_talk_to_a_secure_server_nor_the_reverse() {
    let ca = DevCa::new("example.org").unwrap();
    let echo = Echo::default();
    let plain = serve(&inmem_url(), services(&echo)).await.unwrap();
    let channels = Channels::new().tls(tls(ca.identity("client").unwrap()));
    let err = client_chain(&channels)
        .request(&mut cx_for(plain.url()), request_with("c", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(echo.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_outgoing_token_is_made_for_the_server_the_handshake_verified() {
    let ca = DevCa::new("example.org").unwrap();
    let echo = Echo::default();
    let server = secure_server(&ca, &inmem_url(), &echo).await;
    let identity = ca.identity("client").unwrap();
    let own_leaf = identity.svid.leaf().clone();
    let channels = Channels::new().tls(tls(identity));
    let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
    let generator = move |peer: &Peer| -> Result<(String, SystemTime)> {
        let aud = peer.identity.as_ref().map(|p| p.id.to_string());
        // The generator learns which certificate the link's handshake showed the server
        // (a token signed with it needs no chain).
        let presented = peer.identity.as_ref().and_then(|p| p.presented.as_ref());
        assert_eq!(presented.map(|p| &**p), Some(&own_leaf));
        Ok((format!("for {}", aud.unwrap_or_default()), expires))
    };
    let mut cx = cx_for(server.url());
    cx.ext_mut().insert(OutgoingToken(Arc::new(generator)));
    let mut req = request_with("c-1", &[]);
    req.connection.as_mut().unwrap().path = Some(nsm_proto::connection::Path {
        index: 0,
        path_segments: vec![Default::default()],
    });
    client_chain(&channels).request(&mut cx, req).await.unwrap();
    let seen = echo.last().peer;
    assert_eq!(
        seen.token.as_deref(),
        Some("for spiffe://example.org/server")
    );
    // And the server learns the certificate it presented to this caller.
    let presented = seen.identity.as_ref().and_then(|p| p.presented.as_ref());
    let presented = crate::security::SpiffeId::from_certificate(presented.unwrap()).unwrap();
    assert_eq!(presented.as_str(), "spiffe://example.org/server");
    assert_eq!(seen.token_expires, Some(expires));
    assert_eq!(
        cx.peer().token.as_deref(),
        Some("for spiffe://example.org/server"),
        "the client's own segment and metadata carry the same token"
    );
}

#[tokio::test]
async fn concurrent_first_calls_to_a_peer_all_succeed_on_one_channel() {
    let ca = DevCa::new("example.org").unwrap();
    let echo = Echo::default();
    let server = secure_server(&ca, &inmem_url(), &echo).await;
    let channels = Channels::new().tls(tls(ca.identity("client").unwrap()));
    let client = client_chain(&channels);
    let calls = (0..50).map(|i| {
        let client = client.clone();
        let url = server.url().clone();
        async move {
            client
                .request(&mut cx_for(&url), request_with(&format!("c-{i}"), &[]))
                .await
        }
    });
    for out in futures::future::join_all(calls).await {
        out.unwrap();
    }
    assert_eq!(channels.len(), 1);
    assert_eq!(echo.seen.lock().unwrap().len(), 50);
}

#[tokio::test]
async fn after_a_server_restarts_with_a_new_certificate_the_answer_names_the_new_one() {
    let ca = DevCa::new("example.org").unwrap();
    let sock = TempSocket::new();
    let url = sock.url();
    let channels = Channels::new().tls(tls(ca.identity("client").unwrap()));
    let client = client_chain(&channels);
    let leaf_of = |cx: &Cx| cx.peer().identity.as_ref().map(|p| (*p.leaf).clone());

    let first = ca.identity("server").unwrap();
    let first_leaf = first.svid.leaf().clone();
    let echo = Echo::default();
    let server = serve(&url, services(&echo).tls(tls(first))).await.unwrap();
    let mut cx = cx_for(&url);
    client
        .request(&mut cx, request_with("c-1", &[]))
        .await
        .unwrap();
    assert_eq!(leaf_of(&cx), Some(first_leaf.clone()));
    server.kill();
    drop(server);

    // The same SPIFFE ID with a new certificate and key, as a restarted workload gets.
    let second = ca.identity("server").unwrap();
    let second_leaf = second.svid.leaf().clone();
    assert_ne!(first_leaf, second_leaf);
    let _server = serve(&url, services(&echo).tls(tls(second))).await.unwrap();
    let mut cx = cx_for(&url);
    // The first call may find the old connection broken; the pool reconnects.
    let mut answered = client.request(&mut cx, request_with("c-2", &[])).await;
    if answered.is_err() {
        cx = cx_for(&url);
        answered = client.request(&mut cx, request_with("c-2", &[])).await;
    }
    answered.unwrap();
    // What a client-side authorize checks the answer's token against: the certificate
    // of the handshake the answer came over, not the one known before the call.
    assert_eq!(leaf_of(&cx), Some(second_leaf));
}

/// What gRPC C-core and grpc-java send over a unix socket: the socket path as
/// `:authority` (`transport::authority`). A raw HTTP/2 client over mTLS sends a Request
/// with that authority; the server's chain answers it (grpc-status 0) and saw the
/// caller's SPIFFE ID: the rewrite happens after the handshake, mTLS stays on.
#[tokio::test]
async fn a_socket_path_authority_is_answered_over_mtls() {
    use loona_hpack::{Decoder, Encoder};
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::transport::authority::{frame, PREFACE};

    let ca = DevCa::new("example.org").unwrap();
    let sock = TempSocket::new();
    let echo = Echo::default();
    let server = secure_server(&ca, &sock.url(), &echo).await;
    let Url::Unix(path) = server.url().clone() else {
        unreachable!("a unix URL")
    };
    let io = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (mut io, _) = tls(ca.identity("client").unwrap())
        .connect(io)
        .await
        .unwrap();

    // As grpcio writes it: the path without its leading slash, percent-encoded.
    let authority = path
        .to_str()
        .unwrap()
        .trim_start_matches('/')
        .replace('/', "%2F");
    let block = Encoder::new().encode(vec![
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/networkservice.NetworkService/Request"),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]);
    let message = request_with("c-1", &[]).encode_to_vec();
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &block));
    out.extend(frame(0x0, 0x1, 1, &body));
    io.write_all(&out).await.unwrap();

    // Frames until the response's trailers (HEADERS with END_STREAM on stream 1).
    let mut decoder = Decoder::new();
    let trailers = timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
            let mut payload = vec![0; len];
            io.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            match head[3] {
                0x3 => panic!("RST_STREAM {payload:?}: the authority was refused"),
                0x7 => panic!("GOAWAY {payload:?}"),
                0x4 if head[4] & 0x1 == 0 => io.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
                0x1 => {
                    let headers = decoder.decode(&payload).unwrap();
                    if stream == 1 && head[4] & 0x1 != 0 {
                        return headers;
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .expect("an answer");
    let status = trailers
        .iter()
        .find(|(n, _)| n == b"grpc-status")
        .map(|(_, v)| v.clone());
    assert_eq!(status.as_deref(), Some(&b"0"[..]), "{trailers:?}");
    let seen = echo.last();
    assert_eq!(seen.id, "c-1");
    assert_eq!(
        seen.peer.identity.expect("mTLS").id,
        id("spiffe://example.org/client")
    );
    drop(server);
}
