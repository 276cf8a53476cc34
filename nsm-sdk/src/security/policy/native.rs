//! The shipped policies in Rust, for the checks every hop makes on every call.
//!
//! A [`PolicySet`](super::PolicySet) policy whose Rego text is byte for byte the shipped
//! file of its name is evaluated here, on [`PathFacts`], instead of in Rego: the same
//! decision without building a Rego input and interpreting it per call (measured through
//! the programs: that input and its evaluation were about 40 % of the CPU that security
//! added to a Request). Any other text, such as a directory's own policies, runs in Rego.
//! The tests below evaluate both on generated paths, policy by policy, and require the
//! same answer.
//!
//! State: none. Failures handled: hostile indexes and undecodable tokens (no panic;
//! they refuse as the Rego text does).

use std::time::SystemTime;

use nsm_proto::connection::Path as ProtoPath;

use super::{Verify, DEFAULTS};
use crate::security::identity::{system_to_unix, SpiffeId};
use crate::security::jwt::{self, Claims};
use crate::security::tls::PeerIdentity;

/// A shipped policy, evaluated in Rust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Native {
    TokensValid,
    TokensExpired,
    TokensChained,
    PrevTokenSigned,
    NextTokenSigned,
    ServiceConnection,
    ClientAllowed,
}

impl Native {
    /// The native form of the policy `name` whose Rego text is `text`: only when the text
    /// is the shipped one.
    pub(super) fn of(name: &str, text: &str) -> Option<Native> {
        let shipped = DEFAULTS.iter().find(|(n, _)| *n == name)?.1;
        if shipped != text {
            return None;
        }
        Some(match name {
            "tokens_valid" => Native::TokensValid,
            "tokens_expired" => Native::TokensExpired,
            "tokens_chained" => Native::TokensChained,
            "prev_token_signed" => Native::PrevTokenSigned,
            "next_token_signed" => Native::NextTokenSigned,
            "service_connection" => Native::ServiceConnection,
            "client_allowed" => Native::ClientAllowed,
            _ => return None,
        })
    }

    /// Whether the policy holds for `facts` (`subscriber`: MonitorConnection's);
    /// `None` for a policy that does not look at paths (`client_allowed`).
    pub(super) fn holds(&self, facts: &PathFacts, subscriber: Option<&SpiffeId>) -> Option<bool> {
        let segs = &facts.segments;
        let claims = |i: usize| segs.get(i).and_then(|s| s.claims.as_ref());
        Some(match self {
            Native::TokensValid => !segs.is_empty() && segs.iter().all(|s| s.claims.is_some()),
            Native::TokensExpired => {
                !segs.is_empty()
                    && segs
                        .iter()
                        .all(|s| s.claims.as_ref().is_some_and(|c| c.exp > facts.now))
            }
            Native::TokensChained => {
                segs.len() == 1
                    || (segs.len() > 1
                        && (0..segs.len() - 1).all(|i| match (claims(i), claims(i + 1)) {
                            (Some(a), Some(b)) => a.aud.contains(&b.sub) || a.sub == b.sub,
                            _ => false,
                        }))
            }
            Native::PrevTokenSigned => facts.index > 0 && facts.signed(facts.index.checked_sub(1)),
            Native::NextTokenSigned => facts.signed(facts.index.checked_add(1)),
            Native::ServiceConnection => {
                let subscriber = subscriber?;
                segs.iter().any(|s| {
                    s.claims
                        .as_ref()
                        .is_some_and(|c| c.sub == subscriber.as_str())
                })
            }
            Native::ClientAllowed => return None,
        })
    }
}

/// What the path policies look at, worked out once per check: the index, each
/// segment's claims (decoded, not verified; `None` when the token does not decode) and
/// whether the checked neighbour's token verifies against the peer, and the time.
#[derive(Debug, Clone)]
pub struct PathFacts {
    index: u64,
    segments: Vec<SegmentFacts>,
    now: i64,
}

#[derive(Debug, Clone)]
struct SegmentFacts {
    claims: Option<Claims>,
    signed_by_peer: bool,
}

impl PathFacts {
    /// The facts of `path` as a side whose TLS peer is `peer` sees them at `now`; the
    /// segment checked against the peer is the previous one on a server, the next one
    /// on a client ([`path_input`](super::path_input) gives these facts to Rego).
    pub fn new(
        path: &ProtoPath,
        peer: Option<&PeerIdentity>,
        verify: Verify,
        now: SystemTime,
    ) -> PathFacts {
        let index = path.index as usize;
        let checked = match verify {
            Verify::Previous => index.checked_sub(1),
            Verify::Next => index.checked_add(1),
        };
        let segments = path
            .path_segments
            .iter()
            .enumerate()
            .map(|(i, s)| SegmentFacts {
                claims: jwt::decode_unverified(&s.token).ok(),
                // The caller authenticated as the TLS client, the server as the server.
                signed_by_peer: Some(i) == checked
                    && peer.is_some_and(|p| {
                        jwt::verify_by(&s.token, p, verify == Verify::Next).is_ok()
                    }),
            })
            .collect();
        PathFacts {
            index: u64::from(path.index),
            segments,
            now: system_to_unix(now),
        }
    }

    /// Each segment's claims (`None`: the token does not decode) and whether it is the
    /// checked neighbour's, signed by the peer.
    pub(super) fn segments(&self) -> impl Iterator<Item = (Option<&Claims>, bool)> {
        self.segments
            .iter()
            .map(|s| (s.claims.as_ref(), s.signed_by_peer))
    }

    fn signed(&self, i: Option<u64>) -> bool {
        i.and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.segments.get(i))
            .is_some_and(|s| s.signed_by_peer)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{monitor_input, path_input, PolicySet, CLIENT, MONITOR, SERVER};
    use super::*;
    use crate::security::dev_ca::DevCa;
    use crate::security::identity::Svid;
    use nsm_proto::connection::PathSegment;
    use std::time::Duration;

    /// A small deterministic generator (xorshift), so a failure can be replayed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    fn svid(ca: &DevCa, name: &str) -> Svid {
        let id = SpiffeId::parse(&format!("spiffe://example.org/{name}")).unwrap();
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
    }

    #[test]
    fn the_shipped_policies_decide_in_rust_as_they_do_in_rego() {
        let ca = DevCa::new("example.org").unwrap();
        let ids: Vec<Svid> = ["a", "b", "c"].iter().map(|n| svid(&ca, n)).collect();
        let natives = PolicySet::defaults().unwrap();
        // The same texts in Rego only: a set where no policy is native.
        let rego = PolicySet::rego_only(&natives);
        let now = SystemTime::now();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut decisions = [0usize; 2];
        for _ in 0..400 {
            let n = rng.below(5);
            let segments = (0..n)
                .map(|i| {
                    let from = &ids[rng.below(3)];
                    let to = ids[rng.below(3)].id();
                    let token = match rng.below(6) {
                        0 => "garbage".to_string(),
                        1 => String::new(),
                        2 => {
                            jwt::sign_at(
                                from,
                                to,
                                None,
                                Duration::from_secs(1),
                                now - Duration::from_secs(60),
                            )
                            .unwrap()
                            .token
                        }
                        3 => {
                            jwt::sign_to(from, None, None, Duration::from_secs(600), now, false)
                                .unwrap()
                                .token
                        }
                        _ => {
                            jwt::sign_to(from, Some(to), None, Duration::from_secs(600), now, false)
                                .unwrap()
                                .token
                        }
                    };
                    PathSegment {
                        name: format!("s{i}"),
                        id: format!("id{i}"),
                        token,
                        ..Default::default()
                    }
                })
                .collect();
            // Indexes past the end and at the far end of u32 too.
            let index = match rng.below(8) {
                0 => u32::MAX,
                _ => rng.below(n + 2) as u32,
            };
            let path = ProtoPath {
                index,
                path_segments: segments,
            };
            let peer = match rng.below(4) {
                0 => None,
                k => Some(PeerIdentity::from_leaf(ids[k - 1].leaf().clone()).unwrap()),
            };
            let subscriber = ids[rng.below(3)].id();
            for (verify, list) in [(Verify::Previous, SERVER), (Verify::Next, CLIENT)] {
                let facts = PathFacts::new(&path, peer.as_ref(), verify, now);
                let input = path_input(&path, peer.as_ref(), verify, now);
                for name in list {
                    let native =
                        Native::of(name, DEFAULTS.iter().find(|(n, _)| n == name).unwrap().1)
                            .unwrap()
                            .holds(&facts, None)
                            .unwrap();
                    let in_rego = rego.evaluate(name, &input).unwrap();
                    assert_eq!(native, in_rego, "{name} on {path:?} ({verify:?})");
                    decisions[usize::from(native)] += 1;
                }
                // And the set as a whole: the same first refusal.
                let a = natives.check_path(list, &path, peer.as_ref(), verify, now);
                let b = rego.check(list, &input);
                assert_eq!(format!("{a:?}"), format!("{b:?}"));
            }
            let facts = PathFacts::new(&path, None, Verify::Previous, now);
            let native = Native::ServiceConnection
                .holds(&facts, Some(subscriber))
                .unwrap();
            let in_rego = rego
                .evaluate(MONITOR[0], &monitor_input(&path, subscriber))
                .unwrap();
            assert_eq!(native, in_rego, "service_connection on {path:?}");
        }
        // Both answers were seen often enough for the comparison to mean something.
        assert!(decisions[0] > 200 && decisions[1] > 200, "{decisions:?}");
    }

    #[test]
    fn only_the_shipped_text_is_native() {
        assert_eq!(
            Native::of("tokens_valid", DEFAULTS[0].1),
            Some(Native::TokensValid)
        );
        assert_eq!(Native::of("tokens_valid", "package nsm\n"), None);
        assert_eq!(Native::of("mine", DEFAULTS[0].1), None);
    }
}
