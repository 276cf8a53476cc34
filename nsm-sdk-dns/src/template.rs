//! `NameTemplate`: the DNS name an endpoint gives a client, made from its connection.
//!
//! A template is text with placeholders: `{service}` (the connection's network
//! service), `{labels.KEY}` (the connection's label `KEY`, e.g. `podName`) and `{id}`
//! (the connection id). The default, [`NameTemplate::DEFAULT`], is
//! `{labels.podName}.{service}`: the client pod `web-1` of the network `vl3` is
//! `web-1.vl3`. A value is used in lower case; a missing or empty value makes no name.
//!
//! State: the parsed template, immutable.
//!
//! Failure handled: an unclosed or unknown placeholder is
//! [`Error::InvalidTemplate`](crate::Error::InvalidTemplate) when the template is
//! parsed; a rendered name that is not a DNS name is
//! [`Error::InvalidName`](crate::Error::InvalidName).

use nsm_proto::connection::Connection;

use crate::{fqdn, Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Service,
    Id,
    Label(String),
}

/// See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    source: String,
    parts: Vec<Part>,
}

impl NameTemplate {
    /// The default template: `{labels.podName}.{service}`.
    pub const DEFAULT: &'static str = "{labels.podName}.{service}";

    /// Parses `template`.
    ///
    /// ```
    /// use nsm_sdk_dns::NameTemplate;
    /// assert!(NameTemplate::parse("{labels.podName}.{service}.cluster").is_ok());
    /// assert!(NameTemplate::parse("{labels.podName").is_err());
    /// ```
    pub fn parse(template: &str) -> Result<NameTemplate> {
        let bad = |reason: &str| Error::InvalidTemplate {
            template: template.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| bad("unclosed '{'"))?;
            let key = &after[..close];
            parts.push(match key {
                "service" => Part::Service,
                "id" => Part::Id,
                _ => match key.strip_prefix("labels.") {
                    Some(label) if !label.is_empty() => Part::Label(label.to_string()),
                    _ => return Err(bad(&format!("unknown placeholder {{{key}}}"))),
                },
            });
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(bad("'}' without '{'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err(bad("empty"));
        }
        Ok(NameTemplate {
            source: template.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The name of `conn` (absolute, lower case, with the trailing dot), `Ok(None)` when
    /// a value it needs is missing or empty.
    ///
    /// # Errors
    /// [`Error::InvalidName`] when the rendered text is not a DNS name.
    pub fn render(&self, conn: &Connection) -> Result<Option<String>> {
        let mut out = String::new();
        for part in &self.parts {
            let value = match part {
                Part::Text(t) => t.as_str(),
                Part::Service => conn.network_service.as_str(),
                Part::Id => conn.id.as_str(),
                Part::Label(k) => conn.labels.get(k).map(String::as_str).unwrap_or(""),
            };
            if value.is_empty() && !matches!(part, Part::Text(_)) {
                return Ok(None);
            }
            out.push_str(value);
        }
        Ok(Some(fqdn(&out)?.to_string()))
    }
}

impl Default for NameTemplate {
    fn default() -> Self {
        // The default template is valid.
        NameTemplate::parse(NameTemplate::DEFAULT).unwrap_or_else(|_| NameTemplate {
            source: String::new(),
            parts: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(service: &str, labels: &[(&str, &str)]) -> Connection {
        Connection {
            id: "c-1".into(),
            network_service: service.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_default_names_a_pod_in_its_network() {
        let t = NameTemplate::default();
        assert_eq!(t.as_str(), NameTemplate::DEFAULT);
        let c = conn("vl3", &[("podName", "Web-1")]);
        assert_eq!(t.render(&c).unwrap().as_deref(), Some("web-1.vl3."));
    }

    #[test]
    fn every_placeholder_renders_and_a_missing_value_makes_no_name() {
        let t = NameTemplate::parse("{labels.app}-{id}.{service}.svc").unwrap();
        let c = conn("net", &[("app", "db")]);
        assert_eq!(t.render(&c).unwrap().as_deref(), Some("db-c-1.net.svc."));
        assert_eq!(t.render(&conn("net", &[])).unwrap(), None);
        assert_eq!(t.render(&conn("net", &[("app", "")])).unwrap(), None);
        assert_eq!(
            NameTemplate::parse("fixed.name")
                .unwrap()
                .render(&c)
                .unwrap()
                .as_deref(),
            Some("fixed.name.")
        );
    }

    #[test]
    fn a_bad_template_or_a_bad_rendered_name_is_an_error() {
        for bad in ["", "{labels.x", "{labels.}", "{nope}", "a}b"] {
            let e = NameTemplate::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("invalid name template"),
                "{bad}: {e}"
            );
        }
        let t = NameTemplate::default();
        let c = conn("vl3", &[("podName", "a..b")]);
        let e = t.render(&c).unwrap_err();
        assert!(e.to_string().contains("invalid DNS name"), "{e}");
    }
}
