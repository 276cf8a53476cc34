//! Interdomain names: `target@domain` names a network service or an endpoint of another
//! domain (a cluster, or a floating registry's domain such as `floating.domain`).
//!
//! The part before the last `@` is the target, the name the other domain knows; the part
//! after it is the domain, the DNS suffix under which that domain's registry
//! (`registry.nsm-system.<domain>`) and nsmgr-proxy (`nsmgr-proxy.nsm-system.<domain>`)
//! are found. A name without `@` is local. These helpers never fail: a name with an
//! empty target or domain (`@x`, `x@`) is treated as local, so it reaches the local
//! registry, which refuses or ignores it as any other odd name.

/// The separator of target and domain.
pub const SEPARATOR: char = '@';

/// The SRV name of `domain`'s registry.
pub fn registry_srv(domain: &str) -> String {
    format!("registry.nsm-system.{domain}")
}

/// The SRV name of `domain`'s nsmgr-proxy.
pub fn nsmgr_proxy_srv(domain: &str) -> String {
    format!("nsmgr-proxy.nsm-system.{domain}")
}

/// Splits `name` into target and domain, or `None` for a local name.
pub fn split(name: &str) -> Option<(&str, &str)> {
    let (target, domain) = name.rsplit_once(SEPARATOR)?;
    (!target.is_empty() && !domain.is_empty()).then_some((target, domain))
}

/// Whether `name` names something of another domain.
pub fn is_interdomain(name: &str) -> bool {
    split(name).is_some()
}

/// The domain of `name`, if it has one.
pub fn domain(name: &str) -> Option<&str> {
    split(name).map(|(_, d)| d)
}

/// The target of `name`: the name without its domain (itself when local).
pub fn target(name: &str) -> &str {
    split(name).map_or(name, |(t, _)| t)
}

/// `target@domain`.
pub fn join(target: &str, domain: &str) -> String {
    format!("{target}{SEPARATOR}{domain}")
}

/// `name` without `@domain` when it ends with exactly that domain; otherwise unchanged.
pub fn strip(name: &str, domain: &str) -> String {
    match split(name) {
        Some((t, d)) if d == domain => t.to_string(),
        _ => name.to_string(),
    }
}

/// `name` with `@domain` added, unless it already names a domain.
pub fn add(name: &str, domain: &str) -> String {
    if is_interdomain(name) || name.is_empty() {
        name.to_string()
    } else {
        join(name, domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_the_last_separator() {
        assert_eq!(split("ns@cluster2"), Some(("ns", "cluster2")));
        assert_eq!(split("ns@floating.domain"), Some(("ns", "floating.domain")));
        assert_eq!(split("a@b@c"), Some(("a@b", "c")));
        assert_eq!(split("ns"), None);
        assert_eq!(split("@cluster2"), None);
        assert_eq!(split("ns@"), None);
        assert!(is_interdomain("x@y"));
        assert!(!is_interdomain("x"));
        assert_eq!(domain("x@y"), Some("y"));
        assert_eq!(target("x@y"), "x");
        assert_eq!(target("x"), "x");
    }

    #[test]
    fn strip_and_add_are_inverse_for_one_domain() {
        assert_eq!(strip("ns@cluster2", "cluster2"), "ns");
        assert_eq!(strip("ns@cluster3", "cluster2"), "ns@cluster3");
        assert_eq!(strip("ns", "cluster2"), "ns");
        assert_eq!(add("ns", "cluster2"), "ns@cluster2");
        assert_eq!(add("ns@floating.domain", "cluster2"), "ns@floating.domain");
        assert_eq!(add("", "cluster2"), "");
        assert_eq!(add(&strip("nse@c2", "c2"), "c2"), "nse@c2");
    }

    #[test]
    fn srv_names_follow_nsm() {
        assert_eq!(registry_srv("cluster2"), "registry.nsm-system.cluster2");
        assert_eq!(nsmgr_proxy_srv("c"), "nsmgr-proxy.nsm-system.c");
    }
}
