//! Two clusters of nodes joined only by a public link, in a [`Lab`]: the network of
//! the interdomain kernel tests, bench and demo (docs/INTERDOMAIN.md).
//!
//! Each cluster has a gateway namespace (`<cluster>-gw`) and `n` node namespaces
//! (`<cluster>-node<i>`). Node `i` of cluster `c` (both from 0) holds the internal
//! address `10.<c+1>.<i+1>.2/24` on `eth0`, a veth to the gateway (`10.<c+1>.<i+1>.1`,
//! its default route). The two gateways are joined by the public link `pub0`
//! (`198.51.100.<c+1>/24`), and each gateway holds one public address per node of its
//! cluster (`198.51.100.<10(c+1)+i+1>`), translated 1:1 to the node's internal address
//! (nftables: DNAT of what arrives for it, SNAT of what the node sends out of `pub0`),
//! as a cloud's external addresses are. Neither gateway routes the other cluster's
//! internal network: an internal address of one cluster is unreachable from the other,
//! only the public ones are.

use crate::lab::{Lab, LabResult};

/// One node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its namespace in the lab (`<cluster>-node<i>`).
    pub ns: String,
    /// Its address inside its cluster (on `eth0`).
    pub internal: String,
    /// Its address as the other cluster reaches it (on the gateway, translated).
    pub public: String,
}

/// One cluster of [`two_clusters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Its name (the prefix of its namespaces).
    pub name: String,
    /// Its gateway's namespace (`<cluster>-gw`).
    pub gateway: String,
    /// Its nodes.
    pub nodes: Vec<ClusterNode>,
}

impl Cluster {
    /// The nsmgr-proxy's address map (`NSM_ADDRESS_MAP`): `internal=public` of each
    /// node, comma-separated.
    pub fn address_map(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}={}", n.internal, n.public))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Makes two clusters named `names` of `nodes` nodes each (at most 9) in `lab`; see
/// the [module docs](self).
pub fn two_clusters(lab: &mut Lab, names: [&str; 2], nodes: usize) -> LabResult<[Cluster; 2]> {
    assert!((1..=9).contains(&nodes), "1 to 9 nodes per cluster");
    let mut out = Vec::new();
    for (c, name) in names.iter().enumerate() {
        let gateway = format!("{name}-gw");
        lab.add(&gateway)?;
        lab.sysctl(&gateway, "net.ipv4.ip_forward=1")?;
        let mut cluster = Cluster {
            name: name.to_string(),
            gateway: gateway.clone(),
            nodes: Vec::new(),
        };
        for i in 0..nodes {
            let ns = format!("{name}-node{i}");
            lab.add(&ns)?;
            let net = format!("10.{}.{}", c + 1, i + 1);
            lab.link(
                (&ns, "eth0", &format!("{net}.2/24")),
                (&gateway, &format!("n{i}"), &format!("{net}.1/24")),
            )?;
            lab.ip(
                &ns,
                &["route", "add", "default", "via", &format!("{net}.1")],
            )?;
            cluster.nodes.push(ClusterNode {
                ns,
                internal: format!("{net}.2"),
                public: format!("198.51.100.{}", 10 * (c + 1) + i + 1),
            });
        }
        out.push(cluster);
    }
    let (a, b) = (&out[0].gateway, &out[1].gateway);
    lab.link(
        (a, "pub0", "198.51.100.1/24"),
        (b, "pub0", "198.51.100.2/24"),
    )?;
    for cluster in &out {
        let gw = cluster.gateway.as_str();
        let nft = |args: &[&str]| lab.exec(gw, "nft", args).map(|_| ());
        nft(&["add", "table", "ip", "nat"])?;
        nft(&[
            "add",
            "chain",
            "ip",
            "nat",
            "pre",
            "{",
            "type",
            "nat",
            "hook",
            "prerouting",
            "priority",
            "-100",
            ";",
            "}",
        ])?;
        nft(&[
            "add",
            "chain",
            "ip",
            "nat",
            "post",
            "{",
            "type",
            "nat",
            "hook",
            "postrouting",
            "priority",
            "100",
            ";",
            "}",
        ])?;
        for node in &cluster.nodes {
            lab.ip(
                gw,
                &["addr", "add", &format!("{}/32", node.public), "dev", "pub0"],
            )?;
            nft(&[
                "add",
                "rule",
                "ip",
                "nat",
                "pre",
                "ip",
                "daddr",
                &node.public,
                "dnat",
                "to",
                &node.internal,
            ])?;
            nft(&[
                "add",
                "rule",
                "ip",
                "nat",
                "post",
                "oifname",
                "pub0",
                "ip",
                "saddr",
                &node.internal,
                "snat",
                "to",
                &node.public,
            ])?;
        }
    }
    let [a, b]: [Cluster; 2] = out.try_into().expect("two clusters");
    Ok([a, b])
}
