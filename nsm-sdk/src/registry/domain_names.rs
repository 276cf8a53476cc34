//! The interdomain names of registry entries ([`crate::config::interdomain`]), written
//! once for network services and endpoints: which domain an entry or a query is about,
//! and how its names lose or get back `@domain` at a domain's border.
//!
//! An endpoint's names are its own name, the network services it serves (and the keys
//! of its per-service labels); a network service's, its name.

use std::collections::HashMap;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use super::{Registries, RegistryChain, Resource};
use crate::config::interdomain::{add, domain, strip};

/// A registry resource with interdomain names.
pub trait DomainNames: Resource {
    /// The domain the entry (or a query's template) is about: its name's, else the
    /// first served service's that names one.
    fn domain(&self) -> Option<String>;
    /// Removes `@domain` from every name that ends with it.
    fn strip_domain(&mut self, domain: &str);
    /// Adds `@domain` to every name that names none.
    fn add_domain(&mut self, domain: &str);
    /// The chain of `registries` for this resource.
    fn chain(registries: &Registries) -> &RegistryChain<Self>;
}

impl DomainNames for NetworkService {
    fn domain(&self) -> Option<String> {
        domain(&self.name).map(str::to_string)
    }
    fn strip_domain(&mut self, d: &str) {
        self.name = strip(&self.name, d);
    }
    fn add_domain(&mut self, d: &str) {
        self.name = add(&self.name, d);
    }
    fn chain(registries: &Registries) -> &RegistryChain<Self> {
        &registries.ns
    }
}

fn map_keys<V>(map: &mut HashMap<String, V>, f: impl Fn(&str) -> String) {
    *map = std::mem::take(map)
        .into_iter()
        .map(|(k, v)| (f(&k), v))
        .collect();
}

impl DomainNames for NetworkServiceEndpoint {
    fn domain(&self) -> Option<String> {
        domain(&self.name)
            .or_else(|| self.network_service_names.iter().find_map(|s| domain(s)))
            .map(str::to_string)
    }
    fn strip_domain(&mut self, d: &str) {
        self.name = strip(&self.name, d);
        for s in &mut self.network_service_names {
            *s = strip(s, d);
        }
        map_keys(&mut self.network_service_labels, |k| strip(k, d));
    }
    fn add_domain(&mut self, d: &str) {
        self.name = add(&self.name, d);
        for s in &mut self.network_service_names {
            *s = add(s, d);
        }
        map_keys(&mut self.network_service_labels, |k| add(k, d));
    }
    fn chain(registries: &Registries) -> &RegistryChain<Self> {
        &registries.nse
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_proto::registry::NetworkServiceLabels;

    #[test]
    fn an_endpoint_loses_and_gets_back_its_domain_everywhere() {
        let mut nse = NetworkServiceEndpoint {
            name: "nse@c2".into(),
            network_service_names: vec!["ns@c2".into(), "other@floating".into()],
            network_service_labels: HashMap::from([(
                "ns@c2".to_string(),
                NetworkServiceLabels::default(),
            )]),
            url: "tcp://1.2.3.4:5".into(),
            ..Default::default()
        };
        assert_eq!(nse.domain().as_deref(), Some("c2"));
        let original = nse.clone();
        nse.strip_domain("c2");
        assert_eq!(nse.name, "nse");
        assert_eq!(nse.network_service_names, ["ns", "other@floating"]);
        assert!(nse.network_service_labels.contains_key("ns"));
        nse.add_domain("c2");
        assert_eq!(nse, original);
    }

    #[test]
    fn a_query_by_service_names_its_domain() {
        let q = NetworkServiceEndpoint {
            network_service_names: vec!["ns@floating.domain".into()],
            ..Default::default()
        };
        assert_eq!(q.domain().as_deref(), Some("floating.domain"));
        assert_eq!(NetworkServiceEndpoint::default().domain(), None);
        let ns = NetworkService {
            name: "ns@c3".into(),
            ..Default::default()
        };
        assert_eq!(ns.domain().as_deref(), Some("c3"));
    }
}
