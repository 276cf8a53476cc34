//! [`RtNetlink`]: [`Netlink`] over a real rtnetlink socket inside one namespace.
//!
//! The socket is created inside the target namespace on a short-lived helper thread
//! ([`NetNs::run`]) that enters the tokio runtime only to register the socket, then
//! exits; the socket keeps its namespace forever and is used from any task. The
//! connection task that drives the socket is spawned on tokio and owned by the
//! `RtNetlink` value: it is aborted when the value is dropped.
//!
//! Round trips: link settings (MTU, up, alias, MAC) name their link by `IFLA_IFNAME`,
//! so the kernel looks it up (one round trip, not a lookup and a set); the socket
//! remembers the index of each link it found by name, so the adds of a plan (address,
//! route, neighbour) need no lookup, and a remembered index that turns out stale
//! (ENODEV: the link was replaced) is looked up again. Measured with
//! `benches/storm.rs` (1,000 `kernel_side_up` at once, dev profile, a loaded 2-core
//! machine): 2.5 s before, 1.95 s with settings by name, 1.6-1.7 s with the index.
//!
//! Address dumps: the socket asks for `NETLINK_GET_STRICT_CHK` (Linux 4.20+), with
//! which the kernel honours the interface index of an `RTM_GETADDR` dump and sends
//! only that link's addresses, instead of every address of the namespace for this
//! side to filter (a forwarder's namespace with many links, or a pod with many
//! connections). Where the kernel refuses the option, or refuses such a dump
//! (`EINVAL`), the dump asks for everything and filters here, as before; the result is
//! the same either way.
//!
//! Failure handled: errnos are turned into this crate's errors by context (`ENODEV` on
//! a lookup is [`Error::LinkNotFound`], `EEXIST` on a veth creation is
//! [`Error::LinkExists`]); deleting an address, route, neighbour or rule that is
//! absent is not an error. Rules are added with the action `FR_ACT_TO_TBL` set
//! explicitly: rtnetlink's default (`Unspec`) installs a rule that makes every
//! matching packet fail with EINVAL (docs/KERNEL.md 5.3).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope as NlScope, RouteType,
    RouteVia,
};
use netlink_packet_route::rule::{
    RuleAction, RuleAttribute, RuleFlags, RuleMessage, RulePortRange,
};
use netlink_packet_route::{AddressFamily, IpProtocol};
use nsm_sdk::async_trait;
use rtnetlink::{
    AddressMessageBuilder, Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};
use tracing::debug;

use crate::apply::{Link, Netlink, MESH_GROUP};
use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::plan::{
    Family, IfName, Mtu, Neighbour, PortRange, Route, RouteScope, Rule, MAX_ALIAS_LEN,
};

const ESRCH: i32 = 3;
const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;
const EADDRNOTAVAIL: i32 = 99;
/// The kernel's `local` table (`RT_TABLE_LOCAL`): its own addresses and broadcasts.
const LOCAL_TABLE: u32 = 255;

/// See the [module docs](self).
#[derive(Debug)]
pub struct RtNetlink {
    handle: Handle,
    netns: String,
    netns_id: (u64, u64),
    /// The index of each link this socket last found by name, so that the adds of a
    /// plan (address, route, neighbour) skip a lookup each; see [`RtNetlink::add_on`].
    indexes: std::sync::Mutex<HashMap<String, u32>>,
    /// Whether address dumps ask the kernel for one link's addresses (strict checking
    /// is on and the kernel has not refused such a dump).
    kernel_filter: std::sync::atomic::AtomicBool,
    _conn: ConnTask,
}

/// The socket's connection task; aborted with its owner.
#[derive(Debug)]
struct ConnTask(tokio::task::JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RtNetlink {
    /// Opens a netlink socket inside `ns`.
    pub async fn open(ns: &NetNs) -> Result<RtNetlink> {
        let rt = tokio::runtime::Handle::current();
        let made = ns
            .run(move || {
                // The socket registers with tokio's reactor when it is created, which
                // needs a runtime context on this (non-runtime) thread.
                let _entered = rt.enter();
                rtnetlink::new_connection()
            })
            .await?;
        let (mut conn, handle, _unsolicited) = made.map_err(|e| Error::NetnsIo {
            path: ns.path().to_string(),
            source: e,
        })?;
        let strict = {
            use rtnetlink::sys::AsyncSocket;
            conn.socket_mut()
                .socket_ref()
                .set_netlink_get_strict_chk(true)
        };
        if let Err(e) = &strict {
            debug!(netns = %ns, error = %e, "no strict netlink checking: address dumps are filtered here");
        }
        let task = tokio::spawn(conn);
        debug!(netns = %ns, "netlink socket opened");
        Ok(RtNetlink {
            handle,
            netns: ns.to_string(),
            netns_id: (ns.dev(), ns.inode()),
            indexes: std::sync::Mutex::default(),
            kernel_filter: std::sync::atomic::AtomicBool::new(strict.is_ok()),
            _conn: ConnTask(task),
        })
    }

    /// Whether address dumps are filtered by the kernel (see the module docs).
    pub fn kernel_filters_dumps(&self) -> bool {
        self.kernel_filter
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Address dumps ask for every address of the namespace and are filtered here
    /// from now on, as where the kernel cannot filter them (for comparisons).
    pub fn filter_dumps_here(&self) {
        self.kernel_filter
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The address messages of the link `index`: a dump the kernel filters when it
    /// can (once refused with `EINVAL`, never again on this socket), else the whole
    /// namespace's, filtered here.
    async fn address_messages(
        &self,
        index: u32,
    ) -> Result<Vec<netlink_packet_route::address::AddressMessage>, rtnetlink::Error> {
        if self.kernel_filters_dumps() {
            let mut req = self.handle.address().get().set_link_index_filter(index);
            req.message_mut().header.index = index;
            match req.execute().try_collect().await {
                Err(e) if errno(&e) == Some(EINVAL) => {
                    debug!(netns = %self.netns, "the kernel refused a filtered address dump: filtering here");
                    self.filter_dumps_here();
                }
                other => return other,
            }
        }
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
    }

    /// The rtnetlink handle, for operations this crate does not wrap. It stays usable
    /// only as long as this value lives.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    fn err(&self, op: impl Into<String>, e: rtnetlink::Error) -> Error {
        Error::netlink(op, &self.netns, e)
    }

    fn not_found(&self, name: &IfName) -> Error {
        Error::LinkNotFound {
            name: name.to_string(),
            netns: self.netns.clone(),
        }
    }

    async fn index(&self, name: &IfName) -> Result<u32> {
        match self.find(name).await? {
            Some(link) => Ok(link.index),
            None => Err(self.not_found(name)),
        }
    }

    async fn find(&self, name: &IfName) -> Result<Option<Link>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let found = match s.try_next().await {
            Ok(Some(msg)) => Some(to_link(msg)),
            Ok(None) => None,
            Err(e) if errno(&e) == Some(ENODEV) => None,
            Err(e) => return Err(self.err(format!("get link {name}"), e)),
        };
        let mut indexes = self.indexes();
        match &found {
            Some(l) => indexes.insert(name.to_string(), l.index),
            None => indexes.remove(name.as_str()),
        };
        Ok(found)
    }

    fn indexes(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.indexes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs an add on the link `name` by its index: the one this socket last found
    /// for the name when it has one (no lookup), else a fresh lookup. A remembered
    /// index that is stale (the link went and a new one took the name: the kernel
    /// answers ENODEV, indexes are not reused) is forgotten and the add tried again
    /// with a fresh lookup.
    async fn add_on<F, Fut>(&self, name: &IfName, op: impl Fn() -> String, add: F) -> Result<()>
    where
        F: Fn(u32) -> Fut,
        Fut: std::future::Future<Output = Result<(), rtnetlink::Error>>,
    {
        let known = self.indexes().get(name.as_str()).copied();
        if let Some(index) = known {
            match add(index).await {
                Ok(()) => return Ok(()),
                Err(e) if errno(&e) == Some(ENODEV) => {
                    self.indexes().remove(name.as_str());
                }
                Err(e) => return Err(self.err(op(), e)),
            }
        }
        let index = self.index(name).await?;
        add(index).await.map_err(|e| self.err(op(), e))
    }

    /// The rules of one family, as the kernel lists them.
    async fn rule_messages(&self, family: Family) -> Result<Vec<RuleMessage>> {
        let version = match family {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        };
        self.handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list rules", e))
    }

    /// The listed rules identical to `rule`.
    async fn find_rules(&self, rule: &Rule) -> Result<Vec<RuleMessage>> {
        Ok(self
            .rule_messages(rule.family())
            .await?
            .into_iter()
            .filter(|m| to_rule(m).as_ref() == Some(rule))
            .collect())
    }

    /// Sends an `RTM_SETLINK` that names its link by `IFLA_IFNAME` (index 0): the kernel
    /// looks the name up itself, one round trip instead of a lookup and a set. A
    /// missing link is [`Error::LinkNotFound`].
    async fn set_by_name(
        &self,
        name: &IfName,
        msg: netlink_packet_route::link::LinkMessage,
        op: impl FnOnce() -> String,
    ) -> Result<()> {
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Err(self.not_found(name)),
            Err(e) => Err(self.err(op(), e)),
        }
    }

    /// Runs a delete whose "not there" errnos mean success.
    fn absent_ok(&self, op: String, r: Result<(), rtnetlink::Error>, absent: &[i32]) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e) if errno(&e).is_some_and(|n| absent.contains(&n)) => Ok(()),
            Err(e) => Err(self.err(op, e)),
        }
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn to_link(msg: netlink_packet_route::link::LinkMessage) -> Link {
    let mut link = Link {
        name: String::new(),
        index: msg.header.index,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind: None,
        alias: None,
        group: 0,
    };
    for a in msg.attributes {
        match a {
            LinkAttribute::Group(g) => link.group = g,
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::IfAlias(a) if !a.is_empty() => link.alias = Some(a),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    link
}

/// The table of a route or rule message: the 32-bit attribute when there is one (ids
/// above 255), else the header's byte.
fn table_of(header_table: u8, attr: Option<u32>) -> u32 {
    attr.unwrap_or(u32::from(header_table))
}

fn rule_table(msg: &RuleMessage) -> u32 {
    let attr = msg.attributes.iter().find_map(|a| match a {
        RuleAttribute::Table(t) => Some(*t),
        _ => None,
    });
    table_of(msg.header.table, attr)
}

fn route_table(msg: &RouteMessage) -> u32 {
    let attr = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(t) => Some(*t),
        _ => None,
    });
    table_of(msg.header.table, attr)
}

/// A listed rule as a [`Rule`], if it is one: action "to table", not inverted, no
/// destination or TOS, and nothing matched but source, IP protocol and ports.
fn to_rule(msg: &RuleMessage) -> Option<Rule> {
    let h = &msg.header;
    if h.action != RuleAction::ToTable
        || h.flags.contains(RuleFlags::Invert)
        || h.dst_len != 0
        || h.tos != 0
    {
        return None;
    }
    let family = match h.family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    let mut rule = Rule::new(family).with_table(rule_table(msg));
    let ports = |r: &RulePortRange| PortRange::new(r.start, r.end);
    for a in &msg.attributes {
        match a {
            RuleAttribute::Source(ip) => rule = rule.with_from(IpNet::new(*ip, h.src_len).ok()?),
            RuleAttribute::IpProtocol(p) => rule = rule.with_proto(u8::from(*p)),
            RuleAttribute::SourcePortRange(r) => rule = rule.with_src_port(ports(r)?),
            RuleAttribute::DestinationPortRange(r) => rule = rule.with_dst_port(ports(r)?),
            // Bookkeeping, not matching: the priority, the table, who added it, the
            // "not set" values the kernel always reports (-1), and attributes this
            // crate does not know (6.x kernels add full port masks, kind 29 and 30).
            RuleAttribute::Priority(_)
            | RuleAttribute::Table(_)
            | RuleAttribute::Protocol(_)
            | RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX)
            | RuleAttribute::Other(_) => {}
            _ => return None,
        }
    }
    Some(rule)
}

/// The add request's message for `rule`.
fn rule_message(handle: &Handle, rule: &Rule) -> rtnetlink::RuleAddRequest {
    // The action must be set: rtnetlink's default is `Unspec`, which the kernel
    // accepts and then fails every matching packet with EINVAL (docs/KERNEL.md 5.3).
    let mut req = handle
        .rule()
        .add()
        .table_id(rule.table())
        .action(RuleAction::ToTable);
    let msg = req.message_mut();
    msg.header.family = match rule.family() {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    if let Some(from) = rule.from() {
        msg.header.src_len = from.prefix_len();
        msg.attributes.push(RuleAttribute::Source(from.addr()));
    }
    if let Some(p) = rule.proto() {
        msg.attributes
            .push(RuleAttribute::IpProtocol(IpProtocol::from(i32::from(p))));
    }
    let range = |r: PortRange| RulePortRange {
        start: r.start(),
        end: r.end(),
    };
    if let Some(r) = rule.src_port() {
        msg.attributes
            .push(RuleAttribute::SourcePortRange(range(r)));
    }
    if let Some(r) = rule.dst_port() {
        msg.attributes
            .push(RuleAttribute::DestinationPortRange(range(r)));
    }
    req
}

/// The route message for `route` through `index`, as for an add.
fn route_message(index: u32, route: &Route) -> Result<RouteMessage> {
    let family_mix = || Error::InvalidContext {
        field: "route",
        value: route.to_string(),
        reason: "mixes address families",
    };
    let dst = route.dst();
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(|_| family_mix())?
        .output_interface(index)
        .table_id(route.table())
        .scope(match route.scope() {
            RouteScope::Link => NlScope::Link,
            RouteScope::Universe => NlScope::Universe,
        });
    if let Some(gw) = route.via() {
        // onlink: the gateway is on the wire even though no local prefix covers it
        // (the addresses are /32s), as sdk-kernel does for universe routes.
        b = b.gateway(gw).map_err(|_| family_mix())?.onlink();
    }
    Ok(b.build())
}

fn from_route_message(index: u32, msg: &RouteMessage) -> Option<Route> {
    let h = &msg.header;
    let table = route_table(msg);
    let oif = msg.attributes.contains(&RouteAttribute::Oif(index));
    if table == LOCAL_TABLE
        || !oif
        || h.protocol == RouteProtocol::Kernel
        || h.kind != RouteType::Unicast
    {
        return None;
    }
    let mut dst_addr = None;
    let mut via = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst_addr = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                dst_addr = Some(IpAddr::V6(*ip))
            }
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => via = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => via = Some(IpAddr::V6(*ip)),
            RouteAttribute::Via(RouteVia::Inet6(ip)) => via = Some(IpAddr::V6(*ip)),
            _ => {}
        }
    }
    let dst_addr = dst_addr.unwrap_or(match h.address_family {
        netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    let dst = IpNet::new(dst_addr, h.destination_prefix_length).ok()?;
    let route = match h.scope {
        NlScope::Link => Route::link(dst),
        _ => Route::universe(dst, via),
    };
    Some(route.in_table(table))
}

fn neighbour_ip(msg: &NeighbourMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    })
}

#[async_trait]
impl Netlink for RtNetlink {
    fn netns(&self) -> &str {
        &self.netns
    }

    fn netns_id(&self) -> Option<(u64, u64)> {
        Some(self.netns_id)
    }

    async fn set_group(&self, index: u32, group: u32) -> Result<()> {
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes.push(LinkAttribute::Group(group));
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Err(Error::LinkNotFound {
                name: format!("index {index}"),
                netns: self.netns.clone(),
            }),
            Err(e) => Err(self.err(format!("set group {group} on link {index}"), e)),
        }
    }

    async fn delete_group(&self, group: u32) -> Result<()> {
        // Index 0 and IFLA_GROUP: the kernel's rtnl_group_dellink, one unregister (and
        // one synchronisation) for every link of the group.
        let mut req = self.handle.link().del(0);
        req.message_mut()
            .attributes
            .push(LinkAttribute::Group(group));
        match req.execute().await {
            Ok(()) => Ok(()),
            // No link carries the group (its links went with their pods meanwhile).
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(self.err(format!("delete link group {group}"), e)),
        }
    }

    async fn create_veth_pair(
        &self,
        a: &IfName,
        ns_a: &NetNs,
        b: &IfName,
        ns_b: &NetNs,
        mtu: Option<Mtu>,
    ) -> Result<()> {
        // IFLA_NET_NS_FD on the peer and on the link itself: each end is born in its
        // namespace under its final name, with no temporary name and no move.
        let mut peer = LinkUnspec::new_with_name(b.as_str()).setns_by_fd(ns_b.as_fd().as_raw_fd());
        let mut link = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(a.to_string())
            .setns_by_fd(ns_a.as_fd().as_raw_fd());
        if let Some(m) = mtu {
            peer = peer.mtu(m.get());
            link = link.mtu(m.get());
        }
        // IFLA_GROUP on both ends: marked as the mesh's from birth (see MESH_GROUP).
        let mut peer = peer.build();
        peer.attributes.push(LinkAttribute::Group(MESH_GROUP));
        let mut msg = link
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        msg.attributes.push(LinkAttribute::Group(MESH_GROUP));
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Err(Error::LinkExists {
                name: format!("{a} or {b}"),
                netns: format!("{ns_a} or {ns_b}"),
                alias: None,
            }),
            Err(e) => Err(self.err(format!("create veth {a} ({ns_a}) / {b} ({ns_b})"), e)),
        }
    }

    async fn delete_link(&self, name: &IfName) -> Result<()> {
        let index = self.index(name).await?;
        self.indexes().remove(name.as_str());
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Err(self.not_found(name)),
            Err(e) => Err(self.err(format!("delete link {name}"), e)),
        }
    }

    async fn link(&self, name: &IfName) -> Result<Option<Link>> {
        self.find(name).await
    }

    async fn links(&self) -> Result<Vec<Link>> {
        let s = self.handle.link().get().execute();
        let msgs: Vec<_> = s
            .try_collect()
            .await
            .map_err(|e| self.err("list links", e))?;
        Ok(msgs.into_iter().map(to_link).collect())
    }

    async fn set_mtu(&self, name: &IfName, mtu: Mtu) -> Result<()> {
        let msg = LinkUnspec::new_with_name(name.as_str())
            .mtu(mtu.get())
            .build();
        self.set_by_name(name, msg, || format!("set mtu {} on {name}", mtu.get()))
            .await
    }

    async fn set_mac(&self, name: &IfName, mac: [u8; 6]) -> Result<()> {
        let msg = LinkUnspec::new_with_name(name.as_str())
            .address(mac.to_vec())
            .build();
        self.set_by_name(name, msg, || format!("set the hardware address of {name}"))
            .await
    }

    async fn set_up(&self, name: &IfName) -> Result<()> {
        let msg = LinkUnspec::new_with_name(name.as_str()).up().build();
        self.set_by_name(name, msg, || format!("set {name} up"))
            .await
    }

    async fn set_alias(&self, name: &IfName, alias: &str) -> Result<()> {
        if alias.len() > MAX_ALIAS_LEN {
            return Err(Error::InvalidAlias {
                alias: alias.to_string(),
                reason: "longer than 255 bytes",
            });
        }
        let msg = LinkUnspec::new_with_name(name.as_str())
            .alias(alias)
            .build();
        self.set_by_name(name, msg, || format!("set alias {alias:?} on {name}"))
            .await
    }

    async fn add_address(&self, name: &IfName, addr: IpNet) -> Result<()> {
        // Permanent like `ip addr add`; IPv6 without duplicate address detection, so
        // the address is usable at once instead of after 1-2 s of DAD.
        let flags = match addr {
            IpNet::V4(_) => AddressFlags::Permanent,
            IpNet::V6(_) => AddressFlags::Permanent | AddressFlags::Nodad,
        };
        let op = || format!("add address {addr} to {name}");
        self.add_on(name, op, |index| {
            let mut req = self
                .handle
                .address()
                .add(index, addr.addr(), addr.prefix_len())
                .replace();
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(flags));
            req.execute()
        })
        .await
    }

    async fn del_address(&self, name: &IfName, addr: IpNet) -> Result<()> {
        let index = self.index(name).await?;
        let msg = match addr {
            IpNet::V4(n) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(n.addr(), n.prefix_len())
                .build(),
            IpNet::V6(n) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(n.addr(), n.prefix_len())
                .build(),
        };
        let r = self.handle.address().del(msg).execute().await;
        self.absent_ok(
            format!("delete address {addr} from {name}"),
            r,
            &[EADDRNOTAVAIL],
        )
    }

    async fn addresses(&self, name: &IfName) -> Result<Vec<IpNet>> {
        let index = self.index(name).await?;
        let msgs = self
            .address_messages(index)
            .await
            .map_err(|e| self.err(format!("list addresses of {name}"), e))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index || m.header.scope != AddressScope::Universe {
                continue;
            }
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
            // point-to-point links); IPv6 sends only IFA_ADDRESS.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(address) {
                if let Ok(net) = IpNet::new(ip, m.header.prefix_len) {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    async fn add_route(&self, name: &IfName, route: &Route) -> Result<()> {
        // Built (and checked) once; only the output interface changes per try.
        let msg = route_message(0, route)?;
        let op = || format!("add route {route} dev {name}");
        self.add_on(name, op, |index| {
            let mut msg = msg.clone();
            for a in &mut msg.attributes {
                if let RouteAttribute::Oif(i) = a {
                    *i = index;
                }
            }
            self.handle.route().add(msg).replace().execute()
        })
        .await
    }

    async fn del_route(&self, name: &IfName, route: &Route) -> Result<()> {
        let index = self.index(name).await?;
        let any_scope = Route::universe(route.dst(), None).in_table(route.table());
        let mut msg = route_message(index, &any_scope)?;
        // Match the route whatever its scope and protocol (as `ip route del` does):
        // the kernel compares them only when they are set.
        msg.header.scope = NlScope::NoWhere;
        msg.header.protocol = RouteProtocol::Unspec;
        let r = self.handle.route().del(msg).execute().await;
        self.absent_ok(
            format!(
                "delete route {} table {} dev {name}",
                route.dst(),
                route.table()
            ),
            r,
            &[ESRCH, ENOENT],
        )
    }

    async fn routes(&self, name: &IfName) -> Result<Vec<Route>> {
        let index = self.index(name).await?;
        let mut out = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<_> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|e| self.err(format!("list routes of {name}"), e))?;
            out.extend(msgs.iter().filter_map(|m| from_route_message(index, m)));
        }
        Ok(out)
    }

    async fn add_neighbour(&self, name: &IfName, n: &Neighbour) -> Result<()> {
        let op = || format!("add neighbour {n} dev {name}");
        self.add_on(name, op, |index| {
            self.handle
                .neighbours()
                .add(index, n.ip)
                .link_layer_address(&n.mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
        })
        .await
    }

    async fn del_neighbour(&self, name: &IfName, ip: IpAddr) -> Result<()> {
        let index = self.index(name).await?;
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err(format!("list neighbours of {name}"), e))?;
        let found = msgs
            .into_iter()
            .find(|m| m.header.ifindex == index && neighbour_ip(m) == Some(ip));
        let Some(msg) = found else {
            return Ok(());
        };
        let r = self.handle.neighbours().del(msg).execute().await;
        self.absent_ok(format!("delete neighbour {ip} dev {name}"), r, &[ENOENT])
    }

    async fn neighbours(&self, name: &IfName) -> Result<Vec<Neighbour>> {
        let index = self.index(name).await?;
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err(format!("list neighbours of {name}"), e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
            .filter_map(|m| {
                let ip = neighbour_ip(m)?;
                let mac = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        <[u8; 6]>::try_from(l.as_slice()).ok()
                    }
                    _ => None,
                })?;
                Some(Neighbour { ip, mac })
            })
            .collect())
    }

    async fn add_rule(&self, rule: &Rule) -> Result<()> {
        if !self.find_rules(rule).await?.is_empty() {
            return Ok(());
        }
        rule_message(&self.handle, rule)
            .execute()
            .await
            .map_err(|e| self.err(format!("add rule {rule}"), e))
    }

    async fn del_rule(&self, rule: &Rule) -> Result<()> {
        for msg in self.find_rules(rule).await? {
            // The listed message, priority included, names exactly that rule.
            let r = self.handle.rule().del(msg).execute().await;
            self.absent_ok(format!("delete rule {rule}"), r, &[ENOENT])?;
        }
        Ok(())
    }

    async fn rules(&self) -> Result<Vec<Rule>> {
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            out.extend(self.rule_messages(family).await?.iter().filter_map(to_rule));
        }
        Ok(out)
    }

    async fn tables_in_use(&self) -> Result<BTreeSet<u32>> {
        let mut tables = BTreeSet::new();
        for family in [Family::V4, Family::V6] {
            tables.extend(self.rule_messages(family).await?.iter().map(rule_table));
        }
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<_> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|e| self.err("list routes", e))?;
            tables.extend(msgs.iter().map(route_table));
        }
        Ok(tables)
    }
}

/// Bridges: what a passthrough endpoint needs to join the two interfaces of a
/// connection ([`crate::mechanism::xconnect`]).
impl RtNetlink {
    /// Creates a Linux bridge called `name`, up (`ip link add <name> up type bridge`).
    /// A name that is taken is [`Error::LinkExists`].
    pub async fn create_bridge(&self, name: &IfName) -> Result<()> {
        let msg = rtnetlink::LinkBridge::new(name.as_str()).build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Err(Error::LinkExists {
                name: name.to_string(),
                netns: self.netns.clone(),
                alias: None,
            }),
            Err(e) => Err(self.err(format!("create bridge {name}"), e)),
        }
    }

    /// Makes `name` a port of the bridge `bridge` and sets it up
    /// (`ip link set <name> master <bridge> up`). Either link missing is
    /// [`Error::LinkNotFound`].
    pub async fn set_bridge_port(&self, name: &IfName, bridge: &IfName) -> Result<()> {
        let bridge_index = self.index(bridge).await?;
        let index = self.index(name).await?;
        let msg = LinkUnspec::new_with_index(index)
            .controller(bridge_index)
            .up()
            .build();
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Err(self.not_found(name)),
            Err(e) => Err(self.err(format!("set {name} master {bridge}"), e)),
        }
    }

    /// The index of the link that `name` is a port of (its `master`), if any. A missing
    /// link is [`Error::LinkNotFound`].
    pub async fn controller(&self, name: &IfName) -> Result<Option<u32>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(Some(msg)) => Ok(msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::Controller(i) if *i != 0 => Some(*i),
                _ => None,
            })),
            Ok(None) => Err(self.not_found(name)),
            Err(e) if errno(&e) == Some(ENODEV) => Err(self.not_found(name)),
            Err(e) => Err(self.err(format!("get link {name}"), e)),
        }
    }
}
