//! Every refusal here is made with real certificates from a `DevCa` and real ES256
//! signatures; only the transport's part (naming the peer, carrying the token) is played
//! by the tests, as the gRPC edge will do it.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Path, PathSegment, State};
use nsm_proto::networkservice::NetworkServiceRequest;
use prost_types::Timestamp;

use crate::security::policy::path_input;

use super::*;
use crate::core::{Chain, Peer};
use crate::handlers::test_support::{eventually, TestHop};
use crate::handlers::{begin, timeout, update_path, update_token, Begin};
use crate::security::dev_ca::{DevCa, IssuedSvid};
use crate::security::jwt::{self, SignedToken};
use crate::security::{Identity, PeerIdentity, Svid, TrustBundle};
use crate::token::{jwt_token, OutgoingToken};

const HOUR: Duration = Duration::from_secs(3600);

pub(crate) fn policies() -> Arc<PolicySet> {
    static SET: OnceLock<Arc<PolicySet>> = OnceLock::new();
    SET.get_or_init(|| Arc::new(PolicySet::defaults().unwrap()))
        .clone()
}

/// Identities of one trust domain, issued by one CA.
pub(crate) struct Ids {
    pub(crate) ca: DevCa,
}

impl Ids {
    pub(crate) fn new() -> Ids {
        Ids {
            ca: DevCa::new("example.org").unwrap(),
        }
    }

    pub(crate) fn issue(&self, name: &str) -> IssuedSvid {
        let id = SpiffeId::parse(&format!("spiffe://example.org/{name}")).unwrap();
        self.ca.issue(&id, HOUR).unwrap()
    }
}

pub(crate) fn svid(issued: &IssuedSvid) -> Svid {
    Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
}

pub(crate) fn identity(issued: &IssuedSvid) -> Identity {
    let bundle = TrustBundle::from_pem(issued.bundle_pem.as_bytes()).unwrap();
    Identity::new(svid(issued), bundle)
}

pub(crate) fn peer_id(issued: &IssuedSvid) -> PeerIdentity {
    PeerIdentity::from_leaf(svid(issued).leaf().clone()).unwrap()
}

/// A token `from` signs for `to`, living an hour.
pub(crate) fn token(from: &IssuedSvid, to: &IssuedSvid) -> SignedToken {
    jwt::sign(&svid(from), &peer_id(to).id, None, HOUR).unwrap()
}

/// What the transport puts in `Cx` for a call from `who` carrying `token`.
fn from(who: &IssuedSvid, token: &SignedToken) -> Cx {
    Cx::server().with_peer(Peer {
        identity: Some(peer_id(who)),
        token: Some(token.token.clone()),
        token_expires: Some(token.expires),
        ..Default::default()
    })
}

fn segment(name: &str, id: &str, token: &str) -> PathSegment {
    PathSegment {
        name: name.into(),
        id: id.into(),
        token: token.into(),
        ..Default::default()
    }
}

/// A request that arrives from the hop whose segment is the last of `segments`.
fn arriving(segments: Vec<PathSegment>) -> NetworkServiceRequest {
    let index = segments.len() as u32 - 1;
    NetworkServiceRequest {
        connection: Some(Connection {
            id: segments[index as usize].id.clone(),
            path: Some(Path {
                index,
                path_segments: segments,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A request from the hop `name` (its connection `id`) for the connection `at_nse`
/// already has at `nse`.
fn aimed_at(name: &str, id: &str, at_nse: &str) -> NetworkServiceRequest {
    let mut req = arriving(vec![segment(name, id, ""), segment("nse", at_nse, "")]);
    let conn = req.connection.as_mut().unwrap();
    conn.id = id.into();
    conn.path.as_mut().unwrap().index = 0;
    req
}

/// The endpoint `nse` with the server-side `authorize`, and what reached past it.
struct Nse {
    chain: Chain,
    begin: Begin,
    hop: Arc<TestHop>,
}

fn nse(me: &IssuedSvid) -> Nse {
    let begin = begin();
    let hop = Arc::new(TestHop::default());
    let chain = Chain::builder()
        .push(update_path("nse"))
        .push(begin.clone())
        .push(update_token(Arc::new(jwt_token(
            identity(me).fixed(),
            HOUR,
        ))))
        .push(authorize_server(policies()))
        .push(hop.clone())
        .build();
    Nse { chain, begin, hop }
}

impl Nse {
    /// A first Request from `nsc` (one segment) in `cx`.
    async fn first_request(&self, cx: &mut Cx) -> Result<Connection> {
        self.chain
            .request(cx, arriving(vec![segment("nsc", "c", "")]))
            .await
    }
}

fn assert_denied<T: fmt::Debug>(r: Result<T>, policy: &str) {
    match r {
        Err(Error::PermissionDenied(m)) => assert!(m.contains(policy), "{policy}: {m}"),
        other => panic!("expected PermissionDenied by {policy}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_caller_with_its_own_chained_tokens_is_served() {
    let ids = Ids::new();
    let (nsc, nsmgr, me) = (ids.issue("nsc"), ids.issue("nsmgr"), ids.issue("nse"));
    let nse = nse(&me);
    // nsc -> nsmgr -> nse: nsmgr is the TLS peer and sends its token as metadata.
    let req = arriving(vec![
        segment("nsc", "c", &token(&nsc, &nsmgr).token),
        segment("nsmgr", "m", ""),
    ]);
    let conn = nse
        .chain
        .request(&mut from(&nsmgr, &token(&nsmgr, &me)), req)
        .await
        .unwrap();
    assert_eq!(nse.hop.requests(), 1);
    assert_eq!(conn.path.unwrap().path_segments.len(), 3);
}

#[tokio::test]
async fn a_caller_without_a_verified_identity_is_refused() {
    let ids = Ids::new();
    let (nsc, me) = (ids.issue("nsc"), ids.issue("nse"));
    let nse = nse(&me);
    let t = token(&nsc, &me);
    let mut cx = from(&nsc, &t);
    cx.peer_mut().identity = None;
    let r = nse.first_request(&mut cx).await;
    assert_denied(r, "no verified identity");
    assert_eq!((nse.hop.attempts(), nse.begin.len()), (0, 0));
}

#[tokio::test]
async fn a_token_that_is_no_jwt_is_refused_by_tokens_valid() {
    let ids = Ids::new();
    let (nsc, me) = (ids.issue("nsc"), ids.issue("nse"));
    let nse = nse(&me);
    let mut cx = from(&nsc, &token(&nsc, &me));
    cx.peer_mut().token = Some("nsm-rs".into());
    let r = nse.first_request(&mut cx).await;
    assert_denied(r, "tokens_valid");
    assert_eq!(nse.hop.attempts(), 0);
}

#[tokio::test]
async fn a_token_signed_by_another_key_is_refused_by_prev_token_signed() {
    let ids = Ids::new();
    let (nsc, me) = (ids.issue("nsc"), ids.issue("nse"));
    // The same SPIFFE ID from another CA: another key, claims that look right.
    let forger = Ids::new().issue("nsc");
    let forged = token(&forger, &me);
    assert_eq!(
        jwt::decode_unverified(&forged.token).unwrap(),
        jwt::decode_unverified(&token(&nsc, &me).token).unwrap()
    );
    let nse = nse(&me);
    let r = nse.first_request(&mut from(&nsc, &forged)).await;
    assert_denied(r, "prev_token_signed");
    assert_eq!(nse.hop.attempts(), 0);
}

#[tokio::test]
async fn an_expired_token_is_refused_by_tokens_expired() {
    let ids = Ids::new();
    let (nsc, me) = (ids.issue("nsc"), ids.issue("nse"));
    let old = jwt::sign_at(
        &svid(&nsc),
        &peer_id(&me).id,
        None,
        Duration::from_secs(60),
        SystemTime::now() - Duration::from_secs(120),
    )
    .unwrap();
    let nse = nse(&me);
    let r = nse.first_request(&mut from(&nsc, &old)).await;
    assert_denied(r, "tokens_expired");
    assert_eq!(nse.hop.attempts(), 0);
}

#[tokio::test]
async fn a_token_made_for_another_hop_breaks_the_chain() {
    let ids = Ids::new();
    let (nsc, nsmgr, other, me) = (
        ids.issue("nsc"),
        ids.issue("nsmgr"),
        ids.issue("nsmgr-2"),
        ids.issue("nse"),
    );
    let nse = nse(&me);
    // nsc's token names nsmgr-2, but nsmgr forwarded it.
    let req = arriving(vec![
        segment("nsc", "c", &token(&nsc, &other).token),
        segment("nsmgr", "m", ""),
    ]);
    let r = nse
        .chain
        .request(&mut from(&nsmgr, &token(&nsmgr, &me)), req)
        .await;
    assert_denied(r, "tokens_chained");
    assert_eq!(nse.hop.attempts(), 0);
}

#[tokio::test]
async fn a_token_replayed_from_another_path_is_refused() {
    let ids = Ids::new();
    let (nsc, nsmgr, evil, me) = (
        ids.issue("nsc"),
        ids.issue("nsmgr"),
        ids.issue("evil"),
        ids.issue("nse"),
    );
    let nse = nse(&me);
    // A valid identity of its own sends nsc's token, taken from nsc's path, as its own.
    let stolen = token(&nsc, &me);
    let r = nse.first_request(&mut from(&evil, &stolen)).await;
    assert_denied(r, "prev_token_signed");
    // Or signs its own and puts nsc's segment (made for nsmgr) before it.
    let req = arriving(vec![
        segment("nsc", "c", &token(&nsc, &nsmgr).token),
        segment("evil", "e", ""),
    ]);
    let r = nse
        .chain
        .request(&mut from(&evil, &token(&evil, &me)), req)
        .await;
    assert_denied(r, "tokens_chained");
    assert_eq!((nse.hop.attempts(), nse.begin.len()), (0, 0));
}

/// The victim's connection at `nse` and the id it has there.
async fn victims_connection(nse: &Nse, nsc: &IssuedSvid, me: &IssuedSvid) -> (Connection, String) {
    let conn = nse
        .chain
        .request(
            &mut from(nsc, &token(nsc, me)),
            arriving(vec![segment("nsc", "c", "")]),
        )
        .await
        .unwrap();
    let id = nse.hop.passed(0).id;
    (conn, id)
}

#[tokio::test]
async fn another_identity_can_neither_close_nor_refresh_nor_reselect_a_connection() {
    let ids = Ids::new();
    let (nsc, evil, me) = (ids.issue("nsc"), ids.issue("evil"), ids.issue("nse"));
    let nse = nse(&me);
    let (victims, at_nse) = victims_connection(&nse, &nsc, &me).await;

    // evil holds a valid SVID and signs valid tokens of its own: only ownership refuses.
    let evils = token(&evil, &me);
    let r = nse
        .chain
        .close(&mut from(&evil, &evils), victims.clone())
        .await;
    assert_denied(r, "belongs to another identity");

    let attack = |state: State| {
        let mut req = aimed_at("evil", "e", &at_nse);
        req.connection.as_mut().unwrap().state = state as i32;
        req
    };
    let r = nse
        .chain
        .request(&mut from(&evil, &evils), attack(State::Up))
        .await;
    assert_denied(r, "belongs to another identity");
    let r = nse
        .chain
        .request(&mut from(&evil, &evils), attack(State::ReselectRequested))
        .await;
    assert_denied(r, "belongs to another identity");

    // Untouched: nothing went down, the connection is still held.
    assert_eq!((nse.hop.requests(), nse.hop.closes()), (1, 0));
    assert_eq!(nse.begin.ids(), vec![at_nse.clone()]);

    // The owner still refreshes and closes it.
    let mut cx = from(&nsc, &token(&nsc, &me));
    let refreshed = nse
        .chain
        .request(
            &mut cx,
            NetworkServiceRequest {
                connection: Some(victims),
                ..Default::default()
            },
        )
        .await;
    let refreshed = refreshed.unwrap();
    assert_eq!(nse.hop.requests(), 2);
    assert_eq!(nse.hop.passed(1).id, at_nse);
    nse.chain
        .close(&mut from(&nsc, &token(&nsc, &me)), refreshed)
        .await
        .unwrap();
    assert_eq!((nse.hop.closes(), nse.begin.len()), (1, 0));
}

#[tokio::test]
async fn the_owner_is_forgotten_with_the_connection() {
    let ids = Ids::new();
    let (nsc, other, me) = (ids.issue("nsc"), ids.issue("nsc-2"), ids.issue("nse"));
    let nse = nse(&me);
    let (conn, at_nse) = victims_connection(&nse, &nsc, &me).await;
    nse.chain
        .close(&mut from(&nsc, &token(&nsc, &me)), conn)
        .await
        .unwrap();
    // The id is free again: whoever asks for it first owns it.
    let req = aimed_at("nsc-2", "x", &at_nse);
    nse.chain
        .request(&mut from(&other, &token(&other, &me)), req)
        .await
        .unwrap();
    assert_eq!(nse.begin.ids(), vec![at_nse]);
}

/// Keeps the connection of every Close that reaches it.
#[derive(Default, Clone)]
struct Closes(Arc<Mutex<Vec<Connection>>>);

#[async_trait]
impl Handler for Closes {
    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        self.0.lock().unwrap().push(conn.clone());
        next.close(cx, conn).await
    }
}

#[tokio::test]
async fn the_timeout_closes_downstream_when_every_token_has_expired() {
    let ids = Ids::new();
    let (nsc, me) = (ids.issue("nsc"), ids.issue("nse"));
    let closes = Closes::default();
    let begin = begin();
    let chain = Chain::builder()
        .push(update_path("nse"))
        .push(begin.clone())
        .push(update_token(Arc::new(jwt_token(
            identity(&me).fixed(),
            Duration::from_secs(2),
        ))))
        .push(authorize_server(policies()))
        .push(timeout().margin(Duration::ZERO))
        .push(closes.clone())
        .build();
    let short = jwt::sign(&svid(&nsc), &peer_id(&me).id, None, Duration::from_secs(2)).unwrap();
    chain
        .request(
            &mut from(&nsc, &short),
            arriving(vec![segment("nsc", "c", "")]),
        )
        .await
        .unwrap();
    eventually("the timeout closed downstream", || {
        !closes.0.lock().unwrap().is_empty()
    })
    .await;
    assert!(begin.is_empty());
    // What went down could not have passed authorize: the caller's token had expired.
    let closed = closes.0.lock().unwrap()[0].clone();
    let path = closed.path.unwrap();
    let input = path_input(
        &path,
        Some(&peer_id(&nsc)),
        Verify::Previous,
        SystemTime::now(),
    );
    assert_denied(
        policies()
            .check(policy::SERVER, &input)
            .map_err(Error::from),
        "tokens_expired",
    );
}

/// Plays the gRPC client and server edges between a client chain and a server chain
/// in one process, as the transport does with mTLS: re-signs the client's token for
/// the server's identity (`OutgoingToken`), hands it over as metadata with the client's
/// identity, and names the server in the client's `Cx` when the call returns.
struct Loopback {
    server: Chain,
    client_id: PeerIdentity,
    server_id: PeerIdentity,
}

impl Loopback {
    fn server_cx(&self, cx: &mut Cx, conn: &mut Connection) -> Result<Cx> {
        let gen = cx
            .ext()
            .get::<OutgoingToken>()
            .cloned()
            .expect("update_token ran");
        let (token, expires) = gen.0.generate(&Peer {
            identity: Some(self.server_id.clone()),
            ..Default::default()
        })?;
        if let Some(p) = conn.path.as_mut() {
            let own = &mut p.path_segments[p.index as usize];
            own.token = token.clone();
            own.expires = Some(Timestamp::from(expires));
        }
        Ok(Cx::server().with_peer(Peer {
            identity: Some(self.client_id.clone()),
            token: Some(token),
            token_expires: Some(expires),
            ..Default::default()
        }))
    }
}

#[async_trait]
impl Handler for Loopback {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        _next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        let mut scx = self.server_cx(cx, conn)?;
        let out = self.server.request(&mut scx, req).await;
        cx.peer_mut().identity = Some(self.server_id.clone());
        out
    }

    async fn close(&self, cx: &mut Cx, mut conn: Connection, _next: Next) -> Result<()> {
        let mut scx = self.server_cx(cx, &mut conn)?;
        let out = self.server.close(&mut scx, conn).await;
        cx.peer_mut().identity = Some(self.server_id.clone());
        out
    }
}

/// A client `nsc` whose chain ends at `nse` through a loopback; `signer` signs the
/// server's tokens (the server's own SVID, or a forger's).
fn client_to(nsc: &IssuedSvid, server: &IssuedSvid, signer: &IssuedSvid) -> (Chain, Begin, Nse) {
    let nse = nse(signer);
    let begin = begin();
    let chain = Chain::builder()
        .push(update_path("nsc"))
        .push(begin.clone())
        .push(update_token(Arc::new(jwt_token(
            identity(nsc).fixed(),
            HOUR,
        ))))
        .push(authorize_client(policies()))
        .push(Loopback {
            server: nse.chain.clone(),
            client_id: peer_id(nsc),
            server_id: peer_id(server),
        })
        .build();
    (chain, begin, nse)
}

#[tokio::test]
async fn a_client_accepts_a_path_signed_by_its_server_and_both_sides_pass() {
    let ids = Ids::new();
    let (nsc, me) = (ids.issue("nsc"), ids.issue("nse"));
    let (client, begin, nse) = client_to(&nsc, &me, &me);
    let conn = client
        .request(&mut Cx::client(), NetworkServiceRequest::default())
        .await
        .unwrap();
    let segs = &conn.path.as_ref().unwrap().path_segments;
    let aud = jwt::verify(&segs[0].token, svid(&nsc).leaf()).unwrap().aud;
    assert_eq!(
        aud,
        vec![peer_id(&me).id.to_string()],
        "re-signed for the server"
    );
    assert_eq!((begin.len(), nse.begin.len()), (1, 1));
    // A refresh is checked again and passes.
    client
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(conn.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!((begin.len(), nse.begin.len(), nse.hop.closes()), (0, 0, 1));
}

#[tokio::test]
async fn a_client_refuses_a_path_its_server_did_not_sign_and_closes_it() {
    let ids = Ids::new();
    let (nsc, me) = (ids.issue("nsc"), ids.issue("nse"));
    // The server's segment carries a token signed with another key than its certificate's.
    let forger = Ids::new().issue("nse");
    let (client, begin, nse) = client_to(&nsc, &me, &forger);
    let r = client
        .request(&mut Cx::client(), NetworkServiceRequest::default())
        .await;
    assert_denied(r, "next_token_signed");
    // The server had made it; the client closed it there and forgot it here.
    assert_eq!(nse.hop.requests(), 1);
    assert_eq!((nse.hop.closes(), nse.begin.len(), begin.len()), (1, 0, 0));
}
