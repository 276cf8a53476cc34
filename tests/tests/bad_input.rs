//! Bad input gets a clear gRPC status, never a panic: each case is sent over gRPC to a
//! sandbox node's manager (or registry) exactly as a foreign client would send it.

use nsm_proto::connection::{Connection, Mechanism, Path, PathSegment};
use nsm_proto::connectioncontext::{ConnectionContext, IpContext};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::NetworkServiceEndpoint;
use nsm_sdk::handlers::{client_url, noop_mechanism};
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox};
use nsm_sdk::transport::grpc_client;
use nsm_sdk::{Chain, Cx};
use tonic::Code;

async fn mesh() -> (Sandbox, Chain, EndpointHandle) {
    // Plaintext on purpose: the bare client below signs no token, and what is tested is
    // the status each kind of bad input gets (a secure mesh refuses an unsigned call
    // with PermissionDenied before looking at it; transport/tls tests cover that).
    let mesh = Sandbox::builder()
        .nodes(1)
        .insecure()
        .build()
        .await
        .unwrap();
    let nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse", "svc").ipam("10.80.0.0/24".parse().unwrap()))
        .await
        .unwrap();
    // A bare gRPC client: no update_path, no retry, sends exactly what it is given.
    let raw = Chain::builder()
        .push(client_url(mesh.node(0).nsmgr_url().clone()))
        .push(grpc_client(mesh.channels()))
        .build();
    (mesh, raw, nse)
}

fn conn(service: &str) -> Connection {
    Connection {
        id: "c-1".into(),
        network_service: service.into(),
        path: Some(Path {
            index: 0,
            path_segments: vec![PathSegment {
                name: "nsc".into(),
                id: "c-1".into(),
                ..Default::default()
            }],
        }),
        ..Default::default()
    }
}

fn with_noop(c: Connection) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(c),
        mechanism_preferences: vec![noop_mechanism()],
    }
}

async fn code_of(raw: &Chain, req: NetworkServiceRequest) -> (Code, String) {
    let err = raw
        .request(&mut Cx::client(), req)
        .await
        .expect_err("bad input was accepted");
    (err.code(), err.to_string())
}

#[tokio::test]
async fn every_bad_request_gets_its_status_code() {
    let (_mesh, raw, _nse) = mesh().await;

    let (code, msg) = code_of(&raw, with_noop(conn(""))).await;
    assert_eq!(code, Code::InvalidArgument, "empty service: {msg}");

    let (code, msg) = code_of(&raw, with_noop(conn("no-such-service"))).await;
    assert_eq!(code, Code::NotFound, "unknown service: {msg}");
    assert!(msg.contains("no-such-service"), "{msg}");

    let mut c = conn("svc");
    c.path.as_mut().unwrap().index = 5;
    let (code, msg) = code_of(&raw, with_noop(c)).await;
    assert_eq!(code, Code::InvalidArgument, "index beyond segments: {msg}");

    let mut c = conn("svc");
    c.id = "not-the-segment-id".into();
    let (code, msg) = code_of(&raw, with_noop(c)).await;
    assert_eq!(code, Code::InvalidArgument, "id mismatch: {msg}");

    let mut c = conn("svc");
    c.context = Some(ConnectionContext {
        ip_context: Some(IpContext {
            src_ip_addrs: vec!["10.80.0.300/32".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let (code, msg) = code_of(&raw, with_noop(c)).await;
    assert_eq!(code, Code::InvalidArgument, "malformed address: {msg}");
    assert!(msg.contains("10.80.0.300"), "{msg}");

    let vxlan = Mechanism {
        cls: "REMOTE".into(),
        r#type: "VXLAN".into(),
        ..Default::default()
    };
    let (code, msg) = code_of(
        &raw,
        NetworkServiceRequest {
            connection: Some(conn("svc")),
            mechanism_preferences: vec![vxlan],
        },
    )
    .await;
    assert!(
        matches!(code, Code::InvalidArgument | Code::Unimplemented),
        "unsupported mechanism: {code:?} {msg}"
    );
    assert!(
        msg.contains("NOOP"),
        "the supported mechanisms are not listed: {msg}"
    );

    let (code, msg) = code_of(&raw, NetworkServiceRequest::default()).await;
    assert_eq!(code, Code::InvalidArgument, "no connection at all: {msg}");
}

#[tokio::test]
async fn a_registry_endpoint_without_a_name_is_invalid() {
    let (mesh, _raw, _nse) = mesh().await;
    for registries in [mesh.registries(), mesh.node(0).registries()] {
        let err = registries
            .nse
            .register(
                &mut Cx::client(),
                NetworkServiceEndpoint {
                    network_service_names: vec!["svc".into()],
                    url: "inmem://x".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }
}

#[tokio::test]
async fn the_mesh_still_serves_after_bad_input() {
    let (mesh, raw, _nse) = mesh().await;
    let _ = code_of(&raw, NetworkServiceRequest::default()).await;
    let _ = code_of(&raw, with_noop(conn(""))).await;
    let nsc = mesh.node(0).client("nsc");
    let ok = nsc
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(Connection {
                    network_service: "svc".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    nsc.close(&mut Cx::client(), ok).await.unwrap();
}
