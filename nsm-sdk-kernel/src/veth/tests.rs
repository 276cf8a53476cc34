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

fn owned(plan: Plan, side: PodSide, connection: &str) -> Plan {
    plan.with_alias(veth_alias(side, connection))
}

fn owned_plans(connection: &str) -> (Plan, Plan) {
    (
        owned(client_plan(), PodSide::Client, connection),
        owned(endpoint_plan(), PodSide::Endpoint, connection),
    )
}

impl Pods {
    async fn alias_of(&self, name: &str) -> Option<String> {
        let links = self.client.links().await.unwrap();
        links.into_iter().find(|l| l.name == name)?.alias
    }

    /// A link `name` (with a peer `<name>-p`) that the mesh did not make for this
    /// connection, with `alias` if given: another connection's (an alias, the mesh's
    /// group) or made by hand (no alias: the kernel's default group 0).
    async fn foreign(&self, name: &str, alias: Option<&str>) {
        let a = self.half_made(name).await;
        match alias {
            Some(alias) => self.client.set_alias(&a, alias).await.unwrap(),
            None => {
                let index = self.client.link(&a).await.unwrap().unwrap().index;
                self.client.set_group(index, 0).await.unwrap();
            }
        }
    }

    /// A pair `name` / `<name>-p` as a forwarder killed between the creation and the
    /// alias leaves it: in the mesh's group, without alias.
    async fn half_made(&self, name: &str) -> IfName {
        let (a, b) = (
            IfName::new(name).unwrap(),
            IfName::new(format!("{name}-p")).unwrap(),
        );
        self.client
            .create_veth_pair(&a, &self.ns, &b, &self.ns, None)
            .await
            .unwrap();
        a
    }
}

#[test]
fn the_alias_names_the_side_and_the_connection_and_fits_the_kernel_limit() {
    assert_eq!(veth_alias(PodSide::Client, "c1"), "nsm-client-c1");
    assert_eq!(veth_alias(PodSide::Endpoint, "c1"), "nsm-endpoint-c1");
    let long = veth_alias(PodSide::Client, &"é".repeat(200));
    assert!(long.len() <= MAX_ALIAS_LEN && long.len() >= MAX_ALIAS_LEN - 1);
    assert!(long.starts_with("nsm-client-é"));
    let plan = client_plan().with_alias(long);
    plan.check().unwrap();
}

#[tokio::test]
async fn each_end_is_marked_with_its_alias_right_after_creation() {
    let pods = pods();
    let (client, endpoint) = owned_plans("c1");
    let created = pods.up(client, endpoint).await.unwrap();
    assert_eq!(
        pods.client.calls()[..4],
        [
            "client create_veth nsc-0 nse-0 mtu=1450",
            "client set_alias nsc-0 nsm-client-c1",
            "endpoint set_alias nse-0 nsm-endpoint-c1",
            "client set_mtu nsc-0 1450",
        ]
    );
    assert_eq!(
        pods.alias_of("nsc-0").await.as_deref(),
        Some("nsm-client-c1")
    );
    assert_eq!(
        pods.alias_of("nse-0").await.as_deref(),
        Some("nsm-endpoint-c1")
    );
    down(created).await.unwrap();
}

#[tokio::test]
async fn a_pair_left_by_a_dead_forwarder_for_the_same_connection_is_replaced() {
    let pods = pods();
    let (client, endpoint) = owned_plans("c1");
    // The forwarder dies: its state goes, the pair stays in the kernel.
    drop(pods.up(client.clone(), endpoint.clone()).await.unwrap());
    let old = pods.client.links().await.unwrap();
    let before = pods.client.calls().len();

    let created = pods.up(client, endpoint).await.unwrap();
    let calls = pods.client.calls();
    assert_eq!(
        calls[before..before + 3],
        [
            "client delete_link nsc-0",
            // Already gone with its peer: not an error.
            "endpoint delete_link nse-0",
            "client create_veth nsc-0 nse-0 mtu=1450",
        ],
        "the old pair goes, then the new one is made"
    );
    let new = pods.client.links().await.unwrap();
    assert_eq!(pods.link_names().await, ["nsc-0", "nse-0"]);
    for (o, n) in old.iter().zip(&new) {
        assert_ne!(o.index, n.index, "{}: a new device", n.name);
    }
    assert_eq!(
        pods.client
            .addresses(&IfName::new("nsc-0").unwrap())
            .await
            .unwrap(),
        [net("172.16.0.2/32")]
    );
    assert_eq!(created.index(PodSide::Client), new[0].index);
    down(created).await.unwrap();
    assert!(pods.link_names().await.is_empty());
}

#[tokio::test]
async fn a_leftover_of_the_connection_under_another_name_is_removed_too() {
    let pods = pods();
    // The dead forwarder's pair used other names (the endpoint chose anew).
    let (client, endpoint) = owned_plans("c1");
    let old_endpoint = owned(
        plan("nse-old", "172.16.0.1/32", "172.16.0.2/32"),
        PodSide::Endpoint,
        "c1",
    );
    let old_client = owned(
        plan("nsc-old", "172.16.0.2/32", "172.16.0.1/32"),
        PodSide::Client,
        "c1",
    );
    drop(pods.up(old_client, old_endpoint).await.unwrap());
    let created = pods.up(client, endpoint).await.unwrap();
    assert_eq!(pods.link_names().await, ["nsc-0", "nse-0"]);
    down(created).await.unwrap();
}

#[tokio::test]
async fn a_half_made_end_left_between_creation_and_alias_is_replaced() {
    let pods = pods();
    pods.half_made("nsc-0").await;
    let link = pods
        .client
        .link(&IfName::new("nsc-0").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((link.alias, link.group), (None, MESH_GROUP));
    let before = pods.client.calls().len();
    let (client, endpoint) = owned_plans("c1");
    let created = pods.up(client, endpoint).await.unwrap();
    assert_eq!(
        pods.client.calls()[before..before + 2],
        [
            "client delete_link nsc-0",
            "client create_veth nsc-0 nse-0 mtu=1450",
        ]
    );
    assert_eq!(pods.link_names().await, ["nsc-0", "nse-0"]);
    assert_eq!(
        pods.alias_of("nsc-0").await.as_deref(),
        Some("nsm-client-c1")
    );
    down(created).await.unwrap();
    assert!(pods.link_names().await.is_empty());
}

#[tokio::test]
async fn a_name_held_by_a_link_of_another_connection_or_not_of_the_mesh_is_left_alone() {
    for alias in [None, Some("nsm-client-c2"), Some("someone's")] {
        let pods = pods();
        pods.foreign("nsc-0", alias).await;
        let before = pods.client.calls().len();
        let (client, endpoint) = owned_plans("c1");
        let err = pods.up(client, endpoint).await.unwrap_err();
        let shown = err.to_string();
        match &err {
            Error::LinkExists {
                name,
                alias: Some(held),
                ..
            } => {
                assert_eq!(name, "nsc-0");
                assert_eq!(held.as_str(), alias.unwrap_or(""));
            }
            other => panic!("{alias:?}: {other:?}"),
        }
        match alias {
            None => assert!(shown.contains("not made by the mesh"), "{shown}"),
            Some(a) => assert!(shown.contains(a), "{shown}"),
        }
        assert!(matches!(
            nsm_sdk::Error::from(err),
            nsm_sdk::Error::InvalidArgument(_)
        ));
        assert_eq!(
            pods.client.calls().len(),
            before,
            "{alias:?}: nothing tried"
        );
        assert_eq!(pods.link_names().await, ["nsc-0", "nsc-0-p"]);
        assert_eq!(pods.alias_of("nsc-0").await.as_deref(), alias);
    }
}

#[tokio::test]
async fn a_foreign_link_in_one_pod_keeps_the_leftover_in_the_other_untouched() {
    let pods = pods();
    let old_client = owned(
        plan("nsc-old", "172.16.0.2/32", "172.16.0.1/32"),
        PodSide::Client,
        "c1",
    );
    let old_endpoint = owned(
        plan("nse-old", "172.16.0.1/32", "172.16.0.2/32"),
        PodSide::Endpoint,
        "c1",
    );
    drop(pods.up(old_client, old_endpoint).await.unwrap());
    pods.foreign("nse-0", Some("nsm-endpoint-c2")).await;
    let (client, endpoint) = owned_plans("c1");
    let err = pods.up(client, endpoint).await.unwrap_err();
    assert!(
        matches!(&err, Error::LinkExists { name, .. } if name == "nse-0"),
        "{err:?}"
    );
    assert_eq!(
        pods.link_names().await,
        ["nsc-old", "nse-0", "nse-0-p", "nse-old"],
        "everything looked at before anything is deleted"
    );
}

#[tokio::test]
async fn a_refresh_sets_a_changed_alias_and_leaves_an_unchanged_one() {
    let pods = pods();
    let mut created = pods.up(client_plan(), endpoint_plan()).await.unwrap();
    assert_eq!(pods.alias_of("nsc-0").await, None);
    let before = pods.client.calls().len();
    let client = owned(client_plan(), PodSide::Client, "c1");
    created
        .refresh(PodSide::Client, client.clone())
        .await
        .unwrap();
    assert_eq!(
        pods.client.calls()[before..],
        ["client set_alias nsc-0 nsm-client-c1"]
    );
    created.refresh(PodSide::Client, client).await.unwrap();
    assert_eq!(pods.client.calls().len(), before + 1);
    down(created).await.unwrap();
}

#[tokio::test]
async fn both_ends_in_one_namespace_cannot_share_an_alias() {
    let pods = pods();
    let client = client_plan().with_alias("same");
    let endpoint = endpoint_plan().with_alias("same");
    let err = pods.up(client, endpoint).await.unwrap_err();
    assert!(matches!(err, Error::InvalidAlias { .. }), "{err:?}");
    assert!(pods.client.calls().is_empty());
}

#[tokio::test]
async fn a_failure_setting_an_alias_deletes_the_new_pair() {
    let pods = pods();
    pods.client.fail_on("endpoint set_alias", 22);
    let (client, endpoint) = owned_plans("c1");
    let err = pods.up(client, endpoint).await.unwrap_err();
    assert_eq!(err.errno(), Some(22));
    assert!(pods.link_names().await.is_empty(), "nothing left behind");
}

/// The client's plan with a policy `from 172.16.0.2/32 ipproto 6 dport <dport>`
/// routed through the endpoint.
fn client_plan_with_policy(dport: u16) -> Plan {
    use crate::plan::{Family, Policy, PortRange, Rule};
    let rule = Rule::new(Family::V4)
        .with_from(net("172.16.0.2/32"))
        .with_proto(6)
        .with_dst_port(PortRange::new(dport, dport).unwrap());
    client_plan().with_policy(Policy::new(rule).with_route(Route::universe(
        net("10.80.0.0/16"),
        Some("172.16.0.1".parse().unwrap()),
    )))
}

#[tokio::test]
async fn down_removes_the_policy_rules_that_the_pair_does_not_take_along() {
    let pods = pods();
    let created = pods
        .up(client_plan_with_policy(8080), endpoint_plan())
        .await
        .unwrap();
    let applied = created.plan(PodSide::Client).clone();
    assert_eq!(applied.policies()[0].table(), Some(100));
    assert_eq!(
        pods.client.rules().await.unwrap(),
        [*applied.policies()[0].rule()]
    );
    let before = pods.client.calls().len();
    down(created).await.unwrap();
    assert_eq!(
        pods.client.calls()[before..],
        [
            "client del_rule from 172.16.0.2/32 ipproto 6 dport 8080 lookup 100",
            "client del_route nsc-0 10.80.0.0/16 table 100",
            "client delete_link nsc-0",
        ]
    );
    assert!(pods.client.rules().await.unwrap().is_empty());
    assert!(pods.link_names().await.is_empty());
}

#[tokio::test]
async fn down_of_a_pair_that_died_still_removes_its_rules() {
    let pods = pods();
    let created = pods
        .up(client_plan_with_policy(8080), endpoint_plan())
        .await
        .unwrap();
    // The endpoint pod died and took the pair along; the client's rule stays.
    pods.endpoint
        .delete_link(&IfName::new("nse-0").unwrap())
        .await
        .unwrap();
    assert_eq!(pods.client.rules().await.unwrap().len(), 1);
    down(created).await.unwrap();
    assert!(pods.client.rules().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_failure_programming_the_endpoint_removes_the_clients_rules_too() {
    let pods = pods();
    pods.client.fail_on("endpoint add_route", 22);
    let err = pods
        .up(client_plan_with_policy(8080), endpoint_plan())
        .await
        .unwrap_err();
    assert_eq!(err.errno(), Some(22));
    assert!(pods.link_names().await.is_empty());
    assert!(
        pods.client.rules().await.unwrap().is_empty(),
        "no rule left"
    );
}

#[tokio::test]
async fn a_refresh_keeps_an_unchanged_policy_and_replaces_a_changed_one() {
    let pods = pods();
    let mut created = pods
        .up(client_plan_with_policy(8080), endpoint_plan())
        .await
        .unwrap();
    let before = pods.client.calls().len();
    created
        .refresh(PodSide::Client, client_plan_with_policy(8080))
        .await
        .unwrap();
    assert_eq!(pods.client.calls().len(), before, "same policy: no call");
    assert_eq!(
        created.plan(PodSide::Client).policies()[0].table(),
        Some(100)
    );

    created
        .refresh(PodSide::Client, client_plan_with_policy(9090))
        .await
        .unwrap();
    let rules = pods.client.rules().await.unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        rules[0].to_string(),
        "from 172.16.0.2/32 ipproto 6 dport 9090 lookup 101"
    );
    let nsc = IfName::new("nsc-0").unwrap();
    let tables: Vec<u32> = pods
        .client
        .routes(&nsc)
        .await
        .unwrap()
        .iter()
        .map(Route::table)
        .collect();
    assert_eq!(tables, [254, 101], "table 100 was emptied");
    down(created).await.unwrap();
    assert!(pods.client.rules().await.unwrap().is_empty());
}
