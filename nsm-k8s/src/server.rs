//! The webhook's HTTPS server: `POST /mutate` takes an AdmissionReview v1 and answers
//! with [`crate::inject::mutate`]'s verdict; `GET /healthz` answers `ok` (the
//! Deployment's probes).
//!
//! State: the [`InjectConfig`] and the tasks of open connections, owned by [`serve`]
//! and cancelled when it returns. Failures handled: a TLS handshake or request header
//! that does not come within [`IO_TIMEOUT`], a body over [`MAX_BODY`] (413) and a body
//! that is not an AdmissionReview request (400) end that request only; the webhook never
//! answers 500. A refused object is a 200 with `allowed: false`, as the API server
//! expects.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admission::AdmissionReview;
use crate::error::{Error, Result};
use crate::inject::{mutate, InjectConfig};

/// The largest AdmissionReview accepted (the API server's own limit on objects is 3 MiB).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// How long a TLS handshake or a request's headers may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS server config (TLS 1.2 and 1.3, ring, HTTP/1.1) from PEM files: the
/// certificate chain (leaf first) and its key, as a `kubernetes.io/tls` Secret holds
/// them (`tls.crt`, `tls.key`).
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Tls(format!("certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Tls(format!(
            "certificate {}: no certificate in the file",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Tls(format!("key {}: {e}", key.display())))?;
    let mut config = ServerConfig::builder_with_provider(nsm_sdk::security::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| Error::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the webhook on `listener` until `stop` completes: over TLS with `tls`, in
/// plaintext without (tests and local trials only: the API server calls webhooks over
/// HTTPS). Open connections are dropped when it returns.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    config: Arc<InjectConfig>,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let config = config.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(tls, config).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => connection(stream, config).await,
            }
        });
    }
    info!("webhook stopped");
    Ok(())
}

async fn connection<S>(stream: S, config: Arc<InjectConfig>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let config = config.clone();
        async move { Ok::<_, Infallible>(handle(req, &config).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        debug!(error = %e, "connection ended");
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

async fn handle(req: Request<Incoming>, config: &InjectConfig) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "text/plain",
                        format!("cannot read the body: {e}\n"),
                    )
                }
            };
            review(&body, config)
        }
        (_, "/mutate" | "/healthz") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

fn review(body: &[u8], config: &InjectConfig) -> Response<Full<Bytes>> {
    let review: AdmissionReview = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("not an AdmissionReview: {e}\n"),
            )
        }
    };
    let Some(request) = review.request else {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "the AdmissionReview has no request\n",
        );
    };
    let response = mutate(&request, config);
    info!(
        uid = %request.uid,
        kind = %request.kind.kind,
        namespace = request.namespace.as_deref().unwrap_or_default(),
        name = request.name.as_deref().unwrap_or_default(),
        allowed = response.allowed,
        patched = response.patch.is_some(),
        "admission"
    );
    match serde_json::to_vec(&AdmissionReview::answer(response)) {
        Ok(json) => reply(StatusCode::OK, "application/json", json),
        // Strings, booleans and numbers only: cannot fail; answered as a refusal of
        // the request rather than a 500 all the same.
        Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    }
}
