//! `passthrough`: a service-function-chain hop forwards the connection to the next
//! service as a client of its own.
//!
//! What it does: on the way down it replaces the request's labels (when given) and the
//! endpoint name (with the downstream endpoint chosen before, so a refresh lands on the
//! same one; empty the first time so the mesh selects), and optionally the network
//! service; on the way back it restores what its own caller sent, so the upstream sees
//! its own endpoint (this NSE) and labels, with the whole path.
//!
//! State: per connection, the name of the downstream endpoint.
//!
//! Failure handled: on RESELECT_REQUESTED the remembered downstream endpoint is
//! dropped, so the next hop selects afresh.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use nsm_proto::connection::{Connection, State};
use nsm_proto::networkservice::NetworkServiceRequest;

use crate::core::{Cx, Handler, Next};
use crate::Result;

/// See the [module docs](self).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Passthrough {
    labels: Option<HashMap<String, String>>,
    service: Option<String>,
}

/// The `passthrough` handler: keeps the request's labels and service as they are.
pub fn passthrough() -> Passthrough {
    Passthrough::default()
}

impl Passthrough {
    /// Sends these labels downstream instead of the caller's.
    pub fn labels(mut self, labels: HashMap<String, String>) -> Self {
        self.labels = Some(labels);
        self
    }

    /// Requests this network service downstream instead of the caller's.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    fn downstream(&self, conn: &Connection, chosen: String) -> Connection {
        let mut down = conn.clone();
        if let Some(l) = &self.labels {
            down.labels = l.clone();
        }
        if let Some(s) = &self.service {
            down.network_service = s.clone();
        }
        down.network_service_endpoint_name = chosen;
        down
    }
}

#[derive(Default)]
struct Chosen(Mutex<String>);

impl Chosen {
    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set(&self, v: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

fn restore(out: &mut Connection, caller: &Connection) {
    out.network_service_endpoint_name = caller.network_service_endpoint_name.clone();
    out.labels = caller.labels.clone();
    out.network_service = caller.network_service.clone();
}

#[async_trait]
impl Handler for Passthrough {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let caller = req.connection.clone().unwrap_or_default();
        let chosen = cx.conn().map(|c| c.state::<Chosen>());
        if caller.state == State::ReselectRequested as i32 {
            if let Some(c) = &chosen {
                c.set(String::new());
            }
        }
        let previous = chosen.as_ref().map(|c| c.get()).unwrap_or_default();
        req.connection = Some(self.downstream(&caller, previous));
        let mut out = next.request(cx, req).await?;
        if let Some(c) = &chosen {
            c.set(out.network_service_endpoint_name.clone());
        }
        restore(&mut out, &caller);
        Ok(out)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let chosen = cx
            .conn()
            .and_then(|c| c.get_state::<Chosen>())
            .map(|c| c.get())
            .unwrap_or_default();
        let down = self.downstream(&conn, chosen);
        next.close(cx, down).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::handlers::{begin, update_path};
    use std::sync::Arc;

    /// Plays the next service: records what it was asked and picks "nse-b".
    #[derive(Default)]
    struct Next2(Mutex<Vec<Connection>>);

    #[async_trait]
    impl Handler for Arc<Next2> {
        async fn request(
            &self,
            _: &mut Cx,
            req: NetworkServiceRequest,
            _: Next,
        ) -> Result<Connection> {
            let mut c = req.connection.unwrap_or_default();
            self.0.lock().unwrap().push(c.clone());
            c.network_service_endpoint_name = "nse-b".into();
            Ok(c)
        }
        async fn close(&self, _: &mut Cx, conn: Connection, _: Next) -> Result<()> {
            self.0.lock().unwrap().push(conn);
            Ok(())
        }
    }

    #[tokio::test]
    async fn relabels_downstream_keeps_the_chosen_endpoint_and_restores_upstream() {
        let down = Arc::new(Next2::default());
        let chain = Chain::builder()
            .push(update_path("nse-a"))
            .push(begin())
            .push(passthrough().labels(HashMap::from([("step".to_string(), "1".to_string())])))
            .push(down.clone())
            .build();
        let mut conn = Connection {
            network_service: "ns".into(),
            network_service_endpoint_name: "nse-a".into(),
            labels: HashMap::from([("step".into(), "0".into())]),
            ..Default::default()
        };
        let req = |c: Connection| NetworkServiceRequest {
            connection: Some(c),
            ..Default::default()
        };
        conn = chain.request(&mut Cx::server(), req(conn)).await.unwrap();
        assert_eq!(conn.network_service_endpoint_name, "nse-a");
        assert_eq!(conn.labels["step"], "0");
        conn = chain.request(&mut Cx::server(), req(conn)).await.unwrap();
        chain.close(&mut Cx::server(), conn.clone()).await.unwrap();
        let seen = down.0.lock().unwrap().clone();
        assert_eq!(seen[0].labels["step"], "1");
        assert_eq!(
            seen[0].network_service_endpoint_name, "",
            "first request must let the mesh select"
        );
        assert_eq!(
            seen[1].network_service_endpoint_name, "nse-b",
            "refresh must keep the downstream endpoint"
        );
        assert_eq!(
            seen[2].network_service_endpoint_name, "nse-b",
            "close must reach the downstream endpoint"
        );

        // A reselect forgets the downstream endpoint.
        let mut again = conn.clone();
        again.state = State::ReselectRequested as i32;
        chain.request(&mut Cx::server(), req(again)).await.unwrap();
        let seen = down.0.lock().unwrap();
        assert_eq!(seen.last().unwrap().network_service_endpoint_name, "");
    }
}
