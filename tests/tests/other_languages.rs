//! Clients in other languages over the manager's unix socket (README, "Clients in
//! other languages").
//!
//! gRPC C-core (here Python's `grpcio`, with default channel options) sends the socket
//! path as `:authority`, which h2 alone refuses with PROTOCOL_ERROR; the unix-socket
//! listener replaces it (`transport::authority`). The stubs are generated at test time
//! from `proto/proto/` with `grpc_tools.protoc`, as a user of another language would.
//! `run-tests.sh` installs `grpcio` and `grpcio-tools` from PyPI; without them (or
//! without python3) the test prints a skip line and passes.
//!
//! The manager runs insecure here, and the test says why: grpcio's TLS checks a host
//! name, and our SVIDs carry only a SPIFFE ID (a Python client in a mesh talks mTLS with
//! a SPIFFE helper). The rewrite sits after the TLS handshake, on the same code path
//! with or without TLS; the Rust test of the same `:authority` over mTLS is
//! `nsm-sdk`'s `transport::tests::a_socket_path_authority_is_answered_over_mtls`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nsm_tests::TempDir;

const READY: Duration = Duration::from_secs(15);

/// The Python client: a Close of a connection the manager does not know (answered Ok
/// without going down the chain), then a Request that no forwarder can serve (a
/// well-formed gRPC error of the manager). Prints one line per call.
const CLIENT: &str = r#"
import sys, grpc
sys.path.insert(0, sys.argv[2])
import connection_pb2, networkservice_pb2, networkservice_pb2_grpc
channel = grpc.insecure_channel("unix://" + sys.argv[1])
stub = networkservice_pb2_grpc.NetworkServiceStub(channel)
conn = connection_pb2.Connection(
    id="py-1",
    network_service="icmp-responder",
    path=connection_pb2.Path(index=0, path_segments=[connection_pb2.PathSegment(name="py", id="py-1")]),
)
stub.Close(conn, timeout=10)
print("close ok", flush=True)
try:
    stub.Request(networkservice_pb2.NetworkServiceRequest(connection=conn), timeout=10)
    print("request ok", flush=True)
except grpc.RpcError as e:
    print("request error", e.code().name, e.details(), flush=True)
"#;

fn python_with_grpc() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: the grpcio client test needs python3 with grpcio and grpcio-tools");
    }
    ok
}

/// Generates the Python stubs of the NSM protos into `out`.
fn generate_stubs(out: &Path) {
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
    let status = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", protos.display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .args([
            "connection.proto",
            "connectioncontext.proto",
            "networkservice.proto",
        ])
        .current_dir(&protos)
        .status()
        .expect("python3 -m grpc_tools.protoc");
    assert!(status.success(), "protoc of grpc_tools failed: {status}");
}

#[test]
fn a_grpcio_client_with_default_options_is_answered_over_the_managers_socket() {
    if !python_with_grpc() {
        return;
    }
    let dir = TempDir::new("nsm-grpcio", "grpcio");
    generate_stubs(&dir.0);
    let registry_url = dir.unix("registry.sock");
    let nsmgr_url = dir.unix("nsmgr.sock");
    // Insecure only because grpcio's TLS wants a host name (see the module docs).
    let insecure = ("NSM_INSECURE", "true");
    let mut registry = nsm_tests::start(
        &dir,
        "nsm-registry",
        "registry",
        &[("NSM_LISTEN_ON", &registry_url), insecure],
        false,
        READY,
    );
    registry.wait_for_log(&["serving", &registry_url]);
    let mut nsmgr = nsm_tests::start(
        &dir,
        "nsmgr",
        "nsmgr",
        &[
            ("NSM_NAME", "nsmgr"),
            ("NSM_LISTEN_ON", &nsmgr_url),
            ("NSM_REGISTRY_URL", &registry_url),
            insecure,
        ],
        false,
        READY,
    );
    nsmgr.wait_for_log(&["serving", &nsmgr_url]);

    let socket = nsmgr_url.trim_start_matches("unix://");
    let out = Command::new("timeout")
        .args(["30", "python3", "-c", CLIENT, socket])
        .arg(&dir.0)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client failed: {}\nstdout: {stdout}\nstderr: {stderr}\nnsmgr: {}",
        out.status,
        nsmgr.log()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"close ok"), "{stdout}\n{stderr}");
    let request = lines.get(1).copied().unwrap_or_default();
    // No forwarder: the manager's own answer, a gRPC status with its reason, not a
    // transport failure (which grpcio reports as UNAVAILABLE or INTERNAL).
    assert!(
        request.starts_with("request error NOT_FOUND") && request.contains("no forwarder"),
        "{stdout}"
    );
    eprintln!("grpcio: {stdout}");
    nsmgr.terminate();
    registry.terminate();
}
