//! The lean download path's client connections (README "The lean download path"): plain
//! HTTP/1.1 `GET` and `HEAD` requests read and answered here, their bodies spliced from
//! the upstream's socket or copied through one buffer. At the first request outside that
//! subset, the connection goes to hyper with the bytes read so far.

use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::splice::{Pipes, SpliceError};
use crate::access::AccessRecord;
use crate::config::Limits;
use crate::h1::chunked::{LAST_CHUNK, write_size_line};
use crate::h1::request::{self, Parsed};
use crate::h1::response::Framing;
use crate::h1::write_fields;
use crate::proxy::{Answer, LeanAnswer, Proxy};
use crate::upstream::lean::LeanBody;
use std::io::Write as _;

/// A client's read buffer to begin with; it grows up to `limits.max_header_size` for a
/// large head and shrinks back after.
const CLIENT_BUF: usize = 4 * 1024;

/// A connection keeps a write buffer up to this size between answers.
const OUT_KEPT: usize = 32 * 1024;

/// Bodies shorter than this are copied: a splice costs a pipe and more system calls.
const SPLICE_FROM: u64 = 64 * 1024;

/// What the lean path shares between connections.
#[derive(Debug)]
pub(super) struct LeanShared {
    pub(super) pipes: Pipes,
}

/// A connection to hand to hyper: the socket and the bytes already read from it.
pub(super) type Handoff = (TcpStream, Bytes);

/// Why the lean path stopped serving a connection.
enum End {
    /// Closed: the client left or idled, a body broke, or the server is stopping.
    Closed,
    /// A request outside the lean subset: hyper takes the connection from here.
    Handoff(Vec<u8>),
}

/// One client connection on the lean path.
pub(super) struct LeanConn<'a> {
    pub(super) proxy: &'a Proxy,
    pub(super) limits: &'a Limits,
    pub(super) shared: &'a LeanShared,
    pub(super) peer: SocketAddr,
    pub(super) stopped: watch::Receiver<bool>,
}

impl LeanConn<'_> {
    /// Serves `stream` (whose first bytes, `prefix`, were read already) until it closes or
    /// must go to hyper.
    pub(super) async fn serve(mut self, mut stream: TcpStream, prefix: Bytes) -> Option<Handoff> {
        let mut buf = Vec::with_capacity(CLIENT_BUF.max(prefix.len()));
        buf.extend_from_slice(&prefix);
        match self.requests(&mut stream, &mut buf).await {
            End::Closed => None,
            End::Handoff(buf) => Some((stream, Bytes::from(buf))),
        }
    }

    async fn requests(&mut self, stream: &mut TcpStream, buf: &mut Vec<u8>) -> End {
        let limits = request::Limits {
            max_head: self.limits.max_header_size as usize,
            max_headers: self.limits.max_headers as usize,
        };
        // Each request head must arrive within the header read time of the connection's
        // opening or of the end of the answer before it, as on hyper's path; and a
        // connection that moves nothing for the idle time is closed (README "Limits and
        // timeouts").
        let mut head_deadline = Instant::now() + self.limits.header_read_timeout;
        // The response write buffer, kept between requests so that a small answer
        // allocates none.
        let mut out = Vec::new();
        loop {
            let req = loop {
                match request::parse(buf, &limits) {
                    Parsed::Lean(req) => break req,
                    Parsed::Handoff => return End::Handoff(std::mem::take(buf)),
                    Parsed::Partial => {}
                }
                let quiet = Instant::now() + self.limits.idle_timeout;
                let deadline = head_deadline.min(quiet);
                if buf.capacity() - buf.len() < 512 {
                    buf.reserve(CLIENT_BUF);
                }
                let idle = buf.is_empty();
                let read = tokio::select! {
                    r = tokio::time::timeout_at(deadline, stream.read_buf(buf)) => r,
                    // Between requests a stopping server closes the connection (hyper's
                    // graceful shutdown does the same).
                    _ = self.stopped.wait_for(|s| *s), if idle => return End::Closed,
                };
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return End::Closed,
                    Ok(Ok(_)) => {}
                }
            };
            if !self.takes(&req.parts.method) {
                return End::Handoff(std::mem::take(buf));
            }
            buf.drain(..req.head_len);
            if buf.is_empty() && buf.capacity() > 2 * CLIENT_BUF {
                *buf = Vec::with_capacity(CLIENT_BUF);
            }
            let close = req.close;
            let via = self.proxy.upstreams().lean();
            let serving = self.proxy.serve_lean(via, req.parts, self.peer);
            // A client that closes while its request waits on an upstream cancels it, as
            // with hyper; bytes already sent (pipelined) are read later.
            let answer = tokio::select! {
                // The request first: it makes its access record, so a client that is gone
                // already is logged (499) rather than forgotten.
                biased;
                a = serving => a,
                () = client_gone(stream), if buf.is_empty() => return End::Closed,
            };
            // A stopping server says it closes the connection, as hyper does.
            let close = close || *self.stopped.borrow();
            if !self.answer(stream, answer, close, &mut out).await || close {
                let _ = stream.shutdown().await;
                return End::Closed;
            }
            head_deadline = Instant::now() + self.limits.header_read_timeout;
        }
    }

    /// Whether the lean path takes this request now: both upstreams plain HTTP (TLS to
    /// upstreams is hyper's).
    fn takes(&self, method: &Method) -> bool {
        let table = self.proxy.tables().current();
        let plain = |t: &crate::table::UpstreamTarget| t.scheme == http::uri::Scheme::HTTP;
        (method == Method::GET || method == Method::HEAD) && plain(&table.primary) && plain(&table.replica)
    }

    /// Sends an answer; `false` when the connection cannot carry another request.
    async fn answer(
        &self,
        stream: &mut TcpStream,
        answer: LeanAnswer<LeanBody>,
        close: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        let LeanAnswer { resp, mut record, slot } = answer;
        let (parts, body) = resp.into_parts();
        let head_only = record.method == Method::HEAD;
        let ok = match body {
            Answer::Own(own) => {
                let bytes = own.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let mut out = Vec::with_capacity(256 + bytes.len());
                write_head(parts.status, &parts.headers, BodyHeader::Length(bytes.len() as u64), close, &mut out);
                if !head_only {
                    out.extend_from_slice(&bytes);
                }
                let sent = self.write(stream, &out).await;
                if sent && !head_only {
                    record.bytes = bytes.len() as u64;
                }
                record.complete = sent;
                sent
            }
            Answer::Upstream(body) => {
                let streamed = self.stream_body(stream, parts.status, &parts.headers, body, &mut record, close, out);
                streamed.await
            }
        };
        drop(record);
        drop(slot);
        ok
    }

    /// Sends an upstream's head and body: with a known length, the body is spliced once
    /// the bytes read with the head are sent; otherwise it is re-chunked to the client.
    /// `out` is the connection's write buffer, left empty.
    #[allow(clippy::too_many_arguments)]
    async fn stream_body(
        &self,
        stream: &mut TcpStream,
        status: StatusCode,
        headers: &HeaderMap,
        mut body: LeanBody,
        record: &mut AccessRecord,
        close: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        let idle = self.limits.idle_timeout;
        let framing = body.framing();
        let chunked = matches!(framing, Framing::Chunked | Framing::Close);
        out.clear();
        if out.capacity() > OUT_KEPT {
            *out = Vec::new();
        }
        let length = match framing {
            Framing::Empty => BodyHeader::AsIs,
            Framing::Length(n) => BodyHeader::Length(n),
            Framing::Chunked | Framing::Close => BodyHeader::Chunked,
        };
        write_head(status, headers, length, close, out);
        loop {
            if let Some((from, left)) = body.unread_on_socket()
                && left >= SPLICE_FROM
                && out.is_empty()
            {
                // A long splice to a slow client holds no buffer of its own.
                *out = Vec::new();
                // Counted as it goes: a download cut at the end of the shutdown grace is
                // logged with the bytes it sent.
                let before = record.bytes;
                let spliced = self.shared.pipes.splice(from, stream, left, idle, &mut record.bytes).await;
                body.moved(record.bytes - before);
                match spliced {
                    Some(Ok(())) => continue,
                    Some(Err(e)) => return failed_body(record, &e),
                    // No pipe to be had: copy instead.
                    None => {}
                }
            }
            let next = tokio::select! {
                // The body first: a client that closes right after the last byte (which it
                // may, the body being whole) got a complete answer, not a cut one.
                biased;
                next = tokio::time::timeout(idle, body.next()) => next,
                // A client that leaves while the upstream is silent is the client's doing.
                () = client_gone(stream) => return false,
            };
            let piece = match next {
                Ok(Ok(Some(piece))) => piece,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "upstream body failed");
                    record.upstream_error = true;
                    let _ = self.write(stream, out).await;
                    return false;
                }
                Err(_) => {
                    record.upstream_error = true;
                    record.upstream_stalled = true;
                    let _ = self.write(stream, out).await;
                    return false;
                }
            };
            let data = &body.data()[piece];
            if chunked {
                write_size_line(data.len(), out);
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            } else {
                out.extend_from_slice(data);
            }
            record.bytes += data.len() as u64;
            if !self.write(stream, out).await {
                return false;
            }
            out.clear();
            // A download that will be spliced needs no read buffer while it waits on the client.
            body.shrink();
        }
        if chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
        if !self.write(stream, out).await {
            return false;
        }
        out.clear();
        record.complete = true;
        // Read to its end: the upstream connection goes back to its pool.
        drop(body);
        true
    }

    /// Writes `bytes` to the client, which may pause for up to the idle time.
    async fn write(&self, stream: &mut TcpStream, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return true;
        }
        matches!(tokio::time::timeout(self.limits.idle_timeout, stream.write_all(bytes)).await, Ok(Ok(())))
    }
}

/// Records how a splice ended early; the connection is closed, so the client sees a
/// short body, never a complete-looking one.
fn failed_body(record: &mut AccessRecord, e: &SpliceError) -> bool {
    match e {
        SpliceError::Upstream(_) => record.upstream_error = true,
        SpliceError::UpstreamStalled(_) => {
            record.upstream_error = true;
            record.upstream_stalled = true;
        }
        SpliceError::Client(_) | SpliceError::ClientStalled(_) => {}
    }
    tracing::debug!(path = &*record.path, error = %e, "download ended early");
    false
}

use super::splice::client_gone;

/// How the head says the body is framed.
enum BodyHeader {
    /// As the upstream's fields say (no body follows: HEAD, 1xx, 204, 304).
    AsIs,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
}

/// Writes a response head as hyper's server would for the same response: status line,
/// the fields in order with the framing field of our choosing, and `date` when the
/// upstream sent none.
fn write_head(status: StatusCode, headers: &HeaderMap, body: BodyHeader, close: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Our own framing field replaces the upstream's; without a body, none is announced
    // where HTTP forbids it (RFC 9110 sections 8.6, 15.4.5).
    let own_framing = !matches!(body, BodyHeader::AsIs) || matches!(status.as_u16(), 204 | 304);
    let framing_field = |name: &http::HeaderName| name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING;
    write_fields(headers, |name| own_framing && framing_field(name), out);
    match body {
        BodyHeader::AsIs => {}
        BodyHeader::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        BodyHeader::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        let now = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now()));
        if let Ok(v) = now {
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}
