//! Policy routes: a [`Rule`] (`from ... lookup <table>`, with its [`Family`] and
//! [`PortRange`]s) and the routes of the table it looks up ([`Policy`]).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::types::Route;

/// The IP version of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`ip -4 rule`).
    V4,
    /// IPv6 (`ip -6 rule`).
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A port range of a rule, `start..=end`, that the kernel accepts: it refuses port 0
/// and port 65535 in a rule (`Invalid dport range`), so `1 <= start <= end <= 65534`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// The largest port a rule can name.
    pub const MAX: u16 = 65534;

    /// `start..=end`, if the kernel would take it.
    pub fn new(start: u16, end: u16) -> Option<PortRange> {
        (start >= 1 && start <= end && end <= Self::MAX).then_some(PortRange { start, end })
    }

    /// Parses `"N"` or `"N-M"` (as NSM's `ParsePortRange`); `None` when malformed or
    /// out of range.
    pub fn parse(s: &str) -> Option<PortRange> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let port = |p: &str| {
            if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            p.parse::<u16>().ok()
        };
        PortRange::new(port(a)?, port(b)?)
    }

    /// The first port.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// The last port.
    pub fn end(&self) -> u16 {
        self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// A routing policy rule,
/// `from <prefix> [ipproto P] [sport R] [dport R] lookup <table>`, always with the
/// action "to table". What is not set matches anything. Table 0 means "not chosen
/// yet" ([`Plan::assign_tables`](super::Plan::assign_tables)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    family: Family,
    from: Option<IpNet>,
    proto: Option<u8>,
    dst_port: Option<PortRange>,
    src_port: Option<PortRange>,
    table: u32,
}

impl Rule {
    /// A rule of `family` that matches every packet, with no table yet.
    pub fn new(family: Family) -> Rule {
        Rule {
            family,
            from: None,
            proto: None,
            dst_port: None,
            src_port: None,
            table: 0,
        }
    }

    /// Matches packets from `from` (masked); the rule takes its family.
    pub fn with_from(mut self, from: IpNet) -> Rule {
        self.family = Family::of(from.addr());
        self.from = Some(from.trunc());
        self
    }

    /// Matches IP protocol `proto` (6 = tcp, 17 = udp, ...).
    pub fn with_proto(mut self, proto: u8) -> Rule {
        self.proto = Some(proto);
        self
    }

    /// Matches destination ports `ports`.
    pub fn with_dst_port(mut self, ports: PortRange) -> Rule {
        self.dst_port = Some(ports);
        self
    }

    /// Matches source ports `ports`.
    pub fn with_src_port(mut self, ports: PortRange) -> Rule {
        self.src_port = Some(ports);
        self
    }

    /// Looks up routing table `table`.
    pub fn with_table(mut self, table: u32) -> Rule {
        self.table = table;
        self
    }

    /// The IP version.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The source prefix, if the rule has one.
    pub fn from(&self) -> Option<IpNet> {
        self.from
    }

    /// The IP protocol number, if the rule has one.
    pub fn proto(&self) -> Option<u8> {
        self.proto
    }

    /// The destination ports, if the rule has them.
    pub fn dst_port(&self) -> Option<PortRange> {
        self.dst_port
    }

    /// The source ports, if the rule has them.
    pub fn src_port(&self) -> Option<PortRange> {
        self.src_port
    }

    /// The table looked up (0: not chosen yet).
    pub fn table(&self) -> u32 {
        self.table
    }

    /// Whether both rules match the same packets (they may look up other tables).
    pub fn same_match(&self, other: &Rule) -> bool {
        self.with_table(0) == other.with_table(0)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.from, self.family) {
            (Some(from), _) => write!(f, "from {from}")?,
            (None, Family::V4) => write!(f, "from 0.0.0.0/0")?,
            (None, Family::V6) => write!(f, "from ::/0")?,
        }
        if let Some(p) = self.proto {
            write!(f, " ipproto {p}")?;
        }
        if let Some(r) = self.src_port {
            write!(f, " sport {r}")?;
        }
        if let Some(r) = self.dst_port {
            write!(f, " dport {r}")?;
        }
        write!(f, " lookup {}", self.table)
    }
}

/// A policy route of the client's interface: a [`Rule`] and the routes of the table
/// it looks up, all through the plan's interface. The table is chosen when the plan is
/// applied ([`Plan::assign_tables`](super::Plan::assign_tables)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub(super) rule: Rule,
    pub(super) routes: Vec<Route>,
}

impl Policy {
    /// A policy for `rule`, with no route yet.
    pub fn new(rule: Rule) -> Policy {
        Policy {
            rule,
            routes: Vec::new(),
        }
    }

    /// Adds a route to the policy's table; it replaces an earlier route to the same
    /// destination.
    pub fn with_route(mut self, route: Route) -> Policy {
        let route = route.in_table(self.rule.table);
        match self.routes.iter_mut().find(|r| r.dst == route.dst) {
            Some(r) => *r = route,
            None => self.routes.push(route),
        }
        self
    }

    /// The same policy with its rule and routes in table `table`.
    pub fn with_table(mut self, table: u32) -> Policy {
        self.rule.table = table;
        for r in &mut self.routes {
            r.table = table;
        }
        self
    }

    /// The rule.
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// The routes of its table.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The table, once chosen.
    pub fn table(&self) -> Option<u32> {
        (self.rule.table != 0).then_some(self.rule.table)
    }
}
