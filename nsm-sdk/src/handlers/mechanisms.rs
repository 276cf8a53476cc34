//! Mechanism selection: `mechanisms` (server side), `mechanism_preferences` (client side)
//! and `mechanism_translation` (a forwarder's outgoing side).
//!
//! **[`mechanisms`]** (server side) dispatches a call to the sub-chain registered for the
//! connection's mechanism type. A Request that already carries a mechanism of a
//! supported type (a refresh) keeps it. Otherwise the request's `mechanism_preferences`
//! are tried in order: for each supported type the connection's mechanism is set to
//! that preference and its sub-chain runs, continuing into the rest of the enclosing
//! chain; when that fails with a retryable error the next supported preference is
//! tried. Close dispatches on the connection's mechanism type; a missing or unknown
//! type just passes the Close on.
//! State: none. Failure handled: a mechanism whose sub-chain (or anything after it)
//! fails retryably falls back to the next preference; nothing supported, or nothing
//! offered, is an InvalidArgument that lists what was offered and what is supported.
//!
//! **[`mechanism_preferences`]** (client side) adds the given preferences to a Request
//! that offers none of their type. State: none.
//!
//! **[`mechanism_translation`]** (client side of a forwarder) separates the incoming
//! connection's mechanism (between the caller and this forwarder) from the outgoing one
//! (between this forwarder and the next hop): the outgoing request leaves with the
//! outgoing mechanism this connection used before (none on a first request) and no
//! preferences, for the client-side mechanism handlers after it to fill; the answer
//! comes back with the incoming mechanism restored. Close sends the remembered outgoing
//! mechanism downstream. State: the outgoing mechanism, per connection (needs `begin`;
//! without a connection handle nothing is remembered and Close goes downstream with no
//! mechanism).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Mechanism};
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::debug;

use crate::core::{Cx, Handler, Next};
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Clone, Default)]
#[must_use]
pub struct Mechanisms {
    by_type: BTreeMap<String, Arc<dyn Handler>>,
}

/// A server-side mechanism dispatcher with no mechanism yet; add them with
/// [`Mechanisms::with`].
///
/// ```
/// use nsm_sdk::handlers::{mechanisms, noop_server};
/// use nsm_sdk::wire::types;
/// let m = mechanisms().with(types::NOOP, noop_server());
/// assert_eq!(m.supported(), ["NOOP"]);
/// ```
pub fn mechanisms() -> Mechanisms {
    Mechanisms::default()
}

impl Mechanisms {
    /// Handles mechanism type `ty` (e.g. [`types::KERNEL`](crate::wire::types::KERNEL))
    /// with `handler`, usually a [`Chain`](crate::Chain); what it passes on continues
    /// into the rest of the enclosing chain.
    pub fn with(mut self, ty: impl Into<String>, handler: impl Handler) -> Self {
        self.by_type.insert(ty.into(), Arc::new(handler));
        self
    }

    /// The supported mechanism types, in order.
    pub fn supported(&self) -> Vec<&str> {
        self.by_type.keys().map(String::as_str).collect()
    }

    fn get(&self, m: Option<&Mechanism>) -> Option<&Arc<dyn Handler>> {
        m.and_then(|m| self.by_type.get(&m.r#type))
    }

    fn supported_list(&self) -> String {
        format!("[{}]", self.supported().join(", "))
    }
}

impl fmt::Debug for Mechanisms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mechanisms")
            .field("supported", &self.supported())
            .finish()
    }
}

#[async_trait]
impl Handler for Mechanisms {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        if let Some(h) = self.get(conn.mechanism.as_ref()) {
            return h.request(cx, req, next).await;
        }
        if req.mechanism_preferences.is_empty() {
            let msg = match &conn.mechanism {
                Some(m) => format!(
                    "mechanism {} is not supported and no preferences were offered, supported {}",
                    m.r#type,
                    self.supported_list()
                ),
                None => format!(
                    "no mechanism and no mechanism preferences, supported {}",
                    self.supported_list()
                ),
            };
            return Err(Error::invalid(msg));
        }
        let prefs = req.mechanism_preferences.clone();
        let mut last_err = None;
        // Each preference starts from the values this hop received, not from what a
        // failed attempt left behind (a KERNEL attempt's client side, say).
        let base = cx.ext().clone();
        for pref in &prefs {
            let Some(h) = self.get(Some(pref)) else {
                continue;
            };
            *cx.ext_mut() = base.clone();
            let mut attempt = req.clone();
            attempt
                .connection
                .get_or_insert_with(Default::default)
                .mechanism = Some(pref.clone());
            match h.request(cx, attempt, next.clone()).await {
                Ok(conn) => return Ok(conn),
                Err(e) if e.is_retryable() => {
                    debug!(mechanism = %pref.r#type, error = %e, "mechanism failed, trying the next preference");
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        let offered: Vec<&str> = prefs.iter().map(|m| m.r#type.as_str()).collect();
        Err(Error::invalid(format!(
            "no supported mechanism: offered [{}], supported {}",
            offered.join(", "),
            self.supported_list()
        )))
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        match self.get(conn.mechanism.as_ref()) {
            Some(h) => h.close(cx, conn, next).await,
            None => {
                debug!(
                    mechanism = ?conn.mechanism.as_ref().map(|m| &m.r#type),
                    "close: no handler for the mechanism, passing on"
                );
                next.close(cx, conn).await
            }
        }
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct MechanismPreferences {
    prefs: Vec<Mechanism>,
}

/// A client-side handler that offers `prefs` (each one only when the request offers no
/// mechanism of its type yet).
pub fn mechanism_preferences(prefs: Vec<Mechanism>) -> MechanismPreferences {
    MechanismPreferences { prefs }
}

#[async_trait]
impl Handler for MechanismPreferences {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        for pref in &self.prefs {
            if !req
                .mechanism_preferences
                .iter()
                .any(|m| m.r#type == pref.r#type)
            {
                req.mechanism_preferences.push(pref.clone());
            }
        }
        next.request(cx, req).await
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct MechanismTranslation;

/// A forwarder's client-side handler that keeps the incoming mechanism apart from the
/// outgoing one; see the [module docs](self).
pub fn mechanism_translation() -> MechanismTranslation {
    MechanismTranslation
}

/// The outgoing mechanism of a connection, as the next hop last returned it.
#[derive(Default)]
struct Outgoing(Mutex<Option<Mechanism>>);

impl Outgoing {
    fn get(&self) -> Option<Mechanism> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set(&self, m: Option<Mechanism>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = m;
    }
}

#[async_trait]
impl Handler for MechanismTranslation {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let outgoing = cx.conn().map(|c| c.state::<Outgoing>());
        let conn = req.connection.get_or_insert_with(Default::default);
        let incoming = conn.mechanism.take();
        conn.mechanism = outgoing.as_ref().and_then(|o| o.get());
        req.mechanism_preferences.clear();
        let mut out = next.request(cx, req).await?;
        if let Some(o) = &outgoing {
            o.set(out.mechanism.clone());
        }
        out.mechanism = incoming;
        Ok(out)
    }

    async fn close(&self, cx: &mut Cx, mut conn: Connection, next: Next) -> Result<()> {
        conn.mechanism = cx
            .conn()
            .and_then(|c| c.get_state::<Outgoing>())
            .and_then(|o| o.get());
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Chain, ConnHandle};
    use crate::handlers::{noop_client, noop_server};
    use crate::wire::{cls, params, types};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_util::sync::CancellationToken;

    fn mech(cls: &str, ty: &str) -> Mechanism {
        Mechanism {
            cls: cls.into(),
            r#type: ty.into(),
            ..Default::default()
        }
    }

    fn req(mechanism: Option<Mechanism>, prefs: Vec<Mechanism>) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "c".into(),
                mechanism,
                ..Default::default()
            }),
            mechanism_preferences: prefs,
        }
    }

    /// Records the mechanism type it sees on Request and Close, then answers or fails.
    #[derive(Clone, Default)]
    struct Probe {
        seen: Arc<Mutex<Vec<String>>>,
        fail: Option<Error>,
    }

    impl Probe {
        fn failing(e: Error) -> Self {
            Probe {
                fail: Some(e),
                ..Default::default()
            }
        }
        fn seen(&self) -> Vec<String> {
            self.seen.lock().unwrap().clone()
        }
    }

    fn mech_type(c: &Connection) -> String {
        c.mechanism
            .as_ref()
            .map_or("-".into(), |m| m.r#type.clone())
    }

    #[async_trait]
    impl Handler for Probe {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let conn = req.connection.clone().unwrap_or_default();
            self.seen.lock().unwrap().push(mech_type(&conn));
            if let Some(e) = &self.fail {
                return Err(e.clone());
            }
            next.request(cx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.seen
                .lock()
                .unwrap()
                .push(format!("close:{}", mech_type(&conn)));
            next.close(cx, conn).await
        }
    }

    #[tokio::test]
    async fn falls_back_to_the_next_preference_when_the_first_fails_retryably() {
        let kernel = Probe::failing(Error::unavailable("no veth today"));
        let tail = Probe::default();
        let chain = Chain::builder()
            .push(
                mechanisms()
                    .with(types::KERNEL, kernel.clone())
                    .with(types::NOOP, noop_server()),
            )
            .push(tail.clone())
            .build();
        let conn = chain
            .request(
                &mut Cx::server(),
                req(
                    None,
                    vec![
                        mech(cls::LOCAL, types::VXLAN),
                        mech(cls::LOCAL, types::KERNEL),
                        mech(cls::LOCAL, types::NOOP),
                    ],
                ),
            )
            .await
            .unwrap();
        assert_eq!(mech_type(&conn), types::NOOP);
        assert_eq!(kernel.seen(), [types::KERNEL]);
        // The NOOP sub-chain continued into the rest of the outer chain.
        assert_eq!(tail.seen(), [types::NOOP]);
    }

    #[tokio::test]
    async fn a_retryable_failure_after_the_sub_chain_also_falls_back() {
        #[derive(Default)]
        struct FailOnKernel;
        #[async_trait]
        impl Handler for FailOnKernel {
            async fn request(
                &self,
                cx: &mut Cx,
                req: NetworkServiceRequest,
                next: Next,
            ) -> Result<Connection> {
                if mech_type(req.connection.as_ref().unwrap()) == types::KERNEL {
                    return Err(Error::unavailable("downstream refuses KERNEL"));
                }
                next.request(cx, req).await
            }
        }
        let chain = Chain::builder()
            .push(
                mechanisms()
                    .with(types::KERNEL, Chain::builder().build())
                    .with(types::NOOP, noop_server()),
            )
            .push(FailOnKernel)
            .build();
        let conn = chain
            .request(
                &mut Cx::server(),
                req(
                    None,
                    vec![
                        mech(cls::LOCAL, types::KERNEL),
                        mech(cls::LOCAL, types::NOOP),
                    ],
                ),
            )
            .await
            .unwrap();
        assert_eq!(mech_type(&conn), types::NOOP);
    }

    #[tokio::test]
    async fn a_non_retryable_failure_is_returned_without_trying_others() {
        let noop = Probe::default();
        let m = mechanisms()
            .with(types::KERNEL, Probe::failing(Error::invalid("bad netns")))
            .with(types::NOOP, noop.clone());
        let err = Chain::builder()
            .push(m)
            .build()
            .request(
                &mut Cx::server(),
                req(
                    None,
                    vec![
                        mech(cls::LOCAL, types::KERNEL),
                        mech(cls::LOCAL, types::NOOP),
                    ],
                ),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("bad netns"), "{err}");
        assert!(noop.seen().is_empty());
    }

    #[tokio::test]
    async fn the_last_retryable_error_is_returned_when_every_preference_fails() {
        let m = mechanisms().with(types::KERNEL, Probe::failing(Error::unavailable("down")));
        let err = Chain::builder()
            .push(m)
            .build()
            .request(
                &mut Cx::server(),
                req(None, vec![mech(cls::LOCAL, types::KERNEL)]),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
    }

    #[tokio::test]
    async fn unsupported_mechanisms_are_invalid_and_the_message_lists_both_sides() {
        let chain = Chain::builder()
            .push(
                mechanisms()
                    .with(types::NOOP, noop_server())
                    .with(types::KERNEL, noop_server()),
            )
            .build();
        let err = chain
            .request(
                &mut Cx::server(),
                req(None, vec![mech(cls::REMOTE, types::VXLAN)]),
            )
            .await
            .unwrap_err();
        match err {
            Error::InvalidArgument(m) => assert_eq!(
                m,
                "no supported mechanism: offered [VXLAN], supported [KERNEL, NOOP]"
            ),
            other => panic!("{other:?}"),
        }
        let err = chain
            .request(&mut Cx::server(), req(None, vec![]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("no mechanism and no mechanism preferences")),
            "{err}"
        );
        let err = chain
            .request(
                &mut Cx::server(),
                req(Some(mech(cls::REMOTE, types::WIREGUARD)), vec![]),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("WIREGUARD is not supported")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_refresh_keeps_the_established_mechanism() {
        let kernel = Probe::default();
        let noop = Probe::default();
        let chain = Chain::builder()
            .push(
                mechanisms()
                    .with(types::KERNEL, kernel.clone())
                    .with(types::NOOP, noop.clone()),
            )
            .build();
        let conn = chain
            .request(
                &mut Cx::server(),
                req(
                    Some(mech(cls::LOCAL, types::KERNEL)),
                    vec![mech(cls::LOCAL, types::NOOP)],
                ),
            )
            .await
            .unwrap();
        assert_eq!(mech_type(&conn), types::KERNEL);
        assert_eq!(kernel.seen(), [types::KERNEL]);
        assert!(noop.seen().is_empty());
    }

    #[tokio::test]
    async fn close_dispatches_on_the_mechanism_type() {
        let noop = Probe::default();
        let tail = Probe::default();
        let chain = Chain::builder()
            .push(mechanisms().with(types::NOOP, noop.clone()))
            .push(tail.clone())
            .build();
        let conn = Connection {
            mechanism: Some(mech(cls::LOCAL, types::NOOP)),
            ..Default::default()
        };
        chain.close(&mut Cx::server(), conn).await.unwrap();
        let unknown = Connection {
            mechanism: Some(mech(cls::LOCAL, types::MEMIF)),
            ..Default::default()
        };
        chain.close(&mut Cx::server(), unknown).await.unwrap();
        chain
            .close(&mut Cx::server(), Connection::default())
            .await
            .unwrap();
        assert_eq!(noop.seen(), ["close:NOOP"]);
        assert_eq!(tail.seen(), ["close:NOOP", "close:MEMIF", "close:-"]);
    }

    #[tokio::test]
    async fn client_preferences_are_added_once_per_type() {
        let prefs = Arc::new(Mutex::new(Vec::new()));
        struct Grab(Arc<Mutex<Vec<String>>>);
        #[async_trait]
        impl Handler for Grab {
            async fn request(
                &self,
                cx: &mut Cx,
                req: NetworkServiceRequest,
                next: Next,
            ) -> Result<Connection> {
                *self.0.lock().unwrap() = req
                    .mechanism_preferences
                    .iter()
                    .map(|m| format!("{}/{}", m.cls, m.r#type))
                    .collect();
                next.request(cx, req).await
            }
        }
        let chain = Chain::builder()
            .push(mechanism_preferences(vec![
                mech(cls::LOCAL, types::KERNEL),
                mech(cls::LOCAL, types::NOOP),
            ]))
            .push(noop_client())
            .push(Grab(prefs.clone()))
            .build();
        chain
            .request(
                &mut Cx::client(),
                req(None, vec![mech(cls::REMOTE, types::KERNEL)]),
            )
            .await
            .unwrap();
        assert_eq!(*prefs.lock().unwrap(), ["REMOTE/KERNEL", "LOCAL/NOOP"]);
    }

    /// A next hop that takes the first preference (or keeps the mechanism it is given)
    /// and stamps a VNI on it, counting how often it allocated one.
    /// What the next hop saw: the mechanism and how many preferences.
    type Seen = Arc<Mutex<Vec<(Option<Mechanism>, usize)>>>;

    #[derive(Clone, Default)]
    struct FakeRemote {
        allocations: Arc<AtomicUsize>,
        seen: Seen,
        closed: Arc<Mutex<Vec<Option<Mechanism>>>>,
    }

    #[async_trait]
    impl Handler for FakeRemote {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> Result<Connection> {
            let mut conn = req.connection.unwrap_or_default();
            self.seen
                .lock()
                .unwrap()
                .push((conn.mechanism.clone(), req.mechanism_preferences.len()));
            if conn.mechanism.is_none() {
                let mut m = req
                    .mechanism_preferences
                    .first()
                    .cloned()
                    .ok_or_else(|| Error::invalid("no preference"))?;
                let n = self.allocations.fetch_add(1, Ordering::SeqCst) + 1;
                m.parameters.insert(params::VNI.into(), n.to_string());
                conn.mechanism = Some(m);
            }
            Ok(conn)
        }
        async fn close(&self, _cx: &mut Cx, conn: Connection, _next: Next) -> Result<()> {
            self.closed.lock().unwrap().push(conn.mechanism);
            Ok(())
        }
    }

    #[tokio::test]
    async fn translation_keeps_incoming_and_outgoing_mechanisms_apart() {
        let remote = FakeRemote::default();
        let chain = Chain::builder()
            .push(mechanism_translation())
            .push(mechanism_preferences(vec![mech(cls::REMOTE, types::VXLAN)]))
            .push(remote.clone())
            .build();
        let mut cx = Cx::client();
        let root = CancellationToken::new();
        cx.set_conn(Some(ConnHandle::new(
            "c",
            &root,
            std::sync::Weak::<crate::core::conn::NoSink>::new(),
        )));
        let mut incoming = mech(cls::LOCAL, types::KERNEL);
        incoming
            .parameters
            .insert(params::NAME.into(), "nsm-1".into());

        let first = req(
            Some(incoming.clone()),
            vec![mech(cls::LOCAL, types::KERNEL)],
        );
        let conn = chain.request(&mut cx, first).await.unwrap();
        assert_eq!(conn.mechanism.as_ref(), Some(&incoming));
        {
            let seen = remote.seen.lock().unwrap();
            // Outgoing: no mechanism, only the client-side handler's preference.
            assert_eq!(seen[0], (None, 1));
        }

        // A refresh goes out with the outgoing mechanism established before.
        let conn = chain
            .request(&mut cx, req(Some(incoming.clone()), vec![]))
            .await
            .unwrap();
        assert_eq!(conn.mechanism.as_ref(), Some(&incoming));
        assert_eq!(remote.allocations.load(Ordering::SeqCst), 1);
        let out = remote.seen.lock().unwrap()[1].0.clone().unwrap();
        assert_eq!(out.r#type, types::VXLAN);
        assert_eq!(out.parameters[params::VNI], "1");

        // Close tears down the outgoing mechanism, not the incoming one.
        chain.close(&mut cx, conn).await.unwrap();
        let closed = remote.closed.lock().unwrap()[0].clone().unwrap();
        assert_eq!(closed.r#type, types::VXLAN);
        assert_eq!(closed.parameters[params::VNI], "1");
    }
}
