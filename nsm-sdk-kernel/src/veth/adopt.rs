//! [`kernel_side_adopt`]: a forwarder that replaces a dead one takes over the veth pair
//! its predecessor made for a connection instead of deleting it and making a new one.
//!
//! What it does: when both ends are where the connection's plans put them — the
//! client's end under its name in the client's namespace and the endpoint's under its
//! name in the endpoint's, each carrying its plan's alias ([`veth_alias`](super::veth_alias)) — the
//! pair is the predecessor's pair of this very connection (creation deletes every
//! leftover of a connection before it makes a pair, so there is never more than one).
//! It then brings each end to its plan: addresses the plan no longer has are removed
//! (and, when the addresses changed, routes it no longer has), then the whole plan is
//! applied (every add replaces, so what is already right stays as it is). The data plane keeps working throughout: no deletion, no
//! new device, no carrier loss; and it costs a few netlink round trips instead of a
//! deletion (the kernel's slowest step: it waits for its own synchronisation) and a
//! creation.
//!
//! State: none beyond the [`Created`] it returns.
//!
//! Failure handled: anything that does not match exactly — an end missing, under
//! another alias or none, a plan with policy routes (their rules and tables are not
//! read back, so the predecessor's could be duplicated) — is `Ok(None)`, and the
//! caller makes the pair as usual with [`kernel_side_up`](super::kernel_side_up)
//! (which deletes the leftovers). A failure while bringing an adopted end to its plan
//! is returned; the pair is left in place (the caller's fallback then replaces it).

use std::sync::Arc;

use tracing::info;

use super::{with_peer_neighbours, Created, Side};
use crate::apply::{update, Netlink};
use crate::error::Result;
use crate::netns::NetNs;
use crate::on_demand::OnDemandNetlink;
use crate::plan::Plan;

/// Takes over the veth pair a dead forwarder left for this connection, when both ends
/// are exactly where `client` and `endpoint` (both with aliases) put them; `Ok(None)`
/// when there is no such pair (make one with
/// [`kernel_side_up`](super::kernel_side_up)). See the [module docs](self).
pub async fn kernel_side_adopt(
    ns_client: &NetNs,
    ns_endpoint: &NetNs,
    client: Plan,
    endpoint: Plan,
) -> Result<Option<Created>> {
    client.check()?;
    endpoint.check()?;
    let client_nl: Arc<dyn Netlink> = Arc::new(OnDemandNetlink::new(ns_client.try_clone()?));
    let endpoint_nl: Arc<dyn Netlink> = Arc::new(OnDemandNetlink::new(ns_endpoint.try_clone()?));
    let adopted = adopt_with(client_nl, client, endpoint_nl, endpoint).await;
    if let Ok(Some(created)) = &adopted {
        created.release();
    }
    adopted
}

/// [`kernel_side_adopt`] with the netlink handles given (a [`crate::Recorder`] in
/// tests).
pub(crate) async fn adopt_with(
    client_nl: Arc<dyn Netlink>,
    client: Plan,
    endpoint_nl: Arc<dyn Netlink>,
    endpoint: Plan,
) -> Result<Option<Created>> {
    let mut indexes = [0u32; 2];
    for ((nl, plan), index) in [(&client_nl, &client), (&endpoint_nl, &endpoint)]
        .into_iter()
        .zip(&mut indexes)
    {
        let Some(alias) = plan.alias() else {
            return Ok(None);
        };
        if !plan.policies().is_empty() {
            return Ok(None);
        }
        match nl.link(plan.ifname()).await? {
            Some(l) if l.alias.as_deref() == Some(alias) => *index = l.index,
            _ => {
                nl.release();
                return Ok(None);
            }
        }
    }
    // As at creation, each end with permanent neighbours for the other's addresses;
    // applying the plan sets the end's hardware address to its plan's.
    let client_full = with_peer_neighbours(client.clone(), &endpoint, endpoint.mac());
    let endpoint_full = with_peer_neighbours(endpoint.clone(), &client, client.mac());
    let client_plan = bring_to(client_nl.as_ref(), &client_full).await?;
    let endpoint_plan = bring_to(endpoint_nl.as_ref(), &endpoint_full).await?;
    info!(
        client = %client.ifname(), client_netns = client_nl.netns(),
        endpoint = %endpoint.ifname(), endpoint_netns = endpoint_nl.netns(),
        "veth pair adopted (left by a forwarder before this one)"
    );
    Ok(Some(Created {
        client: Side::new(client_nl, client_plan, indexes[0], client),
        endpoint: Side::new(endpoint_nl, endpoint_plan, indexes[1], endpoint),
    }))
}

/// Removes the addresses of the end that `plan` does not have (and, when its addresses
/// were not the plan's, the routes it does not have either), then applies `plan`
/// (idempotent: every add replaces).
///
/// Routes are read back only when the addresses changed: listing them dumps every
/// route of the namespace, and an endpoint's namespace holds one link per connection,
/// so doing it for every adopted pair would cost the square of their number. With the
/// same addresses the context is the one the predecessor applied (routes and addresses
/// both come from it), and replacing is enough.
async fn bring_to(nl: &dyn Netlink, plan: &Plan) -> Result<Plan> {
    let name = plan.ifname();
    let present = nl.addresses(name).await?;
    let mut changed = present.len() != plan.addresses().len();
    for addr in present {
        if !plan.addresses().contains(&addr) {
            changed = true;
            nl.del_address(name, addr).await?;
        }
    }
    if changed {
        for route in nl.routes(name).await? {
            if !plan.routes().contains(&route) {
                nl.del_route(name, &route).await?;
            }
        }
    }
    update(None, plan, nl).await
}

#[cfg(test)]
mod tests {
    use ipnet::IpNet;

    use super::*;
    use crate::plan::{IfName, Mtu, PodSide, Route};
    use crate::veth::{veth_alias, veth_up, VethEnd};
    use crate::Recorder;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn plan(side: PodSide, name: &str, own: &str, peer: &str) -> Plan {
        Plan::new(IfName::new(name).unwrap())
            .with_mtu(Mtu::new(1450).unwrap())
            .with_address(net(own))
            .with_route(Route::link(net(peer)))
            .with_alias(veth_alias(side, "conn-1"))
    }

    fn client(own: &str) -> Plan {
        plan(PodSide::Client, "nsc-0", own, "172.16.0.1/32")
    }

    fn endpoint() -> Plan {
        plan(PodSide::Endpoint, "nse-0", "172.16.0.1/32", "172.16.0.2/32")
    }

    /// A pair made by a forwarder that then died (its `Created` is gone), in one fake
    /// kernel seen as two pods.
    async fn left_behind() -> (NetNs, Recorder, Recorder) {
        let ns = NetNs::current().unwrap();
        let c = Recorder::new("client", &ns);
        let e = c.view("endpoint", &ns);
        let created = veth_up(
            VethEnd {
                netns: &ns,
                netlink: Arc::new(c.clone()),
                plan: client("172.16.0.2/32"),
            },
            VethEnd {
                netns: &ns,
                netlink: Arc::new(e.clone()),
                plan: endpoint(),
            },
        )
        .await
        .unwrap();
        drop(created);
        (ns, c, e)
    }

    fn calls_after(r: &Recorder, n: usize) -> Vec<String> {
        r.calls().into_iter().skip(n).collect()
    }

    #[tokio::test]
    async fn a_pair_left_for_the_same_connection_is_taken_over_in_place() {
        let (_ns, c, e) = left_behind().await;
        let before = c.calls().len();
        let index = c
            .link(&IfName::new("nsc-0").unwrap())
            .await
            .unwrap()
            .unwrap()
            .index;
        // The client's address changed meanwhile: the old one goes, the new one comes.
        let created = adopt_with(
            Arc::new(c.clone()),
            client("172.16.0.6/32"),
            Arc::new(e.clone()),
            endpoint(),
        )
        .await
        .unwrap()
        .expect("adopted");
        let calls = calls_after(&c, before);
        assert!(
            calls
                .iter()
                .all(|l| !l.contains("create_veth") && !l.contains("delete_link")),
            "{calls:#?}"
        );
        assert!(
            calls.contains(&"client del_address nsc-0 172.16.0.2/32".to_string()),
            "{calls:#?}"
        );
        assert!(
            calls.contains(&"client add_address nsc-0 172.16.0.6/32".to_string()),
            "{calls:#?}"
        );
        assert_eq!(created.index(PodSide::Client), index);
        assert_eq!(
            c.addresses(&IfName::new("nsc-0").unwrap()).await.unwrap(),
            [net("172.16.0.6/32")]
        );
        // The adopted pair is this forwarder's now: Close deletes it.
        crate::down(created).await.unwrap();
        assert!(c
            .links()
            .await
            .unwrap()
            .iter()
            .all(|l| !l.name.starts_with("ns")));
    }

    #[tokio::test]
    async fn anything_but_both_ends_with_their_aliases_is_not_adopted() {
        let (_ns, c, e) = left_behind().await;
        let other = |p: Plan| p.with_alias(veth_alias(PodSide::Endpoint, "conn-2"));
        let no_alias = Plan::new(IfName::new("nse-0").unwrap());
        for ep in [other(endpoint()), no_alias] {
            let r = adopt_with(
                Arc::new(c.clone()),
                client("172.16.0.2/32"),
                Arc::new(e.clone()),
                ep,
            )
            .await
            .unwrap();
            assert!(r.is_none());
        }
        // An end that is missing: nothing to adopt either, and nothing was changed.
        let before = c.calls().len();
        let missing = plan(PodSide::Client, "nsc-9", "172.16.0.2/32", "172.16.0.1/32");
        let r = adopt_with(
            Arc::new(c.clone()),
            missing,
            Arc::new(e.clone()),
            endpoint(),
        )
        .await
        .unwrap();
        assert!(r.is_none());
        assert!(
            calls_after(&c, before)
                .iter()
                .all(|l| !l.contains("add_") && !l.contains("del")),
            "{:#?}",
            c.calls()
        );
    }
}
