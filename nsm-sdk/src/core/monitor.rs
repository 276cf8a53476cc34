//! The source of MonitorConnection streams that the transport serves.

use futures::stream::BoxStream;
use nsm_proto::connection::{ConnectionEvent, MonitorScopeSelector};

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
}
