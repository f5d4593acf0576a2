//! Body types: upstream bodies pass through unboxed; only our own small bodies are buffered.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::access::AccessRecord;

/// A request body sent upstream: the client's stream, or nothing.
#[derive(Debug)]
pub enum ReqBody {
    /// The client's body, forwarded as it arrives.
    Stream(Incoming),
    /// No body (GET/HEAD, probes, fallback retries).
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Stream(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream(b) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body sent to the client, counting bytes for the access log.
#[derive(Debug)]
pub struct RespBody {
    inner: Inner,
    record: Option<Box<AccessRecord>>,
}

#[derive(Debug)]
enum Inner {
    Upstream(Incoming),
    Full(Full<Bytes>),
}

impl RespBody {
    /// Streams an upstream body through.
    pub fn upstream(body: Incoming) -> RespBody {
        RespBody { inner: Inner::Upstream(body), record: None }
    }

    /// A small body made here (errors, admin pages).
    pub fn full(bytes: impl Into<Bytes>) -> RespBody {
        RespBody { inner: Inner::Full(Full::new(bytes.into())), record: None }
    }

    /// An empty body.
    pub fn empty() -> RespBody {
        RespBody::full(Bytes::new())
    }

    /// Attaches the access record, written when the body ends or is dropped.
    pub fn with_record(mut self, mut record: Box<AccessRecord>) -> RespBody {
        // A body that is already over (HEAD, 304, empty) may never be polled.
        record.complete = self.inner_end_stream();
        self.record = Some(record);
        self
    }

    fn inner_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Full(b) => b.is_end_stream(),
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx),
            Inner::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        let ended = this.inner_end_stream();
        if let Some(rec) = this.record.as_deref_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        rec.bytes += data.len() as u64;
                    }
                    // With a known length hyper stops polling after the last byte.
                    rec.complete = ended;
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
            Inner::Full(b) => b.size_hint(),
        }
    }
}
