//! A small in-memory object server with the S3 behaviour that routing depends on:
//! `Last-Modified`, `ETag`, single ranges, `If-None-Match`, 404 `NoSuchKey`, PUT.
//!
//! It backs the `demo` command and the tests where full S3 semantics do not matter.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One stored object.
#[derive(Debug, Clone)]
pub struct Object {
    /// The bytes.
    pub body: Bytes,
    /// Reported as `Last-Modified`.
    pub last_modified: SystemTime,
}

/// Objects keyed by request path (`/bucket/key`).
#[derive(Debug)]
pub struct Store {
    /// A label for logs (`primary`, `replica`).
    pub name: String,
    objects: RwLock<HashMap<String, Object>>,
    hits: AtomicUsize,
}

impl Store {
    /// An empty store.
    pub fn new(name: &str) -> Arc<Store> {
        Arc::new(Store { name: name.to_string(), objects: RwLock::new(HashMap::new()), hits: AtomicUsize::new(0) })
    }

    /// Adds or replaces an object.
    pub fn put(&self, path: &str, body: impl Into<Bytes>, last_modified: SystemTime) {
        let obj = Object { body: body.into(), last_modified };
        self.write().insert(path.to_string(), obj);
    }

    /// The object at `path`, if any.
    pub fn get(&self, path: &str) -> Option<Object> {
        self.read().get(path).cloned()
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Object>> {
        self.objects.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Object>> {
        self.objects.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running object server.
#[derive(Debug)]
pub struct StoreServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it serves.
    pub store: Arc<Store>,
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl StoreServer {
    /// Stops listening and drops every open connection, like a crashed server.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves `store` on `addr` (port 0 picks a free port).
pub async fn serve(addr: SocketAddr, store: Arc<Store>) -> std::io::Result<StoreServer> {
    serve_on(TcpListener::bind(addr).await?, store)
}

/// Serves `store` on an already bound listener.
pub fn serve_on(listener: TcpListener, store: Arc<Store>) -> std::io::Result<StoreServer> {
    let addr = listener.local_addr()?;
    let st = Arc::clone(&store);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let st = Arc::clone(&st);
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let st = Arc::clone(&st);
                    async move { Ok::<_, Infallible>(handle(&st, req).await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            });
        }
    });
    Ok(StoreServer { addr, store, stop, task })
}

type Resp = Response<Full<Bytes>>;

async fn handle(store: &Store, req: Request<Incoming>) -> Resp {
    store.hits.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    match *req.method() {
        Method::GET | Method::HEAD => read(store, &req, &path),
        Method::PUT => match req.into_body().collect().await {
            Ok(body) => {
                store.put(&path, body.to_bytes(), SystemTime::now());
                let etag = store.get(&path).map(|o| etag(&o)).unwrap_or_default();
                respond(StatusCode::OK, &[(header::ETAG, etag)], Bytes::new())
            }
            Err(_) => error(StatusCode::BAD_REQUEST, "IncompleteBody", &path),
        },
        Method::DELETE => {
            store.write().remove(&path);
            respond(StatusCode::NO_CONTENT, &[], Bytes::new())
        }
        _ => error(StatusCode::NOT_IMPLEMENTED, "NotImplemented", &path),
    }
}

fn read(store: &Store, req: &Request<Incoming>, path: &str) -> Resp {
    let Some(obj) = store.get(path) else {
        return error(StatusCode::NOT_FOUND, "NoSuchKey", path);
    };
    let tag = etag(&obj);
    let modified = httpdate::fmt_http_date(obj.last_modified);
    let common = [
        (header::ETAG, tag.clone()),
        (header::LAST_MODIFIED, modified),
        (header::ACCEPT_RANGES, "bytes".to_string()),
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
    ];
    if req.headers().get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == tag.as_bytes()) {
        return respond(StatusCode::NOT_MODIFIED, &common, Bytes::new());
    }
    let len = obj.body.len() as u64;
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(|r| parse_range(r, len));
    let (status, body, extra) = match range {
        None => (StatusCode::OK, obj.body.clone(), None),
        Some(Some((start, end))) => {
            let part = obj.body.slice(start as usize..=end as usize);
            (StatusCode::PARTIAL_CONTENT, part, Some(format!("bytes {start}-{end}/{len}")))
        }
        Some(None) => {
            let mut r = error(StatusCode::RANGE_NOT_SATISFIABLE, "InvalidRange", path);
            if let Ok(v) = format!("bytes */{len}").parse() {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let mut resp = respond(status, &common, if req.method() == Method::HEAD { Bytes::new() } else { body.clone() });
    if let Some(cr) = extra.and_then(|c| c.parse().ok()) {
        resp.headers_mut().insert(header::CONTENT_RANGE, cr);
    }
    if let Ok(v) = body.len().to_string().parse() {
        resp.headers_mut().insert(header::CONTENT_LENGTH, v);
    }
    resp
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n`, clamped; `None` when unsatisfiable.
fn parse_range(spec: &str, len: u64) -> Option<(u64, u64)> {
    let spec = spec.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (len.checked_sub(n.min(len))?, len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(len.checked_sub(1)?)),
    };
    (start <= end && start < len).then_some((start, end))
}

fn etag(o: &Object) -> String {
    // Cheap content fingerprint: length and a FNV-1a hash.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in o.body.iter() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{:x}-{:x}\"", o.body.len(), h)
}

fn respond(status: StatusCode, headers: &[(header::HeaderName, String)], body: Bytes) -> Resp {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    for (k, v) in headers {
        if let Ok(v) = v.parse() {
            resp.headers_mut().insert(k.clone(), v);
        }
    }
    resp
}

fn error(status: StatusCode, code: &str, path: &str) -> Resp {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Resource>{path}</Resource></Error>\n"
    );
    respond(status, &[(header::CONTENT_TYPE, "application/xml".to_string())], Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-3", 10), Some((0, 3)));
        assert_eq!(parse_range("bytes=5-", 10), Some((5, 9)));
        assert_eq!(parse_range("bytes=-3", 10), Some((7, 9)));
        assert_eq!(parse_range("bytes=8-100", 10), Some((8, 9)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=4-2", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
    }
}
