//! `authorize`: a registry name belongs to the identity that registered it.
//!
//! What it does: a Register or Unregister is checked against the registry policies
//! ([`policy::REGISTRY`], Go NSM's `client_allowed`) with the caller's SPIFFE ID (the
//! mTLS peer of the call, `cx.peer().identity`), the name and the name's owner: a free
//! name may be registered by any identity, which then owns it; only the owner may
//! refresh or unregister it. A successful Unregister frees the name, and so does the
//! expiry of the registration: `expire`'s own Unregister (marked [`ExpiryCleanup`])
//! passes whoever owns the name, and a registration past its `expiration_time` counts as
//! free even before that. Find passes through.
//!
//! Place it after `expire` and before the store (`validate`, `expire`, `authorize`,
//! `memory`), so that expiry frees names and a refused Register leaves `expire`'s timer
//! of the owner's entry as it was.
//!
//! State: per owned name, the owner and when its registration expires, behind a
//! per-name async lock that puts the calls for one name in order (two identities racing
//! for a free name: the first to get the lock owns it). An entry lives exactly as long
//! as the registration: removed on a successful Unregister, on expiry, and when the
//! Register that created it fails or is refused.
//!
//! Failures handled: a caller without an identity (no mTLS), a name owned by another
//! identity, a policy that refuses or fails to evaluate: PermissionDenied, and nothing
//! after this handler sees the call.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tracing::debug;

use super::expire::ExpiryCleanup;
use super::{RegistryHandler, RegistryNext, Resource};
use crate::core::rt::keyed_lock::KeyedLock;
use crate::core::Cx;
use crate::security::policy::{self, registry_input, PolicySet};
use crate::security::SpiffeId;
use crate::wire::bounds::Shown;
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct Authorize {
    inner: Arc<Inner>,
}

/// The `authorize` handler for network services and endpoints, with `policies` (the
/// [`policy::REGISTRY`] list must be in the set).
pub fn authorize(policies: PolicySet) -> Authorize {
    Authorize {
        inner: Arc::new(Inner {
            policies,
            owners: KeyedLock::default(),
        }),
    }
}

impl Authorize {
    /// How many names have an owner.
    pub fn owned(&self) -> usize {
        self.inner.owners.len()
    }
}

impl fmt::Debug for Authorize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorize")
            .field("policies", &self.inner.policies)
            .field("owned", &self.owned())
            .finish()
    }
}

struct Inner {
    policies: PolicySet,
    /// `None` while a first Register of the name is in flight.
    owners: KeyedLock<Option<Owner>>,
}

struct Owner {
    id: SpiffeId,
    /// When the registration lapses (`None`: never, as network services).
    expires: Option<SystemTime>,
    /// The registered definition (protobuf), for resources others may register as it
    /// is ([`Resource::same_definition`]: network services).
    definition: Option<Vec<u8>>,
}

impl Owner {
    fn current(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|t| now < t)
    }
}

/// When a registration lapses (an endpoint's `expiration_time`; network services do
/// not), and whether its definition is shared (network services).
trait Lapsing: Resource {
    fn lapses(&self) -> Option<SystemTime>;
    fn shares(&self) -> bool;
}

impl Lapsing for NetworkService {
    fn lapses(&self) -> Option<SystemTime> {
        None
    }
    fn shares(&self) -> bool {
        true
    }
}

impl Lapsing for NetworkServiceEndpoint {
    fn lapses(&self) -> Option<SystemTime> {
        self.expiration_time
            .and_then(|t| SystemTime::try_from(t).ok())
    }
    fn shares(&self) -> bool {
        false
    }
}

/// The caller's verified SPIFFE ID (its mTLS identity), or PermissionDenied.
pub(crate) fn caller<R: Resource>(cx: &Cx, name: &str) -> Result<SpiffeId> {
    cx.peer()
        .identity
        .as_ref()
        .map(|p| p.id.clone())
        .ok_or_else(|| {
            Error::PermissionDenied(format!(
                "{} {}: the caller has no verified identity (mTLS)",
                R::KIND,
                Shown(name)
            ))
        })
}

/// Asks the [`policy::REGISTRY`] policies whether `caller` may change `name`, owned by
/// `owner` (`None`: free), with a call that registers exactly what is registered
/// (`unchanged`, [`Resource::same_definition`]); PermissionDenied when not. Shared with the stores that keep
/// owners themselves (etcd).
pub(crate) fn allowed<R: Resource>(
    policies: &PolicySet,
    caller: &SpiffeId,
    name: &str,
    owner: Option<&SpiffeId>,
    unchanged: bool,
) -> Result<()> {
    let input = registry_input(caller, name, owner, unchanged);
    policies.check(policy::REGISTRY, &input).map_err(|e| {
        debug!(kind = R::KIND, name = %Shown(name), caller = %caller, error = %e, "registry call refused");
        Error::PermissionDenied(format!("{} {}: {e}", R::KIND, Shown(name)))
    })
}

impl Inner {
    /// Asks the policies whether `caller` may change `name`, owned by `owner`.
    fn allow<R: Resource>(
        &self,
        caller: &SpiffeId,
        name: &str,
        owner: Option<&Owner>,
        unchanged: bool,
    ) -> Result<()> {
        let owner = owner
            .filter(|o| o.current(SystemTime::now()))
            .map(|o| &o.id);
        allowed::<R>(&self.policies, caller, name, owner, unchanged)
    }

    async fn register<R: Lapsing>(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<R> {
        let name = r.name().to_string();
        let caller = caller::<R>(cx, &name)?;
        let mut slot = self.owners.lock_or_insert(&name, || None).await;
        let current = slot.as_ref().filter(|o| o.current(SystemTime::now()));
        let unchanged = current
            .and_then(|o| o.definition.as_ref())
            .and_then(|d| R::decode(d.as_slice()).ok())
            .is_some_and(|stored| r.same_definition(&stored));
        // Whoever registers a shared definition as it is does not become its owner.
        let keeps_owner = unchanged && current.is_some_and(|o| o.id != caller);
        let out = match self.allow::<R>(&caller, &name, slot.as_ref(), unchanged) {
            Ok(()) => next.register(cx, r).await,
            Err(e) => Err(e),
        };
        match &out {
            Ok(_) if keeps_owner => {}
            Ok(stored) => {
                **slot = Some(Owner {
                    id: caller,
                    expires: stored.lapses(),
                    definition: stored.shares().then(|| stored.encode_to_vec()),
                });
            }
            // A name that was free stays free (and takes no room).
            Err(_) if slot.is_none() => self.owners.remove(&name, &mut slot),
            Err(_) => {}
        }
        out
    }

    async fn unregister<R: Lapsing>(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<()> {
        let name = r.name().to_string();
        let cleanup = cx.ext().get::<ExpiryCleanup>().is_some();
        let caller = if cleanup {
            None
        } else {
            Some(caller::<R>(cx, &name)?)
        };
        let Some(mut slot) = self.owners.lock(&name).await else {
            // Nobody owns the name: nothing to protect, nothing to free.
            if let Some(caller) = &caller {
                self.allow::<R>(caller, &name, None, false)?;
            }
            return next.unregister(cx, r).await;
        };
        if let Some(caller) = &caller {
            self.allow::<R>(caller, &name, slot.as_ref(), false)?;
        }
        next.unregister(cx, r).await?;
        self.owners.remove(&name, &mut slot);
        Ok(())
    }
}

/// The same checks for both resources: one impl per resource type, written once.
macro_rules! authorize_registry_handler {
    ($($resource:ty),*) => {$(
        #[async_trait]
        impl RegistryHandler<$resource> for Authorize {
            async fn register(
                &self,
                cx: &mut Cx,
                r: $resource,
                next: RegistryNext<$resource>,
            ) -> Result<$resource> {
                self.inner.register(cx, r, next).await
            }

            async fn unregister(
                &self,
                cx: &mut Cx,
                r: $resource,
                next: RegistryNext<$resource>,
            ) -> Result<()> {
                self.inner.unregister(cx, r, next).await
            }
        }
    )*};
}

authorize_registry_handler!(NetworkService, NetworkServiceEndpoint);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Peer;
    use crate::registry::expire::expire;
    use crate::registry::memory::{memory, Memory};
    use crate::registry::RegistryChain;
    use crate::security::dev_ca::DevCa;
    use crate::security::{PeerIdentity, Svid};
    use std::time::Duration;
    use tonic::Code;

    struct Ids {
        alice: PeerIdentity,
        mallory: PeerIdentity,
    }

    fn ids() -> Ids {
        let ca = DevCa::new("example.org").unwrap();
        let peer = |name: &str| {
            let id = SpiffeId::parse(&format!("spiffe://example.org/{name}")).unwrap();
            let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
            let svid =
                Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
            PeerIdentity::from_leaf(svid.leaf().clone()).unwrap()
        };
        Ids {
            alice: peer("alice"),
            mallory: peer("mallory"),
        }
    }

    fn as_peer(id: &PeerIdentity) -> Cx {
        Cx::server().with_peer(Peer {
            identity: Some(id.clone()),
            ..Default::default()
        })
    }

    fn nse(name: &str, url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec!["svc".into()],
            url: url.into(),
            ..Default::default()
        }
    }

    fn chain(
        expiry: Duration,
    ) -> (
        Authorize,
        Memory<NetworkServiceEndpoint>,
        RegistryChain<NetworkServiceEndpoint>,
    ) {
        let auth = authorize(PolicySet::defaults().unwrap());
        let store = memory();
        let chain = RegistryChain::builder()
            .push(expire(expiry))
            .push(auth.clone())
            .push(store.clone())
            .build();
        (auth, store, chain)
    }

    #[tokio::test]
    async fn only_the_owner_may_refresh_or_unregister_a_name() {
        let ids = ids();
        let (auth, store, reg) = chain(Duration::from_secs(60));
        reg.register(&mut as_peer(&ids.alice), nse("nse-1", "tcp://alice:1"))
            .await
            .unwrap();

        let e = reg
            .register(&mut as_peer(&ids.mallory), nse("nse-1", "tcp://mallory:1"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert!(e.to_string().contains("client_allowed"), "{e}");
        let e = reg
            .unregister(&mut as_peer(&ids.mallory), nse("nse-1", ""))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert_eq!(store.get("nse-1").unwrap().url, "tcp://alice:1");

        reg.register(&mut as_peer(&ids.alice), nse("nse-1", "tcp://alice:2"))
            .await
            .unwrap();
        assert_eq!(store.get("nse-1").unwrap().url, "tcp://alice:2");
        reg.unregister(&mut as_peer(&ids.alice), nse("nse-1", ""))
            .await
            .unwrap();
        assert_eq!(auth.owned(), 0);

        // Free again: anybody may take it.
        reg.register(&mut as_peer(&ids.mallory), nse("nse-1", "tcp://mallory:1"))
            .await
            .unwrap();
        assert_eq!(store.get("nse-1").unwrap().url, "tcp://mallory:1");
    }

    #[tokio::test]
    async fn a_caller_without_an_identity_is_refused_and_takes_no_room() {
        let (auth, store, reg) = chain(Duration::from_secs(60));
        let e = reg
            .register(&mut Cx::server(), nse("nse-1", "tcp://a:1"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.to_string().contains("no verified identity"), "{e}");
        let e = reg
            .unregister(&mut Cx::server(), nse("nse-1", ""))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(store.is_empty());
        assert_eq!(auth.owned(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_registration_frees_the_name_and_its_entry() {
        let ids = ids();
        let (auth, store, reg) = chain(Duration::from_secs(5));
        reg.register(&mut as_peer(&ids.alice), nse("nse-1", "tcp://alice:1"))
            .await
            .unwrap();
        assert_eq!(auth.owned(), 1);

        // expire's own Unregister has no identity and still frees the name.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(store.is_empty(), "the entry expired");
        assert_eq!(auth.owned(), 0, "the owner map does not keep expired names");

        reg.register(&mut as_peer(&ids.mallory), nse("nse-1", "tcp://mallory:1"))
            .await
            .unwrap();
        assert_eq!(store.get("nse-1").unwrap().url, "tcp://mallory:1");
    }

    #[tokio::test]
    async fn a_lapsed_registration_is_free_even_before_its_cleanup() {
        let ids = ids();
        // No expire in the chain: only the registration's own expiration_time says.
        let auth = authorize(PolicySet::defaults().unwrap());
        let store = memory();
        let reg = RegistryChain::builder()
            .push(auth.clone())
            .push(store.clone())
            .build();
        let lapsed = NetworkServiceEndpoint {
            expiration_time: Some((SystemTime::now() - Duration::from_secs(1)).into()),
            ..nse("nse-1", "tcp://alice:1")
        };
        reg.register(&mut as_peer(&ids.alice), lapsed)
            .await
            .unwrap();
        reg.register(&mut as_peer(&ids.mallory), nse("nse-1", "tcp://mallory:1"))
            .await
            .unwrap();
        assert_eq!(auth.owned(), 1);
    }

    #[tokio::test]
    async fn network_service_names_are_owned_too() {
        let ids = ids();
        let auth = authorize(PolicySet::defaults().unwrap());
        let store = memory::<NetworkService>();
        let reg = RegistryChain::builder()
            .push(auth.clone())
            .push(store.clone())
            .build();
        let ns = |payload: &str| NetworkService {
            name: "svc".into(),
            payload: payload.into(),
            ..Default::default()
        };
        reg.register(&mut as_peer(&ids.alice), ns("IP"))
            .await
            .unwrap();
        let e = reg
            .register(&mut as_peer(&ids.mallory), ns("ETHERNET"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert_eq!(store.get("svc").unwrap().payload, "IP");
        // The same definition, registered by another identity (the manager of another
        // node whose endpoint serves it too): accepted, and the owner stays.
        reg.register(&mut as_peer(&ids.mallory), ns("IP"))
            .await
            .unwrap();
        let e = reg
            .register(&mut as_peer(&ids.mallory), ns("ETHERNET"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "still not its to change");
        let e = reg
            .unregister(&mut as_peer(&ids.mallory), ns("IP"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "nor to remove");
        reg.register(&mut as_peer(&ids.alice), ns("ETHERNET"))
            .await
            .unwrap();
        assert_eq!(store.get("svc").unwrap().payload, "ETHERNET");
        reg.unregister(&mut as_peer(&ids.alice), ns(""))
            .await
            .unwrap();
        assert_eq!(auth.owned(), 0);
    }

    #[tokio::test]
    async fn an_endpoint_registered_as_it_is_by_another_identity_is_still_refused() {
        let ids = ids();
        let (_, store, reg) = chain(Duration::from_secs(60));
        let mine = nse("nse-1", "tcp://127.0.0.1:1");
        let stored = reg.register(&mut as_peer(&ids.alice), mine).await.unwrap();
        let e = reg
            .register(&mut as_peer(&ids.mallory), stored.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert_eq!(store.get("nse-1").unwrap().url, "tcp://127.0.0.1:1");
    }
}
