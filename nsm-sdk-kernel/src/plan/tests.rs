use std::collections::{BTreeSet, HashMap};

use std::net::IpAddr;

use nsm_proto::connectioncontext::{
    ConnectionContext, IpContext, IpNeighbor, PolicyRoute, Route as ProtoRoute,
};

use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn route(prefix: &str, next_hop: &str) -> ProtoRoute {
    ProtoRoute {
        prefix: prefix.into(),
        next_hop: next_hop.into(),
    }
}

/// What sdk's point-to-point IPAM produces for one connection, plus one extra route
/// on each side.
fn p2p_context() -> ConnectionContext {
    ConnectionContext {
        ip_context: Some(IpContext {
            src_ip_addrs: vec!["172.16.0.2/32".into()],
            dst_ip_addrs: vec!["172.16.0.1/32".into()],
            src_routes: vec![route("172.16.0.1/32", ""), route("10.60.0.0/16", "")],
            dst_routes: vec![route("172.16.0.2/32", ""), route("10.70.0.7/16", "")],
            ..Default::default()
        }),
        mtu: 1450,
        ..Default::default()
    }
}

#[test]
fn client_side_gets_src_addresses_a_link_route_to_the_endpoint_and_src_routes_via_it() {
    let plan = plan_from_context(&p2p_context(), PodSide::Client, "nsm-1").unwrap();
    assert_eq!(plan.ifname().as_str(), "nsm-1");
    assert_eq!(plan.mtu(), Some(Mtu::new(1450).unwrap()));
    assert_eq!(plan.addresses(), [net("172.16.0.2/32")]);
    assert_eq!(
        plan.routes(),
        [
            // The src_route equal to the endpoint's /32 is inside a dst net: no next
            // hop, and it replaces the link-scope route to the same destination.
            Route::universe(net("172.16.0.1/32"), None),
            Route::universe(net("10.60.0.0/16"), Some(ip("172.16.0.1"))),
        ]
    );
}

#[test]
fn endpoint_side_gets_dst_addresses_and_dst_routes_via_the_client() {
    let plan = plan_from_context(&p2p_context(), PodSide::Endpoint, "nse-1").unwrap();
    assert_eq!(plan.addresses(), [net("172.16.0.1/32")]);
    assert_eq!(
        plan.routes(),
        [
            Route::universe(net("172.16.0.2/32"), None),
            // Destinations are masked, as the kernel needs them.
            Route::universe(net("10.70.0.0/16"), Some(ip("172.16.0.2"))),
        ]
    );
}

#[test]
fn peer_addresses_outside_own_prefixes_get_link_scope_routes() {
    let ctx = ConnectionContext {
        ip_context: Some(IpContext {
            src_ip_addrs: vec!["192.0.2.2/32".into()],
            dst_ip_addrs: vec!["192.0.2.1/32".into(), "2001:db8::1/128".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let plan = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap();
    assert_eq!(
        plan.routes(),
        [
            Route::link(net("192.0.2.1/32")),
            Route::link(net("2001:db8::1/128"))
        ]
    );
    assert_eq!(plan.mtu(), None, "context MTU 0 leaves the MTU alone");
}

#[test]
fn peer_inside_an_own_prefix_needs_no_route() {
    let ctx = ConnectionContext {
        ip_context: Some(IpContext {
            src_ip_addrs: vec!["192.0.2.2/24".into()],
            dst_ip_addrs: vec!["192.0.2.1/24".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let plan = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap();
    assert_eq!(plan.addresses(), [net("192.0.2.2/24")]);
    assert!(plan.routes().is_empty());
}

#[test]
fn an_explicit_next_hop_is_kept_and_the_family_decides_the_implicit_one() {
    let ctx = ConnectionContext {
        ip_context: Some(IpContext {
            src_ip_addrs: vec!["192.0.2.2/32".into(), "2001:db8::2/128".into()],
            dst_ip_addrs: vec!["192.0.2.1/32".into(), "2001:db8::1/128".into()],
            src_routes: vec![
                route("198.51.100.0/24", "192.0.2.9"),
                route("2001:db8:99::/48", ""),
            ],
            ..Default::default()
        }),
        mtu: 1500,
        ..Default::default()
    };
    let plan = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap();
    assert!(plan.routes().contains(&Route::universe(
        net("198.51.100.0/24"),
        Some(ip("192.0.2.9"))
    )));
    assert!(plan.routes().contains(&Route::universe(
        net("2001:db8:99::/48"),
        Some(ip("2001:db8::1"))
    )));
}

#[test]
fn neighbours_go_to_both_sides() {
    let mut ctx = p2p_context();
    ctx.ip_context.as_mut().unwrap().ip_neighbors = vec![IpNeighbor {
        ip: "172.16.0.9".into(),
        hardware_address: "02:00:00:00:00:09".into(),
    }];
    for side in [PodSide::Client, PodSide::Endpoint] {
        let plan = plan_from_context(&ctx, side, "nsm-1").unwrap();
        assert_eq!(
            plan.neighbours(),
            [Neighbour {
                ip: ip("172.16.0.9"),
                mac: [2, 0, 0, 0, 0, 9]
            }]
        );
    }
}

#[test]
fn malformed_fields_are_invalid_argument_naming_field_and_value() {
    type Breaker = Box<dyn Fn(&mut IpContext)>;
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "ip_context.src_ip_addrs",
            Box::new(|c| c.src_ip_addrs = vec!["172.16.0.300/32".into()]),
        ),
        (
            "ip_context.dst_ip_addrs",
            Box::new(|c| c.dst_ip_addrs = vec!["nonsense".into()]),
        ),
        (
            "ip_context.src_routes",
            Box::new(|c| c.src_routes = vec![route("10.0.0.0/33", "")]),
        ),
        (
            "ip_context.dst_routes",
            Box::new(|c| c.dst_routes = vec![route("10.0.0.0/8", "gateway")]),
        ),
        (
            "ip_context.ip_neighbors",
            Box::new(|c| {
                c.ip_neighbors = vec![IpNeighbor {
                    ip: "10.0.0.1".into(),
                    hardware_address: "02:00:00:00:00".into(),
                }]
            }),
        ),
    ];
    for (field, break_it) in cases {
        let mut ctx = p2p_context();
        break_it(ctx.ip_context.as_mut().unwrap());
        let err = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(field), "{text}");
        match nsm_sdk::Error::from(err) {
            nsm_sdk::Error::InvalidArgument(_) => {}
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn interface_names_follow_the_kernel_rules() {
    assert!(
        IfName::new("icmp-respo-ABCD").is_ok(),
        "15 bytes is the limit"
    );
    for bad in ["", "icmp-respo-ABCDE", ".", "..", "a/b", "a:b", "a b"] {
        let err = IfName::new(bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInterfaceName { .. }),
            "{bad:?}: {err:?}"
        );
    }
    let err = plan_from_context(&p2p_context(), PodSide::Client, "sixteen-bytes-xx").unwrap_err();
    assert!(matches!(
        nsm_sdk::Error::from(err),
        nsm_sdk::Error::InvalidArgument(_)
    ));
}

#[test]
fn mtu_out_of_range_is_invalid_argument() {
    for bad in [67, 65536, u32::MAX] {
        let mut ctx = p2p_context();
        ctx.mtu = bad;
        let err = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap_err();
        assert!(matches!(err, Error::InvalidMtu { mtu, .. } if mtu == bad));
    }
    assert!(Mtu::new(68).is_ok() && Mtu::new(65535).is_ok());
}

#[test]
fn an_ipv6_address_needs_an_mtu_of_at_least_1280() {
    let ctx = ConnectionContext {
        ip_context: Some(IpContext {
            src_ip_addrs: vec!["2001:db8::2/128".into()],
            ..Default::default()
        }),
        mtu: 1279,
        ..Default::default()
    };
    let err = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap_err();
    assert!(
        matches!(err, Error::InvalidMtu { mtu: 1279, .. }),
        "{err:?}"
    );
    let mut ok = ctx.clone();
    ok.mtu = 1280;
    assert!(plan_from_context(&ok, PodSide::Client, "nsm-1").is_ok());
}

#[test]
fn a_fresh_interface_is_configured_mtu_and_up_first_then_addresses_routes_neighbours() {
    let plan = plan_from_context(&p2p_context(), PodSide::Client, "nsm-1").unwrap();
    let ops = Plan::changes(None, &plan);
    let mtu = Mtu::new(1450).unwrap();
    assert_eq!(
        ops,
        [
            Op::SetMtu { mtu, prev: None },
            Op::SetMac([0x02, 0xfe, 172, 16, 0, 2]),
            Op::SetUp,
            Op::AddAddress(net("172.16.0.2/32")),
            Op::AddRoute(plan.routes()[0]),
            Op::AddRoute(plan.routes()[1]),
        ]
    );
}

#[test]
fn an_unchanged_refresh_is_a_no_op() {
    let plan = plan_from_context(&p2p_context(), PodSide::Client, "nsm-1").unwrap();
    let again = plan_from_context(&p2p_context(), PodSide::Client, "nsm-1").unwrap();
    assert!(Plan::changes(Some(&plan), &again).is_empty());
}

#[test]
fn a_refresh_with_new_addresses_adds_them_before_removing_the_old_ones() {
    let old = plan_from_context(&p2p_context(), PodSide::Client, "nsm-1").unwrap();
    let mut ctx = p2p_context();
    let ipc = ctx.ip_context.as_mut().unwrap();
    ipc.src_ip_addrs = vec!["172.16.0.6/32".into()];
    ipc.dst_ip_addrs = vec!["172.16.0.5/32".into()];
    ipc.src_routes = vec![route("172.16.0.5/32", ""), route("10.60.0.0/16", "")];
    let new = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap();
    let ops = Plan::changes(Some(&old), &new);
    assert_eq!(
        ops,
        [
            Op::AddAddress(net("172.16.0.6/32")),
            Op::DelRoute(old.routes()[0]),
            Op::DelRoute(old.routes()[1]),
            Op::DelAddress(net("172.16.0.2/32")),
            Op::AddRoute(new.routes()[0]),
            Op::AddRoute(new.routes()[1]),
        ]
    );
    // Applying the changes to the old state gives exactly the new one.
    assert_eq!(simulate(&old, &ops), simulate(&new, &[]));
}

#[test]
fn dropping_the_last_ipv4_address_reinstalls_the_ipv4_routes_the_kernel_flushes() {
    let name = || IfName::new("nsm-1").unwrap();
    let route = Route::link(net("172.16.0.1/32"));
    let old = Plan::new(name())
        .with_address(net("172.16.0.2/32"))
        .with_route(route);
    let new = Plan::new(name()).with_route(route);
    let ops = Plan::changes(Some(&old), &new);
    assert_eq!(
        ops,
        [
            Op::DelRoute(route),
            Op::DelAddress(net("172.16.0.2/32")),
            Op::AddRoute(route),
        ]
    );
}

#[test]
fn an_mtu_change_remembers_the_previous_mtu_for_rollback() {
    let old = Plan::new(IfName::new("nsm-1").unwrap()).with_mtu(Mtu::new(1500).unwrap());
    let new = old.clone().with_mtu(Mtu::new(1400).unwrap());
    let ops = Plan::changes(Some(&old), &new);
    assert_eq!(
        ops,
        [Op::SetMtu {
            mtu: Mtu::new(1400).unwrap(),
            prev: Some(Mtu::new(1500).unwrap())
        }]
    );
    assert_eq!(
        ops[0].inverse(),
        Some(Op::SetMtu {
            mtu: Mtu::new(1500).unwrap(),
            prev: Some(Mtu::new(1400).unwrap())
        })
    );
}

#[test]
fn undoing_the_changes_in_reverse_restores_the_old_state() {
    let old = plan_from_context(&p2p_context(), PodSide::Endpoint, "nse-1").unwrap();
    let mut ctx = p2p_context();
    let ipc = ctx.ip_context.as_mut().unwrap();
    ipc.dst_ip_addrs = vec!["172.16.0.9/32".into()];
    ipc.dst_routes = vec![
        route("172.16.0.2/32", ""),
        route("10.70.0.0/16", "172.16.0.3"),
    ];
    let new = plan_from_context(&ctx, PodSide::Endpoint, "nse-1").unwrap();
    let ops = Plan::changes(Some(&old), &new);
    let back: Vec<Op> = ops.iter().rev().filter_map(Op::inverse).collect();
    let there = simulate(&old, &ops);
    assert_eq!(there, simulate(&new, &[]));
    let mut state = there;
    apply_sim(&mut state, &back);
    assert_eq!(state, simulate(&old, &[]));
}

#[test]
fn undo_removes_everything_the_plan_added() {
    let mut ctx = p2p_context();
    ctx.ip_context.as_mut().unwrap().ip_neighbors = vec![IpNeighbor {
        ip: "172.16.0.1".into(),
        hardware_address: "02:00:00:00:00:01".into(),
    }];
    let plan = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap();
    let state = simulate(&plan, &plan.undo());
    assert!(state.addresses.is_empty() && state.routes.is_empty() && state.neighbours.is_empty());
}

#[test]
fn a_plan_for_another_interface_is_applied_from_scratch() {
    let old = plan_from_context(&p2p_context(), PodSide::Client, "nsm-1").unwrap();
    let new = plan_from_context(&p2p_context(), PodSide::Client, "nsm-2").unwrap();
    assert_eq!(Plan::changes(Some(&old), &new), Plan::changes(None, &new));
}

/// A tiny model of one interface's kernel state, to check what a list of ops does.
#[derive(Debug, Default, PartialEq, Eq)]
struct SimState {
    mtu: Option<Mtu>,
    addresses: Vec<IpNet>,
    routes: HashMap<(u32, IpNet), Route>,
    neighbours: HashMap<IpAddr, Neighbour>,
    rules: Vec<Rule>,
}

fn simulate(start: &Plan, ops: &[Op]) -> SimState {
    let mut s = SimState::default();
    apply_sim(&mut s, &Plan::changes(None, start));
    apply_sim(&mut s, ops);
    s
}

fn apply_sim(s: &mut SimState, ops: &[Op]) {
    for op in ops {
        match *op {
            Op::SetMtu { mtu, .. } => s.mtu = Some(mtu),
            Op::SetUp | Op::SetMac(_) => {}
            Op::AddAddress(a) => {
                if !s.addresses.contains(&a) {
                    s.addresses.push(a);
                }
            }
            Op::DelAddress(a) => s.addresses.retain(|x| *x != a),
            Op::AddRoute(r) => {
                s.routes.insert((r.table(), r.dst()), r);
            }
            Op::DelRoute(r) => {
                s.routes.remove(&(r.table(), r.dst()));
            }
            Op::AddNeighbour(n) => {
                s.neighbours.insert(n.ip, n);
            }
            Op::DelNeighbour(n) => {
                s.neighbours.remove(&n.ip);
            }
            Op::AddRule(r) => {
                if !s.rules.contains(&r) {
                    s.rules.push(r);
                }
            }
            Op::DelRule(r) => s.rules.retain(|x| *x != r),
        }
    }
    s.addresses.sort();
    s.rules.sort_by_key(|r| r.table());
}

#[test]
fn an_alias_the_kernel_would_refuse_is_invalid_and_the_alias_is_not_an_op() {
    let name = || IfName::new("nsm-1").unwrap();
    for bad in ["", "a\0b"] {
        let err = Plan::new(name()).with_alias(bad).check().unwrap_err();
        assert!(
            matches!(err, Error::InvalidAlias { .. }),
            "{bad:?}: {err:?}"
        );
    }
    let err = Plan::new(name())
        .with_alias("x".repeat(MAX_ALIAS_LEN + 1))
        .check()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidAlias { .. }));
    let longest = Plan::new(name()).with_alias("x".repeat(MAX_ALIAS_LEN));
    longest.check().unwrap();
    assert_eq!(longest.alias().map(str::len), Some(MAX_ALIAS_LEN));

    // Plans that differ only by alias need no kernel change.
    assert!(Plan::changes(Some(&Plan::new(name())), &longest).is_empty());
    assert_eq!(
        Plan::changes(None, &longest),
        Plan::changes(None, &Plan::new(name()))
    );
}

fn policy_route(
    from: &str,
    proto: &str,
    dport: &str,
    sport: &str,
    routes: Vec<ProtoRoute>,
) -> PolicyRoute {
    PolicyRoute {
        from: from.into(),
        proto: proto.into(),
        dst_port: dport.into(),
        src_port: sport.into(),
        routes,
    }
}

fn with_policies(policies: Vec<PolicyRoute>) -> ConnectionContext {
    let mut ctx = p2p_context();
    ctx.ip_context.as_mut().unwrap().policies = policies;
    ctx
}

/// `from 172.16.0.2/32 ipproto tcp dport 8080` via the endpoint, and `from
/// 172.16.0.2 sport 1000-2000` with no route of its own.
fn two_policies() -> ConnectionContext {
    with_policies(vec![
        policy_route(
            "172.16.0.2/32",
            "tcp",
            "8080",
            "",
            vec![route("10.80.0.7/16", "172.16.0.1")],
        ),
        policy_route("172.16.0.2", "", "", "1000-2000", vec![]),
    ])
}

fn ports(a: u16, b: u16) -> PortRange {
    PortRange::new(a, b).unwrap()
}

/// The plan with tables as if the namespace used none.
fn assigned(plan: Plan, old: Option<&Plan>) -> Plan {
    plan.assign_tables(old, &BTreeSet::new(), &[]).unwrap()
}

#[test]
fn each_policy_route_becomes_a_rule_and_routes_of_its_own_on_the_client_side_only() {
    let plan = plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap();
    let [tcp, sport] = plan.policies() else {
        panic!("{:?}", plan.policies())
    };
    assert_eq!(
        *tcp.rule(),
        Rule::new(Family::V4)
            .with_from(net("172.16.0.2/32"))
            .with_proto(6)
            .with_dst_port(ports(8080, 8080))
    );
    assert_eq!(
        tcp.routes(),
        [Route::universe(net("10.80.0.0/16"), Some(ip("172.16.0.1"))).in_table(0)],
        "masked, with its own next hop"
    );
    assert_eq!(tcp.table(), None, "chosen when applied");
    assert_eq!(
        *sport.rule(),
        Rule::new(Family::V4)
            .with_from(net("172.16.0.2/32"))
            .with_src_port(ports(1000, 2000))
    );
    assert_eq!(
        sport.routes(),
        [Route::universe(net("0.0.0.0/0"), None).in_table(0)],
        "a policy without routes gets a default route"
    );
    assert_eq!(
        plan.routes(),
        plan_from_context(&p2p_context(), PodSide::Client, "nsm-1")
            .unwrap()
            .routes(),
        "the main table is unchanged"
    );
    let endpoint = plan_from_context(&two_policies(), PodSide::Endpoint, "nse-1").unwrap();
    assert!(endpoint.policies().is_empty());
}

#[test]
fn protocols_are_taken_by_name_or_number_and_the_family_follows_the_source() {
    for (proto, number) in [
        ("tcp", 6),
        ("UDP", 17),
        ("icmp", 1),
        ("icmpv6", 58),
        ("47", 47),
    ] {
        let p = policy_from_context(&policy_route("", proto, "", "", vec![])).unwrap();
        assert_eq!(p.rule().proto(), Some(number), "{proto}");
        assert_eq!(p.rule().family(), Family::V4);
        assert_eq!(p.rule().from(), None);
    }
    let v6 = policy_from_context(&policy_route("2001:db8::2", "", "", "", vec![])).unwrap();
    assert_eq!(v6.rule().family(), Family::V6);
    assert_eq!(v6.rule().from(), Some(net("2001:db8::2/128")));
    assert_eq!(
        v6.routes(),
        [Route::universe(net("::/0"), None).in_table(0)]
    );
    let v6_routes = policy_from_context(&policy_route(
        "",
        "",
        "",
        "",
        vec![route("2001:db8:5::/48", "")],
    ))
    .unwrap();
    assert_eq!(v6_routes.rule().family(), Family::V6);
}

#[test]
fn bad_policy_values_are_invalid_argument_naming_the_field() {
    let cases = [
        (
            "ip_context.policies.proto",
            policy_route("", "tcpx", "", "", vec![]),
        ),
        (
            "ip_context.policies.proto",
            policy_route("", "0", "", "", vec![]),
        ),
        (
            "ip_context.policies.proto",
            policy_route("", "256", "", "", vec![]),
        ),
        (
            "ip_context.policies.dst_port",
            policy_route("", "tcp", "0", "", vec![]),
        ),
        (
            "ip_context.policies.dst_port",
            policy_route("", "tcp", "65535", "", vec![]),
        ),
        (
            "ip_context.policies.dst_port",
            policy_route("", "tcp", "8080-80", "", vec![]),
        ),
        (
            "ip_context.policies.dst_port",
            policy_route("", "tcp", "80-", "", vec![]),
        ),
        (
            "ip_context.policies.dst_port",
            policy_route("", "tcp", "+80", "", vec![]),
        ),
        (
            "ip_context.policies.dst_port",
            policy_route("", "tcp", "http", "", vec![]),
        ),
        (
            "ip_context.policies.src_port",
            policy_route("", "tcp", "", "70000", vec![]),
        ),
        (
            "ip_context.policies.from",
            policy_route("172.16.0.300/32", "", "", "", vec![]),
        ),
        (
            "ip_context.policies.routes",
            policy_route("", "", "", "", vec![route("10.0.0.0/33", "")]),
        ),
    ];
    for (field, bad) in cases {
        let ctx = with_policies(vec![bad.clone()]);
        let err = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with(field), "{bad:?}: {text}");
        assert!(
            matches!(
                nsm_sdk::Error::from(err),
                nsm_sdk::Error::InvalidArgument(_)
            ),
            "{bad:?}"
        );
        assert!(
            plan_from_context(&ctx, PodSide::Endpoint, "nse-1").is_ok(),
            "the endpoint side does not read policies"
        );
    }
    assert_eq!(PortRange::parse("1-65534"), Some(ports(1, 65534)));
    assert_eq!(
        PortRange::parse("8080").map(|r| r.to_string()),
        Some("8080".into())
    );
}

#[test]
fn tables_are_the_lowest_free_ids_from_the_base_and_a_refresh_keeps_them() {
    let plan = plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap();
    assert!(plan.needs_tables(None));
    let in_use = BTreeSet::from([100, 101, 103, 254, 255]);
    let applied = plan.clone().assign_tables(None, &in_use, &[]).unwrap();
    let tables: Vec<_> = applied.policies().iter().map(Policy::table).collect();
    assert_eq!(tables, [Some(102), Some(104)]);
    assert!(applied.policies()[0]
        .routes()
        .iter()
        .all(|r| r.table() == 102));

    // A refresh with the same policies: same tables, no kernel lookup, no op.
    assert!(!plan.needs_tables(Some(&applied)));
    let again = assigned(plan, Some(&applied));
    assert_eq!(again, applied);
    assert!(Plan::changes(Some(&applied), &again).is_empty());
}

#[test]
fn the_kernel_tables_253_to_255_are_never_taken() {
    let plan = plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap();
    let in_use: BTreeSet<u32> = (100..=252).collect();
    let applied = plan.assign_tables(None, &in_use, &[]).unwrap();
    let tables: Vec<_> = applied.policies().iter().map(Policy::table).collect();
    assert_eq!(tables, [Some(256), Some(257)]);
}

#[test]
fn a_rule_left_by_a_dead_forwarder_gives_its_table_back() {
    let plan = plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap();
    let tcp = *plan.policies()[0].rule();
    let left = [tcp.with_table(7), tcp.with_table(120)];
    let in_use = BTreeSet::from([7, 120]);
    let applied = plan.assign_tables(None, &in_use, &left).unwrap();
    let tables: Vec<_> = applied.policies().iter().map(Policy::table).collect();
    // Table 7 is below the base: not ours to take over.
    assert_eq!(tables, [Some(120), Some(100)]);
}

#[test]
fn a_fresh_plan_fills_each_table_before_its_rule_points_at_it() {
    let plan = assigned(
        plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap(),
        None,
    );
    let [tcp, sport] = plan.policies() else {
        panic!()
    };
    let ops = Plan::changes(None, &plan);
    assert_eq!(
        ops[ops.len() - 4..],
        [
            Op::AddRoute(tcp.routes()[0]),
            Op::AddRule(*tcp.rule()),
            Op::AddRoute(sport.routes()[0]),
            Op::AddRule(*sport.rule()),
        ]
    );
    assert_eq!(tcp.rule().table(), 100);
    assert_eq!(
        ops[ops.len() - 3].to_string(),
        "add rule from 172.16.0.2/32 ipproto 6 dport 8080 lookup 100"
    );
}

#[test]
fn a_changed_policy_replaces_the_old_one_rule_first_and_gets_another_table() {
    let old = assigned(
        plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap(),
        None,
    );
    let ctx = with_policies(vec![
        policy_route(
            "172.16.0.2/32",
            "tcp",
            "9090",
            "",
            vec![route("10.80.0.7/16", "172.16.0.1")],
        ),
        policy_route("172.16.0.2", "", "", "1000-2000", vec![]),
    ]);
    let new = assigned(
        plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap(),
        Some(&old),
    );
    assert_eq!(
        new.policies()[0].table(),
        Some(102),
        "100 and 101 are the old plan's"
    );
    assert_eq!(new.policies()[1], old.policies()[1], "unchanged");
    let ops = Plan::changes(Some(&old), &new);
    assert_eq!(
        ops,
        [
            Op::DelRule(*old.policies()[0].rule()),
            Op::DelRoute(old.policies()[0].routes()[0]),
            Op::AddRoute(new.policies()[0].routes()[0]),
            Op::AddRule(*new.policies()[0].rule()),
        ]
    );
    assert_eq!(simulate(&old, &ops), simulate(&new, &[]));
}

#[test]
fn a_policy_with_new_routes_keeps_its_rule_and_table() {
    let old = assigned(
        plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap(),
        None,
    );
    let mut ctx = two_policies();
    ctx.ip_context.as_mut().unwrap().policies[0].routes = vec![route("10.90.0.0/16", "")];
    let new = assigned(
        plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap(),
        Some(&old),
    );
    let ops = Plan::changes(Some(&old), &new);
    assert_eq!(
        ops,
        [
            Op::DelRoute(old.policies()[0].routes()[0]),
            Op::AddRoute(Route::universe(net("10.90.0.0/16"), None).in_table(100)),
        ]
    );
    assert_eq!(simulate(&old, &ops), simulate(&new, &[]));
}

#[test]
fn dropping_the_last_ipv4_address_reinstalls_the_policy_routes_too() {
    let name = || IfName::new("nsm-1").unwrap();
    let policy = Policy::new(Rule::new(Family::V4).with_proto(17))
        .with_route(Route::universe(net("10.0.0.0/8"), Some(ip("172.16.0.1"))));
    let old = assigned(
        Plan::new(name())
            .with_address(net("172.16.0.2/32"))
            .with_policy(policy.clone()),
        None,
    );
    let new = assigned(Plan::new(name()).with_policy(policy), Some(&old));
    let r = new.policies()[0].routes()[0];
    assert_eq!(
        Plan::changes(Some(&old), &new),
        [
            Op::DelRoute(r),
            Op::DelAddress(net("172.16.0.2/32")),
            Op::AddRoute(r)
        ]
    );
}

#[test]
fn undo_removes_the_rules_first_then_everything_else() {
    let plan = assigned(
        plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap(),
        None,
    );
    let ops = plan.undo();
    assert!(
        matches!(ops[..2], [Op::DelRule(_), Op::DelRule(_)]),
        "{ops:?}"
    );
    assert_eq!(simulate(&plan, &[]).rules.len(), 2);
    let left = simulate(&plan, &ops);
    assert!(left.rules.is_empty() && left.routes.is_empty() && left.addresses.is_empty());
}

#[test]
fn policies_without_a_table_are_not_part_of_the_diff() {
    let plan = plan_from_context(&two_policies(), PodSide::Client, "nsm-1").unwrap();
    let ops = Plan::changes(None, &plan);
    assert!(ops.iter().all(|op| !matches!(op, Op::AddRule(_))
        && !matches!(op, Op::AddRoute(r) if r.table() != MAIN_TABLE)));
    assert!(plan.undo().iter().all(|op| !matches!(op, Op::DelRule(_))));
}

#[test]
fn two_policies_with_the_same_rule_are_one_the_later_wins() {
    let ctx = with_policies(vec![
        policy_route(
            "172.16.0.2/32",
            "tcp",
            "80",
            "",
            vec![route("10.1.0.0/16", "")],
        ),
        policy_route(
            "172.16.0.2/32",
            "6",
            "80",
            "",
            vec![route("10.2.0.0/16", "")],
        ),
    ]);
    let plan = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap();
    assert_eq!(plan.policies().len(), 1);
    assert_eq!(plan.policies()[0].routes()[0].dst(), net("10.2.0.0/16"));
}

#[test]
fn an_end_gets_a_stable_hardware_address_from_its_first_ip_set_once_at_creation() {
    use crate::plan::stable_mac;
    use nsm_proto::connectioncontext::{ConnectionContext, IpContext};
    assert_eq!(
        stable_mac("172.16.80.1".parse().unwrap()),
        [0x02, 0xfe, 172, 16, 80, 1]
    );
    assert_eq!(
        stable_mac("fd00::1:2:3:4".parse().unwrap()),
        [0x02, 0xfe, 0, 3, 0, 4]
    );
    let ctx = ConnectionContext {
        ip_context: Some(IpContext {
            src_ip_addrs: vec!["172.16.80.2/32".into()],
            dst_ip_addrs: vec!["172.16.80.1/32".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let client = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap();
    let endpoint = plan_from_context(&ctx, PodSide::Endpoint, "nse-1").unwrap();
    assert_eq!(client.mac(), Some([0x02, 0xfe, 172, 16, 80, 2]));
    assert_eq!(endpoint.mac(), Some([0x02, 0xfe, 172, 16, 80, 1]));
    let created = Plan::changes(None, &endpoint);
    let mac_at = created.iter().position(|o| matches!(o, Op::SetMac(_)));
    let up_at = created.iter().position(|o| matches!(o, Op::SetUp));
    assert!(mac_at.is_some() && mac_at < up_at, "{created:?}");
    assert!(
        !Plan::changes(
            Some(&client),
            &endpoint.clone().with_mac([2, 0, 0, 0, 0, 1])
        )
        .iter()
        .any(|o| matches!(o, Op::SetMac(_)))
            || client.ifname() != endpoint.ifname(),
        "a refresh never changes the address of a live link"
    );
    let refreshed = Plan::changes(
        Some(&endpoint),
        &endpoint.clone().with_mac([2, 0, 0, 0, 0, 1]),
    );
    assert!(
        refreshed.is_empty(),
        "a refresh never changes the address of a live link: {refreshed:?}"
    );
    // No address, no hardware address of ours.
    let bare = plan_from_context(&ConnectionContext::default(), PodSide::Client, "nsm-1").unwrap();
    assert_eq!(bare.mac(), None);
}
