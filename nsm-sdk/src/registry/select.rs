//! Endpoint and forwarder selection: which registered endpoints may serve a request.
//!
//! Pure functions, no I/O: [`match_endpoints`] applies a network service's `matches` to
//! the request's labels (docs/SCENARIOS.md 6.7, "Endpoint selection"); [`forwarder_labels`]
//! and [`match_forwarders`] do the same for forwarders ("Forwarder selection").
//!
//! Selector values may be templates evaluated against the request labels, as in the Go
//! SDK: `nodeName: "{{.nodeName}}"` (spaces inside the braces are fine, text around the
//! braces is kept: `"node-{{ .id }}"`). A template naming a label the request does not
//! have makes the selector fail to match; a value that is not a well-formed template
//! (`"{{"`, `"{{nodeName}}"`, `"{{.a.b}}"`) is compared literally.

use std::collections::HashMap;
use std::time::SystemTime;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

/// The network service forwarders register for.
pub const FORWARDER_SERVICE: &str = "forwarder";

/// The labels a forwarder must have when the network service asks for none: `p2p=true`.
pub fn default_forwarder_labels() -> HashMap<String, String> {
    HashMap::from([("p2p".to_string(), "true".to_string())])
}

/// Evaluates the template `value` against `vars`.
///
/// `Some(text)`: the value with every `{{.key}}` replaced by `vars[key]` (or the value
/// itself when it is not a well-formed template). `None`: a key is missing from `vars`.
pub fn render_template(value: &str, vars: &HashMap<String, String>) -> Option<String> {
    if !value.contains("{{") {
        return Some(value.to_string());
    }
    let literal = Some(value.to_string());
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return literal;
        };
        let Some(key) = after[..close].trim().strip_prefix('.') else {
            return literal;
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return literal;
        }
        out.push_str(vars.get(key)?);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Some(out)
}

/// Whether every entry of `selector` (values rendered against `vars`) is in `labels`.
/// An empty selector matches anything.
pub fn selector_matches(
    labels: &HashMap<String, String>,
    selector: &HashMap<String, String>,
    vars: &HashMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(k, v)| match render_template(v, vars) {
            Some(want) => labels.get(k) == Some(&want),
            None => false,
        })
}

/// The labels `nse` has for the network service `service` (empty when it has none).
fn service_labels<'a>(
    nse: &'a NetworkServiceEndpoint,
    service: &str,
) -> Option<&'a HashMap<String, String>> {
    nse.network_service_labels.get(service).map(|l| &l.labels)
}

/// The endpoints of `nses` that may serve a request for `ns` with `labels`, in order.
///
/// - No `matches`: every endpoint.
/// - Otherwise the first match whose `source_selector` is a subset of `labels` decides:
///   the candidates are the endpoints whose labels for `ns` contain some route's
///   `destination_selector` (in route order, each endpoint once). If the match has
///   `fallthrough` and there is no candidate, the next match decides. If it has
///   `metadata` but no routes (so no candidate), every endpoint. Otherwise the
///   candidates, even if there are none.
/// - No match applies: none.
pub fn match_endpoints(
    ns: &NetworkService,
    labels: &HashMap<String, String>,
    nses: &[NetworkServiceEndpoint],
) -> Vec<NetworkServiceEndpoint> {
    if ns.matches.is_empty() {
        return nses.to_vec();
    }
    let empty = HashMap::new();
    for m in &ns.matches {
        if !selector_matches(labels, &m.source_selector, labels) {
            continue;
        }
        let mut picked = vec![false; nses.len()];
        let mut candidates = Vec::new();
        for route in &m.routes {
            for (i, nse) in nses.iter().enumerate() {
                let have = service_labels(nse, &ns.name).unwrap_or(&empty);
                if !picked[i] && selector_matches(have, &route.destination_selector, labels) {
                    picked[i] = true;
                    candidates.push(nse.clone());
                }
            }
        }
        if m.fallthrough && candidates.is_empty() {
            continue;
        }
        if m.metadata.is_some() && m.routes.is_empty() && candidates.is_empty() {
            return nses.to_vec();
        }
        return candidates;
    }
    Vec::new()
}

/// The labels a forwarder must have to carry a request for `ns` with `labels`: the
/// `metadata.labels` of the first match whose source selector applies, or
/// [`default_forwarder_labels`] when there is no such match or its labels are empty.
pub fn forwarder_labels(
    ns: Option<&NetworkService>,
    labels: &HashMap<String, String>,
) -> HashMap<String, String> {
    ns.and_then(|ns| {
        ns.matches
            .iter()
            .find(|m| selector_matches(labels, &m.source_selector, labels))
    })
    .and_then(|m| m.metadata.as_ref())
    .filter(|md| !md.labels.is_empty())
    .map(|md| md.labels.clone())
    .unwrap_or_else(default_forwarder_labels)
}

/// The forwarders whose labels for [`FORWARDER_SERVICE`] contain every `wanted` label,
/// in order.
pub fn match_forwarders(
    wanted: &HashMap<String, String>,
    forwarders: &[NetworkServiceEndpoint],
) -> Vec<NetworkServiceEndpoint> {
    let empty = HashMap::new();
    forwarders
        .iter()
        .filter(|f| {
            let have = service_labels(f, FORWARDER_SERVICE).unwrap_or(&empty);
            wanted.iter().all(|(k, v)| have.get(k) == Some(v))
        })
        .cloned()
        .collect()
}

/// Whether `nse` expired before `now` (no expiration time: never).
pub fn is_expired(nse: &NetworkServiceEndpoint, now: SystemTime) -> bool {
    let Some(exp) = nse.expiration_time.as_ref() else {
        return false;
    };
    let now = prost_types::Timestamp::from(now);
    (exp.seconds, exp.nanos) < (now.seconds, now.nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::registry::{Destination, Match, Metadata, NetworkServiceLabels};
    use std::time::Duration;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn nse(name: &str, service: &str, labels: &[(&str, &str)]) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec![service.into()],
            network_service_labels: HashMap::from([(
                service.to_string(),
                NetworkServiceLabels {
                    labels: map(labels),
                },
            )]),
            url: format!("inmem://{name}"),
            ..Default::default()
        }
    }

    fn route(selector: &[(&str, &str)]) -> Destination {
        Destination {
            destination_selector: map(selector),
            weight: 0,
        }
    }

    fn m(source: &[(&str, &str)], routes: Vec<Destination>) -> Match {
        Match {
            source_selector: map(source),
            routes,
            ..Default::default()
        }
    }

    fn ns(matches: Vec<Match>) -> NetworkService {
        NetworkService {
            name: "svc".into(),
            matches,
            ..Default::default()
        }
    }

    fn names(nses: &[NetworkServiceEndpoint]) -> Vec<&str> {
        nses.iter().map(|n| n.name.as_str()).collect()
    }

    fn three() -> Vec<NetworkServiceEndpoint> {
        vec![
            nse("a", "svc", &[("color", "red")]),
            nse("b", "svc", &[("color", "blue"), ("nodeName", "node-1")]),
            nse("c", "svc", &[("nodeName", "node-2")]),
        ]
    }

    #[test]
    fn a_service_without_matches_takes_every_endpoint() {
        let got = match_endpoints(&ns(vec![]), &map(&[("x", "y")]), &three());
        assert_eq!(names(&got), ["a", "b", "c"]);
    }

    #[test]
    fn the_first_applicable_match_decides_by_destination_selectors() {
        let service = ns(vec![
            m(&[("app", "other")], vec![route(&[("color", "red")])]),
            m(&[("app", "x")], vec![route(&[("color", "blue")])]),
            m(&[], vec![route(&[("nodeName", "node-2")])]),
        ]);
        let got = match_endpoints(&service, &map(&[("app", "x")]), &three());
        assert_eq!(names(&got), ["b"]);
        let got = match_endpoints(&service, &map(&[("app", "other")]), &three());
        assert_eq!(names(&got), ["a"]);
        let got = match_endpoints(&service, &map(&[]), &three());
        assert_eq!(names(&got), ["c"]);
    }

    #[test]
    fn candidates_follow_route_order_and_appear_once() {
        let service = ns(vec![m(
            &[],
            vec![
                route(&[("nodeName", "node-2")]),
                route(&[("color", "red")]),
                route(&[]),
            ],
        )]);
        let got = match_endpoints(&service, &map(&[]), &three());
        assert_eq!(names(&got), ["c", "a", "b"]);
    }

    #[test]
    fn a_match_without_candidates_returns_none_unless_it_falls_through() {
        let strict = ns(vec![
            m(&[], vec![route(&[("color", "green")])]),
            m(&[], vec![route(&[("color", "red")])]),
        ]);
        assert!(match_endpoints(&strict, &map(&[]), &three()).is_empty());

        let mut first = m(&[], vec![route(&[("color", "green")])]);
        first.fallthrough = true;
        let falls = ns(vec![first, m(&[], vec![route(&[("color", "red")])])]);
        assert_eq!(names(&match_endpoints(&falls, &map(&[]), &three())), ["a"]);
    }

    #[test]
    fn falling_through_past_the_last_match_yields_none() {
        let mut only = m(&[], vec![route(&[("color", "green")])]);
        only.fallthrough = true;
        assert!(match_endpoints(&ns(vec![only]), &map(&[]), &three()).is_empty());
    }

    #[test]
    fn no_applicable_source_selector_yields_none() {
        let service = ns(vec![m(&[("app", "x")], vec![route(&[])])]);
        assert!(match_endpoints(&service, &map(&[("app", "y")]), &three()).is_empty());
        assert!(match_endpoints(&service, &map(&[]), &three()).is_empty());
    }

    #[test]
    fn a_metadata_only_match_takes_every_endpoint() {
        let mut meta = m(&[], vec![]);
        meta.metadata = Some(Metadata {
            labels: map(&[("p2mp", "true")]),
        });
        let got = match_endpoints(&ns(vec![meta.clone()]), &map(&[]), &three());
        assert_eq!(names(&got), ["a", "b", "c"]);
        // Without metadata, a match with no routes has no candidate.
        meta.metadata = None;
        assert!(match_endpoints(&ns(vec![meta]), &map(&[]), &three()).is_empty());
    }

    #[test]
    fn destination_templates_are_evaluated_against_the_request_labels() {
        let service = ns(vec![m(&[], vec![route(&[("nodeName", "{{.nodeName}}")])])]);
        let got = match_endpoints(&service, &map(&[("nodeName", "node-2")]), &three());
        assert_eq!(names(&got), ["c"]);
        let spaced = ns(vec![m(
            &[],
            vec![route(&[("nodeName", "{{ .nodeName }}")])],
        )]);
        let got = match_endpoints(&spaced, &map(&[("nodeName", "node-1")]), &three());
        assert_eq!(names(&got), ["b"]);
        // A request without the label matches nothing through that selector.
        assert!(match_endpoints(&service, &map(&[]), &three()).is_empty());
    }

    #[test]
    fn source_selector_templates_are_evaluated_too() {
        let service = ns(vec![
            m(&[("peer", "{{.app}}")], vec![route(&[("color", "red")])]),
            m(&[], vec![route(&[("color", "blue")])]),
        ]);
        let same = map(&[("app", "x"), ("peer", "x")]);
        assert_eq!(names(&match_endpoints(&service, &same, &three())), ["a"]);
        let other = map(&[("app", "x"), ("peer", "y")]);
        assert_eq!(names(&match_endpoints(&service, &other, &three())), ["b"]);
    }

    #[test]
    fn templates_render_text_around_keys_and_malformed_ones_literally() {
        let vars = map(&[("id", "7"), ("zone", "eu")]);
        assert_eq!(render_template("plain", &vars).as_deref(), Some("plain"));
        assert_eq!(
            render_template("node-{{.id}}-{{ .zone }}", &vars).as_deref(),
            Some("node-7-eu")
        );
        assert_eq!(render_template("{{.missing}}", &vars), None);
        for literal in [
            "{{",
            "{{.id",
            "{{id}}",
            "{{.}}",
            "{{.a.b}}",
            "{{ .a b }}",
            "}}{{",
        ] {
            assert_eq!(
                render_template(literal, &vars).as_deref(),
                Some(literal),
                "{literal}"
            );
        }
        // A malformed template matches only the same literal text.
        let have = map(&[("k", "{{nodeName}}")]);
        assert!(selector_matches(
            &have,
            &map(&[("k", "{{nodeName}}")]),
            &vars
        ));
    }

    #[test]
    fn forwarder_labels_come_from_the_first_applicable_match_or_default_to_p2p() {
        assert_eq!(forwarder_labels(None, &map(&[])), map(&[("p2p", "true")]));
        let mut special = m(&[("app", "special")], vec![]);
        special.metadata = Some(Metadata {
            labels: map(&[("special", "true")]),
        });
        let mut p2mp = m(&[], vec![]);
        p2mp.metadata = Some(Metadata {
            labels: map(&[("p2mp", "true")]),
        });
        let service = ns(vec![special, p2mp.clone()]);
        assert_eq!(
            forwarder_labels(Some(&service), &map(&[("app", "special")])),
            map(&[("special", "true")])
        );
        assert_eq!(
            forwarder_labels(Some(&service), &map(&[])),
            map(&[("p2mp", "true")])
        );
        // The NS updated with empty metadata labels: back to the default.
        p2mp.metadata = Some(Metadata::default());
        assert_eq!(
            forwarder_labels(Some(&ns(vec![p2mp])), &map(&[])),
            map(&[("p2p", "true")])
        );
    }

    #[test]
    fn forwarders_are_filtered_by_their_forwarder_labels() {
        let fwds = vec![
            nse("fwd-p2mp", FORWARDER_SERVICE, &[("p2mp", "true")]),
            nse("fwd-p2p", FORWARDER_SERVICE, &[("p2p", "true")]),
            nse(
                "fwd-special",
                FORWARDER_SERVICE,
                &[("special", "true"), ("p2p", "true")],
            ),
            nse("unlabelled", "other", &[("p2p", "true")]),
        ];
        let got = match_forwarders(&default_forwarder_labels(), &fwds);
        assert_eq!(names(&got), ["fwd-p2p", "fwd-special"]);
        let got = match_forwarders(&map(&[("p2mp", "true")]), &fwds);
        assert_eq!(names(&got), ["fwd-p2mp"]);
        assert_eq!(match_forwarders(&map(&[]), &fwds).len(), 4);
    }

    #[test]
    fn expiry_is_compared_with_now_and_absent_means_never() {
        let now = SystemTime::now();
        let mut e = nse("a", "svc", &[]);
        assert!(!is_expired(&e, now));
        e.expiration_time = Some((now - Duration::from_secs(1)).into());
        assert!(is_expired(&e, now));
        e.expiration_time = Some((now + Duration::from_secs(60)).into());
        assert!(!is_expired(&e, now));
    }
}
