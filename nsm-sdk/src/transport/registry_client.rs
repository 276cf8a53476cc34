//! The registry client edge: [`grpc_registry`], the registry handler that ends a
//! registry client chain by calling a remote registry, for network services and
//! endpoints alike.

use std::fmt;
use std::marker::PhantomData;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_proto::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse, NetworkServiceQuery, NetworkServiceResponse,
};
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tonic::Status;

use super::channels::{answer, from_status, outgoing, Channels};
use crate::core::url::Url;
use crate::core::Cx;
use crate::registry::{FindStream, Found, Query, RegistryHandler, RegistryNext, Resource};
use crate::{Error, Result};

/// See [`grpc_registry`].
pub struct GrpcRegistry<R> {
    channels: Channels,
    url: Url,
    _resource: PhantomData<fn() -> R>,
}

impl<R> Clone for GrpcRegistry<R> {
    fn clone(&self) -> Self {
        GrpcRegistry {
            channels: self.channels.clone(),
            url: self.url.clone(),
            _resource: PhantomData,
        }
    }
}

impl<R: Resource> fmt::Debug for GrpcRegistry<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcRegistry")
            .field("kind", &R::KIND)
            .field("url", &self.url)
            .finish()
    }
}

/// The registry handler at the end of a registry client chain: sends Register, Find and
/// Unregister to the registry at `url` and answers with its replies (it does not call
/// `next`). A handler for both `NetworkService` and `NetworkServiceEndpoint`.
///
/// Find streams the registry's responses as [`Found`] items; a response without its
/// resource is an [`Error::InvalidArgument`] item. Errors map as for [`grpc_client`](super::grpc_client).
pub fn grpc_registry<R: Resource>(channels: Channels, url: Url) -> GrpcRegistry<R> {
    GrpcRegistry {
        channels,
        url,
        _resource: PhantomData,
    }
}

/// Binds a resource to its generated gRPC client and messages.
trait RegistryWire: Resource {
    type Query: Send + 'static;
    type Response: Send + 'static;
    const SERVICE: &'static str;
    fn query(q: Query<Self>) -> Self::Query;
    fn found(r: Self::Response) -> (Option<Self>, bool);
    fn register(
        ch: Channel,
        r: tonic::Request<Self>,
    ) -> BoxFuture<'static, Result<tonic::Response<Self>, Status>>;
    #[allow(clippy::type_complexity)]
    fn find(
        ch: Channel,
        q: tonic::Request<Self::Query>,
    ) -> BoxFuture<'static, Result<tonic::Response<Streaming<Self::Response>>, Status>>;
    fn unregister(
        ch: Channel,
        r: tonic::Request<Self>,
    ) -> BoxFuture<'static, Result<tonic::Response<()>, Status>>;
}

/// Binds one resource to its generated client and messages: the two impls differ only
/// in names, so one macro writes both.
macro_rules! registry_wire {
    ($r:ty, $query:ident, $response:ident, $field:ident, $client:ident, $service:literal) => {
        impl RegistryWire for $r {
            type Query = $query;
            type Response = $response;
            const SERVICE: &'static str = $service;
            fn query(q: Query<Self>) -> $query {
                $query {
                    $field: Some(q.template),
                    watch: q.watch,
                }
            }
            fn found(r: $response) -> (Option<Self>, bool) {
                (r.$field, r.deleted)
            }
            fn register(
                ch: Channel,
                r: tonic::Request<Self>,
            ) -> BoxFuture<'static, Result<tonic::Response<Self>, Status>> {
                Box::pin(async move { sized!($client::new(ch)).register(r).await })
            }
            fn find(
                ch: Channel,
                q: tonic::Request<$query>,
            ) -> BoxFuture<'static, Result<tonic::Response<Streaming<$response>>, Status>> {
                Box::pin(async move { sized!($client::new(ch)).find(q).await })
            }
            fn unregister(
                ch: Channel,
                r: tonic::Request<Self>,
            ) -> BoxFuture<'static, Result<tonic::Response<()>, Status>> {
                Box::pin(async move { sized!($client::new(ch)).unregister(r).await })
            }
        }
    };
}

registry_wire!(
    NetworkService,
    NetworkServiceQuery,
    NetworkServiceResponse,
    network_service,
    NetworkServiceRegistryClient,
    "NetworkServiceRegistry"
);
registry_wire!(
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
    network_service_endpoint,
    NetworkServiceEndpointRegistryClient,
    "NetworkServiceEndpointRegistry"
);

async fn registry_register<R: RegistryWire>(reg: &GrpcRegistry<R>, cx: &Cx, r: R) -> Result<R> {
    let what = format!("{}/Register", R::SERVICE);
    let channel = reg.channels.channel(&reg.url)?;
    let request = outgoing(cx, &reg.url, &what, r)?;
    answer(cx, &reg.url, &what, R::register(channel, request)).await
}

async fn registry_find<R: RegistryWire>(
    reg: &GrpcRegistry<R>,
    cx: &Cx,
    query: Query<R>,
) -> Result<FindStream<R>> {
    let what = format!("{}/Find", R::SERVICE);
    let channel = reg.channels.channel(&reg.url)?;
    let request = outgoing(cx, &reg.url, &what, R::query(query))?;
    let responses = answer(cx, &reg.url, &what, R::find(channel, request)).await?;
    let url = reg.url.clone();
    Ok(responses
        .map(move |item| match item {
            Ok(resp) => match R::found(resp) {
                (Some(resource), deleted) => Ok(Found { resource, deleted }),
                (None, _) => Err(Error::invalid(format!(
                    "a Find response from {url} has no {}",
                    R::KIND
                ))),
            },
            Err(s) => Err(from_status(&url, s)),
        })
        .boxed())
}

async fn registry_unregister<R: RegistryWire>(reg: &GrpcRegistry<R>, cx: &Cx, r: R) -> Result<()> {
    let what = format!("{}/Unregister", R::SERVICE);
    let channel = reg.channels.channel(&reg.url)?;
    let request = outgoing(cx, &reg.url, &what, r)?;
    answer(cx, &reg.url, &what, R::unregister(channel, request)).await
}

/// The handler of one resource: the gRPC calls are written once, generic over
/// [`RegistryWire`]; the impl is per resource because `RegistryWire` is private.
macro_rules! grpc_registry_handler {
    ($r:ty) => {
        #[async_trait]
        impl RegistryHandler<$r> for GrpcRegistry<$r> {
            async fn register(&self, cx: &mut Cx, r: $r, _next: RegistryNext<$r>) -> Result<$r> {
                registry_register(self, cx, r).await
            }
            async fn find(
                &self,
                cx: &mut Cx,
                query: Query<$r>,
                _next: RegistryNext<$r>,
            ) -> Result<FindStream<$r>> {
                registry_find(self, cx, query).await
            }
            async fn unregister(&self, cx: &mut Cx, r: $r, _next: RegistryNext<$r>) -> Result<()> {
                registry_unregister(self, cx, r).await
            }
        }
    };
}

grpc_registry_handler!(NetworkService);
grpc_registry_handler!(NetworkServiceEndpoint);
