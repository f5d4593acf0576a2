//! The TLS listener's handshake (README "TLS"): rustls with ALPN `h2` and `http/1.1`,
//! TLS 1.2 and 1.3, and the certificate of the current routing table, so that a reload
//! swaps it for new handshakes while open connections keep theirs.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::proxy_protocol::Rewind;
use crate::table::Tables;

/// A TLS record carrying a handshake message starts with this byte.
const HANDSHAKE_RECORD: u8 = 0x16;

/// What a client that spoke plain HTTP to the TLS port is told before the connection closes.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 48\r\n\
Connection: close\r\n\r\nThis port speaks TLS: use https:// to reach it.\n";

/// Serves the current table's certificate; `started_with` if a reload dropped the TLS
/// settings (the listener then keeps its certificate until a restart).
#[derive(Debug)]
struct TableCert {
    tables: Arc<Tables>,
    started_with: Arc<CertifiedKey>,
}

impl ResolvesServerCert for TableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.tables.current();
        Some(table.server_cert.as_ref().map_or_else(|| Arc::clone(&self.started_with), |c| Arc::clone(&c.certified)))
    }
}

/// The TLS settings of the listener: its certificate follows the routing table.
pub fn acceptor(tables: Arc<Tables>, started_with: Arc<CertifiedKey>) -> TlsAcceptor {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::config::tls::provider())
        .with_safe_default_protocol_versions()
        // Not input-dependent: ring supports both safe default versions.
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(TableCert { tables, started_with }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(cfg))
}

/// Why a TLS handshake did not complete (the labels of
/// `mediaroute_tls_handshake_failures_total`, except `timeout`, which the caller sees).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The client sent a plain HTTP request; it was told so in plain HTTP.
    #[error("a plain HTTP request on the TLS port")]
    PlainHttp,
    /// The client closed before the handshake ended.
    #[error("closed during the handshake")]
    Closed,
    /// Anything else: versions, ciphers, an alert, bytes that are not TLS.
    #[error("TLS handshake failed: {0}")]
    Error(#[source] std::io::Error),
}

impl Failure {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::PlainHttp => "plain-http",
            Failure::Closed => "closed",
            Failure::Error(_) => "error",
        }
    }
}

/// Completes the server side of a TLS handshake on `stream`, whose first bytes may
/// already have been read (`prefix`, after a PROXY header). A client that starts with
/// something other than a TLS handshake record is answered at once: a plain HTTP request
/// with a 400 that says to use https, anything else by closing (README "TLS").
pub async fn handshake<S>(acceptor: &TlsAcceptor, mut stream: S, prefix: Bytes) -> Result<TlsStream<Rewind<S>>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let prefix = if prefix.is_empty() {
        // A ClientHello fits in one read almost always; the rest is read by rustls.
        let mut first = BytesMut::with_capacity(2048);
        match stream.read_buf(&mut first).await {
            Ok(0) => return Err(Failure::Closed),
            Ok(_) => first.freeze(),
            Err(e) => return Err(failure(e)),
        }
    } else {
        prefix
    };
    match prefix.first() {
        Some(&HANDSHAKE_RECORD) => {}
        Some(b) if b.is_ascii_uppercase() => {
            // Like nginx's "plain HTTP request was sent to HTTPS port": say so, then close.
            let _ = stream.write_all(PLAIN_HTTP_ANSWER).await;
            let _ = stream.shutdown().await;
            return Err(Failure::PlainHttp);
        }
        _ => return Err(Failure::Error(std::io::Error::other("not a TLS handshake"))),
    }
    acceptor.accept(Rewind::new(prefix, stream)).await.map_err(failure)
}

fn failure(e: std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => Failure::Closed,
        _ => Failure::Error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_is_well_formed() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        let len: usize =
            head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|v| v.parse().ok()).unwrap();
        assert_eq!(body.len(), len, "{body:?}");
    }
}
