//! Property tests of the firewall's access-list parser (`Acl::from_str`), in place of
//! fuzzing: any text parses or is refused without a panic, what parses is well formed,
//! and an access list written as text reads back equal. Cases: `PROPTEST_CASES` (256
//! when unset); failures are kept in `proptest-regressions/acl_properties.txt`.

use nsm_examples::{Acl, AclRule, Proto, Verdict};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/acl_properties.txt"
        )))),
        ..ProptestConfig::default()
    }
}

fn rule() -> impl Strategy<Value = AclRule> {
    let verdict = prop_oneof![Just(Verdict::Allow), Just(Verdict::Deny)];
    let ported = (
        verdict.clone(),
        prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)],
        proptest::option::of((1u16.., 1u16..).prop_map(|(a, b)| (a.min(b), a.max(b)))),
    );
    let bare = (verdict, prop_oneof![Just(Proto::Any), Just(Proto::Icmp)]);
    prop_oneof![
        ported.prop_map(|(verdict, proto, ports)| AclRule {
            verdict,
            proto,
            ports
        }),
        bare.prop_map(|(verdict, proto)| AclRule {
            verdict,
            proto,
            ports: None
        }),
    ]
}

/// The list as a person would write it, in one of the accepted spellings.
fn text(acl: &Acl, sep: &str, upper: bool) -> String {
    let verdict = |v: Verdict| match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    };
    let mut rules: Vec<String> = acl
        .rules
        .iter()
        .map(|r| {
            let proto = match r.proto {
                Proto::Any => "any",
                Proto::Icmp => "icmp",
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            match r.ports {
                None => format!("{} {proto}", verdict(r.verdict)),
                Some((a, b)) if a == b => format!("{} {proto} {a}", verdict(r.verdict)),
                Some((a, b)) => format!("{} {proto} {a}-{b}", verdict(r.verdict)),
            }
        })
        .collect();
    rules.push(format!("default {}", verdict(acl.default)));
    let s = rules.join(sep);
    if upper {
        s.to_uppercase()
    } else {
        s
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_parses_or_is_refused_and_what_parses_is_well_formed(s in "\\PC{0,60}") {
        if let Ok(acl) = s.parse::<Acl>() {
            for r in acl.rules {
                if let Some((a, b)) = r.ports {
                    prop_assert!(a >= 1 && a <= b);
                    prop_assert!(matches!(r.proto, Proto::Tcp | Proto::Udp));
                }
            }
        }
    }

    #[test]
    fn rule_shaped_text_parses_or_is_refused(
        words in prop::collection::vec(
            "allow|deny|drop|default|tcp|udp|icmp|any|[0-9]{1,6}(-[0-9]{0,6})?|#|;|,|\\PC{0,3}",
            0..12,
        ),
    ) {
        let _ = words.join(" ").parse::<Acl>();
    }

    #[test]
    fn an_access_list_written_as_text_reads_back_equal(
        rules in prop::collection::vec(rule(), 0..8),
        deny_by_default in any::<bool>(),
        sep in prop_oneof![Just("; "), Just(", "), Just("\n"), Just(" # note\n")],
        upper in any::<bool>(),
    ) {
        let acl = Acl {
            rules,
            default: if deny_by_default { Verdict::Deny } else { Verdict::Allow },
        };
        let written = text(&acl, sep, upper);
        prop_assert_eq!(written.parse::<Acl>(), Ok(acl), "{}", written);
    }
}
