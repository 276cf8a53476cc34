//! The forwarder side of KERNEL: one veth pair per local connection, made once both
//! pods are known.
//!
//! A forwarder chain runs its server-side mechanisms first, then picks the endpoint
//! and calls it through its client chain; the endpoint says where its end goes only in
//! its answer. So the work is split in two handlers:
//!
//! - [`kernel_forwarder_server`] (the client's side, under the forwarder's server
//!   [`mechanisms()`]): checks the incoming KERNEL mechanism — `name`, `inodeURL`,
//!   optional `MTU` — opens the client's namespace and hands both to the client chain
//!   through the call's [`Cx::ext`] (which `connect` copies into it).
//! - [`kernel_forwarder_client`] (in the client chain towards the endpoint, after
//!   `mechanism_translation`): offers an empty KERNEL preference on a first request;
//!   when the endpoint has answered, reads the endpoint's `name` and `inodeURL` from the
//!   returned mechanism, checks that the endpoint may name that namespace
//!   ([`check_answer`]: its own, or one it could enter, else PermissionDenied) and creates the pair with [`kernel_side_up`], the client's end
//!   programmed from [`end_plan`] for [`PodSide::Client`] (with the context's
//!   policy routes: a rule and a routing table each in the client's pod, as Go's
//!   `iprule` on the NSC side), the endpoint's for [`PodSide::Endpoint`] (an end whose
//!   mechanism says [`BRIDGED`](super::BRIDGED) gets name and MTU only), each end marked with [`veth_alias`] of the connection's
//!   first path segment id (so a forwarder that replaces a dead one recognises the
//!   pair it left behind: on a re-request — the caller's connection carries its
//!   selected mechanism, or a path beyond this hop — for which this forwarder holds no pair, the pair is adopted
//!   in place with [`kernel_side_adopt`] when both ends are where the plans put them,
//!   and replaced otherwise, see [`crate::veth`]). The MTU is
//!   `context.MTU`, else the client mechanism's `MTU` parameter, else
//!   [`DEFAULT_MTU`]; it is written back into the returned `context.MTU` so both
//!   sides learn it. It also opens `ping_group_range` in both pods
//!   ([`allow_ping`]), so a client may run the
//!   [ping liveness check](crate::liveness) without privileges. A refresh brings both ends to the new plans
//!   with [`Created::refresh`] (an unchanged context touches nothing); when either
//!   end's namespace or name changed, or the pair died with a pod, the old pair is
//!   deleted and a new one made. Close deletes the policy rules and the pair with
//!   [`down`], then passes on.
//!
//! An answer whose mechanism is of the `REMOTE` class (a tunnel to another node's
//! forwarder) is passed back untouched: the tunnel's own client-side handler, after this
//! one in the chain, makes the client's end from [`KernelClientEnd`].
//!
//! State: per connection of the client chain (needs `begin` there), the [`Created`]
//! pair and which namespaces and names it joins; per call, whether the caller
//! re-requests (read on the server side, before the mechanism is selected).
//!
//! Failure handled: a bad name, URL or MTU is InvalidArgument and a missing namespace
//! NotFound, found before the endpoint is called when they are the client's; a bad
//! policy route in the answered context (port, protocol, prefix) is InvalidArgument
//! before anything is made; [`kernel_side_up`] removes a half-made pair itself. A pair left in the kernel by a
//! dead forwarder for the same connection is replaced; an interface name held by any
//! other link is InvalidArgument naming that link's alias. When a first request fails
//! after the endpoint answered, the endpoint's connection is closed again, so nothing
//! is left anywhere. A failed refresh keeps the pair as it was.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nsm_sdk::handlers::netns_owner::check_answer;
use nsm_sdk::handlers::select_mechanism;
use nsm_sdk::handlers::{mechanisms, Mechanisms};
use nsm_sdk::proto::connection::{Connection, Mechanism};
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::wire::{cls, params, types};
use nsm_sdk::{async_trait, Cx, Handler, Next, Result};
use tracing::{debug, info, warn};

use super::{end_plan, is_bridged, is_kernel, kernel_mechanism};
use crate::error::Error as KernelError;
use crate::liveness::allow_ping;
use crate::{
    down, kernel_side_adopt, kernel_side_up, veth_alias, Created, IfName, Mtu, NetNs, Plan, PodSide,
};

/// The MTU of a connection whose context and client mechanism give none.
pub const DEFAULT_MTU: u32 = 1500;

/// The forwarder's KERNEL mechanism: the server-side dispatcher (what the forwarder
/// makes for its caller) and the client-side handlers (what it asks of the endpoint),
/// ready for `ForwarderOptions::server_mechanisms` and `client_mechanisms`.
pub fn kernel_forwarder_mechanisms() -> (Mechanisms, Vec<Arc<dyn Handler>>) {
    (
        mechanisms().with(types::KERNEL, kernel_forwarder_server()),
        vec![Arc::new(kernel_forwarder_client())],
    )
}

/// The client's side of a KERNEL connection, from the forwarder's server chain to its
/// client chain (a per-call value in [`Cx::ext`]).
#[derive(Clone)]
struct ClientEnd(Arc<ClientEndInner>);

struct ClientEndInner {
    /// The caller re-requests a connection it had (its connection carried a selected
    /// mechanism, or a path beyond this hop).
    rerequest: bool,
    netns: NetNs,
    ifname: IfName,
    mtu: Option<Mtu>,
    bridged: bool,
}

/// The client's side of a KERNEL connection as [`kernel_forwarder_server`] read it, for
/// the client-side handler of another mechanism that ends the connection in the
/// client's pod (a tunnel): present in [`Cx::ext`] exactly when the forwarder's server
/// side is KERNEL.
#[derive(Clone)]
pub struct KernelClientEnd(ClientEnd);

impl KernelClientEnd {
    /// The client's end of this call, if the forwarder's server side is KERNEL.
    pub fn from_cx(cx: &Cx) -> Option<KernelClientEnd> {
        cx.ext().get::<ClientEnd>().cloned().map(KernelClientEnd)
    }
    /// The client's network namespace.
    pub fn netns(&self) -> &NetNs {
        &self.0 .0.netns
    }
    /// The interface name the client asked for.
    pub fn ifname(&self) -> &IfName {
        &self.0 .0.ifname
    }
    /// The MTU the client's mechanism asked for, if any.
    pub fn mtu(&self) -> Option<Mtu> {
        self.0 .0.mtu
    }
    /// Whether the client's end is bridged ([`BRIDGED`](super::BRIDGED)).
    pub fn bridged(&self) -> bool {
        self.0 .0.bridged
    }
}

impl std::fmt::Debug for KernelClientEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelClientEnd")
            .field("netns", self.netns())
            .field("ifname", self.ifname())
            .field("mtu", &self.mtu())
            .field("bridged", &self.bridged())
            .finish()
    }
}

fn param<'a>(m: &'a Mechanism, key: &str) -> Option<&'a str> {
    m.parameters
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

impl ClientEnd {
    fn parse(m: &Mechanism, rerequest: bool) -> Result<ClientEnd> {
        let name = param(m, params::NAME).ok_or_else(|| {
            nsm_sdk::Error::invalid("the client's KERNEL mechanism has no interface name")
        })?;
        let ifname = IfName::new(name)?;
        let url = param(m, params::INODE_URL).ok_or_else(|| {
            nsm_sdk::Error::invalid("the client's KERNEL mechanism has no inodeURL")
        })?;
        let mtu = match param(m, params::MTU) {
            None | Some("0") => None,
            Some(s) => {
                let n = s.parse::<u32>().map_err(|_| {
                    nsm_sdk::Error::invalid(format!("KERNEL mechanism MTU {s:?} is not a number"))
                })?;
                Some(Mtu::new(n)?)
            }
        };
        let netns = open_netns(m, url)?;
        Ok(ClientEnd(Arc::new(ClientEndInner {
            rerequest,
            netns,
            ifname,
            mtu,
            bridged: is_bridged(m),
        })))
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct KernelForwarderServer;

/// The client's side of KERNEL in a forwarder; see the [module docs](self).
pub fn kernel_forwarder_server() -> KernelForwarderServer {
    KernelForwarderServer
}

#[async_trait]
impl Handler for KernelForwarderServer {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        // A connection this client had: it still names its mechanism, or (a reselect
        // clears the mechanism but keeps the path) its path goes beyond this hop.
        let rerequest = req.connection.as_ref().is_some_and(|c| {
            c.mechanism.is_some()
                || c.path
                    .as_ref()
                    .is_some_and(|p| p.path_segments.len() > p.index as usize + 1)
        });
        let end = ClientEnd::parse(
            select_mechanism(&mut req, types::KERNEL, "kernel forwarder server")?,
            rerequest,
        )?;
        debug!(ifname = %end.0.ifname, netns = %end.0.netns, "client side of KERNEL");
        cx.ext_mut().insert(end);
        next.request(cx, req).await
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct KernelForwarderClient {
    default_mtu: Mtu,
}

/// The endpoint's side of KERNEL in a forwarder, which makes the veth pair; see the
/// [module docs](self).
pub fn kernel_forwarder_client() -> KernelForwarderClient {
    KernelForwarderClient {
        default_mtu: Mtu::new(DEFAULT_MTU).unwrap_or_else(|_| unreachable!("1500 is in range")),
    }
}

impl KernelForwarderClient {
    /// The MTU when neither `context.MTU` nor the client's mechanism gives one
    /// (default [`DEFAULT_MTU`]).
    pub fn default_mtu(mut self, mtu: Mtu) -> Self {
        self.default_mtu = mtu;
        self
    }
}

/// Which namespace (device and inode of its nsfs file) and interface name an end is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EndId {
    dev: u64,
    ino: u64,
    ifname: IfName,
}

impl EndId {
    fn of(ns: &NetNs, ifname: &IfName) -> EndId {
        EndId {
            dev: ns.dev(),
            ino: ns.inode(),
            ifname: ifname.clone(),
        }
    }
}

#[derive(Debug)]
struct Pair {
    created: Created,
    ends: (EndId, EndId),
}

/// The pair of one connection; `begin` runs one operation per connection at a time,
/// so taking it out for an operation and putting it back cannot race.
#[derive(Debug, Default)]
struct PairSlot {
    pair: Mutex<Option<Pair>>,
    established: AtomicBool,
}

impl PairSlot {
    fn take(&self) -> Option<Pair> {
        self.pair.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
    fn put(&self, pair: Pair) {
        *self.pair.lock().unwrap_or_else(|p| p.into_inner()) = Some(pair);
    }
}

/// The endpoint's end as its answer names it, and whether it is bridged.
fn endpoint_end(out: &Connection) -> Result<(NetNs, IfName, bool)> {
    let m = out
        .mechanism
        .as_ref()
        .filter(|m| is_kernel(m))
        .ok_or_else(|| {
            nsm_sdk::Error::internal(format!(
                "the endpoint answered with mechanism {:?}, not KERNEL",
                out.mechanism.as_ref().map(|m| m.r#type.as_str())
            ))
        })?;
    let name = param(m, params::NAME).ok_or_else(|| {
        nsm_sdk::Error::internal("the endpoint's KERNEL mechanism has no interface name")
    })?;
    let url = param(m, params::INODE_URL).ok_or_else(|| {
        nsm_sdk::Error::internal("the endpoint's KERNEL mechanism has no inodeURL")
    })?;
    Ok((open_netns(m, url)?, IfName::new(name)?, is_bridged(m)))
}

/// Opens the namespace `url` names; when the mechanism also names its inode
/// (`netnsInode`), the namespace opened must have it. A `/proc/<pid>/ns/net` URL names
/// a process, which may have exited since the mechanism was made and its pid been
/// reused: PermissionDenied then, never an interface in another namespace.
fn open_netns(m: &Mechanism, url: &str) -> Result<NetNs> {
    let netns = NetNs::from_url(url)?;
    let Some(named) = param(m, params::NETNS_INODE) else {
        return Ok(netns);
    };
    let inode = named.parse::<u64>().map_err(|_| {
        nsm_sdk::Error::invalid(format!(
            "KERNEL mechanism parameter {} {named:?} is not an inode number",
            params::NETNS_INODE
        ))
    })?;
    if netns.inode() != inode {
        return Err(nsm_sdk::Error::PermissionDenied(format!(
            "network namespace {url} has inode {}, not {inode} as its mechanism names: \
             the process it named is gone",
            netns.inode()
        )));
    }
    Ok(netns)
}

/// What names the connection in the aliases of its veth ends: the id of the first path
/// segment (the client's own, kept across heals and forwarder restarts), else the
/// connection id.
fn connection_key(conn: &Connection) -> &str {
    conn.path
        .as_ref()
        .and_then(|p| p.path_segments.first())
        .map(|s| s.id.as_str())
        .filter(|id| !id.is_empty())
        .unwrap_or(&conn.id)
}

async fn refresh_both(created: &mut Created, client: Plan, endpoint: Plan) -> crate::Result<()> {
    created.refresh(PodSide::Client, client).await?;
    created.refresh(PodSide::Endpoint, endpoint).await
}

impl KernelForwarderClient {
    /// Makes or refreshes the pair for the answer `out`, and writes the MTU into its
    /// context.
    ///
    /// `rerequest`: the caller re-requests a connection it had (its request carried a
    /// mechanism); when this forwarder has no pair for it (it replaces a dead one), the
    /// pair its predecessor left is adopted rather than replaced.
    async fn pair_up(
        &self,
        end: &ClientEnd,
        out: &mut Connection,
        slot: &PairSlot,
        rerequest: bool,
    ) -> Result<()> {
        let end = &end.0;
        let (nse_ns, nse_ifname, nse_bridged) = endpoint_end(out)?;
        let key = connection_key(out).to_string();
        let ctx = out.context.get_or_insert_with(Default::default);
        let mtu = match ctx.mtu {
            0 => end.mtu.unwrap_or(self.default_mtu),
            n => Mtu::new(n)?,
        };
        ctx.mtu = mtu.get();
        let client_plan = end_plan(ctx, PodSide::Client, end.ifname.as_str(), end.bridged)?
            .with_alias(veth_alias(PodSide::Client, &key));
        let endpoint_plan = end_plan(ctx, PodSide::Endpoint, nse_ifname.as_str(), nse_bridged)?
            .with_alias(veth_alias(PodSide::Endpoint, &key));
        let ends = (
            EndId::of(&end.netns, &end.ifname),
            EndId::of(&nse_ns, &nse_ifname),
        );
        match slot.take() {
            Some(mut pair) if pair.ends == ends => {
                match refresh_both(
                    &mut pair.created,
                    client_plan.clone(),
                    endpoint_plan.clone(),
                )
                .await
                {
                    Ok(()) => {
                        slot.put(pair);
                        return Ok(());
                    }
                    Err(KernelError::LinkNotFound { name, netns }) => {
                        warn!(%name, %netns, "the veth pair is gone, making a new one");
                        if let Err(e) = down(pair.created).await {
                            warn!(error = %e, "deleting what is left of the old pair failed");
                        }
                    }
                    Err(e) => {
                        slot.put(pair);
                        return Err(e.into());
                    }
                }
            }
            Some(pair) => {
                info!(
                    client = %ends.0.ifname, endpoint = %ends.1.ifname,
                    "an end of the connection moved, replacing its veth pair"
                );
                if let Err(e) = down(pair.created).await {
                    warn!(error = %e, "deleting the old veth pair failed");
                }
            }
            None if rerequest => {
                match kernel_side_adopt(
                    &end.netns,
                    &nse_ns,
                    client_plan.clone(),
                    endpoint_plan.clone(),
                )
                .await
                {
                    Ok(Some(created)) => {
                        // The predecessor opened ping_group_range when it made the pair.
                        slot.put(Pair { created, ends });
                        return Ok(());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(error = %e, "adopting the veth pair left by the previous forwarder failed, replacing it")
                    }
                }
            }
            None => {}
        }
        let created = kernel_side_up(&end.netns, &nse_ns, client_plan, endpoint_plan).await?;
        for ns in [&end.netns, &nse_ns] {
            // Only a liveness check needs it; the connection works without.
            if let Err(e) = allow_ping(ns).await {
                warn!(netns = %ns, error = %e, "could not open ping_group_range");
            }
        }
        slot.put(Pair { created, ends });
        Ok(())
    }
}

#[async_trait]
impl Handler for KernelForwarderClient {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let Some(end) = cx.ext().get::<ClientEnd>().cloned() else {
            // Not a KERNEL connection on the client's side: not ours.
            return next.request(cx, req).await;
        };
        let slot = cx.conn().map(|h| h.state::<PairSlot>()).ok_or_else(|| {
            nsm_sdk::Error::internal("kernel forwarder client needs `begin` before it")
        })?;
        let rerequest = end.0.rerequest;
        let conn = req.connection.get_or_insert_with(Default::default);
        if conn.mechanism.is_none() && !req.mechanism_preferences.iter().any(is_kernel) {
            req.mechanism_preferences.push(kernel_mechanism());
        }
        let mut out = next.clone().request(cx, req).await?;
        if out.mechanism.as_ref().is_some_and(|m| m.cls == cls::REMOTE) {
            // A tunnel to another node: its handler, after this one, made the client's
            // end.
            return Ok(out);
        }
        // The namespace the endpoint names must be its own (or one it could enter):
        // checked against who answered before anything is made there.
        let made = match check_answer(cx.peer(), &out) {
            Ok(()) => self.pair_up(&end, &mut out, &slot, rerequest).await,
            Err(e) => Err(e),
        };
        match made {
            Ok(()) => {
                slot.established.store(true, Ordering::SeqCst);
                Ok(out)
            }
            Err(e) => {
                if !slot.established.load(Ordering::SeqCst) {
                    // A failed first request leaves nothing behind: the endpoint's
                    // connection goes too (a failed refresh keeps what works).
                    if let Err(ce) = next.close(cx, out).await {
                        debug!(error = %ce, "closing the endpoint after a failed request failed");
                    }
                }
                Err(e)
            }
        }
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let pair = cx
            .conn()
            .and_then(|h| h.get_state::<PairSlot>())
            .and_then(|s| s.take());
        let deleted = match pair {
            Some(p) => down(p.created).await.map_err(nsm_sdk::Error::from),
            None => Ok(()),
        };
        let rest = next.close(cx, conn).await;
        deleted.and(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mechanism::tests_support::Grab;
    use nsm_sdk::handlers::{begin, connect, mechanism_translation};
    use nsm_sdk::proto::connectioncontext::{ConnectionContext, IpContext, PolicyRoute};
    use nsm_sdk::Chain;
    use std::sync::atomic::AtomicUsize;
    use tonic::Code;

    /// An endpoint that takes the KERNEL preference, fills its side and the context
    /// MTU it is given, and counts Closes.
    #[derive(Clone, Default)]
    struct FakeNse {
        mtu: u32,
        name: Option<&'static str>,
        policies: Vec<PolicyRoute>,
        closes: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Handler for FakeNse {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> Result<Connection> {
            let mut conn = req.connection.unwrap_or_default();
            let mut m = conn
                .mechanism
                .or_else(|| req.mechanism_preferences.first().cloned())
                .unwrap_or_default();
            if let Some(name) = self.name {
                m.parameters.insert(params::NAME.into(), name.into());
            }
            m.parameters
                .insert(params::INODE_URL.into(), "file:///proc/self/ns/net".into());
            conn.mechanism = Some(m);
            conn.context = Some(ConnectionContext {
                mtu: self.mtu,
                ip_context: Some(IpContext {
                    policies: self.policies.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            });
            Ok(conn)
        }
        async fn close(&self, _cx: &mut Cx, _conn: Connection, _next: Next) -> Result<()> {
            self.closes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A forwarder's shape: server mechanisms, then `connect` to a client chain with
    /// `begin`, `mechanism_translation`, the kernel client and `next_hop`.
    fn forwarder(next_hop: impl Handler) -> Chain {
        let (server, client) = kernel_forwarder_mechanisms();
        Chain::builder()
            .push(begin())
            .push(server)
            .push(connect(
                Chain::builder()
                    .push(begin())
                    .push(mechanism_translation())
                    .extend(client)
                    .push(next_hop)
                    .build(),
            ))
            .build()
    }

    fn kernel(params: &[(&str, &str)]) -> Mechanism {
        let mut m = kernel_mechanism();
        for (k, v) in params {
            m.parameters.insert(k.to_string(), v.to_string());
        }
        m
    }

    fn req(pref: Mechanism) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "c".into(),
                network_service: "svc".into(),
                ..Default::default()
            }),
            mechanism_preferences: vec![pref],
        }
    }

    const HERE: &str = "file:///proc/self/ns/net";

    #[test]
    fn the_pair_is_named_after_the_first_path_segment_else_the_connection_id() {
        use nsm_sdk::proto::connection::{Path, PathSegment};
        let segment = |id: &str| PathSegment {
            id: id.into(),
            ..Default::default()
        };
        let mut conn = Connection {
            id: "fwd-side".into(),
            path: Some(Path {
                index: 2,
                path_segments: vec![segment("nsc-id"), segment("mgr-id"), segment("fwd-side")],
            }),
            ..Default::default()
        };
        assert_eq!(connection_key(&conn), "nsc-id");
        conn.path.as_mut().unwrap().path_segments[0].id.clear();
        assert_eq!(connection_key(&conn), "fwd-side");
        conn.path = None;
        assert_eq!(connection_key(&conn), "fwd-side");
    }

    #[tokio::test]
    async fn a_bad_client_mechanism_is_refused_before_the_endpoint_is_called() {
        let cases: [(&[(&str, &str)], Code); 8] = [
            // A namespace that is not the one the mechanism names by its inode (the
            // process its URL named is gone, its pid reused).
            (
                &[
                    (params::NAME, "nsm-1"),
                    (params::INODE_URL, HERE),
                    (params::NETNS_INODE, "1"),
                ],
                Code::PermissionDenied,
            ),
            (
                &[
                    (params::NAME, "nsm-1"),
                    (params::INODE_URL, HERE),
                    (params::NETNS_INODE, "x"),
                ],
                Code::InvalidArgument,
            ),
            (&[(params::INODE_URL, HERE)], Code::InvalidArgument),
            (&[(params::NAME, "nsm-1")], Code::InvalidArgument),
            (
                &[
                    (params::NAME, "sixteen-bytes-xx"),
                    (params::INODE_URL, HERE),
                ],
                Code::InvalidArgument,
            ),
            (
                &[(params::NAME, "nsm-1"), (params::INODE_URL, "inode://4/5")],
                Code::InvalidArgument,
            ),
            (
                &[
                    (params::NAME, "nsm-1"),
                    (params::INODE_URL, HERE),
                    (params::MTU, "70000"),
                ],
                Code::InvalidArgument,
            ),
            (
                &[
                    (params::NAME, "nsm-1"),
                    (params::INODE_URL, "file:///proc/999999999/ns/net"),
                ],
                Code::NotFound,
            ),
        ];
        for (params, code) in cases {
            let nse = Grab::default();
            let err = forwarder(nse.clone())
                .request(&mut Cx::server(), req(kernel(params)))
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{params:?}: {err}");
            assert!(nse.all().is_empty(), "{params:?}: the endpoint was called");
        }
    }

    #[tokio::test]
    async fn the_endpoint_is_offered_an_empty_kernel_mechanism() {
        let nse = Grab::failing_first(1);
        let err = forwarder(nse.clone())
            .request(
                &mut Cx::server(),
                req(kernel(&[
                    (params::NAME, "nsm-1"),
                    (params::INODE_URL, HERE),
                ])),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, nsm_sdk::Error::Unavailable(_)), "{err}");
        let seen = nse.last();
        assert_eq!(seen.mechanism, None);
        assert_eq!(seen.prefs, [kernel_mechanism()]);
    }

    #[tokio::test]
    async fn a_bad_answer_from_the_endpoint_fails_the_request_and_closes_the_endpoint() {
        let client = kernel(&[(params::NAME, "nsm-1"), (params::INODE_URL, HERE)]);
        for (nse, code) in [
            // The context's MTU is out of range.
            (
                FakeNse {
                    mtu: 70_000,
                    name: Some("nse-1"),
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
            // The endpoint did not say which interface is its.
            (FakeNse::default(), Code::Internal),
            // A policy route with a port the kernel would refuse.
            (
                FakeNse {
                    name: Some("nse-1"),
                    policies: vec![PolicyRoute {
                        from: "172.16.1.2/32".into(),
                        proto: "tcp".into(),
                        dst_port: "65535".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
            // ... or an unknown protocol.
            (
                FakeNse {
                    name: Some("nse-1"),
                    policies: vec![PolicyRoute {
                        proto: "tcpx".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
        ] {
            let err = forwarder(nse.clone())
                .request(&mut Cx::server(), req(client.clone()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{err}");
            assert_eq!(nse.closes.load(Ordering::SeqCst), 1, "{err}");
        }
    }

    #[tokio::test]
    async fn a_tunnel_answer_is_left_to_the_tunnels_handler() {
        /// Answers with a REMOTE mechanism, as another node's forwarder does.
        #[derive(Clone, Default)]
        struct Remote(Arc<AtomicUsize>);
        #[async_trait]
        impl Handler for Remote {
            async fn request(
                &self,
                _cx: &mut Cx,
                req: NetworkServiceRequest,
                _next: Next,
            ) -> Result<Connection> {
                let mut conn = req.connection.unwrap_or_default();
                conn.mechanism = Some(Mechanism {
                    cls: cls::REMOTE.into(),
                    r#type: types::VXLAN.into(),
                    ..Default::default()
                });
                Ok(conn)
            }
            async fn close(&self, _cx: &mut Cx, _conn: Connection, _next: Next) -> Result<()> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
        let remote = Remote::default();
        let client = kernel(&[(params::NAME, "nsm-1"), (params::INODE_URL, HERE)]);
        let conn = forwarder(remote.clone())
            .request(&mut Cx::server(), req(client.clone()))
            .await
            .unwrap();
        assert_eq!(
            conn.mechanism,
            Some(client),
            "the client's side is restored"
        );
        assert_eq!(remote.0.load(Ordering::SeqCst), 0, "not closed");
    }

    #[tokio::test]
    async fn a_connection_without_a_kernel_client_side_passes_through_untouched() {
        let nse = Grab::default();
        let chain = Chain::builder()
            .push(begin())
            .push(kernel_forwarder_client())
            .push(nse.clone())
            .build();
        let mut r = req(kernel_mechanism());
        r.mechanism_preferences.clear();
        chain.request(&mut Cx::client(), r).await.unwrap();
        assert!(nse.last().prefs.is_empty());
    }
}
