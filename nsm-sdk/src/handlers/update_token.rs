//! `update_token`: this hop's token and expiry in its path segment.
//!
//! What it does, on Request and Close:
//! - **server side** (after `update_path`): copies the caller's token and expiry, as the
//!   transport put them in [`Cx::peer`] (gRPC metadata `nsm-client-token`,
//!   `nsm-client-token-expires`), into the *previous* path segment (`index - 1`), each
//!   when present; then sets its *own* segment's (`index`) token and expiry from its
//!   [`TokenGenerator`], given the caller.
//! - **client side**: sets its own segment's token and expiry from the generator and
//!   puts them in [`Cx::peer_mut`], so the gRPC client at the end of the chain sends
//!   them as metadata; the next hop's server-side `update_token` copies them back into
//!   this segment. It also puts the generator in [`Cx::ext`] as [`OutgoingToken`]: the
//!   gRPC client re-signs with it once the handshake has named the next hop, so a
//!   signed token's `aud` is the hop it goes to.
//!
//! How the pieces fit: the expiries written here drive the connection's lifecycle. The
//! client-side [`refresh`](mod@super::refresh) re-requests before the earliest `expires` in
//! the path (so every hop gets a fresh token), and the server-side
//! [`timeout`](mod@super::timeout), placed after this handler, closes the connection when
//! the previous segment's expiry comes near without a refresh.
//!
//! State: none.
//!
//! Failure handled: a path without this hop's segment (the handler is placed before
//! `update_path`) is rejected with InvalidArgument, and a generator failure fails the
//! call, both before anything further down the chain runs.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use nsm_proto::connection::{Connection, PathSegment};
use nsm_proto::networkservice::NetworkServiceRequest;
use prost_types::Timestamp;

use crate::core::{Cx, Handler, Next, Side};
use crate::token::{OutgoingToken, TokenGenerator};
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct UpdateToken {
    generator: Arc<dyn TokenGenerator>,
}

impl fmt::Debug for UpdateToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateToken").finish_non_exhaustive()
    }
}

/// The `update_token` handler, making this hop's tokens with `generator`
/// (for example [`lifetime_token`](crate::token::lifetime_token)).
pub fn update_token(generator: Arc<dyn TokenGenerator>) -> UpdateToken {
    UpdateToken { generator }
}

fn segment_mut(conn: &mut Connection, index: usize) -> Option<&mut PathSegment> {
    conn.path.as_mut()?.path_segments.get_mut(index)
}

impl UpdateToken {
    /// Applies the token rules of `cx`'s side to `conn`.
    fn apply(&self, cx: &mut Cx, conn: &mut Connection) -> Result<()> {
        let index = conn.path.as_ref().map_or(0, |p| p.index) as usize;
        if segment_mut(conn, index).is_none() {
            return Err(Error::invalid(format!(
                "update_token: no path segment at index {index} (update_path must run first)"
            )));
        }
        if cx.side() == Side::Server && index > 0 {
            let peer = cx.peer();
            if let Some(prev) = segment_mut(conn, index - 1) {
                if let Some(token) = peer.token.as_ref() {
                    prev.token = token.clone();
                }
                if let Some(expires) = peer.token_expires {
                    prev.expires = Some(Timestamp::from(expires));
                }
            }
        }
        let (token, expires) = self.generator.generate(cx.peer())?;
        if let Some(own) = segment_mut(conn, index) {
            own.token = token.clone();
            own.expires = Some(Timestamp::from(expires));
        }
        if cx.side() == Side::Client {
            set_outgoing(cx, token, expires);
            cx.ext_mut()
                .insert(OutgoingToken(Arc::clone(&self.generator)));
        }
        Ok(())
    }
}

/// What the gRPC client sends to the next hop.
fn set_outgoing(cx: &mut Cx, token: String, expires: SystemTime) {
    let peer = cx.peer_mut();
    peer.token = Some(token);
    peer.token_expires = Some(expires);
}

#[async_trait]
impl Handler for UpdateToken {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        self.apply(cx, conn)?;
        next.request(cx, req).await
    }

    async fn close(&self, cx: &mut Cx, mut conn: Connection, next: Next) -> Result<()> {
        self.apply(cx, &mut conn)?;
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Chain, Peer};
    use crate::handlers::update_path;
    use crate::token::lifetime_token;
    use nsm_proto::connection::Path;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Records the connection and the peer that reach the end of the chain.
    #[derive(Default, Clone)]
    struct Seen(Arc<Mutex<Vec<(Connection, Peer)>>>);

    impl Seen {
        fn last(&self) -> (Connection, Peer) {
            self.0.lock().unwrap().last().cloned().expect("a call")
        }
    }

    #[async_trait]
    impl Handler for Seen {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let conn = req.connection.clone().unwrap_or_default();
            self.0.lock().unwrap().push((conn, cx.peer().clone()));
            next.request(cx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push((conn.clone(), cx.peer().clone()));
            next.close(cx, conn).await
        }
    }

    fn fixed(token: &'static str, expires: SystemTime) -> Arc<dyn TokenGenerator> {
        Arc::new(move |_: &Peer| Ok((token.to_string(), expires)))
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ts(secs: u64) -> Option<Timestamp> {
        Some(Timestamp::from(at(secs)))
    }

    /// A request that arrives at `hop` from `nsc`, whose segment already carries a token.
    fn from_nsc() -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "a".into(),
                path: Some(Path {
                    index: 0,
                    path_segments: vec![PathSegment {
                        name: "nsc".into(),
                        id: "a".into(),
                        token: "in-path".into(),
                        expires: ts(100),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn server_chain(gen: Arc<dyn TokenGenerator>, seen: &Seen) -> Chain {
        Chain::builder()
            .push(update_path("hop"))
            .push(update_token(gen))
            .push(seen.clone())
            .build()
    }

    fn caller(token: &str, expires: SystemTime) -> Cx {
        Cx::server().with_peer(Peer {
            addr: None,
            token: Some(token.into()),
            token_expires: Some(expires),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_server_copies_the_callers_token_into_the_previous_segment_and_signs_its_own() {
        let seen = Seen::default();
        let chain = server_chain(fixed("hop-token", at(500)), &seen);
        let mut cx = caller("nsc-token", at(300));
        let out = chain.request(&mut cx, from_nsc()).await.unwrap();
        let (down, _) = seen.last();
        let segs = &down.path.as_ref().unwrap().path_segments;
        assert_eq!(
            (segs[0].token.as_str(), segs[0].expires),
            ("nsc-token", ts(300))
        );
        assert_eq!(
            (segs[1].token.as_str(), segs[1].expires),
            ("hop-token", ts(500))
        );
        // The caller gets the path back with both.
        let segs = &out.path.as_ref().unwrap().path_segments;
        assert_eq!(segs[0].token, "nsc-token");
        assert_eq!(segs[1].expires, ts(500));
        // The server does not touch the peer: it is the caller's.
        assert_eq!(cx.peer().token.as_deref(), Some("nsc-token"));
        assert!(
            cx.ext().get::<OutgoingToken>().is_none(),
            "a server sends nothing"
        );
    }

    #[tokio::test]
    async fn a_caller_without_token_metadata_keeps_what_its_segment_says() {
        let seen = Seen::default();
        let chain = server_chain(fixed("hop-token", at(500)), &seen);
        chain.request(&mut Cx::server(), from_nsc()).await.unwrap();
        let (down, _) = seen.last();
        let segs = &down.path.as_ref().unwrap().path_segments;
        assert_eq!(
            (segs[0].token.as_str(), segs[0].expires),
            ("in-path", ts(100))
        );
        assert_eq!(segs[1].token, "hop-token");

        // Only the expiry in metadata: only the expiry changes.
        let mut cx = Cx::server().with_peer(Peer {
            token_expires: Some(at(200)),
            ..Default::default()
        });
        chain.request(&mut cx, from_nsc()).await.unwrap();
        let (down, _) = seen.last();
        let prev = &down.path.as_ref().unwrap().path_segments[0];
        assert_eq!((prev.token.as_str(), prev.expires), ("in-path", ts(200)));
    }

    #[tokio::test]
    async fn a_server_updates_the_tokens_on_close_too() {
        let seen = Seen::default();
        let chain = server_chain(fixed("hop-token", at(500)), &seen);
        let mut conn = chain.request(&mut Cx::server(), from_nsc()).await.unwrap();
        // What the caller closes with carries stale tokens.
        for s in &mut conn.path.as_mut().unwrap().path_segments {
            s.token = "stale".into();
            s.expires = ts(1);
        }
        chain
            .close(&mut caller("nsc-close", at(400)), conn)
            .await
            .unwrap();
        let (down, _) = seen.last();
        let segs = &down.path.as_ref().unwrap().path_segments;
        assert_eq!(
            (segs[0].token.as_str(), segs[0].expires),
            ("nsc-close", ts(400))
        );
        assert_eq!(
            (segs[1].token.as_str(), segs[1].expires),
            ("hop-token", ts(500))
        );
    }

    #[tokio::test]
    async fn a_client_signs_its_own_segment_and_hands_the_token_to_the_transport() {
        let seen = Seen::default();
        let chain = Chain::builder()
            .push(update_path("nsc"))
            .push(update_token(fixed("nsc-token", at(700))))
            .push(seen.clone())
            .build();
        // A stale peer token (a server hop's client half inherits its caller's) is replaced.
        let mut cx = Cx::client().with_peer(Peer {
            token: Some("callers".into()),
            ..Default::default()
        });
        let conn = chain
            .request(&mut cx, NetworkServiceRequest::default())
            .await
            .unwrap();
        let (down, peer) = seen.last();
        let own = &down.path.as_ref().unwrap().path_segments[0];
        assert_eq!((own.token.as_str(), own.expires), ("nsc-token", ts(700)));
        assert_eq!(peer.token.as_deref(), Some("nsc-token"));
        assert_eq!(peer.token_expires, Some(at(700)));
        // The transport can re-sign for the next hop with the same generator.
        let outgoing = cx
            .ext()
            .get::<OutgoingToken>()
            .expect("set for the transport");
        assert_eq!(
            outgoing.0.generate(&Peer::default()).unwrap().0,
            "nsc-token"
        );

        chain.close(&mut Cx::client(), conn).await.unwrap();
        let (_, peer) = seen.last();
        assert_eq!(
            peer.token.as_deref(),
            Some("nsc-token"),
            "Close sends it too"
        );
    }

    #[tokio::test]
    async fn a_client_signs_the_segment_at_the_index_not_the_first_one() {
        // The client half of a server hop: its own segment is the hop's, at index 1.
        let seen = Seen::default();
        let chain = Chain::builder()
            .push(update_path("hop"))
            .push(update_token(fixed("hop-token", at(900))))
            .push(seen.clone())
            .build();
        chain.request(&mut Cx::client(), from_nsc()).await.unwrap();
        let (down, _) = seen.last();
        let segs = &down.path.as_ref().unwrap().path_segments;
        assert_eq!(
            segs[0].token, "in-path",
            "the previous segment is not the client's"
        );
        assert_eq!(segs[1].token, "hop-token");
    }

    #[tokio::test]
    async fn a_generator_failure_or_a_missing_segment_stops_the_call_before_downstream() {
        let seen = Seen::default();
        let failing: Arc<dyn TokenGenerator> =
            Arc::new(|_: &Peer| -> Result<(String, SystemTime)> {
                Err(Error::internal("no signing key"))
            });
        let err = server_chain(failing, &seen)
            .request(&mut Cx::server(), from_nsc())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Internal(_)));

        let without_path = Chain::builder()
            .push(update_token(Arc::new(lifetime_token(Duration::from_secs(
                1,
            )))))
            .push(seen.clone())
            .build();
        let err = without_path
            .request(&mut Cx::server(), NetworkServiceRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(seen.0.lock().unwrap().is_empty());
    }

    /// Wipes the previous segment's token, so only the metadata can bring it back.
    struct ForgetPrevious;

    #[async_trait]
    impl Handler for ForgetPrevious {
        async fn request(
            &self,
            cx: &mut Cx,
            mut req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            if let Some(p) = req.connection.as_mut().and_then(|c| c.path.as_mut()) {
                let prev = p.index as usize - 1;
                p.path_segments[prev].token.clear();
                p.path_segments[prev].expires = None;
            }
            next.request(cx, req).await
        }
    }

    #[tokio::test]
    async fn the_callers_token_crosses_grpc_as_metadata() {
        use crate::handlers::client_url;
        use crate::transport::{grpc_client, serve, Channels, Services, Url};

        let seen = Seen::default();
        let server_chain = Chain::builder()
            .push(update_path("nse"))
            .push(ForgetPrevious)
            .push(update_token(fixed("nse-token", at(2_000_000_000))))
            .push(seen.clone())
            .build();
        let url = Url::Memory(format!("update-token-{}", uuid::Uuid::new_v4()));
        let server = serve(&url, Services::new().network_service(server_chain))
            .await
            .unwrap();
        let expires = SystemTime::now() + Duration::from_secs(600);
        let client = Chain::builder()
            .push(update_path("nsc"))
            .push(update_token(Arc::new(move |_: &Peer| {
                Ok(("nsc-token".to_string(), expires))
            })))
            .push(client_url(url))
            .push(grpc_client(Channels::new()))
            .build();
        let out = client
            .request(&mut Cx::client(), NetworkServiceRequest::default())
            .await
            .unwrap();
        let (down, peer) = seen.last();
        assert_eq!(peer.token.as_deref(), Some("nsc-token"));
        assert_eq!(peer.token_expires, Some(expires));
        let prev = &down.path.as_ref().unwrap().path_segments[0];
        assert_eq!(prev.token, "nsc-token");
        assert_eq!(prev.expires, Some(Timestamp::from(expires)));
        let segs = &out.path.unwrap().path_segments;
        assert_eq!(segs[1].token, "nse-token");
        server.shutdown().await;
    }
}
