//! Group commit of link deletions (veth pairs, VXLAN devices): Closes that arrive
//! together are deleted together.
//!
//! Why: the kernel waits for its own synchronisation (an RCU grace period and the
//! netdevice unregister work, about 16 ms on the CI machine) once per `RTM_DELLINK`,
//! under the global rtnl lock, so 1,000 pairs deleted one after another take 16 s
//! whatever the number of sockets or tasks. A whole link group is deleted with one
//! request and one synchronisation (`ip link del group N`, 1,000 pairs in 0.15-0.22 s).
//! Measured by hand with `ip -batch` (kernel 6.18, 200 pairs, each client end in its own
//! namespace, every endpoint end in one): one `link del` per pair 3.2 s; the endpoint
//! ends put into one group and that group deleted in the endpoint's namespace 0.04 s,
//! client ends gone with them; one group deletion *per client namespace* 3.9 s (each
//! deletion pays the synchronisation again). So a group pays only inside one namespace,
//! and the namespace that holds the most ends of the waiting pairs is the one to use.
//!
//! What it does: a deletion that finds no other in flight goes out at once, as a plain
//! `RTM_DELLINK` (a lone Close is exactly as fast as before). Deletions that arrive while
//! one is in flight wait in a queue; when the one in flight is done, the whole queue is
//! handed to one of the waiting callers (the next *leader*), which deletes it as a
//! batch and then hands on whatever queued meanwhile. A batch is split by namespace,
//! most ends first (`partition`); in each namespace holding two or more of the
//! batch's ends the ends are put into a fresh link group, each by the index it was
//! born with (indexes are not reused, so that is the link its pair made; a missing one
//! went with its pod), and the group is deleted with one request. Pairs left alone in their namespace, and every pair of a
//! group whose deletion failed, are deleted one by one as before. Each caller gets its
//! own outcome.
//!
//! Group numbers: `0x8000_0000 | pid << 8 | n` with an 8-bit counter `n` (a pid is at
//! most 2^22), far from the small numbers people give groups by hand and different
//! for two processes of one pid namespace, and not held by another batch of this
//! process. A dump of the namespace's links, taken while the links are put into the
//! group, must show the number on no other link (say a forwarder killed mid-batch left
//! it, or another process uses it): else nothing is deleted by group, the batch's
//! links go one by one and the number is never used again by this process. The
//! number is released when its batch is done (see [`groups_in_use`]).
//! No link keeps a group: the group's links are gone with it, and a link whose group
//! deletion failed is deleted on its own.
//!
//! State: one process-wide `GroupCommit` queue (`group_commit.rs`) and the set of
//! group numbers in use, each behind a `std::sync::Mutex` never held across an await.
//! No task is spawned: the batches run in the Close futures of the waiting callers.
//! Failure handled: a leader whose Close is cancelled (the caller went away) hands the
//! queue on; the callers of the batch it was running delete their own pair alone, so
//! no Close waits for ever. A pair whose Close went away while it waited is still
//! deleted.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use tracing::{debug, info, warn};

use crate::apply::Netlink;
use crate::error::{Error, Result};
use crate::group_commit::GroupCommit;
use crate::plan::IfName;

/// A link to delete (a veth end, a VXLAN device): the handle of its namespace, its
/// name and the index it was born with.
#[derive(Debug, Clone)]
pub(crate) struct End {
    pub(crate) netlink: Arc<dyn Netlink>,
    pub(crate) name: IfName,
    pub(crate) index: u32,
}

/// Links to delete together, any one of which takes all along: the two ends of a veth
/// pair, or one device (a VXLAN device).
pub(crate) type Pair = Vec<End>;

static REAPER: GroupCommit<Pair, Result<()>> = GroupCommit::new();

static GROUPS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn groups() -> MutexGuard<'static, BTreeSet<u32>> {
    GROUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many link group numbers this process holds for deletions in flight (0 when
/// nothing is being deleted).
pub fn groups_in_use() -> usize {
    groups().len()
}

/// Deletes `pair` now when nothing else is being deleted, else together with the
/// deletions that queue up meanwhile (see the [module docs](self)).
pub(crate) async fn delete(pair: Pair) -> Result<()> {
    REAPER.submit(pair, run_batch).await
}

/// Deletes the link `name` of `netlink`'s namespace if it still is the one born with
/// `index` (else leaves it alone), through the reaper: at once when no other deletion
/// is in flight, else in a link group with the deletions queued meanwhile. For a
/// device without a peer, such as a connection's VXLAN device (deleted one at a time
/// before, 50 ms each). A link already gone is not an error.
pub async fn delete_link(netlink: Arc<dyn Netlink>, name: IfName, index: u32) -> Result<()> {
    delete(vec![End {
        netlink,
        name,
        index,
    }])
    .await
}

/// Deletes one pair with its own request, as before batching: through the first end
/// that is still the link this pair created. A pair that is gone is not an error; a
/// same-named link that is not ours is left alone.
pub(crate) async fn delete_alone(pair: &Pair) -> Result<()> {
    for end in pair.iter() {
        match ensure_ours(end).await {
            Ok(()) => match end.netlink.delete_link(&end.name).await {
                Ok(()) | Err(Error::LinkNotFound { .. }) => {
                    info!(ifname = %end.name, netns = end.netlink.netns(), "link deleted (with its peer, if any)");
                    return Ok(());
                }
                Err(e) => return Err(e),
            },
            Err(Error::LinkNotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fails with [`Error::LinkNotFound`] unless the end's link still is the one its pair
/// created (same name, same index).
pub(crate) async fn ensure_ours(end: &End) -> Result<()> {
    match end.netlink.link(&end.name).await? {
        Some(l) if l.index == end.index => Ok(()),
        _ => Err(Error::LinkNotFound {
            name: end.name.to_string(),
            netns: end.netlink.netns().to_string(),
        }),
    }
}

/// Splits a batch by namespace: repeatedly the namespace holding the most ends of the
/// pairs not yet placed takes those pairs (each pair once: by the end in that
/// namespace). Returns, per namespace, which end (0 or 1) of which pairs; pairs whose
/// ends' namespaces are unknown come last, alone.
pub(crate) fn partition(ids: &[Vec<Option<(u64, u64)>>]) -> Vec<Vec<(usize, usize)>> {
    let mut left: BTreeSet<usize> = (0..ids.len()).collect();
    let mut out = Vec::new();
    loop {
        let mut count: BTreeMap<(u64, u64), usize> = BTreeMap::new();
        for &i in &left {
            let ends: BTreeSet<(u64, u64)> = ids[i].iter().flatten().copied().collect();
            for id in ends {
                *count.entry(id).or_default() += 1;
            }
        }
        let Some((&best, _)) = count
            .iter()
            .max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id)))
        else {
            break;
        };
        let mut group = Vec::new();
        left.retain(|&i| match ids[i].iter().position(|id| *id == Some(best)) {
            Some(end) => {
                group.push((i, end));
                false
            }
            None => true,
        });
        out.push(group);
    }
    out.extend(left.into_iter().map(|i| vec![(i, 0)]));
    out
}

/// Deletes a batch (a lone pair too: it is alone in its namespace) and answers
/// every pair, in order.
async fn run_batch(pairs: Vec<Pair>) -> Vec<Result<()>> {
    let ids: Vec<_> = pairs
        .iter()
        .map(|p| p.iter().map(|e| e.netlink.netns_id()).collect())
        .collect();
    let mut results: Vec<Option<Result<()>>> = pairs.iter().map(|_| None).collect();
    let mut groups_used = 0usize;
    for part in partition(&ids) {
        if part.len() < 2 {
            for (i, _) in part {
                results[i] = Some(delete_alone(&pairs[i]).await);
            }
            continue;
        }
        groups_used += 1;
        let ends: Vec<&End> = part.iter().map(|&(i, e)| &pairs[i][e]).collect();
        let outcomes = delete_as_group(&ends).await;
        for (&(i, _), outcome) in part.iter().zip(outcomes) {
            results[i] = Some(match outcome {
                Outcome::Done(r) => r,
                // delete_as_group turns every Grouped into Done or Alone.
                Outcome::Grouped | Outcome::Alone => delete_alone(&pairs[i]).await,
            });
        }
    }
    if pairs.len() > 1 {
        debug!(
            pairs = pairs.len(),
            groups = groups_used,
            "batch of link deletions done"
        );
    }
    results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
}

enum Outcome {
    /// In the group, to be deleted with it.
    Grouped,
    Done(Result<()>),
    /// Not deleted by the group: delete it on its own.
    Alone,
}

/// Requests in flight at once on one socket while a batch sets link groups.
const IN_FLIGHT: usize = 64;

/// A group number this process holds until dropped.
struct GroupNumber(u32);

/// Numbers found on a link that is not ours: never taken again by this process.
static BURNT: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

impl GroupNumber {
    fn take() -> Option<GroupNumber> {
        let base = 0x8000_0000 | ((std::process::id() & 0x003f_ffff) << 8);
        let burnt = BURNT.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut held = groups();
        let g = (0..=0xffu32)
            .map(|n| base | n)
            .find(|g| !held.contains(g) && !burnt.contains(g))?;
        held.insert(g);
        Some(GroupNumber(g))
    }

    fn burn(&self) {
        BURNT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.0);
    }
}

impl Drop for GroupNumber {
    fn drop(&mut self) {
        groups().remove(&self.0);
    }
}

/// Deletes ends that all live in one namespace with one group deletion (through the
/// first end's handle, a socket in that namespace).
async fn delete_as_group(ends: &[&End]) -> Vec<Outcome> {
    let nl = ends[0].netlink.clone();
    let alone = || ends.iter().map(|_| Outcome::Alone).collect();
    let Some(group) = GroupNumber::take() else {
        return alone();
    };
    // Each end by the index it was born with: indexes are not reused, so the link at
    // that index is the one its pair made (a missing one went with its pod). Pipelined
    // on the one socket, a bounded number in flight: the kernel answers each with an
    // ack queued on the socket, and too many unread acks would overflow its receive
    // buffer (ENOBUFS, lost answers).
    let join = |end: &&End| {
        let nl = nl.clone();
        let (index, name) = (end.index, end.name.clone());
        async move {
            match nl.set_group(index, group.0).await {
                Ok(()) => Outcome::Grouped,
                // Gone with its pod meanwhile: nothing left to delete.
                Err(Error::LinkNotFound { .. }) => Outcome::Done(Ok(())),
                Err(e) => {
                    warn!(ifname = %name, error = %e, "could not put a link into the deletion group");
                    Outcome::Alone
                }
            }
        }
    };
    // The dump that proves no other link carries the number runs beside the sets (one
    // round trip less while the runtime is busy).
    let sets = futures::stream::iter(ends.iter().map(join))
        .buffered(IN_FLIGHT)
        .collect::<Vec<Outcome>>();
    let (dump, outcomes) = futures::join!(nl.links(), sets);
    let ours: HashSet<u32> = ends.iter().map(|e| e.index).collect();
    match dump {
        Ok(links)
            if links
                .iter()
                .any(|l| l.group == group.0 && !ours.contains(&l.index)) =>
        {
            // Someone else's link carries the number: never delete it, never use the
            // number again. Ours are deleted one by one (their group does not matter).
            warn!(
                netns = nl.netns(),
                group = group.0,
                "the link group number is taken in this namespace, deleting one by one"
            );
            group.burn();
            return alone();
        }
        Ok(_) => {}
        Err(e) => {
            warn!(netns = nl.netns(), error = %e, "listing links for a group deletion failed, deleting one by one");
            return alone();
        }
    }
    let members = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Grouped))
        .count();
    if members == 0 {
        return outcomes;
    }
    match nl.delete_group(group.0).await {
        Ok(()) => {
            info!(
                netns = nl.netns(),
                pairs = members,
                group = group.0,
                "links deleted as one group"
            );
            outcomes
                .into_iter()
                .map(|o| match o {
                    Outcome::Grouped => Outcome::Done(Ok(())),
                    other => other,
                })
                .collect()
        }
        Err(e) => {
            warn!(netns = nl.netns(), group = group.0, error = %e, "group deletion failed, deleting one by one");
            alone()
        }
    }
}

#[cfg(test)]
mod tests;
