//! `netns_inode`: finds a local client's network namespace by the inode it names
//! (`netnsInode`) when the `inodeURL` it sent means another namespace here, as it does
//! for a client in a pid namespace of its own (a Kubernetes pod).
//!
//! A client names its namespace as `file:///proc/<pid>/ns/net` with the pid it sees.
//! In a pod with its own pid namespace that pid (often 1) names another process, or
//! none, in the manager's and the forwarder's pid namespace (they run with the host's):
//! the interface would land in the wrong namespace, or the request be refused. So the
//! client also sends `netnsInode`, the inode of its namespace (`ls -iL
//! /proc/self/ns/net`; all network namespaces of a host live on one nsfs, so the inode
//! names one), and this handler, on the first hop that sees the client's process (the
//! manager, over a unix socket), puts right what the URL means here.
//!
//! What it does (server side, after `begin`, before [`netns_owner`](super::netns_owner)):
//! for each KERNEL mechanism of a Request (preferences and the connection's mechanism)
//! with an `inodeURL` and a `netnsInode`, from a caller over a unix socket
//! ([`Cx::peer`]'s `process`, its `SO_PEERCRED`, whose pid the kernel gives in this
//! hop's pid namespace):
//! - the URL names here a namespace with that inode: it stays;
//! - otherwise the caller's own namespace (`/proc/<its pid>/ns/net` here) must have that
//!   inode, and the URL becomes `file:///proc/<its pid>/ns/net`, which the forwarder
//!   (the same pid namespace as this hop) opens; a caller whose namespace has another
//!   inode is PermissionDenied: a client names only its own namespace this way.
//!
//! `netns_owner` then checks the URL as for any client, so its rule (only a namespace
//! the caller is in, or could enter itself) stays whole. The connection returned to the
//! caller names the URL it sent, so the client keeps seeing its own view; the
//! connections this hop and the ones below keep (and MonitorConnection shows) name the
//! URL resolved here. Requests without `netnsInode` (older clients, Go NSM's), from
//! peers without a process (TCP, in memory) or for other mechanisms pass untouched.
//!
//! Pid reuse and races: the caller's pid is the one it had when it connected; it may
//! have exited since and its pid be reused. The namespace is read from `/proc/<pid>`
//! and then the pid proven to still name the process that connected (its start time,
//! recorded when the connection was accepted, [`PeerProcess::still_there`]); a caller
//! that is gone is PermissionDenied. Between this hop and the forwarder opening the
//! URL the process may exit too: the forwarder checks the namespace it opened against
//! `netnsInode` (it travels on), so a reused pid makes the request fail, never an
//! interface in another namespace. A server-side event (a replayed refresh) is resolved
//! the same way with the caller of the last Request; once that process is gone the
//! replay fails until the client (or the sidecar taking its connection over) requests
//! again.
//!
//! State: none.
//!
//! Failure handled: a `netnsInode` that is no number is InvalidArgument; a client
//! naming an inode that is not its namespace's, or whose pid no longer names it, is
//! PermissionDenied; a client in a pid namespace the kernel cannot name here (pid
//! unknown) is PermissionDenied.

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Mechanism};
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::debug;

use super::netns_owner::{named_ns, netns_url, process_netns, visible_pid};
use crate::core::{Cx, Handler, Next, PeerProcess};
use crate::wire::bounds::Shown;
use crate::wire::params;
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct NetnsInode;

/// `netns_inode`: see the [module docs](self).
pub fn netns_inode() -> NetnsInode {
    NetnsInode
}

/// The inode a KERNEL mechanism names in `netnsInode`, if it has one.
fn named_inode(m: &Mechanism) -> Result<Option<u64>> {
    match m.parameters.get(params::NETNS_INODE).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            Error::invalid(format!(
                "KERNEL mechanism parameter {} {} is not an inode number",
                params::NETNS_INODE,
                Shown(s)
            ))
        }),
    }
}

/// What `m`'s `inodeURL` becomes for `process`: `None` when it stays.
fn resolve(process: &PeerProcess, m: &Mechanism) -> Result<Option<String>> {
    let Some(url) = netns_url(m) else {
        return Ok(None);
    };
    let Some(inode) = named_inode(m)? else {
        return Ok(None);
    };
    if named_ns(url).is_ok_and(|ns| ns.1 == inode) {
        return Ok(None);
    }
    let pid = visible_pid(process, url)?;
    let own = process_netns(process, pid)?;
    if own.1 != inode {
        return Err(Error::PermissionDenied(format!(
            "the caller (pid {pid}, uid {}) is not in the network namespace with inode \
             {inode} it names (inodeURL {})",
            process.uid,
            Shown(url)
        )));
    }
    Ok(Some(format!("file:///proc/{pid}/ns/net")))
}

#[async_trait]
impl Handler for NetnsInode {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let Some(process) = cx.peer().process else {
            return next.request(cx, req).await;
        };
        // (resolved URL, the caller's URL) of each rewrite.
        let mut rewritten: Vec<(String, String)> = Vec::new();
        let current = req.connection.as_mut().and_then(|c| c.mechanism.as_mut());
        for m in req.mechanism_preferences.iter_mut().chain(current) {
            let resolved = resolve(&process, m).inspect_err(|e| {
                debug!(parent: cx.span(), error = %e, "netns_inode: refused");
            })?;
            if let Some(resolved) = resolved {
                let theirs = m
                    .parameters
                    .insert(params::INODE_URL.into(), resolved.clone())
                    .unwrap_or_default();
                debug!(parent: cx.span(), from = %theirs, to = %resolved, "netns_inode: namespace found by its inode");
                rewritten.push((resolved, theirs));
            }
        }
        let mut conn = next.request(cx, req).await?;
        if let Some(url) = conn
            .mechanism
            .as_mut()
            .and_then(|m| m.parameters.get_mut(params::INODE_URL))
        {
            if let Some((_, theirs)) = rewritten.iter().find(|(r, _)| r == url) {
                *url = theirs.clone();
            }
        }
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    use nsm_proto::connection::Mechanism;

    use super::*;
    use crate::core::{Chain, Peer};
    use crate::wire::{cls, types};

    /// A chain of `netns_inode` that answers with the mechanism it was handed.
    fn chain() -> Chain {
        struct Echo;
        #[async_trait]
        impl Handler for Echo {
            async fn request(
                &self,
                _: &mut Cx,
                req: NetworkServiceRequest,
                _: Next,
            ) -> Result<Connection> {
                let mut conn = req.connection.unwrap_or_default();
                conn.mechanism = req.mechanism_preferences.into_iter().next();
                Ok(conn)
            }
        }
        Chain::builder().push(netns_inode()).push(Echo).build()
    }

    fn kernel(url: &str, inode: Option<String>) -> NetworkServiceRequest {
        let mut parameters = HashMap::from([(params::INODE_URL.to_string(), url.to_string())]);
        if let Some(i) = inode {
            parameters.insert(params::NETNS_INODE.into(), i);
        }
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "c".into(),
                ..Default::default()
            }),
            mechanism_preferences: vec![Mechanism {
                cls: cls::LOCAL.into(),
                r#type: types::KERNEL.into(),
                parameters,
            }],
        }
    }

    fn me() -> Peer {
        Peer {
            process: Some(PeerProcess::of_pid(std::process::id() as i32, 0, 0)),
            ..Default::default()
        }
    }

    fn own_inode() -> u64 {
        std::fs::metadata("/proc/self/ns/net").unwrap().ino()
    }

    /// What the chain below `netns_inode` was handed (the echo answers it) and what
    /// the caller got back.
    async fn run(peer: Peer, req: NetworkServiceRequest) -> Result<Connection> {
        chain()
            .request(&mut Cx::server().with_peer(peer), req)
            .await
    }

    fn url_of(conn: &Connection) -> &str {
        &conn.mechanism.as_ref().unwrap().parameters[params::INODE_URL]
    }

    #[tokio::test]
    async fn a_url_naming_the_inode_stays() {
        let own = format!("file:///proc/{}/ns/net", std::process::id());
        let conn = run(me(), kernel(&own, Some(own_inode().to_string())))
            .await
            .unwrap();
        assert_eq!(url_of(&conn), own);
    }

    /// The client's URL means nothing here (a pid of its own pid namespace): the
    /// caller's namespace, found by its inode, goes down; the caller gets its URL back.
    #[tokio::test]
    async fn a_url_meaning_another_namespace_is_resolved_from_the_caller() {
        struct Seen;
        #[async_trait]
        impl Handler for Seen {
            async fn request(
                &self,
                _: &mut Cx,
                req: NetworkServiceRequest,
                _: Next,
            ) -> Result<Connection> {
                let m = req.mechanism_preferences[0].clone();
                assert_eq!(
                    m.parameters[params::INODE_URL],
                    format!("file:///proc/{}/ns/net", std::process::id())
                );
                Ok(Connection {
                    mechanism: Some(m),
                    ..Default::default()
                })
            }
        }
        let chain = Chain::builder().push(netns_inode()).push(Seen).build();
        let theirs = "file:///proc/999999999/ns/net";
        let conn = chain
            .request(
                &mut Cx::server().with_peer(me()),
                kernel(theirs, Some(own_inode().to_string())),
            )
            .await
            .unwrap();
        assert_eq!(url_of(&conn), theirs, "the caller's own view comes back");
    }

    #[tokio::test]
    async fn an_inode_that_is_not_the_callers_is_refused() {
        // Pid 1 of this pid namespace: another namespace only if the test runs in one
        // of its own (a container); otherwise the inode below is not any namespace.
        let err = run(
            me(),
            kernel("file:///proc/999999999/ns/net", Some("4026531".into())),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(err.to_string().contains("with inode 4026531"), "{err}");
    }

    #[tokio::test]
    async fn a_caller_whose_pid_names_another_process_now_is_refused() {
        let Ok(mut child) = Command::new("sleep").arg("30").spawn() else {
            eprintln!("skipped: no sleep");
            return;
        };
        let pid = child.id() as i32;
        let mut process = PeerProcess::of_pid(pid, 0, 0);
        // As if it had exited and its pid were reused by a later process.
        process.start_time = process.start_time.map(|t| t.wrapping_sub(1));
        let peer = Peer {
            process: Some(process),
            ..Default::default()
        };
        let err = run(
            peer,
            kernel(
                "file:///proc/999999999/ns/net",
                Some(own_inode().to_string()),
            ),
        )
        .await
        .unwrap_err();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(err.to_string().contains("is gone"), "{err}");
    }

    #[tokio::test]
    async fn a_bad_inode_is_invalid_and_requests_without_one_pass() {
        let err = run(me(), kernel("file:///proc/1/ns/net", Some("x1".into())))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        // No netnsInode, or no process (TCP, memory): untouched.
        let conn = run(me(), kernel("file:///proc/999999999/ns/net", None))
            .await
            .unwrap();
        assert_eq!(url_of(&conn), "file:///proc/999999999/ns/net");
        let conn = run(
            Peer::default(),
            kernel("file:///proc/999999999/ns/net", Some("7".into())),
        )
        .await
        .unwrap();
        assert_eq!(url_of(&conn), "file:///proc/999999999/ns/net");
    }
}
