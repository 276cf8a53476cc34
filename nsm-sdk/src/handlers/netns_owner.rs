//! `netns_owner`: a KERNEL mechanism may name only a network namespace its requester is
//! in (or could enter itself).
//!
//! A KERNEL mechanism carries `inodeURL`, the file of the namespace where the forwarder,
//! which runs as root, will put the client's end of a veth pair. Left unchecked, any
//! process that reaches a manager or a forwarder gets a root-made interface into any
//! namespace it names: privilege escalation through the data plane. This handler checks,
//! before anything is made, that the caller may place an interface there.
//!
//! What it does (server side, after `authorize_server`, before the mechanisms): on a
//! Request from a peer, every KERNEL `inodeURL` in the mechanism preferences and in the
//! connection's mechanism is checked against the caller ([`Cx::peer`]):
//! - a caller whose verified identity this hop **trusts** passes: a forwarder trusts its
//!   own manager ([`NetnsOwner::trusting_server_at`]), which checked its own caller;
//! - a caller over a unix socket (its `SO_PEERCRED`, [`PeerProcess`]) passes when the
//!   named namespace **is its own** (`/proc/<pid>/ns/net`, compared by device and inode),
//!   or when it **could enter the namespace itself** (it holds `CAP_SYS_ADMIN` in this
//!   hop's user namespace, as a root manager or a demo running its pods does); an
//!   unprivileged process naming another namespace is PermissionDenied;
//! - a caller with a verified identity but no process (TCP) that is not trusted is
//!   PermissionDenied: nothing on such a link can say where the caller lives;
//! - a plaintext link without process credentials (insecure mode, TCP) has nothing to
//!   check against and passes: insecure mode authenticates nobody.
//!
//! Requests that `begin` replays for an event (the server's own refresh) and Closes are
//! not checked: they only repeat or undo what a checked Request made.
//!
//! [`check_answer`] is the same check for the other direction: the namespace an endpoint
//! names in its answer, against the endpoint's process (the forwarder's kernel handler
//! calls it once the endpoint answered).
//!
//! State: whom it trusts (fixed identities, or the server at a URL as the channel pool's
//! TLS handshake verified it); nothing per connection.
//!
//! Failure handled: a local process that names someone else's namespace (the attack
//! "interface into a namespace it is not in"); a peer that cannot be identified (its pid
//! is not visible here, its namespace cannot be read): refused, fail closed; an
//! `inodeURL` that is no `file://` URL is InvalidArgument, a missing namespace NotFound.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use nsm_proto::connection::Mechanism;
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::debug;

use crate::core::rt::begin::FromEvent;
use crate::core::url::Url;
use crate::core::{Cx, Handler, Next, Peer, PeerProcess};
use crate::security::SpiffeId;
use crate::transport::Channels;
use crate::wire::bounds::Shown;
use crate::wire::{cls, params, types};
use crate::{Error, Result};
use nsm_proto::connection::Connection;

/// Who a hop trusts to have checked the namespaces its requests name.
#[derive(Clone, Default)]
enum Trust {
    /// Nobody: every caller's namespaces are checked (a manager, the first hop).
    #[default]
    Nobody,
    /// These identities.
    Ids(Vec<SpiffeId>),
    /// Whoever serves this URL, as the pool's TLS handshake verified it.
    ServerAt(Channels, Url),
}

/// See the [module docs](self).
#[derive(Clone, Default)]
#[must_use]
pub struct NetnsOwner {
    trust: Trust,
}

impl fmt::Debug for NetnsOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trust = match &self.trust {
            Trust::Nobody => "nobody".to_string(),
            Trust::Ids(ids) => format!("{} identities", ids.len()),
            Trust::ServerAt(_, url) => format!("the server at {url}"),
        };
        f.debug_struct("NetnsOwner")
            .field("trusts", &trust)
            .finish()
    }
}

/// `netns_owner` trusting nobody: every caller's namespaces are checked.
pub fn netns_owner() -> NetnsOwner {
    NetnsOwner::default()
}

impl NetnsOwner {
    /// Also trusts callers with this identity (their requests pass unchecked).
    pub fn trusting(mut self, id: SpiffeId) -> Self {
        match &mut self.trust {
            Trust::Ids(ids) => ids.push(id),
            _ => self.trust = Trust::Ids(vec![id]),
        }
        self
    }

    /// Trusts whoever serves `url` (a forwarder's manager), as the TLS handshake of
    /// `channels` verifies it; on a plaintext pool nobody is trusted this way.
    pub fn trusting_server_at(mut self, channels: Channels, url: Url) -> Self {
        self.trust = Trust::ServerAt(channels, url);
        self
    }

    async fn trusts(&self, peer: &Peer) -> bool {
        let Some(id) = peer.identity.as_ref().map(|p| &p.id) else {
            return false;
        };
        match &self.trust {
            Trust::Nobody => false,
            Trust::Ids(ids) => ids.contains(id),
            Trust::ServerAt(channels, url) => match channels.connected(url).await {
                Ok((_, Some(server))) => server.id == *id,
                Ok((_, None)) => false,
                Err(e) => {
                    debug!(url = %url, error = %e, "netns_owner: cannot learn the trusted server's identity");
                    false
                }
            },
        }
    }
}

/// The `inodeURL`s of the KERNEL mechanisms a request names.
pub(crate) fn named(req: &NetworkServiceRequest) -> Vec<&str> {
    let current = req.connection.as_ref().and_then(|c| c.mechanism.as_ref());
    req.mechanism_preferences
        .iter()
        .chain(current)
        .filter_map(netns_url)
        .collect()
}

/// The `inodeURL` of a local KERNEL mechanism, if it names one.
pub(crate) fn netns_url(m: &Mechanism) -> Option<&str> {
    (m.r#type == types::KERNEL && m.cls != cls::REMOTE)
        .then(|| m.parameters.get(params::INODE_URL))
        .flatten()
        .map(String::as_str)
        .filter(|u| !u.is_empty())
}

/// Checks that `peer` may have an interface put into the namespace of each of `urls`
/// when nothing vouches for it (see the [module docs](self)).
fn check_peer(peer: &Peer, urls: &[&str]) -> Result<()> {
    match (&peer.process, &peer.identity) {
        (Some(process), _) => urls.iter().try_for_each(|url| owns(process, url)),
        (None, Some(id)) => Err(Error::PermissionDenied(format!(
            "{} names network namespace {} over a link without peer credentials, and this \
             hop does not trust it to: a namespace is accepted only from a local process \
             over a unix socket",
            id.id,
            Shown(urls.first().copied().unwrap_or_default())
        ))),
        (None, None) => Ok(()),
    }
}

/// Checks the namespace an endpoint named in its answer `out` against the endpoint,
/// `peer` (the client side's [`Cx::peer`] after the call: the endpoint's process on a
/// unix socket, its identity on TLS). The rules are the server side's with nobody
/// trusted (see the [module docs](self)).
pub fn check_answer(peer: &Peer, out: &Connection) -> Result<()> {
    let urls: Vec<&str> = out.mechanism.iter().filter_map(netns_url).collect();
    if urls.is_empty() {
        return Ok(());
    }
    check_peer(peer, &urls)
}

/// A namespace as the kernel names it: the device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NsId(pub(crate) u64, pub(crate) u64);

pub(crate) fn ns_id(path: &Path) -> std::io::Result<NsId> {
    let m = std::fs::metadata(path)?;
    Ok(NsId(m.dev(), m.ino()))
}

/// The namespace a `file://` URL names, as this process sees it.
pub(crate) fn named_ns(url: &str) -> Result<NsId> {
    let path = url
        .strip_prefix("file://")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .ok_or_else(|| {
            Error::invalid(format!(
                "inodeURL {} is not a file:// URL with an absolute path",
                Shown(url)
            ))
        })?;
    ns_id(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => {
            Error::not_found(format!("network namespace {} does not exist", Shown(url)))
        }
        _ => Error::PermissionDenied(format!(
            "network namespace {} cannot be read: {e}",
            Shown(url)
        )),
    })
}

/// The pid of `process` in this hop's pid namespace; PermissionDenied when the kernel
/// could not name it here.
pub(crate) fn visible_pid(process: &PeerProcess, url: &str) -> Result<i32> {
    process.pid.ok_or_else(|| {
        Error::PermissionDenied(format!(
            "the caller (uid {}) is in another pid namespace: its network namespace cannot \
             be compared with {}",
            process.uid,
            Shown(url)
        ))
    })
}

/// The network namespace `process` is in, read from `/proc/<pid>/ns/net` and then
/// proven to be the caller's: its pid still names the process that connected
/// ([`PeerProcess::still_there`]), so a pid reused by another process since is refused.
pub(crate) fn process_netns(process: &PeerProcess, pid: i32) -> Result<NsId> {
    let own = ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).map_err(|e| {
        Error::PermissionDenied(format!(
            "the network namespace of the caller (pid {pid}) cannot be read: {e}"
        ))
    })?;
    if !process.still_there() {
        return Err(Error::PermissionDenied(format!(
            "the caller (pid {pid}, uid {}) is gone: pid {pid} may name another process now",
            process.uid
        )));
    }
    Ok(own)
}

/// Whether `process` may have an interface put into the namespace of `url`.
fn owns(process: &PeerProcess, url: &str) -> Result<()> {
    let wanted = named_ns(url)?;
    let pid = visible_pid(process, url)?;
    if may_enter_any(pid) && process.still_there() {
        return Ok(());
    }
    if process_netns(process, pid)? == wanted {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "the caller (pid {pid}, uid {}) is not in network namespace {}",
            process.uid,
            Shown(url)
        )))
    }
}

/// `CAP_SYS_ADMIN`, which `setns` into a network namespace needs.
const CAP_SYS_ADMIN: u32 = 21;

/// Whether process `pid` could enter any network namespace of this hop itself: it holds
/// `CAP_SYS_ADMIN` in this process's user namespace. Anything unreadable says no.
fn may_enter_any(pid: i32) -> bool {
    let same_userns = match (
        ns_id(Path::new(&format!("/proc/{pid}/ns/user"))),
        ns_id(Path::new("/proc/self/ns/user")),
    ) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => false,
    };
    same_userns
        && std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| effective_caps(&s))
            .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// The `CapEff` mask of a `/proc/<pid>/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

#[async_trait]
impl Handler for NetnsOwner {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let urls = named(&req);
        if !urls.is_empty()
            && cx.ext().get::<FromEvent>().is_none()
            && !self.trusts(cx.peer()).await
        {
            if let Err(e) = check_peer(cx.peer(), &urls) {
                debug!(parent: cx.span(), error = %e, "netns_owner: refused");
                return Err(e);
            }
        }
        next.request(cx, req).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::process::{Child, Command};

    use super::*;
    use crate::core::Chain;
    use crate::handlers::authorize::tests::peer_id;
    use crate::handlers::test_support::memory_url;
    use crate::security::dev_ca::DevCa;
    use crate::transport::{serve, Services, Tls};

    fn kernel(url: &str) -> Mechanism {
        Mechanism {
            cls: cls::LOCAL.into(),
            r#type: types::KERNEL.into(),
            parameters: HashMap::from([(params::INODE_URL.to_string(), url.to_string())]),
        }
    }

    fn request(url: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "c".into(),
                ..Default::default()
            }),
            mechanism_preferences: vec![kernel(url)],
        }
    }

    fn own() -> String {
        format!("file:///proc/{}/ns/net", std::process::id())
    }

    fn process(pid: u32, uid: u32) -> PeerProcess {
        PeerProcess::of_pid(pid as i32, uid, uid)
    }

    /// A peer with this process and a real certificate for `id` (`spiffe://t/...`).
    fn peer(process: Option<PeerProcess>, id: Option<&str>) -> Peer {
        let identity = id.map(|s| {
            let ca = DevCa::new("t").unwrap();
            let id = SpiffeId::parse(s).unwrap();
            peer_id(&ca.issue(&id, std::time::Duration::from_secs(3600)).unwrap())
        });
        Peer {
            process,
            identity,
            ..Default::default()
        }
    }

    async fn run(owner: NetnsOwner, peer: Peer, req: NetworkServiceRequest) -> Result<Connection> {
        let chain = Chain::builder().push(owner).build();
        chain.request(&mut Cx::server().with_peer(peer), req).await
    }

    /// A child that drops every capability, so it can enter no namespace.
    struct Unprivileged(Child);

    impl Unprivileged {
        fn start() -> Option<Unprivileged> {
            Command::new("setpriv")
                .args(["--inh-caps=-all", "--bounding-set=-all", "sleep", "30"])
                .spawn()
                .ok()
                .map(Unprivileged)
        }
        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Unprivileged {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn the_effective_capabilities_are_read_from_the_status_text() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert!(effective_caps(status).unwrap() & (1 << CAP_SYS_ADMIN) != 0);
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
        assert_eq!(effective_caps(""), None);
    }

    #[tokio::test]
    async fn a_process_naming_its_own_namespace_passes() {
        let me = process(std::process::id(), 0);
        run(netns_owner(), peer(Some(me), None), request(&own()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unprivileged_process_naming_another_namespace_is_refused() {
        // Another namespace: only when this test may make one (root, unshare).
        let Ok(mut other) = Command::new("unshare")
            .args(["--net", "sleep", "30"])
            .spawn()
        else {
            eprintln!("skipped: unshare is not available");
            return;
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let theirs = format!("file:///proc/{}/ns/net", other.id());
        let differs = named_ns(&theirs).ok() != named_ns(&own()).ok();
        if !differs {
            let _ = other.kill();
            let _ = other.wait();
            eprintln!("skipped: unshare --net needs privileges here");
            return;
        }
        let Some(child) = Unprivileged::start() else {
            let _ = other.kill();
            let _ = other.wait();
            eprintln!("skipped: setpriv is not available");
            return;
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let attacker = process(child.pid(), 65534);
        let err = run(
            netns_owner(),
            peer(Some(attacker), Some("spiffe://t/attacker")),
            request(&theirs),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(
            err.to_string().contains("is not in network namespace"),
            "{err}"
        );
        // Its own namespace it may name.
        let its_own = format!("file:///proc/{}/ns/net", child.pid());
        run(netns_owner(), peer(Some(attacker), None), request(&its_own))
            .await
            .unwrap();
        // A privileged process (this test, as root) may name any namespace.
        if may_enter_any(std::process::id() as i32) {
            let me = process(std::process::id(), 0);
            run(netns_owner(), peer(Some(me), None), request(&theirs))
                .await
                .unwrap();
        }
        let _ = other.kill();
        let _ = other.wait();
    }

    #[tokio::test]
    async fn a_caller_whose_pid_names_another_process_now_is_refused() {
        let mut me = process(std::process::id(), 0);
        // As if the caller had exited and this process got its pid.
        me.start_time = me.start_time.map(|t| t + 1);
        let err = run(netns_owner(), peer(Some(me), None), request(&own()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(err.to_string().contains("is gone"), "{err}");
    }

    #[tokio::test]
    async fn an_identity_without_process_is_refused_unless_trusted() {
        let id = "spiffe://t/nsmgr";
        let err = run(netns_owner(), peer(None, Some(id)), request(&own()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        run(
            netns_owner().trusting(SpiffeId::parse(id).unwrap()),
            peer(None, Some(id)),
            request(&own()),
        )
        .await
        .unwrap();
        // Another identity is still refused by the trusting hop.
        let err = run(
            netns_owner().trusting(SpiffeId::parse(id).unwrap()),
            peer(None, Some("spiffe://t/other")),
            request(&own()),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    }

    #[tokio::test]
    async fn the_server_at_a_url_is_trusted_as_its_handshake_proves() {
        let ca = DevCa::new("t").unwrap();
        let tls = Tls::new(ca.identity("nsmgr").unwrap().fixed()).unwrap();
        let url = memory_url("netns-owner");
        let _server = serve(&url, Services::new().tls(tls.clone())).await.unwrap();
        let channels = Channels::new().tls(tls);
        let owner = netns_owner().trusting_server_at(channels, url);
        run(
            owner.clone(),
            peer(None, Some("spiffe://t/nsmgr")),
            request(&own()),
        )
        .await
        .unwrap();
        let err = run(owner, peer(None, Some("spiffe://t/nse")), request(&own()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    }

    #[tokio::test]
    async fn insecure_links_without_credentials_and_other_mechanisms_pass() {
        run(
            netns_owner(),
            peer(None, None),
            request("file:///run/netns/x"),
        )
        .await
        .unwrap();
        let mut req = request(&own());
        req.mechanism_preferences[0].r#type = "VXLAN".into();
        run(netns_owner(), peer(None, Some("spiffe://t/x")), req)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn bad_urls_are_invalid_and_missing_namespaces_not_found() {
        let me = || peer(Some(process(std::process::id(), 0)), None);
        let err = run(netns_owner(), me(), request("inode://4/5"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err = run(
            netns_owner(),
            me(),
            request("file:///run/netns/nsm-no-such-ns"),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    }

    #[test]
    fn an_answer_naming_the_endpoints_own_namespace_passes() {
        let conn = Connection {
            mechanism: Some(kernel(&own())),
            ..Default::default()
        };
        check_answer(&peer(Some(process(std::process::id(), 0)), None), &conn).unwrap();
        let err = check_answer(&peer(None, Some("spiffe://t/nse")), &conn).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        check_answer(&peer(None, None), &Connection::default()).unwrap();
    }
}
