//! The listeners: accept connections and serve HTTP/1.1 and cleartext HTTP/2 on them;
//! and the reload orchestration that keeps them serving (README "Operating").

pub mod reload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigErrors, Limits};
use crate::idle::{IdleIo, idle_for, no_request_within};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::sign::credentials::Keys;
use crate::table::{Reloaded, Tables};
use crate::{admin, upstream};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from the config.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A running proxy: its addresses, its state, and a way to stop it.
#[derive(Debug)]
pub struct Running {
    /// The proxy address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// The admin address actually bound, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// The proxy state (tables, upstreams, caches, metrics).
    pub proxy: Arc<Proxy>,
    grace: Duration,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Re-reads the config file and swaps in a new routing table; on error the old one stays.
    pub async fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        reload::reload(&self.proxy).await
    }

    /// Stops accepting, lets in-flight requests finish within `limits.shutdown_grace`, then returns.
    pub async fn shutdown(self) {
        self.proxy.set_ready(false);
        let _ = self.stop.send(true);
        // The accept loop itself bounds the wait by the grace period.
        if tokio::time::timeout(self.grace + Duration::from_secs(2), self.task).await.is_err() {
            tracing::warn!("server did not stop in time");
        }
        for task in self.background {
            task.abort();
        }
    }
}

/// Listeners bound before the server starts.
#[derive(Debug)]
pub struct Bound {
    /// The proxy listener.
    pub proxy: TcpListener,
    /// The admin listener, if configured.
    pub admin: Option<TcpListener>,
}

/// Binds the listeners named in `cfg`.
pub async fn bind(cfg: &Config) -> Result<Bound, ServerError> {
    let proxy = bind_one(cfg.listen.addr).await?;
    let admin = match cfg.listen.admin_addr {
        Some(a) => Some(bind_one(a).await?),
        None => None,
    };
    Ok(Bound { proxy, admin })
}

/// Binds one address.
pub async fn bind_one(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
}

/// Binds the listeners from `cfg` and starts serving in the background.
pub async fn start(cfg: Config) -> Result<Running, ServerError> {
    let bound = bind(&cfg).await?;
    start_on(cfg, bound).await
}

/// How long start-up and reloads wait for the first credentials before going on without
/// them (downloads then stay on the primary until they arrive).
pub const CREDENTIALS_FIRST_WAIT: Duration = Duration::from_secs(5);

/// Starts serving on listeners bound by the caller (inside a Tokio runtime).
pub async fn start_on(cfg: Config, bound: Bound) -> Result<Running, ServerError> {
    let addr_of = |l: &TcpListener, configured: SocketAddr| {
        l.local_addr().map_err(|source| ServerError::Bind { addr: configured, source })
    };
    let local = addr_of(&bound.proxy, cfg.listen.addr)?;
    let admin = match bound.admin {
        Some(l) => {
            let a = addr_of(&l, cfg.listen.admin_addr.unwrap_or(local))?;
            Some((l, a))
        }
        None => None,
    };
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::new());
    let tables = Arc::new(Tables::new(cfg.clone()));
    metrics.set_generation(tables.current().generation);
    let keys = match crate::table::credentials_of(&cfg) {
        Some(source) => Some(Keys::start(source, Arc::clone(&metrics), CREDENTIALS_FIRST_WAIT).await),
        None => None,
    };
    let proxy = Arc::new(Proxy::new(&cfg, Arc::clone(&tables), metrics, keys));
    let mut background =
        vec![tokio::spawn(upstream::check_loop(Arc::clone(proxy.upstreams()), tables, cfg.health.clone()))];
    let admin_addr = admin.map(|(l, a)| {
        background.push(admin::spawn(l, Arc::clone(&proxy)));
        tracing::info!(addr = %a, "admin listening");
        a
    });
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(bound.proxy, Arc::clone(&proxy), cfg.limits.clone(), stopped));
    proxy.set_ready(true);
    tracing::info!(addr = %local, "listening");
    Ok(Running { addr: local, admin_addr, proxy, grace: cfg.limits.shutdown_grace, stop, task, background })
}

async fn accept_loop(listener: TcpListener, proxy: Arc<Proxy>, limits: Limits, mut stopped: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size as usize)
        .max_headers(limits.max_headers as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_size)
        // One connection must not open more upstream requests than this (README "Limits and timeouts").
        .max_concurrent_streams(limits.max_streams_per_connection);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    loop {
        // At the connection limit, stop accepting: new clients wait in the kernel's backlog.
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stopped.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve(&builder, &graceful, stream, peer, &proxy, &limits, permit),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    static ACCEPT: crate::throttle::Every = crate::throttle::Every::new(Duration::from_secs(10));
                    if let Some(held) = ACCEPT.allow() {
                        tracing::warn!(error = %e, also_since_last_warning = held, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(grace = ?limits.shutdown_grace, "stopped accepting; waiting for in-flight requests");
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("grace period over: closing the remaining connections");
    }
}

fn serve(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    peer: SocketAddr,
    proxy: &Arc<Proxy>,
    limits: &Limits,
    permit: OwnedSemaphorePermit,
) {
    let (idle, first_request) = (limits.idle_timeout, limits.header_read_timeout);
    let _ = stream.set_nodelay(true);
    let proxy = Arc::clone(proxy);
    let io = IdleIo::new(stream);
    let activity = io.activity();
    let busy = Arc::clone(&activity);
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        // Waiting on a probe or an upstream is not idleness (README "Limits and timeouts").
        let guard = busy.busy();
        // The response body reads it to tell an upstream stall from a client that left.
        let connection = Arc::clone(&busy);
        async move {
            let resp = proxy.serve(req, peer, Some(connection)).await;
            drop(guard);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), service).into_owned());
    tokio::spawn(async move {
        tokio::select! {
            res = conn => if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            },
            () = idle_for(&activity, idle) => tracing::debug!(%peer, "closed idle connection"),
            () = no_request_within(&activity, first_request) => {
                tracing::debug!(%peer, "closed a connection that sent no request in time");
            }
        }
        drop(permit);
    });
}
