//! The listeners: accept connections, read a PROXY header and complete TLS where
//! configured, and serve HTTP/1.1 and HTTP/2 on them; and the reload orchestration that
//! keeps them serving (README "Operating", "TLS", "Behind an NLB").

mod lean;
pub mod proxy_protocol;
pub mod reload;
mod splice;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

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
    /// The bound listeners do not fit the config (callers of [`start_on`] bind them).
    #[error("{0}")]
    Listeners(&'static str),
}

/// A running proxy: its addresses, its state, and a way to stop it.
#[derive(Debug)]
pub struct Running {
    /// The plain listener's address actually bound (useful with port 0), or the TLS
    /// listener's when there is no plain one.
    pub addr: SocketAddr,
    /// The TLS listener's address actually bound, if configured.
    pub tls_addr: Option<SocketAddr>,
    /// The admin address actually bound, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// The proxy state (tables, upstreams, caches, metrics).
    pub proxy: Arc<Proxy>,
    grace: Duration,
    stop: watch::Sender<bool>,
    /// One accept loop per listener.
    accepting: Vec<JoinHandle<()>>,
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
        // The accept loops themselves bound the wait by the grace period.
        let loops = async {
            for task in self.accepting {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(self.grace + Duration::from_secs(2), loops).await.is_err() {
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
    /// The plain proxy listener, if configured.
    pub proxy: Option<TcpListener>,
    /// The TLS proxy listener, if configured.
    pub tls: Option<TcpListener>,
    /// The admin listener, if configured.
    pub admin: Option<TcpListener>,
}

/// Binds the listeners named in `cfg`.
pub async fn bind(cfg: &Config) -> Result<Bound, ServerError> {
    let l = &cfg.listen;
    Ok(Bound {
        proxy: bind_some(l.addr).await?,
        tls: bind_some(l.tls_addr).await?,
        admin: bind_some(l.admin_addr).await?,
    })
}

async fn bind_some(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, ServerError> {
    match addr {
        Some(a) => Ok(Some(bind_one(a).await?)),
        None => Ok(None),
    }
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
    let addr_of = |l: &TcpListener, configured: Option<SocketAddr>| {
        let configured = configured.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        l.local_addr().map_err(|source| ServerError::Bind { addr: configured, source })
    };
    let plain = bound.proxy.as_ref().map(|l| addr_of(l, cfg.listen.addr)).transpose()?;
    let tls_addr = bound.tls.as_ref().map(|l| addr_of(l, cfg.listen.tls_addr)).transpose()?;
    let admin_addr = bound.admin.as_ref().map(|l| addr_of(l, cfg.listen.admin_addr)).transpose()?;
    let Some(local) = plain.or(tls_addr) else {
        return Err(ServerError::Listeners("no proxy listener: set listen.addr or listen.tls_addr"));
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
    let acceptor = match (&bound.tls, &cfg.tls) {
        (Some(_), Some(cert)) => {
            metrics.set_certificate_expiry(cert.not_after);
            Some(tls::acceptor(Arc::clone(&tables), Arc::clone(&cert.certified)))
        }
        (Some(_), None) => {
            return Err(ServerError::Listeners("listen.tls_addr needs listen.tls_cert and listen.tls_key"));
        }
        (None, _) => None,
    };
    let proxy = Arc::new(Proxy::new(&cfg, Arc::clone(&tables), metrics, keys));
    let mut background =
        vec![tokio::spawn(upstream::check_loop(Arc::clone(proxy.upstreams()), tables, cfg.health.clone()))];
    if let (Some(l), Some(a)) = (bound.admin, admin_addr) {
        background.push(admin::spawn(l, Arc::clone(&proxy)));
        tracing::info!(addr = %a, "admin listening");
    }
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared::new(&cfg.limits, cfg.listen.proxy_protocol, Arc::clone(&proxy)));
    let listeners: Vec<(TcpListener, Option<TlsAcceptor>)> =
        bound.proxy.map(|l| (l, None)).into_iter().chain(bound.tls.map(|l| (l, acceptor))).collect();
    let accepting = listeners
        .into_iter()
        .map(|(l, tls)| tokio::spawn(accept_loop(l, tls, Arc::clone(&shared), stopped.clone())))
        .collect();
    proxy.set_ready(true);
    if let Some(a) = plain {
        tracing::info!(addr = %a, proxy_protocol = cfg.listen.proxy_protocol, "listening");
    }
    if let (Some(a), Some(cert)) = (tls_addr, &cfg.tls) {
        tracing::info!(addr = %a, proxy_protocol = cfg.listen.proxy_protocol, subject = %cert.subject, "listening (TLS)");
    }
    Ok(Running {
        addr: local,
        tls_addr,
        admin_addr,
        proxy,
        grace: cfg.limits.shutdown_grace,
        stop,
        accepting,
        background,
    })
}

/// What every connection of every listener shares.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    proxy: Arc<Proxy>,
    limits: Limits,
    proxy_protocol: bool,
    /// At most `limits.max_connections` connections over all listeners.
    slots: Arc<Semaphore>,
    lean: lean::LeanShared,
}

impl Shared {
    fn new(limits: &Limits, proxy_protocol: bool, proxy: Arc<Proxy>) -> Shared {
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
        Shared {
            builder,
            proxy,
            limits: limits.clone(),
            proxy_protocol,
            slots: Arc::new(Semaphore::new(limits.max_connections as usize)),
            lean: lean::LeanShared { pipes: splice::Pipes::default() },
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let limits = &shared.limits;
    loop {
        // At the connection limit, stop accepting: new clients wait in the kernel's backlog.
        let permit = tokio::select! {
            p = Arc::clone(&shared.slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stopped.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let conn = Connection {
                        shared: Arc::clone(&shared),
                        tls: tls.clone(),
                        watcher: graceful.watcher(),
                        stopped: stopped.clone(),
                    };
                    tokio::spawn(conn.run(stream, peer, permit));
                }
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

/// One accepted connection on its way to HTTP.
struct Connection {
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    /// Keeps the graceful shutdown waiting for this connection.
    watcher: Watcher,
    stopped: watch::Receiver<bool>,
}

impl Connection {
    /// PROXY header (if configured), TLS (on the TLS listener), then HTTP. The PROXY header
    /// and the TLS handshake share `limits.handshake_timeout` (README "Limits and timeouts").
    async fn run(self, stream: TcpStream, tcp_peer: SocketAddr, permit: OwnedSemaphorePermit) {
        let _ = stream.set_nodelay(true);
        let metrics = self.shared.proxy.metrics();
        let within = self.shared.limits.handshake_timeout;
        let deadline = tokio::time::Instant::now() + within;
        let (peer, prefix, stream) = if self.shared.proxy_protocol {
            match proxy_protocol::read_header(stream, within).await {
                // LOCAL (the balancer's own health check) and unknown families: the TCP peer.
                Ok((source, rewind)) => {
                    let (prefix, stream) = rewind.into_parts();
                    (source.unwrap_or(tcp_peer), prefix, stream)
                }
                Err(refusal) => {
                    metrics.proxy_protocol_refusal(refusal.label());
                    tracing::debug!(peer = %tcp_peer, error = %refusal, "closed a connection without a valid PROXY header");
                    return;
                }
            }
        } else {
            (tcp_peer, Bytes::new(), stream)
        };
        match &self.tls {
            Some(acceptor) => match tokio::time::timeout_at(deadline, tls::handshake(acceptor, stream, prefix)).await {
                Ok(Ok(tls)) => self.http(tls, peer, true, permit).await,
                Ok(Err(failure)) => {
                    metrics.tls_handshake_failure(failure.label());
                    tracing::debug!(%peer, error = %failure, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.tls_handshake_failure("timeout");
                    tracing::debug!(%peer, ?within, "no TLS handshake in time");
                }
            },
            None if self.shared.limits.lean_path => {
                let lean = lean::LeanConn {
                    proxy: &self.shared.proxy,
                    limits: &self.shared.limits,
                    shared: &self.shared.lean,
                    peer,
                    stopped: self.stopped.clone(),
                };
                if let Some((stream, read)) = lean.serve(stream, prefix).await {
                    self.plain(stream, read, peer, permit).await;
                }
            }
            None => self.plain(stream, prefix, peer, permit).await,
        }
    }

    /// Serves a plain connection on hyper, `read` being its bytes read already.
    async fn plain(self, stream: TcpStream, read: Bytes, peer: SocketAddr, permit: OwnedSemaphorePermit) {
        if read.is_empty() {
            self.http(stream, peer, false, permit).await
        } else {
            self.http(proxy_protocol::Rewind::new(read, stream), peer, false, permit).await
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 on `io` until the client leaves, idles or the server stops.
    async fn http<S>(self, io: S, peer: SocketAddr, tls: bool, permit: OwnedSemaphorePermit)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = &self.shared.limits;
        let (idle, first_request) = (limits.idle_timeout, limits.header_read_timeout);
        let proxy = Arc::clone(&self.shared.proxy);
        let io = IdleIo::new(io);
        let activity = io.activity();
        let busy = Arc::clone(&activity);
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if tls {
                req.extensions_mut().insert(crate::proxy::OverTls);
            }
            // Waiting on a probe or an upstream is not idleness (README "Limits and timeouts").
            let guard = busy.busy();
            // The response body reads it to tell an upstream stall from a client that left.
            let connection = Arc::clone(&busy);
            // Called here, not in the future: the request is on record even if hyper drops
            // the future unpolled.
            let serving = proxy.serve(req, peer, Some(connection));
            async move {
                let resp = serving.await;
                drop(guard);
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let conn = self.watcher.watch(self.shared.builder.serve_connection(TokioIo::new(io), service).into_owned());
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
    }
}
