//! [`VniAllocator`]: the server side's VNI choice, unique per node.
//!
//! What it does: hands out 24-bit VXLAN network identifiers keyed by connection id.
//! The rule kept for wire compatibility with NSM (sdk `mechanisms/vxlan/vni`, docs/KERNEL.md
//! 3.2): the **server** side (the forwarder on the endpoint's node) picks the VNI, and
//! it is **even** when `src_ip ≤ dst_ip` (byte-wise comparison of the addresses, the
//! `orig_*` ones when NAT is in play) and **odd** otherwise ([`parity_for`]), so the
//! two forwarders of a node pair never pick the same VNI for connections in opposite
//! directions. Unlike NSM's map (keyed by `(src_ip, vni)`), VNIs are unique per
//! **allocator**, i.e. per node: the kernel refuses two VXLAN devices with one VNI on
//! one port in a namespace whatever their remote. 0 is never handed out (NSM's
//! helpers read 0 as "unset").
//!
//! State: connection id → VNI, plus the set of VNIs in use (by connections, or
//! reserved after a clash with a device this allocator does not know about). The same
//! id gets the same VNI back on a refresh; [`VniAllocator::free`] releases it on Close.
//! The state sits behind a `std` mutex held only inside these synchronous methods,
//! never across an `.await`.
//!
//! Failure handled: a VNI the kernel refused ([`crate::Error::VniClash`]) is marked
//! taken for good by [`VniAllocator::reserve_after_clash`], which gives the connection
//! a fresh VNI of the same parity; when a parity runs out, [`crate::Error::VniExhausted`].

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use rand::Rng;
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// A VXLAN network identifier: 24 bits, never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vni(u32);

impl Vni {
    /// The largest VNI (2^24 - 1).
    pub const MAX: u32 = (1 << 24) - 1;

    /// A VNI from a number: [`Error::InvalidVni`] for 0 or more than 24 bits.
    pub fn new(value: u32) -> Result<Vni> {
        match value {
            0 => Err(Error::InvalidVni {
                value: 0,
                reason: "0 means unset",
            }),
            v if v > Self::MAX => Err(Error::InvalidVni {
                value: v.into(),
                reason: "wider than 24 bits",
            }),
            v => Ok(Vni(v)),
        }
    }

    /// Parses the mechanism parameter `vni` (a decimal string).
    pub fn parse(s: &str) -> Result<Vni> {
        let value: u64 = s.trim().parse().map_err(|_| Error::InvalidVni {
            value: 0,
            reason: "not a decimal number",
        })?;
        let v = u32::try_from(value).map_err(|_| Error::InvalidVni {
            value,
            reason: "wider than 24 bits",
        })?;
        Vni::new(v)
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Whether it is even or odd.
    pub fn parity(self) -> Parity {
        if self.0.is_multiple_of(2) {
            Parity::Even
        } else {
            Parity::Odd
        }
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which VNIs a server may pick for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Parity {
    /// `src_ip ≤ dst_ip`.
    Even,
    /// `src_ip > dst_ip`.
    Odd,
}

/// NSM's parity rule: [`Parity::Even`] when `src ≤ dst` comparing the addresses byte
/// by byte (`src_ip`/`dst_ip`, or `orig_src_ip`/`orig_dst_ip` when present), else
/// [`Parity::Odd`]. An IPv4 address compares by its 4 bytes, an IPv6 one by its 16
/// (Go's `bytes.Compare` on `net.IP.To4()`/`To16()`; mixed families compare the
/// shorter form first, as a byte slice prefix does).
pub fn parity_for(src: IpAddr, dst: IpAddr) -> Parity {
    if ip_bytes(&src).as_slice() <= ip_bytes(&dst).as_slice() {
        Parity::Even
    } else {
        Parity::Odd
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
    }
}

/// Random draws before falling back to a scan for a free VNI.
const RANDOM_TRIES: usize = 64;

#[derive(Debug)]
struct State {
    /// The largest VNI handed out: [`Vni::MAX`] (smaller only in tests).
    max: u32,
    by_conn: HashMap<String, Vni>,
    /// VNI → holder: a connection id, or `None` for one reserved after a clash.
    taken: HashMap<Vni, Option<String>>,
}

impl Default for State {
    fn default() -> State {
        State {
            max: Vni::MAX,
            by_conn: HashMap::new(),
            taken: HashMap::new(),
        }
    }
}

impl State {
    fn pick(&self, parity: Parity) -> Result<Vni> {
        let mut rng = rand::rng();
        let candidate = |n: u32| {
            // n in 1..=MAX; force the parity, stay in range and away from 0.
            let v = match (parity, n % 2) {
                (Parity::Even, 1) => n - 1,
                (Parity::Odd, 0) => n - 1,
                _ => n,
            };
            match v {
                0 => 2,
                v => v,
            }
        };
        for _ in 0..RANDOM_TRIES {
            let v = Vni(candidate(rng.random_range(1..=self.max)));
            if !self.taken.contains_key(&v) {
                return Ok(v);
            }
        }
        // Crowded: walk from a random start to the next free one.
        let start = candidate(rng.random_range(1..=self.max));
        let mut v = start;
        loop {
            let vni = Vni(v);
            if !self.taken.contains_key(&vni) {
                return Ok(vni);
            }
            v = if v + 2 > self.max {
                candidate(1)
            } else {
                v + 2
            };
            if v == start {
                return Err(Error::VniExhausted { parity });
            }
        }
    }

    fn assign(&mut self, connection: &str, vni: Vni) {
        self.by_conn.insert(connection.to_string(), vni);
        self.taken.insert(vni, Some(connection.to_string()));
    }

    fn release(&mut self, connection: &str) -> Option<Vni> {
        let vni = self.by_conn.remove(connection)?;
        if self
            .taken
            .get(&vni)
            .is_some_and(|h| h.as_deref() == Some(connection))
        {
            self.taken.remove(&vni);
        }
        Some(vni)
    }
}

/// See the [module docs](self). Share one per node (e.g. in an `Arc`).
#[derive(Debug, Default)]
pub struct VniAllocator {
    state: Mutex<State>,
}

impl VniAllocator {
    /// An allocator with nothing in use.
    pub fn new() -> VniAllocator {
        VniAllocator::default()
    }

    /// An allocator that hands out only VNIs `1..=max` (at least 2, so both parities
    /// exist): the VNIs above are left to other VXLAN users of the node. A small range
    /// also makes clashes reproducible in tests.
    pub fn with_max(max: u32) -> Result<VniAllocator> {
        if !(2..=Vni::MAX).contains(&max) {
            return Err(Error::InvalidVni {
                value: max.into(),
                reason: "the largest VNI of a range must be in 2..=16777215",
            });
        }
        Ok(VniAllocator {
            state: Mutex::new(State {
                max,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every method updates
        // both maps before returning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VNI of `connection`: the one it already has (a refresh) if its parity is
    /// `parity`, otherwise a new free one of that parity.
    pub fn allocate(&self, connection: &str, parity: Parity) -> Result<Vni> {
        let mut s = self.lock();
        if let Some(&vni) = s.by_conn.get(connection) {
            if vni.parity() == parity {
                return Ok(vni);
            }
            warn!(connection, %vni, ?parity, "the connection's parity changed, picking a new VNI");
            s.release(connection);
        }
        let vni = s.pick(parity)?;
        s.assign(connection, vni);
        debug!(connection, %vni, "VNI allocated");
        Ok(vni)
    }

    /// Registers a VNI the connection already carries (a refresh or heal after a
    /// forwarder restart): fine if it is free or already this connection's,
    /// [`Error::VniTaken`] if another connection holds it or it was reserved after a
    /// clash. A different VNI the connection held before is released.
    pub fn adopt(&self, connection: &str, vni: Vni) -> Result<()> {
        let mut s = self.lock();
        match s.taken.get(&vni) {
            Some(Some(holder)) if holder == connection => return Ok(()),
            Some(holder) => {
                return Err(Error::VniTaken {
                    vni: vni.get(),
                    holder: holder.clone().unwrap_or_default(),
                })
            }
            None => {}
        }
        s.release(connection);
        s.assign(connection, vni);
        Ok(())
    }

    /// The VNI `connection` holds, if any.
    pub fn get(&self, connection: &str) -> Option<Vni> {
        self.lock().by_conn.get(connection).copied()
    }

    /// Whether `vni` is in use (by a connection or reserved after a clash).
    pub fn is_taken(&self, vni: Vni) -> bool {
        self.lock().taken.contains_key(&vni)
    }

    /// How many VNIs are in use, reserved ones included.
    pub fn len(&self) -> usize {
        self.lock().taken.len()
    }

    /// Whether no VNI is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Releases the VNI of `connection` (Close, or a failed first request).
    pub fn free(&self, connection: &str) -> Option<Vni> {
        let vni = self.lock().release(connection);
        if let Some(vni) = vni {
            debug!(connection, %vni, "VNI freed");
        }
        vni
    }

    /// Marks `vni` taken for good, with no holder: a device this allocator does not know
    /// about has it (the kernel refused it, [`Error::VniClash`]), so no connection gets
    /// it again from this allocator. A connection that held it loses it.
    pub fn reserve(&self, vni: Vni) {
        let mut s = self.lock();
        if let Some(Some(holder)) = s.taken.get(&vni).cloned() {
            s.by_conn.remove(&holder);
        }
        s.taken.insert(vni, None);
        warn!(%vni, "VNI in use by a device not ours, reserved");
    }

    /// The kernel refused `vni` ([`Error::VniClash`]: a device this allocator does not
    /// know about holds it). Marks it taken for good — no connection will get it again
    /// from this allocator — and gives `connection` a new VNI of the same parity, which
    /// is returned. If `connection` held another VNI than `vni`, that one is kept.
    pub fn reserve_after_clash(&self, connection: &str, vni: Vni) -> Result<Vni> {
        let mut s = self.lock();
        let held = s.by_conn.get(connection).copied();
        if held == Some(vni) {
            s.by_conn.remove(connection);
        }
        s.taken.insert(vni, None);
        if let Some(other) = s.by_conn.get(connection) {
            return Ok(*other);
        }
        let new = s.pick(vni.parity())?;
        s.assign(connection, new);
        warn!(connection, clashed = %vni, %new, "VNI in use by a device not ours, moved on");
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::Ipv4Addr;

    #[test]
    fn ten_thousand_allocations_are_unique_never_zero_and_of_the_asked_parity() {
        let a = VniAllocator::new();
        let mut seen = HashSet::new();
        for i in 0..10_000 {
            let parity = if i % 3 == 0 {
                Parity::Odd
            } else {
                Parity::Even
            };
            let vni = a.allocate(&format!("conn-{i}"), parity).unwrap();
            assert_ne!(vni.get(), 0);
            assert!(vni.get() <= Vni::MAX);
            assert_eq!(vni.parity(), parity, "{vni}");
            assert!(seen.insert(vni), "{vni} handed out twice");
        }
        assert_eq!(a.len(), 10_000);
    }

    #[test]
    fn parity_is_even_when_src_is_not_above_dst_byte_wise() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(parity_for(ip("192.0.2.1"), ip("192.0.2.2")), Parity::Even);
        assert_eq!(parity_for(ip("192.0.2.2"), ip("192.0.2.1")), Parity::Odd);
        assert_eq!(parity_for(ip("192.0.2.1"), ip("192.0.2.1")), Parity::Even);
        // Byte-wise, not textual: 10.0.0.9 < 10.0.0.10.
        assert_eq!(parity_for(ip("10.0.0.9"), ip("10.0.0.10")), Parity::Even);
        assert_eq!(
            parity_for(ip("2001:db8::2"), ip("2001:db8::1")),
            Parity::Odd
        );
        // An IPv4-mapped IPv6 address compares as its IPv4 form (Go's To4()).
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped());
        assert_eq!(parity_for(mapped, ip("192.0.2.10")), Parity::Even);
        assert_eq!(parity_for(ip("192.0.2.10"), mapped), Parity::Odd);
    }

    #[test]
    fn the_two_directions_of_a_node_pair_never_share_a_vni() {
        let (n1, n2) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let (on_n2, on_n1) = (VniAllocator::new(), VniAllocator::new());
        for i in 0..500 {
            // n1 -> n2 picked by n2's forwarder, n2 -> n1 by n1's.
            let a = on_n2
                .allocate(&format!("a{i}"), parity_for(n1, n2))
                .unwrap();
            let b = on_n1
                .allocate(&format!("b{i}"), parity_for(n2, n1))
                .unwrap();
            assert_ne!(a.parity(), b.parity());
        }
    }

    #[test]
    fn a_refresh_of_the_same_connection_gets_the_same_vni() {
        let a = VniAllocator::new();
        let first = a.allocate("c1", Parity::Even).unwrap();
        for _ in 0..10 {
            assert_eq!(a.allocate("c1", Parity::Even).unwrap(), first);
        }
        assert_eq!(a.get("c1"), Some(first));
        assert_eq!(a.len(), 1);
        // A parity change (addresses swapped) moves it to a VNI of the new parity.
        let odd = a.allocate("c1", Parity::Odd).unwrap();
        assert_eq!(odd.parity(), Parity::Odd);
        assert!(!a.is_taken(first));
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn close_frees_the_vni_for_reuse() {
        let a = VniAllocator::new();
        let vni = a.allocate("c1", Parity::Odd).unwrap();
        assert_eq!(a.free("c1"), Some(vni));
        assert_eq!(a.free("c1"), None);
        assert!(!a.is_taken(vni) && a.is_empty());
        a.adopt("c2", vni).unwrap();
        assert_eq!(a.get("c2"), Some(vni));
    }

    #[test]
    fn adopting_a_vni_held_by_another_connection_is_refused() {
        let a = VniAllocator::new();
        let vni = a.allocate("c1", Parity::Even).unwrap();
        assert!(matches!(
            a.adopt("c2", vni),
            Err(Error::VniTaken { holder, .. }) if holder == "c1"
        ));
        a.adopt("c1", vni).unwrap();
        assert_eq!(a.get("c2"), None);
        let other = Vni::new(if vni.get() == 2 { 4 } else { 2 }).unwrap();
        a.adopt("c1", other).unwrap();
        assert!(!a.is_taken(vni), "the old VNI is released");
    }

    #[test]
    fn a_clash_reserves_the_vni_for_good_and_moves_the_connection() {
        let a = VniAllocator::new();
        let clashed = a.allocate("c1", Parity::Even).unwrap();
        let new = a.reserve_after_clash("c1", clashed).unwrap();
        assert_ne!(new, clashed);
        assert_eq!(new.parity(), Parity::Even);
        assert_eq!(a.get("c1"), Some(new));
        assert!(a.is_taken(clashed));
        // Freeing the connection releases only its own VNI, not the reserved one.
        a.free("c1");
        assert!(a.is_taken(clashed) && !a.is_taken(new));
        assert!(matches!(
            a.adopt("c2", clashed),
            Err(Error::VniTaken { holder, .. }) if holder.is_empty()
        ));
    }

    #[test]
    fn a_reserved_vni_is_never_handed_out_and_its_holder_loses_it() {
        let a = VniAllocator::with_max(5).unwrap();
        let held = a.allocate("c1", Parity::Even).unwrap();
        a.reserve(held);
        assert_eq!(a.get("c1"), None);
        assert!(a.is_taken(held));
        // Evens of 1..=5 are 2 and 4: the other one, every time, then none.
        let other = a.allocate("c2", Parity::Even).unwrap();
        assert_ne!(other, held);
        assert!(matches!(
            a.allocate("c3", Parity::Even),
            Err(Error::VniExhausted { .. })
        ));
        a.free("c1");
        assert!(
            a.is_taken(held),
            "freeing the old holder does not release it"
        );
    }

    #[test]
    fn a_range_stays_below_its_max_and_must_hold_both_parities() {
        let a = VniAllocator::with_max(9).unwrap();
        for i in 0..4 {
            let v = a.allocate(&format!("o{i}"), Parity::Odd).unwrap();
            assert!(v.get() <= 9 && v.get() % 2 == 1, "{v}");
        }
        assert!(VniAllocator::with_max(1).is_err());
        assert!(VniAllocator::with_max(Vni::MAX + 1).is_err());
        assert!(VniAllocator::with_max(Vni::MAX).is_ok());
    }

    #[test]
    fn a_vni_that_is_zero_or_wider_than_24_bits_is_refused() {
        assert!(Vni::new(0).is_err());
        assert!(Vni::new(1 << 24).is_err());
        assert_eq!(Vni::new(Vni::MAX).unwrap().get(), 16_777_215);
        assert_eq!(Vni::parse("5000").unwrap().get(), 5000);
        for bad in ["0", "-1", "16777216", "99999999999", "x", ""] {
            assert!(Vni::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_crowded_parity_still_finds_the_last_free_vni_and_then_reports_exhaustion() {
        // A node with only VNIs 1..=101, every odd one but 43 taken.
        let a = VniAllocator {
            state: Mutex::new(State {
                max: 101,
                ..State::default()
            }),
        };
        for v in (1..=101).step_by(2).filter(|v| *v != 43) {
            a.lock().taken.insert(Vni(v), None);
        }
        assert_eq!(a.allocate("last", Parity::Odd).unwrap().get(), 43);
        assert!(matches!(
            a.allocate("one-more", Parity::Odd),
            Err(Error::VniExhausted {
                parity: Parity::Odd
            })
        ));
        // The even ones are untouched.
        assert_eq!(
            a.allocate("even", Parity::Even).unwrap().parity(),
            Parity::Even
        );
    }
}
