//! Local connections written one buffer at a time, so that a whole gRPC message goes
//! out in one write.
//!
//! h2 (under tonic) puts a DATA frame's payload into its write buffer only when it is
//! smaller than a threshold: 256 bytes when the connection can write vectored, 1,024
//! bytes when it cannot. A larger payload is kept aside and written after the buffer,
//! and the frames queued after it (a response's trailers, a request's closing empty
//! DATA frame) wait for that write to finish: a unary response of a few hundred bytes
//! (an NSM `Connection` is 400 to 500 bytes) went out in three `writev` calls (HEADERS
//! with the start of DATA, the rest of DATA, the trailers), a request in two, and the
//! peer could wake up for each. Told that the connection cannot write vectored, h2
//! copies payloads up to 1,024 bytes into its buffer and writes HEADERS, DATA and
//! trailers with one `write`: one wake-up of the peer instead of two or three.
//!
//! Used for unix sockets and in-memory pipes (a copy of a small payload costs nothing
//! next to a system call and a wake-up); TCP connections keep vectored writes, where a
//! large message would otherwise cost one more segment.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `T` as a connection without vectored writes (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Unvectored<T>(pub(crate) T);

impl<T: AsyncRead + Unpin> AsyncRead for Unvectored<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Unvectored<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn passes_bytes_both_ways_and_says_it_cannot_write_vectored() {
        let (a, b) = tokio::io::duplex(64);
        let (mut a, mut b) = (Unvectored(a), Unvectored(b));
        assert!(!a.is_write_vectored());
        a.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        b.write_all(b"back").await.unwrap();
        b.shutdown().await.unwrap();
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"back");
    }
}
