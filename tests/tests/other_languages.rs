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
//! The same client over mTLS, with an X.509-SVID of the test's dev CA
//! (`nsm_sdk::security::DevCa`) and the bundle in `grpc.ssl_channel_credentials`, over
//! the unix socket and over TCP. grpcio checks the server's certificate against a
//! target name, which it also sends as SNI; an SVID carries only its SPIFFE ID (a URI
//! SAN). C-core would match a target name equal to the SPIFFE ID
//! (`grpc.ssl_target_name_override`), but the SNI `spiffe://...` is no host name and
//! rustls refuses the handshake (`ServerNameMustContainOneHostName`). So the manager's
//! SVID carries a DNS name as well (opt-in, `DevCa::issue_with_dns_names`; SPIRE:
//! the registration entry's DNS names), and the client names it with
//! `grpc.ssl_target_name_override`; without the option the handshake fails. The manager
//! answers from its chain (`NOT_FOUND`, no forwarder).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nsm_sdk::security::{jwt, SpiffeId, Svid};
use nsm_sdk::transport::metadata::format_rfc3339;
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

/// What each Python client prints, checked: the Close answered Ok, the Request the
/// manager's own NOT_FOUND (no forwarder), not a transport failure (which grpcio
/// reports as UNAVAILABLE or INTERNAL).
fn check_answers(stdout: &str, stderr: &str) {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"close ok"), "{stdout}\n{stderr}");
    let request = lines.get(1).copied().unwrap_or_default();
    assert!(
        request.starts_with("request error NOT_FOUND") && request.contains("no forwarder"),
        "{stdout}\n{stderr}"
    );
}

/// A registry and a manager on `nsmgr_url` with `env` (security settings: the
/// registry takes only `NSM_INSECURE` of them, else its own identity).
fn control_plane(dir: &TempDir, nsmgr_url: &str, env: &[(&str, &str)]) -> [nsm_tests::Proc; 2] {
    let registry_url = dir.unix("registry.sock");
    let mut reg_env = vec![("NSM_LISTEN_ON", registry_url.as_str())];
    reg_env.extend(env.iter().filter(|(k, _)| *k == "NSM_INSECURE"));
    let mut registry = nsm_tests::start(dir, "nsm-registry", "registry", &reg_env, false, READY);
    registry.wait_for_log(&["serving", &registry_url]);
    let mut mgr_env = vec![
        ("NSM_NAME", "nsmgr"),
        ("NSM_LISTEN_ON", nsmgr_url),
        ("NSM_REGISTRY_URL", registry_url.as_str()),
    ];
    mgr_env.extend_from_slice(env);
    let mut nsmgr = nsm_tests::start(dir, "nsmgr", "nsmgr", &mgr_env, false, READY);
    nsmgr.wait_for_log(&["serving", nsmgr_url]);
    [registry, nsmgr]
}

/// Runs `python3 -c script args..`; (stdout, stderr).
fn python(script: &str, args: &[&str], nsmgr: &nsm_tests::Proc) -> (String, String) {
    let out = Command::new("timeout")
        .args(["30", "python3", "-c", script])
        .args(args)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "the Python client failed: {}\nstdout: {stdout}\nstderr: {stderr}\nnsmgr: {}",
        out.status,
        nsmgr.log()
    );
    (stdout, stderr)
}

#[test]
fn a_grpcio_client_with_default_options_is_answered_over_the_managers_socket() {
    if !python_with_grpc() {
        return;
    }
    let dir = TempDir::new("nsm-grpcio", "grpcio");
    generate_stubs(&dir.0);
    let nsmgr_url = dir.unix("nsmgr.sock");
    // Insecure: the plaintext client of the README (mTLS: the test below).
    let [mut registry, mut nsmgr] = control_plane(&dir, &nsmgr_url, &[("NSM_INSECURE", "true")]);
    let socket = nsmgr_url.trim_start_matches("unix://");
    let stubs = dir.0.to_str().expect("utf-8 path");
    let (stdout, stderr) = python(CLIENT, &[socket, stubs], &nsmgr);
    check_answers(&stdout, &stderr);
    eprintln!("grpcio: {stdout}");
    nsmgr.terminate();
    registry.terminate();
}

/// The Python client over mTLS: `argv` = target, stubs directory, certificate, key,
/// bundle, the target name to verify (`-` for none: grpcio's default, the target's
/// host), its path token for the manager and the token's expiry (the metadata
/// `nsm-client-token` and `nsm-client-token-expires`, as every NSM client sends them).
/// Prints as [`CLIENT`] does, or `handshake failed` when the channel never got ready.
const MTLS_CLIENT: &str = r#"
import sys, grpc
target, stubs, cert, key, ca, name, token, expires = sys.argv[1:9]
md = [("nsm-client-token", token), ("nsm-client-token-expires", expires)]
sys.path.insert(0, stubs)
import connection_pb2, networkservice_pb2, networkservice_pb2_grpc
read = lambda p: open(p, "rb").read()
creds = grpc.ssl_channel_credentials(
    root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))
options = [] if name == "-" else [("grpc.ssl_target_name_override", name)]
channel = grpc.secure_channel(target, creds, options=options)
try:
    grpc.channel_ready_future(channel).result(timeout=3)
except grpc.FutureTimeoutError:
    print("handshake failed", flush=True)
    sys.exit(0)
stub = networkservice_pb2_grpc.NetworkServiceStub(channel)
conn = connection_pb2.Connection(
    id="py-1",
    network_service="icmp-responder",
    path=connection_pb2.Path(index=0, path_segments=[connection_pb2.PathSegment(name="py", id="py-1")]),
)
stub.Close(conn, timeout=10, metadata=md)
print("close ok", flush=True)
try:
    stub.Request(networkservice_pb2.NetworkServiceRequest(connection=conn), timeout=10, metadata=md)
    print("request ok", flush=True)
except grpc.RpcError as e:
    print("request error", e.code().name, e.details(), flush=True)
"#;

/// A free TCP port on loopback (bound, then released for the manager).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// grpcio with an SVID of the mesh's CA, verifying the manager by the DNS name its
/// SVID carries beside its SPIFFE ID (`grpc.ssl_target_name_override`), over the unix
/// socket and over TCP: answered by the manager's chain. Without the option (the
/// target's host is checked) the handshake fails.
#[test]
fn a_grpcio_client_with_an_svid_is_answered_over_mtls() {
    if !python_with_grpc() {
        return;
    }
    let dir = TempDir::new("nsm-grpcio", "grpcio-mtls");
    generate_stubs(&dir.0);
    let stubs = dir.0.to_str().expect("utf-8 path");
    let client = dir
        .ca()
        .write_identity(&dir.0, "py")
        .expect("the client's SVID");
    let files = [&client.cert, &client.key, &client.ca].map(|p| p.to_str().expect("utf-8 path"));
    // The manager's SVID: its SPIFFE ID, and a DNS name for grpcio to check.
    let dns_name = format!("nsmgr.{}", nsm_tests::TRUST_DOMAIN);
    let nsmgr_id = SpiffeId::parse(&format!("spiffe://{}/nsmgr", nsm_tests::TRUST_DOMAIN))
        .expect("a SPIFFE ID");
    let nsmgr_svid = dir
        .ca()
        .issue_with_dns_names(&nsmgr_id, &[&dns_name], Duration::from_secs(3600))
        .expect("the manager's SVID")
        .write(&dir.0, "nsmgr-dns")
        .expect("its files")
        .env();
    // The client's path token for the manager, signed with its SVID's key (what a
    // Python client of a mesh does with a JWT library; minted here with the SDK).
    let svid = Svid::load(&client.cert, &client.key).expect("the client's SVID");
    let token = jwt::sign(&svid, &nsmgr_id, None, Duration::from_secs(600)).expect("a token");
    let expires = format_rfc3339(token.expires);
    let args = |target: &str, name: &str| -> Vec<String> {
        [
            target,
            stubs,
            files[0],
            files[1],
            files[2],
            name,
            &token.token,
            &expires,
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |nsmgr: &nsm_tests::Proc, target: &str, name: &str| {
        let a = args(target, name);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        python(MTLS_CLIENT, &a, nsmgr)
    };

    let nsmgr_env: Vec<(&str, &str)> = nsmgr_svid.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for over in ["unix", "tcp"] {
        let nsmgr_url = match over {
            "unix" => dir.unix(&format!("nsmgr-{over}.sock")),
            _ => format!("tcp://127.0.0.1:{}", free_port()),
        };
        let [mut registry, mut nsmgr] = control_plane(&dir, &nsmgr_url, &nsmgr_env);
        let target = match over {
            "unix" => format!("unix:{}", nsmgr_url.trim_start_matches("unix://")),
            _ => nsmgr_url.trim_start_matches("tcp://").to_string(),
        };
        let (stdout, stderr) = run(&nsmgr, &target, &dns_name);
        check_answers(&stdout, &stderr);
        eprintln!("grpcio over mTLS ({over}): {stdout}");
        // grpcio's default target name (the host) is in no SVID.
        let (stdout, stderr) = run(&nsmgr, &target, "-");
        assert_eq!(
            stdout.trim(),
            "handshake failed",
            "{over}: {stdout}\n{stderr}"
        );
        nsmgr.terminate();
        registry.terminate();
    }
}
