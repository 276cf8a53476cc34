//! Which connections a `MonitorScopeSelector` selects (docs/SCENARIOS.md 6.6, "Selector
//! matching"), and the per-subscriber view of an event.

use nsm_proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector, PathSegment,
};

/// Whether `conn` is in the scope of `selector`.
///
/// - An empty selector matches every connection.
/// - `network_services`, when not empty, must contain the connection's network service.
/// - `path_segments`, when not empty, must match a *contiguous* run of the connection's
///   path segments, in order. Within a selector segment an empty `name`, `id` or `token`
///   matches anything; `expires` and `metrics` are not compared.
pub fn matches(conn: &Connection, selector: &MonitorScopeSelector) -> bool {
    if !selector.network_services.is_empty()
        && !selector.network_services.contains(&conn.network_service)
    {
        return false;
    }
    let wanted = &selector.path_segments;
    if wanted.is_empty() {
        return true;
    }
    let segments = conn.path.as_ref().map_or(&[][..], |p| &p.path_segments[..]);
    segments.windows(wanted.len()).any(|run| {
        run.iter()
            .zip(wanted)
            .all(|(seg, sel)| segment_matches(seg, sel))
    })
}

fn segment_matches(seg: &PathSegment, sel: &PathSegment) -> bool {
    field_matches(&seg.name, &sel.name)
        && field_matches(&seg.id, &sel.id)
        && field_matches(&seg.token, &sel.token)
}

fn field_matches(value: &str, wanted: &str) -> bool {
    wanted.is_empty() || value == wanted
}

/// Whether the selector selects everything (no network service and no path segment).
pub fn is_empty(selector: &MonitorScopeSelector) -> bool {
    selector.network_services.is_empty() && selector.path_segments.is_empty()
}

/// The part of `event` that a subscriber with `selector` sees: only the connections the
/// selector matches. `None` when an UPDATE or DELETE is left with no connection (such
/// events are not sent); an INITIAL_STATE_TRANSFER is always kept, even when empty.
pub fn scope(event: &ConnectionEvent, selector: &MonitorScopeSelector) -> Option<ConnectionEvent> {
    let initial = event.r#type == ConnectionEventType::InitialStateTransfer as i32;
    if is_empty(selector) {
        return (initial || !event.connections.is_empty()).then(|| event.clone());
    }
    let connections: std::collections::HashMap<_, _> = event
        .connections
        .iter()
        .filter(|(_, c)| matches(c, selector))
        .map(|(k, c)| (k.clone(), c.clone()))
        .collect();
    (initial || !connections.is_empty()).then_some(ConnectionEvent {
        r#type: event.r#type,
        connections,
    })
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

    fn conn(ns: &str, segs: &[(&str, &str)]) -> Connection {
        Connection {
            id: segs.last().map(|s| s.1.to_string()).unwrap_or_default(),
            network_service: ns.into(),
            path: Some(Path {
                index: segs.len().saturating_sub(1) as u32,
                path_segments: segs.iter().map(|(n, i)| seg(n, i)).collect(),
            }),
            ..Default::default()
        }
    }

    fn by_path(segs: &[(&str, &str)]) -> MonitorScopeSelector {
        MonitorScopeSelector {
            path_segments: segs.iter().map(|(n, i)| seg(n, i)).collect(),
            ..Default::default()
        }
    }

    fn local() -> Connection {
        conn(
            "vpn",
            &[("nsc", "a"), ("nsmgr", "b"), ("fwd", "c"), ("nse", "d")],
        )
    }

    #[test]
    fn an_empty_selector_matches_everything() {
        assert!(matches(&local(), &MonitorScopeSelector::default()));
        assert!(matches(
            &Connection::default(),
            &MonitorScopeSelector::default()
        ));
    }

    #[test]
    fn network_services_must_contain_the_connections_service() {
        let sel = |ns: &[&str]| MonitorScopeSelector {
            network_services: ns.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(matches(&local(), &sel(&["other", "vpn"])));
        assert!(!matches(&local(), &sel(&["other"])));
    }

    #[test]
    fn path_segments_match_a_contiguous_run_with_wildcards() {
        let c = local();
        assert!(matches(&c, &by_path(&[("nsmgr", "b"), ("fwd", "c")])));
        assert!(matches(&c, &by_path(&[("", "b"), ("fwd", "")])));
        assert!(matches(&c, &by_path(&[("", "c")])));
        assert!(matches(
            &c,
            &by_path(&[("", ""), ("", ""), ("", ""), ("", "")])
        ));
        assert!(matches(&c, &by_path(&[("", "d")])));
    }

    #[test]
    fn a_non_contiguous_or_out_of_order_run_does_not_match() {
        let c = local();
        assert!(!matches(&c, &by_path(&[("nsc", "a"), ("fwd", "c")])));
        assert!(!matches(&c, &by_path(&[("fwd", "c"), ("nsmgr", "b")])));
        assert!(!matches(&c, &by_path(&[("nsmgr", "x")])));
        // Longer than the path.
        assert!(!matches(&c, &by_path(&[("", ""); 5])));
        // No path at all.
        assert!(!matches(&Connection::default(), &by_path(&[("", "")])));
    }

    #[test]
    fn tokens_are_compared_unless_empty() {
        let mut c = local();
        if let Some(p) = c.path.as_mut() {
            p.path_segments[1].token = "t1".into();
        }
        let mut sel = by_path(&[("nsmgr", "")]);
        sel.path_segments[0].token = "t1".into();
        assert!(matches(&c, &sel));
        sel.path_segments[0].token = "t2".into();
        assert!(!matches(&c, &sel));
    }

    #[test]
    fn both_criteria_must_hold() {
        let mut sel = by_path(&[("", "b")]);
        sel.network_services = vec!["other".into()];
        assert!(!matches(&local(), &sel));
        sel.network_services = vec!["vpn".into()];
        assert!(matches(&local(), &sel));
    }

    #[test]
    fn scope_drops_updates_left_empty_but_keeps_initial_transfers() {
        let c = local();
        let event = |t: ConnectionEventType| ConnectionEvent {
            r#type: t as i32,
            connections: [(c.id.clone(), c.clone())].into(),
        };
        let miss = by_path(&[("", "zzz")]);
        assert!(scope(&event(ConnectionEventType::Update), &miss).is_none());
        assert!(scope(&event(ConnectionEventType::Delete), &miss).is_none());
        let initial = scope(&event(ConnectionEventType::InitialStateTransfer), &miss).unwrap();
        assert!(initial.connections.is_empty());
        let hit = scope(&event(ConnectionEventType::Update), &by_path(&[("", "b")])).unwrap();
        assert_eq!(hit.connections.len(), 1);
    }
}
