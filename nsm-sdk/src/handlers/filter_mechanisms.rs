//! `filter_mechanisms`: a manager passes on only the mechanism preferences its local
//! forwarder should build.
//!
//! What it does: a Request that offers any `REMOTE`-class preference (a tunnel such as
//! `VXLAN`) comes from another node's forwarder, which offers its tunnel alongside the
//! local mechanisms it would use for an endpoint on its own node; the manager keeps only
//! the `REMOTE` preferences, so its forwarder builds the tunnel's end here and not a
//! local interface. Any other Request comes from a pod of this node: it keeps only the
//! `LOCAL` preferences (a preference with no class counts as `LOCAL`). The connection's
//! mechanism (set on a refresh) is never touched.
//!
//! State: none.
//!
//! Failure handled: none of its own; a Request left with no preference fails later in
//! the forwarder's `mechanisms` with the usual InvalidArgument listing what it supports.

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Mechanism};
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::debug;

use crate::core::{Cx, Handler, Next};
use crate::wire::cls;
use crate::Result;

/// See the [module docs](self).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct FilterMechanisms;

/// The `filter_mechanisms` handler of a manager; see the [module docs](self).
pub fn filter_mechanisms() -> FilterMechanisms {
    FilterMechanisms
}

fn is_remote(m: &Mechanism) -> bool {
    m.cls == cls::REMOTE
}

fn is_local(m: &Mechanism) -> bool {
    m.cls == cls::LOCAL || m.cls.is_empty()
}

#[async_trait]
impl Handler for FilterMechanisms {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let before = req.mechanism_preferences.len();
        if req.mechanism_preferences.iter().any(is_remote) {
            req.mechanism_preferences.retain(is_remote);
        } else {
            req.mechanism_preferences.retain(is_local);
        }
        if req.mechanism_preferences.len() != before {
            debug!(
                kept = req.mechanism_preferences.len(),
                dropped = before - req.mechanism_preferences.len(),
                "mechanism preferences filtered"
            );
        }
        next.request(cx, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::wire::{params, types};
    use std::sync::{Arc, Mutex};

    fn mech(class: &str, ty: &str) -> Mechanism {
        Mechanism {
            cls: class.into(),
            r#type: ty.into(),
            ..Default::default()
        }
    }

    /// Records the preferences and the mechanism a request arrives with.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Option<NetworkServiceRequest>>>);

    #[async_trait]
    impl Handler for Seen {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> Result<Connection> {
            *self.0.lock().unwrap() = Some(req.clone());
            Ok(req.connection.unwrap_or_default())
        }
    }

    async fn through(
        mechanism: Option<Mechanism>,
        prefs: Vec<Mechanism>,
    ) -> (Option<Mechanism>, Vec<String>) {
        let seen = Seen::default();
        let chain = Chain::builder()
            .push(filter_mechanisms())
            .push(seen.clone())
            .build();
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                id: "c".into(),
                mechanism,
                ..Default::default()
            }),
            mechanism_preferences: prefs,
        };
        chain.request(&mut Cx::server(), req).await.unwrap();
        let got = seen.0.lock().unwrap().take().unwrap();
        (
            got.connection.unwrap().mechanism,
            got.mechanism_preferences
                .iter()
                .map(|m| format!("{}/{}", m.cls, m.r#type))
                .collect(),
        )
    }

    #[tokio::test]
    async fn a_request_from_another_nodes_forwarder_keeps_only_its_tunnels() {
        let mut vxlan = mech(cls::REMOTE, types::VXLAN);
        vxlan
            .parameters
            .insert(params::SRC_IP.into(), "192.0.2.1".into());
        let (_, kept) = through(
            None,
            vec![
                mech(cls::LOCAL, types::KERNEL),
                vxlan.clone(),
                mech(cls::LOCAL, types::NOOP),
                mech(cls::REMOTE, types::WIREGUARD),
            ],
        )
        .await;
        assert_eq!(kept, ["REMOTE/VXLAN", "REMOTE/WIREGUARD"]);
    }

    #[tokio::test]
    async fn a_request_from_a_local_pod_keeps_only_local_preferences() {
        let (_, kept) = through(
            None,
            vec![
                mech(cls::LOCAL, types::KERNEL),
                mech("", types::NOOP),
                mech("SOMETHING", types::MEMIF),
            ],
        )
        .await;
        assert_eq!(kept, ["LOCAL/KERNEL", "/NOOP"]);
    }

    #[tokio::test]
    async fn the_connections_mechanism_is_left_alone() {
        let established = mech(cls::REMOTE, types::VXLAN);
        let (m, kept) = through(
            Some(established.clone()),
            vec![mech(cls::LOCAL, types::KERNEL)],
        )
        .await;
        assert_eq!(m, Some(established));
        assert_eq!(kept, ["LOCAL/KERNEL"]);
        let (m, kept) = through(Some(mech(cls::LOCAL, types::KERNEL)), vec![]).await;
        assert_eq!(m.unwrap().r#type, types::KERNEL);
        assert!(kept.is_empty());
    }
}
