//! A storm of VXLAN Closes against the real kernel, as root: many devices of one node
//! in one pod (the endpoint's side of many remote connections), deleted at once; the
//! deletions share link groups (`nsm_sdk_kernel::reaper`), each Close still gets its
//! own outcome and nothing is left. Namespaces are the test's own (`ip netns add
//! nsmt-<pid>-<n>`, deleted by a guard even on failure). Without root (or `ip`/`ping`)
//! the test prints a skip line and passes.

use std::time::Instant;

use nsm_sdk_kernel::{groups_in_use, IfName, Plan, Route, RtNetlink};
use nsm_sdk_vxlan::{tunnel_mtu, vxlan_up, Vni, VxlanSpec};
use nsm_testkit::{underlay, Ns};

const N: u32 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_devices_closed_together_are_all_deleted_and_each_close_succeeds() {
    nsm_testkit::require_root!("VXLAN kernel tests");
    let [n1, _n2] = underlay();
    let pod = Ns::new();
    let baseline = pod.everything();
    let node = RtNetlink::open(&n1.open()).await.unwrap();
    let (u1, u2) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
    let mtu = tunnel_mtu(1500, u1).unwrap();
    let pod_ns = pod.open();
    let mut links = Vec::new();
    for i in 0..N {
        let plan = Plan::new(IfName::new(format!("vx-{i}")).unwrap())
            .with_address(format!("172.16.72.{}/32", i + 1).parse().unwrap())
            .with_route(Route::link(
                format!("172.16.73.{}/32", i + 1).parse().unwrap(),
            ));
        let spec = VxlanSpec::new(Vni::new(6000 + i).unwrap(), u1, u2, mtu);
        links.push(vxlan_up(&node, &pod_ns, &spec, plan).await.unwrap());
    }
    assert_eq!(pod.links().len(), N as usize + 1);

    let started = Instant::now();
    let results = futures::future::join_all(links.into_iter().map(|l| l.down())).await;
    eprintln!(
        "{N} VXLAN devices closed at once in {:?}",
        started.elapsed()
    );
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(pod.everything(), baseline, "the pod after the Closes");
    assert_eq!(groups_in_use(), 0);
}
