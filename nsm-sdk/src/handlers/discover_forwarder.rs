//! `discover_forwarder`: the NSMgr picks one of its own forwarders for a request.
//!
//! What it does: forwarders are endpoints of the network service
//! [`FORWARDER_SERVICE`] that registered through this NSMgr, so the registry shows them
//! with this NSMgr's URL; a Find `{network_service_names: [forwarder], url: own URL}`
//! returns them (the registry front maps them back to their local URLs). Expired ones
//! are dropped, the rest filtered by the labels the network service asks forwarders to
//! have ([`forwarder_labels`]: the first applicable match's metadata labels, `p2p=true`
//! by default; the default too when the service cannot be looked up).
//!
//! The forwarder is **sticky**: the one this connection used before is tried first. It
//! is remembered in the connection's state and, to survive an NSMgr restart, read from
//! the path (the segment after this NSMgr's own is the forwarder's). A request in state
//! RESELECT_REQUESTED drops the stickiness. The others follow in an order that rotates
//! between requests. The chosen forwarder's URL goes into [`Cx::ext`] as
//! [`ClientUrl`] for `connect`.
//!
//! On Close the forwarder the connection went through gets the Close: its URL from the
//! connection's state, or from the path's forwarder name and a registry lookup. When
//! neither is known the Close goes on anyway.
//!
//! State: a rotating cursor; per connection, the forwarder last used and its URL.
//!
//! Failure handled: a forwarder that fails with a retryable error is replaced by the
//! next one (a non-retryable error is returned at once), except on a refresh of a
//! connection established through this NSMgr: its forwarder is replaced only when it
//! cannot be reached, and an error it answers with is returned as is (the failure is
//! further down; moving would only tear down a working data plane); no usable forwarder
//! is NotFound; a registry failure on a refresh of a connection whose forwarder is known
//! keeps that forwarder (only a first request needs the registry).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use nsm_proto::connection::{Connection, State};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tracing::{debug, warn};

use crate::core::{Cx, Handler, Next};
use crate::handlers::round_robin::{failover, parse_urls};
use crate::handlers::selection::{fmt_labels, prefix_error, registry_cx};
use crate::registry::select::{forwarder_labels, is_expired, match_forwarders, FORWARDER_SERVICE};
use crate::registry::Registries;
use crate::transport::{ClientUrl, Url};
use crate::{Error, Result};

/// The forwarder a connection last went through, and its URL.
#[derive(Debug, Default)]
struct ChosenForwarder(Mutex<Option<(String, Url)>>);

impl ChosenForwarder {
    fn get(&self) -> Option<(String, Url)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set(&self, name: &str, url: Url) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((name.to_string(), url));
    }
}

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct DiscoverForwarder {
    registries: Registries,
    own_url: Url,
    cursor: Arc<AtomicUsize>,
}

impl fmt::Debug for DiscoverForwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoverForwarder")
            .field("own_url", &self.own_url)
            .finish_non_exhaustive()
    }
}

/// The `discover_forwarder` handler of the NSMgr listening at `own_url`, finding its
/// forwarders in `registries`.
pub fn discover_forwarder(registries: Registries, own_url: Url) -> DiscoverForwarder {
    DiscoverForwarder {
        registries,
        own_url,
        cursor: Arc::default(),
    }
}

/// The name in the path segment after the current one: the forwarder this NSMgr sent
/// the connection to last time.
fn next_hop_name(conn: &Connection) -> Option<&str> {
    let path = conn.path.as_ref()?;
    let seg = path.path_segments.get(path.index as usize + 1)?;
    Some(seg.name.as_str()).filter(|n| !n.is_empty())
}

fn remembered(cx: &Cx) -> Option<(String, Url)> {
    cx.conn()
        .and_then(|h| h.get_state::<ChosenForwarder>())
        .and_then(|s| s.get())
}

impl DiscoverForwarder {
    fn template(&self, name: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.to_string(),
            network_service_names: vec![FORWARDER_SERVICE.to_string()],
            url: self.own_url.to_string(),
            ..Default::default()
        }
    }

    async fn find_ns(&self, cx: &Cx, name: &str) -> Option<NetworkService> {
        let template = NetworkService {
            name: name.to_string(),
            ..Default::default()
        };
        match self
            .registries
            .ns
            .list(&mut registry_cx(cx), template)
            .await
        {
            Ok(found) => found.into_iter().find(|ns| ns.name == name),
            Err(e) => {
                debug!(service = %name, error = %e, "network service lookup failed; default forwarder labels");
                None
            }
        }
    }

    /// The forwarders to try, best first.
    async fn targets(
        &self,
        cx: &Cx,
        conn: &Connection,
        sticky: Option<&str>,
        known: Option<(String, Url)>,
    ) -> Result<Vec<(String, Url)>> {
        let service = conn.network_service.as_str();
        let registered = match self
            .registries
            .nse
            .list(&mut registry_cx(cx), self.template(""))
            .await
        {
            Ok(found) => found,
            Err(e) => {
                if let Some(known) = known {
                    warn!(forwarder = %known.0, error = %e, "forwarder lookup failed; staying on the known forwarder");
                    return Ok(vec![known]);
                }
                return Err(prefix_error(e, "finding forwarders: "));
            }
        };
        let now = SystemTime::now();
        let live: Vec<_> = registered
            .into_iter()
            .filter(|f| !is_expired(f, now))
            .collect();
        let wanted = forwarder_labels(self.find_ns(cx, service).await.as_ref(), &conn.labels);
        let mut fitting = match_forwarders(&wanted, &live);
        if !fitting.is_empty() {
            let start = self.cursor.fetch_add(1, Ordering::Relaxed) % fitting.len();
            fitting.rotate_left(start);
        }
        if let Some(pos) = sticky.and_then(|s| fitting.iter().position(|f| f.name == s)) {
            let first = fitting.remove(pos);
            fitting.insert(0, first);
        }
        let targets = parse_urls(&fitting, "forwarder");
        if targets.is_empty() {
            return Err(Error::not_found(format!(
                "no forwarder for network service {service} at {} (wanted labels {}; {} live forwarders registered, {} with those labels)",
                self.own_url,
                fmt_labels(&wanted),
                live.len(),
                fitting.len()
            )));
        }
        Ok(targets)
    }
}

#[async_trait]
impl Handler for DiscoverForwarder {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let default_conn = Connection::default();
        let conn = req.connection.as_ref().unwrap_or(&default_conn);
        let service = conn.network_service.as_str();
        if service.is_empty() {
            return Err(Error::invalid("the request names no network service"));
        }
        let reselect = conn.state == State::ReselectRequested as i32;
        let known = if reselect { None } else { remembered(cx) };
        let sticky = match (&known, reselect) {
            (_, true) => None,
            (Some((name, _)), _) => Some(name.clone()),
            (None, false) => next_hop_name(conn).map(str::to_string),
        };
        let kept = known.as_ref().map(|(name, _)| name.clone());
        let targets = self.targets(cx, conn, sticky.as_deref(), known).await?;
        debug!(
            %service,
            ?sticky,
            forwarders = ?targets.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(),
            "selecting a forwarder"
        );
        let result = match kept {
            // Established here: the forwarder stays while it answers. An error it
            // answers with comes from further down (the next forwarder would meet the
            // same) and moving would rebuild a working data plane elsewhere; only a
            // forwarder that cannot be reached (a local Unavailable from the transport,
            // not a status it sent) is replaced.
            Some(name) if targets.first().is_some_and(|t| t.0 == name) => {
                match failover(cx, &req, &next, &targets[..1], "forwarder", |_, _| {}).await {
                    Err(Error::Unavailable(m)) if targets.len() > 1 => {
                        warn!(forwarder = %name, error = %m, "the connection's forwarder cannot be reached; trying the others");
                        failover(cx, &req, &next, &targets[1..], "forwarder", |_, _| {})
                            .await
                            .map(|(conn, i)| (conn, i + 1))
                    }
                    other => other,
                }
            }
            _ => failover(cx, &req, &next, &targets, "forwarder", |_, _| {}).await,
        };
        let (out, i) =
            result.map_err(|e| prefix_error(e, &format!("network service {service}: ")))?;
        let (name, url) = &targets[i];
        if let Some(h) = cx.conn() {
            h.state::<ChosenForwarder>().set(name, url.clone());
        }
        Ok(out)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let mut url = remembered(cx).map(|(_, url)| url);
        if url.is_none() {
            if let Some(name) = next_hop_name(&conn) {
                match self
                    .registries
                    .nse
                    .list(&mut registry_cx(cx), self.template(name))
                    .await
                {
                    Ok(found) => {
                        url = found
                            .into_iter()
                            .find(|f| f.name == name)
                            .and_then(|f| f.url.parse().ok());
                    }
                    Err(e) => {
                        warn!(forwarder = %name, error = %e, "forwarder lookup for Close failed")
                    }
                }
            }
        }
        match url {
            Some(url) => {
                cx.ext_mut().insert(ClientUrl(url));
            }
            None => debug!("no forwarder known for the connection; closing downstream without one"),
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::Chain;
    use crate::handlers::discover::test_support::*;
    use crate::handlers::{begin, update_path};
    use nsm_proto::registry::{Match, Metadata};

    const NSMGR: &str = "inmem://nsmgr-1";

    /// A forwarder registered through nsmgr-1: the registry shows a URL under the
    /// NSMgr's (our fake registry has no front that rewrites URLs).
    fn fwd(name: &str, l: &[(&str, &str)]) -> NetworkServiceEndpoint {
        nse(name, FORWARDER_SERVICE, &format!("{NSMGR}-{name}"), l)
    }

    fn url(name: &str) -> String {
        format!("{NSMGR}-{name}")
    }

    struct Mesh {
        reg: Arc<FakeRegistry>,
        down: Arc<Downstream>,
        chain: Chain,
    }

    impl Mesh {
        fn new(forwarders: &[&str]) -> Mesh {
            let reg = FakeRegistry::new();
            reg.put_ns(ns("svc"));
            let down = Downstream::new();
            for f in forwarders {
                reg.put_nse(fwd(f, &[("p2p", "true")]));
                down.hop(&url(f), f);
            }
            let chain = Mesh::chain(&reg, &down);
            Mesh { reg, down, chain }
        }

        /// The NSMgr's chain; calling it again is an NSMgr restart (no state kept).
        fn chain(reg: &Arc<FakeRegistry>, down: &Arc<Downstream>) -> Chain {
            Chain::builder()
                .push(update_path("nsmgr"))
                .push(begin())
                .push(discover_forwarder(reg.registries(), NSMGR.parse().unwrap()))
                .push(down.clone())
                .build()
        }

        fn add(&self, name: &str, l: &[(&str, &str)]) {
            self.reg.put_nse(fwd(name, l));
            self.down.hop(&url(name), name);
        }

        async fn request(&self, conn: Connection) -> Result<Connection> {
            let req = NetworkServiceRequest {
                connection: Some(conn),
                ..Default::default()
            };
            self.chain.request(&mut Cx::server(), req).await
        }

        async fn first(&self, id: &str) -> Result<Connection> {
            self.request(request(id, "svc", &[]).connection.unwrap())
                .await
        }
    }

    fn forwarder_of(conn: &Connection) -> &str {
        &conn.path.as_ref().unwrap().path_segments[2].name
    }

    #[tokio::test]
    async fn p2mp_forwarder_by_metadata_labels_then_p2p_after_the_service_changes() {
        let mesh = Mesh::new(&[]);
        mesh.add("fwd-p2mp", &[("p2mp", "true")]);
        mesh.add("fwd-p2p", &[("p2p", "true")]);
        mesh.add("fwd-special", &[("special", "true")]);
        let mut svc = ns("svc");
        svc.matches = vec![Match {
            metadata: Some(Metadata {
                labels: labels(&[("p2mp", "true")]),
            }),
            ..Default::default()
        }];
        mesh.reg.put_ns(svc.clone());
        for id in ["1", "2", "3"] {
            let conn = mesh.first(id).await.unwrap();
            assert_eq!(forwarder_of(&conn), "fwd-p2mp");
        }
        svc.matches[0].metadata = Some(Metadata::default());
        mesh.reg.put_ns(svc);
        for id in ["4", "5", "6"] {
            let conn = mesh.first(id).await.unwrap();
            assert_eq!(forwarder_of(&conn), "fwd-p2p");
        }
    }

    #[tokio::test]
    async fn the_default_labels_apply_when_the_service_is_unknown_and_expired_forwarders_are_skipped(
    ) {
        let mesh = Mesh::new(&["fwd-a", "fwd-b"]);
        let mut gone = fwd("fwd-a", &[("p2p", "true")]);
        gone.expiration_time = Some((SystemTime::now() - Duration::from_secs(1)).into());
        mesh.reg.put_nse(gone);
        let mut conn = request("x", "unregistered-svc", &[]).connection.unwrap();
        conn.network_service = "unregistered-svc".into();
        for _ in 0..2 {
            let out = mesh.request(conn.clone()).await.unwrap();
            assert_eq!(forwarder_of(&out), "fwd-b");
        }
    }

    #[tokio::test]
    async fn only_this_nsmgrs_forwarders_are_candidates() {
        let mesh = Mesh::new(&[]);
        mesh.reg.put_nse(nse(
            "remote",
            FORWARDER_SERVICE,
            "inmem://nsmgr-2-remote",
            &[("p2p", "true")],
        ));
        let e = mesh.first("x").await.unwrap_err();
        assert!(
            matches!(&e, Error::NotFound(m) if m.contains("no forwarder for network service svc at inmem://nsmgr-1") && m.contains("p2p=true")),
            "{e}"
        );
        mesh.add("fwd-local", &[("p2p", "true")]);
        assert_eq!(forwarder_of(&mesh.first("y").await.unwrap()), "fwd-local");
    }

    #[tokio::test]
    async fn the_forwarder_in_the_path_stays_across_an_nsmgr_restart() {
        let mesh = Mesh::new(&["fwd-b"]);
        let conn = mesh.first("x").await.unwrap();
        assert_eq!(forwarder_of(&conn), "fwd-b");
        // More forwarders come, and the NSMgr restarts a few times (fresh state each time).
        let mut conn = conn;
        for i in 0..5 {
            mesh.add(&format!("fwd-new-{i}"), &[("p2p", "true")]);
            let restarted = Mesh::chain(&mesh.reg, &mesh.down);
            mesh.down.take();
            let req = NetworkServiceRequest {
                connection: Some(conn.clone()),
                ..Default::default()
            };
            conn = restarted.request(&mut Cx::server(), req).await.unwrap();
            assert_eq!(forwarder_of(&conn), "fwd-b", "restart {i}");
            assert_eq!(mesh.down.take(), [format!("request {} ", url("fwd-b"))]);
        }
    }

    #[tokio::test]
    async fn a_failing_sticky_forwarder_is_tried_first_then_replaced() {
        let mesh = Mesh::new(&["fwd-a", "fwd-b", "fwd-c"]);
        let conn = mesh.first("x").await.unwrap();
        let first = forwarder_of(&conn).to_string();
        mesh.down
            .fail(&url(&first), Error::unavailable("forwarder died"));
        mesh.down.take();
        let conn2 = mesh.request(conn).await.unwrap();
        assert_ne!(forwarder_of(&conn2), first);
        let log = mesh.down.take();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(log[0], format!("request {} ", url(&first)));
        // The replacement is sticky now.
        let second = forwarder_of(&conn2).to_string();
        mesh.request(conn2).await.unwrap();
        assert_eq!(mesh.down.take(), [format!("request {} ", url(&second))]);
    }

    #[tokio::test]
    async fn an_established_connection_keeps_a_forwarder_that_answers_with_an_error() {
        let mesh = Mesh::new(&["fwd-a", "fwd-b", "fwd-c"]);
        let conn = mesh.first("x").await.unwrap();
        let first = forwarder_of(&conn).to_string();
        // The forwarder answers (a status from it), its downstream failed.
        mesh.down.fail(
            &url(&first),
            Error::Remote {
                code: tonic::Code::NotFound,
                message: "endpoint nse is gone".into(),
            },
        );
        mesh.down.take();
        let err = mesh.request(conn.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(
            mesh.down.take(),
            [format!("request {} ", url(&first))],
            "no other forwarder was tried"
        );
        mesh.down.heal(&url(&first));
        let again = mesh.request(conn).await.unwrap();
        assert_eq!(forwarder_of(&again), first, "the forwarder was kept");
    }

    #[tokio::test]
    async fn a_first_request_fails_over_whatever_the_forwarder_answers() {
        let mesh = Mesh::new(&["fwd-a", "fwd-b"]);
        let remote = |m: &str| Error::Remote {
            code: tonic::Code::Unavailable,
            message: m.into(),
        };
        mesh.down.fail(&url("fwd-a"), remote("its endpoint failed"));
        mesh.down.fail(&url("fwd-b"), remote("its endpoint failed"));
        assert!(mesh.first("x").await.is_err());
        assert_eq!(mesh.down.take().len(), 2, "both forwarders were tried");
    }

    #[tokio::test]
    async fn reselect_drops_stickiness() {
        let mesh = Mesh::new(&["fwd-a", "fwd-b"]);
        // Fresh rotation starts with fwd-a; make the first connection land on fwd-b.
        mesh.down.fail(&url("fwd-a"), Error::unavailable("busy"));
        let conn = mesh.first("x").await.unwrap();
        assert_eq!(forwarder_of(&conn), "fwd-b");
        mesh.down.heal(&url("fwd-a"));
        // A refresh stays on fwd-b although the rotation would now start elsewhere.
        let conn = mesh.request(conn).await.unwrap();
        assert_eq!(forwarder_of(&conn), "fwd-b");
        mesh.down.take();

        // Rotation is at 2: a fresh pick starts with fwd-a.
        let mut again = conn.clone();
        again.state = State::ReselectRequested as i32;
        let out = mesh.request(again).await.unwrap();
        assert_eq!(forwarder_of(&out), "fwd-a");
        assert_eq!(
            mesh.down.take(),
            [
                format!("close {} ", url("fwd-b")),
                format!("request {} ", url("fwd-a"))
            ]
        );
    }

    #[tokio::test]
    async fn close_uses_the_remembered_forwarder_without_the_registry() {
        let mesh = Mesh::new(&["fwd-a"]);
        let conn = mesh.first("x").await.unwrap();
        mesh.down.take();
        mesh.reg.set_down(true);
        let finds = mesh.reg.finds();
        mesh.chain.close(&mut Cx::server(), conn).await.unwrap();
        assert_eq!(mesh.down.take(), [format!("close {} ", url("fwd-a"))]);
        assert_eq!(mesh.reg.finds(), finds);
    }

    #[tokio::test]
    async fn a_refresh_keeps_its_forwarder_while_the_registry_is_down() {
        let mesh = Mesh::new(&["fwd-a", "fwd-b"]);
        let conn = mesh.first("x").await.unwrap();
        let used = forwarder_of(&conn).to_string();
        mesh.reg.set_down(true);
        let conn = mesh.request(conn).await.unwrap();
        assert_eq!(forwarder_of(&conn), used);
        // A new connection needs the registry.
        let e = mesh.first("y").await.unwrap_err();
        assert!(
            matches!(&e, Error::Unavailable(m) if m.contains("finding forwarders")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn close_after_a_restart_finds_the_forwarder_from_the_path() {
        let mesh = Mesh::new(&["fwd-a"]);
        let conn = mesh.first("x").await.unwrap();
        mesh.down.take();
        // A bare handler with no begin: no state, only the path.
        let bare = Chain::builder()
            .push(discover_forwarder(
                mesh.reg.registries(),
                NSMGR.parse().unwrap(),
            ))
            .push(mesh.down.clone())
            .build();
        let mut at_nsmgr = conn.clone();
        at_nsmgr.path.as_mut().unwrap().index = 1;
        bare.close(&mut Cx::server(), at_nsmgr.clone())
            .await
            .unwrap();
        assert_eq!(mesh.down.take(), [format!("close {} ", url("fwd-a"))]);
        // Registry dead and nothing remembered: the Close still goes on.
        mesh.reg.set_down(true);
        bare.close(&mut Cx::server(), at_nsmgr).await.unwrap();
        assert_eq!(mesh.down.take(), ["close - "]);
    }

    #[tokio::test]
    async fn a_request_without_a_service_is_an_invalid_argument() {
        let mesh = Mesh::new(&["fwd-a"]);
        let e = mesh
            .request(request("x", "", &[]).connection.unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[tokio::test]
    async fn all_forwarders_failing_returns_the_last_error() {
        let mesh = Mesh::new(&["fwd-a", "fwd-b"]);
        mesh.down.fail(&url("fwd-a"), Error::unavailable("a down"));
        mesh.down.fail(&url("fwd-b"), Error::unavailable("b down"));
        let e = mesh.first("x").await.unwrap_err();
        assert!(
            matches!(&e, Error::Unavailable(m) if m.contains("all 2 forwarders tried failed") && m.contains("b down")),
            "{e}"
        );
    }
}
