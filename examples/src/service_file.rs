//! `NSM_SERVICE_FILE`: a program registers the network services defined in a file
//! (nsm-sdk's [`nsfile`](nsm_sdk::config::ns_file): the protobuf JSON mapping of
//! `registry.NetworkService`, or YAML) when it starts, so a service's `matches` (a
//! service chain's order) are in the registry before anyone asks for it.

use std::path::PathBuf;

use nsm_proto::registry::NetworkService;
use nsm_sdk::chains::Security;
use nsm_sdk::config::ns_file;
use nsm_sdk::serving::{
    registry_client, retry_startup, DEFAULT_CALL_TIMEOUT, DEFAULT_STARTUP_TIMEOUT,
};
use nsm_sdk::transport::Url;
use nsm_sdk::Cx;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::process::Failure;

/// The setting of programs that register network services from a file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceFileArgs {
    /// A file defining network services (JSON, or YAML for .yaml/.yml) to register
    /// when the program starts, replacing the registry's entries of the same names.
    #[arg(long, env = "NSM_SERVICE_FILE", value_name = "PATH")]
    pub service_file: Option<PathBuf>,
}

impl ServiceFileArgs {
    /// The services of the file, if one is set; a file that cannot be loaded is a
    /// configuration failure naming the file and the field.
    pub fn load(&self) -> Result<Vec<NetworkService>, Failure> {
        match &self.service_file {
            Some(path) => ns_file::load(path).map_err(|e| Failure::config(e.to_string())),
            None => Ok(Vec::new()),
        }
    }
}

/// Registers `services` through the registry (or manager) at `url`, retrying while it
/// cannot be reached. `Ok(false)` when `stop` came first.
pub async fn register_services(
    url: &Url,
    services: &[NetworkService],
    security: &Security,
    stop: &CancellationToken,
) -> Result<bool, Failure> {
    let registry = registry_client(&security.channels(), url).ns;
    for ns in services {
        let what = format!("registering network service {}", ns.name);
        let done = retry_startup(&what, DEFAULT_STARTUP_TIMEOUT, stop, || async {
            registry
                .register(
                    &mut Cx::client().with_timeout(DEFAULT_CALL_TIMEOUT),
                    ns.clone(),
                )
                .await
        })
        .await
        .map_err(|e| Failure::runtime(e.to_string()))?;
        if done.is_none() {
            return Ok(false);
        }
        info!(service = %ns.name, matches = ns.matches.len(), "registered network service from the file");
    }
    Ok(true)
}
