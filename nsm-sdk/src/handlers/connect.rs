//! `connect`: the server side of a hop hands the request to a client chain towards the
//! next hop, then continues with the answer.
//!
//! What it does: runs the given client chain (which ends in a gRPC client, or anything
//! that answers) with a client-side copy of the context, so the per-call values chosen
//! before it (the next hop's URL, candidates) travel along; the connection the client
//! chain returns replaces the request's connection for the rest of this chain. It marks
//! the call with [`PathContinues`] so an endpoint-style `update_path` before it keeps the
//! segments the next hops added. Close goes to the client chain, then on.
//!
//! State: none of its own; the client chain's `begin` keeps the downstream connections.
//!
//! Failure handled: when a handler after `connect` fails a Request, the downstream
//! connection just made is closed again (best effort), so nothing is left half built.

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;

use crate::core::{Chain, Cx, Handler, Next, Side};
use crate::handlers::update_path::PathContinues;
use crate::Result;

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Connect {
    client: Chain,
}

/// The `connect` handler, calling the next hop through `client`.
pub fn connect(client: Chain) -> Connect {
    Connect { client }
}

fn client_cx(cx: &Cx) -> Cx {
    let mut ccx = cx.clone();
    ccx.set_side(Side::Client);
    ccx.set_conn(None);
    ccx
}

#[async_trait]
impl Handler for Connect {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let mut ccx = client_cx(cx);
        // The request goes downstream as it is; what continues here is the answer with
        // the caller's mechanism preferences (nothing else of the request is left), and
        // when nothing follows this handler, just the answer.
        let last = next.remaining() == 0;
        let preferences = if last {
            Vec::new()
        } else {
            req.mechanism_preferences.clone()
        };
        let downstream = self.client.request(&mut ccx, req).await?;
        cx.ext_mut().insert(PathContinues);
        if last {
            return Ok(downstream);
        }
        let req = NetworkServiceRequest {
            connection: Some(downstream.clone()),
            mechanism_preferences: preferences,
        };
        match next.request(cx, req).await {
            Ok(conn) => Ok(conn),
            Err(e) => {
                let mut ccx = client_cx(cx);
                if let Err(ce) = self.client.close(&mut ccx, downstream).await {
                    tracing::debug!(error = %ce, "closing the downstream after a failure failed");
                }
                Err(e)
            }
        }
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let mut ccx = client_cx(cx);
        if next.remaining() == 0 {
            return self.client.close(&mut ccx, conn).await;
        }
        let downstream = self.client.close(&mut ccx, conn.clone()).await;
        let rest = next.close(cx, conn).await;
        downstream.and(rest)
    }
}

/// Puts a fixed next-hop URL in the context ([`ClientUrl`](crate::transport::ClientUrl)):
/// the start of an NSC's or passthrough's client chain, which always talks to its
/// node's manager.
///
/// State: none. Failure handled: none; it cannot fail.
#[derive(Debug, Clone)]
pub struct ClientUrlHandler(crate::transport::Url);

/// See [`ClientUrlHandler`].
pub fn client_url(url: crate::transport::Url) -> ClientUrlHandler {
    ClientUrlHandler(url)
}

#[async_trait]
impl Handler for ClientUrlHandler {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        cx.ext_mut()
            .insert(crate::transport::ClientUrl(self.0.clone()));
        next.request(cx, req).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        cx.ext_mut()
            .insert(crate::transport::ClientUrl(self.0.clone()));
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::{begin, update_path};
    use crate::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Default)]
    struct Downstream {
        requests: AtomicUsize,
        closes: AtomicUsize,
    }

    #[async_trait]
    impl Handler for Arc<Downstream> {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            assert_eq!(cx.side(), Side::Client);
            self.requests.fetch_add(1, Ordering::SeqCst);
            let mut c = next.request(cx, req).await?;
            c.labels.insert("downstream".into(), "yes".into());
            Ok(c)
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.closes.fetch_add(1, Ordering::SeqCst);
            next.close(cx, conn).await
        }
    }

    struct FailAfter;
    #[async_trait]
    impl Handler for FailAfter {
        async fn request(
            &self,
            _: &mut Cx,
            _: NetworkServiceRequest,
            _: Next,
        ) -> Result<Connection> {
            Err(Error::unavailable("after connect"))
        }
    }

    #[tokio::test]
    async fn the_answer_of_the_next_hop_continues_and_close_reaches_it() {
        let down = Arc::new(Downstream::default());
        let client = Chain::builder().push(begin()).push(down.clone()).build();
        let chain = Chain::builder()
            .push(update_path("hop").trim_tail(true))
            .push(begin())
            .push(connect(client))
            .build();
        let conn = chain
            .request(&mut Cx::server(), Default::default())
            .await
            .unwrap();
        assert_eq!(conn.labels["downstream"], "yes");
        chain.close(&mut Cx::server(), conn).await.unwrap();
        assert_eq!(down.closes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failure_after_connect_closes_the_downstream_again() {
        let down = Arc::new(Downstream::default());
        let client = Chain::builder().push(begin()).push(down.clone()).build();
        let chain = Chain::builder()
            .push(update_path("hop"))
            .push(connect(client))
            .push(FailAfter)
            .build();
        let err = chain
            .request(&mut Cx::server(), Default::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert_eq!(down.requests.load(Ordering::SeqCst), 1);
        assert_eq!(down.closes.load(Ordering::SeqCst), 1);
    }
}
