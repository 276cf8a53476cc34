//! A forwarder SIGKILLed under load, KERNEL, with the example programs as processes, as
//! root (issue 16).
//!
//! `nsm-load --processes --mechanism kernel` sets up [`N`] connections (one client
//! namespace each, `nsmt-<pid>-<n>`, and one for the endpoint), SIGKILLs the forwarder
//! [`KILL_AFTER`] into the soak and starts it again at once
//! (`--kill-forwarder-after`), pings every connection from its client's namespace as
//! soon as heal says it healed and again at the end of the soak (`--ping-sample N`),
//! closes everything and counts the links left in its namespaces.
//!
//! While it runs, this test reads the kernel itself with `ip -j` (an independent
//! observer) every [`ROUND`]: in the endpoint's namespace (which holds the endpoint's
//! end of every pair) no alias — one per connection and side — and no address is on
//! two links at once, and in a rotating twentieth of the clients' namespaces each holds
//! at most one interface, and no address is on two interfaces across all of them. So a
//! restarted forwarder that made a second pair for a connection, or reused an address,
//! while its predecessor's pair was still there, is caught in the act.
//!
//! Then, from the report: every connection set up, broke, healed and answered a ping
//! after its heal and at the end; every Close succeeded; no link was left in any
//! namespace after Close; every program stopped cleanly; and no namespace is left.
//! The heal times are printed (`-- --nocapture`). Without root or `ip` it prints a
//! skip line and passes. About 25 s in a debug build.

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsm_tests::{bin, TempDir};
use serde_json::Value;

/// Connections under load.
const N: usize = 100;
/// When the forwarder is killed, into the soak.
const KILL_AFTER: &str = "3s";
/// How long the soak lasts: the heal has the rest of it.
const SOAK: &str = "15s";
/// How often the namespaces are read.
const ROUND: Duration = Duration::from_millis(150);
/// Client namespaces read per round (each read is two `ip` runs: the observer must not
/// starve the programs of CPU).
const CLIENTS_PER_ROUND: usize = N / 20;
/// How long the whole run may take.
const RUN_WITHIN: Duration = Duration::from_secs(120);

/// nsm-load, killed (with what it started) if the test fails first.
struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SIGTERM: it still closes what it made and deletes its namespaces.
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            let _ = self.0.wait();
        }
    }
}

/// `ip -n <netns> -j <what> show`, parsed; `None` when it fails (the namespace is
/// being made or deleted).
fn ip_json(netns: &str, what: &str) -> Option<Vec<Value>> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", what, "show"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A link as read: name, alias, global addresses.
type Read = (String, Option<String>, Vec<String>);

/// The links other than `lo`.
fn links(netns: &str) -> Option<Vec<Read>> {
    let aliases: BTreeMap<String, Option<String>> = ip_json(netns, "link")?
        .iter()
        .map(|l| {
            (
                l["ifname"].as_str().unwrap_or("?").to_string(),
                l["ifalias"].as_str().map(str::to_string),
            )
        })
        .collect();
    let addrs = ip_json(netns, "addr")?;
    Some(
        addrs
            .iter()
            .filter(|l| l["ifname"] != "lo")
            .map(|l| {
                let name = l["ifname"].as_str().unwrap_or("?").to_string();
                let local = l["addr_info"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|a| a["scope"] != "link")
                    .filter_map(|a| a["local"].as_str().map(str::to_string))
                    .collect();
                (name.clone(), aliases.get(&name).cloned().flatten(), local)
            })
            .collect(),
    )
}

/// Fails when a value is on two holders: `what` names the kind, `seen` maps each value
/// to its first holder.
fn once(seen: &mut BTreeMap<String, String>, value: &str, holder: &str, what: &str) {
    if let Some(first) = seen.insert(value.to_string(), holder.to_string()) {
        panic!("{what} {value} is on {first} and on {holder} at once");
    }
}

#[test]
fn a_forwarder_killed_under_100_kernel_connections_heals_every_one_with_nothing_twice() {
    nsm_testkit::require_root!("forwarder restart under load");
    let dir = TempDir::new("nsm", "kernel-restart");
    let load_path = bin("nsm-load");
    let bin_dir = load_path.parent().expect("a directory").to_path_buf();
    let n = N.to_string();
    let log = dir.0.join("nsm-load.log");
    let mut load = Load(
        Command::new(&load_path)
            .args(["--processes", "--mechanism", "kernel", "--clients", &n])
            .args(["--duration", SOAK, "--kill-forwarder-after", KILL_AFTER])
            .args(["--ping-sample", &n, "--no-progress"])
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--json")
            .arg(dir.0.join("report.json"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log"))
            .spawn()
            .expect("nsm-load starts"),
    );
    let prefix = format!("nsmt-{}-", load.0.id());
    let nse = format!("{prefix}{}", N + 1);

    // The observer, until nsm-load ends.
    let started = Instant::now();
    let (mut rounds, mut busiest) = (0usize, 0usize);
    let mut next_client = 1;
    let status = loop {
        if let Some(status) = load.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < RUN_WITHIN,
            "nsm-load still runs after {RUN_WITHIN:?}"
        );
        let mut addresses = BTreeMap::new();
        if let Some(ends) = links(&nse) {
            let mut aliases = BTreeMap::new();
            for (name, alias, addrs) in &ends {
                let holder = format!("{nse}/{name}");
                if let Some(alias) = alias {
                    once(&mut aliases, alias, &holder, "alias");
                }
                for a in addrs {
                    once(&mut addresses, a, &holder, "address");
                }
            }
            busiest = busiest.max(ends.len());
            rounds += 1;
        }
        for k in 0..CLIENTS_PER_ROUND {
            let pod = format!("{prefix}{}", (next_client + k - 1) % N + 1);
            let Some(ifs) = links(&pod) else { continue };
            assert!(ifs.len() <= 1, "{pod} holds {ifs:?}");
            for (name, _, addrs) in &ifs {
                for a in addrs {
                    once(&mut addresses, a, &format!("{pod}/{name}"), "address");
                }
            }
        }
        next_client = (next_client + CLIENTS_PER_ROUND - 1) % N + 1;
        std::thread::sleep(ROUND);
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.0.join("report.json"))
            .unwrap_or_else(|e| panic!("no report ({e}); nsm-load {status}:\n{text}")),
    )
    .expect("JSON");
    eprintln!(
        "{rounds} rounds read the endpoint's namespace (up to {busiest} links); soak {}",
        report["soak"]
    );
    assert!(
        rounds >= 50,
        "the observer read too little: {rounds} rounds"
    );
    assert_eq!(busiest, N, "the endpoint held one end per connection");

    assert_eq!(report["setup"]["ok"], N, "{report}");
    assert_eq!(report["close"]["ok"], N, "{report}");
    let soak = &report["soak"];
    // Every connection broke when its forwarder died and healed, once.
    assert_eq!(soak["heal_broken"], N, "{soak}");
    assert_eq!(soak["heal"]["healed"], N, "{soak}");
    assert_eq!(soak["heal"]["unhealed"], 0, "{soak}");
    let restart = &soak["forwarder_restart"];
    assert_eq!(restart["ping_sampled"], N, "{restart}");
    assert_eq!(restart["pinged_after_heal"], N, "{restart}");
    assert_eq!(soak["pings"]["ok"], N, "{soak}");
    eprintln!(
        "the last connection healed {} s after the new forwarder's start; the last answered a ping {} s after it",
        restart["last_healed_after_start_s"], restart["last_ping_after_start_s"]
    );
    assert_eq!(report["links_left_after_close"], 0, "{report}");
    for (name, how) in report["shutdown"].as_object().expect("shutdown") {
        assert_eq!(how, "exit 0", "{name}: {report}");
    }
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(!left.contains(&prefix), "namespaces left behind:\n{left}");
}
