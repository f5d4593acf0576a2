//! Body types: upstream bodies pass through unboxed; only our own small bodies are buffered.
//! An upload reports how it is moving, so the exchange is timed by progress, not duration.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::sync::Notify;

use crate::access::AccessRecord;
use crate::idle::Activity;
use crate::probe::Writing;

/// A failure on the client's side of an exchange: never an upstream failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientFault {
    /// The client went away (its upload broke off, or it closed the connection).
    #[error("the client went away")]
    Closed,
    /// The client sent no upload bytes for this long while the upstream waited for them.
    #[error("the client sent no request body bytes for {0:?}")]
    Stalled(Duration),
    /// The client's body framing is broken (a bad chunk, a body that does not fit its length).
    #[error("the request body is malformed")]
    Malformed,
}

/// How an upload is moving, shared by the body the upstream client polls and the
/// watchdog that times the exchange (README "Limits and timeouts").
#[derive(Debug, Default)]
pub struct Progress {
    moved: Activity,
    ended_at: OnceLock<Instant>,
    ended: Notify,
    /// The upstream side asked for more and the client had none yet.
    waiting_on_client: AtomicBool,
    /// How the client's body failed: 0 it did not, 1 the client went away, 2 malformed.
    client_failed: AtomicU8,
}

/// Which limit an exchange ran into first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overdue {
    /// The body was sent, and no response head came within the answer time.
    NoAnswer,
    /// Nothing moved for the idle time while the upstream waited on the client.
    Client,
    /// Nothing moved for the idle time while the client's bytes waited on the upstream.
    Upstream,
}

impl Progress {
    fn finish(&self) {
        if self.ended_at.set(Instant::now()).is_ok() {
            self.ended.notify_one();
        }
    }

    /// How the client's body failed, if it did: it went away, or sent broken framing.
    pub fn client_fault(&self) -> Option<ClientFault> {
        match self.client_failed.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(ClientFault::Closed),
            _ => Some(ClientFault::Malformed),
        }
    }

    /// Resolves when the exchange is overdue: no response head within `answer_within`
    /// of the body's end, or no byte moved for `idle` while the body was in progress.
    /// Never limits how long a body that keeps moving may take.
    pub async fn overdue(&self, idle: Duration, answer_within: Duration) -> Overdue {
        loop {
            let ended = self.ended.notified();
            if let Some(at) = self.ended_at.get() {
                tokio::time::sleep_until((*at + answer_within).into()).await;
                return Overdue::NoAnswer;
            }
            let quiet = self.moved.quiet_for();
            if quiet >= idle {
                return if self.waiting_on_client.load(Ordering::Relaxed) {
                    Overdue::Client
                } else {
                    Overdue::Upstream
                };
            }
            tokio::select! {
                () = tokio::time::sleep(idle - quiet) => {}
                () = ended => {}
            }
        }
    }
}

/// A request body sent upstream: the client's stream, or nothing.
#[derive(Debug)]
pub enum ReqBody {
    /// The client's body, forwarded as it arrives.
    Stream {
        /// The body.
        body: Incoming,
        /// Where its movement is recorded.
        progress: Arc<Progress>,
    },
    /// No body (GET/HEAD, probes, fallback retries).
    Empty,
}

impl ReqBody {
    /// Forwards the client's body, recording its progress.
    pub fn stream(body: Incoming) -> ReqBody {
        let progress = Arc::new(Progress::default());
        // An empty body may never be polled.
        if body.is_end_stream() {
            progress.finish();
        }
        ReqBody::Stream { body, progress }
    }

    /// The progress record of a streamed body.
    pub fn progress(&self) -> Option<&Arc<Progress>> {
        match self {
            ReqBody::Stream { progress, .. } => Some(progress),
            ReqBody::Empty => None,
        }
    }
}

/// Whether a body error is broken framing (hyper reports it as invalid input or data)
/// rather than a connection that ended early.
fn is_malformed(e: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData);
        }
        // HTTP/2: a body that does not fit its content-length is a protocol error.
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::PROTOCOL_ERROR);
        }
        cause = c.source();
    }
    false
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Stream { body, progress } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(_))) => {
                        progress.moved.touch();
                        progress.waiting_on_client.store(false, Ordering::Relaxed);
                        if body.is_end_stream() {
                            progress.finish();
                        }
                    }
                    Poll::Ready(None) => progress.finish(),
                    Poll::Ready(Some(Err(e))) => {
                        let fault = if is_malformed(e) { 2 } else { 1 };
                        progress.client_failed.store(fault, Ordering::Relaxed);
                    }
                    Poll::Pending => progress.waiting_on_client.store(true, Ordering::Relaxed),
                }
                polled
            }
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Stream { body, .. } => body.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream { body, .. } => body.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Why a response body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading the upstream's body failed.
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    /// The stream moved no byte for this long, so its upstream request was ended.
    #[error("the stream moved no byte for {0:?}; its upstream request was ended")]
    Stalled(Duration),
}

/// An HTTP/2 stream's upstream body, which its watchdog may cut (see [`RespBody::watch_stream`]).
#[derive(Debug)]
struct Watched {
    body: Mutex<Option<Incoming>>,
    moved: Activity,
    ended: Notify,
    cut: AtomicBool,
    limit: Duration,
}

impl Watched {
    fn body(&self) -> std::sync::MutexGuard<'_, Option<Incoming>> {
        // Nothing can be left half-done under this lock.
        self.body.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Ends a stream's upstream request once the stream has moved no byte for its limit: a
/// client that gives a stream no flow-control window (while keeping its connection busy
/// with other frames) must not hold an upstream connection for ever (README "Limits and
/// timeouts").
async fn watch_stream(w: Arc<Watched>) {
    tokio::select! {
        () = crate::idle::idle_for(&w.moved, w.limit) => {
            w.cut.store(true, Ordering::Relaxed);
            let upstream = w.body().take();
            drop(upstream);
        }
        () = w.ended.notified() => {}
    }
}

/// A response body sent to the client, counting bytes for the access log.
#[derive(Debug)]
pub struct RespBody {
    inner: Inner,
    record: Option<Box<AccessRecord>>,
    /// The client connection's activity: tells an upstream that stalled from a client that left.
    connection: Option<Arc<Activity>>,
    /// The last poll found the upstream with nothing to send.
    waiting_on_upstream: bool,
    /// A write in progress, held until its answer has ended, and how long its answer may pause.
    writing: Option<(Writing, Duration)>,
    /// The request's place among those in flight (`limits.max_requests`), freed at the end.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

#[derive(Debug)]
enum Inner {
    Upstream(Incoming),
    Watched(Arc<Watched>),
    Full(Full<Bytes>),
}

impl RespBody {
    fn new(inner: Inner) -> RespBody {
        RespBody { inner, record: None, connection: None, waiting_on_upstream: false, writing: None, _slot: None }
    }

    /// Streams an upstream body through.
    pub fn upstream(body: Incoming) -> RespBody {
        RespBody::new(Inner::Upstream(body))
    }

    /// A small body made here (errors, admin pages).
    pub fn full(bytes: impl Into<Bytes>) -> RespBody {
        RespBody::new(Inner::Full(Full::new(bytes.into())))
    }

    /// An empty body.
    pub fn empty() -> RespBody {
        RespBody::full(Bytes::new())
    }

    /// Watches the client connection this body is sent on (README "Health").
    pub fn on_connection(mut self, connection: Option<Arc<Activity>>) -> RespBody {
        self.connection = connection;
        self
    }

    /// Gives an upstream body sent on an HTTP/2 stream a watchdog of its own: if the stream
    /// moves no byte for `limit`, the upstream request is ended and the stream fails.
    pub fn watch_stream(mut self, limit: Duration) -> RespBody {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return self };
        let Inner::Upstream(body) = std::mem::replace(&mut self.inner, Inner::Full(Full::default())) else {
            return self;
        };
        let watched = Arc::new(Watched {
            body: Mutex::new(Some(body)),
            moved: Activity::new(),
            ended: Notify::new(),
            cut: AtomicBool::new(false),
            limit,
        });
        runtime.spawn(watch_stream(Arc::clone(&watched)));
        self.inner = Inner::Watched(watched);
        self
    }

    /// Holds the request's in-flight slot until this body has ended.
    pub fn holding_slot(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> RespBody {
        self._slot = Some(slot);
        self
    }

    /// Holds a write's mark until this answer has ended; if the client leaves first, the
    /// rest of the answer is read (pausing at most `idle` between pieces) before the mark goes.
    pub fn holding(mut self, writing: Writing, idle: Duration) -> RespBody {
        self.writing = Some((writing, idle));
        self
    }

    /// Attaches the access record, written when the body ends or is dropped.
    pub fn with_record(mut self, mut record: Box<AccessRecord>) -> RespBody {
        // A body that is already over (empty), or that HTTP says is not sent (an answer to
        // HEAD, 204, 304), may never be polled.
        record.complete = !record.client_closed
            && (self.inner_end_stream() || record.method == http::Method::HEAD || matches!(record.status, 204 | 304));
        self.record = Some(record);
        self
    }

    fn inner_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Watched(w) => w.body().as_ref().is_some_and(Incoming::is_end_stream),
            Inner::Full(b) => b.is_end_stream(),
        }
    }

    /// Takes the upstream body out, if it is still here.
    fn take_upstream(&mut self) -> Option<Incoming> {
        match std::mem::replace(&mut self.inner, Inner::Full(Full::default())) {
            Inner::Upstream(b) => Some(b),
            Inner::Watched(w) => {
                w.ended.notify_one();
                w.body().take()
            }
            Inner::Full(_) => None,
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        let ended = self.inner_end_stream();
        let watchdog_cut = matches!(&self.inner, Inner::Watched(w) if w.cut.load(Ordering::Relaxed));
        if let Some(rec) = self.record.as_deref_mut()
            && !rec.complete
            && !ended
            && self.waiting_on_upstream
            && (watchdog_cut || self.connection.as_ref().is_some_and(|c| c.closed_for_idleness()))
        {
            // Nothing moved for the idle time while the body waited on its upstream.
            rec.upstream_error = true;
            rec.upstream_stalled = true;
        }
        let upstream = self.take_upstream();
        if let Some((writing, idle)) = self.writing.take()
            && !ended
            && let Some(body) = upstream
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(drain_write(body, idle, writing));
        }
    }
}

/// Reads the rest of a write's answer, then lets its mark go: until the answer ends the
/// upstream may still be committing (README "Object age").
pub async fn drain_write(mut body: Incoming, idle: Duration, writing: Writing) {
    // Write answers are small XML documents; anything longer is not worth reading.
    const MOST: usize = 1 << 20;
    let mut read = 0;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(idle, body.frame()).await {
        read += frame.data_ref().map_or(0, Bytes::len);
        if read > MOST {
            break;
        }
    }
    drop(writing);
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        // Each branch also says whether its body has ended, under the one lock it takes.
        let (polled, ended) = match &mut this.inner {
            Inner::Upstream(b) => {
                let polled = Pin::new(&mut *b).poll_frame(cx);
                this.waiting_on_upstream = polled.is_pending();
                (polled.map(|f| f.map(|r| r.map_err(BodyError::Upstream))), b.is_end_stream())
            }
            Inner::Watched(w) => {
                let mut body = w.body();
                match body.as_mut() {
                    Some(b) => {
                        let polled = Pin::new(&mut *b).poll_frame(cx);
                        this.waiting_on_upstream = polled.is_pending();
                        let ended = b.is_end_stream();
                        match &polled {
                            Poll::Ready(Some(Ok(_))) if ended => w.ended.notify_one(),
                            Poll::Ready(Some(Ok(_))) => w.moved.touch(),
                            Poll::Ready(_) => w.ended.notify_one(),
                            Poll::Pending => {}
                        }
                        (polled.map(|f| f.map(|r| r.map_err(BodyError::Upstream))), ended)
                    }
                    // Cut by its watchdog: the download must not look complete.
                    None => (Poll::Ready(Some(Err(BodyError::Stalled(w.limit)))), false),
                }
            }
            Inner::Full(b) => {
                let polled = Pin::new(&mut *b).poll_frame(cx).map_err(|never| match never {});
                (polled, b.is_end_stream())
            }
        };
        if let Some(rec) = this.record.as_deref_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        rec.bytes += data.len() as u64;
                    }
                    // With a known length hyper stops polling after the last byte, and
                    // after trailers (always a body's last frame) it stops as well.
                    rec.complete = ended || frame.is_trailers();
                }
                Poll::Ready(None) => rec.complete = true,
                Poll::Ready(Some(Err(_))) => rec.upstream_error = true,
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Watched(w) => w.body().as_ref().map_or_else(SizeHint::default, Incoming::size_hint),
            Inner::Full(b) => b.size_hint(),
        }
    }
}
