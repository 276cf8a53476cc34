//! `kernel_client`: the NSC side of KERNEL — asks for an interface in its own namespace.
//!
//! What it does: on a first Request (the connection has no mechanism yet) it makes the
//! request offer `{cls: LOCAL, type: KERNEL}` with `inodeURL` = the client's network
//! namespace, `netnsInode` = that namespace's inode (when this process can read it: the
//! manager finds the namespace by it when the client runs in a pid namespace of its own,
//! `nsm_sdk::handlers::netns_inode`) and `name` = the interface it wants: the name set with
//! [`KernelClient::ifname`], else the `name` the request's KERNEL preference already
//! carries (an NS URL `kernel://service/nsm-1` puts it there), else a generated one
//! ([`generate_ifname`] of the network service). A KERNEL
//! preference the request already has is completed in place; otherwise one is
//! appended. A refresh carries the established mechanism and passes untouched.
//! With [`KernelClient::only_when_offered`] a request that offers no KERNEL (a client
//! asking for NOOP only for some of its URLs) passes untouched too, instead of having
//! KERNEL added.
//!
//! State: the interface name chosen for the connection (needs `begin` before it), so
//! every attempt of a retried first request offers the same name.
//!
//! Failure handled: a bad interface name (over 15 bytes, `/`, `:`, whitespace) or a
//! namespace URL that is not `file://` is InvalidArgument before anything is sent.

use std::sync::Mutex;

use nsm_sdk::config::check_interface_name;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::wire::params;
use nsm_sdk::{async_trait, Cx, Error, Handler, Next, Result};
use tracing::debug;

use super::{generate_ifname, is_kernel, kernel_mechanism};

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct KernelClient {
    netns_url: String,
    ifname: Option<String>,
    bridged: bool,
    only_when_offered: bool,
}

/// The NSC side of KERNEL for a client whose pod namespace is `netns_url` (a `file://`
/// URL the forwarder can open, e.g. [`own_netns_url()`] or `file:///run/netns/<name>`).
pub fn kernel_client(netns_url: impl Into<String>) -> KernelClient {
    KernelClient {
        netns_url: netns_url.into(),
        ifname: None,
        bridged: false,
        only_when_offered: false,
    }
}

/// `file:///proc/<pid>/ns/net` of this process: the namespace a client in a pod lives in.
pub fn own_netns_url() -> String {
    format!("file:///proc/{}/ns/net", std::process::id())
}

impl KernelClient {
    /// Asks for this interface name for every connection (instead of the NS URL's or a
    /// generated one). Checked on each Request.
    pub fn ifname(mut self, name: impl Into<String>) -> Self {
        self.ifname = Some(name.into());
        self
    }

    /// Marks this client's interfaces [`BRIDGED`](super::BRIDGED): the pod bridges them
    /// to another interface (a passthrough NSE's downstream side), so the forwarder
    /// puts no addresses, routes or rules on them.
    pub fn bridged(mut self) -> Self {
        self.bridged = true;
        self
    }

    /// Fills in only a KERNEL preference the request already offers, and passes a
    /// request that offers none on untouched: without it a NOOP-only request would get
    /// KERNEL added, which a client that picks the mechanism per NS URL
    /// ([`preferences`](super::preferences())) does not want.
    pub fn only_when_offered(mut self) -> Self {
        self.only_when_offered = true;
        self
    }
}

/// The interface name chosen for one connection.
#[derive(Debug, Default)]
struct ChosenName(Mutex<Option<String>>);

impl ChosenName {
    fn get_or(&self, make: impl FnOnce() -> String) -> String {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(make)
            .clone()
    }
}

/// The inode of the namespace file a `file://` URL names, as this process sees it;
/// `None` when it cannot be read.
pub fn netns_inode_of(url: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let path = url::Url::parse(url).ok()?.to_file_path().ok()?;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

pub(super) fn check_netns_url(url: &str) -> Result<()> {
    match url::Url::parse(url) {
        Ok(u) if u.scheme() == "file" => Ok(()),
        Ok(u) => Err(Error::invalid(format!(
            "namespace URL {url:?}: scheme {:?}, expected file://",
            u.scheme()
        ))),
        Err(e) => Err(Error::invalid(format!("namespace URL {url:?}: {e}"))),
    }
}

#[async_trait]
impl Handler for KernelClient {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let offered = req.mechanism_preferences.iter().any(is_kernel);
        let conn = req.connection.get_or_insert_with(Default::default);
        if conn.mechanism.is_some() || (self.only_when_offered && !offered) {
            return next.request(cx, req).await;
        }
        check_netns_url(&self.netns_url)?;
        let service = conn.network_service.clone();
        let pos = match req.mechanism_preferences.iter().position(is_kernel) {
            Some(pos) => pos,
            None => {
                req.mechanism_preferences.push(kernel_mechanism());
                req.mechanism_preferences.len() - 1
            }
        };
        let pref = &mut req.mechanism_preferences[pos];
        let offered = pref.parameters.get(params::NAME).cloned();
        let make = || {
            self.ifname
                .clone()
                .or(offered)
                .unwrap_or_else(|| generate_ifname(&service))
        };
        let name = match cx.conn() {
            Some(h) => h.state::<ChosenName>().get_or(make),
            None => make(),
        };
        check_interface_name(&name)?;
        debug!(ifname = %name, netns = %self.netns_url, "offering KERNEL");
        pref.parameters.insert(params::NAME.into(), name);
        pref.parameters
            .insert(params::INODE_URL.into(), self.netns_url.clone());
        match netns_inode_of(&self.netns_url) {
            Some(inode) => {
                pref.parameters
                    .insert(params::NETNS_INODE.into(), inode.to_string());
            }
            None => {
                pref.parameters.remove(params::NETNS_INODE);
            }
        }
        if self.bridged {
            pref.parameters.insert(super::BRIDGED.into(), "true".into());
        }
        next.request(cx, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mechanism::tests_support::{Grab, Seen};
    use nsm_sdk::handlers::begin;
    use nsm_sdk::proto::connection::Mechanism;
    use nsm_sdk::wire::types;
    use nsm_sdk::Chain;

    fn req(service: &str, prefs: Vec<Mechanism>) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "c".into(),
                network_service: service.into(),
                ..Default::default()
            }),
            mechanism_preferences: prefs,
        }
    }

    async fn offered(client: KernelClient, r: NetworkServiceRequest) -> Result<Seen> {
        let grab = Grab::default();
        let chain = Chain::builder().push(client).push(grab.clone()).build();
        chain.request(&mut Cx::client(), r).await?;
        Ok(grab.last())
    }

    #[tokio::test]
    async fn offers_kernel_with_its_namespace_and_a_generated_name() {
        let seen = offered(
            kernel_client("file:///run/netns/a"),
            req("icmp-responder", vec![]),
        )
        .await
        .unwrap();
        let [m] = &seen.prefs[..] else {
            panic!("{:?}", seen.prefs)
        };
        assert_eq!(
            (m.cls.as_str(), m.r#type.as_str()),
            ("LOCAL", types::KERNEL)
        );
        assert_eq!(m.parameters[params::INODE_URL], "file:///run/netns/a");
        let name = &m.parameters[params::NAME];
        assert!(
            name.starts_with("icmp-respo-") && name.len() == 15,
            "{name}"
        );
    }

    #[tokio::test]
    async fn the_inode_of_a_readable_namespace_goes_with_its_url() {
        use std::os::unix::fs::MetadataExt;
        let seen = offered(kernel_client(own_netns_url()), req("svc", vec![]))
            .await
            .unwrap();
        let inode = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(
            seen.prefs[0].parameters[params::NETNS_INODE],
            inode.to_string()
        );
        // A namespace this process cannot read: the URL alone.
        let seen = offered(
            kernel_client("file:///run/netns/nsm-no-such-ns"),
            req("svc", vec![]),
        )
        .await
        .unwrap();
        assert!(!seen.prefs[0].parameters.contains_key(params::NETNS_INODE));
    }

    #[tokio::test]
    async fn the_ns_url_name_is_kept_and_a_configured_name_wins_over_it() {
        let from_url = nsm_sdk::config::NsUrl::parse("kernel://svc/nsm-7")
            .unwrap()
            .to_request();
        let seen = offered(kernel_client("file:///run/netns/a"), from_url.clone())
            .await
            .unwrap();
        assert_eq!(seen.prefs.len(), 1, "completed, not duplicated");
        assert_eq!(seen.prefs[0].parameters[params::NAME], "nsm-7");
        assert_eq!(
            seen.prefs[0].parameters[params::INODE_URL],
            "file:///run/netns/a"
        );

        let seen = offered(
            kernel_client("file:///run/netns/a").ifname("eth9"),
            from_url,
        )
        .await
        .unwrap();
        assert_eq!(seen.prefs[0].parameters[params::NAME], "eth9");
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_of_one_connection_offers_the_same_generated_name() {
        let grab = Grab::default();
        let fail_first = Grab::failing_first(1);
        let chain = Chain::builder()
            .push(begin())
            .push(nsm_sdk::handlers::retry().try_timeout(std::time::Duration::from_secs(5)))
            .push(kernel_client("file:///run/netns/a"))
            .push(grab.clone())
            .push(fail_first)
            .build();
        chain
            .request(&mut Cx::client(), req("svc", vec![]))
            .await
            .unwrap();
        let names: Vec<String> = grab
            .all()
            .iter()
            .map(|s| s.prefs[0].parameters[params::NAME].clone())
            .collect();
        assert_eq!(names.len(), 2, "one failed attempt, one retry");
        assert_eq!(names[0], names[1]);
    }

    #[tokio::test]
    async fn a_refresh_passes_the_established_mechanism_untouched() {
        let mut established = kernel_mechanism();
        established
            .parameters
            .insert(params::NAME.into(), "nsm-1".into());
        let mut r = req("svc", vec![]);
        r.connection.as_mut().unwrap().mechanism = Some(established.clone());
        let seen = offered(kernel_client("file:///run/netns/a"), r)
            .await
            .unwrap();
        assert!(seen.prefs.is_empty());
        assert_eq!(seen.mechanism, Some(established));
    }

    #[tokio::test]
    async fn only_when_offered_completes_a_kernel_offer_and_leaves_a_noop_request_untouched() {
        let client = || kernel_client("file:///run/netns/pod").only_when_offered();
        let url = nsm_sdk::config::NsUrl::parse("kernel://svc/nsm-1").unwrap();
        let mut r = url.to_request();
        r.mechanism_preferences = super::super::preferences(&url, Default::default());
        let seen = offered(client(), r).await.unwrap();
        let got: Vec<&str> = seen.prefs.iter().map(|m| m.r#type.as_str()).collect();
        assert_eq!(got, [types::KERNEL, types::NOOP]);
        assert_eq!(seen.prefs[0].parameters[params::NAME], "nsm-1");
        assert_eq!(
            seen.prefs[0].parameters[params::INODE_URL],
            "file:///run/netns/pod"
        );

        let noop = vec![nsm_sdk::handlers::noop_mechanism()];
        let seen = offered(client(), req("svc", noop.clone())).await.unwrap();
        assert_eq!(seen.prefs, noop);
        assert_eq!(seen.mechanism, None);
    }

    #[tokio::test]
    async fn a_bad_name_or_namespace_url_is_invalid_argument_before_anything_is_sent() {
        for client in [
            kernel_client("file:///run/netns/a").ifname("sixteen-bytes-xx"),
            kernel_client("file:///run/netns/a").ifname("a/b"),
            kernel_client("inode://4/4026531840"),
            kernel_client("not a url"),
        ] {
            let grab = Grab::default();
            let chain = Chain::builder().push(client).push(grab.clone()).build();
            let err = chain
                .request(&mut Cx::client(), req("svc", vec![]))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
            assert!(grab.all().is_empty(), "nothing was sent");
        }
    }
}
