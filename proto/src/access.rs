//! Accessors for what every hop reads first.

use std::sync::OnceLock;

use crate::connection::Connection;
use crate::networkservice::NetworkServiceRequest;

impl NetworkServiceRequest {
    /// The request's connection, or an empty one when it carries none (every field
    /// then reads as its default: no id, no network service, no path).
    pub fn conn(&self) -> &Connection {
        static EMPTY: OnceLock<Connection> = OnceLock::new();
        self.connection
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Connection::default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_a_connection_reads_as_an_empty_one() {
        let req = NetworkServiceRequest::default();
        assert_eq!(req.conn(), &Connection::default());
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                id: "c-1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(req.conn().id, "c-1");
    }
}
