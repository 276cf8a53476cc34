//! What discovery hands to selection, shared by `discover`, `discover_forwarder`,
//! `round_robin` and `netsvc_monitor` (kept apart from each so none imports another):
//! the [`Candidates`] `discover` puts in the context, the `SelectedEndpoint` a
//! selector remembers in the connection's state, and the helpers their messages and
//! registry calls share.
//!
//! State: none of its own; `SelectedEndpoint` lives in a connection's state.

use std::collections::HashMap;
use std::sync::Mutex;

use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};

use crate::core::{Cx, Side, Url};
use crate::Error;

/// The network service of a request and the endpoints that may serve it, in order of
/// preference; put in [`Cx::ext`] by [`discover`](super::discover()) for a selector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidates {
    /// The network service, as registered.
    pub ns: NetworkService,
    /// The endpoints that may serve the request.
    pub nses: Vec<NetworkServiceEndpoint>,
}

/// The endpoint a connection was last sent to, and its URL; kept in the connection's
/// state so a Close can reach it without the registry.
#[derive(Debug, Default)]
pub(crate) struct SelectedEndpoint(Mutex<Option<(String, Url)>>);

impl SelectedEndpoint {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(String, Url)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the URL of the endpoint `name` is known.
    pub(crate) fn knows(&self, name: &str) -> bool {
        self.url_for(name).is_some()
    }

    /// The remembered URL, if it is the one of endpoint `name` (any endpoint when `name`
    /// is empty).
    pub(crate) fn url_for(&self, name: &str) -> Option<Url> {
        self.lock()
            .as_ref()
            .filter(|(n, _)| name.is_empty() || n == name)
            .map(|(_, u)| u.clone())
    }

    pub(crate) fn set(&self, name: &str, url: Url) {
        *self.lock() = Some((name.to_string(), url));
    }
}

/// A context for a registry call made on behalf of `cx`: same deadline and span, but
/// none of the call's values (a `ClientUrl` meant for the next hop must not leak into
/// the registry client).
pub(crate) fn registry_cx(cx: &Cx) -> Cx {
    Cx::new(Side::Client)
        .with_deadline(cx.deadline())
        .with_span(cx.span().clone())
}

/// `e` with `prefix` in front of its message; the variant (and so the code) is kept.
pub(crate) fn prefix_error(e: Error, prefix: &str) -> Error {
    // A message that passed another hop with the same prefix keeps it once.
    let already = match &e {
        Error::Remote { message, .. } => message.contains(prefix),
        other => other.to_string().contains(prefix),
    };
    if already {
        return e;
    }
    e.prefixed(prefix)
}

/// Labels as `{a=1, b=2}`, sorted, for messages.
pub(crate) fn fmt_labels(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    format!("{{{}}}", pairs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_added_once() {
        let e = prefix_error(Error::not_found("x"), "network service s: ");
        let e = prefix_error(e, "network service s: ");
        assert_eq!(e.to_string().matches("network service s: ").count(), 1);
    }

    #[test]
    fn prefixed_errors_keep_their_code() {
        let e = prefix_error(Error::unavailable("down"), "tried 3: ");
        assert!(matches!(&e, Error::Unavailable(m) if m == "tried 3: down"));
        let e = prefix_error(
            Error::Remote {
                code: tonic::Code::ResourceExhausted,
                message: "busy".into(),
            },
            "x: ",
        );
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            fmt_labels(&HashMap::from([
                ("b".to_string(), "2".to_string()),
                ("a".to_string(), "1".to_string())
            ])),
            "{a=1, b=2}"
        );
    }
}
