//! The in-memory transport: `inmem://name` listeners in a process-wide table, and
//! connections that are tokio duplex pipes.
//!
//! A [`MemoryListener`] owns its name until it is dropped; [`connect`] opens a pipe to
//! the listener of a name, or fails at once with [`Error::Unavailable`] when nothing
//! listens there, the way a refused TCP connection does. Dropping a listener frees the
//! name immediately, so a restarted server can listen on it again.
//!
//! State: the table of names (a `std` mutex, never held across an await).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};

use tokio::io::DuplexStream;
use tokio::sync::mpsc;

use crate::{Error, Result};

/// Bytes buffered in each direction of an in-memory connection.
const PIPE_BUFFER: usize = 256 * 1024;

struct Entry {
    id: u64,
    tx: mpsc::UnboundedSender<DuplexStream>,
}

static LISTENERS: LazyLock<Mutex<HashMap<String, Entry>>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn table() -> std::sync::MutexGuard<'static, HashMap<String, Entry>> {
    LISTENERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A listener on `inmem://name`: receives one duplex stream per connection.
pub struct MemoryListener {
    name: String,
    id: u64,
    rx: mpsc::UnboundedReceiver<DuplexStream>,
}

impl fmt::Debug for MemoryListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryListener")
            .field("name", &self.name)
            .finish()
    }
}

/// Listens on `inmem://name`.
///
/// Fails with [`Error::Unavailable`] when another listener holds the name.
pub fn listen(name: &str) -> Result<MemoryListener> {
    let mut table = table();
    if let Some(entry) = table.get(name) {
        if !entry.tx.is_closed() {
            return Err(Error::unavailable(format!(
                "cannot listen on inmem://{name}: the name is in use"
            )));
        }
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    table.insert(name.to_string(), Entry { id, tx });
    Ok(MemoryListener {
        name: name.to_string(),
        id,
        rx,
    })
}

/// Opens a connection to the listener on `inmem://name`; returns the client's end.
///
/// Fails at once with [`Error::Unavailable`] when nothing listens on the name.
pub fn connect(name: &str) -> Result<DuplexStream> {
    let refused = || Error::unavailable(format!("nothing listens on inmem://{name}"));
    let tx = table()
        .get(name)
        .map(|e| e.tx.clone())
        .ok_or_else(refused)?;
    let (client, server) = tokio::io::duplex(PIPE_BUFFER);
    tx.send(server).map_err(|_| refused())?;
    Ok(client)
}

impl MemoryListener {
    /// The name this listener holds.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the next connection; returns the server's end.
    pub async fn accept(&mut self) -> Option<DuplexStream> {
        self.rx.recv().await
    }

    /// Polls for the next connection; `Ready(None)` when the listener can no longer
    /// receive any.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<DuplexStream>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for MemoryListener {
    fn drop(&mut self) {
        let mut table = table();
        // Only our own entry: a newer listener may already hold the name.
        if table.get(&self.name).is_some_and(|e| e.id == self.id) {
            table.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_connection_reaches_the_listener_and_the_name_is_freed_on_drop() {
        let name = format!("memory-test-{}", uuid::Uuid::new_v4());
        let mut listener = listen(&name).unwrap();
        assert_eq!(
            listen(&name).unwrap_err().code(),
            tonic::Code::Unavailable,
            "a name has one listener"
        );

        let mut client = connect(&name).unwrap();
        let mut server = listener.accept().await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        drop(listener);
        let err = connect(&name).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.to_string().contains("nothing listens on inmem://"),
            "{err}"
        );
        let _again = listen(&name).unwrap();
    }
}
