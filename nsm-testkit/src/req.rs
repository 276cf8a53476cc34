//! The requests and path reads every suite builds.

use std::collections::HashMap;

use nsm_proto::connection::Connection;
use nsm_proto::connectioncontext::ConnectionContext;
use nsm_proto::networkservice::NetworkServiceRequest;

/// A first Request for a fresh connection to `service` (no id, no mechanism
/// preferences: the client chain adds its own).
pub fn request(service: &str) -> NetworkServiceRequest {
    request_with_context(service, None)
}

/// A first Request for `service` whose connection carries `labels`.
pub fn request_labelled(service: &str, labels_: &[(&str, &str)]) -> NetworkServiceRequest {
    let mut req = request(service);
    if let Some(c) = req.connection.as_mut() {
        c.labels = labels(labels_);
    }
    req
}

/// A first Request for `service` with a connection context (an MTU, addresses...).
pub fn request_with_context(
    service: &str,
    context: Option<ConnectionContext>,
) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: service.into(),
            context,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A refresh of `conn`: the same connection, sent again.
pub fn refresh(conn: &Connection) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(conn.clone()),
        ..Default::default()
    }
}

/// The names of the path segments of `conn`, client first.
pub fn names(conn: &Connection) -> Vec<String> {
    conn.path
        .as_ref()
        .map(|p| p.path_segments.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default()
}

/// Labels from `key, value` pairs.
pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A client `name` of `mesh`'s node `node` that never refreshes (a dead client): its
/// path tokens live `token_lifetime`, so the mesh's `timeout` closes its connections
/// soon after. NOOP mechanism, no retry.
pub fn client_without_refresh(
    mesh: &nsm_sdk::sandbox::Sandbox,
    node: usize,
    name: &str,
    token_lifetime: std::time::Duration,
) -> nsm_sdk::Chain {
    use nsm_sdk::handlers::{begin, client_url, noop_client, update_path, update_token};
    nsm_sdk::Chain::builder()
        .push(update_path(name))
        .push(begin())
        .push(update_token(mesh.security().tokens(token_lifetime)))
        .push(noop_client())
        .push(client_url(mesh.node(node).nsmgr_url().clone()))
        .push(nsm_sdk::transport::grpc_client(mesh.channels()))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::connection::{Path, PathSegment};

    #[test]
    fn requests_carry_the_service_labels_and_context() {
        let r = request_labelled("icmp", &[("app", "x")]);
        let c = r.connection.unwrap();
        assert_eq!(c.network_service, "icmp");
        assert_eq!(c.labels["app"], "x");
        assert!(c.id.is_empty() && r.mechanism_preferences.is_empty());
        let ctx = ConnectionContext {
            mtu: 1400,
            ..Default::default()
        };
        let r = request_with_context("icmp", Some(ctx));
        assert_eq!(r.connection.unwrap().context.unwrap().mtu, 1400);
    }

    #[test]
    fn names_and_refresh_read_the_connection() {
        let conn = Connection {
            id: "c".into(),
            path: Some(Path {
                path_segments: vec![
                    PathSegment {
                        name: "nsc".into(),
                        ..Default::default()
                    },
                    PathSegment {
                        name: "nse".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(names(&conn), ["nsc", "nse"]);
        assert_eq!(refresh(&conn).connection.unwrap().id, "c");
        assert!(names(&Connection::default()).is_empty());
    }
}
