//! The NOOP mechanism: a connection with no data plane, for tests and control-plane-only
//! meshes.
//!
//! [`noop_server`] is the server side: there is nothing to build, so it passes calls
//! on. Under [`mechanisms`](super::mechanisms()) the connection already carries the NOOP
//! mechanism; used on its own it picks the request's NOOP preference when the
//! connection has no mechanism yet. It adds no parameter: a test sees that NOOP was
//! chosen from the returned connection's mechanism type. [`noop_client`] offers
//! `{cls: LOCAL, type: NOOP}` when the request offers no NOOP yet.
//!
//! State: none. Failure handled: a connection without a NOOP mechanism or preference
//! reaching a lone `noop_server` is an InvalidArgument.

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Mechanism};
use nsm_proto::networkservice::NetworkServiceRequest;

use super::mechanisms::{mechanism_preferences, MechanismPreferences};
use super::select_mechanism;
use crate::core::{Cx, Handler, Next};
use crate::wire::{cls, types};
use crate::Result;

/// The NOOP mechanism: `{cls: LOCAL, type: NOOP}`, no parameters.
pub fn noop_mechanism() -> Mechanism {
    Mechanism {
        cls: cls::LOCAL.to_string(),
        r#type: types::NOOP.to_string(),
        ..Default::default()
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct NoopServer;

/// The server side of NOOP; see the [module docs](self).
pub fn noop_server() -> NoopServer {
    NoopServer
}

/// The client side of NOOP: offers `{cls: LOCAL, type: NOOP}` when no NOOP is offered.
pub fn noop_client() -> MechanismPreferences {
    mechanism_preferences(vec![noop_mechanism()])
}

#[async_trait]
impl Handler for NoopServer {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        select_mechanism(&mut req, types::NOOP, "noop server")?;
        next.request(cx, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::handlers::mechanisms;
    use crate::Error;

    #[tokio::test]
    async fn a_noop_client_reaches_a_noop_server() {
        let server = Chain::builder()
            .push(mechanisms().with(types::NOOP, noop_server()))
            .build();
        let chain = Chain::builder().push(noop_client()).push(server).build();
        let conn = chain
            .request(&mut Cx::client(), NetworkServiceRequest::default())
            .await
            .unwrap();
        assert_eq!(conn.mechanism, Some(noop_mechanism()));
    }

    #[tokio::test]
    async fn a_lone_noop_server_picks_the_noop_preference_or_refuses() {
        let chain = Chain::builder().push(noop_server()).build();
        let req = NetworkServiceRequest {
            mechanism_preferences: vec![noop_mechanism()],
            ..Default::default()
        };
        let conn = chain.request(&mut Cx::server(), req).await.unwrap();
        assert_eq!(conn.mechanism, Some(noop_mechanism()));

        let err = chain
            .request(&mut Cx::server(), NetworkServiceRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
}
