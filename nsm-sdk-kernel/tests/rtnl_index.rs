//! [`RtNetlink`] against the real kernel, as root: the index a socket remembers for a
//! link name (so that a plan's adds skip a lookup each) never sends an add to the wrong
//! link. The namespace is the test's own (`ip netns add nsmt-<pid>-<n>`, deleted by a
//! guard even on failure). Without root (or `ip`/`ping`) the test prints a skip line
//! and passes.

use nsm_sdk_kernel::{IfName, Netlink, Route, RtNetlink};
use nsm_testkit::Ns;

#[tokio::test]
async fn an_add_after_the_link_was_replaced_under_the_same_name_reaches_the_new_link() {
    nsm_testkit::require_root!("rtnetlink tests");
    let pod = Ns::new();
    let nl = RtNetlink::open(&pod.open()).await.unwrap();
    let name = IfName::new("ix-0").unwrap();
    pod.ip(&[
        "link", "add", "ix-0", "type", "veth", "peer", "name", "ix-1",
    ]);
    let first = nl.link(&name).await.unwrap().unwrap().index;
    nl.add_address(&name, "172.16.80.1/32".parse().unwrap())
        .await
        .unwrap();

    // Someone else replaces the link: same name, new index.
    pod.ip(&["link", "del", "ix-0"]);
    pod.ip(&[
        "link", "add", "ix-0", "type", "veth", "peer", "name", "ix-1",
    ]);
    pod.ip(&["link", "set", "ix-0", "up"]);
    let second = pod.link("ix-0")["ifindex"].as_u64().unwrap();
    assert_ne!(u64::from(first), second);

    nl.add_address(&name, "172.16.80.2/32".parse().unwrap())
        .await
        .unwrap();
    nl.add_route(&name, &Route::link("172.16.81.0/24".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(pod.addresses("ix-0"), ["172.16.80.2/32"]);
    let routes = pod.ip(&["route", "show", "dev", "ix-0"]);
    assert!(routes.contains("172.16.81.0/24"), "{routes}");
}
