//! `authorized`: a MonitorConnection source that shows each subscriber only the
//! connections whose path holds its identity.
//!
//! What it does: wraps a [`MonitorSource`] (a hop's [`Monitor::source`](super::Monitor::source))
//! and, per event, keeps the connections for which [`MONITOR`](crate::security::policy::MONITOR)
//! (`service_connection`: a segment's token has `sub` = the subscriber's SPIFFE ID)
//! holds, with [`PolicySet::check_monitor`]. The INITIAL_STATE_TRANSFER is always sent (possibly
//! empty); an UPDATE or DELETE left with no connection is not. The subscriber is the
//! identity the transport verified ([`MonitorSource::subscribe_as`]); a subscriber
//! without one sees nothing, and so does [`MonitorSource::subscribe`] (fail closed).
//! Serve it only when policies are configured: without them a hop serves its monitor
//! unfiltered (insecure mode).
//!
//! State: the wrapped source and the compiled policies, shared; nothing per subscriber
//! beyond its SPIFFE ID in its stream.
//!
//! Failure handled: a peer reading every connection of a hop (ids, addresses, paths of
//! other identities); a connection whose path does not decode is hidden.

use std::fmt;
use std::sync::Arc;

use futures::future;
use futures::stream::{BoxStream, StreamExt};
use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector,
};

use crate::core::MonitorSource;
use crate::security::{PeerIdentity, PolicySet, SpiffeId};
use crate::Result;

/// See the [module docs](self).
#[derive(Clone)]
pub struct Authorized {
    inner: Arc<dyn MonitorSource>,
    policies: Arc<PolicySet>,
}

impl fmt::Debug for Authorized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorized").finish_non_exhaustive()
    }
}

/// `source`, showing each subscriber only its own connections under `policies`.
pub fn authorized(source: Arc<dyn MonitorSource>, policies: Arc<PolicySet>) -> Authorized {
    Authorized {
        inner: source,
        policies,
    }
}

fn visible(policies: &PolicySet, conn: &Connection, subscriber: &SpiffeId) -> bool {
    conn.path
        .as_ref()
        .is_some_and(|path| policies.check_monitor(path, subscriber).is_ok())
}

impl MonitorSource for Authorized {
    fn subscribe(
        &self,
        selector: MonitorScopeSelector,
    ) -> BoxStream<'static, Result<ConnectionEvent>> {
        self.subscribe_as(selector, None)
    }

    fn subscribe_as(
        &self,
        selector: MonitorScopeSelector,
        subscriber: Option<&PeerIdentity>,
    ) -> BoxStream<'static, Result<ConnectionEvent>> {
        let subscriber = subscriber.map(|p| p.id.clone());
        let policies = self.policies.clone();
        self.inner
            .subscribe(selector)
            .filter_map(move |event| {
                future::ready(match event {
                    Ok(mut event) => {
                        event.connections.retain(|_, conn| {
                            subscriber
                                .as_ref()
                                .is_some_and(|id| visible(&policies, conn, id))
                        });
                        let initial =
                            event.r#type == ConnectionEventType::InitialStateTransfer as i32;
                        (initial || !event.connections.is_empty()).then_some(Ok(event))
                    }
                    Err(e) => Some(Err(e)),
                })
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nsm_proto::connection::{Path, PathSegment};

    use super::*;
    use crate::handlers::authorize::tests::{peer_id, policies, token, Ids};
    use crate::handlers::monitor;
    use crate::security::dev_ca::IssuedSvid;

    /// A connection at the endpoint whose path `from` signed (for `to`).
    fn conn(id: &str, from: &IssuedSvid, to: &IssuedSvid) -> Connection {
        Connection {
            id: id.into(),
            path: Some(Path {
                index: 1,
                path_segments: vec![
                    PathSegment {
                        name: "client".into(),
                        id: format!("{id}-client"),
                        token: token(from, to).token,
                        ..Default::default()
                    },
                    PathSegment {
                        name: "nse".into(),
                        id: id.into(),
                        token: token(to, from).token,
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        }
    }

    async fn next(stream: &mut BoxStream<'static, Result<ConnectionEvent>>) -> ConnectionEvent {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event")
            .expect("a stream")
            .unwrap()
    }

    fn ids(event: &ConnectionEvent) -> Vec<&str> {
        let mut ids: Vec<&str> = event.connections.keys().map(String::as_str).collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn a_subscriber_sees_only_connections_whose_path_holds_its_identity() {
        let ids_ = Ids::new();
        let (nsc, evil, nse) = (ids_.issue("nsc"), ids_.issue("evil"), ids_.issue("nse"));
        let hop = monitor();
        hop.publish(ConnectionEventType::Update, conn("victim", &nsc, &nse));
        hop.publish(ConnectionEventType::Update, conn("own", &evil, &nse));
        let source = authorized(hop.source(), policies());

        let mut evils = source.subscribe_as(MonitorScopeSelector::default(), Some(&peer_id(&evil)));
        assert_eq!(ids(&next(&mut evils).await), vec!["own"]);
        let mut nscs = source.subscribe_as(MonitorScopeSelector::default(), Some(&peer_id(&nsc)));
        assert_eq!(ids(&next(&mut nscs).await), vec!["victim"]);
        // The endpoint signed both paths: it sees both.
        let mut own = source.subscribe_as(MonitorScopeSelector::default(), Some(&peer_id(&nse)));
        assert_eq!(ids(&next(&mut own).await), vec!["own", "victim"]);

        // Later events: the victim's update reaches the victim only.
        hop.publish(ConnectionEventType::Delete, conn("victim", &nsc, &nse));
        hop.publish(ConnectionEventType::Update, conn("own", &evil, &nse));
        let event = next(&mut evils).await;
        assert_eq!(
            (event.r#type, ids(&event)),
            (ConnectionEventType::Update as i32, vec!["own"])
        );
        let event = next(&mut nscs).await;
        assert_eq!(
            (event.r#type, ids(&event)),
            (ConnectionEventType::Delete as i32, vec!["victim"])
        );
    }

    #[tokio::test]
    async fn a_subscriber_without_an_identity_sees_an_empty_table() {
        let ids_ = Ids::new();
        let (nsc, nse) = (ids_.issue("nsc"), ids_.issue("nse"));
        let hop = monitor();
        hop.publish(ConnectionEventType::Update, conn("c", &nsc, &nse));
        let source = authorized(hop.source(), policies());
        for mut anonymous in [
            source.subscribe(MonitorScopeSelector::default()),
            source.subscribe_as(MonitorScopeSelector::default(), None),
        ] {
            let initial = next(&mut anonymous).await;
            assert_eq!(
                initial.r#type,
                ConnectionEventType::InitialStateTransfer as i32
            );
            assert!(initial.connections.is_empty());
        }
        // The hop's own source, as served without policies, shows everything.
        let mut all = hop
            .source()
            .subscribe_as(MonitorScopeSelector::default(), None);
        assert_eq!(ids(&next(&mut all).await), vec!["c"]);
    }
}
