//! One veth pair per local connection: [`kernel_side_up`], [`Created::refresh`] and
//! [`down`] (see the [crate docs](crate) for why this topology).
//!
//! What it does: checks both names are free, creates the pair with each end born in
//! its pod's namespace under its final name, marks each end with its plan's alias
//! ([`veth_alias`]: which connection and side it serves), then programs each end from
//! its own [`Plan`] through a [`Netlink`] bound to that pod's namespace.
//!
//! **Leftovers after a forwarder restart** (docs/KERNEL.md 1.4): a forwarder that dies
//! leaves its pairs in the kernel (they keep carrying traffic), and the forwarder that
//! replaces it knows nothing of them. When it is asked for the same connection again
//! (the client's heal re-requests it), the names are taken by the old pair. An end
//! whose plan has an alias therefore treats a link that carries **the same alias**
//! (under the wanted name or any other) as a leftover of this very connection and
//! deletes it — which removes the whole old pair — before creating the new one, as
//! sdk-vpp's `kernelvethpair` does. A link that holds the name with another alias, or
//! none, belongs to something else: it is left untouched and the creation fails with
//! [`Error::LinkExists`] saying what holds the name. The kernel ignores an alias in
//! `RTM_NEWLINK`, so it is set right after creation; a forwarder that dies in between
//! (or a Request whose future is dropped there) leaves an end without alias. Both ends
//! are born in link group [`MESH_GROUP`] (which the kernel does honour at creation), so
//! such a half-made end under the wanted name is recognised as the mesh's and replaced
//! too; an end without alias outside that group is foreign.
//!
//! **Neighbours**: each end gets a permanent neighbour entry for every address of the
//! other end, on the other end's hardware address (the one its plan gave it at birth,
//! which a refresh never changes), so the pods need no ARP or neighbour solicitation
//! and the node's neighbour tables, whose learnt entries are limited node-wide
//! (`gc_thresh3`, docs/KERNEL.md §8), do not fill up with two entries per connection.
//! A neighbour the context names for the same address wins.
//!
//! State: [`Created`] holds, per side, an on-demand netlink handle (the namespace file;
//! a socket only while a batch of operations runs), the plan that was applied
//! (with the routing tables its policy routes got, and the peer's neighbours), the
//! plan it was asked for and the hardware address it was born with, the interface
//! index the end was born with, so a later refresh is a diff and Close deletes exactly the link it
//! made (not a same-named link made by someone else after the pair died) and the
//! policy rules it added.
//!
//! Failure handled: a name already taken by something other than a leftover of the
//! same connection is [`Error::LinkExists`] before anything is created or deleted;
//! any failure after the pair exists deletes the pair (which takes its addresses,
//! routes and neighbours with it) and the policy rules already added (which a link
//! does not take along), and returns the original error, so nothing is left in either
//! namespace. A failed refresh rolls back to the previous plan.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{info, warn};

use crate::apply::{run_op, update, Link, Netlink, MESH_GROUP};
use crate::error::{Error, Result};
use crate::group_commit::GroupCommit;
use crate::netns::NetNs;
use crate::on_demand::OnDemandNetlink;
use crate::plan::{IfName, Mtu, Op, Plan, PodSide, MAIN_TABLE, MAX_ALIAS_LEN};
use crate::reaper;

/// The alias of the `side` end of a connection's veth pair: `nsm-client-<id>` or
/// `nsm-endpoint-<id>`, cut to [`MAX_ALIAS_LEN`] bytes (at a character boundary).
///
/// `connection` must name the connection for as long as it lives, across heals and
/// forwarder restarts: the forwarder uses the id of the connection's first path
/// segment (the client's own id), as Go's `kernelvethpair` does.
pub fn veth_alias(side: PodSide, connection: &str) -> String {
    let prefix = match side {
        PodSide::Client => "nsm-client-",
        PodSide::Endpoint => "nsm-endpoint-",
    };
    let mut alias = String::with_capacity(MAX_ALIAS_LEN);
    alias.push_str(prefix);
    for c in connection.chars().filter(|c| *c != '\0') {
        if alias.len() + c.len_utf8() > MAX_ALIAS_LEN {
            break;
        }
        alias.push(c);
    }
    alias
}

/// One end of the pair to create: the pod namespace it is born in, a netlink handle
/// bound to that namespace, and the plan for it (which names the interface).
#[derive(Debug)]
pub struct VethEnd<'a> {
    /// The pod's namespace.
    pub netns: &'a NetNs,
    /// Netlink inside that namespace.
    pub netlink: Arc<dyn Netlink>,
    /// What the end should look like.
    pub plan: Plan,
}

/// A veth pair made by [`kernel_side_up`]: give it back to [`down`] on Close.
///
/// Dropping it without `down` leaves the pair in the kernel (a forwarder that stops
/// must not cut its pods' data plane).
#[derive(Debug)]
#[must_use = "the veth pair stays in the kernel until `down` is called"]
pub struct Created {
    client: Side,
    endpoint: Side,
}

#[derive(Debug)]
struct Side {
    netlink: Arc<dyn Netlink>,
    /// What was applied: `base` with the peer's neighbours, the routing tables its
    /// policies got.
    plan: Plan,
    index: u32,
    /// The plan the caller asked for, without the peer's neighbours.
    base: Plan,
    /// The hardware address the end was born (or adopted) with: what the peer's
    /// neighbour entries name, whatever a refresh does to the addresses.
    mac: Option<[u8; 6]>,
}

impl Side {
    fn new(netlink: Arc<dyn Netlink>, plan: Plan, index: u32, base: Plan) -> Side {
        let mac = base.mac();
        Side {
            netlink,
            plan,
            index,
            base,
            mac,
        }
    }
}

impl Created {
    fn side(&self, side: PodSide) -> &Side {
        match side {
            PodSide::Client => &self.client,
            PodSide::Endpoint => &self.endpoint,
        }
    }

    /// The plan applied to one side's end, with the routing tables its policies got.
    pub fn plan(&self, side: PodSide) -> &Plan {
        &self.side(side).plan
    }

    /// The interface index the side's end was born with.
    pub fn index(&self, side: PodSide) -> u32 {
        self.side(side).index
    }

    /// The netlink handle of one side's namespace. After using it, call
    /// [`Created::release`] so it does not keep a socket open.
    pub fn netlink(&self, side: PodSide) -> &dyn Netlink {
        self.side(side).netlink.as_ref()
    }

    /// Lets both sides' handles close what they hold open between operations (see
    /// [`Netlink::release`]); [`kernel_side_up`] and [`Created::refresh`] do it
    /// themselves.
    pub fn release(&self) {
        self.client.netlink.release();
        self.endpoint.netlink.release();
    }

    /// Brings one side's end from its current plan to `plan` (a refresh): an
    /// unchanged plan does nothing, changed addresses, routes or policy routes are
    /// replaced (a policy keeps its table while its rule is unchanged). On failure the
    /// side is rolled back and keeps its current plan.
    ///
    /// The interface name cannot change on a live pair (that needs a new pair):
    /// [`Error::InvalidInterfaceName`]. A pair that died (its end is gone or is not
    /// the link this pair created) is [`Error::LinkNotFound`].
    ///
    /// Each end keeps a permanent neighbour entry for every address of the other end
    /// (see the module docs); when this side's addresses change, the other side's entries
    /// are brought along.
    pub async fn refresh(&mut self, side: PodSide, plan: Plan) -> Result<()> {
        let result = self.refresh_side(side, plan).await;
        self.release();
        result
    }

    async fn refresh_side(&mut self, side: PodSide, plan: Plan) -> Result<()> {
        let (s, other) = match side {
            PodSide::Client => (&mut self.client, &mut self.endpoint),
            PodSide::Endpoint => (&mut self.endpoint, &mut self.client),
        };
        if plan.ifname() != s.plan.ifname() {
            return Err(Error::InvalidInterfaceName {
                name: plan.ifname().to_string(),
                reason: "differs from the interface of this connection (needs a new pair)",
            });
        }
        plan.check()?;
        ensure_ours(s).await?;
        if let Some(alias) = plan.alias().filter(|a| Some(*a) != s.plan.alias()) {
            s.netlink.set_alias(plan.ifname(), alias).await?;
        }
        let full = with_peer_neighbours(plan.clone(), &other.base, other.mac);
        s.plan = update(Some(&s.plan), &full, s.netlink.as_ref()).await?;
        let moved = s.base.addresses() != plan.addresses();
        s.base = plan;
        if moved && s.mac.is_some() {
            let theirs = with_peer_neighbours(other.base.clone(), &s.base, s.mac);
            other.plan = update(Some(&other.plan), &theirs, other.netlink.as_ref()).await?;
        }
        Ok(())
    }
}

/// Fails with [`Error::LinkNotFound`] unless the side's link still is the one this
/// pair created.
async fn ensure_ours(s: &Side) -> Result<()> {
    match s.netlink.link(s.plan.ifname()).await? {
        Some(l) if l.index == s.index => Ok(()),
        _ => Err(Error::LinkNotFound {
            name: s.plan.ifname().to_string(),
            netns: s.netlink.netns().to_string(),
        }),
    }
}

/// Creates the veth pair of a local connection, each end born in its pod's namespace
/// under the name of its plan, and programs both ends. Opens one netlink socket in
/// each namespace for the work and lets them go when it is done: [`Created`] keeps
/// [`OnDemandNetlink`] handles (a namespace file each), which open a socket again for a
/// refresh or the Close.
pub async fn kernel_side_up(
    ns_client: &NetNs,
    ns_endpoint: &NetNs,
    client: Plan,
    endpoint: Plan,
) -> Result<Created> {
    client.check()?;
    endpoint.check()?;
    let client_nl: Arc<dyn Netlink> = Arc::new(OnDemandNetlink::new(ns_client.try_clone()?));
    let endpoint_nl: Arc<dyn Netlink> = Arc::new(OnDemandNetlink::new(ns_endpoint.try_clone()?));
    let created = veth_up(
        VethEnd {
            netns: ns_client,
            netlink: client_nl,
            plan: client,
        },
        VethEnd {
            netns: ns_endpoint,
            netlink: endpoint_nl,
            plan: endpoint,
        },
    )
    .await?;
    created.release();
    Ok(created)
}

/// [`kernel_side_up`] with the netlink handles given (a [`crate::Recorder`] in tests).
pub async fn veth_up(client: VethEnd<'_>, endpoint: VethEnd<'_>) -> Result<Created> {
    client.plan.check()?;
    endpoint.plan.check()?;
    let (c_name, e_name) = (client.plan.ifname(), endpoint.plan.ifname());
    if client.netns.same_as(endpoint.netns) && c_name == e_name {
        return Err(Error::LinkExists {
            name: c_name.to_string(),
            netns: client.netns.to_string(),
            alias: None,
        });
    }
    if client.netns.same_as(endpoint.netns)
        && client.plan.alias().is_some()
        && client.plan.alias() == endpoint.plan.alias()
    {
        return Err(Error::InvalidAlias {
            alias: client.plan.alias().unwrap_or_default().to_string(),
            reason: "both ends would carry it in one namespace",
        });
    }
    // Look at both pods before deleting anything: a foreign link in one of them fails
    // the request with both pods untouched.
    let mut leftovers = Vec::new();
    for end in [&client, &endpoint] {
        for name in leftovers_of(end).await? {
            leftovers.push((end, name));
        }
    }
    for (end, name) in leftovers {
        info!(
            ifname = %name, netns = %end.netns, alias = end.plan.alias().unwrap_or_default(),
            "deleting a leftover veth of this connection (a forwarder restart)"
        );
        match end.netlink.delete_link(&name).await {
            // Already gone with its peer, deleted a moment ago.
            Ok(()) | Err(Error::LinkNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    // Each end gets a permanent neighbour entry for the other's addresses.
    let bases = [client.plan.clone(), endpoint.plan.clone()];
    let client = VethEnd {
        plan: with_peer_neighbours(client.plan, &bases[1], bases[1].mac()),
        ..client
    };
    let endpoint = VethEnd {
        plan: with_peer_neighbours(endpoint.plan, &bases[0], bases[0].mac()),
        ..endpoint
    };
    let [client_base, endpoint_base] = bases;
    let (c_name, e_name) = (client.plan.ifname(), endpoint.plan.ifname());
    let mtu = match (client.plan.mtu(), endpoint.plan.mtu()) {
        (Some(a), Some(b)) => Some(Mtu::min(a, b)),
        (a, b) => a.or(b),
    };
    client
        .netlink
        .create_veth_pair(c_name, client.netns, e_name, endpoint.netns, mtu)
        .await?;
    match program(&client, &endpoint).await {
        Ok([(client_index, client_plan), (endpoint_index, endpoint_plan)]) => {
            info!(
                client = %c_name, client_netns = %client.netns,
                endpoint = %e_name, endpoint_netns = %endpoint.netns,
                "veth pair up"
            );
            Ok(Created {
                client: Side::new(client.netlink, client_plan, client_index, client_base),
                endpoint: Side::new(
                    endpoint.netlink,
                    endpoint_plan,
                    endpoint_index,
                    endpoint_base,
                ),
            })
        }
        Err(e) => {
            warn!(client = %c_name, endpoint = %e_name, error = %e, "programming the veth pair failed, deleting it");
            let deleted = match client.netlink.delete_link(c_name).await {
                Err(Error::LinkNotFound { .. }) => endpoint.netlink.delete_link(e_name).await,
                other => other,
            };
            if let Err(de) = deleted {
                warn!(client = %c_name, error = %de, "could not delete the veth pair");
            }
            Err(e)
        }
    }
}

/// The links in `end`'s namespace that a new pair must replace: those carrying the
/// end's alias (a leftover of the same connection) and a half-made end of the mesh
/// under the end's name (no alias, group [`MESH_GROUP`]). A link holding the end's
/// name with another alias, or with none outside the mesh's group, is
/// [`Error::LinkExists`].
async fn leftovers_of(end: &VethEnd<'_>) -> Result<Vec<IfName>> {
    let name = end.plan.ifname();
    let taken = |alias: Option<String>| Error::LinkExists {
        name: name.to_string(),
        netns: end.netns.to_string(),
        alias: Some(alias.unwrap_or_default()),
    };
    let Some(alias) = end.plan.alias() else {
        return match end.netlink.link(name).await? {
            Some(l) => Err(taken(l.alias)),
            None => Ok(Vec::new()),
        };
    };
    let mut stale = Vec::new();
    for link in shared_links(&end.netlink).await?.iter() {
        let ours = link.alias.as_deref() == Some(alias);
        if link.name == name.as_str() {
            let half_made = link.alias.is_none() && link.group == MESH_GROUP;
            if !ours && !half_made {
                return Err(taken(link.alias.clone()));
            }
            if half_made {
                warn!(ifname = %name, netns = %end.netns, "a half-made end of the mesh (no alias) holds the name: replacing it");
            }
            stale.push(name.clone());
        } else if ours {
            match IfName::new(link.name.clone()) {
                Ok(n) => stale.push(n),
                Err(e) => {
                    warn!(error = %e, "a link with this connection's alias has a name netlink cannot use")
                }
            }
        }
    }
    Ok(stale)
}

/// Dumps shared by the Requests that look for leftovers at the same time.
static DUMPS: GroupCommit<Arc<dyn Netlink>, Result<Dump>> = GroupCommit::new();

/// The links of one namespace, as one dump listed them.
type Dump = Arc<Vec<Link>>;

/// The links of `nl`'s namespace, from a dump that started after this call: alone when
/// no other dump is in flight, else shared with every Request that queued for the same
/// namespace meanwhile. A storm of Requests into one endpoint pod would otherwise dump
/// the pod's whole (growing) link table once per Request: quadratic work (1,000 links
/// take about 15 ms to dump, 1,000 times). A dump that starts after the call still sees
/// every leftover of a dead forwarder; a pair made by a concurrent Request it may miss
/// is never a leftover of this connection, and a name it took is caught by the
/// kernel's EEXIST at creation.
async fn shared_links(nl: &Arc<dyn Netlink>) -> Result<Dump> {
    if nl.netns_id().is_none() {
        return nl.links().await.map(Arc::new);
    }
    DUMPS.submit(nl.clone(), dump_batch).await
}

/// One dump per namespace of the batch (concurrently), its outcome given to every job
/// of that namespace.
async fn dump_batch(handles: Vec<Arc<dyn Netlink>>) -> Vec<Result<Dump>> {
    let mut first_of: HashMap<Option<(u64, u64)>, usize> = HashMap::new();
    for (i, h) in handles.iter().enumerate() {
        first_of.entry(h.netns_id()).or_insert(i);
    }
    let firsts: Vec<usize> = first_of.values().copied().collect();
    let dumps = futures::future::join_all(firsts.iter().map(|&i| handles[i].links())).await;
    let mut by_ns: HashMap<Option<(u64, u64)>, Result<Dump>> = HashMap::new();
    for (&i, d) in firsts.iter().zip(dumps) {
        by_ns.insert(handles[i].netns_id(), d.map(Arc::new));
    }
    handles
        .iter()
        .map(|h| match by_ns.get(&h.netns_id()) {
            Some(Ok(links)) => Ok(links.clone()),
            Some(Err(e)) => Err(Error::Netlink {
                op: "list links".into(),
                netns: h.netns().to_string(),
                errno: e.errno(),
                message: e.to_string(),
            }),
            None => Err(Error::Unsupported {
                op: "list links",
                netns: h.netns().to_string(),
            }),
        })
        .collect()
}

/// Programs both fresh ends and returns their interface indexes and applied plans:
/// first both aliases (so that the pair is recognisable as early as possible), then
/// each end's plan. When the endpoint's end fails, the client's policy rules are
/// removed again (the caller deletes the pair, which takes everything else).
async fn program(client: &VethEnd<'_>, endpoint: &VethEnd<'_>) -> Result<[(u32, Plan); 2]> {
    let mut indexes = [0u32; 2];
    for (end, index) in [client, endpoint].into_iter().zip(&mut indexes) {
        let name = end.plan.ifname();
        let link = end
            .netlink
            .link(name)
            .await?
            .ok_or_else(|| Error::LinkNotFound {
                name: name.to_string(),
                netns: end.netlink.netns().to_string(),
            })?;
        *index = link.index;
        if let Some(alias) = end.plan.alias() {
            end.netlink.set_alias(name, alias).await?;
        }
    }
    let client_plan = update(None, &client.plan, client.netlink.as_ref()).await?;
    match update(None, &endpoint.plan, endpoint.netlink.as_ref()).await {
        Ok(endpoint_plan) => Ok([(indexes[0], client_plan), (indexes[1], endpoint_plan)]),
        Err(e) => {
            if let Err(re) = remove_policies(&client_plan, client.netlink.as_ref(), false).await {
                warn!(error = %re, "could not remove the client's policy rules");
            }
            Err(e)
        }
    }
}

/// Removes a plan's policy rules and, when `link_ours`, the routes of their tables
/// (which the kernel drops anyway with the link). Rules outlive links, so they are
/// removed even when the link is gone. Every step is tried; the first error is
/// returned.
async fn remove_policies(plan: &Plan, nl: &dyn Netlink, link_ours: bool) -> Result<()> {
    let mut first = None;
    for op in plan.undo() {
        let wanted = match op {
            Op::DelRule(_) => true,
            Op::DelRoute(r) => link_ours && r.table() != MAIN_TABLE,
            _ => false,
        };
        if !wanted {
            continue;
        }
        match run_op(plan.ifname(), &op, nl).await {
            Ok(()) | Err(Error::LinkNotFound { .. }) => {}
            Err(e) => {
                warn!(netns = nl.netns(), %op, error = %e, "removing a policy failed");
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// Deletes the pair (Close). First each side's policy rules and their tables' routes
/// go (rules are not tied to a link: deleting the pair would leave them behind), then
/// the pair: the kernel deletes both ends together and drops their addresses, routes
/// and neighbours. A pair that is already gone (a pod died and took it along) is not
/// an error, and its rules are still removed; a same-named link that is not the one
/// this pair created is left alone.
pub async fn down(created: Created) -> Result<()> {
    let mut first = None;
    for s in [&created.client, &created.endpoint] {
        if s.plan.policies().is_empty() {
            continue;
        }
        let link_ours = ensure_ours(s).await.is_ok();
        if let Err(e) = remove_policies(&s.plan, s.netlink.as_ref(), link_ours).await {
            first.get_or_insert(e);
        }
    }
    let deleted = delete_pair(&created).await;
    match first {
        Some(e) => Err(e),
        None => deleted,
    }
}

/// Deletes the pair through the [reaper](crate::reaper): at once when no other
/// deletion is in flight, else together with the deletions queued meanwhile.
async fn delete_pair(created: &Created) -> Result<()> {
    let end = |s: &Side| reaper::End {
        netlink: s.netlink.clone(),
        name: s.plan.ifname().clone(),
        index: s.index,
    };
    reaper::delete(vec![end(&created.client), end(&created.endpoint)]).await
}

mod adopt;
pub use adopt::kernel_side_adopt;
mod neighbours;
pub use neighbours::with_peer_neighbours;

#[cfg(test)]
mod tests;
