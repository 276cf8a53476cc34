//! The tonic service implementations of the server: each call becomes a server-side
//! [`Cx`] (peer address and token, deadline, span) and runs through its chain; errors
//! go back as statuses with their codes.

use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use nsm_proto::connection::monitor_connection_server::MonitorConnection;
use nsm_proto::connection::{Connection, ConnectionEvent, MonitorScopeSelector};
use nsm_proto::ipam::ipam_server::Ipam;
use nsm_proto::ipam::{PrefixRequest, PrefixResponse};
use nsm_proto::networkservice::network_service_server::NetworkService as NetworkServiceRpc;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::network_service_endpoint_registry_server::NetworkServiceEndpointRegistry;
use nsm_proto::registry::network_service_registry_server::NetworkServiceRegistry;
use nsm_proto::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse, NetworkServiceQuery, NetworkServiceResponse,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, Instrument};

use super::listener::ConnInfo;
use super::metadata;
use crate::core::{Chain, Cx, MonitorSource, Peer};
use crate::ipam::PrefixServer;
use crate::registry::{Query, RegistryChain, Resource};
use crate::wire::bounds;
use crate::Result;

/// The server-side context of a call: peer (address, token), deadline and span.
fn server_cx<T>(request: &Request<T>, method: &'static str, id: &str) -> Result<Cx, Status> {
    let info = request.extensions().get::<ConnInfo>();
    // A span per call is per-call detail: at `debug`, so it costs nothing at the usual
    // `info` level (it was 2-3% of a manager's profile).
    let span = tracing::debug_span!(
        "rpc",
        rpc = method,
        connection.id = id,
        transport.conn = info.map(|i| i.id),
    );
    let (token, token_expires) = metadata::read_token(request.metadata()).map_err(|e| {
        debug!(parent: &span, error = %e, "rejected call");
        Status::from(e)
    })?;
    let peer = Peer {
        addr: info.and_then(|i| i.remote.clone()),
        token,
        token_expires,
        identity: info.and_then(|i| i.identity.clone()),
        process: info.and_then(|i| i.process),
    };
    let deadline = metadata::read_timeout(request.metadata())
        .and_then(|t| tokio::time::Instant::now().checked_add(t));
    Ok(Cx::server()
        .with_peer(peer)
        .with_deadline(deadline)
        .with_span(span))
}

/// Refuses a message over the bounds (InvalidArgument) before any handler sees it.
fn bounded<T>(message: &T, check: fn(&T) -> Result<()>) -> Result<(), Status> {
    check(message).map_err(|e| {
        debug!(error = %e, "rejected call over the input bounds");
        Status::from(e)
    })
}

fn respond<T>(cx: &Cx, out: Result<T>) -> Result<Response<T>, Status> {
    match out {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            debug!(parent: cx.span(), error = %e, "call failed");
            Err(Status::from(e))
        }
    }
}

/// Ends `s` with `Unavailable` when the server shuts down gracefully, so the graceful
/// shutdown does not wait forever for endless streams.
fn until_shutdown<T: Send + 'static>(
    s: BoxStream<'static, Result<T, Status>>,
    graceful: CancellationToken,
) -> BoxStream<'static, Result<T, Status>> {
    Box::pin(stream::unfold(Some((s, graceful)), |state| async move {
        let (mut s, graceful) = state?;
        tokio::select! {
            biased;
            _ = graceful.cancelled() => {
                Some((Err(Status::unavailable("the server is shutting down")), None))
            }
            item = s.next() => item.map(|item| (item, Some((s, graceful)))),
        }
    }))
}

/// The `ipam.IPAM` service: each `ManagePrefixes` stream is one
/// [`PrefixSession`](crate::ipam::PrefixSession), answered request by request and
/// dropped (its prefixes freed) when the stream ends or breaks. A request that fails
/// ends the stream with its status.
pub(crate) struct IpamEdge {
    pub(crate) server: PrefixServer,
    pub(crate) graceful: CancellationToken,
}

/// The most prefixes an IPAM request may exclude, and the longest prefix string.
const MAX_EXCLUDED: usize = 1024;
const MAX_PREFIX_LEN: usize = 64;

fn ipam_bounds(req: &PrefixRequest) -> Result<()> {
    if req.exclude_prefixes.len() > MAX_EXCLUDED {
        return Err(crate::Error::invalid(format!(
            "exclude_prefixes: {} entries, at most {MAX_EXCLUDED}",
            req.exclude_prefixes.len()
        )));
    }
    if let Some(long) = std::iter::once(&req.prefix)
        .chain(&req.exclude_prefixes)
        .find(|p| p.len() > MAX_PREFIX_LEN)
    {
        return Err(crate::Error::invalid(format!(
            "a prefix of {} bytes, at most {MAX_PREFIX_LEN}",
            long.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Ipam for IpamEdge {
    type ManagePrefixesStream = BoxStream<'static, Result<PrefixResponse, Status>>;

    async fn manage_prefixes(
        &self,
        request: Request<Streaming<PrefixRequest>>,
    ) -> Result<Response<Self::ManagePrefixesStream>, Status> {
        let peer = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|i| i.identity.as_ref().map(|id| id.id.as_str().to_string()));
        debug!(peer = ?peer, "ManagePrefixes stream opened");
        let incoming = request.into_inner();
        let session = self.server.session();
        let answers = stream::unfold(Some((incoming, session)), |state| async move {
            let (mut incoming, mut session) = state?;
            match incoming.next().await {
                None => None,
                Some(Err(s)) => {
                    debug!(status = %s, "ManagePrefixes stream broke");
                    None
                }
                Some(Ok(req)) => match ipam_bounds(&req).and_then(|()| session.handle(&req)) {
                    Ok(resp) => Some((Ok(resp), Some((incoming, session)))),
                    Err(e) => Some((Err(Status::from(e)), None)),
                },
            }
        });
        Ok(Response::new(until_shutdown(
            Box::pin(answers),
            self.graceful.clone(),
        )))
    }
}

pub(crate) struct NetworkServiceEdge {
    pub(crate) chain: Chain,
}

#[tonic::async_trait]
impl NetworkServiceRpc for NetworkServiceEdge {
    async fn request(
        &self,
        request: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        bounded(request.get_ref(), bounds::check_request)?;
        let id = request
            .get_ref()
            .connection
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let mut cx = server_cx(&request, "/networkservice.NetworkService/Request", &id)?;
        let span = cx.span().clone();
        let out = self
            .chain
            .request(&mut cx, request.into_inner())
            .instrument(span)
            .await;
        respond(&cx, out)
    }

    async fn close(&self, request: Request<Connection>) -> Result<Response<()>, Status> {
        bounded(request.get_ref(), bounds::check_connection)?;
        let id = request.get_ref().id.clone();
        let mut cx = server_cx(&request, "/networkservice.NetworkService/Close", &id)?;
        let span = cx.span().clone();
        let out = self
            .chain
            .close(&mut cx, request.into_inner())
            .instrument(span)
            .await;
        respond(&cx, out)
    }
}

pub(crate) struct MonitorEdge {
    pub(crate) source: Arc<dyn MonitorSource>,
    pub(crate) graceful: CancellationToken,
}

#[tonic::async_trait]
impl MonitorConnection for MonitorEdge {
    type MonitorConnectionsStream = BoxStream<'static, Result<ConnectionEvent, Status>>;

    async fn monitor_connections(
        &self,
        request: Request<MonitorScopeSelector>,
    ) -> Result<Response<Self::MonitorConnectionsStream>, Status> {
        bounded(request.get_ref(), bounds::check_selector)?;
        let cx = server_cx(
            &request,
            "/connection.MonitorConnection/MonitorConnections",
            "",
        )?;
        debug!(parent: cx.span(), "monitor subscribed");
        let events = self
            .source
            .subscribe_as(request.into_inner(), cx.peer().identity.as_ref())
            .map(|r| r.map_err(Status::from))
            .boxed();
        Ok(Response::new(until_shutdown(events, self.graceful.clone())))
    }
}

pub(crate) struct RegistryEdge<R: Resource> {
    pub(crate) chain: RegistryChain<R>,
    pub(crate) graceful: CancellationToken,
}

impl<R: Resource> RegistryEdge<R> {
    async fn register(
        &self,
        request: Request<R>,
        method: &'static str,
    ) -> Result<Response<R>, Status> {
        bounded(request.get_ref(), R::check)?;
        let mut cx = server_cx(&request, method, request.get_ref().name())?;
        let span = cx.span().clone();
        let out = self
            .chain
            .register(&mut cx, request.into_inner())
            .instrument(span)
            .await;
        respond(&cx, out)
    }

    async fn unregister(
        &self,
        request: Request<R>,
        method: &'static str,
    ) -> Result<Response<()>, Status> {
        bounded(request.get_ref(), R::check)?;
        let mut cx = server_cx(&request, method, request.get_ref().name())?;
        let span = cx.span().clone();
        let out = self
            .chain
            .unregister(&mut cx, request.into_inner())
            .instrument(span)
            .await;
        respond(&cx, out)
    }

    /// Runs a Find; `to_wire` makes each item a response message.
    async fn find<Q, W>(
        &self,
        request: Request<Q>,
        query: Query<R>,
        method: &'static str,
        to_wire: fn(R, bool) -> W,
    ) -> Result<Response<BoxStream<'static, Result<W, Status>>>, Status>
    where
        W: Send + 'static,
    {
        bounded(&query.template, R::check)?;
        let mut cx = server_cx(&request, method, query.template.name())?;
        let span = cx.span().clone();
        let found = self.chain.find(&mut cx, query).instrument(span).await;
        let found = respond(&cx, found)?.into_inner();
        let items = found
            .map(move |item| {
                item.map(|f| to_wire(f.resource, f.deleted))
                    .map_err(Status::from)
            })
            .boxed();
        Ok(Response::new(until_shutdown(items, self.graceful.clone())))
    }
}

/// The gRPC service of one registry resource over its [`RegistryEdge`]: the two services
/// differ only in names, so one macro writes both.
macro_rules! registry_service {
    ($r:ty, $service:ident, $query:ident, $response:ident, $field:ident, $path:literal) => {
        #[tonic::async_trait]
        impl $service for RegistryEdge<$r> {
            async fn register(&self, request: Request<$r>) -> Result<Response<$r>, Status> {
                RegistryEdge::register(self, request, concat!($path, "/Register")).await
            }

            type FindStream = BoxStream<'static, Result<$response, Status>>;

            async fn find(
                &self,
                request: Request<$query>,
            ) -> Result<Response<Self::FindStream>, Status> {
                let q = request.get_ref();
                let query = Query {
                    template: q.$field.clone().unwrap_or_default(),
                    watch: q.watch,
                };
                RegistryEdge::find(
                    self,
                    request,
                    query,
                    concat!($path, "/Find"),
                    |r, deleted| $response {
                        $field: Some(r),
                        deleted,
                    },
                )
                .await
            }

            async fn unregister(&self, request: Request<$r>) -> Result<Response<()>, Status> {
                RegistryEdge::unregister(self, request, concat!($path, "/Unregister")).await
            }
        }
    };
}

registry_service!(
    NetworkService,
    NetworkServiceRegistry,
    NetworkServiceQuery,
    NetworkServiceResponse,
    network_service,
    "/registry.NetworkServiceRegistry"
);
registry_service!(
    NetworkServiceEndpoint,
    NetworkServiceEndpointRegistry,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
    network_service_endpoint,
    "/registry.NetworkServiceEndpointRegistry"
);
