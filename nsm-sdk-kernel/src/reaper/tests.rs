use std::future::Future;

use super::*;
use crate::netns::NetNs;
use crate::plan::Plan;
use crate::veth::{down, veth_up, VethEnd};
use crate::Recorder;

fn id(n: u64) -> Option<(u64, u64)> {
    Some((1, n))
}

#[test]
fn a_batch_goes_to_the_namespace_holding_most_ends_first() {
    // Three clients (1, 2, 3) to one endpoint namespace (9), one pair 4 <-> 5, and one
    // pair whose namespaces are unknown.
    let ids = [
        vec![id(1), id(9)],
        vec![id(2), id(9)],
        vec![id(3), id(9)],
        vec![id(4), id(5)],
        vec![None, None],
    ];
    let parts = partition(&ids);
    assert_eq!(parts[0], [(0, 1), (1, 1), (2, 1)]);
    assert_eq!(parts[1], [(3, 0)]);
    assert_eq!(parts[2], [(4, 0)]);
    assert_eq!(parts.len(), 3);
}

#[test]
fn a_pair_inside_one_namespace_counts_once_and_is_placed_once() {
    let ids = [vec![id(7), id(7)], vec![id(7), id(8)], vec![id(7)]];
    let parts = partition(&ids);
    assert_eq!(parts, [vec![(0, 0), (1, 0), (2, 0)]]);
}

async fn pair(rec: &Recorder, ns: &NetNs, i: usize) -> crate::veth::Created {
    let end = |name: String| Plan::new(IfName::new(name).unwrap());
    veth_up(
        VethEnd {
            netns: ns,
            netlink: Arc::new(rec.view("client", ns)),
            plan: end(format!("c{i}")),
        },
        VethEnd {
            netns: ns,
            netlink: Arc::new(rec.view("endpoint", ns)),
            plan: end(format!("e{i}")),
        },
    )
    .await
    .unwrap()
}

async fn pairs(rec: &Recorder, ns: &NetNs, n: usize) -> Vec<crate::veth::Created> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(pair(rec, ns, i).await);
    }
    out
}

#[tokio::test]
async fn closes_that_arrive_together_share_group_deletions_and_each_learns_its_outcome() {
    let ns = NetNs::current().unwrap();
    let rec = Recorder::new("k", &ns).yielding();
    let pairs = pairs(&rec, &ns, 40).await;
    // One of them was deleted behind the forwarder's back (its pod died): still Ok.
    rec.view("x", &ns)
        .delete_link(&IfName::new("c7").unwrap())
        .await
        .unwrap();
    let results = futures::future::join_all(pairs.into_iter().map(down)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(rec.links().await.unwrap().is_empty());
    let calls = rec.calls();
    let lone = calls.iter().filter(|c| c.contains("delete_link")).count();
    let grouped = calls.iter().filter(|c| c.contains("delete_group")).count();
    // The first goes alone at once; the others queued behind it and went as groups.
    assert!(grouped >= 1, "{calls:?}");
    assert!(
        lone + grouped < 10,
        "{lone} lone, {grouped} groups: {calls:?}"
    );
    assert_eq!(groups_in_use(), 0);
}

#[tokio::test]
async fn a_failed_group_deletion_falls_back_to_one_by_one() {
    let ns = NetNs::current().unwrap();
    let rec = Recorder::new("f", &ns).yielding();
    let pairs = pairs(&rec, &ns, 10).await;
    rec.fail_on("delete_group", 16);
    let results = futures::future::join_all(pairs.into_iter().map(down)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(rec.links().await.unwrap().is_empty());
    assert_eq!(groups_in_use(), 0);
}

#[tokio::test]
async fn a_lone_close_is_one_plain_deletion() {
    let ns = NetNs::current().unwrap();
    let rec = Recorder::new("l", &ns);
    let p = pair(&rec, &ns, 0).await;
    down(p).await.unwrap();
    let calls = rec.calls();
    assert!(
        calls.iter().any(|c| c.ends_with("delete_link c0")),
        "{calls:?}"
    );
    assert!(!calls.iter().any(|c| c.contains("group")), "{calls:?}");
}

#[tokio::test]
async fn a_cancelled_leader_does_not_strand_the_queue() {
    let ns = NetNs::current().unwrap();
    let rec = Recorder::new("c", &ns).yielding();
    let pairs = pairs(&rec, &ns, 6).await;
    let mut pairs = pairs.into_iter();
    let first = pairs.next().unwrap();
    // The first Close leads and is dropped after its first poll; the others queued
    // behind it must still finish.
    let mut lead = Box::pin(down(first));
    let waker = futures::task::noop_waker();
    let _ = lead
        .as_mut()
        .poll(&mut std::task::Context::from_waker(&waker));
    let mut rest = Box::pin(futures::future::join_all(pairs.map(down)));
    let _ = rest
        .as_mut()
        .poll(&mut std::task::Context::from_waker(&waker));
    drop(lead);
    let results = tokio::time::timeout(std::time::Duration::from_secs(5), rest)
        .await
        .expect("queued Closes finished");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[tokio::test]
async fn a_link_of_someone_else_carrying_the_group_number_is_never_deleted() {
    let ns = NetNs::current().unwrap();
    let rec = Recorder::new("g", &ns).yielding();
    // Someone else's pair in the namespace, in every group this process could choose.
    let foreign = pair(&rec, &ns, 99).await;
    let base = 0x8000_0000 | ((std::process::id() & 0x003f_ffff) << 8);
    let index = foreign.index(crate::PodSide::Client);
    rec.set_group(index, base).await.unwrap();
    let pairs = pairs(&rec, &ns, 8).await;
    let results = futures::future::join_all(pairs.into_iter().map(down)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let left: Vec<String> = rec
        .links()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(left, ["c99", "e99"]);
    assert_eq!(groups_in_use(), 0);
}
