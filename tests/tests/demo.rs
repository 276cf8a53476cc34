//! The README's first command: the `demo` program runs to the end and exits 0.
//!
//! As root (CI) it is the kernel demo: two nodes in network namespaces, a firewall and
//! a VPN gateway, VXLAN between the nodes, a heal after the gateway dies; every step is
//! checked inside the program, which exits 1 when a check fails. Without root it is the
//! sandbox version (NOOP). Either way this test reads what it printed.

use std::process::Command;
use std::time::{Duration, Instant};

use nsm_tests::bin;

/// Runs `demo <args>` to its end within `within`, which must exit 0; what it printed on
/// stderr, and its pid.
fn run_demo(args: &[&str], within: Duration) -> (String, u32) {
    let started = Instant::now();
    let child = Command::new(bin("demo"))
        .args(args)
        .env_remove("NSM_LOG_LEVEL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("the demo's output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "demo {args:?} failed ({}):\n{stderr}",
        out.status
    );
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
    (stderr, pid)
}

/// No network namespace named `<lab>...` is left.
fn no_lab_left(lab: &str) {
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !list.lines().any(|l| l.starts_with(lab)),
        "lab namespaces left: {list}"
    );
}

#[test]
fn the_demo_runs_every_step_and_exits_0() {
    let (stderr, pid) = run_demo(&[], Duration::from_secs(120));
    let lab = format!("nsmdemo-{pid}-");
    if stderr.contains("running the in-process sandbox version") {
        assert!(stderr.contains("path (4 segments)"), "{stderr}");
        return;
    }
    for line in [
        "[9/9]",
        "ok: the path starts at the client and passes the firewall",
        "ok: the pings crossed the underlay encapsulated",
        "ok: TCP to port 80 (allowed) connects",
        "ok: TCP to port 8080 (denied by the firewall) does not",
        "healed: the mesh rewired the firewall to gw-2",
        "ok: pod nsc: no interface left",
        "done in",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    // Its lab is gone (other tests' namespaces may be there).
    no_lab_left(&lab);
}

/// The same chain with the firewall on the gateway's node: VXLAN from the client to
/// the firewall, a veth pair from the firewall to the gateway (issue 5: "the firewall
/// on the same node as the client and on the other node"). In process, as root only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firewall_on_the_other_node_filters_the_same_and_heals() {
    if let Err(why) = nsm_examples::vpn_demo::can_run() {
        eprintln!("skipped: {why}");
        return;
    }
    nsm_examples::vpn_demo::run_with(nsm_examples::vpn_demo::FirewallNode::WithGateway)
        .await
        .unwrap();
}

/// `demo --vl3` (the vL3 act, as root): three nodes, two vL3 endpoints, six pods that
/// all ping each other over IPv4 and IPv6, every pod resolving every other by name, an
/// HTTP GET by name from a pod on another node; it exits 0 and leaves no namespace and
/// no resolv.conf. Without root it says so and exits 1; the test then skips.
#[test]
fn the_vl3_demo_pings_every_pair_and_gets_a_page_by_name() {
    if let Err(why) = nsm_testkit::lab::can_build() {
        eprintln!("skipped: {why}");
        return;
    }
    let (stderr, pid) = run_demo(&["--vl3"], Duration::from_secs(60));
    let lab = format!("nsmvl3-{pid}-");
    eprintln!("{stderr}");
    for line in [
        "[7/7]",
        "ok: vl3-a linked to vl3-b",
        "ok: 30 ordered pairs, 60 pings answered",
        "ok: every pod resolves the 5 others",
        "< HTTP/1.0 200 OK",
        "by its name",
        "ok: pod pod-3b: no interface and no resolv.conf left",
        "ok: pod vl3-b: no interface left",
        "done in",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    no_lab_left(&lab);
    let etc = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&lab))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(etc, 0, "/etc/netns/{lab}* left");
}

/// `demo --interdomain` (the interdomain act, as root): a pod of cluster-a reaches the
/// corporate network behind a VPN gateway of cluster-b over VXLAN through the public
/// addresses, the 8-segment path printed, a heal to the second gateway; the program
/// checks each step and exits 0, and leaves no namespace behind.
#[test]
fn the_interdomain_act_crosses_the_border_heals_and_exits_0() {
    if let Err(why) = nsm_examples::vpn_demo::can_run() {
        eprintln!("skipped: {why}");
        return;
    }
    if nsm_testkit::dnsmasq::dnsmasq("the interdomain demo").is_none() {
        return;
    }
    let (stderr, pid) = run_demo(&["--interdomain"], Duration::from_secs(120));
    for line in [
        "[8/8]",
        "path (8 segments):",
        "ok: 8 segments, from the client across both borders to gw-1",
        "ok: the client's side: its node's internal address, gw-1's node's public one",
        "ok: the pings crossed the public link encapsulated",
        "healed: gw-2 has its tunnel",
        "ok: the client's tunnel now goes to gw-2's node's public address",
        "ok: nsc: nothing left",
        "done in",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    no_lab_left(&format!("nsmdemo-{pid}-"));
}
