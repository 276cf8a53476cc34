//! `nsm-vl3-ipam`: the vL3 prefix server (NSM's `ipam-vl3`): it carves each vL3
//! network into one prefix per vL3 endpoint and serves them over `IPAM.ManagePrefixes`.

use std::process::ExitCode;
use std::time::Duration;

use ipnet::IpNet;
use nsm_examples::{
    parse_duration, run, security, serve_all, shutdown_all, Common, Failure, Vl3Networks,
};
use nsm_sdk::ipam::PrefixServer;
use nsm_sdk::transport::{Services, Url};
use tracing::info;

/// The vL3 prefix server: one prefix of each network per vL3 endpoint, held while the
/// endpoint's stream is open (freed when it ends), re-claimed by the endpoint after a
/// restart of either side. With a state file the prefixes survive a restart of the
/// server: those it lists stay reserved for their endpoints for `--reserve-for`.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Where to listen: tcp://host:port or unix:///path.
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL")]
    listen_on: Url,

    #[command(flatten)]
    networks: Vl3Networks,

    /// The length of each endpoint's prefix, per network in the same order
    /// (comma-separated; default 24 for IPv4 and 112 for IPv6 networks).
    #[arg(
        long,
        env = "NSM_VL3_PREFIX_LEN",
        value_name = "LEN,...",
        value_delimiter = ','
    )]
    prefix_len: Vec<u8>,

    /// A file that keeps the prefixes handed out, across restarts.
    #[arg(long, env = "NSM_STATE_FILE", value_name = "PATH")]
    state_file: Option<std::path::PathBuf>,

    /// How long a prefix listed in the state file waits for its endpoint after a start.
    #[arg(long, env = "NSM_RESERVE_FOR", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    reserve_for: Duration,

    #[command(flatten)]
    common: Common,
}

fn prefix_server(args: &Args) -> Result<PrefixServer, Failure> {
    if !args.prefix_len.is_empty() && args.prefix_len.len() != args.networks.networks.len() {
        return Err(Failure::config(format!(
            "{} prefix lengths for {} networks",
            args.prefix_len.len(),
            args.networks.networks.len()
        )));
    }
    let len = |i: usize, n: &IpNet| {
        args.prefix_len.get(i).copied().unwrap_or(match n {
            IpNet::V4(_) => 24,
            IpNet::V6(_) => 112,
        })
    };
    let mut builder: Option<nsm_sdk::ipam::PrefixServerBuilder> = None;
    for (i, n) in args.networks.networks.iter().enumerate() {
        builder = Some(match builder {
            None => PrefixServer::builder(*n, len(i, n)),
            Some(b) => b.network(*n, len(i, n)),
        });
    }
    let mut builder = builder.ok_or_else(|| Failure::config("no vL3 network"))?;
    builder = builder.reserve_for(args.reserve_for);
    if let Some(f) = &args.state_file {
        builder = builder.state_file(f);
    }
    builder.build().map_err(|e| match e {
        nsm_sdk::Error::InvalidArgument(m) => Failure::config(m),
        e => Failure::runtime(e.to_string()),
    })
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        let server = prefix_server(&args)?;
        info!(networks = ?server.networks(), held = ?server.held(), "starting the vL3 prefix server");
        let services = security.serve(Services::new().ipam(server));
        let servers = serve_all(&[args.listen_on], &services).await?;
        stop.cancelled().await;
        shutdown_all(servers).await;
        Ok(())
    })
}
