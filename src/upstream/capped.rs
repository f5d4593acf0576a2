//! A connector that caps the connections open to each upstream (README "Limits and
//! timeouts"): every connection holds a permit of its upstream's semaphore until it
//! closes, so the file descriptors one client can make mediaroute open are bounded,
//! however the pool races connects against idle connections.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;
use crate::table::{Tables, Upstream};

/// No connection to an upstream became free within the queue timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no upstream connection free within {0:?} (limits.max_upstream_connections)")]
pub struct QueueFull(pub Duration);

use super::BoxError;

/// The permits of each upstream, by authority (an upstream that moves on reload gets its own).
#[derive(Debug)]
pub struct Caps {
    limit: usize,
    queue_timeout: Duration,
    by_authority: Mutex<HashMap<String, Arc<Semaphore>>>,
    tables: Arc<Tables>,
    metrics: Arc<Metrics>,
    /// The lean path's idle connections, closed when a connect finds no permit free: both
    /// pools live under one cap, and an idle connection must not make a request wait.
    idle: OnceLock<Weak<dyn Evict>>,
}

/// Idle connections that can be closed to free their permits.
pub trait Evict: Send + Sync + std::fmt::Debug {
    /// Closes the idle connections to `authority`.
    fn evict_idle(&self, authority: &str);
}

impl Caps {
    /// At most `limit` connections per upstream; a connect waits `queue_timeout` at most.
    pub fn new(limit: u32, queue_timeout: Duration, tables: Arc<Tables>, metrics: Arc<Metrics>) -> Caps {
        let by_authority = Mutex::new(HashMap::new());
        Caps { limit: limit as usize, queue_timeout, by_authority, tables, metrics, idle: OnceLock::new() }
    }

    /// Registers the idle connections to close under pressure.
    pub fn evict_with(&self, idle: Weak<dyn Evict>) {
        let _ = self.idle.set(idle);
    }

    fn semaphore(&self, authority: &str) -> Arc<Semaphore> {
        let mut map = self.by_authority.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(authority.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.limit))))
    }

    /// A permit for a new connection to the upstream at `authority`, waiting in its queue
    /// if need be.
    pub async fn permit(&self, authority: &str) -> Result<OwnedSemaphorePermit, QueueFull> {
        let semaphore = self.semaphore(authority);
        if let Ok(p) = Arc::clone(&semaphore).try_acquire_owned() {
            return Ok(p);
        }
        if let Some(idle) = self.idle.get().and_then(Weak::upgrade) {
            idle.evict_idle(authority);
            if let Ok(p) = Arc::clone(&semaphore).try_acquire_owned() {
                return Ok(p);
            }
        }
        let table = self.tables.current();
        let which = [Upstream::Primary, Upstream::Replica]
            .into_iter()
            .find(|u| table.target(*u).authority.as_str() == authority);
        let _waiting = which.map(|u| self.metrics.queue_waiting(u));
        match tokio::time::timeout(self.queue_timeout, semaphore.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => {
                if let Some(u) = which {
                    self.metrics.queue_timeout(u);
                }
                Err(QueueFull(self.queue_timeout))
            }
        }
    }
}

/// Wraps a connector so that each connection it makes holds its upstream's permit.
#[derive(Debug, Clone)]
pub struct Capped<C> {
    inner: C,
    caps: Arc<Caps>,
}

impl<C> Capped<C> {
    /// Caps `inner`'s connections with `caps`.
    pub fn new(inner: C, caps: Arc<Caps>) -> Capped<C> {
        Capped { inner, caps }
    }
}

impl<C> tower_service::Service<Uri> for Capped<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Response: Send,
    C::Future: Send,
    C::Error: Into<BoxError>,
{
    type Response = CappedIo<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<CappedIo<C::Response>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // The connector that was made ready is the one to call (tower's convention).
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let caps = Arc::clone(&self.caps);
        Box::pin(async move {
            let permit = caps.permit(uri.authority().map_or("", |a| a.as_str())).await?;
            let io = inner.call(uri).await.map_err(Into::into)?;
            Ok(CappedIo { io, _permit: permit })
        })
    }
}

/// A connection that gives its permit back when it closes.
#[derive(Debug)]
pub struct CappedIo<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: Connection> Connection for CappedIo<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: Read + Unpin> Read for CappedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for CappedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
