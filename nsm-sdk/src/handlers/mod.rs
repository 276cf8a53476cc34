//! The handlers, one module each. Each says what it does, what state it keeps and which
//! failure it handles, and has its unit tests beside it.

pub mod discover;
pub mod discover_forwarder;
pub mod mechanisms;
pub mod monitor;
pub mod noop;
pub mod point_to_point;
pub mod retry;
pub mod round_robin;
pub mod select_mechanism;
pub mod selection;
pub mod update_path;

/// `begin` is the per-connection runtime and lives in core; chains start with it.
pub use crate::core::rt::begin::{begin, Begin};
pub use discover::{discover, Discover};
pub use discover_forwarder::{discover_forwarder, DiscoverForwarder};
pub use mechanisms::{
    mechanism_preferences, mechanism_translation, mechanisms, MechanismPreferences,
    MechanismTranslation, Mechanisms,
};
pub use monitor::{monitor, Monitor, MonitorBuilder};
pub use noop::{noop_client, noop_mechanism, noop_server, NoopServer};
pub use point_to_point::{point_to_point, PointToPoint};
pub use retry::{retry, Retry};
pub use round_robin::{round_robin, RoundRobin};
pub use select_mechanism::select_mechanism;
pub use selection::Candidates;
pub use update_path::{update_path, UpdatePath};
pub mod connect;
pub use connect::{client_url, connect, ClientUrlHandler, Connect};
pub mod passthrough;
pub use passthrough::{passthrough, Passthrough};
pub mod refresh;
pub use refresh::{refresh, Refresh};
pub mod netns_inode;
pub use netns_inode::{netns_inode, NetnsInode};
pub mod netns_owner;
pub use netns_owner::{netns_owner, NetnsOwner};
pub mod timeout;
pub use timeout::{timeout, Timeout};
pub mod update_token;
pub use update_token::{update_token, UpdateToken};
pub mod heal;
pub use heal::{
    default_reselect, heal, Heal, HealEvent, HealObserver, HealOptions, LivenessFn, ReselectFn,
};
pub mod monitor_relay;
pub use monitor_relay::{monitor_relay, MonitorRelay};
pub mod netsvc_monitor;
pub use netsvc_monitor::{netsvc_monitor, NetsvcMonitor};
pub mod upstream_refresh;
pub use upstream_refresh::{upstream_refresh, UpstreamRefresh, UpstreamRefreshOptions};
pub mod filter_mechanisms;
pub use filter_mechanisms::{filter_mechanisms, FilterMechanisms};
pub mod authorize;
pub use authorize::{authorize_client, authorize_server, Authorize};
pub mod domain_border;
pub use domain_border::{domain_border, DomainBorder};
pub mod swap_ip;
pub use swap_ip::{parse_address_map, swap_ip, AddressMap, SwapIp};
pub mod vl3_ipam;
pub use vl3_ipam::{vl3_ipam, Vl3Ipam};
pub mod vl3_client;
pub use vl3_client::{vl3_client, Vl3Client};

/// What the tests of several handlers share.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use nsm_proto::connection::Connection;
    use nsm_proto::networkservice::NetworkServiceRequest;

    use crate::core::{Chain, Cx, Handler, MonitorSource, Next};
    use crate::handlers::{begin, monitor, update_path, Monitor};
    use crate::transport::{serve, Server, Services, Url};
    use crate::{Error, Result};

    /// A URL of the in-memory transport no other test (of any process) uses:
    /// `{prefix}-{pid}-{n}`.
    pub(crate) fn memory_url(prefix: &str) -> Url {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Url::Memory(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ))
    }

    /// Serves at `url` an endpoint whose own work is `nse`, behind `begin` and a
    /// `monitor` (returned, to watch or to send events through).
    pub(crate) async fn serve_nse(url: &Url, nse: &(impl Handler + Clone)) -> (Server, Monitor) {
        let monitor = monitor();
        let chain = Chain::builder()
            .push(update_path("nse").trim_tail(true))
            .push(begin())
            .push(monitor.clone())
            .push(nse.clone())
            .build();
        let source: Arc<dyn MonitorSource> = monitor.source();
        let server = serve(url, Services::new().network_service(chain).monitor(source))
            .await
            .unwrap();
        (server, monitor)
    }

    /// A next hop for the tests: keeps every Request that arrives and the connection of
    /// each it passes on, and counts Closes; while `fail` is set it fails Requests
    /// (Unavailable) instead of passing them on.
    #[derive(Default)]
    pub(crate) struct TestHop {
        arrived: Mutex<Vec<NetworkServiceRequest>>,
        passed: Mutex<Vec<Connection>>,
        closes: AtomicUsize,
        pub(crate) fail: AtomicBool,
    }

    impl TestHop {
        /// How many Requests arrived, failed or not.
        pub(crate) fn attempts(&self) -> usize {
            self.arrived.lock().unwrap().len()
        }
        /// How many of the Requests that arrived, failed or not, `which` picks.
        pub(crate) fn attempts_where(
            &self,
            which: impl Fn(&NetworkServiceRequest) -> bool,
        ) -> usize {
            self.arrived
                .lock()
                .unwrap()
                .iter()
                .filter(|r| which(r))
                .count()
        }
        /// How many Requests it passed on.
        pub(crate) fn requests(&self) -> usize {
            self.passed.lock().unwrap().len()
        }
        /// The connection of the `i`-th Request it passed on (from 0), as it arrived.
        pub(crate) fn passed(&self, i: usize) -> Connection {
            self.passed.lock().unwrap()[i].clone()
        }
        /// The endpoint named in each Request it passed on, in order.
        pub(crate) fn passed_endpoints(&self) -> Vec<String> {
            let passed = self.passed.lock().unwrap();
            passed
                .iter()
                .map(|c| c.network_service_endpoint_name.clone())
                .collect()
        }
        /// How many Closes arrived.
        pub(crate) fn closes(&self) -> usize {
            self.closes.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Handler for Arc<TestHop> {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            self.arrived.lock().unwrap().push(req.clone());
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::unavailable("injected"));
            }
            self.passed
                .lock()
                .unwrap()
                .push(req.connection.clone().unwrap_or_default());
            next.request(cx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.closes.fetch_add(1, Ordering::SeqCst);
            next.close(cx, conn).await
        }
    }

    /// A Request of the connection `id` carrying `ipc`.
    pub(crate) fn request(
        id: &str,
        ipc: nsm_proto::connectioncontext::IpContext,
    ) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                context: Some(nsm_proto::connectioncontext::ConnectionContext {
                    ip_context: Some(ipc),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Waits (in tokio time, 5 ms steps) until `check` holds; fails the test with
    /// `what` after 5 s.
    pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
