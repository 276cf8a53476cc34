//! `round_robin`: picks one of the [`Candidates`] `discover` found, failing over to the
//! next when the chosen endpoint does not answer.
//!
//! What it does: on Request it starts at a cursor kept per network service (so
//! successive requests spread over the endpoints) and tries each candidate in turn: it
//! sets the connection's `network_service_endpoint_name`, puts the endpoint's URL in
//! [`Cx::ext`] as [`ClientUrl`] for `connect`, and calls the rest of the chain. The first
//! success is the answer. On Close it sends the Close to the URL of the connection's
//! endpoint: from the candidates when `discover` found it, else from what this
//! connection remembers (so Close needs no registry).
//!
//! A reselect needs nothing special here: the client clears the endpoint name, so
//! `discover` offers every candidate again.
//!
//! State: a cursor per network service; per connection, the endpoint and URL it was
//! last sent to (through [`ConnHandle`](crate::core::ConnHandle) state, when a `begin`
//! runs before).
//!
//! Failure handled: a candidate whose URL does not parse is skipped; a retryable error
//! moves on to the next candidate, a non-retryable one is returned at once; when every
//! candidate failed the last error is returned with its code, saying how many were
//! tried. No candidates in the context (no `discover` before) is an Internal error.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::{debug, warn};

use crate::core::{Cx, Handler, Next};
use crate::handlers::selection::{prefix_error, Candidates, SelectedEndpoint};
use crate::transport::{ClientUrl, Url};
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Clone, Default)]
#[must_use]
pub struct RoundRobin {
    cursors: Arc<Mutex<HashMap<String, usize>>>,
}

impl fmt::Debug for RoundRobin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let services = self.cursors.lock().map_or(0, |c| c.len());
        f.debug_struct("RoundRobin")
            .field("services", &services)
            .finish()
    }
}

/// The `round_robin` selector.
pub fn round_robin() -> RoundRobin {
    RoundRobin::default()
}

impl RoundRobin {
    /// Where to start for `service`; moves the service's cursor on.
    fn start(&self, service: &str) -> usize {
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        let cursor = cursors.entry(service.to_string()).or_default();
        let start = *cursor;
        *cursor = cursor.wrapping_add(1);
        start
    }
}

/// Tries `next` with each `(name, url)` in turn, as `round_robin` and
/// `discover_forwarder` do: `prepare` adapts the request for a target, and a retryable
/// error moves on to the next one. `what` names the targets in messages ("endpoint").
pub(crate) async fn failover(
    cx: &mut Cx,
    req: &NetworkServiceRequest,
    next: &Next,
    targets: &[(String, Url)],
    what: &str,
    prepare: impl Fn(&mut NetworkServiceRequest, &str),
) -> Result<(Connection, usize)> {
    let base = cx.ext().clone();
    let mut last: Option<Error> = None;
    let mut tried = 0;
    for (i, (name, url)) in targets.iter().enumerate() {
        if last.is_some() && cx.remaining() == Some(Duration::ZERO) {
            debug!("deadline reached; no more {what}s are tried");
            break;
        }
        tried += 1;
        // Each attempt starts from the values this hop received, not from what a failed
        // attempt left behind.
        *cx.ext_mut() = base.clone();
        cx.ext_mut().insert(ClientUrl(url.clone()));
        let mut attempt = req.clone();
        prepare(&mut attempt, name);
        match next.clone().request(cx, attempt).await {
            Ok(conn) => {
                debug!(%name, %url, "{what} accepted the request");
                return Ok((conn, i));
            }
            Err(e) if e.is_retryable() => {
                warn!(%name, %url, error = %e, "{what} failed; trying the next one");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(match last {
        Some(e) => prefix_error(
            e,
            &format!("all {tried} {what}s tried failed, the last with: "),
        ),
        None => Error::unavailable(format!("no {what} to try")),
    })
}

/// `nses` as `(name, url)`, skipping the ones whose URL does not parse.
pub(crate) fn parse_urls<'a>(
    nses: impl IntoIterator<Item = &'a nsm_proto::registry::NetworkServiceEndpoint>,
    what: &str,
) -> Vec<(String, Url)> {
    nses.into_iter()
        .filter_map(|nse| match nse.url.parse::<Url>() {
            Ok(url) => Some((nse.name.clone(), url)),
            Err(e) => {
                warn!(name = %nse.name, error = %e, "skipping a {what} with a bad URL");
                None
            }
        })
        .collect()
}

#[async_trait]
impl Handler for RoundRobin {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let Some(candidates) = cx.ext().get::<Candidates>().cloned() else {
            return Err(Error::internal(
                "round_robin found no candidates in the context: put discover before it",
            ));
        };
        let service = candidates.ns.name.as_str();
        let n = candidates.nses.len();
        if n == 0 {
            return Err(Error::not_found(format!(
                "no endpoint for network service {service}"
            )));
        }
        let start = self.start(service) % n;
        let ordered = candidates.nses[start..]
            .iter()
            .chain(&candidates.nses[..start]);
        let targets = parse_urls(ordered, "endpoint");
        if targets.is_empty() {
            return Err(Error::unavailable(format!(
                "none of the {n} endpoints of network service {service} has a usable URL"
            )));
        }
        let result = failover(cx, &req, &next, &targets, "endpoint", |r, name| {
            r.connection
                .get_or_insert_with(Default::default)
                .network_service_endpoint_name = name.to_string();
        })
        .await;
        let (conn, i) =
            result.map_err(|e| prefix_error(e, &format!("network service {service}: ")))?;
        let (name, url) = &targets[i];
        if let Some(h) = cx.conn() {
            h.state::<SelectedEndpoint>().set(name, url.clone());
        }
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let name = conn.network_service_endpoint_name.as_str();
        let from_candidates = cx.ext().get::<Candidates>().and_then(|c| {
            let nse = c.nses.iter().find(|nse| nse.name == name)?;
            nse.url.parse::<Url>().ok()
        });
        let url = from_candidates.or_else(|| {
            cx.conn()
                .and_then(|h| h.get_state::<SelectedEndpoint>())
                .and_then(|s| s.url_for(name))
        });
        match url {
            Some(url) => {
                cx.ext_mut().insert(ClientUrl(url));
            }
            None => {
                debug!(endpoint = %name, "no URL known for the endpoint; closing downstream without one")
            }
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::Chain;
    use crate::handlers::discover::discover;
    use crate::handlers::discover::test_support::*;
    use crate::handlers::selection::Candidates;
    use crate::handlers::{begin, update_path};

    fn chain(reg: &Arc<FakeRegistry>, down: &Arc<Downstream>) -> Chain {
        Chain::builder()
            .push(update_path("fwd"))
            .push(begin())
            .push(discover(reg.registries()))
            .push(round_robin())
            .push(down.clone())
            .build()
    }

    fn registry(names: &[&str]) -> Arc<FakeRegistry> {
        let reg = FakeRegistry::new();
        reg.put_ns(ns("svc"));
        for n in names {
            reg.put_nse(nse(n, "svc", &format!("inmem://{n}"), &[]));
        }
        reg
    }

    #[tokio::test]
    async fn fails_over_past_three_busy_endpoints_to_the_good_one() {
        let reg = registry(&["busy-1", "busy-2", "busy-3", "good"]);
        let down = Downstream::new();
        for b in ["busy-1", "busy-2", "busy-3"] {
            down.fail(&format!("inmem://{b}"), Error::unavailable("busy"));
        }
        let c = chain(&reg, &down);
        let conn = c
            .request(&mut Cx::server(), request("x", "svc", &[]))
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "good");
        assert_eq!(
            down.take(),
            [
                "request inmem://busy-1 busy-1",
                "request inmem://busy-2 busy-2",
                "request inmem://busy-3 busy-3",
                "request inmem://good good",
            ]
        );
        // A refresh names the endpoint: it goes straight there.
        c.request(
            &mut Cx::server(),
            NetworkServiceRequest {
                connection: Some(conn.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(down.take(), ["request inmem://good good"]);
        c.close(&mut Cx::server(), conn).await.unwrap();
        assert_eq!(down.take(), ["close inmem://good good"]);
    }

    #[tokio::test]
    async fn successive_requests_rotate_over_the_candidates() {
        let reg = registry(&["a", "b", "c"]);
        let down = Downstream::new();
        let c = chain(&reg, &down);
        let mut got = Vec::new();
        for id in ["1", "2", "3", "4"] {
            let conn = c
                .request(&mut Cx::server(), request(id, "svc", &[]))
                .await
                .unwrap();
            got.push(conn.network_service_endpoint_name);
        }
        assert_eq!(got, ["a", "b", "c", "a"]);
    }

    #[tokio::test]
    async fn when_all_fail_the_last_error_keeps_its_code_and_counts_the_tries() {
        let reg = registry(&["a", "b"]);
        let down = Downstream::new();
        down.fail("inmem://a", Error::unavailable("a is down"));
        down.fail(
            "inmem://b",
            Error::Remote {
                code: tonic::Code::ResourceExhausted,
                message: "b is full".into(),
            },
        );
        let e = chain(&reg, &down)
            .request(&mut Cx::server(), request("x", "svc", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("all 2 endpoints tried failed") && msg.contains("b is full"),
            "{msg}"
        );
        assert!(msg.contains("network service svc"), "{msg}");
    }

    #[tokio::test]
    async fn a_non_retryable_error_is_returned_at_once() {
        let reg = registry(&["a", "b"]);
        let down = Downstream::new();
        down.fail("inmem://a", Error::invalid("bad mechanism"));
        let e = chain(&reg, &down)
            .request(&mut Cx::server(), request("x", "svc", &[]))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_eq!(down.take(), ["request inmem://a a"]);
    }

    #[tokio::test]
    async fn endpoints_with_bad_urls_are_skipped() {
        let reg = registry(&["b"]);
        reg.put_nse(nse("a", "svc", "not a url", &[]));
        let down = Downstream::new();
        let conn = chain(&reg, &down)
            .request(&mut Cx::server(), request("x", "svc", &[]))
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "b");
        assert_eq!(down.take(), ["request inmem://b b"]);

        let reg = FakeRegistry::new();
        reg.put_ns(ns("svc"));
        reg.put_nse(nse("a", "svc", "nope", &[]));
        let e = chain(&reg, &down)
            .request(&mut Cx::server(), request("y", "svc", &[]))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Unavailable(m) if m.contains("usable URL")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn without_candidates_a_request_is_an_internal_error() {
        let c = Chain::builder().push(round_robin()).build();
        let e = c
            .request(&mut Cx::server(), request("x", "svc", &[]))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Internal(m) if m.contains("discover")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn close_reaches_the_endpoint_without_the_registry() {
        let reg = registry(&["a"]);
        let down = Downstream::new();
        let c = chain(&reg, &down);
        let conn = c
            .request(&mut Cx::server(), request("x", "svc", &[]))
            .await
            .unwrap();
        down.take();
        reg.set_down(true);
        let finds = reg.finds();
        c.close(&mut Cx::server(), conn).await.unwrap();
        assert_eq!(down.take(), ["close inmem://a a"]);
        assert_eq!(reg.finds(), finds, "Close looked the registry up");
    }

    #[tokio::test]
    async fn close_uses_the_candidates_when_nothing_is_remembered() {
        // A hop restarted: no state, but discover found the endpoint.
        let mut cx = Cx::server();
        cx.ext_mut().insert(Candidates {
            ns: ns("svc"),
            nses: vec![
                nse("a", "svc", "inmem://a", &[]),
                nse("b", "svc", "inmem://b", &[]),
            ],
        });
        let down = Downstream::new();
        let c = Chain::builder()
            .push(round_robin())
            .push(down.clone())
            .build();
        let conn = Connection {
            network_service_endpoint_name: "b".into(),
            ..Default::default()
        };
        c.close(&mut cx, conn.clone()).await.unwrap();
        assert_eq!(down.take(), ["close inmem://b b"]);
        // Nothing known at all: the Close still goes on.
        c.close(&mut Cx::server(), conn).await.unwrap();
        assert_eq!(down.take(), ["close - b"]);
    }

    #[tokio::test]
    async fn a_reselect_with_the_name_cleared_selects_afresh() {
        let reg = registry(&["a", "b"]);
        let down = Downstream::new();
        let c = chain(&reg, &down);
        let conn = c
            .request(&mut Cx::server(), request("x", "svc", &[]))
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "a");
        down.fail("inmem://a", Error::unavailable("a died"));
        down.take();
        let mut again = conn.clone();
        again.network_service_endpoint_name.clear();
        again.state = nsm_proto::connection::State::ReselectRequested as i32;
        let conn = c
            .request(
                &mut Cx::server(),
                NetworkServiceRequest {
                    connection: Some(again),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "b");
        // begin closed the old downstream first, at a's remembered URL.
        assert_eq!(down.take(), ["close inmem://a a", "request inmem://b b"]);
    }
}
