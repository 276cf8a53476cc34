//! The values a [`Plan`](super::Plan) is made of: the pod side, interface name, MTU,
//! routes and neighbours, each checked when built.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::error::{Error, Result};

/// Which pod of a connection an interface belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PodSide {
    /// The client (NSC): gets `src_ip_addrs` and `src_routes`.
    Client,
    /// The endpoint (NSE): gets `dst_ip_addrs` and `dst_routes`.
    Endpoint,
}

/// A Linux interface name the kernel accepts: 1 to 15 bytes, not `.` or `..`, without
/// `/`, `:` or whitespace (the kernel's `dev_valid_name`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    /// The longest name, in bytes (`IFNAMSIZ` - 1).
    pub const MAX_LEN: usize = nsm_sdk::wire::MAX_INTERFACE_NAME_LEN;

    /// Validates `name`; a bad one is [`Error::InvalidInterfaceName`].
    pub fn new(name: impl Into<String>) -> Result<IfName> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("empty")
        } else if name.len() > Self::MAX_LEN {
            Some("longer than 15 bytes")
        } else if name == "." || name == ".." {
            Some("not a name")
        } else if name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            Some("contains '/', ':' or whitespace")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidInterfaceName { name, reason }),
            None => Ok(IfName(name)),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IfName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An interface MTU in `68..=65535` (the IPv4 minimum up to the largest veth MTU).
/// A plan with IPv6 addresses also needs at least 1280 ([`Plan::check`](super::Plan::check)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mtu(u32);

impl Mtu {
    /// The smallest MTU an IPv4 interface may have.
    pub const MIN: u32 = 68;
    /// The largest MTU of an Ethernet-like device (`ETH_MAX_MTU`).
    pub const MAX: u32 = 65535;
    /// The smallest MTU with which the kernel keeps IPv6 enabled on a link.
    pub const MIN_IPV6: u32 = 1280;

    /// Validates `mtu`; out of range is [`Error::InvalidMtu`].
    pub fn new(mtu: u32) -> Result<Mtu> {
        if (Self::MIN..=Self::MAX).contains(&mtu) {
            Ok(Mtu(mtu))
        } else {
            Err(Error::InvalidMtu {
                mtu,
                reason: "outside 68..=65535",
            })
        }
    }

    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// The longest link alias the kernel takes, in bytes (`IFALIASZ` - 1).
pub const MAX_ALIAS_LEN: usize = 255;

/// The scope of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteScope {
    /// Directly reachable on the link (no gateway): `scope link`.
    Link,
    /// A normal route (`scope global`), with or without a gateway.
    Universe,
}

/// The kernel's main routing table (`RT_TABLE_MAIN`), where routes go by default.
pub const MAIN_TABLE: u32 = 254;

/// The lowest routing table id a [`Policy`](super::Policy) gets; ids 253 to 255 (the kernel's
/// `default`, `main` and `local` tables) are never taken.
pub const POLICY_TABLE_BASE: u32 = 100;

/// A route through the interface of a plan, in the main table unless
/// [`Route::in_table`] says otherwise. The destination is always masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub(super) dst: IpNet,
    pub(super) via: Option<IpAddr>,
    pub(super) scope: RouteScope,
    pub(super) table: u32,
}

impl Route {
    /// A link-scope route to `dst` (the peer's address is on the wire).
    pub fn link(dst: IpNet) -> Route {
        Route {
            dst: dst.trunc(),
            via: None,
            scope: RouteScope::Link,
            table: MAIN_TABLE,
        }
    }

    /// A universe-scope route to `dst`, through the gateway `via` (installed `onlink`)
    /// or, without one, straight out of the interface.
    pub fn universe(dst: IpNet, via: Option<IpAddr>) -> Route {
        Route {
            dst: dst.trunc(),
            via,
            scope: RouteScope::Universe,
            table: MAIN_TABLE,
        }
    }

    /// The same route in routing table `table` ([`MAIN_TABLE`] by default).
    pub fn in_table(mut self, table: u32) -> Route {
        self.table = table;
        self
    }

    /// The routing table.
    pub fn table(&self) -> u32 {
        self.table
    }

    /// The (masked) destination.
    pub fn dst(&self) -> IpNet {
        self.dst
    }

    /// The gateway, if any.
    pub fn via(&self) -> Option<IpAddr> {
        self.via
    }

    /// The scope.
    pub fn scope(&self) -> RouteScope {
        self.scope
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        if self.scope == RouteScope::Link {
            write!(f, " scope link")?;
        }
        if self.table != MAIN_TABLE {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

/// A static (permanent) neighbour entry: `ip` is at `mac` on the interface's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Neighbour {
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its Ethernet address.
    pub mac: [u8; 6],
}

impl fmt::Display for Neighbour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lladdr {}", self.ip, fmt_mac(&self.mac))
    }
}

/// `aa:bb:cc:dd:ee:ff`, as `ip` prints a hardware address.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}
