//! Find templates: which registry entries a query's template matches.
//!
//! What it does: [`Matches`] decides whether an entry matches the template of a Find
//! ([`Query::template`](super::Query)). Every field of the template is applied only
//! if it is set, so an empty template matches everything.
//!
//! - Endpoints: `name` equal; `network_service_labels`: for each network service of
//!   the template, the entry has every queried label with the same value;
//!   `expiration_time`: equal seconds; `network_service_names`: all of them are among
//!   the entry's; `url`: a substring of the entry's.
//! - Network services: `name` equal, `payload` equal, `matches` deep-equal.
//!
//! State: none. Failure handled: none (matching cannot fail; an entry without a field
//! the template sets does not match).

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

/// Whether a registry entry matches a Find template; see the [module docs](self).
pub trait Matches {
    /// Whether `self` (an entry) matches `template` (a query's template).
    fn matches(&self, template: &Self) -> bool;
}

impl Matches for NetworkServiceEndpoint {
    fn matches(&self, t: &Self) -> bool {
        (t.name.is_empty() || self.name == t.name)
            && t.network_service_labels.iter().all(|(service, wanted)| {
                let have = self.network_service_labels.get(service);
                wanted
                    .labels
                    .iter()
                    .all(|(k, v)| have.and_then(|h| h.labels.get(k)) == Some(v))
            })
            && t.expiration_time.as_ref().is_none_or(|want| {
                self.expiration_time
                    .as_ref()
                    .is_some_and(|have| have.seconds == want.seconds)
            })
            && t.network_service_names
                .iter()
                .all(|n| self.network_service_names.contains(n))
            && (t.url.is_empty() || self.url.contains(&t.url))
    }
}

impl Matches for NetworkService {
    fn matches(&self, t: &Self) -> bool {
        (t.name.is_empty() || self.name == t.name)
            && (t.payload.is_empty() || self.payload == t.payload)
            && (t.matches.is_empty() || self.matches == t.matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::registry::{Match, NetworkServiceLabels};
    use prost_types::Timestamp;

    fn nse() -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: "nse-1".into(),
            network_service_names: vec!["a".into(), "b".into()],
            network_service_labels: [(
                "a".to_string(),
                NetworkServiceLabels {
                    labels: [("app".into(), "fw".into()), ("zone".into(), "1".into())].into(),
                },
            )]
            .into(),
            url: "tcp://10.0.0.1:5001".into(),
            expiration_time: Some(Timestamp {
                seconds: 100,
                nanos: 5,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_empty_template_matches_every_entry() {
        assert!(nse().matches(&Default::default()));
        assert!(NetworkService::default().matches(&Default::default()));
    }

    #[test]
    fn endpoint_name_must_be_equal() {
        let t = |n: &str| NetworkServiceEndpoint {
            name: n.into(),
            ..Default::default()
        };
        assert!(nse().matches(&t("nse-1")));
        assert!(!nse().matches(&t("nse")));
        assert!(!nse().matches(&t("nse-10")));
    }

    #[test]
    fn endpoint_service_names_must_be_a_subset() {
        let t = |names: &[&str]| NetworkServiceEndpoint {
            network_service_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(nse().matches(&t(&["a"])));
        assert!(nse().matches(&t(&["b", "a"])));
        assert!(!nse().matches(&t(&["a", "c"])));
    }

    #[test]
    fn endpoint_labels_must_all_be_present_with_the_same_value() {
        let t = |service: &str, labels: &[(&str, &str)]| NetworkServiceEndpoint {
            network_service_labels: [(
                service.to_string(),
                NetworkServiceLabels {
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                },
            )]
            .into(),
            ..Default::default()
        };
        assert!(nse().matches(&t("a", &[("app", "fw")])));
        assert!(nse().matches(&t("a", &[("app", "fw"), ("zone", "1")])));
        assert!(!nse().matches(&t("a", &[("app", "lb")])));
        assert!(!nse().matches(&t("a", &[("region", "x")])));
        assert!(
            !nse().matches(&t("b", &[("app", "fw")])),
            "labels of another service do not count"
        );
    }

    #[test]
    fn endpoint_expiration_compares_seconds_and_url_is_a_substring() {
        let exp = |s| NetworkServiceEndpoint {
            expiration_time: Some(Timestamp {
                seconds: s,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert!(nse().matches(&exp(100)));
        assert!(!nse().matches(&exp(101)));
        let no_expiry = NetworkServiceEndpoint {
            expiration_time: None,
            ..nse()
        };
        assert!(!no_expiry.matches(&exp(100)));

        let url = |u: &str| NetworkServiceEndpoint {
            url: u.into(),
            ..Default::default()
        };
        assert!(nse().matches(&url("10.0.0.1")));
        assert!(!nse().matches(&url("10.0.0.2")));
    }

    #[test]
    fn network_service_fields_are_compared_only_when_set() {
        let ns = NetworkService {
            name: "vpn".into(),
            payload: "ETHERNET".into(),
            matches: vec![Match {
                fallthrough: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let named = NetworkService {
            name: "vpn".into(),
            ..Default::default()
        };
        assert!(ns.matches(&named));
        assert!(!ns.matches(&NetworkService {
            name: "vp".into(),
            ..Default::default()
        }));
        assert!(!ns.matches(&NetworkService {
            payload: "IP".into(),
            ..named.clone()
        }));
        assert!(ns.matches(&NetworkService {
            matches: ns.matches.clone(),
            ..named.clone()
        }));
        assert!(!ns.matches(&NetworkService {
            matches: vec![Match::default()],
            ..named
        }));
    }
}
