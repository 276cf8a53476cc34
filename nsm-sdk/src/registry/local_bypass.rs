//! `local_bypass`: the node manager's front of the endpoint registry.
//!
//! What it does: an endpoint on this node registers through its node manager, and the
//! registry behind it must send other nodes' traffic to the manager, not to the
//! endpoint's node-local URL. So a Register remembers the endpoint's own URL, passes
//! the entry on with `url` replaced by the manager's URL, and answers the registrant
//! with its original URL. A Find passes on; in its results (a watch stream included),
//! an entry that carries the manager's URL and is one of the endpoints registered here
//! gets its local URL back, so this node reaches its own endpoints directly. An entry
//! that carries the manager's URL but is not (or no longer) registered here is left
//! out of the results (a `deleted` event still passes): this node cannot reach it, and
//! handing it on with the manager's own URL would send a forwarder's Request back to
//! this manager in a loop until its deadline (seen as a 5 s stall of heal when an
//! endpoint was unregistered while its entry was still on its way from the registry,
//! or after a manager restart before its endpoints registered again). An
//! Unregister forgets the endpoint and passes on with the manager's URL.
//!
//! State: endpoint name -> its local URL, for the endpoints registered through this
//! handler.
//!
//! Failure handled: a Register that fails downstream leaves the map as it was (a first
//! registration is not remembered).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::StreamExt;
use nsm_proto::registry::NetworkServiceEndpoint;

use super::{FindStream, Query, RegistryHandler, RegistryNext};
use crate::core::Cx;
use crate::core::Url;
use crate::Result;

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct LocalBypass {
    inner: Arc<Inner>,
}

struct Inner {
    own_url: String,
    local: Mutex<HashMap<String, String>>,
}

/// The `local_bypass` handler of the node manager listening on `own_url`.
pub fn local_bypass(own_url: Url) -> LocalBypass {
    LocalBypass {
        inner: Arc::new(Inner {
            own_url: own_url.to_string(),
            local: Mutex::new(HashMap::new()),
        }),
    }
}

impl LocalBypass {
    fn local(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.inner.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The local URL of the endpoint `name`, if it registered through this handler.
    pub fn local_url(&self, name: &str) -> Option<String> {
        self.local().get(name).cloned()
    }

    /// How many local endpoints this handler knows.
    pub fn len(&self) -> usize {
        self.local().len()
    }

    /// Whether no local endpoint is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for LocalBypass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBypass")
            .field("own_url", &self.inner.own_url)
            .field("local", &self.len())
            .finish()
    }
}

#[async_trait]
impl RegistryHandler<NetworkServiceEndpoint> for LocalBypass {
    async fn register(
        &self,
        cx: &mut Cx,
        mut r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<NetworkServiceEndpoint> {
        let original = std::mem::replace(&mut r.url, self.inner.own_url.clone());
        // Known here before the registry can hand the entry out: a Find on this node
        // that races with the registration must never see the manager's own URL without
        // the local one (the manager would dial itself).
        let name = r.name.clone();
        let previous = self.local().insert(name.clone(), original.clone());
        match next.register(cx, r).await {
            Ok(mut out) => {
                if out.name != name {
                    self.local().insert(out.name.clone(), original.clone());
                }
                out.url = original;
                Ok(out)
            }
            Err(e) => {
                let mut local = self.local();
                match previous {
                    Some(url) => local.insert(name, url),
                    None => local.remove(&name),
                };
                Err(e)
            }
        }
    }

    async fn find(
        &self,
        cx: &mut Cx,
        query: Query<NetworkServiceEndpoint>,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<FindStream<NetworkServiceEndpoint>> {
        // URLs match by substring in a Find, so a query for this manager's own URL
        // (`tcp://h:500`) would also return the entries of a manager at `tcp://h:5001`.
        // A query for our own URL means our own entries: keep exact matches only.
        let own_only = query.template.url == self.inner.own_url;
        let stream = next.find(cx, query).await?;
        let inner = self.inner.clone();
        let stream = stream.filter(move |item| {
            let keep = !own_only
                || match item {
                    Ok(found) => found.resource.url == inner.own_url,
                    Err(_) => true,
                };
            futures::future::ready(keep)
        });
        let inner = self.inner.clone();
        Ok(Box::pin(stream.filter_map(move |item| {
            let item = match item {
                Ok(mut found) => {
                    let r = &mut found.resource;
                    if r.url == inner.own_url {
                        let local = inner.local.lock().unwrap_or_else(|p| p.into_inner());
                        match local.get(&r.name) {
                            Some(url) => r.url = url.clone(),
                            // Unreachable through us: leave it out (not its deletion).
                            None if !found.deleted => return futures::future::ready(None),
                            None => {}
                        }
                    }
                    Ok(found)
                }
                Err(e) => Err(e),
            };
            futures::future::ready(Some(item))
        })))
    }

    async fn unregister(
        &self,
        cx: &mut Cx,
        mut r: NetworkServiceEndpoint,
        next: RegistryNext<NetworkServiceEndpoint>,
    ) -> Result<()> {
        self.local().remove(&r.name);
        r.url = self.inner.own_url.clone();
        next.unregister(cx, r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::memory::memory;
    use crate::registry::RegistryChain;
    use std::time::Duration;

    const NSMGR: &str = "tcp://10.0.0.1:5001";

    fn nse(name: &str, url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec!["svc".into()],
            url: url.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_entry_with_the_manager_url_not_registered_here_is_left_out_but_its_deletion_passes()
    {
        let bypass = local_bypass(NSMGR.parse().unwrap());
        let store = memory();
        let front = RegistryChain::builder()
            .push(bypass.clone())
            .push(store.clone())
            .build();
        let central = RegistryChain::builder().push(store.clone()).build();
        let cx = &mut Cx::server();
        // Registered under the manager's URL by someone else (a previous life of this
        // manager, say), and one registered through it.
        central.register(cx, nse("stale", NSMGR)).await.unwrap();
        front
            .register(cx, nse("local", "unix:///nse.sock"))
            .await
            .unwrap();
        let found = front.list(cx, nse("", "")).await.unwrap();
        let urls: Vec<(String, String)> = found.into_iter().map(|n| (n.name, n.url)).collect();
        assert_eq!(
            urls,
            [("local".to_string(), "unix:///nse.sock".to_string())]
        );

        let mut watch = front
            .find(
                cx,
                Query {
                    template: nse("", ""),
                    watch: true,
                },
            )
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.resource.name, "local");
        central.unregister(cx, nse("stale", NSMGR)).await.unwrap();
        let gone = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((gone.resource.name.as_str(), gone.deleted), ("stale", true));
    }

    #[tokio::test]
    async fn a_local_endpoint_is_stored_with_the_manager_url_and_found_with_its_own() {
        let bypass = local_bypass(NSMGR.parse().unwrap());
        let store = memory();
        let front = RegistryChain::builder()
            .push(bypass.clone())
            .push(store.clone())
            .build();
        let central = RegistryChain::builder().push(store.clone()).build();
        let cx = &mut Cx::server();

        let out = front
            .register(cx, nse("local", "unix:///nse.sock"))
            .await
            .unwrap();
        assert_eq!(
            out.url, "unix:///nse.sock",
            "the registrant gets its own URL back"
        );
        assert_eq!(
            store.get("local").unwrap().url,
            NSMGR,
            "other nodes reach it through the manager"
        );
        assert_eq!(
            bypass.local_url("local").as_deref(),
            Some("unix:///nse.sock")
        );

        // A remote endpoint, and one that carries the manager URL without being local.
        central
            .register(cx, nse("remote", "tcp://10.0.0.2:5001"))
            .await
            .unwrap();
        central.register(cx, nse("stranger", NSMGR)).await.unwrap();

        let mut found: Vec<_> = front
            .list(cx, nse("", ""))
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.url))
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                ("local".to_string(), "unix:///nse.sock".to_string()),
                ("remote".to_string(), "tcp://10.0.0.2:5001".to_string()),
            ],
            "the stranger carries our URL but is not ours: unreachable through us"
        );
        let central_view = central.list(cx, nse("local", "")).await.unwrap();
        assert_eq!(central_view[0].url, NSMGR);
    }

    /// Records whether the bypass knew the local URL while the registry stored the
    /// entry, or fails the registration.
    struct Upstream {
        bypass: LocalBypass,
        known: Mutex<Vec<Option<String>>>,
        fail: bool,
    }

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Arc<Upstream> {
        async fn register(
            &self,
            cx: &mut Cx,
            r: NetworkServiceEndpoint,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<NetworkServiceEndpoint> {
            self.known
                .lock()
                .unwrap()
                .push(self.bypass.local_url(&r.name));
            if self.fail {
                return Err(crate::Error::unavailable("registry down"));
            }
            next.register(cx, r).await
        }
    }

    #[tokio::test]
    async fn the_local_url_is_known_before_the_registry_hands_the_entry_out() {
        for fail in [false, true] {
            let bypass = local_bypass(NSMGR.parse().unwrap());
            let upstream = Arc::new(Upstream {
                bypass: bypass.clone(),
                known: Mutex::new(Vec::new()),
                fail,
            });
            let front = RegistryChain::builder()
                .push(bypass.clone())
                .push(upstream.clone())
                .build();
            let out = front
                .register(&mut Cx::server(), nse("fwd", "inmem://fwd"))
                .await;
            assert_eq!(out.is_err(), fail);
            assert_eq!(
                *upstream.known.lock().unwrap(),
                [Some("inmem://fwd".to_string())]
            );
            assert_eq!(
                bypass.local_url("fwd").is_some(),
                !fail,
                "a failed first registration is not remembered"
            );
        }
    }

    #[tokio::test]
    async fn watch_streams_are_mapped_item_by_item() {
        let bypass = local_bypass(NSMGR.parse().unwrap());
        let store = memory();
        let front = RegistryChain::builder().push(bypass).push(store).build();
        let cx = &mut Cx::server();
        let mut w = front
            .find(
                cx,
                Query {
                    template: nse("", ""),
                    watch: true,
                },
            )
            .await
            .unwrap();
        front
            .register(cx, nse("local", "unix:///a.sock"))
            .await
            .unwrap();
        let item = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            (item.resource.url.as_str(), item.deleted),
            ("unix:///a.sock", false)
        );
    }

    #[tokio::test]
    async fn unregister_forgets_the_endpoint_and_removes_it_centrally() {
        let bypass = local_bypass(NSMGR.parse().unwrap());
        let store = memory();
        let front = RegistryChain::builder()
            .push(bypass.clone())
            .push(store.clone())
            .build();
        let cx = &mut Cx::server();
        front
            .register(cx, nse("local", "unix:///a.sock"))
            .await
            .unwrap();
        front
            .unregister(cx, nse("local", "unix:///a.sock"))
            .await
            .unwrap();
        assert!(store.is_empty());
        assert!(bypass.is_empty());

        // Registered again centrally by someone else with the manager URL: not ours
        // now, so not handed out with our own URL (a loop back to this manager).
        let central = RegistryChain::builder().push(store.clone()).build();
        central.register(cx, nse("local", NSMGR)).await.unwrap();
        assert!(front.list(cx, nse("local", "")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_find_for_our_own_url_ignores_managers_whose_url_merely_contains_it() {
        let central = memory::<NetworkServiceEndpoint>();
        let other = NetworkServiceEndpoint {
            name: "fwd-other".into(),
            network_service_names: vec!["forwarder".into()],
            url: "tcp://127.0.0.1:5001".into(),
            ..Default::default()
        };
        let store = RegistryChain::builder().push(central.clone()).build();
        store.register(&mut Cx::server(), other).await.unwrap();
        let front = RegistryChain::builder()
            .push(local_bypass("tcp://127.0.0.1:500".parse().unwrap()))
            .push(central)
            .build();
        let mine = NetworkServiceEndpoint {
            name: "fwd-mine".into(),
            network_service_names: vec!["forwarder".into()],
            url: "inmem://fwd-mine".into(),
            ..Default::default()
        };
        front.register(&mut Cx::server(), mine).await.unwrap();
        let found = front
            .list(
                &mut Cx::server(),
                NetworkServiceEndpoint {
                    url: "tcp://127.0.0.1:500".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let names: Vec<_> = found.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["fwd-mine"]);
        assert_eq!(found[0].url, "inmem://fwd-mine");
    }
}
