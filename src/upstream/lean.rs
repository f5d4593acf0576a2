//! The lean path's HTTP/1.1 client (README "The lean download path"): keep-alive TCP
//! connections to plain-HTTP upstreams, driven inside the request's own task. One write
//! sends the request head; the response head is parsed with httparse; the body is read
//! into one buffer per download, or spliced by the caller straight from the socket.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use std::io::Write as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::capped::Caps;
use super::{Exchange, ExchangeError, LocalFault, SendError, local_fault};
use crate::body::ReqBody;
use crate::h1::chunked::{ChunkedError, Decoder};
use crate::h1::response::{self, Framing, ParsedResponse, ResponseError};
use crate::h1::write_fields;
use crate::health::HealthBoard;
use crate::table::Upstream;

/// One download's read buffer: the response head and the body bytes that come with it.
const READ_BUF: usize = 16 * 1024;

/// Largest upstream response head (as hyper's client is limited to in [`super::pool`]).
const MAX_HEAD: usize = super::UPSTREAM_READ_BUF;

/// Most header fields in an upstream's response head (as hyper's client allows).
const MAX_RESPONSE_HEADERS: usize = 100;

/// How long an unused connection stays in the pool (as hyper's pool keeps them).
const IDLE_FOR: Duration = Duration::from_secs(60);

/// The lean path's client: idle connections to each upstream, and the caps and health
/// it shares with hyper's client.
#[derive(Debug)]
pub struct LeanClient {
    pools: Arc<Pools>,
    caps: Arc<Caps>,
    health: Arc<HealthBoard>,
    connect_timeout: Duration,
    header_timeout: Duration,
}

/// Idle connections, one list per upstream.
#[derive(Debug)]
struct Pools {
    idle: [Mutex<Idle>; 2],
    max_idle: usize,
}

/// The idle connections to one upstream address.
#[derive(Debug, Default)]
struct Idle {
    /// The address they go to: connections to an address a reload replaced are not reused.
    authority: String,
    conns: Vec<(Conn, Instant)>,
}

/// A connection to an upstream, holding its place under the upstream's connection cap.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    /// The read buffer, kept with the connection so that a request on a pooled connection
    /// allocates none (empty after a splice, which needed none).
    buf: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl Pools {
    fn slot(&self, which: Upstream) -> std::sync::MutexGuard<'_, Idle> {
        let i = match which {
            Upstream::Primary => 0,
            Upstream::Replica => 1,
        };
        // Nothing is left half-done under this lock.
        self.idle[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection to `authority` that still looks open, if any.
    fn checkout(&self, which: Upstream, authority: &str) -> Option<Conn> {
        let mut idle = self.slot(which);
        if idle.authority != authority {
            return None;
        }
        // The newest is taken; the oldest, which steady traffic would never reach, is
        // looked at once it has waited a while, so that connections the upstream closed
        // do not hold their descriptors and permits until the pool empties.
        if idle.conns.first().is_some_and(|(_, since)| since.elapsed() > SWEEP_AFTER) {
            let (conn, since) = idle.conns.remove(0);
            if open(&conn, since) {
                idle.conns.push((conn, Instant::now()));
            }
        }
        while let Some((conn, since)) = idle.conns.pop() {
            if open(&conn, since) {
                return Some(conn);
            }
        }
        None
    }

    /// Puts a connection whose last answer was read to its end back for reuse.
    fn release(&self, which: Upstream, authority: &str, conn: Conn) {
        let mut idle = self.slot(which);
        if idle.authority != authority {
            idle.authority = authority.to_string();
            idle.conns.clear();
        }
        if idle.conns.len() < self.max_idle {
            idle.conns.push((conn, Instant::now()));
        }
    }
}

/// Idle connections older than this are checked when the pool is used.
const SWEEP_AFTER: Duration = Duration::from_secs(1);

/// Whether an idle connection may carry a request: not expired, and its socket not
/// readable. An upstream closes idle connections on its own schedule: a readable socket
/// here is its close (or stray bytes), never an answer to anything.
fn open(conn: &Conn, since: Instant) -> bool {
    let mut probe = [0u8; 1];
    since.elapsed() < IDLE_FOR
        && matches!(conn.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

impl super::capped::Evict for Pools {
    fn evict_idle(&self, authority: &str) {
        for which in [Upstream::Primary, Upstream::Replica] {
            let mut idle = self.slot(which);
            if idle.authority == authority {
                idle.conns.clear();
            }
        }
    }
}

impl LeanClient {
    /// A client sharing `caps` and `health` with hyper's.
    pub(super) fn new(
        caps: Arc<Caps>,
        health: Arc<HealthBoard>,
        max_idle: usize,
        connect_timeout: Duration,
        header_timeout: Duration,
    ) -> LeanClient {
        let pools = Arc::new(Pools { idle: Default::default(), max_idle });
        let evict: Arc<dyn super::capped::Evict> = Arc::clone(&pools) as _;
        caps.evict_with(Arc::downgrade(&evict));
        LeanClient { pools, caps, health, connect_timeout, header_timeout }
    }

    /// Closes every idle connection (a reload changed how upstreams are reached).
    pub(super) fn clear(&self) {
        for which in [Upstream::Primary, Upstream::Replica] {
            self.pools.slot(which).conns.clear();
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn, ExchangeError> {
        let permit = self.caps.permit(authority.as_str()).await.map_err(|full| {
            super::local_limit_reached(&full);
            LocalFault::from(full)
        })?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => match local_fault(&e) {
                Some(fault) => {
                    super::local_limit_reached(&e);
                    return Err(fault.into());
                }
                None => return Err(SendError::Connect(e.into()).into()),
            },
            Err(_) => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(SendError::Connect(e.into()).into());
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream, buf: Vec::new(), _permit: permit })
    }

    /// Sends the head of `req` on `conn` and reads the answer's head. The connection's
    /// buffer carries both, one after the other.
    async fn exchange(
        &self,
        conn: &mut Conn,
        req: &Request<ReqBody>,
        authority: &Authority,
    ) -> Result<Answered, Attempt> {
        let head_request = req.method() == http::Method::HEAD;
        let mut buf = std::mem::take(&mut conn.buf);
        buf.clear();
        if buf.capacity() < READ_BUF {
            buf.reserve(READ_BUF);
        }
        write_request_head(req, authority, &mut buf);
        conn.stream.write_all(&buf).await.map_err(Attempt::Unanswered)?;
        buf.clear();
        let read = async {
            loop {
                if buf.len() == buf.capacity() {
                    if buf.len() >= MAX_HEAD {
                        return Err(Attempt::Malformed(ResponseError::TooLarge(MAX_HEAD)));
                    }
                    buf.reserve(READ_BUF);
                }
                let n = conn.stream.read_buf(&mut buf).await.map_err(Attempt::Failed)?;
                if n == 0 {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(if buf.is_empty() { Attempt::Unanswered(eof) } else { Attempt::Failed(eof) });
                }
                loop {
                    match response::parse(&buf, head_request, MAX_RESPONSE_HEADERS, MAX_HEAD) {
                        Ok(ParsedResponse::Partial) => break,
                        // 100 Continue, 103 Early Hints: not for the client of a download.
                        Ok(ParsedResponse::Interim { head_len }) => drop(buf.drain(..head_len)),
                        Ok(ParsedResponse::Final(head)) => return Ok((head, std::mem::take(&mut buf))),
                        Err(e) => return Err(Attempt::Malformed(e)),
                    }
                }
            }
        };
        let (head, buf) = tokio::time::timeout(self.header_timeout, read).await.map_err(|_| Attempt::Timeout)??;
        Ok(Answered { head, buf })
    }

    /// Counts a failed exchange against `which` and says what failed.
    fn failed(&self, which: Upstream, attempt: Attempt) -> ExchangeError {
        let health = self.health.of(which);
        match attempt {
            Attempt::Unanswered(e) | Attempt::Failed(e) => {
                health.failure("connection failed");
                SendError::Failed(e.into()).into()
            }
            Attempt::Timeout => {
                health.failure("response timeout");
                SendError::Timeout(self.header_timeout).into()
            }
            Attempt::Malformed(ResponseError::Upgrade) => refused(health, super::UNASKED_UPGRADE),
            Attempt::Malformed(ResponseError::UnsupportedCoding) => refused(health, super::OTHER_CODING),
            Attempt::Malformed(e) => {
                // hyper's client reports these as a failed connection too.
                health.failure("connection failed");
                SendError::Failed(e.into()).into()
            }
        }
    }
}

fn refused(health: &crate::health::Health, why: &'static str) -> ExchangeError {
    health.failure(why);
    SendError::Protocol(why).into()
}

/// A response head and the bytes read with it.
struct Answered {
    head: response::ResponseHead,
    buf: Vec<u8>,
}

/// How one attempt at an exchange failed.
enum Attempt {
    /// Nothing came back: on a reused connection, the upstream may have closed it just
    /// before the request went out, and one retry on a new connection is safe for a
    /// download (as hyper's pool does).
    Unanswered(std::io::Error),
    /// The connection broke during the head.
    Failed(std::io::Error),
    /// No head within the header timeout.
    Timeout,
    /// The head is not one to pass on.
    Malformed(ResponseError),
}

impl Exchange for LeanClient {
    type Body = LeanBody;

    async fn send(&self, which: Upstream, req: Request<ReqBody>) -> Result<Response<LeanBody>, ExchangeError> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(SendError::Protocol("the request has no upstream address").into());
        };
        if req.uri().scheme() != Some(&http::uri::Scheme::HTTP) {
            // A reload made the upstream https after this request took the lean path:
            // never send it in clear text.
            return Err(SendError::Protocol("the upstream became https during the request").into());
        }
        let mut reused = self.pools.checkout(which, authority.as_str());
        let (conn, answered) = loop {
            let fresh = reused.is_none();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => self.connect(&authority).await.inspect_err(|e| {
                    if matches!(e, ExchangeError::Upstream(_)) {
                        self.health.of(which).failure("connect error");
                    }
                })?,
            };
            match self.exchange(&mut conn, &req, &authority).await {
                Ok(a) => break (conn, a),
                Err(Attempt::Unanswered(_)) if !fresh => continue,
                Err(e) => return Err(self.failed(which, e)),
            }
        };
        let Answered { head, buf } = answered;
        if head.status.as_u16() >= 600 {
            return Err(refused(self.health.of(which), super::ODD_STATUS));
        }
        if head.status.is_server_error() {
            self.health.of(which).failure("answered 5xx");
        }
        let remaining = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let body = LeanBody {
            conn: Some(conn),
            pools: Arc::clone(&self.pools),
            which,
            authority,
            buf,
            pos: head.head_len,
            framing: head.framing,
            remaining,
            decoder: Decoder::new(),
            reusable: head.reusable,
            done: head.framing == Framing::Empty,
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        Ok(resp)
    }

    async fn discard(&self, resp: Response<LeanBody>) {
        let mut body = resp.into_body();
        let small = match body.framing {
            Framing::Length(n) => n <= super::DRAIN_SMALL,
            Framing::Empty => true,
            Framing::Chunked | Framing::Close => false,
        };
        if small {
            let drain = async { while let Ok(Some(_)) = body.next().await {} };
            let _ = tokio::time::timeout(super::DRAIN_WITHIN, drain).await;
        }
    }
}

/// The request head as hyper's client writes it: origin-form target, the header fields
/// in order, and `host` last when the request has none (from the address, without the
/// default port).
fn write_request_head(req: &Request<ReqBody>, authority: &Authority, out: &mut Vec<u8>) {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.uri().path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_fields(req.headers(), |_| false, out);
    if !req.headers().contains_key(http::header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.host().as_bytes());
        if let Some(port) = authority.port_u16().filter(|p| *p != 80) {
            out.push(b':');
            let _ = write!(out, "{port}");
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Why an upstream's body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyFault {
    /// The connection broke or ended before the body did.
    #[error("the upstream broke off the body")]
    Broke(#[source] std::io::Error),
    /// The chunked framing is broken.
    #[error(transparent)]
    Malformed(#[from] ChunkedError),
}

/// A response body still on its upstream connection. Read to its end on a connection
/// that may carry another request, the connection goes back to the pool when this is
/// dropped; otherwise the connection is closed.
#[derive(Debug)]
pub struct LeanBody {
    conn: Option<Conn>,
    pools: Arc<Pools>,
    which: Upstream,
    authority: Authority,
    buf: Vec<u8>,
    /// Where the bytes not yet handed out start in `buf`.
    pos: usize,
    framing: Framing,
    /// With a length: the body bytes not yet handed out or spliced.
    remaining: u64,
    decoder: Decoder,
    reusable: bool,
    done: bool,
}

impl LeanBody {
    /// How the body is delimited.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The body has been read to its end.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next piece of the body, as a range of [`LeanBody::data`]; `None` at its end.
    /// Reads from the connection only once the bytes already read are used up.
    pub async fn next(&mut self) -> Result<Option<Range<usize>>, BodyFault> {
        loop {
            if self.done {
                return Ok(None);
            }
            let unread = self.buf.len() - self.pos;
            match self.framing {
                Framing::Empty => self.done = true,
                Framing::Length(_) if self.remaining == 0 => self.done = true,
                Framing::Length(_) if unread > 0 => {
                    let n = unread.min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    let piece = self.pos..self.pos + n;
                    self.pos += n;
                    self.remaining -= n as u64;
                    return Ok(Some(piece));
                }
                Framing::Chunked if unread > 0 => {
                    let fed = self.decoder.feed(&self.buf[self.pos..])?;
                    let piece = self.pos + fed.data.start..self.pos + fed.data.end;
                    self.pos += fed.consumed;
                    self.done = self.decoder.is_done();
                    if !piece.is_empty() {
                        return Ok(Some(piece));
                    }
                    if fed.consumed == 0 && !self.done {
                        self.fill().await?;
                    }
                }
                Framing::Close if unread > 0 => {
                    let piece = self.pos..self.buf.len();
                    self.pos = self.buf.len();
                    return Ok(Some(piece));
                }
                Framing::Close => {
                    if self.fill().await? == 0 {
                        // The end of a body delimited by the close.
                        self.done = true;
                    }
                }
                Framing::Length(_) | Framing::Chunked => {
                    if self.fill().await? == 0 {
                        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                        return Err(BodyFault::Broke(eof));
                    }
                }
            }
        }
    }

    /// The bytes that [`LeanBody::next`]'s ranges point into.
    pub fn data(&self) -> &[u8] {
        &self.buf
    }

    /// Reads more from the connection after the unread bytes; 0 at its end.
    async fn fill(&mut self) -> Result<usize, BodyFault> {
        let Some(conn) = self.conn.as_mut() else { return Ok(0) };
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ_BUF / 4 {
            self.buf.reserve(READ_BUF);
        }
        conn.stream.read_buf(&mut self.buf).await.map_err(BodyFault::Broke)
    }

    /// The socket and the body bytes still on it, when the rest of the body can be moved
    /// without being read here: a known length, and every byte read so far handed out.
    pub fn unread_on_socket(&self) -> Option<(&TcpStream, u64)> {
        match (self.framing, &self.conn) {
            (Framing::Length(_), Some(conn)) if self.pos == self.buf.len() && self.remaining > 0 => {
                Some((&conn.stream, self.remaining))
            }
            _ => None,
        }
    }

    /// Records `n` body bytes moved off the socket by the caller.
    pub fn moved(&mut self, n: u64) {
        self.remaining = self.remaining.saturating_sub(n);
        if self.remaining == 0 {
            self.done = true;
        }
    }

    /// Frees the read buffer once everything in it has been handed out (a long splice
    /// needs none).
    pub fn shrink(&mut self) {
        if self.pos == self.buf.len() {
            self.buf = Vec::new();
            self.pos = 0;
        }
    }
}

impl Drop for LeanBody {
    fn drop(&mut self) {
        // Bytes past the body's end would be read as the next answer: such a connection
        // is not reused.
        if self.done
            && self.reusable
            && self.pos == self.buf.len()
            && let Some(mut conn) = self.conn.take()
        {
            // The buffer goes with the connection unless a large head made it grow.
            if self.buf.capacity() <= 2 * READ_BUF {
                conn.buf = std::mem::take(&mut self.buf);
            }
            self.pools.release(self.which, self.authority.as_str(), conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_head_is_written_as_hyper_writes_it() {
        let mut req = Request::new(ReqBody::Empty);
        *req.uri_mut() = "http://10.0.0.1:9000/bucket/a%20b?x=1".parse().unwrap();
        req.headers_mut().append("x-amz-date", "20260101T000000Z".parse().unwrap());
        req.headers_mut().append("range", "bytes=0-9".parse().unwrap());
        let authority = req.uri().authority().unwrap().clone();
        let mut out = Vec::new();
        write_request_head(&req, &authority, &mut out);
        assert_eq!(
            out,
            b"GET /bucket/a%20b?x=1 HTTP/1.1\r\nx-amz-date: 20260101T000000Z\r\nrange: bytes=0-9\r\nhost: 10.0.0.1:9000\r\n\r\n"
        );
        *req.uri_mut() = "http://s3.internal/b/k".parse().unwrap();
        req.headers_mut().insert(http::header::HOST, "client.example".parse().unwrap());
        let authority = req.uri().authority().unwrap().clone();
        out.clear();
        write_request_head(&req, &authority, &mut out);
        assert!(out.ends_with(b"host: client.example\r\n\r\n"), "{}", String::from_utf8_lossy(&out));
        assert!(!String::from_utf8_lossy(&out).contains("s3.internal"));
    }
}
