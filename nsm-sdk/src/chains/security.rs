//! [`Security`]: how a component secures itself, handed to each chain's options as one
//! value: mTLS on its servers and on its channel pool, the tokens it signs its path
//! segments with, and the policies its `authorize` handlers evaluate.
//!
//! Secure by default: [`Security::from_env`] reads the identity files named by
//! `NSM_TLS_CERT`, `NSM_TLS_KEY` and `NSM_TLS_CA` (re-read when they change) and the
//! policies (the crate's defaults, or `NSM_POLICIES_DIR`), and refuses to go on without
//! them unless `NSM_INSECURE=true`. [`Security::insecure`] is what tests and in-process
//! meshes that want plaintext say explicitly.
//!
//! State: the identity watch (and, from files, the task that watches them, stopped when
//! the last clone goes), the TLS configs and the compiled policies; all shared.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::registry_server::{registry_server_on, registry_server_with, RegistryServer, Store};
use crate::security::{FileSource, Identity, PolicySet, SecurityConfig, SpiffeId};
use crate::token::{jwt_token, lifetime_token, TokenGenerator, DEFAULT_TOKEN_LIFETIME};
use crate::transport::{Channels, Services, Tls};
use crate::Result;

/// How a component secures itself; see the [module docs](self). Cheap to clone.
#[derive(Clone, Default)]
pub struct Security {
    secure: Option<Arc<Secure>>,
}

struct Secure {
    identity: watch::Receiver<Identity>,
    tls: Tls,
    policies: Arc<PolicySet>,
    /// Keeps the files watched while the component runs.
    _source: Option<FileSource>,
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id() {
            Some(id) => write!(f, "Security({id})"),
            None => f.write_str("Security(insecure)"),
        }
    }
}

impl Security {
    /// No security: plaintext links, unsigned tokens, no policies. Anyone who can reach
    /// a socket can use the component; for tests and demos that say so.
    pub fn insecure() -> Self {
        Security { secure: None }
    }

    /// What the environment says: the identity files of `NSM_TLS_CERT`, `NSM_TLS_KEY`,
    /// `NSM_TLS_CA` (watched for rotation) and the policies of `NSM_POLICIES_DIR` (else
    /// the defaults), or insecure with `NSM_INSECURE=true` (a warning, once).
    ///
    /// Fails with [`Error::Internal`](crate::Error::Internal) naming the three
    /// variables when none is set, or saying which file or policy is bad. Must be
    /// called inside a tokio runtime.
    pub fn from_env() -> Result<Self> {
        match SecurityConfig::from_env()? {
            SecurityConfig::Insecure => Ok(Security::insecure()),
            SecurityConfig::Secure(source) => {
                let policies = PolicySet::from_env()?;
                Security::build(source.watch(), policies, Some(source))
            }
        }
    }

    /// Secure with the identity files `source` watches (rotated files take effect on
    /// the next handshake; the security keeps the source alive) and `policies`.
    pub fn watching(source: FileSource, policies: PolicySet) -> Result<Self> {
        Security::build(source.watch(), policies, Some(source))
    }

    /// Secure with `identity` (a [`FileSource::watch`], or [`Identity::fixed`] for an
    /// identity made in memory) and `policies`.
    pub fn with_identity(identity: watch::Receiver<Identity>, policies: PolicySet) -> Result<Self> {
        Security::build(identity, policies, None)
    }

    fn build(
        identity: watch::Receiver<Identity>,
        policies: PolicySet,
        source: Option<FileSource>,
    ) -> Result<Self> {
        let tls = Tls::new(identity.clone())?;
        Ok(Security {
            secure: Some(Arc::new(Secure {
                identity,
                tls,
                policies: Arc::new(policies),
                _source: source,
            })),
        })
    }

    /// Whether links are mTLS, tokens signed and policies checked.
    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }

    /// The component's own SPIFFE ID (its current SVID's), when secure.
    pub fn id(&self) -> Option<SpiffeId> {
        let secure = self.secure.as_ref()?;
        let id = secure.identity.borrow().svid.id().clone();
        Some(id)
    }

    /// The identity watch, when secure.
    pub fn identity(&self) -> Option<watch::Receiver<Identity>> {
        self.secure.as_ref().map(|s| s.identity.clone())
    }

    /// The TLS configs servers and channel pools use, when secure.
    pub fn tls(&self) -> Option<&Tls> {
        self.secure.as_ref().map(|s| &s.tls)
    }

    /// The policies, when secure.
    pub fn policies(&self) -> Option<Arc<PolicySet>> {
        self.secure.as_ref().map(|s| s.policies.clone())
    }

    /// A registry server whose endpoints expire `expiry` after their last registration,
    /// secured: names owned by the identity that registered them (and its servers mTLS
    /// through [`Security::serve`]).
    pub fn registry_server(&self, expiry: Duration) -> RegistryServer {
        registry_server_with(expiry, self.policies().map(|p| (*p).clone()))
    }

    /// [`Security::registry_server`] keeping its entries in `store` (etcd: the owners
    /// of names too, so they hold across replicas).
    pub fn registry_server_on(&self, store: Store, expiry: Duration) -> RegistryServer {
        registry_server_on(store, expiry, self.policies().map(|p| (*p).clone()))
    }

    /// A new channel pool: mTLS when secure, else plaintext.
    pub fn channels(&self) -> Channels {
        match self.tls() {
            Some(tls) => Channels::new().tls(tls.clone()),
            None => Channels::new(),
        }
    }

    /// `services` served over mTLS when secure, as they are otherwise.
    pub fn serve(&self, services: Services) -> Services {
        match self.tls() {
            Some(tls) => services.tls(tls.clone()),
            None => services,
        }
    }

    /// The generator of this component's path tokens, each living `lifetime`: signed
    /// when secure, else unsigned.
    pub fn tokens(&self, lifetime: Duration) -> Arc<dyn TokenGenerator> {
        match &self.secure {
            Some(secure) => Arc::new(jwt_token(secure.identity.clone(), lifetime)),
            None => Arc::new(lifetime_token(lifetime)),
        }
    }
}

/// What `.security(..)`, `.channels(..)`, `.tokens(..)` and `.policies(..)` set in the
/// options of every chain (client, endpoint, manager, forwarder), written once.
#[derive(Clone)]
pub(crate) struct Secured {
    /// The channel pool (mTLS when secure).
    pub(crate) channels: Channels,
    /// How path tokens are made.
    pub(crate) tokens: Arc<dyn TokenGenerator>,
    /// The authorize policies (`None`: no authorize handlers).
    pub(crate) policies: Option<Arc<PolicySet>>,
    /// What the chain's servers are secured with.
    pub(crate) security: Security,
}

impl Default for Secured {
    /// Insecure: a plaintext pool, unsigned tokens of the default lifetime, no policies.
    fn default() -> Self {
        Secured {
            channels: Channels::new(),
            tokens: Arc::new(lifetime_token(DEFAULT_TOKEN_LIFETIME)),
            policies: None,
            security: Security::insecure(),
        }
    }
}

impl Secured {
    /// Everything from `security`: a new pool, signed tokens, its policies.
    pub(crate) fn set(&mut self, security: &Security) {
        self.channels = security.channels();
        self.tokens = security.tokens(DEFAULT_TOKEN_LIFETIME);
        self.policies = security.policies();
        self.security = security.clone();
    }
}
