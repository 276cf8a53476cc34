//! The data plane of KERNEL connections, checked by pinging (`--ping-sample N`): N
//! connections spread evenly over the run are pinged from their clients' namespaces
//! ([`nsm_sdk_kernel::liveness::ping`]) at the end of the soak ([`ping_all`]), and after
//! a forwarder restart each one as soon as heal says it healed, until it answers
//! ([`ping_after_heal`]).
//!
//! State: the sampled connections' ids, namespaces (an open handle each) and endpoint
//! addresses. Failure handled: a connection without an endpoint address, or whose
//! namespace cannot be opened, is left out of the sample (counted in `skipped`); a ping
//! that cannot be tried counts as failed.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use nsm_proto::connection::Connection;
use nsm_sdk_kernel::liveness::{endpoint_address, ping};
use nsm_sdk_kernel::NetNs;
use tokio::time::Instant;

use super::count_requests::Counts;

/// How long one ping of the end-of-soak check may take.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one ping of [`ping_after_heal`] may take before the next round.
const HEAL_PING_TIMEOUT: Duration = Duration::from_millis(300);
/// Pings in flight at once (each runs on a thread of its own inside its namespace).
const IN_FLIGHT: usize = 64;
/// Pause between two rounds of [`ping_after_heal`].
const ROUND: Duration = Duration::from_millis(50);

/// A sampled connection.
pub(super) struct PingTarget {
    id: String,
    netns: NetNs,
    addr: IpAddr,
}

/// The sample: `want` of `conns` (each with the `inodeURL` of its client's namespace),
/// spread evenly; and how many of those picked could not be pinged at all.
pub(super) fn sample(conns: &[(Connection, String)], want: usize) -> (Vec<PingTarget>, usize) {
    if want == 0 || conns.is_empty() {
        return (Vec::new(), 0);
    }
    let want = want.min(conns.len());
    let mut skipped = 0;
    let targets = (0..want)
        .map(|k| &conns[k * conns.len() / want])
        .filter_map(|(conn, url)| {
            let target = endpoint_address(conn).zip(NetNs::from_url(url).ok());
            if target.is_none() {
                skipped += 1;
            }
            target.map(|(addr, netns)| PingTarget {
                id: conn.id.clone(),
                netns,
                addr,
            })
        })
        .collect();
    (targets, skipped)
}

/// Pings every target once (with retries within [`PING_TIMEOUT`]): how many answered.
pub(super) async fn ping_all(targets: &[PingTarget]) -> usize {
    stream::iter(targets)
        .map(|t| ping(Some(&t.netns), t.addr, PING_TIMEOUT))
        .buffer_unordered(IN_FLIGHT)
        .filter(|r| std::future::ready(matches!(r, Ok(true))))
        .count()
        .await
}

/// Pings each target once heal says it healed after `since`, again every round until
/// it answers, writing when each first answered into `answered` (one slot per target);
/// returns when every target answered (the caller drops it to give up).
pub(super) async fn ping_after_heal(
    targets: Arc<Vec<PingTarget>>,
    counts: Arc<Counts>,
    since: Instant,
    answered: Arc<Mutex<Vec<Option<Instant>>>>,
) {
    let slots = || answered.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let due: Vec<usize> = {
            let done = slots();
            (0..targets.len())
                .filter(|&i| {
                    done.get(i).is_some_and(Option::is_none)
                        && counts.heals.healed_since(&targets[i].id, since)
                })
                .collect()
        };
        let rounds = due.into_iter().map(|i| {
            let targets = targets.clone();
            async move {
                let t = &targets[i];
                let ok = matches!(
                    ping(Some(&t.netns), t.addr, HEAL_PING_TIMEOUT).await,
                    Ok(true)
                );
                (i, ok.then(Instant::now))
            }
        });
        let results: Vec<_> = stream::iter(rounds)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let all = {
            let mut done = slots();
            for (i, at) in results {
                if let (Some(slot), Some(at)) = (done.get_mut(i), at) {
                    *slot = Some(at);
                }
            }
            done.iter().all(Option::is_some)
        };
        if all {
            return;
        }
        tokio::time::sleep(ROUND).await;
    }
}
