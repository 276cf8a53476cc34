//! What an NSC shows of its connections: one JSON line per connection on stdout.

use std::io::Write;

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::json::connection_to_json;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::{Cx, Handler, Next};
use tracing::warn;

/// See [`print_connections`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PrintConnections;

/// A client-side handler that prints each connection a Request returns as one line of
/// JSON (the protobuf JSON mapping) on stdout.
///
/// Put in a client chain after `begin` (where
/// [`ClientOptions::handler`](nsm_sdk::chains::ClientOptions::handler) puts it), it
/// prints the first answer and every later one that differs from the last printed:
/// refreshes and heals re-enter the chain just after `begin`, so a heal to another
/// endpoint or a refresh that changes the addresses prints again, while a refresh that
/// only renews the path's tokens does not.
/// State: per connection, the last connection printed.
pub fn print_connections() -> PrintConnections {
    PrintConnections
}

/// The last connection printed, as compared (tokens left out).
#[derive(Default)]
struct LastPrinted(std::sync::Mutex<Option<Connection>>);

/// `conn` without what every refresh renews (tokens and their expiry).
fn without_tokens(conn: &Connection) -> Connection {
    let mut c = conn.clone();
    if let Some(p) = c.path.as_mut() {
        for s in &mut p.path_segments {
            s.token.clear();
            s.expires = None;
        }
    }
    c
}

/// Prints `conn` as one JSON line on stdout, flushed at once.
pub fn print_connection(conn: &Connection) {
    let mut out = std::io::stdout().lock();
    let line = connection_to_json(conn);
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        warn!(error = %e, "cannot write the connection to stdout");
    }
}

#[async_trait]
impl Handler for PrintConnections {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let conn = next.request(cx, req).await?;
        let shown = without_tokens(&conn);
        let changed = match cx.conn().map(|h| h.state::<LastPrinted>()) {
            Some(last) => {
                let mut last = last.0.lock().unwrap_or_else(|p| p.into_inner());
                let changed = last.as_ref() != Some(&shown);
                *last = Some(shown);
                changed
            }
            None => true,
        };
        if changed {
            print_connection(&conn);
        }
        Ok(conn)
    }
}
