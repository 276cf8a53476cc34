//! A netlink handle that opens its socket when an operation needs it and lets it go
//! when told ([`Netlink::release`]): what a forwarder keeps per connection between
//! Request, refresh and Close.
//!
//! An [`RtNetlink`] holds a socket, a task and the socket's buffers (about 80 KB); a
//! KERNEL connection used to keep one per pod for its whole life, so a forwarder with
//! 1,000 connections held 2,000 sockets and 170 MB. [`OnDemandNetlink`] keeps only the
//! namespace handle (one file descriptor) and opens a socket for each batch of
//! operations (a Request's plan, a refresh that changes something, a Close); the
//! owner calls [`Netlink::release`] when the batch is done. Opening costs about
//! 0.2 ms, once per batch.
//!
//! State: the namespace, and the open handle between the first operation of a batch and
//! the release. Failure handled: a socket that cannot be opened is the operation's
//! error, like [`RtNetlink::open`]'s; the next operation tries again.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use nsm_sdk::async_trait;

use crate::apply::{Link, Netlink};
use crate::error::Result;
use crate::netns::NetNs;
use crate::plan::{IfName, Mtu, Neighbour, Route, Rule};
use crate::rtnl::RtNetlink;

/// See the [module docs](self).
#[derive(Debug)]
pub struct OnDemandNetlink {
    ns: NetNs,
    name: String,
    open: std::sync::Mutex<Option<Arc<RtNetlink>>>,
}

impl OnDemandNetlink {
    /// A handle for `ns` that opens nothing yet.
    pub fn new(ns: NetNs) -> Self {
        OnDemandNetlink {
            name: ns.to_string(),
            ns,
            open: std::sync::Mutex::new(None),
        }
    }

    /// Whether a socket is open now.
    pub fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<RtNetlink>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open socket, opened now if there is none.
    async fn get(&self) -> Result<Arc<RtNetlink>> {
        if let Some(nl) = self.lock().clone() {
            return Ok(nl);
        }
        let nl = Arc::new(RtNetlink::open(&self.ns).await?);
        let mut open = self.lock();
        // Another operation of the same batch may have opened one meanwhile: keep one.
        Ok(open.get_or_insert(nl).clone())
    }
}

#[async_trait]
impl Netlink for OnDemandNetlink {
    fn netns(&self) -> &str {
        &self.name
    }

    fn release(&self) {
        self.lock().take();
    }

    fn netns_id(&self) -> Option<(u64, u64)> {
        Some((self.ns.dev(), self.ns.inode()))
    }

    async fn set_group(&self, index: u32, group: u32) -> Result<()> {
        self.get().await?.set_group(index, group).await
    }

    async fn delete_group(&self, group: u32) -> Result<()> {
        self.get().await?.delete_group(group).await
    }

    async fn create_veth_pair(
        &self,
        a: &IfName,
        ns_a: &NetNs,
        b: &IfName,
        ns_b: &NetNs,
        mtu: Option<Mtu>,
    ) -> Result<()> {
        self.get()
            .await?
            .create_veth_pair(a, ns_a, b, ns_b, mtu)
            .await
    }

    async fn delete_link(&self, name: &IfName) -> Result<()> {
        self.get().await?.delete_link(name).await
    }

    async fn link(&self, name: &IfName) -> Result<Option<Link>> {
        self.get().await?.link(name).await
    }

    async fn links(&self) -> Result<Vec<Link>> {
        self.get().await?.links().await
    }

    async fn set_mtu(&self, name: &IfName, mtu: Mtu) -> Result<()> {
        self.get().await?.set_mtu(name, mtu).await
    }

    async fn set_mac(&self, name: &IfName, mac: [u8; 6]) -> Result<()> {
        self.get().await?.set_mac(name, mac).await
    }

    async fn set_up(&self, name: &IfName) -> Result<()> {
        self.get().await?.set_up(name).await
    }

    async fn set_alias(&self, name: &IfName, alias: &str) -> Result<()> {
        self.get().await?.set_alias(name, alias).await
    }

    async fn add_address(&self, name: &IfName, addr: IpNet) -> Result<()> {
        self.get().await?.add_address(name, addr).await
    }

    async fn del_address(&self, name: &IfName, addr: IpNet) -> Result<()> {
        self.get().await?.del_address(name, addr).await
    }

    async fn addresses(&self, name: &IfName) -> Result<Vec<IpNet>> {
        self.get().await?.addresses(name).await
    }

    async fn add_route(&self, name: &IfName, route: &Route) -> Result<()> {
        self.get().await?.add_route(name, route).await
    }

    async fn del_route(&self, name: &IfName, route: &Route) -> Result<()> {
        self.get().await?.del_route(name, route).await
    }

    async fn routes(&self, name: &IfName) -> Result<Vec<Route>> {
        self.get().await?.routes(name).await
    }

    async fn add_rule(&self, rule: &Rule) -> Result<()> {
        self.get().await?.add_rule(rule).await
    }

    async fn del_rule(&self, rule: &Rule) -> Result<()> {
        self.get().await?.del_rule(rule).await
    }

    async fn rules(&self) -> Result<Vec<Rule>> {
        self.get().await?.rules().await
    }

    async fn tables_in_use(&self) -> Result<BTreeSet<u32>> {
        self.get().await?.tables_in_use().await
    }

    async fn add_neighbour(&self, name: &IfName, n: &Neighbour) -> Result<()> {
        self.get().await?.add_neighbour(name, n).await
    }

    async fn del_neighbour(&self, name: &IfName, ip: IpAddr) -> Result<()> {
        self.get().await?.del_neighbour(name, ip).await
    }

    async fn neighbours(&self, name: &IfName) -> Result<Vec<Neighbour>> {
        self.get().await?.neighbours(name).await
    }
}
