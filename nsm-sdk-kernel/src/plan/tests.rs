use std::collections::HashMap;

use nsm_proto::connectioncontext::IpContext;

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
    routes: HashMap<IpNet, Route>,
    neighbours: HashMap<IpAddr, Neighbour>,
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
            Op::SetUp => {}
            Op::AddAddress(a) => {
                if !s.addresses.contains(&a) {
                    s.addresses.push(a);
                }
            }
            Op::DelAddress(a) => s.addresses.retain(|x| *x != a),
            Op::AddRoute(r) => {
                s.routes.insert(r.dst(), r);
            }
            Op::DelRoute(r) => {
                s.routes.remove(&r.dst());
            }
            Op::AddNeighbour(n) => {
                s.neighbours.insert(n.ip, n);
            }
            Op::DelNeighbour(n) => {
                s.neighbours.remove(&n.ip);
            }
        }
    }
    s.addresses.sort();
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
