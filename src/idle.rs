//! Idle detection for client connections: no bytes in either direction for a while,
//! and no request waiting on an upstream (README "Limits and timeouts").

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When something last moved, as milliseconds since the record was made.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
    /// Requests of this connection waiting on an upstream: while any is, the connection is not idle.
    busy: AtomicU32,
    /// The idle watchdog closed the connection.
    idle_closed: AtomicBool,
    /// A request has arrived on the connection.
    requested: AtomicBool,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity::new()
    }
}

impl Activity {
    /// A record that counts as active from now.
    pub fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicU32::new(0),
            idle_closed: AtomicBool::new(false),
            requested: AtomicBool::new(false),
        }
    }

    /// Records movement now.
    pub fn touch(&self) {
        self.last_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the record was made.
    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Time since the last movement (zero while a request is busy).
    pub fn quiet_for(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.opened.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Records that the idle watchdog is closing the connection.
    fn close_for_idleness(&self) {
        self.idle_closed.store(true, Ordering::Relaxed);
    }

    /// Whether the idle watchdog closed the connection (rather than the client).
    pub fn closed_for_idleness(&self) -> bool {
        self.idle_closed.load(Ordering::Relaxed)
    }

    /// Marks a request busy until the guard is dropped; the quiet time restarts then.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.requested.store(true, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(self))
    }
}

/// A request in progress on a connection (see [`Activity::busy`]).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once `activity` has seen no bytes and no busy request for `idle`, having
/// recorded that the connection is closed for idleness (before the caller drops it).
pub async fn idle_for(activity: &Activity, idle: Duration) {
    loop {
        let quiet = activity.quiet_for();
        if quiet >= idle {
            activity.close_for_idleness();
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// Resolves if no request has arrived within `limit` of the connection's opening: a
/// connection that sends nothing, or too little to make a request head, is slowloris too
/// (README "Limits and timeouts"). Never resolves once a request has arrived.
pub async fn no_request_within(activity: &Activity, limit: Duration) {
    tokio::time::sleep_until((activity.opened + limit).into()).await;
    if activity.requested.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}

/// A stream that records when it last read or wrote.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`; the connection counts as active from now.
    pub fn new(inner: T) -> IdleIo<T> {
        IdleIo { inner, activity: Arc::new(Activity::new()) }
    }

    /// The shared activity record, for a watchdog.
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_busy_connection_is_never_idle() {
        let a = Arc::new(Activity::new());
        let guard = a.busy();
        let waited = tokio::time::timeout(Duration::from_millis(150), idle_for(&a, Duration::from_millis(50))).await;
        assert!(waited.is_err(), "idle while a request was busy");
        drop(guard);
        // The quiet time starts when the request stops being busy.
        assert!(a.quiet_for() < Duration::from_millis(40));
        let started = Instant::now();
        idle_for(&a, Duration::from_millis(50)).await;
        assert!(started.elapsed() >= Duration::from_millis(45));
    }
}
