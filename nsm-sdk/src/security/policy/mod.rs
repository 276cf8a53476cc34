//! Rego policies, compiled once, evaluated per call (regorus, Rego in Rust).
//!
//! A [`PolicySet`] holds named policies; a policy named `x` is the boolean rule
//! `data.nsm.x`, true when the input is allowed. The default set is Go NSM's, shipped in
//! the crate (`nsm-sdk/policies/*.rego`); [`PolicySet::from_dir`] replaces it with the
//! `*.rego` files of a directory (each file's stem is a policy name) and
//! [`PolicySet::from_env`] picks the directory from `NSM_POLICIES_DIR`. Every policy is
//! compiled once, at construction, into a [`regorus::CompiledPolicy`]; an evaluation
//! shares nothing mutable, so one set serves every connection concurrently.
//!
//! [`PolicySet::check`] evaluates a list of policies ([`SERVER`], [`CLIENT`],
//! [`MONITOR`], [`REGISTRY`]) in order and returns the first refusal as
//! [`SecurityError::Denied`] naming the policy (PermissionDenied at the edge). A policy
//! name the set does not hold or an evaluation error refuses too (fail closed).
//! [`PolicySet::check_path`] and [`PolicySet::check_monitor`] take the path itself: a
//! policy whose text is the shipped one is then decided in Rust on [`PathFacts`] (the
//! same decision, proven against Rego by the tests of [`native`]), without building a
//! Rego input per call. (Compiling a list as one Rego query was measured slower than
//! its policies one by one, 92 against 85 us for the four server policies: a rule of
//! another package makes regorus evaluate the whole `nsm` package.)
//!
//! # Input
//! [`path_input`] turns a Path into the input of the path policies:
//! `index`, `path_segments[]` (`name`, `id`, `token`, `expires` in unix seconds),
//! `auth_info.certificate` (the peer's leaf as PEM) and `now` (unix seconds). Regorus has
//! no `io.jwt` builtins, so signatures are checked in Rust and their results passed in:
//! each segment also has `claims` (`sub`, `aud[]`, `exp`, decoded without verification;
//! null when the token does not decode) and `signed_by_peer`, which is true only for the
//! segment the side checks (the previous one on a server, the next one on a client)
//! when its token verifies against the peer certificate (signature and expiry).
//! [`monitor_input`] and [`registry_input`] make the inputs of `service_connection` and
//! `client_allowed`.
//!
//! State: the compiled policies, immutable. Failures handled: a policy that does not
//! parse or does not define its rule (construction error), an input that is refused
//! (the failing policy's name), hostile input (the index and the tokens come from the
//! wire: no arithmetic on them can panic).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use nsm_proto::connection::Path as ProtoPath;
use regorus::{CompiledPolicy, PolicyModule, Value};
use serde_json::{json, Value as Json};

mod native;

use native::Native;
pub use native::PathFacts;

use super::error::{cut, SecurityError};
use super::identity::{system_to_unix, SpiffeId};
use super::tls::PeerIdentity;

/// Environment variable naming a directory of `*.rego` files that replaces the defaults.
pub const ENV_POLICIES_DIR: &str = "NSM_POLICIES_DIR";

/// The policies a server checks on every Request and Close it receives. Expiry comes
/// before the signature check so that an expired caller token is reported as such.
pub const SERVER: &[&str] = &[
    "tokens_valid",
    "tokens_expired",
    "prev_token_signed",
    "tokens_chained",
];
/// The policies a client checks on the path a server returns.
pub const CLIENT: &[&str] = &[
    "tokens_valid",
    "tokens_expired",
    "next_token_signed",
    "tokens_chained",
];
/// The policy MonitorConnection checks per connection and subscriber.
pub const MONITOR: &[&str] = &["service_connection"];
/// The policy the registry checks on Register and Unregister.
pub const REGISTRY: &[&str] = &["client_allowed"];

/// The default policies, shipped in the crate.
const DEFAULTS: &[(&str, &str)] = &[
    (
        "tokens_valid",
        include_str!("../../../policies/tokens_valid.rego"),
    ),
    (
        "tokens_expired",
        include_str!("../../../policies/tokens_expired.rego"),
    ),
    (
        "tokens_chained",
        include_str!("../../../policies/tokens_chained.rego"),
    ),
    (
        "prev_token_signed",
        include_str!("../../../policies/prev_token_signed.rego"),
    ),
    (
        "next_token_signed",
        include_str!("../../../policies/next_token_signed.rego"),
    ),
    (
        "service_connection",
        include_str!("../../../policies/service_connection.rego"),
    ),
    (
        "client_allowed",
        include_str!("../../../policies/client_allowed.rego"),
    ),
];

/// Named Rego policies, compiled once.
#[derive(Clone)]
pub struct PolicySet {
    policies: BTreeMap<String, CompiledPolicy>,
    /// The policies whose text is the shipped one, evaluated in Rust ([`native`]).
    native: BTreeMap<String, Native>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("policies", &self.policies.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PolicySet {
    /// The default policies (Go NSM's), compiled.
    pub fn defaults() -> Result<PolicySet, SecurityError> {
        PolicySet::from_sources(
            DEFAULTS
                .iter()
                .map(|(name, text)| (name.to_string(), text.to_string())),
        )
    }

    /// Every `*.rego` file of `dir`; a file `x.rego` is the policy `x` (rule
    /// `data.nsm.x`). All files are compiled together, so one may use another's rules.
    pub fn from_dir(dir: &Path) -> Result<PolicySet, SecurityError> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| SecurityError::Policy(format!("cannot read {}: {e}", dir.display())))?;
        let mut sources = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| SecurityError::Policy(format!("{}: {e}", dir.display())))?
                .path();
            if path.extension().and_then(|e| e.to_str()) != Some("rego") {
                continue;
            }
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| SecurityError::Policy(format!("bad file name {}", path.display())))?
                .to_string();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| SecurityError::Policy(format!("{}: {e}", path.display())))?;
            sources.push((name, text));
        }
        if sources.is_empty() {
            return Err(SecurityError::Policy(format!(
                "no .rego file in {}",
                dir.display()
            )));
        }
        PolicySet::from_sources(sources)
    }

    /// The directory in `NSM_POLICIES_DIR`, or the defaults when it is unset or empty.
    pub fn from_env() -> Result<PolicySet, SecurityError> {
        match std::env::var(ENV_POLICIES_DIR) {
            Ok(dir) if !dir.is_empty() => PolicySet::from_dir(Path::new(&dir)),
            _ => PolicySet::defaults(),
        }
    }

    /// Policies from `(name, Rego text)` pairs, compiled together.
    pub fn from_sources(
        sources: impl IntoIterator<Item = (String, String)>,
    ) -> Result<PolicySet, SecurityError> {
        let sources: Vec<(String, String)> = sources.into_iter().collect();
        let modules: Vec<PolicyModule> = sources
            .iter()
            .map(|(name, text)| PolicyModule {
                id: format!("{name}.rego").into(),
                content: text.as_str().into(),
            })
            .collect();
        let mut policies = BTreeMap::new();
        let native = sources
            .iter()
            .filter_map(|(name, text)| Some((name.clone(), Native::of(name, text)?)))
            .collect();
        for (name, _) in &sources {
            let rule = format!("data.nsm.{name}");
            let compiled = regorus::compile_policy_with_entrypoint(
                Value::new_object(),
                &modules,
                rule.as_str().into(),
            )
            .map_err(|e| SecurityError::Policy(format!("{name}: {e}")))?;
            policies.insert(name.clone(), compiled);
        }
        Ok(PolicySet { policies, native })
    }

    /// The names of the policies held.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.policies.keys().map(String::as_str)
    }

    /// Evaluates `names` in order against `input`; the first that does not hold refuses.
    pub fn check(&self, names: &[&str], input: &Json) -> Result<(), SecurityError> {
        let input = Value::from(input.clone());
        for name in names {
            if !self.holds(name, &input)? {
                return Err(SecurityError::Denied {
                    policy: name.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Evaluates the path policies `names` ([`SERVER`], [`CLIENT`]) on `path` as a side
    /// whose TLS peer is `peer` sees it at `now`: the first that does not hold refuses.
    /// The same decision as [`PolicySet::check`] on [`path_input`]; when every policy
    /// named is a shipped one it is taken in Rust ([`native`]) without a Rego input.
    pub fn check_path(
        &self,
        names: &[&str],
        path: &ProtoPath,
        peer: Option<&PeerIdentity>,
        verify: Verify,
        now: SystemTime,
    ) -> Result<(), SecurityError> {
        if let Some(natives) = self.natives(names) {
            return decide(&natives, &PathFacts::new(path, peer, verify, now), None);
        }
        self.check(names, &path_input(path, peer, verify, now))
    }

    /// Evaluates [`MONITOR`]: may `subscriber` see the connection of `path`? In Rust
    /// when the policy is the shipped one, else in Rego on [`monitor_input`].
    pub fn check_monitor(
        &self,
        path: &ProtoPath,
        subscriber: &SpiffeId,
    ) -> Result<(), SecurityError> {
        if let Some(natives) = self.natives(MONITOR) {
            let facts = PathFacts::new(path, None, Verify::Previous, UNIX_EPOCH);
            return decide(&natives, &facts, Some(subscriber));
        }
        self.check(MONITOR, &monitor_input(path, subscriber))
    }

    /// The native forms of `names`, if every one has one.
    fn natives<'a>(&self, names: &[&'a str]) -> Option<Vec<(&'a str, Native)>> {
        names
            .iter()
            .map(|name| Some((*name, *self.native.get(*name)?)))
            .collect()
    }

    /// This set with every policy evaluated in Rego (to compare both ways in tests).
    #[cfg(test)]
    pub(crate) fn rego_only(&self) -> PolicySet {
        PolicySet {
            native: BTreeMap::new(),
            ..self.clone()
        }
    }

    /// Whether one policy holds for `input`.
    pub fn evaluate(&self, name: &str, input: &Json) -> Result<bool, SecurityError> {
        self.holds(name, &Value::from(input.clone()))
    }

    fn holds(&self, name: &str, input: &Value) -> Result<bool, SecurityError> {
        let policy = self
            .policies
            .get(name)
            .ok_or_else(|| SecurityError::Policy(format!("no policy named {}", cut(name, 64))))?;
        let result = policy
            .eval_with_input(input.clone())
            .map_err(|e| SecurityError::Policy(format!("{name}: {e}")))?;
        Ok(result == Value::Bool(true))
    }
}

/// The native policies in order: the first that does not hold refuses, named.
fn decide(
    natives: &[(&str, Native)],
    facts: &PathFacts,
    subscriber: Option<&SpiffeId>,
) -> Result<(), SecurityError> {
    natives
        .iter()
        .try_for_each(|(name, native)| match native.holds(facts, subscriber) {
            Some(true) => Ok(()),
            _ => Err(SecurityError::Denied {
                policy: name.to_string(),
            }),
        })
}

/// Which neighbour's token a side verifies against its peer's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// A server: the caller's segment, `index - 1`.
    Previous,
    /// A client, on the returned path: the server's segment, `index + 1`.
    Next,
}

/// The input of the path policies ([`SERVER`], [`CLIENT`]) for `path`, as seen by a
/// side whose TLS peer is `peer`, at time `now`.
pub fn path_input(
    path: &ProtoPath,
    peer: Option<&PeerIdentity>,
    verify: Verify,
    now: SystemTime,
) -> Json {
    let facts = PathFacts::new(path, peer, verify, now);
    let segments: Vec<Json> = path
        .path_segments
        .iter()
        .zip(facts.segments())
        .map(|(s, (claims, signed_by_peer))| {
            let claims = claims.map_or(
                Json::Null,
                |c| json!({"sub": c.sub, "aud": c.aud, "exp": c.exp}),
            );
            json!({
                "name": s.name,
                "id": s.id,
                "token": s.token,
                "expires": s.expires.as_ref().map_or(0, |t| t.seconds),
                "claims": claims,
                "signed_by_peer": signed_by_peer,
            })
        })
        .collect();
    json!({
        "index": path.index,
        "path_segments": segments,
        "auth_info": {
            "certificate": peer.map(PeerIdentity::certificate_pem),
        },
        "now": system_to_unix(now),
    })
}

/// The input of `service_connection`: may `subscriber` see the connection of `path`?
pub fn monitor_input(path: &ProtoPath, subscriber: &SpiffeId) -> Json {
    let mut input = path_input(path, None, Verify::Previous, UNIX_EPOCH);
    input["subscriber"] = json!(subscriber.as_str());
    input
}

/// The input of `client_allowed`: may `caller` change the registration `name`, which
/// `owner` holds (None: the name is free)? `unchanged`: the call registers exactly what
/// is registered (a network service's same payload and matches).
pub fn registry_input(
    caller: &SpiffeId,
    name: &str,
    owner: Option<&SpiffeId>,
    unchanged: bool,
) -> Json {
    json!({
        "spiffe_id": caller.as_str(),
        "resource_name": name,
        "resource_owner": owner.map(SpiffeId::as_str),
        "unchanged": unchanged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::dev_ca::DevCa;
    use crate::security::identity::Svid;
    use crate::security::jwt;
    use nsm_proto::connection::PathSegment;
    use std::time::Duration;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A mesh of identities from one CA: nsc -> nsmgr -> nse.
    struct Mesh {
        ca: DevCa,
        nsc: Svid,
        nsmgr: Svid,
        nse: Svid,
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    use rustls_pki_types::pem::PemObject;

    fn svid(ca: &DevCa, name: &str) -> Svid {
        let issued = ca
            .issue(&id(&format!("spiffe://example.org/{name}")), HOUR)
            .unwrap();
        Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
    }

    fn mesh() -> Mesh {
        let ca = DevCa::new("example.org").unwrap();
        Mesh {
            nsc: svid(&ca, "nsc"),
            nsmgr: svid(&ca, "nsmgr"),
            nse: svid(&ca, "nse"),
            ca,
        }
    }

    /// A fresh mesh, and the default policies compiled once for all tests.
    fn setup() -> (Mesh, &'static PolicySet) {
        static SET: std::sync::OnceLock<PolicySet> = std::sync::OnceLock::new();
        (mesh(), SET.get_or_init(|| PolicySet::defaults().unwrap()))
    }

    fn peer(svid: &Svid) -> PeerIdentity {
        PeerIdentity::from_leaf(svid.leaf().clone()).unwrap()
    }

    fn segment(name: &str, token: String) -> PathSegment {
        PathSegment {
            name: name.into(),
            id: format!("{name}-conn"),
            token,
            ..Default::default()
        }
    }

    fn token(from: &Svid, to: &Svid) -> String {
        jwt::sign(from, to.id(), None, HOUR).unwrap().token
    }

    /// The path as nsmgr sees it on Request: nsc's segment, then its own.
    fn path_at_nsmgr(m: &Mesh) -> ProtoPath {
        ProtoPath {
            index: 1,
            path_segments: vec![
                segment("nsc", token(&m.nsc, &m.nsmgr)),
                segment("nsmgr", token(&m.nsmgr, &m.nse)),
            ],
        }
    }

    fn server_check(set: &PolicySet, path: &ProtoPath, from: &Svid) -> Result<(), SecurityError> {
        let input = path_input(path, Some(&peer(from)), Verify::Previous, SystemTime::now());
        set.check(SERVER, &input)
    }

    fn refused_by(r: Result<(), SecurityError>) -> String {
        match r {
            Err(SecurityError::Denied { policy }) => policy,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_defaults_compile_and_hold_every_named_policy() {
        let set = PolicySet::defaults().unwrap();
        for name in SERVER.iter().chain(CLIENT).chain(MONITOR).chain(REGISTRY) {
            assert!(set.names().any(|n| n == *name), "{name} missing");
        }
    }

    #[test]
    fn a_good_path_passes_the_server_and_client_policies() {
        let (m, set) = setup();
        server_check(set, &path_at_nsmgr(&m), &m.nsc).unwrap();
        // The nsc checks the path nsmgr returns: nsmgr's segment follows its own.
        let mut returned = path_at_nsmgr(&m);
        returned.index = 0;
        let input = path_input(
            &returned,
            Some(&peer(&m.nsmgr)),
            Verify::Next,
            SystemTime::now(),
        );
        set.check(CLIENT, &input).unwrap();
    }

    #[test]
    fn tokens_valid_refuses_a_token_that_does_not_decode() {
        let (m, set) = setup();
        let mut path = path_at_nsmgr(&m);
        path.path_segments[1].token = "nsm-rs".into();
        assert_eq!(refused_by(server_check(set, &path, &m.nsc)), "tokens_valid");
        let empty = ProtoPath::default();
        assert_eq!(
            refused_by(server_check(set, &empty, &m.nsc)),
            "tokens_valid"
        );
    }

    #[test]
    fn prev_token_signed_refuses_a_forged_token() {
        let (m, set) = setup();
        let forger =
            m.ca.issue(&id("spiffe://example.org/forger"), HOUR)
                .unwrap();
        // The forger signs "as the nsc": same claims, other key (another JWT library).
        let mut path = path_at_nsmgr(&m);
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &jwt::decode_unverified(&path.path_segments[0].token).unwrap(),
            &jsonwebtoken::EncodingKey::from_ec_der(
                rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(forger.key_pem.as_bytes())
                    .unwrap()
                    .secret_pkcs8_der(),
            ),
        )
        .unwrap();
        path.path_segments[0].token = forged;
        assert_eq!(
            refused_by(server_check(set, &path, &m.nsc)),
            "prev_token_signed"
        );
        // A first hop with no caller segment has nothing signed by the peer.
        let mut alone = path_at_nsmgr(&m);
        alone.index = 0;
        alone.path_segments.remove(0);
        assert_eq!(
            refused_by(server_check(set, &alone, &m.nsc)),
            "prev_token_signed"
        );
    }

    #[test]
    fn prev_token_signed_refuses_a_token_replayed_by_another_peer() {
        let (m, set) = setup();
        // The forwarder-like peer replays the nsc's genuine token on its own connection.
        let thief = svid(&m.ca, "thief");
        assert_eq!(
            refused_by(server_check(set, &path_at_nsmgr(&m), &thief)),
            "prev_token_signed"
        );
    }

    #[test]
    fn tokens_expired_refuses_an_expired_token() {
        let (m, set) = setup();
        let expired = |from: &Svid, to: &Svid| {
            let two_minutes_ago = SystemTime::now() - Duration::from_secs(120);
            let minute = Duration::from_secs(60);
            jwt::sign_at(from, to.id(), None, minute, two_minutes_ago)
                .unwrap()
                .token
        };
        // This hop's own segment, and the caller's (correctly signed, but expired).
        for (i, token) in [
            (1, expired(&m.nsmgr, &m.nse)),
            (0, expired(&m.nsc, &m.nsmgr)),
        ] {
            let mut path = path_at_nsmgr(&m);
            path.path_segments[i].token = token;
            assert_eq!(
                refused_by(server_check(set, &path, &m.nsc)),
                "tokens_expired"
            );
        }
    }

    #[test]
    fn tokens_chained_refuses_an_audience_mismatch() {
        let (m, set) = setup();
        // The nsc's token was made for the nse, not for nsmgr which holds the next segment.
        let mut path = path_at_nsmgr(&m);
        path.path_segments[0].token = token(&m.nsc, &m.nse);
        assert_eq!(
            refused_by(server_check(set, &path, &m.nsc)),
            "tokens_chained"
        );
    }

    #[test]
    fn tokens_chained_refuses_a_token_replayed_from_another_path() {
        let (m, set) = setup();
        // The nsc's genuine token from a path to another manager, replayed here.
        let other_mgr = svid(&m.ca, "nsmgr-2");
        let mut path = path_at_nsmgr(&m);
        path.path_segments[0].token = token(&m.nsc, &other_mgr);
        assert_eq!(
            refused_by(server_check(set, &path, &m.nsc)),
            "tokens_chained"
        );
    }

    #[test]
    fn next_token_signed_refuses_a_returned_path_the_server_did_not_sign() {
        let (m, set) = setup();
        let mut returned = path_at_nsmgr(&m);
        returned.index = 0;
        let input = path_input(
            &returned,
            Some(&peer(&m.nse)),
            Verify::Next,
            SystemTime::now(),
        );
        assert_eq!(refused_by(set.check(CLIENT, &input)), "next_token_signed");
        // No next segment at all.
        returned.path_segments.truncate(1);
        let input = path_input(
            &returned,
            Some(&peer(&m.nsmgr)),
            Verify::Next,
            SystemTime::now(),
        );
        assert_eq!(refused_by(set.check(CLIENT, &input)), "next_token_signed");
    }

    #[test]
    fn service_connection_shows_a_subscriber_only_paths_it_signed() {
        let (m, set) = setup();
        let path = path_at_nsmgr(&m);
        set.check(MONITOR, &monitor_input(&path, m.nsc.id()))
            .unwrap();
        let other = id("spiffe://example.org/other-nsc");
        assert_eq!(
            refused_by(set.check(MONITOR, &monitor_input(&path, &other))),
            "service_connection"
        );
    }

    #[test]
    fn client_allowed_lets_only_the_owner_change_a_name() {
        let set = PolicySet::defaults().unwrap();
        let owner = id("spiffe://example.org/nse");
        let attacker = id("spiffe://example.org/attacker");
        let input = |caller, owner, unchanged| registry_input(caller, "nse-1", owner, unchanged);
        set.check(REGISTRY, &input(&owner, None, false)).unwrap();
        set.check(REGISTRY, &input(&owner, Some(&owner), false))
            .unwrap();
        assert_eq!(
            refused_by(set.check(REGISTRY, &input(&attacker, Some(&owner), false))),
            "client_allowed"
        );
        // Registering what is there already (a shared service's definition) is allowed.
        set.check(REGISTRY, &input(&attacker, Some(&owner), true))
            .unwrap();
    }

    #[test]
    fn hostile_indexes_do_not_panic() {
        let (m, set) = setup();
        let mut path = path_at_nsmgr(&m);
        path.index = u32::MAX;
        assert!(server_check(set, &path, &m.nsc).is_err());
        let input = path_input(
            &path,
            Some(&peer(&m.nsmgr)),
            Verify::Next,
            SystemTime::now(),
        );
        assert!(set.check(CLIENT, &input).is_err());
    }

    #[test]
    fn unknown_policies_and_bad_rego_fail_closed() {
        let set = PolicySet::defaults().unwrap();
        assert!(matches!(
            set.check(&["no_such_policy"], &json!({})),
            Err(SecurityError::Policy(_))
        ));
        let bad = PolicySet::from_sources([(
            "broken".to_string(),
            "package nsm\nbroken if {".to_string(),
        )]);
        assert!(bad.is_err());
    }

    #[test]
    fn a_directory_replaces_the_defaults() {
        let dir = crate::security::dev_ca::tempdir();
        std::fs::write(
            dir.join("always_no.rego"),
            "package nsm\nimport rego.v1\ndefault always_no := false\n",
        )
        .unwrap();
        std::fs::write(dir.join("README"), "not a policy").unwrap();
        let set = PolicySet::from_dir(&dir).unwrap();
        assert_eq!(set.names().collect::<Vec<_>>(), ["always_no"]);
        assert_eq!(
            refused_by(set.check(&["always_no"], &json!({}))),
            "always_no"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_replaced_policy_runs_in_rego_and_is_named_when_it_refuses() {
        // The defaults with tokens_chained replaced: never holds, or undefined.
        for replaced in [
            "package nsm\nimport rego.v1\ndefault tokens_chained := false\n",
            "package nsm\nimport rego.v1\ntokens_chained if { input.nothing == 1 }\n",
        ] {
            let sources = DEFAULTS.iter().map(|(name, text)| {
                let text = if *name == "tokens_chained" {
                    replaced
                } else {
                    text
                };
                (name.to_string(), text.to_string())
            });
            let set = PolicySet::from_sources(sources).unwrap();
            assert!(
                !set.native.contains_key("tokens_chained"),
                "not the shipped text"
            );
            let (m, defaults) = setup();
            server_check(defaults, &path_at_nsmgr(&m), &m.nsc).unwrap();
            assert_eq!(
                refused_by(server_check(&set, &path_at_nsmgr(&m), &m.nsc)),
                "tokens_chained"
            );
            // The same through check_path, which falls back to Rego for the whole list.
            let peer = peer(&m.nsc);
            let checked = set.check_path(
                SERVER,
                &path_at_nsmgr(&m),
                Some(&peer),
                Verify::Previous,
                SystemTime::now(),
            );
            assert_eq!(refused_by(checked), "tokens_chained");
        }
        // A set without some of the list's policies refuses the list (fail closed).
        let partial = PolicySet::from_sources(
            DEFAULTS
                .iter()
                .filter(|(name, _)| *name != "prev_token_signed")
                .map(|(name, text)| (name.to_string(), text.to_string())),
        )
        .unwrap();
        let (m, _) = setup();
        assert!(matches!(
            server_check(&partial, &path_at_nsmgr(&m), &m.nsc),
            Err(SecurityError::Policy(_))
        ));
    }

    #[test]
    fn a_policy_set_is_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<PolicySet>();
    }
}
