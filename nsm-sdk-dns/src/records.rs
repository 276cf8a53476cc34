//! `Records`: the in-memory A/AAAA records a [`DnsServer`](crate::DnsServer) serves.
//!
//! Each entry is a name (absolute, lower case) with addresses per **owner** (for
//! [`dns_names`](crate::dns_names), a connection id): two connections that hold the same
//! name both answer, and one going away removes only its own addresses. Clones share
//! the same set; updates are visible to the next query at once.
//!
//! State: a map name -> owner -> addresses behind a `std::sync::RwLock` that is never
//! held across an await.
//!
//! Failure handled: a name that does not parse is refused with
//! [`Error::InvalidName`](crate::Error::InvalidName); nothing is stored.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use hickory_proto::rr::Name;

use crate::{fqdn, Result};

type Entries = HashMap<Name, BTreeMap<String, Vec<IpAddr>>>;

/// See the [module docs](self).
#[derive(Clone, Default)]
pub struct Records {
    inner: Arc<RwLock<Entries>>,
}

impl Records {
    /// An empty set.
    ///
    /// ```
    /// let records = nsm_sdk_dns::Records::new();
    /// records.set("my.domain", "static", vec!["10.0.0.1".parse().unwrap()]).unwrap();
    /// assert_eq!(records.lookup("MY.domain.").unwrap().len(), 1);
    /// ```
    pub fn new() -> Records {
        Records::default()
    }

    /// Sets the addresses `owner` holds for `name` (replacing what it held before); an
    /// empty list removes them.
    pub fn set(&self, name: &str, owner: &str, addrs: Vec<IpAddr>) -> Result<()> {
        let name = fqdn(name)?;
        let mut map = self.write();
        if addrs.is_empty() {
            remove_from(&mut map, &name, owner);
        } else {
            map.entry(name)
                .or_default()
                .insert(owner.to_string(), addrs);
        }
        Ok(())
    }

    /// Removes what `owner` holds for `name`; true when it held something.
    pub fn remove(&self, name: &str, owner: &str) -> bool {
        match fqdn(name) {
            Ok(name) => remove_from(&mut self.write(), &name, owner),
            Err(_) => false,
        }
    }

    /// The addresses of `name` (every owner's, de-duplicated), or `None` when nobody
    /// holds it.
    pub fn lookup(&self, name: &str) -> Option<Vec<IpAddr>> {
        self.lookup_name(&fqdn(name).ok()?)
    }

    /// [`Records::lookup`] for a parsed name (compared in lower case).
    pub fn lookup_name(&self, name: &Name) -> Option<Vec<IpAddr>> {
        let map = self.read();
        let owners = map.get(&name.to_lowercase())?;
        let mut out: Vec<IpAddr> = Vec::new();
        for a in owners.values().flatten() {
            if !out.contains(a) {
                out.push(*a);
            }
        }
        Some(out)
    }

    /// The names held, sorted (absolute, with the trailing dot).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read().keys().map(|n| n.to_string()).collect();
        v.sort();
        v
    }

    /// How many names are held.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn remove_from(map: &mut Entries, name: &Name, owner: &str) -> bool {
    let Some(owners) = map.get_mut(name) else {
        return false;
    };
    let removed = owners.remove(owner).is_some();
    if owners.is_empty() {
        map.remove(name);
    }
    removed
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("names", &self.names())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_are_case_insensitive_and_absolute() {
        let r = Records::new();
        r.set("Pod.Net", "c1", vec![ip("10.0.0.1")]).unwrap();
        assert_eq!(r.lookup("pod.net."), Some(vec![ip("10.0.0.1")]));
        assert_eq!(r.lookup("POD.NET"), Some(vec![ip("10.0.0.1")]));
        assert_eq!(r.names(), ["pod.net."]);
        assert_eq!(r.lookup("other.net"), None);
    }

    #[test]
    fn owners_share_a_name_and_remove_only_their_own() {
        let r = Records::new();
        r.set("a.net", "c1", vec![ip("10.0.0.1"), ip("fd00::1")])
            .unwrap();
        r.set("a.net", "c2", vec![ip("10.0.0.2"), ip("10.0.0.1")])
            .unwrap();
        assert_eq!(
            r.lookup("a.net"),
            Some(vec![ip("10.0.0.1"), ip("fd00::1"), ip("10.0.0.2")])
        );
        assert!(r.remove("a.net", "c1"));
        assert_eq!(
            r.lookup("a.net"),
            Some(vec![ip("10.0.0.2"), ip("10.0.0.1")])
        );
        assert!(!r.remove("a.net", "c1"), "already gone");
        r.set("a.net", "c2", vec![]).unwrap();
        assert_eq!(r.lookup("a.net"), None);
        assert!(r.is_empty());
    }

    #[test]
    fn a_bad_name_is_refused_and_stores_nothing() {
        let r = Records::new();
        let long = "a".repeat(64);
        for bad in ["", " ", &long, "a..b"] {
            let e = r.set(bad, "c1", vec![ip("10.0.0.1")]).unwrap_err();
            assert!(e.to_string().contains("invalid DNS name"), "{bad}: {e}");
        }
        assert!(r.is_empty());
        assert!(!r.remove("", "c1"));
    }
}
