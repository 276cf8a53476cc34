//! Unix-socket clients of other gRPC stacks: their `:authority` made acceptable to h2.
//!
//! gRPC C-core (Python's grpcio, C++, Ruby, PHP) dialing `unix:///run/nsm/nsm.sock`
//! with default options sends the socket path, percent-encoded, as the request's
//! `:authority` (`run%2Fnsm%2Fnsm.sock`), and grpc-java sends the path itself. The
//! `http` crate under h2 refuses both as authorities, so h2 answers every such request
//! with a stream reset (PROTOCOL_ERROR) before tonic sees it (hyperium/h2#487); neither
//! h2 nor hyper has an option to accept them.
//!
//! [`FixAuthority`] sits between the connection (after the TLS handshake, so mTLS stays
//! as it is) and h2, on the read side of unix-socket connections only. It passes every
//! frame through unchanged except header blocks (HEADERS and its CONTINUATIONs): it
//! decodes each block with its own HPACK decoder (the peer's encoder state), replaces
//! an `:authority` that is not a valid URI authority with `localhost` (on a unix socket
//! the authority names nothing: the socket file is the address), and encodes the block
//! again for h2 with its own HPACK encoder, as one HEADERS frame followed by
//! CONTINUATIONs of at most 16 KiB. Every block goes through the same decoder and
//! encoder in order, so both HPACK contexts stay in step whatever the peer indexes.
//!
//! A peer whose first header block already has a valid `:authority` (our own clients,
//! grpc-go) is not one of those stacks: that block goes to h2 as it came (so h2's HPACK
//! context is the peer's) and the rest of the connection passes straight through, with
//! no decoding, no copy and no cost per call.
//!
//! State: the two HPACK contexts, the bytes read and not yet framed, the frame being
//! passed through and the header block being gathered. Failure: a header block that does
//! not decode, or that grows beyond [`MAX_HEADER_BLOCK`], ends the connection with
//! `InvalidData` (h2 would refuse it as well); a peer's padding and priority fields
//! are dropped (h2 ignores both).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;
use tracing::debug;

/// The client connection preface (RFC 9113, 3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame h2 accepts unless told otherwise (SETTINGS_MAX_FRAME_SIZE's
/// initial value): the re-encoded block is cut into frames of this size.
const MAX_FRAME: usize = 16_384;
/// The largest header block gathered (HEADERS and CONTINUATIONs together).
pub(crate) const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// What an unusable `:authority` on a unix socket becomes.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// A connection whose inbound header blocks carry a valid `:authority` (see the
/// [module docs](self)).
pub(crate) struct FixAuthority<T> {
    io: T,
    /// Read from `io`, not yet processed.
    input: Vec<u8>,
    /// Processed, not yet handed to h2.
    output: Vec<u8>,
    /// Preface bytes still expected.
    preface: usize,
    /// Payload bytes of a passed-through frame still to copy.
    passing: usize,
    /// The header block being gathered: stream id, END_STREAM, priority fields.
    block: Option<Block>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    eof: bool,
    /// No header block seen yet.
    first: bool,
    /// The first block's authority was valid: everything passes straight through.
    bypass: bool,
}

struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl<T> FixAuthority<T> {
    pub(crate) fn new(io: T) -> Self {
        FixAuthority {
            io,
            input: Vec::new(),
            output: Vec::new(),
            preface: PREFACE.len(),
            passing: 0,
            block: None,
            decoder: Decoder::new(),
            encoder: Encoder::new(),
            eof: false,
            first: true,
            bypass: false,
        }
    }

    /// Moves what can be processed from `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        let mut at = 0;
        loop {
            let rest = &self.input[at..];
            if self.bypass {
                self.output.extend_from_slice(rest);
                at = self.input.len();
                break;
            }
            if self.preface > 0 {
                let n = self.preface.min(rest.len());
                if rest[..n] != PREFACE[PREFACE.len() - self.preface..][..n] {
                    return Err(invalid("not an HTTP/2 connection preface"));
                }
                self.output.extend_from_slice(&rest[..n]);
                self.preface -= n;
                at += n;
                if self.preface > 0 {
                    break;
                }
                continue;
            }
            if self.passing > 0 {
                let n = self.passing.min(rest.len());
                if n == 0 {
                    break;
                }
                self.output.extend_from_slice(&rest[..n]);
                self.passing -= n;
                at += n;
                continue;
            }
            if rest.len() < FRAME_HEADER {
                break;
            }
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let kind = rest[3];
            let flags = rest[4];
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
            if kind != HEADERS && kind != CONTINUATION {
                if self.block.is_some() {
                    return Err(invalid("a header block interrupted by another frame"));
                }
                self.output.extend_from_slice(&rest[..FRAME_HEADER]);
                self.passing = len;
                at += FRAME_HEADER;
                continue;
            }
            if rest.len() < FRAME_HEADER + len {
                if len > MAX_HEADER_BLOCK {
                    return Err(invalid("header block too large"));
                }
                break;
            }
            let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
            at += FRAME_HEADER + len;
            if kind == HEADERS {
                if self.block.is_some() {
                    return Err(invalid("HEADERS inside a header block"));
                }
                let (priority, fragment) = headers_fragment(flags, payload)?;
                self.block = Some(Block {
                    stream,
                    flags,
                    priority,
                    fragment: fragment.to_vec(),
                });
            } else {
                let Some(block) = self.block.as_mut() else {
                    return Err(invalid("CONTINUATION outside a header block"));
                };
                if block.stream != stream {
                    return Err(invalid("CONTINUATION of another stream"));
                }
                block.fragment.extend_from_slice(payload);
            }
            if self
                .block
                .as_ref()
                .is_some_and(|b| b.fragment.len() > MAX_HEADER_BLOCK)
            {
                return Err(invalid("header block too large"));
            }
            if flags & END_HEADERS != 0 {
                let block = self.block.take().expect("gathered above");
                self.emit(block)?;
            }
        }
        self.input.drain(..at);
        Ok(())
    }

    /// Decodes a whole header block, fixes its `:authority` and writes it out again.
    fn emit(&mut self, block: Block) -> io::Result<()> {
        let mut headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| invalid(&format!("header block does not decode: {e:?}")))?;
        let mut fixed = false;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" && Authority::try_from(value.as_slice()).is_err() {
                debug!(
                    authority = %String::from_utf8_lossy(value),
                    "unix-socket peer's :authority replaced by localhost"
                );
                *value = LOCAL_AUTHORITY.to_vec();
                fixed = true;
            }
        }
        if std::mem::take(&mut self.first) && !fixed {
            // A peer that needs no fixing: its block as it came, then nothing decoded.
            self.bypass = true;
            self.write_block(&block, &block.fragment);
            return Ok(());
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        self.write_block(&block, &encoded);
        Ok(())
    }

    /// Writes `encoded` as the header block of `block`'s stream: one HEADERS frame (with
    /// the block's END_STREAM and priority) and CONTINUATIONs of at most 16 KiB.
    fn write_block(&mut self, block: &Block, encoded: &[u8]) {
        let mut first = Vec::with_capacity(5 + encoded.len().min(MAX_FRAME));
        let mut flags = block.flags & END_STREAM;
        if let Some(priority) = block.priority {
            first.extend_from_slice(&priority);
            flags |= PRIORITY;
        }
        let room = MAX_FRAME - first.len();
        let (head, mut tail) = encoded.split_at(room.min(encoded.len()));
        first.extend_from_slice(head);
        if tail.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame(HEADERS, flags, block.stream, &first);
        while !tail.is_empty() {
            let (chunk, rest) = tail.split_at(MAX_FRAME.min(tail.len()));
            tail = rest;
            let flags = if tail.is_empty() { END_HEADERS } else { 0 };
            self.frame(CONTINUATION, flags, block.stream, chunk);
        }
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.output.extend(frame(kind, flags, stream, payload));
    }
}

/// An HTTP/2 frame: its 9-byte header, then `payload`.
pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(FRAME_HEADER + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The priority fields and the header block fragment of a HEADERS payload, padding
/// removed.
fn headers_fragment(flags: u8, payload: &[u8]) -> io::Result<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = body
            .split_first()
            .ok_or_else(|| invalid("HEADERS without its pad length"))?;
        pad = usize::from(n);
        body = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        if body.len() < 5 {
            return Err(invalid("HEADERS without its priority fields"));
        }
        let mut p = [0; 5];
        p.copy_from_slice(&body[..5]);
        priority = Some(p);
        body = &body[5..];
    }
    if pad > body.len() {
        return Err(invalid("HEADERS padding longer than the frame"));
    }
    Ok((priority, &body[..body.len() - pad]))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<T: AsyncRead + Unpin> AsyncRead for FixAuthority<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.bypass && this.output.is_empty() && this.input.is_empty() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if read.filled().is_empty() {
                        this.eof = true;
                        continue;
                    }
                    this.input.extend_from_slice(read.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FixAuthority<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Runs `input` through the rewriter and returns what h2 would read.
    async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        peer.write_all(&input).await.unwrap();
        drop(peer);
        let mut out = Vec::new();
        FixAuthority::new(ours).read_to_end(&mut out).await?;
        Ok(out)
    }

    /// Decodes the header blocks of `bytes` (after the preface) as h2 would.
    fn header_blocks(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = Decoder::new();
        let mut at = PREFACE.len();
        let mut blocks = Vec::new();
        let mut fragment = Vec::new();
        while at < bytes.len() {
            let len =
                (bytes[at] as usize) << 16 | (bytes[at + 1] as usize) << 8 | bytes[at + 2] as usize;
            let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
            let payload = &bytes[at + 9..at + 9 + len];
            if kind == HEADERS || kind == CONTINUATION {
                let (_, f) =
                    headers_fragment(if kind == HEADERS { flags } else { 0 }, payload).unwrap();
                fragment.extend_from_slice(f);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&fragment).unwrap());
                    fragment.clear();
                }
            }
            at += 9 + len;
        }
        blocks
    }

    fn authority(block: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        block
            .iter()
            .find(|(n, _)| n == b":authority")
            .map(|(_, v)| v.clone())
            .unwrap()
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_the_rest_is_kept() {
        let mut client = Encoder::new();
        let request: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/a.B/C"),
            (b":authority", b"run%2Fnsm%2Fnsm.sock"),
            (b"te", b"trailers"),
        ];
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        // The first block indexes the authority, the second refers to it by index.
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &client.encode(request.clone()),
        ));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        let second = client.encode(request.clone());
        // The second block split across HEADERS (padded) and a CONTINUATION.
        let mut padded = vec![3];
        padded.extend_from_slice(&second[..2]);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | END_STREAM, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &second[2..]));
        let out = through(input).await.unwrap();
        assert!(out.starts_with(PREFACE));
        let blocks = header_blocks(&out);
        assert_eq!(blocks.len(), 2);
        for block in &blocks {
            assert_eq!(authority(block), b"localhost");
            assert!(block.contains(&(b":path".to_vec(), b"/a.B/C".to_vec())));
            assert!(block.contains(&(b"te".to_vec(), b"trailers".to_vec())));
        }
        // The DATA frame passed unchanged.
        assert!(out
            .windows(14)
            .any(|w| w == frame(0x0, END_STREAM, 1, b"\0\0\0\0\0").as_slice()));
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let mut client = Encoder::new();
        let mut input = PREFACE.to_vec();
        let block = client.encode(vec![(&b":authority"[..], &b"localhost:5001"[..])]);
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = through(input).await.unwrap();
        assert_eq!(authority(&header_blocks(&out)[0]), b"localhost:5001");
    }

    #[tokio::test]
    async fn a_peer_whose_first_authority_is_valid_passes_through_byte_for_byte() {
        let mut client = Encoder::new();
        let mut input = PREFACE.to_vec();
        for stream in [1, 3] {
            let block = client.encode(vec![
                (&b":authority"[..], &b"localhost"[..]),
                (
                    &b":path"[..],
                    &b"/networkservice.NetworkService/Request"[..],
                ),
            ]);
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
            input.extend(frame(0x0, END_STREAM, stream, b"data"));
        }
        assert_eq!(through(input.clone()).await.unwrap(), input);
    }

    #[tokio::test]
    async fn garbage_ends_the_connection() {
        assert!(through(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        assert!(through(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
        assert!(through(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0u8; 16_000]));
        for _ in 0..20 {
            input.extend(frame(CONTINUATION, 0, 1, &[0u8; 16_000]));
        }
        assert!(through(input).await.is_err());
    }
}
