//! The admission webhook over real HTTPS (rustls, a CA made here, the server name the
//! API server uses), fed the AdmissionReview requests of `tests/fixtures`, shaped as the
//! API server sends them. Each returned patch is applied with json-patch and the result
//! parsed strictly (unknown fields refused) as a k8s-openapi Pod or Deployment.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec};
use nsm_k8s::admission::AdmissionReview;
use nsm_k8s::inject::{self, InjectConfig, INIT_CONTAINER, SIDECAR};
use nsm_k8s::manifest::{self, strict, Manifest};
use nsm_k8s::server::{serve, tls_config};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// The name the API server checks the webhook's certificate against.
const SERVICE_DNS: &str = "nsm-admission-webhook.nsm-system.svc";

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("nsm-k8s-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and a server certificate for [`SERVICE_DNS`], written as `ca.crt`, `tls.crt`
/// and `tls.key` (the files of deploy/webhook-certs.sh).
fn write_certs(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "webhook test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![SERVICE_DNS.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
}

/// The webhook serving HTTPS on a loopback port with the certificate in `dir`; stops
/// when the token is cancelled (dropped at the end of the test).
struct Webhook {
    addr: std::net::SocketAddr,
    connector: TlsConnector,
    _stop: tokio_util::sync::DropGuard,
}

impl Webhook {
    async fn start(dir: &Path, config: InjectConfig) -> Webhook {
        let tls = tls_config(&dir.join("tls.crt"), &dir.join("tls.key")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            Some(tls),
            Arc::new(config),
            stop.clone().cancelled_owned(),
        ));
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(dir.join("ca.crt")).unwrap();
        for cert in rustls_pemfile_certs(&ca) {
            roots.add(cert).unwrap();
        }
        let client =
            rustls::ClientConfig::builder_with_provider(nsm_sdk::security::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        Webhook {
            addr,
            connector: TlsConnector::from(Arc::new(client)),
            _stop: stop.drop_guard(),
        }
    }

    /// One HTTPS call as the API server makes it; the status and the body.
    async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from(SERVICE_DNS).unwrap();
        let tls = self.connector.connect(name, tcp).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("https://{SERVICE_DNS}{path}?timeout=5s"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    }

    async fn review(&self, fixture: &Value) -> nsm_k8s::admission::AdmissionResponse {
        let (status, body) = self
            .call("POST", "/mutate", serde_json::to_vec(fixture).unwrap())
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let review: AdmissionReview = serde_json::from_slice(&body).unwrap();
        assert_eq!(review.api_version, "admission.k8s.io/v1");
        assert_eq!(review.kind, "AdmissionReview");
        let response = review.response.unwrap();
        assert_eq!(response.uid, fixture["request"]["uid"].as_str().unwrap());
        response
    }
}

/// The webhook with the default configuration and a certificate of [`write_certs`].
async fn with_test_ca(name: &str) -> (Scratch, Webhook) {
    let scratch = Scratch::new(name);
    write_certs(&scratch.0);
    let webhook = Webhook::start(&scratch.0, InjectConfig::default()).await;
    (scratch, webhook)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The request's object with the response's patch applied, as the API server does.
fn patched(fixture: &Value, response: &nsm_k8s::admission::AdmissionResponse) -> Value {
    assert_eq!(response.patch_type.as_deref(), Some("JSONPatch"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response.patch.as_deref().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut object = fixture["request"]["object"].clone();
    json_patch::patch(&mut object, &patch).unwrap();
    object
}

fn env<'a>(c: &'a k8s_openapi::api::core::v1::Container, name: &str) -> Option<&'a str> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

/// What the injection must have added to a pod spec whose only container was `web`.
fn assert_injected(spec: &PodSpec) {
    let inits = spec.init_containers.as_ref().unwrap();
    assert_eq!(inits[0].name, INIT_CONTAINER);
    assert_eq!(inits[1].name, SIDECAR);
    assert_eq!(inits[0].restart_policy, None);
    assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
    for c in &inits[..2] {
        assert_eq!(c.image.as_deref(), Some("nsm-rs/nsc:latest"));
        assert_eq!(
            env(c, "NSM_NETWORK_SERVICES"),
            Some("kernel://vpn-gateway/nsm-1?app=web")
        );
        assert_eq!(
            env(c, "NSM_CONNECT_TO"),
            Some("unix:///var/lib/networkservicemesh/nsm.io.sock")
        );
        assert_eq!(env(c, "NSM_TLS_CERT"), Some("/var/run/nsm/svid/tls.crt"));
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(
            mounts,
            [
                "/var/lib/networkservicemesh",
                "/var/lib/nsm-connections",
                "/var/run/nsm/svid"
            ]
        );
        // The hand-over of docs/NSC-INIT.md: the same file in both containers.
        assert_eq!(
            env(c, "NSM_CONNECTIONS_FILE"),
            Some("/var/lib/nsm-connections/connections.jsonl")
        );
    }
    assert_eq!(env(&inits[0], "NSM_INIT"), Some("true"));
    assert_eq!(env(&inits[1], "NSM_INIT"), None);
    // The application's container is untouched.
    assert_eq!(spec.containers.len(), 1);
    assert_eq!(spec.containers[0].name, "web");
    let volumes = spec.volumes.as_ref().unwrap();
    let socket = volumes.iter().find(|v| v.name == "nsm-socket").unwrap();
    assert_eq!(
        socket.host_path.as_ref().unwrap().path,
        "/var/lib/networkservicemesh"
    );
    let handover = volumes
        .iter()
        .find(|v| v.name == "nsm-connections")
        .unwrap();
    assert!(handover.empty_dir.is_some(), "{handover:?}");
    let svid = volumes.iter().find(|v| v.name == "nsm-svid").unwrap();
    assert_eq!(
        svid.csi.as_ref().unwrap().driver,
        "spiffe.csi.cert-manager.io"
    );
}

#[tokio::test]
async fn a_pod_gets_nsc_and_the_patched_pod_is_left_as_it_is() {
    let (_scratch, webhook) = with_test_ca("pod").await;
    let review = fixture("pod.json");
    let response = webhook.review(&review).await;
    assert!(response.allowed, "{response:?}");
    let pod: Pod = strict(&patched(&review, &response)).unwrap();
    let spec = pod.spec.unwrap();
    assert_injected(&spec);
    // The service account volume the API server had added is still there.
    assert!(spec
        .volumes
        .unwrap()
        .iter()
        .any(|v| v.name == "kube-api-access-x7k2p"));

    // The already-patched pod (a pod of a patched template, or a re-invocation).
    let patched = fixture("pod-patched.json");
    assert_eq!(
        patched["request"]["object"],
        self::patched(&review, &response),
        "pod-patched.json is pod.json as patched"
    );
    let again = webhook.review(&patched).await;
    assert!(
        again.allowed && again.patch.is_none() && again.status.is_none(),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_deployment_s_template_gets_nsc() {
    let (_scratch, webhook) = with_test_ca("deployment").await;
    let review = fixture("deployment.json");
    let response = webhook.review(&review).await;
    assert!(response.allowed, "{response:?}");
    let deployment: Deployment = strict(&patched(&review, &response)).unwrap();
    let template = deployment.spec.template;
    assert_injected(template.spec.as_ref().unwrap());
    assert_eq!(
        template.metadata.unwrap().annotations.unwrap()["networkservicemesh.io"],
        "kernel://vpn-gateway/nsm-1?app=web"
    );
}

#[tokio::test]
async fn a_malformed_annotation_is_refused_with_its_fault_never_a_500() {
    let (_scratch, webhook) = with_test_ca("malformed").await;
    let response = webhook.review(&fixture("pod-malformed.json")).await;
    assert!(!response.allowed);
    assert!(response.patch.is_none());
    let status = response.status.unwrap();
    assert_eq!(status.code, 400);
    assert!(
        status.message.contains("networkservicemesh.io")
            && status.message.contains("Pod vpn-example/web")
            && status.message.contains("item 2")
            && status.message.contains("empty network service"),
        "{}",
        status.message
    );

    // Bodies that are no AdmissionReview: 400 with the reason, not 500.
    for body in [
        &b"{"[..],
        b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
    ] {
        let (status, text) = webhook.call("POST", "/mutate", body.to_vec()).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&text));
    }
    let (status, _) = webhook.call("GET", "/mutate", vec![]).await;
    assert_eq!(status, 405);
    let (status, body) = webhook.call("GET", "/healthz", vec![]).await;
    assert_eq!((status, body), (200, b"ok\n".to_vec()));
}

#[tokio::test]
async fn namespaces_without_the_label_or_excluded_are_left_alone() {
    // The API server calls the webhook only for the namespaces that the deployed
    // configuration's namespaceSelector selects: the labelled one, not the other.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/webhook.yaml"),
    )
    .unwrap();
    let configuration: MutatingWebhookConfiguration = manifest::parse_yaml(&text)
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            Manifest::MutatingWebhookConfiguration(c) => Some(*c),
            _ => None,
        })
        .unwrap();
    let webhooks = configuration.webhooks.unwrap();
    let selector = webhooks[0].namespace_selector.as_ref().unwrap();
    assert!(selector.match_expressions.is_none());
    let selects = |ns: &Namespace| {
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        let by_selector = selector
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v));
        assert_eq!(by_selector, inject::namespace_opted_in(&labels));
        by_selector
    };
    assert!(!selects(
        &strict(&fixture("namespace-without-label.json")).unwrap()
    ));
    assert!(selects(
        &strict(&fixture("namespace-with-label.json")).unwrap()
    ));

    // And the webhook itself leaves the mesh's and the system's namespaces alone.
    let (_scratch, webhook) = with_test_ca("namespaces").await;
    let response = webhook
        .review(&fixture("pod-namespace-excluded.json"))
        .await;
    assert!(response.allowed && response.patch.is_none() && response.status.is_none());
}

#[tokio::test]
async fn the_certificate_of_webhook_certs_sh_is_what_the_api_server_accepts() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("skipped: deploy/webhook-certs.sh needs openssl");
        return;
    }
    let scratch = Scratch::new("script");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/webhook-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("--files-only")
        .arg(&scratch.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let webhook = Webhook::start(&scratch.0, InjectConfig::default()).await;
    let response = webhook.review(&fixture("pod.json")).await;
    assert!(response.allowed && response.patch.is_some());
}

#[test]
fn the_program_refuses_to_start_without_its_certificate() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nsm-admission-webhook"))
        .env_remove("NSM_WEBHOOK_TLS_CERT")
        .env_remove("NSM_WEBHOOK_TLS_KEY")
        .env_remove("NSM_INSECURE")
        .env("NSM_WEBHOOK_LISTEN_ON", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NSM_WEBHOOK_TLS_CERT"), "{stderr}");
}
