//! A probe at the wire end of a client chain: what the rest of the chain answered.

use std::sync::{Arc, Mutex};

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::{async_trait, ConnHandle, Cx, Handler, Next};

/// Records every connection the rest of the client chain answered with (failures are
/// passed on and not recorded), and the connection handle of the first request (for
/// midchain events). Clones share the record, so a test keeps one and puts the other
/// in the chain. It keeps every answer for the life of the test.
#[derive(Debug, Clone, Default)]
pub struct Answers {
    seen: Arc<Mutex<Vec<Connection>>>,
    handle: Arc<Mutex<Option<ConnHandle>>>,
}

#[async_trait]
impl Handler for Answers {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        {
            let mut handle = self.handle.lock().unwrap_or_else(|p| p.into_inner());
            if handle.is_none() {
                *handle = cx.conn().cloned();
            }
        }
        let conn = next.request(cx, req).await?;
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn.clone());
        Ok(conn)
    }
}

impl Answers {
    /// Every answer so far, oldest first.
    pub fn all(&self) -> Vec<Connection> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many answers so far.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The last answer.
    pub fn last(&self) -> Option<Connection> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    }

    /// The last answer for the connection `id`.
    pub fn last_of(&self, id: &str) -> Option<Connection> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|c| c.id == id)
            .cloned()
    }

    /// The endpoint of the last answer (empty before any).
    pub fn last_endpoint(&self) -> String {
        self.last()
            .map(|c| c.network_service_endpoint_name)
            .unwrap_or_default()
    }

    /// The connection handle of the first request.
    ///
    /// # Panics
    /// Before the first request, or when it had no handle (no `begin` before the probe).
    pub fn handle(&self) -> ConnHandle {
        self.handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("no request with a connection handle yet")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_sdk::Chain;

    /// Answers for the endpoint `nse-<n>` with the request's id.
    #[derive(Debug)]
    struct Endpoint(&'static str);

    #[async_trait]
    impl Handler for Endpoint {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> nsm_sdk::Result<Connection> {
            let mut conn = req.connection.unwrap_or_default();
            conn.network_service_endpoint_name = self.0.into();
            Ok(conn)
        }
    }

    #[tokio::test]
    async fn answers_are_recorded_in_order() {
        let answers = Answers::default();
        let chain = Chain::builder()
            .push(answers.clone())
            .push(Endpoint("nse-1"))
            .build();
        assert_eq!(answers.count(), 0);
        assert_eq!(answers.last_endpoint(), "");
        for id in ["a", "b", "a"] {
            let mut req = crate::request("svc");
            if let Some(c) = req.connection.as_mut() {
                c.id = id.into();
                c.labels.insert("n".into(), answers.count().to_string());
            }
            chain.request(&mut Cx::client(), req).await.unwrap();
        }
        assert_eq!(answers.count(), 3);
        assert_eq!(answers.all().len(), 3);
        assert_eq!(answers.last().unwrap().id, "a");
        assert_eq!(answers.last_of("a").unwrap().labels["n"], "2");
        assert_eq!(answers.last_of("b").unwrap().labels["n"], "1");
        assert!(answers.last_of("c").is_none());
        assert_eq!(answers.last_endpoint(), "nse-1");
    }
}
