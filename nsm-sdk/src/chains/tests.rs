//! The insertion points of the chains' options: a handler inserted at a place sees the
//! request as it is at that place.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Path, PathSegment};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use super::registry_server::registry_server;
use super::*;
use crate::handlers::noop_mechanism;
use crate::transport::{serve, ClientUrl, Server, Url};
use crate::{Cx, Error, Handler, Next, Result};

/// What a probe saw of one Request.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// `begin` ran: the connection has a handle.
    conn: bool,
    /// This hop's path segment has its token (`update_token` ran).
    own_token: bool,
    /// Mechanism preferences in the request.
    preferences: usize,
    /// The URL `connect` will call.
    client_url: Option<Url>,
}

/// Records what it sees; the last probe of a test stops the request there (so nothing
/// needs to answer behind it).
#[derive(Clone, Default)]
struct Probe {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: bool,
}

impl Probe {
    fn stopping() -> Probe {
        Probe {
            stop: true,
            ..Probe::default()
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl Handler for Probe {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let own_token = req
            .connection
            .as_ref()
            .and_then(|c| c.path.as_ref())
            .and_then(|p| p.path_segments.get(p.index as usize))
            .is_some_and(|s| !s.token.is_empty());
        self.seen.lock().unwrap().push(Seen {
            conn: cx.conn().is_some(),
            own_token,
            preferences: req.mechanism_preferences.len(),
            client_url: cx.ext().get::<ClientUrl>().map(|u| u.0.clone()),
        });
        if self.stop {
            return Err(Error::PermissionDenied("stopped by the probe".into()));
        }
        next.request(cx, req).await
    }
}

/// A request as it comes from a client's hop.
fn incoming(service: &str) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            id: "conn-1".into(),
            network_service: service.into(),
            path: Some(Path {
                index: 0,
                path_segments: vec![PathSegment {
                    name: "nsc".into(),
                    id: "conn-1".into(),
                    token: "nsc-token".into(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        mechanism_preferences: vec![noop_mechanism()],
    }
}

fn inmem(prefix: &str) -> Url {
    Url::Memory(format!("{prefix}-{}", uuid::Uuid::new_v4()))
}

fn server_cx() -> Cx {
    Cx::server().with_timeout(Duration::from_secs(5))
}

/// A registry served at a fresh `inmem://` URL.
async fn served_registry() -> (Url, Server, super::RegistryServer) {
    let registry = registry_server(Duration::from_secs(60));
    let url = inmem("registry");
    let server = serve(&url, registry.services()).await.unwrap();
    (url, server, registry)
}

#[tokio::test]
async fn endpoint_after_begin_runs_before_update_token_and_handlers_after_monitor() {
    let (first, last) = (Probe::default(), Probe::stopping());
    let nse = endpoint(
        "nse",
        EndpointOptions::new()
            .after_begin(first.clone())
            .handler(last.clone()),
    );
    let e = nse
        .chain()
        .request(&mut server_cx(), incoming("svc"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    let (first, last) = (first.seen(), last.seen());
    assert_eq!(first.len(), 1);
    assert!(first[0].conn && !first[0].own_token, "{first:?}");
    assert_eq!(last.len(), 1);
    assert!(last[0].conn && last[0].own_token, "{last:?}");
}

#[tokio::test]
async fn client_before_connect_sees_the_request_as_sent() {
    let (first, mid, last) = (Probe::default(), Probe::default(), Probe::stopping());
    let nsc = client(
        ClientOptions::new("nsc", inmem("nowhere"))
            .retry(None)
            .after_begin(first.clone())
            .handler(mid.clone())
            .before_connect(last.clone()),
    );
    let req = NetworkServiceRequest {
        connection: Some(Connection {
            network_service: "svc".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    nsc.request(&mut Cx::client().with_timeout(Duration::from_secs(5)), req)
        .await
        .unwrap_err();
    let (first, mid, last) = (first.seen(), mid.seen(), last.seen());
    assert_eq!((first.len(), mid.len(), last.len()), (1, 1, 1));
    assert!(first[0].conn && !first[0].own_token && first[0].preferences == 0);
    assert!(!mid[0].own_token && mid[0].preferences == 0, "{mid:?}");
    assert!(last[0].own_token, "{last:?}");
    assert_eq!(last[0].preferences, 1, "{last:?}");
}

#[tokio::test]
async fn nsmgr_before_connect_sees_the_forwarder_it_picked() {
    let (registry_url, registry, _store) = served_registry().await;
    let (first, mid, last) = (Probe::default(), Probe::default(), Probe::stopping());
    let mgr_url = inmem("nsmgr");
    let mgr = nsmgr(
        NsmgrOptions::new("nsmgr", mgr_url.clone(), registry_url)
            .after_begin(first.clone())
            .handler(mid.clone())
            .before_connect(last.clone()),
    );
    let fwd_url = inmem("fwd");
    let fwd = forwarder(ForwarderOptions::new("fwd", mgr_url));
    mgr.registries()
        .nse
        .register(&mut Cx::client(), fwd.registration(&fwd_url))
        .await
        .unwrap();

    mgr.chain()
        .request(&mut server_cx(), incoming("svc"))
        .await
        .unwrap_err();
    let (first, mid, last) = (first.seen(), mid.seen(), last.seen());
    assert_eq!((first.len(), mid.len()), (1, 1));
    assert!(first[0].conn && !first[0].own_token && first[0].client_url.is_none());
    assert!(mid[0].own_token && mid[0].client_url.is_none(), "{mid:?}");
    assert!(!last.is_empty());
    assert_eq!(last[0].client_url.as_ref(), Some(&fwd_url), "{last:?}");
    registry.kill();
}

#[tokio::test]
async fn forwarder_before_connect_sees_the_endpoint_it_picked() {
    // The forwarder's manager is, for this test, the registry itself.
    let (registry_url, registry, store) = served_registry().await;
    let nse_url = inmem("nse");
    let regs = store.registries();
    regs.ns
        .register(
            &mut Cx::client(),
            NetworkService {
                name: "svc".into(),
                payload: crate::wire::payload::IP.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    regs.nse
        .register(
            &mut Cx::client(),
            NetworkServiceEndpoint {
                name: "nse".into(),
                network_service_names: vec!["svc".into()],
                url: nse_url.to_string(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (first, last) = (Probe::default(), Probe::stopping());
    let fwd = forwarder(
        ForwarderOptions::new("fwd", registry_url)
            .after_begin(first.clone())
            .before_connect(last.clone()),
    );
    fwd.chain()
        .request(&mut server_cx(), incoming("svc"))
        .await
        .unwrap_err();
    let (first, last) = (first.seen(), last.seen());
    assert_eq!(first.len(), 1);
    assert!(first[0].conn && first[0].client_url.is_none(), "{first:?}");
    assert!(!last.is_empty());
    assert!(last[0].own_token, "{last:?}");
    assert_eq!(last[0].client_url.as_ref(), Some(&nse_url), "{last:?}");
    registry.kill();
}

#[tokio::test]
async fn with_policies_an_endpoint_authorizes_its_callers_and_filters_its_monitor() {
    use crate::core::Peer;
    use crate::handlers::authorize::tests::{identity, peer_id, policies, token, Ids};
    use crate::token::jwt_token;
    use futures::StreamExt;
    use nsm_proto::connection::MonitorScopeSelector;

    let ids = Ids::new();
    let (nsc, me) = (ids.issue("nsc"), ids.issue("nse"));
    let open = endpoint("nse", EndpointOptions::new());
    // Policies need signed tokens of the hop's own too.
    let signed = Arc::new(jwt_token(identity(&me).fixed(), Duration::from_secs(600)));
    let guarded = endpoint(
        "nse",
        EndpointOptions::new().tokens(signed).policies(policies()),
    );
    let caller = |token: &str| {
        server_cx().with_peer(Peer {
            identity: Some(peer_id(&nsc)),
            token: Some(token.into()),
            ..Default::default()
        })
    };
    // Today's unsigned tokens: served without policies, refused with them.
    open.chain()
        .request(&mut caller("nsm-rs"), incoming("svc"))
        .await
        .unwrap();
    let e = guarded
        .chain()
        .request(&mut caller("nsm-rs"), incoming("svc"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    guarded
        .chain()
        .request(&mut caller(&token(&nsc, &me).token), incoming("svc"))
        .await
        .unwrap();

    // Served, its MonitorConnection shows the connection only to a subscriber whose
    // identity is in the path: over a link without TLS, to nobody.
    for (nse, expected) in [(&open, 1), (&guarded, 0)] {
        let url = inmem("authorized-monitor");
        let server = serve(&url, nse.services()).await.unwrap();
        let channels = crate::transport::Channels::new();
        let mut events =
            crate::transport::monitor_connections(&channels, &url, MonitorScopeSelector::default())
                .await
                .unwrap();
        let initial = events.next().await.unwrap().unwrap();
        assert_eq!(initial.connections.len(), expected);
        drop(events);
        server.shutdown().await;
    }
    let mine = super::monitor_source(guarded.monitor(), Some(&policies()))
        .subscribe_as(MonitorScopeSelector::default(), Some(&peer_id(&nsc)))
        .next()
        .await;
    assert_eq!(mine.unwrap().unwrap().connections.len(), 1);
}
