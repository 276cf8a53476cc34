//! `authorize`: the Rego policies of a hop, on the path a call brings or returns, and
//! who may touch a connection.
//!
//! What it does:
//! - **server side** ([`authorize_server`], after `begin` and `update_token`), on every
//!   Request and Close a peer sends: evaluates [`policy::SERVER`] on the left side of
//!   the path (the segments up to this hop's, `..=index`) with the caller's token
//!   verified against the TLS peer's certificate ([`Verify::Previous`]): tokens valid,
//!   unexpired, the previous one signed by the peer, chained. A call without a verified
//!   peer identity ([`Peer::identity`](crate::core::Peer::identity)) is refused. Then
//!   **ownership**: the first Request of a connection id records the SPIFFE ID of its
//!   peer; a later Request (refresh) or Close of that id by another identity is refused.
//!   A refusal marks the call [`Refused`], so `begin` leaves the connection as it was
//!   (a refused Close tears nothing down and forgets nothing).
//! - **client side** ([`authorize_client`], right before the gRPC client): after the
//!   next hop answered, evaluates [`policy::CLIENT`] on the right side of the returned
//!   path (`index..`) with the next token verified against the server's certificate
//!   ([`Verify::Next`]), the identity the transport put into `Cx::peer` when the call
//!   returned. A refused first Request closes what the next hop made before the error
//!   goes back.
//!
//! The server's own operations are never refused: a Request or Close that `begin` runs
//! for an event (`timeout`'s close on expiry, a refresh from inside) is not a call from
//! a peer and passes unchecked, so cleanup works even when every token has expired.
//!
//! State: the compiled policies (shared, immutable) and, per connection, the owner's
//! SPIFFE ID in the connection's handle ([`ConnHandle::state`](crate::core::ConnHandle::state)),
//! gone with the connection when `begin` forgets it (nothing kept by id here).
//!
//! Failure handled: forged, expired, unchained or replayed tokens, a peer without an
//! identity, a Close or refresh by an identity that does not own the connection (each
//! PermissionDenied, with the refusing policy named); a server that returns a path the
//! client does not accept (its new connection is closed).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Path};
use nsm_proto::networkservice::NetworkServiceRequest;
use tracing::debug;

use crate::core::rt::begin::{FromEvent, Refused};
use crate::core::{Cx, Handler, Next};
use crate::security::policy::{self, Verify};
use crate::security::{PolicySet, SpiffeId};
use crate::{Error, Result};

/// Which side of a link the handler guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    Server,
    Client,
}

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct Authorize {
    policies: Arc<PolicySet>,
    guard: Guard,
}

impl fmt::Debug for Authorize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorize")
            .field("side", &self.guard)
            .finish_non_exhaustive()
    }
}

/// The server-side `authorize`: place it right after `update_token` on a server chain.
pub fn authorize_server(policies: Arc<PolicySet>) -> Authorize {
    Authorize {
        policies,
        guard: Guard::Server,
    }
}

/// The client-side `authorize`: place it last before the gRPC client (the same `Cx`
/// must reach the transport, which names the server in it).
pub fn authorize_client(policies: Arc<PolicySet>) -> Authorize {
    Authorize {
        policies,
        guard: Guard::Client,
    }
}

/// Per connection, on a server: the SPIFFE ID of the identity that requested it first.
#[derive(Default)]
struct Owner(OnceLock<SpiffeId>);

/// Per connection, on a client: a Request of it was accepted once (a refused refresh
/// then keeps what is built; only a refused first Request closes it).
#[derive(Default)]
struct Accepted;

/// The side of `path` a check covers: up to this hop's segment (a server) or from it on
/// (a client, re-indexed so that its segment is the first). `None` when the path does
/// not hold this hop's segment.
fn side_of(path: &Path, verify: Verify) -> Option<Path> {
    let index = path.index as usize;
    if index >= path.path_segments.len() {
        return None;
    }
    Some(match verify {
        Verify::Previous => Path {
            index: path.index,
            path_segments: path.path_segments[..=index].to_vec(),
        },
        Verify::Next => Path {
            index: 0,
            path_segments: path.path_segments[index..].to_vec(),
        },
    })
}

fn denied(what: impl Into<String>) -> Error {
    Error::PermissionDenied(what.into())
}

impl Authorize {
    /// The path policies of this side on `conn`, as seen through a peer the transport
    /// verified.
    fn check_path(&self, cx: &Cx, conn: &Connection, verify: Verify) -> Result<()> {
        let peer = cx
            .peer()
            .identity
            .as_ref()
            .ok_or_else(|| denied("authorize: the peer has no verified identity"))?;
        let side = conn
            .path
            .as_ref()
            .and_then(|p| side_of(p, verify))
            .ok_or_else(|| denied("authorize: the path has no segment for this hop"))?;
        let names = match verify {
            Verify::Previous => policy::SERVER,
            Verify::Next => policy::CLIENT,
        };
        let checked = self
            .policies
            .check_path(names, &side, Some(peer), verify, SystemTime::now());
        checked.map_err(|e| {
            debug!(parent: cx.span(), peer = %peer.id, error = %e, "authorize: refused");
            Error::from(e)
        })
    }

    /// A peer's call on a server: the path, then ownership (`record`: a Request, which
    /// makes its peer the owner of a connection that has none yet).
    fn check_server(&self, cx: &Cx, conn: &Connection, record: bool) -> Result<()> {
        self.check_path(cx, conn, Verify::Previous)?;
        let (Some(handle), Some(peer)) = (cx.conn(), cx.peer().identity.as_ref()) else {
            return Ok(());
        };
        let owner = handle.state::<Owner>();
        let owner = if record {
            owner.0.get_or_init(|| peer.id.clone())
        } else {
            match owner.0.get() {
                Some(o) => o,
                None => return Ok(()),
            }
        };
        if *owner != peer.id {
            debug!(parent: cx.span(), peer = %peer.id, "authorize: not the connection's owner");
            return Err(denied(format!(
                "authorize: connection {} belongs to another identity",
                handle.id()
            )));
        }
        Ok(())
    }

    /// Marks a refusal for `begin`, which then leaves the connection as it was.
    fn refuse<T>(cx: &mut Cx, e: Error) -> Result<T> {
        cx.ext_mut().insert(Refused);
        Err(e)
    }
}

#[async_trait]
impl Handler for Authorize {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let own = cx.ext().get::<FromEvent>().is_some();
        match self.guard {
            Guard::Server if own => next.request(cx, req).await,
            Guard::Server => {
                let conn = req
                    .connection
                    .as_ref()
                    .ok_or_else(|| Error::invalid("authorize: request without a connection"))?;
                if let Err(e) = self.check_server(cx, conn, true) {
                    return Self::refuse(cx, e);
                }
                next.request(cx, req).await
            }
            Guard::Client => {
                let first = cx
                    .conn()
                    .is_none_or(|h| h.get_state::<Accepted>().is_none());
                let conn = next.clone().request(cx, req).await?;
                match self.check_path(cx, &conn, Verify::Next) {
                    Ok(()) => {
                        if let Some(h) = cx.conn() {
                            h.state::<Accepted>();
                        }
                        Ok(conn)
                    }
                    Err(e) => {
                        if first {
                            let mut close_cx = cx.clone();
                            if let Err(close) = next.close(&mut close_cx, conn).await {
                                debug!(parent: cx.span(), error = %close, "authorize: closing the refused connection failed");
                            }
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let own = cx.ext().get::<FromEvent>().is_some();
        if self.guard == Guard::Server && !own {
            if let Err(e) = self.check_server(cx, &conn, false) {
                return Self::refuse(cx, e);
            }
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
pub(crate) mod tests;
