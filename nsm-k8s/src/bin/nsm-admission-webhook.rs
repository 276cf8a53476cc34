//! `nsm-admission-webhook`: the mutating admission webhook that injects `nsc` into the
//! pods (and pod templates) annotated `networkservicemesh.io` (docs/KUBERNETES.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use nsm_examples::{run, Common, Failure};
use nsm_k8s::inject::{InjectConfig, SvidSource};
use nsm_k8s::server::{serve, tls_config};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Serves AdmissionReview v1 over HTTPS at /mutate (and /healthz). Refuses to start
/// without its TLS certificate and key unless NSM_INSECURE=true (plain HTTP: for
/// trials only, an API server calls webhooks over HTTPS).
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "NSM_WEBHOOK_LISTEN_ON",
        value_name = "ADDR",
        default_value = "0.0.0.0:8443"
    )]
    listen_on: String,

    /// The server's certificate chain (PEM, leaf first): tls.crt of its Secret.
    #[arg(long, env = "NSM_WEBHOOK_TLS_CERT", value_name = "PATH")]
    tls_cert: Option<PathBuf>,

    /// The server's private key (PEM): tls.key of its Secret.
    #[arg(long, env = "NSM_WEBHOOK_TLS_KEY", value_name = "PATH")]
    tls_key: Option<PathBuf>,

    /// Serve plain HTTP without a certificate (trials only).
    #[arg(long, env = "NSM_INSECURE", value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set)]
    insecure: bool,

    /// The image with nsc for the injected containers.
    #[arg(
        long,
        env = "NSM_WEBHOOK_NSC_IMAGE",
        value_name = "IMAGE",
        default_value = "nsm-rs/nsc:latest"
    )]
    nsc_image: String,

    /// The injected containers' image pull policy.
    #[arg(
        long,
        env = "NSM_WEBHOOK_PULL_POLICY",
        value_name = "POLICY",
        default_value = "IfNotPresent"
    )]
    pull_policy: String,

    /// The node's manager as the injected nsc reaches it (a unix:// URL in the hostPath
    /// socket directory).
    #[arg(long, env = "NSM_WEBHOOK_MANAGER_URL", value_name = "URL", default_value = nsm_examples::DEFAULT_NSM_SOCKET)]
    manager_url: String,

    /// The SVID source of the injected nsc: csi:<driver>, secret:<name> or insecure.
    #[arg(
        long,
        env = "NSM_WEBHOOK_SVID_SOURCE",
        value_name = "SOURCE",
        default_value = "csi:spiffe.csi.cert-manager.io"
    )]
    svid_source: SvidSource,

    /// Namespaces never patched (comma-separated).
    #[arg(
        long,
        env = "NSM_WEBHOOK_EXCLUDED_NAMESPACES",
        value_name = "NS,...",
        value_delimiter = ',',
        default_value = "kube-system,kube-public,nsm-system"
    )]
    excluded_namespaces: Vec<String>,

    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let socket_dir = socket_dir(&args.manager_url).map_err(Failure::config)?;
        let config = InjectConfig {
            nsc_image: args.nsc_image,
            image_pull_policy: Some(args.pull_policy),
            manager_url: args.manager_url,
            socket_dir,
            svid: args.svid_source,
            excluded_namespaces: args.excluded_namespaces,
        };
        let tls = match (&args.tls_cert, &args.tls_key, args.insecure) {
            (Some(cert), Some(key), _) => {
                Some(tls_config(cert, key).map_err(|e| Failure::config(e.to_string()))?)
            }
            (None, None, true) => {
                warn!("NSM_INSECURE=true: serving plain HTTP, which no API server calls");
                None
            }
            _ => {
                return Err(Failure::config(
                    "no TLS certificate: set NSM_WEBHOOK_TLS_CERT and NSM_WEBHOOK_TLS_KEY \
                     (or NSM_INSECURE=true to serve plain HTTP, for trials only)",
                ))
            }
        };
        let listener = TcpListener::bind(&args.listen_on)
            .await
            .map_err(|e| Failure::config(format!("cannot listen on {}: {e}", args.listen_on)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::runtime(e.to_string()))?;
        info!(%addr, tls = tls.is_some(), "serving AdmissionReview at /mutate");
        serve(listener, tls, Arc::new(config), stop.cancelled_owned())
            .await
            .map_err(|e| Failure::runtime(e.to_string()))
    })
}

/// The directory of a `unix://` manager URL: the hostPath to mount.
fn socket_dir(url: &str) -> Result<String, String> {
    let path = url
        .strip_prefix("unix://")
        .ok_or_else(|| format!("manager URL {url:?}: expected unix:///<dir>/<socket>"))?;
    match std::path::Path::new(path).parent() {
        Some(dir) if dir.is_absolute() && dir != std::path::Path::new("/") => {
            Ok(dir.display().to_string())
        }
        _ => Err(format!(
            "manager URL {url:?}: the socket must be in a directory (mounted from the host)"
        )),
    }
}
