//! The source of MonitorConnection streams that the transport serves.

use futures::stream::BoxStream;
use nsm_proto::connection::{ConnectionEvent, MonitorScopeSelector};

use crate::security::PeerIdentity;
use crate::Result;

/// Something that can stream connection events to a subscriber: an INITIAL_STATE_TRANSFER
/// first (even when empty), then UPDATE and DELETE events for the connections the
/// selector matches. Implemented by the `monitor` handler; served by the transport as
/// the `MonitorConnection` gRPC service.
pub trait MonitorSource: Send + Sync + 'static {
    /// Subscribes with `selector`.
    fn subscribe(
        &self,
        selector: MonitorScopeSelector,
    ) -> BoxStream<'static, Result<ConnectionEvent>>;

    /// Subscribes with `selector` on behalf of `subscriber`, the verified identity of
    /// the stream's peer (`None` on a link without TLS); the transport calls this. A
    /// source that shows each subscriber only its own connections (the `monitor`
    /// module's `authorized`) overrides it; by default everything is shown.
    fn subscribe_as(
        &self,
        selector: MonitorScopeSelector,
        subscriber: Option<&PeerIdentity>,
    ) -> BoxStream<'static, Result<ConnectionEvent>> {
        let _ = subscriber;
        self.subscribe(selector)
    }
}
