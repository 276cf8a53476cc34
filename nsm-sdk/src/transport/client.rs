//! The client edge: the handler that ends client chains by calling the next hop
//! ([`grpc_client`]) through a pool of [`Channels`]. The registry counterpart is
//! [`grpc_registry`](super::grpc_registry).

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::networkservice::NetworkServiceRequest;
use prost_types::Timestamp;
use tonic::transport::Channel;
use tracing::debug;

use super::channels::{answer, outgoing, Channels};
use crate::core::url::{ClientUrl, Url};
use crate::core::{Cx, Handler, Next};
use crate::token::OutgoingToken;
use crate::{Error, Result};

fn client_url(cx: &Cx) -> Result<Url> {
    cx.ext()
        .get::<ClientUrl>()
        .map(|u| u.0.clone())
        .ok_or_else(|| {
            Error::internal(
                "grpc_client: the call has no ClientUrl; a handler before it (select, \
             discover_forwarder, or the client's configuration) must say where to connect",
            )
        })
}

/// See [`grpc_client`].
#[derive(Debug, Clone)]
pub struct GrpcClient {
    channels: Channels,
}

/// The handler at the end of a client chain: sends the Request or Close to the peer
/// named by the call's [`ClientUrl`] and answers with the peer's reply (it does not call
/// `next`).
///
/// On an mTLS pool ([`Channels::tls`]) the server's verified identity becomes the
/// call's [`Peer::identity`](crate::core::Peer::identity), and a call carrying an
/// [`OutgoingToken`] (set by a client-side `update_token`) is signed for that identity
/// (`aud` = the next hop) into the hop's own path segment and the call's metadata.
///
/// After a Request over a unix socket, [`Peer::process`](crate::core::Peer::process)
/// of `cx` is the server's process (`SO_PEERCRED` of the connection), and on an mTLS
/// pool [`Peer::identity`](crate::core::Peer::identity) is the server of the handshake
/// the answer came over (a server restarted since `prepare` may show a new certificate).
///
/// State: none besides the shared channel pool. Failures: no `ClientUrl` is
/// [`Error::Internal`]; an unreachable peer or a broken connection is
/// [`Error::Unavailable`]; the peer's own statuses are [`Error::Remote`] with their code;
/// a call past the deadline is [`Error::DeadlineExceeded`].
pub fn grpc_client(channels: Channels) -> GrpcClient {
    GrpcClient { channels }
}

impl GrpcClient {
    /// The channel to the call's peer. On an mTLS pool the peer's verified identity
    /// becomes [`Peer::identity`](crate::core::Peer::identity) of `cx` (so a client-side
    /// authorize can check the answer against it) and, when the call carries an
    /// [`OutgoingToken`], the token is made for that identity now: into this hop's own
    /// path segment of `conn` and into the metadata of the call.
    async fn prepare(&self, cx: &mut Cx, url: &Url, conn: &mut Connection) -> Result<Channel> {
        let (channel, server) = self.channels.connected(url).await?;
        if server.is_some() {
            cx.peer_mut().identity = server;
        }
        if let Some(OutgoingToken(generator)) = cx.ext().get::<OutgoingToken>().cloned() {
            let (token, expires) = generator.generate(cx.peer())?;
            let index = conn.path.as_ref().map_or(0, |p| p.index) as usize;
            if let Some(own) = conn
                .path
                .as_mut()
                .and_then(|p| p.path_segments.get_mut(index))
            {
                own.token = token.clone();
                own.expires = Some(Timestamp::from(expires));
            }
            let peer = cx.peer_mut();
            peer.token = Some(token);
            peer.token_expires = Some(expires);
        }
        Ok(channel)
    }
}

#[async_trait]
impl Handler for GrpcClient {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        _next: Next,
    ) -> Result<Connection> {
        const WHAT: &str = "Request";
        let url = client_url(cx)?;
        let conn = req.connection.get_or_insert_with(Default::default);
        let channel = self.prepare(cx, &url, conn).await?;
        let request = outgoing(cx, &url, WHAT, req)?;
        debug!(parent: cx.span(), url = %url, "sending Request");
        let mut client = sized!(NetworkServiceClient::new(channel));
        let out = answer(cx, &url, WHAT, client.request(request)).await;
        // The answer came over the channel's current connection: when the call made it
        // reconnect (the server restarted, perhaps with a new certificate), the server
        // is the one of that handshake, not the one `prepare` knew, and a client-side
        // authorize checks the answer's token against it.
        if let Some(server) = self.channels.peer_identity(&url) {
            cx.peer_mut().identity = Some(server);
        }
        if matches!(url, Url::Unix(_)) {
            // Who answered, for handlers that check the answer against its author (the
            // namespace an endpoint names, `netns_owner::check_answer`).
            cx.peer_mut().process = self.channels.peer_process(&url);
        }
        out
    }

    async fn close(&self, cx: &mut Cx, mut conn: Connection, _next: Next) -> Result<()> {
        const WHAT: &str = "Close";
        let url = client_url(cx)?;
        let channel = self.prepare(cx, &url, &mut conn).await?;
        let request = outgoing(cx, &url, WHAT, conn)?;
        debug!(parent: cx.span(), url = %url, "sending Close");
        let mut client = sized!(NetworkServiceClient::new(channel));
        answer(cx, &url, WHAT, client.close(request)).await
    }
}
