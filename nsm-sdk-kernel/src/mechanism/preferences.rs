//! [`preferences`]: the mechanisms a client offers for an NS URL, KERNEL first where
//! the URL asks for it and NOOP beside it.
//!
//! `kernel://service/nsm-1` offers KERNEL (interface `nsm-1`, the client's namespace
//! filled in by [`kernel_client`](super::kernel_client) with
//! [`only_when_offered`](super::KernelClient::only_when_offered)) first and NOOP second,
//! so a mesh that cannot make a kernel interface still connects; `noop://` offers NOOP
//! only, and so does any other scheme (no other client mechanism exists here) or
//! [`MechanismChoice::Noop`].
//!
//! State: none. Failure handled: a scheme with no mechanism here is not an error, it is
//! requested as NOOP and logged at info.

use nsm_sdk::config::NsUrl;
use nsm_sdk::handlers::noop_mechanism;
use nsm_sdk::proto::connection::Mechanism;
use nsm_sdk::wire::types;
use tracing::info;

/// Which mechanism a client asks for (a program's `NSM_MECHANISM`; with the `clap`
/// feature it is a `clap::ValueEnum`: `from-url`, `noop`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum MechanismChoice {
    /// What the NS URL's scheme names: `kernel://` is KERNEL (NOOP offered second),
    /// anything else NOOP.
    #[default]
    FromUrl,
    /// NOOP for every NS URL: a control-plane-only client, e.g. one outside any pod.
    Noop,
}

/// The mechanism preferences of a request for `url`.
///
/// `kernel://` (with [`MechanismChoice::FromUrl`]): the URL's KERNEL mechanism (with its
/// interface name, if the URL has one) then NOOP. Anything else: NOOP only, logged at
/// info when the URL asked for another mechanism.
pub fn preferences(url: &NsUrl, choice: MechanismChoice) -> Vec<Mechanism> {
    let wanted = url.mechanism_type();
    match (choice, wanted) {
        (MechanismChoice::FromUrl, types::KERNEL) => vec![url.mechanism(), noop_mechanism()],
        (_, types::NOOP) => vec![noop_mechanism()],
        (MechanismChoice::Noop, _) => {
            info!(url = %url, mechanism = wanted, "NSM_MECHANISM=noop: requesting NOOP instead");
            vec![noop_mechanism()]
        }
        (MechanismChoice::FromUrl, _) => {
            info!(
                url = %url,
                mechanism = wanted,
                "this mechanism is not implemented: requesting NOOP instead"
            );
            vec![noop_mechanism()]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_sdk::wire::params;

    fn url(s: &str) -> NsUrl {
        NsUrl::parse(s).unwrap()
    }

    fn types_of(prefs: &[Mechanism]) -> Vec<&str> {
        prefs.iter().map(|m| m.r#type.as_str()).collect()
    }

    #[test]
    fn a_kernel_url_offers_kernel_with_its_interface_then_noop() {
        let prefs = preferences(
            &url("kernel://icmp-responder/nsm-1"),
            MechanismChoice::FromUrl,
        );
        assert_eq!(types_of(&prefs), ["KERNEL", "NOOP"]);
        assert_eq!(prefs[0].parameters[params::NAME], "nsm-1");
        let prefs = preferences(&url("kernel://icmp-responder"), MechanismChoice::FromUrl);
        assert_eq!(types_of(&prefs), ["KERNEL", "NOOP"]);
        assert!(!prefs[0].parameters.contains_key(params::NAME));
    }

    #[test]
    fn other_schemes_and_the_noop_choice_offer_noop_only() {
        for (u, choice) in [
            ("noop://icmp-responder", MechanismChoice::FromUrl),
            ("memif://icmp-responder/m1", MechanismChoice::FromUrl),
            ("kernel://icmp-responder/nsm-1", MechanismChoice::Noop),
        ] {
            let prefs = preferences(&url(u), choice);
            assert_eq!(prefs, [noop_mechanism()], "{u} {choice:?}");
        }
    }
}
