//! [`prefix_client`]: a vL3 endpoint's side of `IPAM.ManagePrefixes`.
//!
//! What it does: keeps one stream open to the prefix server and, on it, one `ALLOCATE`
//! per vL3 network (one per family): the prefix it holds in that network (a re-claim),
//! or the network itself the first time. Each answer goes into the endpoint's
//! [`Vl3Prefixes`]. Holding the stream open is holding the prefixes: the server frees
//! them when the stream ends, so an endpoint that dies gives them back.
//!
//! State: a task (owned by the returned [`PrefixClient`], cancelled when it is dropped
//! or its token is) and the prefixes it holds (in the shared [`Vl3Prefixes`]).
//!
//! Failure handled: a server that is down or restarts, or a stream that breaks:
//! it reconnects with the SDK's backoff (100 ms doubling to 5 s) and re-claims the
//! prefixes it holds, so the endpoint's clients keep their addresses; when the server
//! answers with another prefix (the old one was given to someone else meanwhile),
//! the new one replaces it (the endpoint's strict IPAM then readdresses its clients on
//! their next refresh). A refusal (InvalidArgument: a network the server does not
//! carve) is retried the same way, and logged.

use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use nsm_proto::ipam::ipam_client::IpamClient;
use nsm_proto::ipam::{PrefixRequest, Type};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::channels::{from_status, Channels};
use crate::core::rt::Backoff;
use crate::core::url::Url;
use crate::ipam::Vl3Prefixes;
use crate::{Error, Result};

/// The running client; dropping it stops the stream (and so frees the prefixes at the
/// server).
pub struct PrefixClient {
    task: JoinHandle<()>,
    cancel: CancellationToken,
}

impl fmt::Debug for PrefixClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefixClient")
            .field("running", &!self.task.is_finished())
            .finish()
    }
}

impl PrefixClient {
    /// Stops it (as dropping does).
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for PrefixClient {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

/// Starts holding one prefix of each of `networks` from the prefix server at `url`,
/// never one overlapping `excluded`, and keeps `prefixes` up to date; stops when `root`
/// is cancelled or the returned client is dropped.
pub fn prefix_client(
    channels: Channels,
    url: Url,
    networks: Vec<IpNet>,
    excluded: Vec<IpNet>,
    prefixes: Vl3Prefixes,
    root: &CancellationToken,
) -> PrefixClient {
    let cancel = root.child_token();
    let span = tracing::info_span!("prefix_client", url = %url);
    let task = tokio::spawn(
        run(channels, url, networks, excluded, prefixes, cancel.clone()).instrument(span),
    );
    PrefixClient { task, cancel }
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

async fn run(
    channels: Channels,
    url: Url,
    networks: Vec<IpNet>,
    excluded: Vec<IpNet>,
    prefixes: Vl3Prefixes,
    cancel: CancellationToken,
) {
    let backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
    let mut attempt = 0;
    loop {
        let mut answered = false;
        let out = tokio::select! {
            _ = cancel.cancelled() => return,
            out = session(&channels, &url, &networks, &excluded, &prefixes, &mut answered) => out,
        };
        if let Err(e) = out {
            warn!(error = %e, "prefix server stream failed; reconnecting");
        }
        if answered {
            attempt = 0;
        }
        channels.forget(&url);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.wait(attempt)) => {}
        }
        attempt = attempt.saturating_add(1);
    }
}

/// One stream: ALLOCATE per network, then keep it open until it breaks.
async fn session(
    channels: &Channels,
    url: &Url,
    networks: &[IpNet],
    excluded: &[IpNet],
    prefixes: &Vl3Prefixes,
    answered: &mut bool,
) -> Result<()> {
    let (channel, _) = channels.connected(url).await?;
    let (tx, rx) = mpsc::channel(networks.len().max(1));
    let held = prefixes.get();
    for net in networks {
        let mine = held.iter().find(|p| net.contains(*p)).unwrap_or(net);
        let req = PrefixRequest {
            r#type: Type::Allocate as i32,
            prefix: mine.to_string(),
            exclude_prefixes: excluded.iter().map(ToString::to_string).collect(),
        };
        tx.send(req)
            .await
            .map_err(|_| Error::internal("prefix request queue closed"))?;
    }
    let mut client = sized!(IpamClient::new(channel));
    let mut answers = client
        .manage_prefixes(ReceiverStream::new(rx))
        .await
        .map_err(|s| from_status(url, s))?
        .into_inner();
    loop {
        match answers.message().await {
            Ok(Some(resp)) => {
                let got: IpNet = resp.prefix.parse().map_err(|_| {
                    Error::invalid(format!("the prefix server answered {:?}", resp.prefix))
                })?;
                let before = prefixes.get();
                if !before.contains(&got) {
                    info!(prefix = %got, "vL3 prefix");
                } else {
                    debug!(prefix = %got, "vL3 prefix re-claimed");
                }
                prefixes.set_family(got);
                *answered = true;
            }
            Ok(None) => return Err(Error::unavailable(format!("{url}: the stream ended"))),
            Err(s) => return Err(from_status(url, s)),
        }
        // Keep the request side open: closing it would end the stream.
        let _ = &tx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::PrefixServer;
    use crate::transport::{serve, Services};

    fn server() -> PrefixServer {
        PrefixServer::builder("10.9.0.0/16".parse().unwrap(), 24)
            .network("fd09::/64".parse().unwrap(), 120)
            .build()
            .unwrap()
    }

    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Plaintext on purpose: the transport's TLS is tested in `transport::tests::tls`,
    /// and the sandbox's vL3 tests run this client over mTLS.
    #[tokio::test]
    async fn it_holds_a_prefix_per_network_reclaims_them_after_a_restart_and_frees_them() {
        let url = Url::Memory(format!("prefix-client-{}", uuid::Uuid::new_v4()));
        let first = server();
        let served = serve(&url, Services::new().ipam(first.clone()))
            .await
            .unwrap();
        let prefixes = Vl3Prefixes::new();
        let root = CancellationToken::new();
        let client = prefix_client(
            Channels::new(),
            url.clone(),
            first.networks(),
            vec!["10.9.0.0/24".parse().unwrap()],
            prefixes.clone(),
            &root,
        );
        let held = prefixes.known(None).await.unwrap();
        until("both families", || prefixes.get().len() == 2).await;
        let held = if held.len() == 2 {
            held
        } else {
            prefixes.get()
        };
        assert_eq!(
            held,
            [
                "10.9.1.0/24".parse::<IpNet>().unwrap(),
                "fd09::/120".parse().unwrap()
            ],
            "the excluded prefix is skipped"
        );
        assert_eq!(first.held().len(), 2);

        // The server dies and a new one (no state) starts: the client re-claims.
        served.kill();
        let second = server();
        let _served = serve(&url, Services::new().ipam(second.clone()))
            .await
            .unwrap();
        until("re-claimed", || second.held().len() == 2).await;
        let mut again = second.held();
        again.sort();
        let mut want = held.clone();
        want.sort();
        assert_eq!(again, want);
        assert_eq!(prefixes.get(), held);

        // Stopping the client ends the stream: the server frees its prefixes.
        drop(client);
        until("freed", || second.held().is_empty()).await;
    }
}
