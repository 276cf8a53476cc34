//! The NS URL: how an NSC names what it wants in one string.
//!
//! Format: `<mechanism>://<network-service>[/<ifname>][?label=value&...]`
//! (docs/SCENARIOS.md 6.9, the Go SDK's `pkg/tools/nsurl`):
//!
//! | part | meaning |
//! |---|---|
//! | scheme | mechanism type, upper-cased (`kernel` -> `KERNEL`); the class is always `LOCAL` |
//! | host | network service; `user@host` gives the interdomain name `user@host` |
//! | last path segment | interface name (mechanism parameter `name`, at most 15 bytes) |
//! | query | connection labels; a repeated key's values are joined with `,` |
//!
//! Every part is percent-decoded (and `+` in the query is a space, as in HTML forms).
//!
//! ```
//! use nsm_sdk::config::NsUrl;
//! let url = NsUrl::parse("kernel://my-service@dc.example.com/ms1?app=web").unwrap();
//! assert_eq!(url.network_service(), "my-service@dc.example.com");
//! assert_eq!(url.interface_name(), Some("ms1"));
//! assert_eq!(url.mechanism().r#type, "KERNEL");
//! assert_eq!(url.labels()["app"], "web");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use nsm_proto::connection::{Connection, Mechanism};
use nsm_proto::networkservice::NetworkServiceRequest;

use crate::wire::{cls, params, MAX_INTERFACE_NAME_LEN};
use crate::{Error, Result};

/// A parsed NS URL; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsUrl {
    mechanism_type: String,
    network_service: String,
    interface_name: Option<String>,
    labels: BTreeMap<String, String>,
}

impl NsUrl {
    /// Parses `kernel://service[/ifname][?label=value&...]`.
    ///
    /// Errors (all [`Error::InvalidArgument`], naming the URL and what is wrong): no
    /// `scheme://`, a scheme that is not a word, an empty network service, a port, an
    /// empty name before `@`, a bad interface name (see [`check_interface_name`]), an
    /// empty label key, a bad percent escape or escaped bytes that are not UTF-8.
    pub fn parse(s: &str) -> Result<NsUrl> {
        let bad = |what: String| Error::invalid(format!("NS URL {s:?}: {what}"));
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(bad(
                "no mechanism scheme (expected <mechanism>://<network-service>)".into(),
            ));
        };
        if scheme.is_empty() {
            return Err(bad("empty mechanism scheme".into()));
        }
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return Err(bad(format!("bad mechanism scheme {scheme:?}")));
        }
        // A fragment means nothing here; it is dropped as URL parsers do.
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.split_once('/') {
            Some((a, p)) => (a, p),
            None => (before_query, ""),
        };

        let network_service = decode(authority, false).map_err(bad)?;
        if network_service.is_empty() {
            return Err(bad("empty network service".into()));
        }
        if authority.contains(':') {
            return Err(bad(format!(
                "{authority:?} has a port or ':', which a network service name cannot have"
            )));
        }
        if let Some((user, host)) = network_service.split_once('@') {
            if user.is_empty() || host.is_empty() {
                return Err(bad(format!(
                    "interdomain service {network_service:?} needs a name on both sides of '@'"
                )));
            }
        }

        let interface_name = match path.split('/').rfind(|p| !p.is_empty()) {
            Some(seg) => {
                let name = decode(seg, false).map_err(bad)?;
                check_interface_name(&name).map_err(|e| bad(e.to_string()))?;
                Some(name)
            }
            None => None,
        };

        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(k, true).map_err(bad)?;
            let value = decode(v, true).map_err(bad)?;
            if key.is_empty() {
                return Err(bad(format!("label {pair:?} has an empty key")));
            }
            labels
                .entry(key)
                .and_modify(|old| {
                    old.push(',');
                    old.push_str(&value);
                })
                .or_insert(value);
        }

        Ok(NsUrl {
            mechanism_type: scheme.to_ascii_uppercase(),
            network_service,
            interface_name,
            labels,
        })
    }

    /// The network service (`user@host` for an interdomain one).
    pub fn network_service(&self) -> &str {
        &self.network_service
    }

    /// The mechanism type: the scheme, upper-cased (`KERNEL`).
    pub fn mechanism_type(&self) -> &str {
        &self.mechanism_type
    }

    /// The interface name, when the URL has a path.
    pub fn interface_name(&self) -> Option<&str> {
        self.interface_name.as_deref()
    }

    /// The connection labels from the query.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// The mechanism the URL asks for: class `LOCAL`, its type, and parameter `name`
    /// when the URL names an interface.
    pub fn mechanism(&self) -> Mechanism {
        let mut m = Mechanism {
            cls: cls::LOCAL.to_string(),
            r#type: self.mechanism_type.clone(),
            ..Default::default()
        };
        if let Some(name) = &self.interface_name {
            m.parameters.insert(params::NAME.to_string(), name.clone());
        }
        m
    }

    /// A request for this URL: a connection with the network service and labels, and
    /// the URL's mechanism as the only preference.
    pub fn to_request(&self) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                network_service: self.network_service.clone(),
                labels: self
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ..Default::default()
            }),
            mechanism_preferences: vec![self.mechanism()],
        }
    }
}

impl FromStr for NsUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        NsUrl::parse(s)
    }
}

/// Writes the URL back, percent-encoded, labels in key order; it parses to an equal
/// [`NsUrl`].
impl fmt::Display for NsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}",
            self.mechanism_type.to_ascii_lowercase(),
            encode(&self.network_service, "@")
        )?;
        if let Some(name) = &self.interface_name {
            write!(f, "/{}", encode(name, ""))?;
        }
        for (i, (k, v)) in self.labels.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(f, "{sep}{}={}", encode(k, "/"), encode(v, "/,"))?;
        }
        Ok(())
    }
}

/// Checks a Linux interface name: 1 to 15 bytes, not `.` or `..`, and no `/`, `:` or
/// whitespace (the kernel's `dev_valid_name`, plus `:` which alias names use).
pub fn check_interface_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("empty interface name"));
    }
    if name.len() > MAX_INTERFACE_NAME_LEN {
        return Err(Error::invalid(format!(
            "interface name {name:?} is {} bytes, more than the Linux limit of {MAX_INTERFACE_NAME_LEN}",
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return Err(Error::invalid(format!(
            "interface name {name:?} is not allowed"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(Error::invalid(format!(
            "interface name {name:?} contains {c:?}"
        )));
    }
    Ok(())
}

/// Percent-decodes `s` (and `+` as a space when `form`).
fn decode(s: &str, form: bool) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => out.push(b),
                    None => {
                        let end = (i + 3).min(bytes.len());
                        return Err(format!(
                            "bad percent escape {:?} in {s:?}",
                            String::from_utf8_lossy(&bytes[i..end])
                        ));
                    }
                }
                i += 3;
            }
            b'+' if form => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} decodes to bytes that are not UTF-8"))
}

/// Percent-encodes everything but unreserved characters and those in `keep`.
fn encode(s: &str, keep: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let c = b as char;
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') || keep.contains(c) {
            out.push(c);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::types;

    fn invalid(s: &str) -> String {
        match NsUrl::parse(s) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{s}: expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn vfio_service_with_interface_name() {
        let u = NsUrl::parse("vfio://my-service/nsm-1").unwrap();
        assert_eq!(u.network_service(), "my-service");
        assert_eq!(u.interface_name(), Some("nsm-1"));
        let m = u.mechanism();
        assert_eq!(m.cls, cls::LOCAL);
        assert_eq!(m.r#type, "VFIO");
        assert_eq!(m.parameters[params::NAME], "nsm-1");
        assert!(u.labels().is_empty());
    }

    #[test]
    fn a_label_value_may_contain_slashes() {
        let u = NsUrl::parse("vfio://second-service?sriovToken=intel/10G").unwrap();
        assert_eq!(u.network_service(), "second-service");
        assert_eq!(u.interface_name(), None);
        assert!(u.mechanism().parameters.is_empty());
        assert_eq!(u.labels()["sriovToken"], "intel/10G");
    }

    #[test]
    fn several_labels() {
        let u = NsUrl::parse("memif://my-vpp-service?A=1&B=2&C=3").unwrap();
        assert_eq!(u.mechanism().r#type, types::MEMIF);
        let labels: Vec<_> = u.labels().iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(labels, ["A=1", "B=2", "C=3"]);
    }

    #[test]
    fn user_at_host_is_an_interdomain_service() {
        let u = NsUrl::parse("kernel://my-service@dc.example.com/ms1").unwrap();
        assert_eq!(u.network_service(), "my-service@dc.example.com");
        assert_eq!(u.interface_name(), Some("ms1"));
        assert_eq!(u.mechanism().r#type, types::KERNEL);
    }

    #[test]
    fn repeated_keys_are_joined_and_escapes_decoded() {
        let u = NsUrl::parse("kernel://svc/a/b/nsm%2D1/?app=x&app=y&sp=a+b%20c&flag").unwrap();
        assert_eq!(u.interface_name(), Some("nsm-1"));
        assert_eq!(u.labels()["app"], "x,y");
        assert_eq!(u.labels()["sp"], "a b c");
        assert_eq!(u.labels()["flag"], "");
    }

    #[test]
    fn to_request_carries_service_labels_and_the_one_mechanism() {
        let req = NsUrl::parse("kernel://vpn/nsm-1?app=x")
            .unwrap()
            .to_request();
        let conn = req.connection.unwrap();
        assert_eq!(conn.network_service, "vpn");
        assert_eq!(conn.labels["app"], "x");
        assert!(conn.mechanism.is_none());
        assert_eq!(req.mechanism_preferences.len(), 1);
        assert_eq!(req.mechanism_preferences[0].r#type, types::KERNEL);
        assert_eq!(
            req.mechanism_preferences[0].parameters[params::NAME],
            "nsm-1"
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "kernel://my-service@dc.example.com/ms1",
            "vfio://second-service?sriovToken=intel/10G",
            "memif://svc?A=1&B=2,3&c=a b%25",
        ] {
            let u = NsUrl::parse(s).unwrap();
            let back: NsUrl = u.to_string().parse().unwrap();
            assert_eq!(u, back, "{s} -> {u}");
        }
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert!(invalid("my-service/nsm-1").contains("no mechanism scheme"));
        assert!(invalid("://svc").contains("empty mechanism scheme"));
        assert!(invalid("ke rnel://svc").contains("bad mechanism scheme"));
        assert!(invalid("kernel://").contains("empty network service"));
        assert!(invalid("kernel:///nsm-1").contains("empty network service"));
        assert!(invalid("kernel://svc:5000").contains("port"));
        assert!(invalid("kernel://@dc.example.com").contains("both sides of '@'"));
        assert!(invalid("kernel://svc/this-name-is-too-long").contains("Linux limit of 15"));
        assert!(invalid("kernel://svc/a%2Fb").contains("contains '/'"));
        assert!(invalid("kernel://svc/..").contains("not allowed"));
        assert!(invalid("kernel://svc?=x").contains("empty key"));
        assert!(invalid("kernel://svc?a=%zz").contains("bad percent escape"));
        assert!(invalid("kernel://svc?a=%ff").contains("not UTF-8"));
    }

    #[test]
    fn interface_names_follow_the_linux_rules() {
        assert!(check_interface_name("nsm-1").is_ok());
        assert!(check_interface_name("123456789012345").is_ok());
        assert!(check_interface_name("1234567890123456").is_err());
        assert!(check_interface_name("").is_err());
        assert!(check_interface_name("a b").is_err());
        assert!(check_interface_name("eth0:1").is_err());
    }
}
