//! Tower in both directions: a [`Chain`] is a `tower::Service`, and tower services and
//! layers can sit inside a chain.
//!
//! ```
//! use std::time::Duration;
//! use nsm_sdk::{Chain, core::tower::{Call, Reply, layer}};
//! use tower::{ServiceBuilder, ServiceExt, timeout::TimeoutLayer};
//! # async fn demo() {
//! // A tower timeout in the middle of a chain...
//! let chain = Chain::builder().push(layer(TimeoutLayer::new(Duration::from_secs(1)))).build();
//! // ...and ServiceBuilder middleware in front of a chain.
//! let svc = ServiceBuilder::new().concurrency_limit(64).service(chain);
//! let reply = svc.oneshot(Call::request(Default::default())).await.unwrap();
//! assert!(matches!(reply, Reply::Connection(_)));
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use tower::{Layer, Service, ServiceExt};

use super::cx::Cx;
use super::handler::{Chain, Handler, Next};
use crate::{Error, Result};

/// One call through a chain, as a tower request.
#[derive(Debug)]
pub struct Call {
    /// The call's context.
    pub cx: Cx,
    /// What is asked.
    pub op: Op,
}

/// The operation of a [`Call`].
// Calls are moved, not stored; boxing the request would cost an allocation per call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Op {
    /// A Request.
    Request(NetworkServiceRequest),
    /// A Close.
    Close(Connection),
}

impl Call {
    /// A Request with a fresh server context.
    pub fn request(req: NetworkServiceRequest) -> Self {
        Call {
            cx: Cx::server(),
            op: Op::Request(req),
        }
    }

    /// A Close with a fresh server context.
    pub fn close(conn: Connection) -> Self {
        Call {
            cx: Cx::server(),
            op: Op::Close(conn),
        }
    }
}

/// The answer to a [`Call`].
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Reply {
    /// The connection a Request produced.
    Connection(Connection),
    /// A Close succeeded.
    Closed,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

fn run(next: Next, call: Call) -> BoxFut<Result<Reply>> {
    Box::pin(async move {
        let Call { mut cx, op } = call;
        match op {
            Op::Request(req) => next.request(&mut cx, req).await.map(Reply::Connection),
            Op::Close(conn) => next.close(&mut cx, conn).await.map(|()| Reply::Closed),
        }
    })
}

impl Service<Call> for Chain {
    type Response = Reply;
    type Error = Error;
    type Future = BoxFut<Result<Reply>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        run(self.cursor(), call)
    }
}

/// The rest of a chain as a tower service, so tower layers can wrap it.
#[derive(Clone)]
pub struct NextService(Option<Next>);

impl fmt::Debug for NextService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NextService")
    }
}

impl Service<Call> for NextService {
    type Response = Reply;
    type Error = Error;
    type Future = BoxFut<Result<Reply>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        match self.0.clone() {
            Some(next) => run(next, call),
            None => Box::pin(async { Err(Error::internal("next service called twice")) }),
        }
    }
}

fn reply_connection(reply: Reply) -> Result<Connection> {
    match reply {
        Reply::Connection(c) => Ok(c),
        Reply::Closed => Err(Error::internal(
            "tower service answered a Request with Closed",
        )),
    }
}

/// Errors of tower middleware (`Elapsed`, `Overloaded`...) as SDK errors.
fn from_box_error(e: tower::BoxError) -> Error {
    match e.downcast::<Error>() {
        Ok(e) => *e,
        Err(e) if e.is::<tower::timeout::error::Elapsed>() => {
            Error::DeadlineExceeded(e.to_string())
        }
        Err(e) => Error::Unavailable(e.to_string()),
    }
}

/// A handler that wraps the rest of the chain in a tower layer (a timeout, a
/// concurrency limit, a load shedder...). The layer is applied per call, so a limit that
/// must be shared across calls must keep its state outside (for example
/// `GlobalConcurrencyLimitLayer`).
pub fn layer<L>(layer: L) -> LayerHandler<L> {
    LayerHandler(layer)
}

/// See [`layer`].
#[derive(Debug, Clone)]
pub struct LayerHandler<L>(L);

#[async_trait]
impl<L, S> Handler for LayerHandler<L>
where
    L: Layer<NextService, Service = S> + Send + Sync + 'static,
    S: Service<Call, Response = Reply> + Send + 'static,
    S::Error: Into<tower::BoxError>,
    S::Future: Send,
{
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let svc = self.0.layer(NextService(Some(next)));
        let call = Call {
            cx: cx.clone(),
            op: Op::Request(req),
        };
        let reply = svc
            .oneshot(call)
            .await
            .map_err(|e| from_box_error(e.into()))?;
        reply_connection(reply)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let svc = self.0.layer(NextService(Some(next)));
        let call = Call {
            cx: cx.clone(),
            op: Op::Close(conn),
        };
        svc.oneshot(call)
            .await
            .map_err(|e| from_box_error(e.into()))?;
        Ok(())
    }
}

/// A handler that answers with a tower service: the service gets the call and its reply
/// is the answer; the rest of the chain is not called. Use it to end a chain with any
/// `Service<Call>`.
pub fn service<S>(svc: S) -> ServiceHandler<S> {
    ServiceHandler(svc)
}

/// See [`service`].
#[derive(Debug, Clone)]
pub struct ServiceHandler<S>(S);

#[async_trait]
impl<S> Handler for ServiceHandler<S>
where
    S: Service<Call, Response = Reply> + Clone + Send + Sync + 'static,
    S::Error: Into<tower::BoxError>,
    S::Future: Send,
{
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        _next: Next,
    ) -> Result<Connection> {
        let call = Call {
            cx: cx.clone(),
            op: Op::Request(req),
        };
        let reply = self
            .0
            .clone()
            .oneshot(call)
            .await
            .map_err(|e| from_box_error(e.into()))?;
        reply_connection(reply)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, _next: Next) -> Result<()> {
        let call = Call {
            cx: cx.clone(),
            op: Op::Close(conn),
        };
        self.0
            .clone()
            .oneshot(call)
            .await
            .map_err(|e| from_box_error(e.into()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Slow;
    #[async_trait]
    impl Handler for Slow {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            tokio::time::sleep(Duration::from_secs(10)).await;
            next.request(cx, req).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tower_timeout_inside_a_chain_ends_a_slow_call_with_deadline_exceeded() {
        let chain = Chain::builder()
            .push(layer(tower::timeout::TimeoutLayer::new(
                Duration::from_secs(1),
            )))
            .push(Slow)
            .build();
        let err = chain
            .request(&mut Cx::server(), Default::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    }

    #[tokio::test]
    async fn a_chain_is_a_tower_service_and_a_service_can_end_a_chain() {
        let inner = Chain::builder().build();
        let chain = Chain::builder()
            .push(service(
                tower::ServiceBuilder::new()
                    .concurrency_limit(1)
                    .service(inner),
            ))
            .push(Slow) // never reached: the service answers
            .build();
        let reply = chain
            .oneshot(Call::request(NetworkServiceRequest {
                connection: Some(Connection {
                    id: "z".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await
            .unwrap();
        match reply {
            Reply::Connection(c) => assert_eq!(c.id, "z"),
            Reply::Closed => panic!("expected a connection"),
        }
    }
}
