//! The guide programs, run as processes against a mesh of the example programs:
//! `embed-client` gets a connection through the SDK's client chain and closes it on
//! SIGTERM; `my-nsmgr` serves the request through the handler it inserted into the
//! manager chain. (The programs are built by `cargo build -p nsm-examples --bins`, or
//! by testing the workspace.)

use std::time::Duration;

use nsm_tests::{Proc, TempDir};

const READY: Duration = Duration::from_secs(20);

/// Starts a program of the mesh, its stdout captured.
fn start(dir: &TempDir, program: &str, name: &str, env: &[(&str, &str)]) -> Proc {
    nsm_tests::start(dir, program, name, env, true, READY)
}

/// A one-node mesh: the registry, `my-nsmgr`, a forwarder and `hello-endpoint`
/// (serving `hello`); returns them with the manager's URL.
fn mesh(dir: &TempDir) -> (Vec<Proc>, Proc, String) {
    let (reg, mgr) = (dir.unix("reg.sock"), dir.unix("nsmgr.sock"));
    let mut registry = start(dir, "nsm-registry", "registry", &[("NSM_LISTEN_ON", &reg)]);
    registry.wait_for_log(&["serving", &reg]);
    let mut nsmgr = start(
        dir,
        "my-nsmgr",
        "my-nsmgr",
        &[("NSM_LISTEN_ON", &mgr), ("NSM_REGISTRY_URL", &reg)],
    );
    nsmgr.wait_for_log(&["serving", &mgr]);
    let mut fwd = start(
        dir,
        "nsm-forwarder",
        "forwarder",
        &[
            ("NSM_NAME", "forwarder"),
            ("NSM_LISTEN_ON", &dir.unix("fwd.sock")),
            ("NSM_CONNECT_TO", &mgr),
        ],
    );
    fwd.wait_for_log(&["registered endpoint", "name=forwarder"]);
    let mut hello = start(
        dir,
        "hello-endpoint",
        "hello",
        &[
            ("NSM_NAME", "hello"),
            ("NSM_LISTEN_ON", &dir.unix("hello.sock")),
            ("NSM_CONNECT_TO", &mgr),
        ],
    );
    hello.wait_for_log(&["registered endpoint", "name=hello"]);
    (vec![registry, fwd, hello], nsmgr, mgr)
}

fn embed_client(dir: &TempDir, nsmgr: &str) -> Proc {
    start(
        dir,
        "embed-client",
        "embed-client",
        &[
            ("NSM_NAME", "app"),
            ("NSM_CONNECT_TO", nsmgr),
            ("NSM_NETWORK_SERVICE", "noop://hello"),
        ],
    )
}

#[test]
fn embed_client_connects_and_closes_on_sigterm() {
    let dir = TempDir::new("nsm", "embed-client");
    let (mut others, _nsmgr, mgr) = mesh(&dir);
    let mut app = embed_client(&dir, &mgr);

    let connected = app.next_stdout_line();
    assert!(connected.starts_with("connected "), "{connected}");
    assert!(connected.ends_with(" endpoint=hello"), "{connected}");
    let id = connected.split(' ').nth(1).expect("an id").to_string();

    app.terminate();
    assert_eq!(app.next_stdout_line(), format!("closed {id}"));
    // The close went through the mesh: the endpoint and the forwarder stay up, and
    // a new client connects again.
    assert!(others.iter_mut().all(Proc::running));
    let mut again = embed_client(&dir, &mgr);
    assert!(again.next_stdout_line().starts_with("connected "));
}

#[test]
fn my_nsmgr_serves_a_request_through_its_inserted_handler() {
    let dir = TempDir::new("nsm", "my-nsmgr");
    let (_others, mut nsmgr, mgr) = mesh(&dir);
    assert!(!nsmgr.log().contains("request counted"), "{}", nsmgr.log());
    let mut app = embed_client(&dir, &mgr);
    let connected = app.next_stdout_line();
    assert!(connected.ends_with(" endpoint=hello"), "{connected}");
    nsmgr.wait_for_log(&["request counted", "service=hello", "requests=1"]);

    app.terminate();
    nsmgr.terminate();
    nsmgr.wait_for_log(&["requests per network service", "\"hello\""]);
}
