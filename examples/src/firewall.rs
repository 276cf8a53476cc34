//! The firewall of the service-function-chaining showcase: a passthrough endpoint that
//! bridges each connection's two interfaces (nsm-sdk-kernel's
//! [`bridge_xconnect`]) and filters what crosses its bridges with nftables, from an
//! access list ([`Acl`]).
//!
//! An access list is a list of rules, separated by `;`, `,` or new lines (`#` starts
//! a comment), tried in order; the first that matches decides, else the default:
//!
//! ```text
//! allow icmp
//! allow tcp 5201        # a port, or a range: tcp 8000-8080
//! deny udp
//! default deny          # when no rule matches (without it: allow)
//! ```
//!
//! Protocols: `icmp` (ICMP and ICMPv6), `tcp`, `udp`, `any`. The rules become one
//! nftables table of the `bridge` family in the firewall's namespace
//! ([`Acl::nft_ruleset`]), hooked where frames cross a bridge: every connection's
//! bridge is filtered by it. The bridge family has no connection tracking here
//! (`nf_conntrack_bridge`), so the filter is stateless: a port rule matches the port
//! as destination or as source, which lets the answers of an allowed service through.
//! ARP and IPv6 neighbour discovery always pass: without them nothing would.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::str::FromStr;

use nsm_sdk::chains::{endpoint, ClientOptions, Endpoint, EndpointOptions};
use nsm_sdk::handlers::{connect, mechanisms, passthrough};
use nsm_sdk::wire::types;
use nsm_sdk_kernel::mechanism::{bridge_xconnect, bridged_client, kernel_endpoint};
use nsm_sdk_kernel::{Error as KernelError, IfName, NetNs, Netlink, RtNetlink};

use crate::endpoint::log_calls;

/// The nftables table (family `bridge`) the firewall owns in its namespace.
pub const NFT_TABLE: &str = "nsm-firewall";

/// What a rule does with what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through (`accept`).
    Allow,
    /// Drop it.
    Deny,
}

/// The protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Every packet.
    Any,
    /// ICMP and ICMPv6.
    Icmp,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One rule: a verdict for a protocol and, for TCP and UDP, a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclRule {
    /// What it does.
    pub verdict: Verdict,
    /// What it matches.
    pub proto: Proto,
    /// The ports (first, last), if it names any.
    pub ports: Option<(u16, u16)>,
}

/// An access list: rules in order, and the verdict when none matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    /// The rules, first match wins.
    pub rules: Vec<AclRule>,
    /// The verdict for what no rule matches.
    pub default: Verdict,
}

impl Default for Acl {
    /// No rule, everything allowed.
    fn default() -> Self {
        Acl {
            rules: Vec::new(),
            default: Verdict::Allow,
        }
    }
}

fn parse_verdict(word: &str) -> Option<Verdict> {
    match word {
        "allow" | "accept" | "permit" => Some(Verdict::Allow),
        "deny" | "drop" => Some(Verdict::Deny),
        _ => None,
    }
}

fn port(s: &str, rule: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("rule {rule:?}: bad port {s:?} (1-65535)"))
}

impl FromStr for Acl {
    type Err = String;

    /// Parses an access list; an error names the rule and what is wrong with it.
    fn from_str(s: &str) -> Result<Acl, String> {
        let mut acl = Acl::default();
        let lines = s.lines().map(|l| l.split('#').next().unwrap_or(""));
        for rule in lines.flat_map(|l| l.split([';', ','])).map(str::trim) {
            let words: Vec<String> = rule.split_whitespace().map(str::to_lowercase).collect();
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            let (verdict, proto, ports) = match words[..] {
                [] => continue,
                ["default", v] => {
                    acl.default =
                        parse_verdict(v).ok_or(format!("rule {rule:?}: allow or deny?"))?;
                    continue;
                }
                [v, p] => (v, p, None),
                [v, p, ports] => (v, p, Some(ports)),
                _ => {
                    return Err(format!(
                        "rule {rule:?}: expected <allow|deny> <proto> [port]"
                    ))
                }
            };
            let verdict = parse_verdict(verdict).ok_or(format!("rule {rule:?}: allow or deny?"))?;
            let proto = match proto {
                "any" => Proto::Any,
                "icmp" => Proto::Icmp,
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                p => {
                    return Err(format!(
                        "rule {rule:?}: unknown protocol {p:?} (icmp, tcp, udp, any)"
                    ))
                }
            };
            let ports = match ports {
                None => None,
                Some(_) if !matches!(proto, Proto::Tcp | Proto::Udp) => {
                    return Err(format!("rule {rule:?}: only tcp and udp have ports"))
                }
                Some(p) => {
                    let (a, b) = p.split_once('-').unwrap_or((p, p));
                    let (a, b) = (port(a, rule)?, port(b, rule)?);
                    if a > b {
                        return Err(format!("rule {rule:?}: empty port range {p}"));
                    }
                    Some((a, b))
                }
            };
            acl.rules.push(AclRule {
                verdict,
                proto,
                ports,
            });
        }
        Ok(acl)
    }
}

impl Acl {
    /// The nftables script that replaces the firewall's table with this list (one
    /// atomic `nft -f` transaction).
    pub fn nft_ruleset(&self) -> String {
        let word = |v: Verdict| match v {
            Verdict::Allow => "accept",
            Verdict::Deny => "drop",
        };
        let mut rules = String::from(
            "    ether type arp accept\n    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n",
        );
        for r in &self.rules {
            let v = word(r.verdict);
            let p = match r.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
                Proto::Icmp => {
                    let _ = writeln!(rules, "    meta l4proto {{ icmp, ipv6-icmp }} {v}");
                    continue;
                }
                Proto::Any => {
                    let _ = writeln!(rules, "    {v}");
                    continue;
                }
            };
            match r.ports {
                None => {
                    let _ = writeln!(rules, "    meta l4proto {p} {v}");
                }
                Some((a, b)) => {
                    let ports = if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    };
                    let _ = writeln!(
                        rules,
                        "    {p} dport {ports} {v}\n    {p} sport {ports} {v}"
                    );
                }
            }
        }
        format!(
            "table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n\
             table bridge {NFT_TABLE} {{\n  chain forward {{\n    \
             type filter hook forward priority 0; policy {};\n{rules}  }}\n}}\n",
            word(self.default)
        )
    }
}

/// Runs `nft -f -` with `script` inside `ns`.
pub async fn nft(ns: &NetNs, script: String) -> Result<(), String> {
    let ran = ns.run(move || -> std::io::Result<std::process::Output> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        child.wait_with_output()
    });
    match ran.await.map_err(|e| e.to_string())? {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run nft: {e}")),
    }
}

/// Installs `acl` in the namespace `ns`, replacing the firewall's table if it is there.
pub async fn apply_acl(ns: &NetNs, acl: &Acl) -> Result<(), String> {
    prime_bridge_hooks(ns).await?;
    nft(ns, acl.nft_ruleset()).await
}

/// Makes and deletes a bridge in `ns`. The kernel (seen on 6.18) runs the `bridge`
/// family's hooks of a namespace only if a bridge existed there when they were
/// registered: a table made in a fresh namespace would see no frame, ever.
async fn prime_bridge_hooks(ns: &NetNs) -> Result<(), String> {
    let nl = RtNetlink::open(ns).await.map_err(|e| e.to_string())?;
    let name = IfName::new("nsmfw-prime").map_err(|e| e.to_string())?;
    match nl.create_bridge(&name).await {
        Ok(()) | Err(KernelError::LinkExists { .. }) => {}
        Err(e) => return Err(e.to_string()),
    }
    nl.delete_link(&name).await.map_err(|e| e.to_string())
}

/// Removes the firewall's table from `ns`.
pub async fn remove_acl(ns: &NetNs) -> Result<(), String> {
    nft(
        ns,
        format!("table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n"),
    )
    .await
}

/// The firewall endpoint `name` in the namespace `netns_url`: both interfaces of each
/// connection [`BRIDGED`](nsm_sdk_kernel::mechanism::BRIDGED) and joined in a bridge of
/// the connection, the connection passed on to the same network service with `labels`
/// (so the service's matches send it to the next hop), through a client made from
/// `client_opts`.
pub fn firewall(
    name: &str,
    netns_url: &str,
    labels: HashMap<String, String>,
    opts: EndpointOptions,
    client_opts: ClientOptions,
) -> Endpoint {
    endpoint(
        name,
        opts.handler(log_calls())
            .handler(mechanisms().with(types::KERNEL, kernel_endpoint(netns_url).bridged()))
            .handler(bridge_xconnect(netns_url))
            .handler(passthrough().labels(labels))
            .handler(connect(bridged_client(client_opts, netns_url))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(verdict: Verdict, proto: Proto, ports: Option<(u16, u16)>) -> AclRule {
        AclRule {
            verdict,
            proto,
            ports,
        }
    }

    #[test]
    fn an_acl_reads_rules_in_order_and_a_default() {
        let acl: Acl =
            "allow icmp; ALLOW tcp 5201,deny udp 8000-8080\n# note\ndeny any # all\ndefault deny"
                .parse()
                .unwrap();
        assert_eq!(
            acl.rules,
            [
                rule(Verdict::Allow, Proto::Icmp, None),
                rule(Verdict::Allow, Proto::Tcp, Some((5201, 5201))),
                rule(Verdict::Deny, Proto::Udp, Some((8000, 8080))),
                rule(Verdict::Deny, Proto::Any, None),
            ]
        );
        assert_eq!(acl.default, Verdict::Deny);
        assert_eq!("".parse::<Acl>().unwrap(), Acl::default());
        assert_eq!(Acl::default().default, Verdict::Allow);
    }

    #[test]
    fn a_bad_rule_is_an_error_naming_it() {
        for (text, says) in [
            ("allow tcp 0", "bad port"),
            ("allow tcp 70000", "bad port"),
            ("allow tcp 90-80", "empty port range"),
            ("allow icmp 80", "only tcp and udp have ports"),
            ("allow sctp", "unknown protocol"),
            ("permit-ish tcp", "allow or deny"),
            ("default maybe", "allow or deny"),
            ("allow", "expected <allow|deny>"),
            ("allow tcp 1 2", "expected <allow|deny>"),
        ] {
            let e = text.parse::<Acl>().unwrap_err();
            assert!(e.contains(says) && e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn the_ruleset_replaces_the_table_keeps_arp_and_matches_ports_both_ways() {
        let acl: Acl = "allow icmp; allow tcp 5201; deny tcp 8000-8080; allow udp; default deny"
            .parse()
            .unwrap();
        assert_eq!(
            acl.nft_ruleset(),
            "table bridge nsm-firewall\n\
             delete table bridge nsm-firewall\n\
             table bridge nsm-firewall {\n\
            \x20 chain forward {\n\
            \x20   type filter hook forward priority 0; policy drop;\n\
            \x20   ether type arp accept\n\
            \x20   icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n\
            \x20   meta l4proto { icmp, ipv6-icmp } accept\n\
            \x20   tcp dport 5201 accept\n\
            \x20   tcp sport 5201 accept\n\
            \x20   tcp dport 8000-8080 drop\n\
            \x20   tcp sport 8000-8080 drop\n\
            \x20   meta l4proto udp accept\n\
            \x20 }\n\
             }\n"
        );
        let open = Acl::default().nft_ruleset();
        assert!(open.contains("policy accept;"), "{open}");
    }

    /// The kernel accepts what [`Acl::nft_ruleset`] writes (`nft -c`: checked, not
    /// applied), when there is `nft` and the right to use it.
    #[test]
    fn nft_accepts_the_ruleset() {
        let acl: Acl = "allow icmp; allow tcp 5201; deny tcp 8000-8080; deny any; default deny"
            .parse()
            .unwrap();
        let Ok(mut child) = Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("skipped: no nft");
            return;
        };
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(acl.nft_ruleset().as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Operation not permitted") {
            eprintln!("skipped: nft needs CAP_NET_ADMIN");
            return;
        }
        assert!(out.status.success(), "{err}");
    }
}
