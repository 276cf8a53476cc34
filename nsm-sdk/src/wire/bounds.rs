//! The bounds of what a peer may send, checked once at the first hop: every server edge
//! runs [`check_request`], [`check_connection`], [`check_selector`], [`check_ns`] or
//! [`check_nse`] on the message before its chain sees it, so each server refuses
//! oversized input whatever chain it serves.
//!
//! The bounds (issue 14): names (network services, endpoints, connection and segment
//! ids and names, label and parameter keys, mechanism classes and types, payloads) at
//! most [`MAX_NAME_LEN`] bytes (a DNS name's limit, as Kubernetes names); at most
//! [`MAX_LABELS`] entries per label set (labels, mechanism parameters, selectors,
//! metrics, extra context); label values and other strings (URLs, parameter values,
//! addresses) at most [`MAX_VALUE_LEN`]; path tokens at most [`MAX_TOKEN_LEN`] (a JWT
//! carries two SPIFFE IDs, which may be longer than a value); paths at most
//! [`MAX_PATH_SEGMENTS`] segments; other lists at most [`MAX_LIST_LEN`] items; whole
//! messages at most [`MAX_MESSAGE_SIZE`] (set on every tonic server and client).
//!
//! A refusal is [`Error::InvalidArgument`] naming the field and the bound; it never
//! quotes the peer's string. Whatever else quotes one in an error or a log line goes
//! through [`cut`] or [`Shown`], which keep at most [`MAX_SHOWN`] bytes of it.
//!
//! State: none. Failure handled: hostile input (too long, too many), refused before any
//! handler runs; counts are checked before contents, so a message with 10,000 labels
//! costs one comparison.

use std::collections::HashMap;
use std::fmt;

use nsm_proto::connection::{Connection, Mechanism, MonitorScopeSelector, Path, PathSegment};
use nsm_proto::connectioncontext::ConnectionContext;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use crate::error::{Error, Result};

/// The longest name, in bytes: network services, endpoints, ids, segment names, keys.
pub const MAX_NAME_LEN: usize = 253;
/// The most entries of one label set (labels, parameters, selectors, metrics).
pub const MAX_LABELS: usize = 64;
/// The longest label value or other string (URLs, parameter values, addresses), in bytes.
pub const MAX_VALUE_LEN: usize = 1024;
/// The longest path token, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// The most segments of a path (and of a selector's path, and of `path_ids`).
///
/// 64, not the 32 first asked for (issue 14): a chain of seven passthrough endpoints
/// on seven nodes, one of the scenarios (docs/SCENARIOS.md 5.1 item 8), makes a path
/// of 40 segments.
pub const MAX_PATH_SEGMENTS: usize = 64;
/// The most items of any other list (mechanism preferences, addresses, routes, matches).
pub const MAX_LIST_LEN: usize = 1024;
/// The largest gRPC message a server or client encodes or decodes, in bytes.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// The most bytes of a peer's string that an error or a log line shows.
pub const MAX_SHOWN: usize = 256;

/// Cuts a string from a peer or a file to at most `max` bytes (on a char boundary,
/// `...` added when cut), so that a hostile value never lands whole in an error or a
/// log line.
pub fn cut(s: &str, max: usize) -> String {
    let shown = prefix(s, max);
    if shown.len() == s.len() {
        s.to_string()
    } else {
        format!("{shown}...")
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A peer's string as a log field or in a message: displays at most [`MAX_SHOWN`]
/// bytes of it (`...` added when cut), without allocating.
///
/// ```
/// # use nsm_sdk::wire::bounds::Shown;
/// let name = "x".repeat(10_000);
/// tracing::debug!(name = %Shown(&name), "registered");
/// assert_eq!(Shown(&name).to_string().len(), 256 + 3);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = prefix(self.0, MAX_SHOWN);
        f.write_str(shown)?;
        if shown.len() < self.0.len() {
            f.write_str("...")?;
        }
        Ok(())
    }
}

fn too_long(field: &str, len: usize, max: usize) -> Error {
    Error::invalid(format!("{field}: {len} bytes, at most {max}"))
}

fn too_many(field: &str, what: &str, n: usize, max: usize) -> Error {
    Error::invalid(format!("{field}: {n} {what}, at most {max}"))
}

fn len(field: &str, s: &str, max: usize) -> Result<()> {
    if s.len() > max {
        return Err(too_long(field, s.len(), max));
    }
    Ok(())
}

fn name(field: &str, s: &str) -> Result<()> {
    len(field, s, MAX_NAME_LEN)
}

fn value(field: &str, s: &str) -> Result<()> {
    len(field, s, MAX_VALUE_LEN)
}

fn count(field: &str, n: usize, max: usize) -> Result<()> {
    if n > max {
        return Err(too_many(field, "items", n, max));
    }
    Ok(())
}

fn values(field: &str, list: &[String], max_items: usize, max_len: usize) -> Result<()> {
    count(field, list.len(), max_items)?;
    list.iter().try_for_each(|s| len(field, s, max_len))
}

/// A label set: at most [`MAX_LABELS`] entries, keys names, values values.
fn labels(field: &str, set: &HashMap<String, String>) -> Result<()> {
    if set.len() > MAX_LABELS {
        return Err(too_many(field, "labels", set.len(), MAX_LABELS));
    }
    for (k, v) in set {
        if k.len() > MAX_NAME_LEN {
            return Err(Error::invalid(format!(
                "{field}: a key of {} bytes, at most {MAX_NAME_LEN}",
                k.len()
            )));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(Error::invalid(format!(
                "{field}: a value of {} bytes, at most {MAX_VALUE_LEN}",
                v.len()
            )));
        }
    }
    Ok(())
}

/// Checks a Request: its mechanism preferences and its connection.
pub fn check_request(req: &NetworkServiceRequest) -> Result<()> {
    count(
        "mechanism_preferences",
        req.mechanism_preferences.len(),
        MAX_LIST_LEN,
    )?;
    for m in &req.mechanism_preferences {
        mechanism("mechanism_preferences", m)?;
    }
    match &req.connection {
        Some(conn) => check_connection(conn),
        None => Ok(()),
    }
}

/// Checks a connection (a Request's, or a Close's).
pub fn check_connection(conn: &Connection) -> Result<()> {
    // The cheap counts first: a message with 10,000 labels is refused at once.
    labels("connection.labels", &conn.labels)?;
    if let Some(p) = &conn.path {
        path("connection.path", p)?;
    }
    name("connection.id", &conn.id)?;
    name("connection.network_service", &conn.network_service)?;
    name(
        "connection.network_service_endpoint_name",
        &conn.network_service_endpoint_name,
    )?;
    name("connection.payload", &conn.payload)?;
    if let Some(m) = &conn.mechanism {
        mechanism("connection.mechanism", m)?;
    }
    if let Some(c) = &conn.context {
        context(c)?;
    }
    Ok(())
}

fn mechanism(field: &str, m: &Mechanism) -> Result<()> {
    labels(field, &m.parameters)?;
    name(field, &m.cls)?;
    name(field, &m.r#type)
}

fn path(field: &str, p: &Path) -> Result<()> {
    segments(field, &p.path_segments)
}

fn segments(field: &str, segs: &[PathSegment]) -> Result<()> {
    if segs.len() > MAX_PATH_SEGMENTS {
        return Err(too_many(field, "segments", segs.len(), MAX_PATH_SEGMENTS));
    }
    for s in segs {
        name("path_segments.name", &s.name)?;
        name("path_segments.id", &s.id)?;
        len("path_segments.token", &s.token, MAX_TOKEN_LEN)?;
        labels("path_segments.metrics", &s.metrics)?;
    }
    Ok(())
}

fn context(c: &ConnectionContext) -> Result<()> {
    labels("context.extra_context", &c.extra_context)?;
    if let Some(ip) = &c.ip_context {
        for (field, list) in [
            ("context.ip_context.src_ip_addrs", &ip.src_ip_addrs),
            ("context.ip_context.dst_ip_addrs", &ip.dst_ip_addrs),
            (
                "context.ip_context.excluded_prefixes",
                &ip.excluded_prefixes,
            ),
            ("context.ip_context.extra_prefixes", &ip.extra_prefixes),
        ] {
            values(field, list, MAX_LIST_LEN, MAX_VALUE_LEN)?;
        }
        for (field, routes) in [
            ("context.ip_context.src_routes", &ip.src_routes),
            ("context.ip_context.dst_routes", &ip.dst_routes),
        ] {
            count(field, routes.len(), MAX_LIST_LEN)?;
            for r in routes {
                value(field, &r.prefix)?;
                value(field, &r.next_hop)?;
            }
        }
        let field = "context.ip_context.ip_neighbors";
        count(field, ip.ip_neighbors.len(), MAX_LIST_LEN)?;
        for n in &ip.ip_neighbors {
            value(field, &n.ip)?;
            value(field, &n.hardware_address)?;
        }
        count(
            "context.ip_context.extra_prefix_request",
            ip.extra_prefix_request.len(),
            MAX_LIST_LEN,
        )?;
        let field = "context.ip_context.policies";
        count(field, ip.policies.len(), MAX_LIST_LEN)?;
        for p in &ip.policies {
            for s in [&p.from, &p.proto, &p.dst_port, &p.src_port] {
                value(field, s)?;
            }
            count(field, p.routes.len(), MAX_LIST_LEN)?;
            for r in &p.routes {
                value(field, &r.prefix)?;
                value(field, &r.next_hop)?;
            }
        }
    }
    if let Some(dns) = &c.dns_context {
        let field = "context.dns_context.configs";
        count(field, dns.configs.len(), MAX_LIST_LEN)?;
        for cfg in &dns.configs {
            values(field, &cfg.dns_server_ips, MAX_LIST_LEN, MAX_VALUE_LEN)?;
            values(field, &cfg.search_domains, MAX_LIST_LEN, MAX_VALUE_LEN)?;
        }
    }
    if let Some(eth) = &c.ethernet_context {
        value("context.ethernet_context.src_mac", &eth.src_mac)?;
        value("context.ethernet_context.dst_mac", &eth.dst_mac)?;
    }
    Ok(())
}

/// Checks a MonitorConnection selector: its path and network service names.
pub fn check_selector(sel: &MonitorScopeSelector) -> Result<()> {
    segments("selector.path_segments", &sel.path_segments)?;
    values(
        "selector.network_services",
        &sel.network_services,
        MAX_LIST_LEN,
        MAX_NAME_LEN,
    )
}

/// Checks a network service (a Register, an Unregister or a Find's template).
pub fn check_ns(ns: &NetworkService) -> Result<()> {
    name("network_service.name", &ns.name)?;
    name("network_service.payload", &ns.payload)?;
    values(
        "network_service.path_ids",
        &ns.path_ids,
        MAX_PATH_SEGMENTS,
        MAX_NAME_LEN,
    )?;
    let field = "network_service.matches";
    count(field, ns.matches.len(), MAX_LIST_LEN)?;
    for m in &ns.matches {
        labels(
            "network_service.matches.source_selector",
            &m.source_selector,
        )?;
        if let Some(meta) = &m.metadata {
            labels("network_service.matches.metadata.labels", &meta.labels)?;
        }
        count(field, m.routes.len(), MAX_LIST_LEN)?;
        for r in &m.routes {
            labels(
                "network_service.matches.routes.destination_selector",
                &r.destination_selector,
            )?;
        }
    }
    Ok(())
}

/// Checks a network service endpoint (a Register, an Unregister or a Find's template).
pub fn check_nse(nse: &NetworkServiceEndpoint) -> Result<()> {
    name("network_service_endpoint.name", &nse.name)?;
    value("network_service_endpoint.url", &nse.url)?;
    values(
        "network_service_endpoint.network_service_names",
        &nse.network_service_names,
        MAX_LIST_LEN,
        MAX_NAME_LEN,
    )?;
    values(
        "network_service_endpoint.path_ids",
        &nse.path_ids,
        MAX_PATH_SEGMENTS,
        MAX_NAME_LEN,
    )?;
    let field = "network_service_endpoint.network_service_labels";
    count(field, nse.network_service_labels.len(), MAX_LIST_LEN)?;
    for (service, set) in &nse.network_service_labels {
        name(field, service)?;
        labels(field, &set.labels)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::registry::{Destination, Match, NetworkServiceLabels};
    use tonic::Code;

    fn big(n: usize) -> String {
        "x".repeat(n)
    }

    fn set(n: usize) -> HashMap<String, String> {
        (0..n).map(|i| (format!("k{i}"), "v".into())).collect()
    }

    fn conn() -> Connection {
        Connection {
            id: "id".into(),
            network_service: "svc".into(),
            ..Default::default()
        }
    }

    fn refused(r: Result<()>, field: &str, bound: usize) {
        let e = r.expect_err("over the bound");
        assert_eq!(e.code(), Code::InvalidArgument);
        let msg = e.to_string();
        assert!(msg.contains(field), "{msg} does not name {field}");
        assert!(msg.contains(&format!("at most {bound}")), "{msg}");
        assert!(msg.len() < MAX_SHOWN, "{msg}");
    }

    #[test]
    fn names_pass_at_the_bound_and_fail_one_over() {
        let at = Connection {
            network_service: big(MAX_NAME_LEN),
            ..conn()
        };
        check_connection(&at).unwrap();
        let over = Connection {
            network_service: big(MAX_NAME_LEN + 1),
            ..conn()
        };
        refused(
            check_connection(&over),
            "connection.network_service",
            MAX_NAME_LEN,
        );
    }

    #[test]
    fn label_sets_pass_at_the_bound_and_fail_one_over() {
        let mut c = Connection {
            labels: set(MAX_LABELS),
            ..conn()
        };
        check_connection(&c).unwrap();
        c.labels = set(MAX_LABELS + 1);
        refused(check_connection(&c), "connection.labels", MAX_LABELS);
        c.labels = HashMap::from([(big(MAX_NAME_LEN + 1), "v".into())]);
        refused(check_connection(&c), "connection.labels", MAX_NAME_LEN);
        c.labels = HashMap::from([("k".into(), big(MAX_VALUE_LEN))]);
        check_connection(&c).unwrap();
        c.labels = HashMap::from([("k".into(), big(MAX_VALUE_LEN + 1))]);
        refused(check_connection(&c), "connection.labels", MAX_VALUE_LEN);
    }

    #[test]
    fn paths_pass_at_the_bound_and_fail_one_over() {
        let path = |n| Path {
            index: 0,
            path_segments: vec![PathSegment::default(); n],
        };
        let mut c = Connection {
            path: Some(path(MAX_PATH_SEGMENTS)),
            ..conn()
        };
        check_connection(&c).unwrap();
        c.path = Some(path(MAX_PATH_SEGMENTS + 1));
        refused(check_connection(&c), "connection.path", MAX_PATH_SEGMENTS);
        c.path = Some(Path {
            index: 0,
            path_segments: vec![PathSegment {
                token: big(MAX_TOKEN_LEN + 1),
                ..Default::default()
            }],
        });
        refused(check_connection(&c), "path_segments.token", MAX_TOKEN_LEN);
    }

    #[test]
    fn mechanism_parameters_are_a_label_set() {
        let m = |parameters| Mechanism {
            cls: "LOCAL".into(),
            r#type: "KERNEL".into(),
            parameters,
        };
        let req = NetworkServiceRequest {
            connection: Some(conn()),
            mechanism_preferences: vec![m(HashMap::from([(
                "inodeURL".into(),
                big(MAX_VALUE_LEN + 1),
            )]))],
        };
        refused(check_request(&req), "mechanism_preferences", MAX_VALUE_LEN);
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                mechanism: Some(m(set(MAX_LABELS + 1))),
                ..conn()
            }),
            mechanism_preferences: vec![],
        };
        refused(check_request(&req), "connection.mechanism", MAX_LABELS);
    }

    #[test]
    fn registry_entries_have_the_same_bounds() {
        let nse = NetworkServiceEndpoint {
            name: big(MAX_NAME_LEN),
            url: big(MAX_VALUE_LEN),
            network_service_names: vec![big(MAX_NAME_LEN)],
            network_service_labels: HashMap::from([(
                "svc".into(),
                NetworkServiceLabels {
                    labels: set(MAX_LABELS),
                },
            )]),
            ..Default::default()
        };
        check_nse(&nse).unwrap();
        let over = NetworkServiceEndpoint {
            url: big(MAX_VALUE_LEN + 1),
            ..nse.clone()
        };
        refused(
            check_nse(&over),
            "network_service_endpoint.url",
            MAX_VALUE_LEN,
        );
        let over = NetworkServiceEndpoint {
            name: big(10_000),
            ..nse
        };
        refused(
            check_nse(&over),
            "network_service_endpoint.name",
            MAX_NAME_LEN,
        );

        let ns = NetworkService {
            name: "svc".into(),
            matches: vec![Match {
                routes: vec![Destination {
                    destination_selector: set(MAX_LABELS + 1),
                    weight: 1,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        refused(check_ns(&ns), "destination_selector", MAX_LABELS);
    }

    #[test]
    fn selectors_are_bounded_like_paths() {
        let sel = MonitorScopeSelector {
            path_segments: vec![PathSegment::default(); MAX_PATH_SEGMENTS + 1],
            network_services: vec![],
        };
        refused(
            check_selector(&sel),
            "selector.path_segments",
            MAX_PATH_SEGMENTS,
        );
        let sel = MonitorScopeSelector {
            path_segments: vec![],
            network_services: vec![big(MAX_NAME_LEN + 1)],
        };
        refused(
            check_selector(&sel),
            "selector.network_services",
            MAX_NAME_LEN,
        );
    }

    #[test]
    fn cut_and_shown_keep_at_most_the_bound_on_a_char_boundary() {
        assert_eq!(cut("abc", 256), "abc");
        let long = "é".repeat(300);
        let c = cut(&long, 255);
        assert_eq!(c.len(), 254 + 3);
        assert!(c.ends_with("..."));
        assert_eq!(Shown("abc").to_string(), "abc");
        let s = Shown(&long).to_string();
        assert_eq!(s.len(), MAX_SHOWN + 3);
        assert_eq!(Shown(&"y".repeat(MAX_SHOWN)).to_string().len(), MAX_SHOWN);
    }
}
