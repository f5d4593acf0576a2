//! Connections to the upstreams: TCP for `http`, TLS for `https` with the roots that
//! upstream trusts (README "HTTPS upstreams"). SNI and certificate verification are always on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Config;
use crate::table::Tables;

use super::BoxError;

/// Connects to `http` and `https` upstreams. An upstream with a `ca_file` is verified
/// against that file alone, as loaded by the current table (so a reload re-reads it);
/// every other `https` address against the system roots.
#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector,
    system: HttpsConnector<HttpConnector>,
    tables: Arc<Tables>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").finish_non_exhaustive()
    }
}

impl Connector {
    /// TCP with `TCP_NODELAY`, keep-alive and the connect timeout; TLS with the system roots
    /// unless the table names a private CA for the address.
    pub fn new(cfg: &Config, tables: Arc<Tables>) -> Connector {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(cfg.limits.upstream_connect_timeout));
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        let provider = crate::config::tls::provider();
        let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "no system CA certificates found; https upstreams without ca_file will fail to verify");
                let empty = crate::config::tls::client_config(Arc::new(rustls::RootCertStore::empty()));
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(empty)
            }
        };
        let system = builder.https_or_http().enable_http1().wrap_connector(tcp.clone());
        Connector { tcp, system, tables }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.system.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let table = self.tables.current();
        match table.upstream_tls(uri.scheme_str(), uri.authority().map(|a| a.as_str())) {
            Some(tls) => HttpsConnector::from((self.tcp.clone(), Arc::clone(tls))).call(uri),
            None => self.system.call(uri),
        }
    }
}
