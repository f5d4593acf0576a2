//! PROXY protocol v1/v2 headers from a load balancer (README "Behind an NLB").
//!
//! A load balancer that terminates nothing (e.g. an AWS NLB) hides the client's address behind its
//! own; with the PROXY protocol it sends that address in a header before the connection's own
//! bytes. [`read_header`] reads that header (before TLS and HTTP), with a time limit, and hands
//! back the client's address and the stream with whatever it read past the header still to read.
//! No metrics or logging here: the caller counts and logs a [`Refusal`] by its [`Refusal::label`].

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ppp::PartialResult;
use ppp::{v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Longest PROXY header accepted: v2's 16-byte preamble plus its length field's bytes are
/// bounded by this (reject longer ones as Invalid); v1 lines are at most 107 bytes by spec.
///
/// A v2 header holds at most 216 address bytes (UNIX) plus TLVs; the TLVs load balancers send
/// (AWS's VPC endpoint id, ALPN, authority, SSL details) take a few hundred bytes at most, so 4 KiB
/// is ample while stopping a peer from making us buffer the 64 KiB a v2 length field can declare.
pub const MAX_HEADER: usize = 4096;

/// The size of each read: the classic minimum TCP MSS, so a header sent in one segment arrives in
/// one read, and little is read past a short header (it is handed back anyway).
const CHUNK: usize = 536;

/// The fixed part of a v2 header: the 12-byte signature, version/command, family/protocol and
/// the 2-byte length of what follows.
const V2_PREAMBLE: usize = 16;

/// Why a connection's PROXY header was refused; the connection is then closed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No complete header within the time limit.
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    /// The peer closed (EOF) before a complete header.
    #[error("connection closed before a complete PROXY header")]
    Closed,
    /// Not a valid PROXY v1/v2 header (includes a plain HTTP request or TLS ClientHello with no
    /// header, garbage, too long, unsupported version/command).
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
    /// Reading failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

impl Refusal {
    /// The metric label: "timeout", "closed", "invalid" or "io".
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Timeout(_) => "timeout",
            Refusal::Closed => "closed",
            Refusal::Invalid(_) => "invalid",
            Refusal::Io(_) => "io",
        }
    }
}

/// A stream that first yields bytes already read from it, then reads the stream itself.
/// Writes go straight to the inner stream.
#[derive(Debug)]
pub struct Rewind<S> {
    /// Bytes read past the PROXY header, not yet handed out.
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, with `prefix` to be read before it.
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }

    /// The inner stream (e.g. to read socket options).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The bytes not yet read from the prefix, and the inner stream: for a caller that wraps the
    /// stream in something else (TLS) and passes the prefix on, or skips the wrapper when it is empty.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(this.prefix.split_to(n).as_ref());
        if this.prefix.is_empty() {
            // Release the read buffer the prefix was cut from rather than keep it for the
            // connection's lifetime.
            this.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reads a PROXY v1 or v2 header from `stream` within `within`.
///
/// Returns the client's address from the header — `None` for a v2 LOCAL command (the load
/// balancer's own health check), for v1 `UNKNOWN`, and for v2 address families other than
/// TCP over IPv4/IPv6 (UNSPEC, UNIX, UDP): the caller then uses the TCP peer — and the stream
/// with every byte read past the header still to be read.
pub async fn read_header<S: AsyncRead + Unpin>(
    mut stream: S,
    within: Duration,
) -> Result<(Option<SocketAddr>, Rewind<S>), Refusal> {
    // One limit for all the reads together: a peer trickling a byte at a time gains nothing.
    let (client, rest) =
        tokio::time::timeout(within, read_until_header(&mut stream)).await.map_err(|_| Refusal::Timeout(within))??;
    Ok((client, Rewind::new(rest, stream)))
}

/// Reads until `stream` has sent a whole header; returns its client address and the bytes read
/// past it.
async fn read_until_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Option<SocketAddr>, Bytes), Refusal> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        // Unreachable with ppp's and our own length checks; kept so that no parser quirk can make
        // us buffer without bound.
        if buf.len() > MAX_HEADER {
            return Err(Refusal::Invalid(format!("no complete header in {} bytes", buf.len())));
        }
        // Room to read into, so a 0-byte read means EOF.
        buf.reserve(CHUNK);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(Refusal::Closed);
        }
        if let Some((len, client)) = examine(&buf)? {
            buf.advance(len);
            return Ok((client, buf.freeze()));
        }
    }
}

/// Judges the bytes read so far: a whole header (its length and client address), `None` if more
/// bytes could complete it, or why they never can.
fn examine(buf: &[u8]) -> Result<Option<(usize, Option<SocketAddr>)>, Refusal> {
    // Dispatch on the first byte ourselves (v2's signature starts with CR, v1 with 'P') rather than
    // use `ppp::HeaderResult::parse`: that retries any failed v2 header as v1, so a v2 header with
    // e.g. a bad version would be reported as "must start with 'PROXY'".
    if buf.first() == Some(&b'\r') { examine_v2(buf) } else { examine_v1(buf) }
}

/// [`examine`] for a v1 (text) header.
fn examine_v1(buf: &[u8]) -> Result<Option<(usize, Option<SocketAddr>)>, Refusal> {
    match v1::Header::try_from(buf) {
        Ok(header) => {
            let client = match header.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Ok(Some((header.header.len(), client)))
        }
        Err(e) if e.is_incomplete() => {
            // ppp judges the line up to its first CR and the byte after it; once both are here more
            // bytes cannot change its answer, yet it calls a short line such as
            // "PROXY TCP4 1.2.3.4\r\n" incomplete ("missing source port"): refuse it now rather
            // than wait for the time limit.
            match buf.iter().position(|&b| b == b'\r') {
                Some(cr) if buf.len() > cr + 1 => Err(Refusal::Invalid(format!("v1: {e}"))),
                _ => Ok(None),
            }
        }
        // ppp reads a line cut just after the space before the destination port ("... 51000 ") as
        // an empty, so invalid, port: judge it without that space, as a cut after the source port.
        Err(v1::BinaryParseError::Parse(v1::ParseError::InvalidDestinationPort(_)))
            if !buf.contains(&b'\r')
                && let Some(before_space) = buf.strip_suffix(b" ")
                && v1::Header::try_from(before_space).is_incomplete() =>
        {
            Ok(None)
        }
        // Also what a request with no header at all gets: "GET ..." or a TLS ClientHello (0x16)
        // fail "must start with 'PROXY'" (or "not valid UTF-8") from their first byte.
        Err(e) => Err(Refusal::Invalid(format!("v1: {e}"))),
    }
}

/// [`examine`] for a v2 (binary) header.
fn examine_v2(buf: &[u8]) -> Result<Option<(usize, Option<SocketAddr>)>, Refusal> {
    match v2::Header::try_from(buf) {
        Ok(header) => {
            // A long header can arrive whole in one read; refuse it as if it had been cut short.
            check_v2_length(header.length())?;
            // Only a PROXY command for TCP carries a client address we can use; LOCAL is the load
            // balancer speaking for itself (health checks), and UDP/UNIX/UNSPEC are not a TCP peer.
            let client = match (header.command, header.protocol, header.addresses) {
                (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            Ok(Some((header.len(), client)))
        }
        // The length field is in: refuse an over-long header before buffering it.
        Err(v2::ParseError::Partial(_, length)) => check_v2_length(length).map(|()| None),
        Err(e) if e.is_incomplete() => Ok(None),
        Err(e) => Err(Refusal::Invalid(format!("v2: {e}"))),
    }
}

/// Refuses a v2 header whose length field (the bytes after the preamble) would take it past
/// [`MAX_HEADER`].
fn check_v2_length(length: usize) -> Result<(), Refusal> {
    if V2_PREAMBLE + length > MAX_HEADER {
        return Err(Refusal::Invalid(format!(
            "v2 header of {} bytes is longer than {MAX_HEADER}",
            V2_PREAMBLE + length
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use tokio::io::{AsyncWriteExt, DuplexStream, duplex};
    use tokio::time::{Instant, sleep};

    use super::*;

    /// A limit the tests that must not wait for it never reach.
    const LONG: Duration = Duration::from_secs(10);

    const SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    const HTTP: &[u8] = b"GET /a.mp4 HTTP/1.1\r\nHost: media.example\r\n\r\n";

    /// v2 header bytes by hand: signature, version 2 | `command`, `family_protocol`, length, `body`.
    fn v2_bytes(command: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
        let mut out = SIG.to_vec();
        out.push(0x20 | command);
        out.push(family_protocol);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// v2 PROXY TCP4 192.0.2.1:51000 -> 198.51.100.2:443.
    fn v2_tcp4() -> Vec<u8> {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2];
        body.extend_from_slice(&51000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        v2_bytes(0x1, 0x11, &body)
    }

    const V1_TCP4: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n";

    fn tcp4_client() -> Option<SocketAddr> {
        Some(SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 51000)))
    }

    /// Reads what is left of `rewind` after the peer has closed.
    async fn rest(mut rewind: Rewind<DuplexStream>) -> Vec<u8> {
        let mut out = Vec::new();
        rewind.read_to_end(&mut out).await.unwrap();
        out
    }

    /// Sends `bytes` in one write, closes, and reads the header.
    async fn send_all(bytes: &[u8]) -> (Result<(Option<SocketAddr>, Rewind<DuplexStream>), Refusal>, Duration) {
        let (mut client, server) = duplex(64 * 1024);
        client.write_all(bytes).await.unwrap();
        drop(client);
        let start = Instant::now();
        let result = read_header(server, LONG).await;
        (result, start.elapsed())
    }

    /// Sends `bytes` and keeps the connection open: a refusal must come from the bytes alone, and at
    /// once rather than at the time limit.
    async fn refused_open(bytes: &[u8]) -> Refusal {
        let (mut client, server) = duplex(64 * 1024);
        client.write_all(bytes).await.unwrap();
        let start = Instant::now();
        let refusal = read_header(server, LONG).await.expect_err("refused");
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        drop(client);
        refusal
    }

    #[tokio::test]
    async fn v1_tcp4_keeps_following_bytes_in_the_same_write() {
        let (result, _) = send_all(&[V1_TCP4, HTTP].concat()).await;
        let (addr, rewind) = result.unwrap();
        assert_eq!(addr, tcp4_client());
        assert_eq!(rest(rewind).await, HTTP);
    }

    #[tokio::test]
    async fn v1_tcp6_keeps_following_bytes_from_later_writes() {
        let (mut client, server) = duplex(64 * 1024);
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\nGET";
        client.write_all(line).await.unwrap();
        let (addr, rewind) = read_header(server, LONG).await.unwrap();
        assert_eq!(addr, Some(SocketAddr::from(("2001:db8::1".parse::<Ipv6Addr>().unwrap(), 40000))));
        client.write_all(&HTTP[3..]).await.unwrap();
        drop(client);
        assert_eq!(rest(rewind).await, HTTP);
    }

    #[tokio::test]
    async fn v1_unknown_is_no_address() {
        for line in [&b"PROXY UNKNOWN\r\n"[..], b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"] {
            let (result, _) = send_all(&[line, HTTP].concat()).await;
            let (addr, rewind) = result.unwrap();
            assert_eq!(addr, None);
            assert_eq!(rest(rewind).await, HTTP);
        }
    }

    #[tokio::test]
    async fn v2_proxy_tcp4() {
        let (result, _) = send_all(&[&v2_tcp4()[..], HTTP].concat()).await;
        let (addr, rewind) = result.unwrap();
        assert_eq!(addr, tcp4_client());
        assert_eq!(rest(rewind).await, HTTP);
    }

    #[tokio::test]
    async fn v2_proxy_tcp6() {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::8".parse().unwrap();
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&dst.octets());
        body.extend_from_slice(&[0xC3, 0x50, 0x01, 0xBB]); // ports 50000, 443
        let (result, _) = send_all(&[&v2_bytes(0x1, 0x21, &body)[..], HTTP].concat()).await;
        let (addr, rewind) = result.unwrap();
        assert_eq!(addr, Some(SocketAddr::from((src, 50000))));
        assert_eq!(rest(rewind).await, HTTP);
    }

    #[tokio::test]
    async fn v2_local_is_no_address() {
        // As health checks send it (UNSPEC, no addresses), and with addresses, which LOCAL ignores.
        let with_addresses = v2_bytes(0x0, 0x11, &v2_tcp4()[V2_PREAMBLE..]);
        for header in [v2_bytes(0x0, 0x00, &[]), with_addresses] {
            let (result, _) = send_all(&[&header[..], HTTP].concat()).await;
            let (addr, rewind) = result.unwrap();
            assert_eq!(addr, None);
            assert_eq!(rest(rewind).await, HTTP);
        }
    }

    #[tokio::test]
    async fn v2_udp_unix_and_unspec_are_no_address() {
        let ipv4 = &v2_tcp4()[V2_PREAMBLE..];
        let headers = [
            v2_bytes(0x1, 0x12, ipv4),      // UDP over IPv4
            v2_bytes(0x1, 0x31, &[0; 216]), // UNIX stream
            v2_bytes(0x1, 0x00, &[]),       // UNSPEC
            v2_bytes(0x1, 0x10, ipv4),      // IPv4, protocol UNSPEC
        ];
        for header in headers {
            let (result, _) = send_all(&[&header[..], HTTP].concat()).await;
            let (addr, rewind) = result.unwrap();
            assert_eq!(addr, None);
            assert_eq!(rest(rewind).await, HTTP);
        }
    }

    #[tokio::test]
    async fn v2_tlvs_are_skipped() {
        let addresses = v2::Addresses::from((tcp4_client().unwrap(), "198.51.100.2:443".parse().unwrap()));
        let builder =
            || v2::Builder::with_addresses(v2::Version::Two | v2::Command::Proxy, v2::Protocol::Stream, addresses);
        // Without TLVs the builder writes what we write by hand.
        assert_eq!(builder().build().unwrap(), v2_tcp4());
        let header = builder()
            .write_tlv(v2::Type::Authority, b"media.example".as_slice())
            .unwrap()
            .write_tlv(0xEA, b"\x01vpce-0123456789abcdef".as_slice()) // AWS VPC endpoint id
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(header.len(), 28 + (3 + 13) + (3 + 22), "the TLVs are in the header");
        let (result, _) = send_all(&[&header[..], HTTP].concat()).await;
        let (addr, rewind) = result.unwrap();
        assert_eq!(addr, tcp4_client());
        assert_eq!(rest(rewind).await, HTTP);
    }

    #[tokio::test]
    async fn header_split_across_writes_with_pauses() {
        for header in [V1_TCP4.to_vec(), v2_tcp4()] {
            let (mut client, server) = duplex(64 * 1024);
            let task = tokio::spawn(read_header(server, LONG));
            let (a, rest_of_header) = header.split_at(5);
            let (b, c) = rest_of_header.split_at(15);
            for piece in [a, b] {
                client.write_all(piece).await.unwrap();
                sleep(Duration::from_millis(50)).await;
                assert!(!task.is_finished(), "waits for the rest after {} bytes", piece.len());
            }
            client.write_all(&[c, HTTP].concat()).await.unwrap();
            drop(client);
            let (addr, rewind) = task.await.unwrap().unwrap();
            assert_eq!(addr, tcp4_client());
            assert_eq!(rest(rewind).await, HTTP);
        }
    }

    #[tokio::test]
    async fn header_split_at_every_byte() {
        for header in [V1_TCP4.to_vec(), v2_tcp4()] {
            for at in 1..header.len() {
                let (mut client, server) = duplex(64 * 1024);
                let task = tokio::spawn(read_header(server, LONG));
                client.write_all(&header[..at]).await.unwrap();
                tokio::task::yield_now().await;
                client.write_all(&[&header[at..], HTTP].concat()).await.unwrap();
                drop(client);
                let (addr, rewind) = task.await.unwrap().unwrap();
                assert_eq!(addr, tcp4_client(), "split at {at}");
                assert_eq!(rest(rewind).await, HTTP, "split at {at}");
            }
        }
    }

    #[test]
    fn short_prefixes() {
        assert!(matches!(examine(b"P"), Ok(None)));
        assert!(matches!(examine(b"\r"), Ok(None)));
        for refused in [&b"G"[..], b"\x16", b"PX", b"PROXYX", b"\r\r", b"\r\n\r\n\0\r\nQUIX", b"\0"] {
            assert!(matches!(examine(refused), Err(Refusal::Invalid(_))), "{refused:?}");
        }
        // No proper prefix of a valid header is refused or taken for a whole one.
        let v1_tcp6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 0 8080\r\n".to_vec();
        for header in [V1_TCP4.to_vec(), v1_tcp6, v2_tcp4(), b"PROXY UNKNOWN\r\n".to_vec()] {
            for at in 1..header.len() {
                assert!(matches!(examine(&header[..at]), Ok(None)), "{:?}", &header[..at]);
            }
            assert!(matches!(examine(&header), Ok(Some((n, _))) if n == header.len()));
        }
    }

    #[tokio::test]
    async fn http_request_without_header_is_invalid_at_once() {
        let refusal = refused_open(HTTP).await;
        assert!(matches!(refusal, Refusal::Invalid(_)), "{refusal:?}");
        assert_eq!(refusal.label(), "invalid");
        // Even its first byte alone.
        assert!(matches!(refused_open(b"G").await, Refusal::Invalid(_)));
    }

    #[tokio::test]
    async fn tls_client_hello_without_header_is_invalid_at_once() {
        // Record header (handshake, TLS 1.0, length), ClientHello type and length, then random bytes
        // that are not UTF-8.
        let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xde\xad\xbe\xef\xff\xfe";
        assert!(matches!(refused_open(hello).await, Refusal::Invalid(_)));
        assert!(matches!(refused_open(&hello[..1]).await, Refusal::Invalid(_)));
    }

    #[tokio::test]
    async fn truncated_then_eof_is_closed() {
        for bytes in [&V1_TCP4[..20], &v2_tcp4()[..20], &b""[..]] {
            let (result, elapsed) = send_all(bytes).await;
            assert!(matches!(result, Err(Refusal::Closed)), "{:?}", result.err());
            assert!(elapsed < Duration::from_secs(2));
        }
    }

    #[tokio::test]
    async fn truncated_then_silence_is_timeout() {
        let (mut client, server) = duplex(64 * 1024);
        client.write_all(&V1_TCP4[..20]).await.unwrap();
        let limit = Duration::from_millis(200);
        let start = std::time::Instant::now();
        let refusal = read_header(server, limit).await.expect_err("refused");
        let elapsed = start.elapsed();
        assert!(matches!(refusal, Refusal::Timeout(d) if d == limit), "{refusal:?}");
        assert_eq!(refusal.label(), "timeout");
        assert!(elapsed >= Duration::from_millis(195), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
        drop(client);
    }

    #[tokio::test]
    async fn trickled_header_is_timed_out_as_a_whole() {
        // Each byte well within the limit, the whole header not.
        let (mut client, server) = duplex(64 * 1024);
        let limit = Duration::from_millis(200);
        let task = tokio::spawn(read_header(server, limit));
        for &b in V1_TCP4 {
            if task.is_finished() {
                break;
            }
            let _ = client.write_all(&[b]).await;
            sleep(Duration::from_millis(20)).await;
        }
        assert!(matches!(task.await.unwrap(), Err(Refusal::Timeout(_))));
    }

    #[tokio::test]
    async fn over_long_v1_is_invalid() {
        // No CR within 107 bytes.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(300, b'a');
        assert!(matches!(refused_open(&line).await, Refusal::Invalid(_)));
        // A CRLF-terminated line longer than 107 bytes.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(120, b'a');
        line.extend_from_slice(b"\r\n");
        assert!(matches!(refused_open(&line).await, Refusal::Invalid(_)));
    }

    #[tokio::test]
    async fn short_v1_line_is_invalid_at_once() {
        // ppp calls these incomplete (missing fields) though their line has ended.
        for line in [&b"PROXY TCP4 192.0.2.1\r\nGET"[..], b"PROXY TCP6\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"] {
            assert!(matches!(refused_open(line).await, Refusal::Invalid(_)), "{line:?}");
        }
    }

    #[tokio::test]
    async fn v1_with_bad_fields_is_invalid() {
        for line in [
            &b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 70000 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX",
            // Not the cut after the source port that ppp misreads: these stay invalid.
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 x ",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1  ",
        ] {
            assert!(matches!(refused_open(line).await, Refusal::Invalid(_)), "{line:?}");
        }
    }

    #[tokio::test]
    async fn v2_declaring_too_long_a_header_is_invalid_before_it_arrives() {
        let mut header = SIG.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        let refusal = refused_open(&header).await;
        assert!(matches!(&refusal, Refusal::Invalid(m) if m.contains("longer")), "{refusal:?}");
        // Just within the limit is fine, TLV bytes and all.
        let body = vec![0; MAX_HEADER - V2_PREAMBLE];
        let (result, _) = send_all(&v2_bytes(0x1, 0x00, &body)).await;
        assert!(result.is_ok());
        // One more byte, sent whole, is not.
        let body = vec![0; MAX_HEADER - V2_PREAMBLE + 1];
        let (result, _) = send_all(&v2_bytes(0x1, 0x00, &body)).await;
        assert!(matches!(result, Err(Refusal::Invalid(_))));
    }

    #[tokio::test]
    async fn v2_bad_version_command_or_family_is_invalid() {
        let mut bad_version = v2_tcp4();
        bad_version[12] = 0x11; // version 1 in the binary format
        let refusal = refused_open(&bad_version).await;
        assert!(matches!(&refusal, Refusal::Invalid(m) if m.contains("version")), "{refusal:?}");
        let mut bad_command = v2_tcp4();
        bad_command[12] = 0x22;
        assert!(matches!(refused_open(&bad_command).await, Refusal::Invalid(_)));
        let mut bad_family = v2_tcp4();
        bad_family[13] = 0x41;
        assert!(matches!(refused_open(&bad_family).await, Refusal::Invalid(_)));
        // Declared length shorter than the IPv4 addresses.
        assert!(matches!(refused_open(&v2_bytes(0x1, 0x11, &[0; 4])).await, Refusal::Invalid(_)));
    }

    /// A stream whose reads fail.
    #[derive(Debug)]
    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    #[tokio::test]
    async fn read_error_is_io() {
        let refusal = read_header(Failing, LONG).await.expect_err("refused");
        assert!(matches!(&refusal, Refusal::Io(e) if e.kind() == io::ErrorKind::ConnectionReset));
        assert_eq!(refusal.label(), "io");
        assert_eq!(Refusal::Closed.label(), "closed");
    }

    #[tokio::test]
    async fn rewind_reads_prefix_then_inner_and_passes_writes() {
        let (mut peer, inner) = duplex(1024);
        let (prefix, inner) = Rewind::new(Bytes::from_static(b"abc"), inner).into_parts();
        assert_eq!(prefix, b"abc"[..]);
        let mut rewind = Rewind::new(prefix, inner);
        peer.write_all(b"def").await.unwrap();

        let mut two = [0u8; 2];
        assert_eq!(rewind.read(&mut two).await.unwrap(), 2);
        assert_eq!(&two, b"ab");
        assert_eq!(rewind.read(&mut two).await.unwrap(), 1, "the prefix's end, not mixed with the stream");
        assert_eq!(&two[..1], b"c");
        let mut three = [0u8; 3];
        rewind.read_exact(&mut three).await.unwrap();
        assert_eq!(&three, b"def");

        rewind.write_all(b"hello").await.unwrap();
        let n = rewind.write_vectored(&[IoSlice::new(b" "), IoSlice::new(b"world")]).await.unwrap();
        rewind.write_all(&b" world"[n..]).await.unwrap();
        rewind.flush().await.unwrap();
        assert_eq!(rewind.is_write_vectored(), rewind.get_ref().is_write_vectored());
        rewind.shutdown().await.unwrap();
        let (prefix, _inner) = rewind.into_parts();
        assert!(prefix.is_empty());
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
    }

    #[tokio::test]
    async fn over_tcp_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&v2_tcp4()[..10]).await.unwrap();
            sleep(Duration::from_millis(30)).await;
            s.write_all(&[&v2_tcp4()[10..], HTTP].concat()).await.unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let (socket, peer) = listener.accept().await.unwrap();
        let (client, mut rewind) = read_header(socket, LONG).await.unwrap();
        assert_eq!(client, tcp4_client());
        assert_eq!(rewind.get_ref().peer_addr().unwrap(), peer);
        let mut request = vec![0; HTTP.len()];
        rewind.read_exact(&mut request).await.unwrap();
        assert_eq!(request, HTTP);
        rewind.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        rewind.shutdown().await.unwrap();
        assert_eq!(sender.await.unwrap(), b"HTTP/1.1 204 No Content\r\n\r\n");
    }
}
