//! Permanent neighbour entries between the two ends of a point-to-point link: a veth
//! pair, or the two VXLAN devices of a remote connection (nsm-sdk-vxlan, which learns
//! the other end's hardware address from the mechanism).
//!
//! Why: the ARP and neighbour-discovery caches are one table each for the whole node,
//! every namespace's learnt entries counted against `gc_thresh3` (1,024 by default).
//! A KERNEL connection learns two (one in each pod), so past about 500 connections on
//! a node new entries are refused and connections stay silent (docs/KERNEL.md §8).
//! Permanent entries are not counted against the thresholds, and a pair's forwarder
//! knows both ends: each pod gets an entry for every address of the other end, with
//! the other end's hardware address, so no ARP or neighbour solicitation is needed.
//!
//! The hardware address of an end is the one its plan set when the end was made or
//! adopted ([`Plan::mac`]: derived from its first address by
//! [`stable_mac`](crate::plan::stable_mac)); a refresh never changes a live link's
//! address, so after a refresh that changes the first address the entries keep
//! naming the address the link really has. That is why the pair keeps, per side, the
//! hardware address of its birth and the plan it was asked for without the peer's
//! entries: a refresh of one side recomputes both sides' entries from those.
//!
//! A neighbour the connection's context already names for an address (`ip_neighbors`)
//! wins over the derived one; an end without hardware address in its plan (a bridged
//! end, a plan without addresses) gives its peer no entries.

use crate::plan::{Neighbour, Plan};

/// `plan` with a permanent neighbour for each address of `peer` (the other end's
/// plan) on `peer_mac`, the other end's hardware address, unless `plan` already has a
/// neighbour for that address. Without `peer_mac`, `plan` as it is.
pub fn with_peer_neighbours(plan: Plan, peer: &Plan, peer_mac: Option<[u8; 6]>) -> Plan {
    let Some(mac) = peer_mac else {
        return plan;
    };
    let mut plan = plan;
    for a in peer.addresses() {
        let ip = a.addr();
        if plan.neighbours().iter().all(|n| n.ip != ip) {
            plan = plan.with_neighbour(Neighbour { ip, mac });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::plan::{stable_mac, IfName};

    fn plan(name: &str, addrs: &[&str]) -> Plan {
        let mut p = Plan::new(IfName::new(name).unwrap());
        for a in addrs {
            p = p.with_address(a.parse().unwrap());
        }
        if let Some(first) = p.addresses().first().map(|a| a.addr()) {
            p = p.with_mac(stable_mac(first));
        }
        p
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_address_of_the_peer_gets_an_entry_on_the_peers_hardware_address() {
        let client = plan("nsc", &["172.16.0.2/32", "fd00::2/128"]);
        let endpoint = plan("nse", &["172.16.0.1/24", "fd00::1/128"]);
        let mac = endpoint.mac();
        let got = with_peer_neighbours(client, &endpoint, mac);
        let want: Vec<Neighbour> = ["172.16.0.1", "fd00::1"]
            .into_iter()
            .map(|a| Neighbour {
                ip: ip(a),
                mac: mac.unwrap(),
            })
            .collect();
        assert_eq!(got.neighbours(), want.as_slice());
    }

    #[test]
    fn the_contexts_own_neighbour_for_an_address_wins() {
        let given = Neighbour {
            ip: ip("172.16.0.1"),
            mac: [2, 9, 9, 9, 9, 9],
        };
        let client = plan("nsc", &["172.16.0.2/32"]).with_neighbour(given);
        let endpoint = plan("nse", &["172.16.0.1/32"]);
        let got = with_peer_neighbours(client, &endpoint, endpoint.mac());
        assert_eq!(got.neighbours(), [given]);
    }

    #[test]
    fn the_hardware_address_given_is_used_not_the_one_the_peers_new_plan_would_derive() {
        // The endpoint's first address changed on a refresh; its link keeps the MAC of
        // its birth.
        let born = plan("nse", &["172.16.0.1/32"]).mac().unwrap();
        let endpoint = plan("nse", &["172.16.9.1/32"]);
        assert_ne!(endpoint.mac(), Some(born));
        let got = with_peer_neighbours(plan("nsc", &["172.16.9.2/32"]), &endpoint, Some(born));
        assert_eq!(
            got.neighbours(),
            [Neighbour {
                ip: ip("172.16.9.1"),
                mac: born
            }]
        );
    }

    #[test]
    fn a_peer_without_hardware_address_or_addresses_gives_nothing() {
        let client = plan("nsc", &["172.16.0.2/32"]);
        let bridged = plan("nse", &[]);
        assert!(
            with_peer_neighbours(client.clone(), &bridged, bridged.mac())
                .neighbours()
                .is_empty()
        );
        let endpoint = plan("nse", &["172.16.0.1/32"]);
        assert!(with_peer_neighbours(client, &endpoint, None)
            .neighbours()
            .is_empty());
    }
}
