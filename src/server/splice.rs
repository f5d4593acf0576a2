//! splice(2) from one socket to another through a pipe (README "The lean download path"):
//! a body's bytes go from the upstream's socket to the client's inside the kernel, never
//! through mediaroute's memory. Pipes are pooled; one holds at most 64 KiB in flight.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Idle pipes kept for reuse; more are closed.
const MAX_IDLE_PIPES: usize = 256;

/// A pipe: bytes spliced into `write` come out of `read`.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Pipes for splicing, reused between bodies.
#[derive(Debug, Default)]
pub struct Pipes {
    idle: Mutex<Vec<Pipe>>,
}

/// How a splice ended early.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The upstream's socket ended or failed before the length was moved.
    #[error("the upstream broke off the body")]
    Upstream(#[source] io::Error),
    /// The upstream sent nothing for the idle time.
    #[error("the upstream sent nothing for {0:?}")]
    UpstreamStalled(Duration),
    /// The client's socket failed (it went away).
    #[error("the client went away")]
    Client(#[source] io::Error),
    /// The client took nothing for the idle time.
    #[error("the client took nothing for {0:?}")]
    ClientStalled(Duration),
}

impl Pipes {
    /// A pipe from the pool, or a new one; `None` when the system has none to give
    /// (then the caller copies instead).
    fn take(&self) -> Option<Pipe> {
        if let Some(p) = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            return Some(p);
        }
        match rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC) {
            Ok((read, write)) => Some(Pipe { read, write }),
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splicing; copying instead");
                None
            }
        }
    }

    /// Returns an empty pipe to the pool.
    fn give_back(&self, pipe: Pipe) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_PIPES {
            idle.push(pipe);
        }
    }

    /// Moves exactly `len` bytes from `from` to `to`, adding to `moved` the bytes the
    /// client's socket took. Either side may pause for up to `idle`. Returns `None` when
    /// no pipe could be had (nothing was moved).
    pub async fn splice(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        len: u64,
        idle: Duration,
        moved: &mut u64,
    ) -> Option<Result<(), SpliceError>> {
        let pipe = self.take()?;
        let mut left = len;
        // Bytes in the pipe, waiting for the client's socket.
        let mut in_pipe = 0usize;
        let outcome = loop {
            if left == 0 && in_pipe == 0 {
                break Ok(());
            }
            let mut progressed = false;
            if left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX);
                let fill = || rustix::pipe::splice(from, None, &pipe.write, None, want, SpliceFlags::NONBLOCK);
                // With bytes in the pipe, "would block" may mean the pipe is full rather
                // than the socket empty: then the socket's readiness must not be cleared.
                let filled = if in_pipe == 0 {
                    from.try_io(Interest::READABLE, || fill().map_err(io::Error::from))
                } else {
                    fill().map_err(io::Error::from)
                };
                match filled {
                    Ok(0) => break Err(SpliceError::Upstream(io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => {
                        left -= n as u64;
                        in_pipe += n;
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break Err(SpliceError::Upstream(e)),
                }
            }
            if in_pipe > 0 {
                let drain = || rustix::pipe::splice(&pipe.read, None, to, None, in_pipe, SpliceFlags::NONBLOCK);
                match to.try_io(Interest::WRITABLE, || drain().map_err(io::Error::from)) {
                    Ok(n) => {
                        in_pipe -= n;
                        *moved += n as u64;
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break Err(SpliceError::Client(e)),
                }
            }
            if progressed {
                continue;
            }
            // Nothing moved: wait for the side that holds things up.
            if in_pipe > 0 {
                match tokio::time::timeout(idle, to.writable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(SpliceError::Client(e)),
                    Err(_) => break Err(SpliceError::ClientStalled(idle)),
                }
            } else {
                let readable = tokio::select! {
                    r = tokio::time::timeout(idle, from.readable()) => r,
                    // A client that leaves while the upstream is silent is the client's doing.
                    () = client_gone(to) => break Err(SpliceError::Client(io::ErrorKind::ConnectionAborted.into())),
                };
                match readable {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(SpliceError::Upstream(e)),
                    Err(_) => break Err(SpliceError::UpstreamStalled(idle)),
                }
            }
        };
        if in_pipe == 0 {
            self.give_back(pipe);
        }
        Some(outcome)
    }
}

/// Resolves when the client has closed its side (nothing more to read, ever). With bytes
/// waiting (a pipelined request) it never resolves.
pub(super) async fn client_gone(stream: &TcpStream) {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}
