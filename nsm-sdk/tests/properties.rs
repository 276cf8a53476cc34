//! Property tests (in place of fuzzing, which needs nightly): arbitrary and adversarial
//! input thrown at what reads input from outside: the input bounds a server edge checks
//! ([`nsm_sdk::wire::bounds`]), the NS URL parser, NetworkService files and the monitor
//! selector. Properties: nothing panics; accepted input satisfies the bounds or
//! round-trips; refusals are short.
//!
//! Cases per property: `PROPTEST_CASES` (256 when unset). A failing case is kept in
//! `proptest-regressions/properties.txt` (committed) and replayed first on every run;
//! [`CORPUS`] holds hand-picked hostile inputs that every run tries too.

use std::collections::{BTreeMap, HashMap};

use nsm_sdk::config::ns_file;
use nsm_sdk::config::NsUrl;
use nsm_sdk::handlers::monitor::selector;
use nsm_sdk::proto::connection::{
    Connection, ConnectionEvent, ConnectionEventType, Mechanism, MonitorScopeSelector, Path,
    PathSegment,
};
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::proto::registry::{
    Destination, Match, Metadata, NetworkService, NetworkServiceEndpoint, NetworkServiceLabels,
};
use nsm_sdk::wire::bounds::{
    self, MAX_LABELS, MAX_NAME_LEN, MAX_PATH_SEGMENTS, MAX_SHOWN, MAX_TOKEN_LEN, MAX_VALUE_LEN,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Value};

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/properties.txt"
        )))),
        // ProptestConfig::default() reads PROPTEST_CASES (256 when unset).
        ..ProptestConfig::default()
    }
}

/// Hostile text for the parsers: escapes, separators, control characters, long runs.
const CORPUS: &[&str] = &[
    "",
    "://",
    "kernel://",
    "kernel:///",
    "kernel://@",
    "kernel://a@",
    "kernel://@b",
    "kernel://svc:80",
    "kernel://svc/..",
    "kernel://svc/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p",
    "kernel://svc?",
    "kernel://svc?=",
    "kernel://svc?&&&",
    "kernel://svc?a=%",
    "kernel://svc?a=%zz",
    "kernel://svc?a=%ff%fe",
    "kernel://svc?a=%00",
    "kernel://%e2%82",
    "kernel://svc/%2f",
    "k\u{0}://s",
    "\u{feff}kernel://svc",
    "1kernel://svc",
    "{",
    "[",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{\"name\":",
    "{\"name\":null}",
    "{\"name\":1e999}",
    "{\"name\":\"a\",\"matches\":{}}",
    "{\"name\":\"a\",\"matches\":[{\"routes\":[{\"weight\":-1}]}]}",
    "{\"name\":\"a\",\"matches\":[{\"routes\":[{\"weight\":4294967296}]}]}",
    "{\"name\":\"a\",\"matches\":[{\"sourceSelector\":{\"k\":1}}]}",
    "{\"name\":\"a\",\"pathIds\":[null]}",
    "[{\"name\":\"a\"},{\"name\":\"\"}]",
    "\"just a string\"",
];

#[test]
fn the_corpus_never_panics_the_parsers() {
    for text in CORPUS {
        let _ = NsUrl::parse(text);
        let _ = ns_file::from_json(text);
        if let Ok(url) = NsUrl::parse(text) {
            assert_eq!(NsUrl::parse(&url.to_string()).unwrap(), url, "{text:?}");
        }
    }
    let deep = "[".repeat(100_000);
    let _ = ns_file::from_json(&deep);
    let _ = NsUrl::parse(&format!("kernel://{}", "%".repeat(100_000)));
}

// --- The input bounds ------------------------------------------------------------

/// A string whose length straddles a bound: short unicode, or a run near `around`.
fn sized(around: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => ".{0,12}",
        1 => (around.saturating_sub(2)..=around + 2).prop_map(|n| "a".repeat(n)),
    ]
}

fn label_set(around: usize) -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        3 => prop::collection::hash_map(sized(MAX_NAME_LEN), sized(MAX_VALUE_LEN), 0..4),
        1 => (around.saturating_sub(1)..=around + 1)
            .prop_map(|n| (0..n).map(|i| (format!("k{i}"), "v".into())).collect()),
    ]
}

fn segment() -> impl Strategy<Value = PathSegment> {
    (
        sized(MAX_NAME_LEN),
        sized(MAX_NAME_LEN),
        sized(MAX_TOKEN_LEN),
        label_set(MAX_LABELS),
    )
        .prop_map(|(name, id, token, metrics)| PathSegment {
            name,
            id,
            token,
            expires: None,
            metrics,
        })
}

fn segments() -> impl Strategy<Value = Vec<PathSegment>> {
    prop_oneof![
        3 => prop::collection::vec(segment(), 0..4),
        1 => (MAX_PATH_SEGMENTS - 1..=MAX_PATH_SEGMENTS + 1)
            .prop_map(|n| vec![PathSegment::default(); n]),
    ]
}

fn mechanism() -> impl Strategy<Value = Mechanism> {
    (
        sized(MAX_NAME_LEN),
        sized(MAX_NAME_LEN),
        label_set(MAX_LABELS),
    )
        .prop_map(|(cls, r#type, parameters)| Mechanism {
            cls,
            r#type,
            parameters,
        })
}

fn connection() -> impl Strategy<Value = Connection> {
    (
        sized(MAX_NAME_LEN),
        sized(MAX_NAME_LEN),
        sized(MAX_NAME_LEN),
        label_set(MAX_LABELS),
        proptest::option::of(segments()),
        proptest::option::of(mechanism()),
        any::<u32>(),
    )
        .prop_map(
            |(id, service, nse, labels, segs, mechanism, index)| Connection {
                id,
                network_service: service,
                network_service_endpoint_name: nse,
                labels,
                path: segs.map(|path_segments| Path {
                    index,
                    path_segments,
                }),
                mechanism,
                ..Default::default()
            },
        )
}

/// The bounds, written again independently of the checker: the oracle.
fn labels_ok(set: &HashMap<String, String>) -> bool {
    set.len() <= MAX_LABELS
        && set
            .iter()
            .all(|(k, v)| k.len() <= MAX_NAME_LEN && v.len() <= MAX_VALUE_LEN)
}

fn segments_ok(segs: &[PathSegment]) -> bool {
    segs.len() <= MAX_PATH_SEGMENTS
        && segs.iter().all(|s| {
            s.name.len() <= MAX_NAME_LEN
                && s.id.len() <= MAX_NAME_LEN
                && s.token.len() <= MAX_TOKEN_LEN
                && labels_ok(&s.metrics)
        })
}

fn mechanism_ok(m: &Mechanism) -> bool {
    m.cls.len() <= MAX_NAME_LEN && m.r#type.len() <= MAX_NAME_LEN && labels_ok(&m.parameters)
}

fn connection_ok(c: &Connection) -> bool {
    c.id.len() <= MAX_NAME_LEN
        && c.network_service.len() <= MAX_NAME_LEN
        && c.network_service_endpoint_name.len() <= MAX_NAME_LEN
        && labels_ok(&c.labels)
        && c.path
            .as_ref()
            .is_none_or(|p| segments_ok(&p.path_segments))
        && c.mechanism.as_ref().is_none_or(mechanism_ok)
}

fn refusal_is_short(r: &nsm_sdk::Result<()>) {
    if let Err(e) = r {
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().len() <= MAX_SHOWN, "{e}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_connection_is_accepted_exactly_when_it_is_within_the_bounds(c in connection()) {
        let checked = bounds::check_connection(&c);
        refusal_is_short(&checked);
        prop_assert_eq!(checked.is_ok(), connection_ok(&c));
    }

    #[test]
    fn a_request_is_accepted_exactly_when_it_is_within_the_bounds(
        c in proptest::option::of(connection()),
        prefs in prop::collection::vec(mechanism(), 0..3),
    ) {
        let ok = c.as_ref().is_none_or(connection_ok) && prefs.iter().all(mechanism_ok);
        let req = NetworkServiceRequest { connection: c, mechanism_preferences: prefs };
        let checked = bounds::check_request(&req);
        refusal_is_short(&checked);
        prop_assert_eq!(checked.is_ok(), ok);
    }

    #[test]
    fn registry_entries_are_accepted_exactly_when_within_the_bounds(
        name in sized(MAX_NAME_LEN),
        url in sized(MAX_VALUE_LEN),
        services in prop::collection::vec(sized(MAX_NAME_LEN), 0..3),
        labels in label_set(MAX_LABELS),
        selector in label_set(MAX_LABELS),
    ) {
        let nse = NetworkServiceEndpoint {
            name: name.clone(),
            url: url.clone(),
            network_service_names: services.clone(),
            network_service_labels: HashMap::from([(
                "svc".to_string(),
                NetworkServiceLabels { labels: labels.clone() },
            )]),
            ..Default::default()
        };
        let checked = bounds::check_nse(&nse);
        refusal_is_short(&checked);
        let ok = name.len() <= MAX_NAME_LEN
            && url.len() <= MAX_VALUE_LEN
            && services.iter().all(|s| s.len() <= MAX_NAME_LEN)
            && labels_ok(&labels);
        prop_assert_eq!(checked.is_ok(), ok);

        let ns = NetworkService {
            name: name.clone(),
            matches: vec![Match {
                source_selector: selector.clone(),
                routes: vec![Destination { destination_selector: labels.clone(), weight: 1 }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let checked = bounds::check_ns(&ns);
        refusal_is_short(&checked);
        let ok = name.len() <= MAX_NAME_LEN && labels_ok(&selector) && labels_ok(&labels);
        prop_assert_eq!(checked.is_ok(), ok);
    }

    #[test]
    fn a_selector_is_accepted_exactly_when_within_the_bounds(
        segs in segments(),
        services in prop::collection::vec(sized(MAX_NAME_LEN), 0..3),
    ) {
        let ok = segments_ok(&segs) && services.iter().all(|s| s.len() <= MAX_NAME_LEN);
        let sel = MonitorScopeSelector { path_segments: segs, network_services: services };
        let checked = bounds::check_selector(&sel);
        refusal_is_short(&checked);
        prop_assert_eq!(checked.is_ok(), ok);
    }

    #[test]
    fn cut_and_shown_never_split_a_char_and_keep_at_most_the_bound(s in ".{0,400}", max in 0usize..300) {
        let c = bounds::cut(&s, max);
        prop_assert!(c.len() <= max + 3);
        prop_assert!(s.starts_with(c.trim_end_matches("...")) || c == s);
        let shown = bounds::Shown(&s).to_string();
        prop_assert!(shown.len() <= MAX_SHOWN + 3);
    }
}

// --- The NS URL --------------------------------------------------------------------

/// Percent-encodes every byte that is not ASCII alphanumeric.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_parses_or_is_refused_and_what_parses_round_trips(s in "\\PC{0,60}") {
        if let Ok(url) = NsUrl::parse(&s) {
            let again = NsUrl::parse(&url.to_string());
            prop_assert_eq!(again.ok(), Some(url));
        }
    }

    #[test]
    fn url_shaped_text_parses_or_is_refused_and_what_parses_round_trips(
        scheme in "[a-zA-Z][a-zA-Z0-9+.-]{0,6}|[^:/]{0,3}",
        host in "[a-z0-9@%._-]{0,12}|\\PC{0,6}",
        path in "(/[a-z0-9%.]{0,16}){0,3}",
        query in "(\\?([a-z%=&,+]|%[0-9a-fA-F]{2}){0,20})?",
    ) {
        let s = format!("{scheme}://{host}{path}{query}");
        if let Ok(url) = NsUrl::parse(&s) {
            prop_assert_eq!(NsUrl::parse(&url.to_string()).ok(), Some(url));
        }
    }

    #[test]
    fn a_url_built_from_parts_parses_back_to_those_parts(
        mechanism in "[a-z][a-z0-9]{0,7}",
        // An `@` makes an interdomain name, which needs a name on both sides.
        service in "[^@\\p{C}]{1,16}|[^@\\p{C}]{1,8}@[^@\\p{C}]{1,8}",
        ifname in proptest::option::of("[a-z][a-z0-9]{0,14}"),
        labels in prop::collection::btree_map("\\PC{1,8}", "\\PC{0,8}", 0..4),
    ) {
        let mut s = format!("{mechanism}://{}", pct(&service));
        if let Some(name) = &ifname {
            s.push('/');
            s.push_str(name);
        }
        for (i, (k, v)) in labels.iter().enumerate() {
            s.push(if i == 0 { '?' } else { '&' });
            s.push_str(&format!("{}={}", pct(k), pct(v)));
        }
        let url = NsUrl::parse(&s).map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
        prop_assert_eq!(url.network_service(), service.as_str());
        prop_assert_eq!(url.mechanism_type(), mechanism.to_ascii_uppercase());
        prop_assert_eq!(url.interface_name(), ifname.as_deref());
        prop_assert_eq!(url.labels(), &labels);
        prop_assert_eq!(NsUrl::parse(&url.to_string()).ok(), Some(url));
    }
}

// --- NetworkService files ----------------------------------------------------------

/// Arbitrary JSON, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("name".to_string()),
                    Just("payload".to_string()),
                    Just("matches".to_string()),
                    Just("routes".to_string()),
                    Just("sourceSelector".to_string()),
                    Just("destinationSelector".to_string()),
                    Just("weight".to_string()),
                    Just("metadata".to_string()),
                    Just("labels".to_string()),
                    Just("pathIds".to_string()),
                    Just("fallthrough".to_string()),
                    "\\PC{0,6}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn selector_map() -> impl Strategy<Value = HashMap<String, String>> {
    prop::collection::hash_map("\\PC{1,8}", "\\PC{0,8}", 0..3)
}

fn network_service() -> impl Strategy<Value = NetworkService> {
    let route =
        (selector_map(), any::<u32>()).prop_map(|(destination_selector, weight)| Destination {
            destination_selector,
            weight,
        });
    let matcher = (
        selector_map(),
        prop::collection::vec(route, 0..3),
        any::<bool>(),
        proptest::option::of(selector_map()),
    )
        .prop_map(|(source_selector, routes, fallthrough, labels)| Match {
            source_selector,
            routes,
            fallthrough,
            metadata: labels.map(|labels| Metadata { labels }),
        });
    (
        // A blank name is no name (the file is refused): at least one visible char.
        "\\PC{0,8}[^\\s\\p{C}]\\PC{0,8}",
        "[A-Z]{1,8}",
        prop::collection::vec(matcher, 0..3),
        prop::collection::vec("\\PC{1,8}", 0..3),
    )
        .prop_map(|(name, payload, matches, path_ids)| NetworkService {
            name,
            payload,
            matches,
            path_ids,
        })
}

/// A network service in the protobuf JSON mapping, written independently of the parser.
fn to_json(ns: &NetworkService) -> Value {
    let map = |m: &HashMap<String, String>| -> Value {
        m.iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    json!({
        "name": ns.name,
        "payload": ns.payload,
        "pathIds": ns.path_ids,
        "matches": ns.matches.iter().map(|m| {
            let mut v = json!({
                "sourceSelector": map(&m.source_selector),
                "fallthrough": m.fallthrough,
                "routes": m.routes.iter().map(|r| json!({
                    "destinationSelector": map(&r.destination_selector),
                    "weight": r.weight,
                })).collect::<Vec<_>>(),
            });
            if let Some(meta) = &m.metadata {
                v["metadata"] = json!({ "labels": map(&meta.labels) });
            }
            v
        }).collect::<Vec<_>>(),
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_is_a_file_or_an_error(s in "\\PC{0,80}") {
        let _ = ns_file::from_json(&s);
    }

    #[test]
    fn any_json_is_services_with_names_or_an_error(v in any_json()) {
        if let Ok(services) = ns_file::from_json(&v.to_string()) {
            for ns in services {
                prop_assert!(!ns.name.is_empty());
                prop_assert!(!ns.payload.is_empty());
            }
        }
    }

    #[test]
    fn a_network_service_written_as_json_reads_back_equal(
        services in prop::collection::vec(network_service(), 1..3),
    ) {
        let text = Value::Array(services.iter().map(to_json).collect()).to_string();
        let back = ns_file::from_json(&text)
            .map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(back, services);
    }
}

// --- The monitor selector ----------------------------------------------------------

fn small_segment() -> impl Strategy<Value = PathSegment> {
    ("[a-c]{0,2}", "[a-c]{0,2}", "[a-c]{0,1}").prop_map(|(name, id, token)| PathSegment {
        name,
        id,
        token,
        ..Default::default()
    })
}

fn small_connection() -> impl Strategy<Value = Connection> {
    (
        "[a-c]{0,2}",
        "[a-c]{0,2}",
        prop::collection::vec(small_segment(), 0..6),
    )
        .prop_map(|(id, network_service, path_segments)| Connection {
            id,
            network_service,
            path: Some(Path {
                index: 0,
                path_segments,
            }),
            ..Default::default()
        })
}

fn small_selector() -> impl Strategy<Value = MonitorScopeSelector> {
    (
        prop::collection::vec(small_segment(), 0..4),
        prop::collection::vec("[a-c]{0,2}", 0..3),
    )
        .prop_map(|(path_segments, network_services)| MonitorScopeSelector {
            path_segments,
            network_services,
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_empty_selector_sees_every_connection(c in small_connection()) {
        prop_assert!(selector::matches(&c, &MonitorScopeSelector::default()));
    }

    #[test]
    fn a_run_of_the_connections_own_path_selects_it(
        c in small_connection(),
        from in any::<usize>(),
        len in 1usize..4,
    ) {
        let segs = &c.path.as_ref().unwrap().path_segments;
        if segs.is_empty() {
            return Ok(());
        }
        let from = from % segs.len();
        let len = len.min(segs.len() - from);
        let sel = MonitorScopeSelector {
            path_segments: segs[from..from + len].to_vec(),
            network_services: vec![c.network_service.clone()],
        };
        prop_assert!(selector::matches(&c, &sel));
    }

    #[test]
    fn a_selector_longer_than_the_path_or_naming_another_service_does_not_select(
        c in small_connection(),
        sel in small_selector(),
    ) {
        let segs = &c.path.as_ref().unwrap().path_segments;
        if sel.path_segments.len() > segs.len()
            || (!sel.network_services.is_empty()
                && !sel.network_services.contains(&c.network_service))
        {
            prop_assert!(!selector::matches(&c, &sel));
        }
    }

    #[test]
    fn scope_keeps_exactly_the_selected_connections(
        conns in prop::collection::vec(small_connection(), 0..6),
        sel in small_selector(),
        kind in 0i32..3,
    ) {
        let event = ConnectionEvent {
            r#type: kind,
            connections: conns
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("{i}"), c.clone()))
                .collect(),
        };
        let wanted: BTreeMap<String, Connection> = event
            .connections
            .iter()
            .filter(|(_, c)| selector::matches(c, &sel))
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        match selector::scope(&event, &sel) {
            Some(seen) => {
                prop_assert_eq!(seen.r#type, kind);
                let seen: BTreeMap<_, _> = seen.connections.into_iter().collect();
                prop_assert_eq!(seen, wanted);
            }
            None => {
                prop_assert!(wanted.is_empty());
                prop_assert_ne!(kind, ConnectionEventType::InitialStateTransfer as i32);
            }
        }
    }
}
