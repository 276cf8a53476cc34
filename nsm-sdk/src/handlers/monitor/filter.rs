//! Client-side filtering of a next hop's monitor stream (docs/SCENARIOS.md 6.6, "Client-side
//! filtering"): what heal, the monitor relay and upstream refresh see of it.
//!
//! A client hop knows its own path segment (`id`, `name`) and its index in the path. It
//! subscribes to the next hop with [`ClientFilter::selector`] and passes every event
//! through [`ClientFilter::apply`] (or wraps the whole stream with [`filter_events`]):
//!
//! - only connections whose `path_segments[my_index].id` is the client's id and whose
//!   `path.index` is `my_index` or `my_index + 1` are kept (the server's view of the
//!   client's own connection);
//! - each is rewritten to the client's own view: `id` and `path.index` become the
//!   client's, the path (with the downstream segments), context, mechanism and state stay
//!   as the server sent them;
//! - DELETE becomes an UPDATE with state DOWN;
//! - an INITIAL_STATE_TRANSFER that does not contain the connection (the server does not
//!   know it: a restarted server, or a DELETE lost while the subscriber lagged and
//!   re-synchronised) becomes an UPDATE with state DOWN of the last copy seen, or of a
//!   bare `{id, state: DOWN}` connection when none was seen yet;
//! - a copy equal to the last one let through is suppressed, so a re-sync that changes
//!   nothing is silent.
//!
//! Every event that comes out is an UPDATE with exactly one connection, keyed by the
//! client's id. Stream errors pass through unchanged.

use futures::future::ready;
use futures::stream::{BoxStream, Stream, StreamExt};
use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector, PathSegment, State,
};

use crate::Result;

/// The client-side filter of one connection; see the [module docs](self).
///
/// It is plain state with no I/O, so a handler can drive it from its own loop.
#[derive(Debug, Clone)]
pub struct ClientFilter {
    id: String,
    name: String,
    index: u32,
    last: Option<Connection>,
}

impl ClientFilter {
    /// The filter of the client whose own segment (at `index` in the path) is
    /// `{id, name}`. An empty `name` is not compared.
    pub fn new(id: impl Into<String>, name: impl Into<String>, index: u32) -> Self {
        ClientFilter {
            id: id.into(),
            name: name.into(),
            index,
            last: None,
        }
    }

    /// The selector to subscribe to the next hop with: the client's own segment.
    pub fn selector(&self) -> MonitorScopeSelector {
        MonitorScopeSelector {
            path_segments: vec![PathSegment {
                name: self.name.clone(),
                id: self.id.clone(),
                ..Default::default()
            }],
            network_services: Vec::new(),
        }
    }

    /// The last copy let through, in the client's view.
    pub fn last(&self) -> Option<&Connection> {
        self.last.as_ref()
    }

    /// Filters one event from the server; `None` when nothing new is in it for this
    /// client.
    pub fn apply(&mut self, event: &ConnectionEvent) -> Option<ConnectionEvent> {
        let Ok(kind) = ConnectionEventType::try_from(event.r#type) else {
            tracing::debug!(
                r#type = event.r#type,
                "monitor event of an unknown type ignored"
            );
            return None;
        };
        // Ids are unique, so at most one connection is ours; pick by key for a
        // deterministic answer if a confused server sends several.
        let mine = event
            .connections
            .iter()
            .filter_map(|(key, c)| self.view_of(c).map(|v| (key, v)))
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(_, v)| v);
        let copy = match (kind, mine) {
            (ConnectionEventType::Delete, Some(mut c)) => {
                c.state = State::Down as i32;
                c
            }
            (_, Some(c)) => c,
            (ConnectionEventType::InitialStateTransfer, None) => {
                let mut c = self.last.clone().unwrap_or_else(|| Connection {
                    id: self.id.clone(),
                    ..Default::default()
                });
                c.state = State::Down as i32;
                c
            }
            (_, None) => return None,
        };
        if self.last.as_ref() == Some(&copy) {
            return None;
        }
        self.last = Some(copy.clone());
        Some(ConnectionEvent {
            r#type: ConnectionEventType::Update as i32,
            connections: [(self.id.clone(), copy)].into(),
        })
    }

    /// `conn` in the client's own view, if it is the client's connection as the server
    /// at `index` or `index + 1` sees it.
    fn view_of(&self, conn: &Connection) -> Option<Connection> {
        let path = conn.path.as_ref()?;
        let seg = path.path_segments.get(usize::try_from(self.index).ok()?)?;
        if seg.id != self.id || (!self.name.is_empty() && seg.name != self.name) {
            return None;
        }
        if path.index != self.index && Some(path.index) != self.index.checked_add(1) {
            return None;
        }
        let mut out = conn.clone();
        out.id = self.id.clone();
        if let Some(p) = out.path.as_mut() {
            p.index = self.index;
        }
        Some(out)
    }
}

/// Wraps a next hop's monitor stream in a [`ClientFilter`] for the client whose own
/// segment is `{my_segment_id, my_segment_name}` at `my_index`.
pub fn filter_events<S>(
    my_segment_id: impl Into<String>,
    my_segment_name: impl Into<String>,
    my_index: u32,
    events: S,
) -> BoxStream<'static, Result<ConnectionEvent>>
where
    S: Stream<Item = Result<ConnectionEvent>> + Send + 'static,
{
    let mut filter = ClientFilter::new(my_segment_id, my_segment_name, my_index);
    events
        .filter_map(move |item| {
            ready(match item {
                Ok(event) => filter.apply(&event).map(Ok),
                Err(e) => Some(Err(e)),
            })
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::connection::Path;

    fn seg(name: &str, id: &str) -> PathSegment {
        PathSegment {
            name: name.into(),
            id: id.into(),
            ..Default::default()
        }
    }

    /// The server at index 1 ("nse", id "s") holding the client ("nsc", id "c") of index 0.
    fn server_view() -> Connection {
        Connection {
            id: "s".into(),
            network_service: "vpn".into(),
            path: Some(Path {
                index: 1,
                path_segments: vec![seg("nsc", "c"), seg("nse", "s")],
            }),
            ..Default::default()
        }
    }

    fn event(kind: ConnectionEventType, conns: Vec<Connection>) -> ConnectionEvent {
        ConnectionEvent {
            r#type: kind as i32,
            connections: conns.into_iter().map(|c| (c.id.clone(), c)).collect(),
        }
    }

    fn only(event: ConnectionEvent) -> Connection {
        assert_eq!(event.r#type, ConnectionEventType::Update as i32);
        assert_eq!(event.connections.len(), 1);
        event.connections.into_values().next().unwrap()
    }

    #[test]
    fn rewrites_to_the_clients_view_keeping_the_downstream_path_and_state() {
        let mut f = ClientFilter::new("c", "nsc", 0);
        let mut down = server_view();
        down.labels.insert("k".into(), "v".into());
        let out = only(
            f.apply(&event(ConnectionEventType::Update, vec![down]))
                .unwrap(),
        );
        assert_eq!(out.id, "c");
        let path = out.path.as_ref().unwrap();
        assert_eq!(path.index, 0);
        assert_eq!(path.path_segments.len(), 2);
        assert_eq!(out.labels["k"], "v");
        assert_eq!(out.state, State::Up as i32);
    }

    #[test]
    fn delete_becomes_down_and_unchanged_copies_are_suppressed() {
        let mut f = ClientFilter::new("c", "nsc", 0);
        let up = event(
            ConnectionEventType::InitialStateTransfer,
            vec![server_view()],
        );
        assert!(f.apply(&up).is_some());
        assert!(f.apply(&up).is_none(), "an identical copy is suppressed");
        assert!(f
            .apply(&event(ConnectionEventType::Update, vec![server_view()]))
            .is_none());
        let out = only(
            f.apply(&event(ConnectionEventType::Delete, vec![server_view()]))
                .unwrap(),
        );
        assert_eq!(out.state, State::Down as i32);
        assert_eq!(out.id, "c");
        // Coming back up is a change again.
        let out = only(
            f.apply(&event(ConnectionEventType::Update, vec![server_view()]))
                .unwrap(),
        );
        assert_eq!(out.state, State::Up as i32);
    }

    #[test]
    fn other_connections_and_other_positions_are_ignored() {
        let mut f = ClientFilter::new("c", "nsc", 0);
        let mut other = server_view();
        if let Some(p) = other.path.as_mut() {
            p.path_segments[0].id = "someone-else".into();
        }
        assert!(f
            .apply(&event(ConnectionEventType::Update, vec![other]))
            .is_none());
        // A hop two positions further down sees the same segment 0, but is not our next hop.
        let mut far = server_view();
        if let Some(p) = far.path.as_mut() {
            p.path_segments.push(seg("far", "f"));
            p.index = 2;
        }
        assert!(f
            .apply(&event(ConnectionEventType::Update, vec![far]))
            .is_none());
        // A path too short for our index.
        let mut f1 = ClientFilter::new("c", "nsc", 5);
        assert!(f1
            .apply(&event(ConnectionEventType::Update, vec![server_view()]))
            .is_none());
        // A segment with our id but another name.
        let mut f2 = ClientFilter::new("c", "other-name", 0);
        assert!(f2
            .apply(&event(ConnectionEventType::Update, vec![server_view()]))
            .is_none());
        // An unknown event type from the wire.
        let mut weird = event(ConnectionEventType::Update, vec![server_view()]);
        weird.r#type = 42;
        assert!(f.apply(&weird).is_none());
    }

    #[test]
    fn a_transfer_without_the_connection_means_down() {
        let mut f = ClientFilter::new("c", "nsc", 0);
        let empty = event(ConnectionEventType::InitialStateTransfer, vec![]);
        // Never seen: a bare DOWN with our id.
        let out = only(f.apply(&empty).unwrap());
        assert_eq!((out.id.as_str(), out.state), ("c", State::Down as i32));
        assert!(f.apply(&empty).is_none());
        // Seen, then missing from a re-sync: the last copy, DOWN.
        assert!(f
            .apply(&event(ConnectionEventType::Update, vec![server_view()]))
            .is_some());
        let out = only(f.apply(&empty).unwrap());
        assert_eq!(out.state, State::Down as i32);
        assert_eq!(out.path.unwrap().path_segments.len(), 2);
        // An UPDATE that is not ours says nothing.
        assert!(f
            .apply(&event(ConnectionEventType::Update, vec![]))
            .is_none());
    }

    #[test]
    fn the_selector_is_the_clients_own_segment() {
        let sel = ClientFilter::new("c", "nsc", 0).selector();
        assert_eq!(sel.path_segments, vec![seg("nsc", "c")]);
        assert!(super::super::selector::matches(&server_view(), &sel));
    }

    #[tokio::test]
    async fn filter_events_wraps_a_stream_and_passes_errors_through() {
        let input = futures::stream::iter(vec![
            Ok(event(
                ConnectionEventType::InitialStateTransfer,
                vec![server_view()],
            )),
            Ok(event(ConnectionEventType::Update, vec![server_view()])),
            Err(crate::Error::unavailable("gone")),
            Ok(event(ConnectionEventType::Delete, vec![server_view()])),
        ]);
        let out: Vec<_> = filter_events("c", "nsc", 0, input).collect().await;
        assert_eq!(out.len(), 3);
        assert!(out[1].is_err());
        let last = only(out[2].clone().unwrap());
        assert_eq!(last.state, State::Down as i32);
    }
}
