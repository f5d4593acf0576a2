//! A bare reverse proxy on the same stack as mediaroute (hyper server, hyper-util pooled
//! client, single-threaded runtime, mimalloc, 64 KiB upstream read cap, `TCP_NODELAY`) with
//! none of its work: no routing, header handling, access record or metrics. It measures what
//! the stack itself costs per request, next to mediaroute on the same load.
//!
//!   cargo run --release --example bare_proxy -- 127.0.0.1:19290 http://127.0.0.1:19202

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().context("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL")?.parse()?;
    let upstream: Uri = args.next().context("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL")?.parse()?;
    let authority = upstream.authority().context("the upstream URL needs a host")?.clone();
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async move {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client = Arc::new(
            Client::builder(TokioExecutor::new())
                .http1_max_buf_size(64 * 1024)
                .pool_timer(TokioTimer::new())
                .build::<_, Incoming>(http),
        );
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let client = Arc::clone(&client);
            let authority = authority.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let client = Arc::clone(&client);
                    let authority = authority.clone();
                    async move { forward(&client, authority, req).await }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

/// Sends the request to the upstream unchanged except for its URI (an error closes the connection).
async fn forward(
    client: &Client<HttpConnector, Incoming>,
    authority: http::uri::Authority,
    mut req: Request<Incoming>,
) -> anyhow::Result<Response<Incoming>> {
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    *req.uri_mut() = Uri::from_parts(parts)?;
    Ok(client.request(req).await?)
}
