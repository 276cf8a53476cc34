//! `update_path`: this hop's path segment and connection id.
//!
//! What it does: applies the wire contract's path rules to every Request and Close (see
//! `docs/WIRE.md`, "Path semantics"): finds or creates this hop's segment, sets the
//! connection id the rest of the chain sees to that segment's id, and on the way back
//! restores the id and index the caller sent, so each caller sees its own view with
//! the whole path. With [`UpdatePath::trim_tail`] (endpoints) it drops the segments
//! after its own on success, so a path shortened by a reselect loses its stale tail.
//!
//! State: none.
//!
//! Failure handled: a path that does not fit (index beyond the segments, or an id that
//! is not the one of the current segment) is rejected with InvalidArgument before any
//! other handler runs.

use async_trait::async_trait;
use nsm_proto::connection::{Connection, Path, PathSegment};
use nsm_proto::networkservice::NetworkServiceRequest;

use crate::core::{Cx, Handler, Next};
use crate::{Error, Result};

/// Marker a handler puts in [`Cx::ext`] when the path goes on past this hop (a
/// passthrough's client, or `connect`), so that an endpoint's `update_path` does not trim
/// the segments the next hops added.
#[derive(Debug, Clone, Copy)]
pub struct PathContinues;

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct UpdatePath {
    name: String,
    trim_tail: bool,
}

/// The `update_path` handler for the hop called `name`.
pub fn update_path(name: impl Into<String>) -> UpdatePath {
    UpdatePath {
        name: name.into(),
        trim_tail: false,
    }
}

impl UpdatePath {
    /// Drop the segments after this hop's own on success (for endpoints).
    pub fn trim_tail(mut self, trim: bool) -> Self {
        self.trim_tail = trim;
        self
    }
}

/// What the caller sent, to restore on the way back.
struct Caller {
    id: String,
    index: u32,
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Applies the path rules to `conn` for the hop `name`; returns what to restore.
fn apply(name: &str, conn: &mut Connection) -> Result<Caller> {
    let caller = Caller {
        id: conn.id.clone(),
        index: conn.path.as_ref().map_or(0, |p| p.index),
    };
    let path = conn.path.get_or_insert_with(Path::default);
    if path.path_segments.is_empty() {
        let id = if conn.id.is_empty() {
            new_id()
        } else {
            conn.id.clone()
        };
        path.index = 0;
        path.path_segments.push(PathSegment {
            name: name.to_string(),
            id: id.clone(),
            ..Default::default()
        });
        conn.id = id;
        return Ok(caller);
    }
    let index = path.index as usize;
    let Some(current) = path.path_segments.get(index) else {
        return Err(Error::invalid(format!(
            "path index {index} is beyond the {} path segments",
            path.path_segments.len()
        )));
    };
    if current.name == name {
        conn.id = current.id.clone();
        return Ok(caller);
    }
    if current.id != conn.id {
        return Err(Error::invalid(format!(
            "connection id {:?} is not the id {:?} of path segment {index} ({})",
            conn.id, current.id, current.name
        )));
    }
    let mine = index + 1;
    match path.path_segments.get_mut(mine) {
        Some(seg) if seg.name == name => {}
        Some(seg) => {
            *seg = PathSegment {
                name: name.to_string(),
                id: new_id(),
                ..Default::default()
            }
        }
        None => path.path_segments.push(PathSegment {
            name: name.to_string(),
            id: new_id(),
            ..Default::default()
        }),
    }
    path.index = mine as u32;
    conn.id = path.path_segments[mine].id.clone();
    Ok(caller)
}

fn restore(conn: &mut Connection, caller: &Caller) {
    conn.id = caller.id.clone();
    if let Some(p) = conn.path.as_mut() {
        p.index = caller.index;
    }
}

#[async_trait]
impl Handler for UpdatePath {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        let caller = apply(&self.name, conn)?;
        // Every log line of this hop carries its name and its connection id.
        let span = tracing::debug_span!(parent: cx.span(), "hop", hop = %self.name, connection.id = %conn.id);
        cx.set_span(span);
        let own_index = conn.path.as_ref().map_or(0, |p| p.index) as usize;
        let mut out = next.request(cx, req).await?;
        if self.trim_tail && cx.ext().get::<PathContinues>().is_none() {
            if let Some(p) = out.path.as_mut() {
                p.path_segments.truncate(own_index + 1);
            }
        }
        // The first hop (empty path) keeps the id it generated: the caller did not have one.
        let caller = if caller.id.is_empty() && own_index == 0 {
            Caller {
                id: out.id.clone(),
                index: 0,
            }
        } else {
            caller
        };
        restore(&mut out, &caller);
        Ok(out)
    }

    async fn close(&self, cx: &mut Cx, mut conn: Connection, next: Next) -> Result<()> {
        apply(&self.name, &mut conn)?;
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;

    fn seg(name: &str, id: &str) -> PathSegment {
        PathSegment {
            name: name.into(),
            id: id.into(),
            ..Default::default()
        }
    }

    fn conn(id: &str, index: u32, segs: Vec<PathSegment>) -> Connection {
        Connection {
            id: id.into(),
            path: Some(Path {
                index,
                path_segments: segs,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn empty_path_creates_segment_zero_with_a_fresh_or_given_id() {
        let mut c = Connection::default();
        apply("nsc", &mut c).unwrap();
        let p = c.path.as_ref().unwrap();
        assert_eq!(p.path_segments.len(), 1);
        assert_eq!(p.path_segments[0].name, "nsc");
        assert_eq!(p.path_segments[0].id, c.id);
        assert_eq!(c.id.len(), 36);

        let mut c = Connection {
            id: "given".into(),
            ..Default::default()
        };
        apply("nsc", &mut c).unwrap();
        assert_eq!(c.id, "given");
    }

    #[test]
    fn next_hop_appends_its_segment_and_takes_its_id() {
        let mut c = conn("a", 0, vec![seg("nsc", "a")]);
        apply("nsmgr", &mut c).unwrap();
        let p = c.path.as_ref().unwrap();
        assert_eq!(p.index, 1);
        assert_eq!(p.path_segments[1].name, "nsmgr");
        assert_eq!(c.id, p.path_segments[1].id);
    }

    #[test]
    fn a_refresh_keeps_ids_stable() {
        let mut c = conn("a", 0, vec![seg("nsc", "a"), seg("nsmgr", "b")]);
        apply("nsmgr", &mut c).unwrap();
        assert_eq!(c.id, "b");
        // The hop that owns the current segment keeps it.
        let mut c = conn("b", 1, vec![seg("nsc", "a"), seg("nsmgr", "b")]);
        apply("nsmgr", &mut c).unwrap();
        assert_eq!(c.id, "b");
        assert_eq!(c.path.unwrap().index, 1);
    }

    #[test]
    fn a_replaced_hop_gets_a_new_id() {
        let mut c = conn("a", 0, vec![seg("nsc", "a"), seg("fwd-1", "b")]);
        apply("fwd-2", &mut c).unwrap();
        let p = c.path.as_ref().unwrap();
        assert_eq!(p.path_segments[1].name, "fwd-2");
        assert_ne!(p.path_segments[1].id, "b");
        assert_eq!(p.path_segments.len(), 2);
    }

    #[test]
    fn bad_paths_are_invalid_arguments() {
        let mut c = conn("a", 3, vec![seg("nsc", "a")]);
        assert!(matches!(apply("x", &mut c), Err(Error::InvalidArgument(_))));
        let mut c = conn("wrong", 0, vec![seg("nsc", "a")]);
        assert!(matches!(apply("x", &mut c), Err(Error::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn the_caller_gets_its_own_id_and_index_back_and_endpoints_trim_the_tail() {
        let chain = Chain::builder()
            .push(update_path("nsc"))
            .push(update_path("nsmgr"))
            .push(update_path("nse").trim_tail(true))
            .build();
        let req = NetworkServiceRequest {
            connection: Some(conn(
                "a",
                0,
                vec![
                    seg("nsc", "a"),
                    seg("nsmgr", "b"),
                    seg("nse", "c"),
                    seg("stale", "d"),
                ],
            )),
            ..Default::default()
        };
        let out = chain.request(&mut Cx::client(), req).await.unwrap();
        assert_eq!(out.id, "a");
        let p = out.path.unwrap();
        assert_eq!(p.index, 0);
        let names: Vec<_> = p.path_segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["nsc", "nsmgr", "nse"]);
        assert_eq!(p.path_segments[2].id, "c");
    }
}
