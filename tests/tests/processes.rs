//! The example programs (crate `nsm-examples`) as separate processes, talking gRPC over
//! unix sockets and TCP on 127.0.0.1: a local mesh, a two-node mesh, and bad input.
//!
//! The binaries are looked up in the target directory this test runs from
//! (`target/<profile>/`). `cargo test --workspace` and `cargo nextest run --workspace`
//! build them; `cargo test -p nsm-tests --test processes` alone does not, so this test
//! runs `cargo build -p nsm-examples --bins` first when one is missing (run it yourself
//! after changing the examples, or the test uses the old binaries).
//!
//! Every process is killed when its test ends, pass or fail; a failing test prints the
//! logs of its processes (kept in the test's temp directory). Readiness is waited for
//! by polling log lines, never by sleeping. `NSM_TEST_LOG_LEVEL` sets the programs' log
//! level (default `info`).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use nsm_tests::{Proc, TempDir};
use serde_json::Value;

/// How long a process may take to get ready, or to do what a step waits for.
const READY: Duration = Duration::from_secs(20);
/// How long a process may take to exit after SIGTERM.
const EXIT: Duration = Duration::from_secs(10);

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn tcp(port: u16) -> String {
    format!("tcp://127.0.0.1:{port}")
}

/// Starts programs with their settings in a test's directory.
struct Mesh {
    dir: TempDir,
    env: Vec<(String, String)>,
}

impl Mesh {
    fn new(test: &str) -> Mesh {
        Mesh {
            dir: TempDir::new("nsm", test),
            env: Vec::new(),
        }
    }

    /// Sets `key=value` for every program started from now on.
    fn with_env(mut self, key: &str, value: &str) -> Mesh {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts `program` as `name` with the mesh's and `env`'s variables
    /// ([`nsm_tests::start`]).
    fn start(&self, program: &str, name: &str, env: &[(&str, &str)], capture_stdout: bool) -> Proc {
        let all: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(env.iter().copied())
            .collect();
        nsm_tests::start(&self.dir, program, name, &all, capture_stdout, READY)
    }

    fn registry(&self, listen_on: &str) -> Proc {
        let mut p = self.start(
            "nsm-registry",
            "registry",
            &[("NSM_LISTEN_ON", listen_on)],
            false,
        );
        p.wait_for_log(&["serving", listen_on]);
        p
    }

    fn nsmgr(&self, name: &str, listen_on: &str, registry: &str) -> Proc {
        let mut p = self.start(
            "nsmgr",
            name,
            &[
                ("NSM_NAME", name),
                ("NSM_LISTEN_ON", listen_on),
                ("NSM_REGISTRY_URL", registry),
            ],
            false,
        );
        p.wait_for_log(&["serving", listen_on]);
        p
    }

    fn forwarder(&self, name: &str, listen_on: &str, nsmgr: &str) -> Proc {
        let mut p = self.start(
            "nsm-forwarder",
            name,
            &[
                ("NSM_NAME", name),
                ("NSM_LISTEN_ON", listen_on),
                ("NSM_CONNECT_TO", nsmgr),
                ("NSM_TUNNEL_IP", "127.0.0.1"),
            ],
            false,
        );
        p.wait_for_log(&["registered endpoint", &format!("name={name}")]);
        p
    }

    fn icmp_responder(&self, name: &str, listen_on: &str, nsmgr: &str) -> Proc {
        let mut p = self.start(
            "nse-icmp-responder",
            name,
            &[
                ("NSM_NAME", name),
                ("NSM_LISTEN_ON", listen_on),
                ("NSM_CONNECT_TO", nsmgr),
                ("NSM_SERVICE_NAMES", "icmp-responder"),
                ("NSM_LABELS", "app=icmp"),
                ("NSM_CIDR_PREFIX", "172.16.1.100/31,169.254.0.0/16"),
            ],
            false,
        );
        p.wait_for_log(&["registered endpoint", &format!("name={name}")]);
        p
    }

    fn nsc(&self, nsmgr: &str, services: &str, timeout: &str) -> Proc {
        self.start(
            "nsc",
            "nsc",
            &[
                ("NSM_NAME", "nsc"),
                ("NSM_CONNECT_TO", nsmgr),
                ("NSM_NETWORK_SERVICES", services),
                ("NSM_REQUEST_TIMEOUT", timeout),
                // The NSC runs in the test's own namespace: KERNEL would put its
                // interface there (kernel_processes.rs runs it inside pods).
                ("NSM_MECHANISM", "noop"),
            ],
            true,
        )
    }
}

/// The names of the connection's path segments, and their ids.
fn path_of(conn: &Value) -> (Vec<String>, Vec<String>) {
    let segments = conn["path"]["pathSegments"]
        .as_array()
        .unwrap_or_else(|| panic!("no path segments in {conn}"));
    let field = |f: &str| {
        segments
            .iter()
            .map(|s| s[f].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    (field("name"), field("id"))
}

/// Asserts what nsc printed: the path, the NOOP mechanism, and a point-to-point pair.
fn check_connection(line: &str, expected_path: &[&str]) -> Value {
    let conn: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("nsc printed no JSON ({e}): {line}"));
    let (names, ids) = path_of(&conn);
    assert_eq!(names, expected_path, "{conn}");
    assert!(ids.iter().all(|id| !id.is_empty()), "{conn}");
    assert_eq!(conn["id"].as_str(), Some(ids[0].as_str()), "{conn}");
    assert_eq!(conn["networkService"], "icmp-responder", "{conn}");
    assert_eq!(conn["mechanism"]["type"], "NOOP", "{conn}");
    assert_eq!(conn["labels"]["app"], "icmp", "{conn}");
    let ip = &conn["context"]["ipContext"];
    assert_eq!(
        ip["srcIpAddrs"],
        serde_json::json!(["172.16.1.101/32"]),
        "{conn}"
    );
    assert_eq!(
        ip["dstIpAddrs"],
        serde_json::json!(["172.16.1.100/32"]),
        "{conn}"
    );
    conn
}

/// After nsc's SIGTERM: nsc exits 0 and the endpoint logs the Close of its own
/// segment's connection id.
fn check_close(nsc: &mut Proc, nse: &mut Proc, conn: &Value) {
    nsc.terminate();
    let (_, ids) = path_of(conn);
    let nse_id = ids.last().expect("a path");
    nse.wait_for_log(&["close received", &format!("connection_id={nse_id}")]);
}

#[test]
fn local_mesh_over_unix_sockets() {
    let mesh = Mesh::new("local");
    let (reg_url, nsmgr_url) = (mesh.dir.unix("reg.sock"), mesh.dir.unix("nsmgr.sock"));
    let mut registry = mesh.registry(&reg_url);
    let mut nsmgr = mesh.nsmgr("nsmgr", &nsmgr_url, &reg_url);
    let mut fwd = mesh.forwarder("forwarder", &mesh.dir.unix("fwd.sock"), &nsmgr_url);
    let mut nse = mesh.icmp_responder("nse", &mesh.dir.unix("nse.sock"), &nsmgr_url);

    let mut nsc = mesh.nsc(&nsmgr_url, "kernel://icmp-responder/nsm-1?app=icmp", "15s");
    let conn = check_connection(
        &nsc.next_stdout_line(),
        &["nsc", "nsmgr", "forwarder", "nse"],
    );
    nsc.wait_for_log(&["requesting NOOP instead"]);
    check_close(&mut nsc, &mut nse, &conn);

    // Everything else stops cleanly too, the endpoint and forwarder unregistering.
    nse.terminate();
    assert!(nse.log().contains("unregistered endpoint"), "{}", nse.log());
    fwd.terminate();
    assert!(fwd.log().contains("unregistered endpoint"), "{}", fwd.log());
    nsmgr.terminate();
    registry.terminate();
}

#[test]
fn remote_mesh_over_tcp() {
    let mesh = Mesh::new("remote");
    let reg_url = tcp(free_port());
    let (nsmgr1_url, nsmgr2_url) = (tcp(free_port()), tcp(free_port()));
    let any_port = tcp(0);
    let _registry = mesh.registry(&reg_url);
    let _nsmgr1 = mesh.nsmgr("nsmgr-1", &nsmgr1_url, &reg_url);
    let _nsmgr2 = mesh.nsmgr("nsmgr-2", &nsmgr2_url, &reg_url);
    let _fwd1 = mesh.forwarder("fwd-1", &any_port, &nsmgr1_url);
    let _fwd2 = mesh.forwarder("fwd-2", &any_port, &nsmgr2_url);
    let mut nse = mesh.icmp_responder("nse", &any_port, &nsmgr2_url);

    let mut nsc = mesh.nsc(&nsmgr1_url, "kernel://icmp-responder?app=icmp", "15s");
    let conn = check_connection(
        &nsc.next_stdout_line(),
        &["nsc", "nsmgr-1", "fwd-1", "nsmgr-2", "fwd-2", "nse"],
    );
    check_close(&mut nsc, &mut nse, &conn);
}

#[test]
fn registrations_outlive_the_registry_expiry() {
    let mesh = Mesh::new("refresh")
        .with_env("NSM_EXPIRE_AFTER", "2s")
        .with_env(
            "NSM_LOG_LEVEL",
            "info,nsm_sdk::registry::registry_refresh=debug",
        );
    let (reg_url, nsmgr_url) = (mesh.dir.unix("reg.sock"), mesh.dir.unix("nsmgr.sock"));
    let registry = mesh.registry(&reg_url);
    let _nsmgr = mesh.nsmgr("nsmgr", &nsmgr_url, &reg_url);
    let mut fwd = mesh.forwarder("forwarder", &mesh.dir.unix("fwd.sock"), &nsmgr_url);
    let mut nse = mesh.icmp_responder("nse", &mesh.dir.unix("nse.sock"), &nsmgr_url);

    // Refreshes (nsm-sdk's registry_refresh) come at 2/3 of the 2 s expiry, jittered:
    // four of them take the entries past the expiry of their first registration.
    nse.wait_for_lines(&["registration refreshed", "name=nse"], 4);
    fwd.wait_for_lines(&["registration refreshed", "name=forwarder"], 4);
    assert!(!registry.log().contains("expired"), "{}", registry.log());

    let mut nsc = mesh.nsc(&nsmgr_url, "kernel://icmp-responder?app=icmp", "15s");
    check_connection(
        &nsc.next_stdout_line(),
        &["nsc", "nsmgr", "forwarder", "nse"],
    );
}

#[test]
fn nsc_refuses_a_bad_ns_url_with_one_line() {
    let mesh = Mesh::new("bad-url");
    for bad in ["", "icmp-responder", "kernel://icmp-responder:80"] {
        let mut nsc = mesh.nsc(&mesh.dir.unix("nowhere.sock"), bad, "1s");
        let status = nsc.wait_exit(EXIT);
        assert_eq!(status.code(), Some(2), "{bad:?}: {status}");
        let log = nsc.log();
        assert_eq!(log.lines().count(), 1, "{bad:?}: {log}");
        assert!(
            log.starts_with("nsc: ") && log.contains("NS URL"),
            "{bad:?}: {log}"
        );
    }
}

#[test]
fn nsc_fails_with_not_found_for_an_unknown_service() {
    let mesh = Mesh::new("unknown");
    let (reg_url, nsmgr_url) = (mesh.dir.unix("reg.sock"), mesh.dir.unix("nsmgr.sock"));
    let _registry = mesh.registry(&reg_url);
    let _nsmgr = mesh.nsmgr("nsmgr", &nsmgr_url, &reg_url);
    let _fwd = mesh.forwarder("forwarder", &mesh.dir.unix("fwd.sock"), &nsmgr_url);

    let started = Instant::now();
    let mut nsc = mesh.nsc(&nsmgr_url, "kernel://no-such-service", "2s");
    let status = nsc.wait_exit(EXIT);
    // NotFound is retryable (a service may be registered in a moment): nsc retries for
    // its request timeout (less the last pause between tries) before it gives up.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(1), "{status}:\n{}", nsc.log());
    let log = nsc.log();
    let reason = log.lines().last().unwrap_or_default();
    assert!(
        reason.starts_with("nsc: request for kernel://no-such-service failed")
            && reason.contains("NotFound")
            && reason.contains("network service no-such-service not found"),
        "{log}"
    );
    assert!(nsc.next_stdout_line_or_none().is_none());
}
