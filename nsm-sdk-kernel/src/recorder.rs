//! [`Recorder`]: an in-memory [`Netlink`] for tests without root.
//!
//! It keeps a small model of links (with their addresses, routes and neighbours) and
//! policy rules per namespace, shared by every view made with [`Recorder::view`], so a
//! veth created through one view shows up in the other namespace and deleting one end
//! deletes both (with the routes through it, in every table), as in the kernel; rules
//! are not tied to links and survive them, as in the kernel. It records each mutating call as a line
//! (`"<label> <call> <interface> <argument>"`) and can make a chosen call fail.
//!
//! State: the model and the call log behind a `std::sync::Mutex`, never held across an
//! await.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use nsm_sdk::async_trait;

use crate::apply::{Link, Netlink, MESH_GROUP};
use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::plan::{IfName, Mtu, Neighbour, Route, Rule, MAIN_TABLE};

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Recorder {
    label: String,
    ns: u64,
    yielding: bool,
    world: Arc<Mutex<World>>,
}

#[derive(Debug, Default)]
struct World {
    links: BTreeMap<(u64, String), FakeLink>,
    /// Rules per namespace, in the order they were added.
    rules: Vec<(u64, Rule)>,
    next_index: u32,
    log: Vec<String>,
    failures: Vec<(String, i32)>,
}

#[derive(Debug, Clone)]
struct FakeLink {
    index: u32,
    mtu: u32,
    mac: Option<[u8; 6]>,
    up: bool,
    alias: Option<String>,
    group: u32,
    peer: Option<(u64, String)>,
    addresses: Vec<IpNet>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
}

impl Recorder {
    /// A fresh, empty model, seen from namespace `ns`; `label` prefixes its log lines.
    pub fn new(label: &str, ns: &NetNs) -> Recorder {
        Recorder {
            label: label.to_string(),
            ns: ns.inode(),
            yielding: false,
            world: Arc::default(),
        }
    }

    /// Makes every call of this view (and of views made from it) yield to the tokio
    /// scheduler once before it runs, so concurrent tasks interleave between calls as
    /// they do on a real socket.
    pub fn yielding(mut self) -> Recorder {
        self.yielding = true;
        self
    }

    async fn pause(&self) {
        if self.yielding {
            tokio::task::yield_now().await;
        }
    }

    /// Another view of the same model, from namespace `ns`. Views of namespaces with
    /// the same inode see the same links.
    pub fn view(&self, label: &str, ns: &NetNs) -> Recorder {
        Recorder {
            label: label.to_string(),
            ns: ns.inode(),
            yielding: self.yielding,
            world: self.world.clone(),
        }
    }

    /// Every mutating call made through any view so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.world().log.clone()
    }

    /// Makes the next mutating call whose log line contains `pattern` fail with a
    /// netlink error carrying `errno` (once).
    pub fn fail_on(&self, pattern: &str, errno: i32) {
        self.world().failures.push((pattern.to_string(), errno));
    }

    fn world(&self) -> MutexGuard<'_, World> {
        // A test that panicked while holding the lock leaves a usable model.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs a mutating call and fails it if a failure was injected for it.
    fn call(&self, w: &mut World, line: String) -> Result<()> {
        let line = format!("{} {line}", self.label);
        w.log.push(line.clone());
        if let Some(i) = w.failures.iter().position(|(p, _)| line.contains(p)) {
            let (_, errno) = w.failures.remove(i);
            return Err(Error::Netlink {
                op: line,
                netns: self.label.clone(),
                errno: Some(errno),
                message: format!("injected errno {errno}"),
            });
        }
        Ok(())
    }

    fn with_link<T>(
        &self,
        name: &IfName,
        line: Option<String>,
        f: impl FnOnce(&mut FakeLink) -> T,
    ) -> Result<T> {
        let mut w = self.world();
        if let Some(line) = line {
            self.call(&mut w, line)?;
        }
        match w.links.get_mut(&(self.ns, name.to_string())) {
            Some(l) => Ok(f(l)),
            None => Err(Error::LinkNotFound {
                name: name.to_string(),
                netns: self.label.clone(),
            }),
        }
    }
}

#[async_trait]
impl Netlink for Recorder {
    fn netns(&self) -> &str {
        &self.label
    }

    fn netns_id(&self) -> Option<(u64, u64)> {
        Some((0, self.ns))
    }

    async fn set_group(&self, index: u32, group: u32) -> Result<()> {
        self.pause().await;
        let mut w = self.world();
        self.call(&mut w, format!("set_group {index} {group}"))?;
        let ns = self.ns;
        match w
            .links
            .iter_mut()
            .find(|((n, _), l)| *n == ns && l.index == index)
        {
            Some((_, l)) => {
                l.group = group;
                Ok(())
            }
            None => Err(Error::LinkNotFound {
                name: format!("index {index}"),
                netns: self.label.clone(),
            }),
        }
    }

    async fn delete_group(&self, group: u32) -> Result<()> {
        self.pause().await;
        let mut w = self.world();
        self.call(&mut w, format!("delete_group {group}"))?;
        let ns = self.ns;
        let doomed: Vec<_> = w
            .links
            .iter()
            .filter(|((n, _), l)| *n == ns && l.group == group)
            .map(|(k, l)| (k.clone(), l.peer.clone()))
            .collect();
        for (key, peer) in doomed {
            w.links.remove(&key);
            if let Some(peer) = peer {
                w.links.remove(&peer);
            }
        }
        Ok(())
    }

    async fn create_veth_pair(
        &self,
        a: &IfName,
        ns_a: &NetNs,
        b: &IfName,
        ns_b: &NetNs,
        mtu: Option<Mtu>,
    ) -> Result<()> {
        self.pause().await;
        let mut w = self.world();
        let mtu_text = mtu.map_or("default".to_string(), |m| m.get().to_string());
        self.call(&mut w, format!("create_veth {a} {b} mtu={mtu_text}"))?;
        let ka = (ns_a.inode(), a.to_string());
        let kb = (ns_b.inode(), b.to_string());
        for (k, name) in [(&ka, a), (&kb, b)] {
            if w.links.contains_key(k) || ka == kb {
                return Err(Error::LinkExists {
                    name: name.to_string(),
                    netns: format!("net:[{}]", k.0),
                    alias: None,
                });
            }
        }
        for (key, peer) in [(ka.clone(), kb.clone()), (kb, ka)] {
            w.next_index += 1;
            let link = FakeLink {
                index: w.next_index,
                mtu: mtu.map_or(1500, Mtu::get),
                mac: None,
                up: false,
                alias: None,
                group: MESH_GROUP,
                peer: Some(peer),
                addresses: Vec::new(),
                routes: Vec::new(),
                neighbours: Vec::new(),
            };
            w.links.insert(key, link);
        }
        Ok(())
    }

    async fn delete_link(&self, name: &IfName) -> Result<()> {
        self.pause().await;
        let mut w = self.world();
        self.call(&mut w, format!("delete_link {name}"))?;
        match w.links.remove(&(self.ns, name.to_string())) {
            Some(link) => {
                if let Some(peer) = link.peer {
                    w.links.remove(&peer);
                }
                Ok(())
            }
            None => Err(Error::LinkNotFound {
                name: name.to_string(),
                netns: self.label.clone(),
            }),
        }
    }

    async fn link(&self, name: &IfName) -> Result<Option<Link>> {
        self.pause().await;
        Ok(self
            .links()
            .await?
            .into_iter()
            .find(|l| l.name == name.as_str()))
    }

    async fn links(&self) -> Result<Vec<Link>> {
        self.pause().await;
        let w = self.world();
        Ok(w.links
            .iter()
            .filter(|((ns, _), _)| *ns == self.ns)
            .map(|((_, name), l)| Link {
                name: name.clone(),
                index: l.index,
                mtu: l.mtu,
                up: l.up,
                kind: Some("veth".into()),
                alias: l.alias.clone(),
                group: l.group,
            })
            .collect())
    }

    async fn set_mtu(&self, name: &IfName, mtu: Mtu) -> Result<()> {
        self.pause().await;
        let line = format!("set_mtu {name} {}", mtu.get());
        self.with_link(name, Some(line), |l| l.mtu = mtu.get())
    }

    async fn set_mac(&self, name: &IfName, mac: [u8; 6]) -> Result<()> {
        self.pause().await;
        let line = format!("set_mac {name} {mac:02x?}");
        self.with_link(name, Some(line), |l| l.mac = Some(mac))
    }

    async fn set_up(&self, name: &IfName) -> Result<()> {
        self.pause().await;
        self.with_link(name, Some(format!("set_up {name}")), |l| l.up = true)
    }

    async fn set_alias(&self, name: &IfName, alias: &str) -> Result<()> {
        self.pause().await;
        let line = format!("set_alias {name} {alias}");
        self.with_link(name, Some(line), |l| l.alias = Some(alias.to_string()))
    }

    async fn add_address(&self, name: &IfName, addr: IpNet) -> Result<()> {
        self.pause().await;
        let line = format!("add_address {name} {addr}");
        self.with_link(name, Some(line), |l| {
            if !l.addresses.contains(&addr) {
                l.addresses.push(addr);
            }
        })
    }

    async fn del_address(&self, name: &IfName, addr: IpNet) -> Result<()> {
        self.pause().await;
        let line = format!("del_address {name} {addr}");
        self.with_link(name, Some(line), |l| l.addresses.retain(|a| *a != addr))
    }

    async fn addresses(&self, name: &IfName) -> Result<Vec<IpNet>> {
        self.pause().await;
        self.with_link(name, None, |l| l.addresses.clone())
    }

    async fn add_route(&self, name: &IfName, route: &Route) -> Result<()> {
        self.pause().await;
        let line = format!("add_route {name} {route}");
        let same = |r: &Route| r.dst() == route.dst() && r.table() == route.table();
        self.with_link(name, Some(line), |l| {
            l.routes.retain(|r| !same(r));
            l.routes.push(*route);
        })
    }

    async fn del_route(&self, name: &IfName, route: &Route) -> Result<()> {
        self.pause().await;
        let line = match route.table() {
            MAIN_TABLE => format!("del_route {name} {}", route.dst()),
            t => format!("del_route {name} {} table {t}", route.dst()),
        };
        let same = |r: &Route| r.dst() == route.dst() && r.table() == route.table();
        self.with_link(name, Some(line), |l| l.routes.retain(|r| !same(r)))
    }

    async fn routes(&self, name: &IfName) -> Result<Vec<Route>> {
        self.pause().await;
        self.with_link(name, None, |l| l.routes.clone())
    }

    async fn add_neighbour(&self, name: &IfName, n: &Neighbour) -> Result<()> {
        self.pause().await;
        let line = format!("add_neighbour {name} {n}");
        self.with_link(name, Some(line), |l| {
            l.neighbours.retain(|x| x.ip != n.ip);
            l.neighbours.push(*n);
        })
    }

    async fn del_neighbour(&self, name: &IfName, ip: IpAddr) -> Result<()> {
        self.pause().await;
        let line = format!("del_neighbour {name} {ip}");
        self.with_link(name, Some(line), |l| l.neighbours.retain(|x| x.ip != ip))
    }

    async fn neighbours(&self, name: &IfName) -> Result<Vec<Neighbour>> {
        self.pause().await;
        self.with_link(name, None, |l| l.neighbours.clone())
    }

    async fn add_rule(&self, rule: &Rule) -> Result<()> {
        self.pause().await;
        let mut w = self.world();
        self.call(&mut w, format!("add_rule {rule}"))?;
        let entry = (self.ns, *rule);
        if !w.rules.contains(&entry) {
            w.rules.push(entry);
        }
        Ok(())
    }

    async fn del_rule(&self, rule: &Rule) -> Result<()> {
        self.pause().await;
        let mut w = self.world();
        self.call(&mut w, format!("del_rule {rule}"))?;
        let entry = (self.ns, *rule);
        w.rules.retain(|r| *r != entry);
        Ok(())
    }

    async fn rules(&self) -> Result<Vec<Rule>> {
        self.pause().await;
        let w = self.world();
        Ok(w.rules
            .iter()
            .filter(|(ns, _)| *ns == self.ns)
            .map(|(_, r)| *r)
            .collect())
    }

    async fn tables_in_use(&self) -> Result<BTreeSet<u32>> {
        self.pause().await;
        let w = self.world();
        let rules = w
            .rules
            .iter()
            .filter(|(ns, _)| *ns == self.ns)
            .map(|(_, r)| r.table());
        let routes = w
            .links
            .iter()
            .filter(|((ns, _), _)| *ns == self.ns)
            .flat_map(|(_, l)| l.routes.iter().map(Route::table));
        Ok(rules.chain(routes).collect())
    }
}
