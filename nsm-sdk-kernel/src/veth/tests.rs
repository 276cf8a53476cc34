use ipnet::IpNet;

use super::*;
use crate::plan::{IfName, Route};
use crate::Recorder;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn plan(name: &str, own: &str, peer: &str) -> Plan {
    Plan::new(IfName::new(name).unwrap())
        .with_mtu(Mtu::new(1450).unwrap())
        .with_address(net(own))
        .with_route(Route::link(net(peer)))
}

/// Both "pods" are views of one fake kernel (unit tests cannot make namespaces), so
/// the two ends get different names.
struct Pods {
    ns: NetNs,
    client: Recorder,
    endpoint: Recorder,
}

fn pods() -> Pods {
    let ns = NetNs::current().unwrap();
    let client = Recorder::new("client", &ns);
    let endpoint = client.view("endpoint", &ns);
    Pods {
        ns,
        client,
        endpoint,
    }
}

impl Pods {
    async fn up(&self, client: Plan, endpoint: Plan) -> Result<Created> {
        veth_up(
            VethEnd {
                netns: &self.ns,
                netlink: Arc::new(self.client.clone()),
                plan: client,
            },
            VethEnd {
                netns: &self.ns,
                netlink: Arc::new(self.endpoint.clone()),
                plan: endpoint,
            },
        )
        .await
    }

    async fn link_names(&self) -> Vec<String> {
        let links = self.client.links().await.unwrap();
        links.into_iter().map(|l| l.name).collect()
    }
}

fn client_plan() -> Plan {
    plan("nsc-0", "172.16.0.2/32", "172.16.0.1/32")
}

fn endpoint_plan() -> Plan {
    plan("nse-0", "172.16.0.1/32", "172.16.0.2/32")
}

#[tokio::test]
async fn creates_the_pair_then_programs_the_client_end_then_the_endpoint_end() {
    let pods = pods();
    let created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    assert_eq!(
        pods.client.calls(),
        [
            "client create_veth nsc-0 nse-0 mtu=1450",
            "client set_mtu nsc-0 1450",
            "client set_up nsc-0",
            "client add_address nsc-0 172.16.0.2/32",
            "client add_route nsc-0 172.16.0.1/32 scope link",
            "endpoint set_mtu nse-0 1450",
            "endpoint set_up nse-0",
            "endpoint add_address nse-0 172.16.0.1/32",
            "endpoint add_route nse-0 172.16.0.2/32 scope link",
        ]
    );
    assert_eq!(created.plan(PodSide::Endpoint), &endpoint_plan());
    let nsc = IfName::new("nsc-0").unwrap();
    assert_eq!(
        pods.client.addresses(&nsc).await.unwrap(),
        [net("172.16.0.2/32")]
    );
    down(created).await.unwrap();
}

#[tokio::test]
async fn a_name_already_taken_is_link_exists_and_creates_nothing() {
    let pods = pods();
    let first = pods
        .up(
            client_plan(),
            plan("other", "172.16.0.9/32", "172.16.0.2/32"),
        )
        .await
        .unwrap();
    let calls_before = pods.client.calls().len();
    let err = pods.up(client_plan(), endpoint_plan()).await.unwrap_err();
    assert!(
        matches!(&err, Error::LinkExists { name, .. } if name == "nsc-0"),
        "{err:?}"
    );
    assert_eq!(pods.client.calls().len(), calls_before, "nothing was tried");
    assert_eq!(pods.link_names().await, ["nsc-0", "other"]);
    down(first).await.unwrap();
}

#[tokio::test]
async fn a_failure_programming_the_endpoint_deletes_the_pair() {
    let pods = pods();
    pods.client.fail_on("endpoint add_route", 22);
    let err = pods.up(client_plan(), endpoint_plan()).await.unwrap_err();
    assert_eq!(err.errno(), Some(22));
    assert!(pods.link_names().await.is_empty(), "nothing left behind");
    let calls = pods.client.calls();
    assert_eq!(calls.last().unwrap(), "client delete_link nsc-0");
    // apply() rolled the endpoint side back before the pair was deleted.
    assert!(calls.contains(&"endpoint del_address nse-0 172.16.0.1/32".to_string()));
}

#[tokio::test]
async fn a_failed_creation_leaves_nothing_and_returns_the_error() {
    let pods = pods();
    pods.client.fail_on("create_veth", 1);
    let err = pods.up(client_plan(), endpoint_plan()).await.unwrap_err();
    assert!(matches!(
        nsm_sdk::Error::from(err),
        nsm_sdk::Error::PermissionDenied(_)
    ));
    assert!(pods.link_names().await.is_empty());
}

#[tokio::test]
async fn an_invalid_plan_is_refused_before_touching_the_kernel() {
    let pods = pods();
    let v6_small_mtu = Plan::new(IfName::new("nsc-0").unwrap())
        .with_mtu(Mtu::new(1000).unwrap())
        .with_address(net("2001:db8::2/128"));
    let err = pods.up(v6_small_mtu, endpoint_plan()).await.unwrap_err();
    assert!(matches!(err, Error::InvalidMtu { mtu: 1000, .. }));
    assert!(pods.client.calls().is_empty());
}

#[tokio::test]
async fn refresh_with_the_same_plan_changes_nothing() {
    let pods = pods();
    let mut created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    let before = pods.client.calls().len();
    created
        .refresh(PodSide::Client, client_plan())
        .await
        .unwrap();
    created
        .refresh(PodSide::Endpoint, endpoint_plan())
        .await
        .unwrap();
    assert_eq!(pods.client.calls().len(), before);
    down(created).await.unwrap();
}

#[tokio::test]
async fn refresh_with_new_addresses_replaces_them_on_that_side_only() {
    let pods = pods();
    let mut created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    let before = pods.client.calls().len();
    let new = plan("nsc-0", "172.16.0.6/32", "172.16.0.1/32");
    created.refresh(PodSide::Client, new.clone()).await.unwrap();
    let nsc = IfName::new("nsc-0").unwrap();
    assert_eq!(
        pods.client.addresses(&nsc).await.unwrap(),
        [net("172.16.0.6/32")]
    );
    let calls = pods.client.calls();
    assert_eq!(
        calls[before..],
        [
            "client add_address nsc-0 172.16.0.6/32",
            "client del_address nsc-0 172.16.0.2/32",
        ]
    );
    assert_eq!(created.plan(PodSide::Client), &new);
    down(created).await.unwrap();
}

#[tokio::test]
async fn a_failed_refresh_rolls_back_and_keeps_the_old_plan() {
    let pods = pods();
    let mut created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    let new = plan("nsc-0", "172.16.0.6/32", "172.16.0.5/32");
    pods.client
        .fail_on("client add_route nsc-0 172.16.0.5/32", 22);
    created.refresh(PodSide::Client, new).await.unwrap_err();
    let nsc = IfName::new("nsc-0").unwrap();
    assert_eq!(
        pods.client.addresses(&nsc).await.unwrap(),
        [net("172.16.0.2/32")]
    );
    assert_eq!(
        pods.client.routes(&nsc).await.unwrap(),
        [Route::link(net("172.16.0.1/32"))]
    );
    assert_eq!(created.plan(PodSide::Client), &client_plan());
    down(created).await.unwrap();
}

#[tokio::test]
async fn refresh_cannot_rename_a_live_interface() {
    let pods = pods();
    let mut created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    let err = created
        .refresh(
            PodSide::Client,
            plan("nsc-9", "172.16.0.2/32", "172.16.0.1/32"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInterfaceName { .. }));
    down(created).await.unwrap();
}

#[tokio::test]
async fn down_deletes_both_ends_and_tolerates_a_pair_that_is_already_gone() {
    let pods = pods();
    let created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    down(created).await.unwrap();
    assert!(pods.link_names().await.is_empty());

    let created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    // The endpoint pod died: the kernel took the pair along.
    pods.endpoint
        .delete_link(&IfName::new("nse-0").unwrap())
        .await
        .unwrap();
    down(created).await.unwrap();
}

#[tokio::test]
async fn down_leaves_a_same_named_link_it_did_not_create() {
    let pods = pods();
    let created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    pods.client
        .delete_link(&IfName::new("nsc-0").unwrap())
        .await
        .unwrap();
    // Someone else makes a new link with the client's name after the pair died.
    let ns = NetNs::current().unwrap();
    let (a, b) = (IfName::new("nsc-0").unwrap(), IfName::new("x").unwrap());
    pods.client
        .create_veth_pair(&a, &ns, &b, &ns, None)
        .await
        .unwrap();
    down(created).await.unwrap();
    assert_eq!(pods.link_names().await, ["nsc-0", "x"]);
}
