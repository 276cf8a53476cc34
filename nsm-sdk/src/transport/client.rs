//! The client edge: the handler that ends client chains by calling the next hop
//! ([`grpc_client`]) through a pool of [`Channels`]. The registry counterpart is
//! [`grpc_registry`](super::grpc_registry).

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::network_service_client::NetworkServiceClient;
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::debug;

use super::channels::{answer, outgoing, Channels};
use crate::core::url::{ClientUrl, Url};
use crate::core::{Cx, Handler, Next};
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
/// State: none besides the shared channel pool. Failures: no `ClientUrl` is
/// [`Error::Internal`]; an unreachable peer or a broken connection is
/// [`Error::Unavailable`]; the peer's own statuses are [`Error::Remote`] with their code;
/// a call past the deadline is [`Error::DeadlineExceeded`].
pub fn grpc_client(channels: Channels) -> GrpcClient {
    GrpcClient { channels }
}

#[async_trait]
impl Handler for GrpcClient {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        _next: Next,
    ) -> Result<Connection> {
        const WHAT: &str = "Request";
        let url = client_url(cx)?;
        let channel = self.channels.channel(&url)?;
        let request = outgoing(cx, &url, WHAT, req)?;
        debug!(parent: cx.span(), url = %url, "sending Request");
        let mut client = sized!(NetworkServiceClient::new(channel));
        answer(cx, &url, WHAT, client.request(request)).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, _next: Next) -> Result<()> {
        const WHAT: &str = "Close";
        let url = client_url(cx)?;
        let channel = self.channels.channel(&url)?;
        let request = outgoing(cx, &url, WHAT, conn)?;
        debug!(parent: cx.span(), url = %url, "sending Close");
        let mut client = sized!(NetworkServiceClient::new(channel));
        answer(cx, &url, WHAT, client.close(request)).await
    }
}
