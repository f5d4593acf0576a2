//! Shared test harness: real upstream servers on loopback port 0 and the proxy in front.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mediaroute::config;
use mediaroute::demo::store::{self, Store, StoreServer};
use mediaroute::server::{self, Running};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

pub mod pki;

pub const PB: &str = "studio-media";
pub const RB: &str = "studio-media-eu";

/// Replica networks used by every test config.
pub const INSIDE: &str = "10.20.1.2";
pub const OUTSIDE: &str = "198.51.100.9";

/// An object path in the primary bucket.
pub fn obj(key: &str) -> String {
    format!("/{PB}/{key}")
}

/// The config every test starts from; `extra` is appended to `[replication]`
/// and `tail` after the `[users]` table.
pub fn config_text(primary: SocketAddr, replica: SocketAddr, replication: &str, tail: &str) -> String {
    // Active health checks would add requests the tests count; tests that want them say so.
    let health = if tail.contains("[health]") { "" } else { "[health]\ninterval = \"1h\"" };
    format!(
        r#"
[listen]
addr = "127.0.0.1:0"
[identity]
user_header = "X-Forwarded-User"
user_query = "user"
trusted_proxies = ["127.0.0.0/8", "::1/128"]
[primary]
url = "http://{primary}"
bucket = "{PB}"
[replica]
url = "http://{replica}"
bucket = "{RB}"
[replication]
default_mode = "no"
networks = ["10.20.0.0/16", "2001:db8::/32"]
{replication}
[users]
alice = "yes"
bob = "auto"
carol = "no"
{tail}
{health}
"#
    )
}

/// Starts the proxy in-process on a config text.
///
/// With `MEDIAROUTE_TEST_LEAN_PATH=false` in the environment, every proxy started here
/// serves all requests on hyper (`limits.lean_path = false`): CI runs the suite both ways
/// (README "The lean download path").
pub async fn start_proxy(text: &str) -> Running {
    let mut cfg = config::parse(Path::new("test.toml"), text, &|_| Ok(String::new())).expect("test config is valid");
    if std::env::var("MEDIAROUTE_TEST_LEAN_PATH").is_ok_and(|v| v == "false") {
        cfg.limits.lean_path = false;
    }
    server::start(cfg).await.expect("proxy starts")
}

/// Two demo stores plus the proxy.
pub struct Setup {
    pub primary: StoreServer,
    pub replica: StoreServer,
    pub proxy: Running,
    pub client: reqwest::Client,
}

impl Setup {
    /// Stores on port 0 and the proxy with `replication` settings (e.g. `delay = "15m"`).
    pub async fn new(replication: &str) -> Setup {
        Setup::with_tail(replication, "").await
    }

    /// Like `new`, with extra config tables after `[users]`.
    pub async fn with_tail(replication: &str, tail: &str) -> Setup {
        Setup::with_config(|p, r| config_text(p, r, replication, tail)).await
    }

    /// Stores on port 0 and the proxy on the config `text(primary, replica)` returns.
    pub async fn with_config(text: impl FnOnce(SocketAddr, SocketAddr) -> String) -> Setup {
        let primary = store::serve(loopback0(), Store::new("primary")).await.unwrap();
        let replica = store::serve(loopback0(), Store::new("replica")).await.unwrap();
        let proxy = start_proxy(&text(primary.addr, replica.addr)).await;
        Setup { primary, replica, proxy, client: client() }
    }

    /// Puts `key` on the primary (and on the replica if `replicated`), `age` old,
    /// with bodies that say where they came from.
    pub fn media(&self, key: &str, replicated: bool, age: Duration) {
        let at = SystemTime::now() - age;
        self.primary.store.put(&format!("/{PB}/{key}"), format!("primary:{key}"), at);
        if replicated {
            self.replica.store.put(&format!("/{RB}/{key}"), format!("replica:{key}"), at);
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.addr)
    }

    /// GET as `user` from `xff` (sent as X-Forwarded-For by the trusted loopback peer).
    pub async fn get_as(&self, path: &str, user: Option<&str>, xff: Option<&str>) -> Answer {
        let mut req = self.client.get(self.url(path));
        if let Some(u) = user {
            req = req.header("x-forwarded-user", u);
        }
        if let Some(x) = xff {
            req = req.header("x-forwarded-for", x);
        }
        Answer::from(req.send().await.expect("proxy answers")).await
    }
}

/// A response, read whole (test objects are small).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub upstream: String,
    pub reason: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub async fn from(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let (upstream, reason) = (h("x-mediaroute-upstream"), h("x-mediaroute-reason"));
        let body = resp.text().await.unwrap_or_default();
        Answer { status, upstream, reason, headers, body }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A loopback address that refuses connections for as long as this value lives.
///
/// `socket` is bound to a free port but never listens, so Linux answers a connect with
/// RST ("connection refused"). Because the socket keeps the port bound, no other test can
/// be handed the port (port 0 never picks a bound port), unlike a listener bound and
/// released. Keep it alive for the whole test.
pub struct ClosedPort {
    pub addr: SocketAddr,
    /// Bound with `SO_REUSEPORT` and never listening; `socket.listen(n)` turns it into a
    /// server on the same address without the port ever being free.
    pub socket: TcpSocket,
}

impl ClosedPort {
    /// A fresh listener on the same address while `self` keeps holding it (`SO_REUSEPORT`
    /// lets a socket of the same user bind next to the held one). Dropping the listener
    /// makes the address refuse connections again; the port stays reserved throughout.
    pub fn listener(&self) -> TcpListener {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.set_reuseport(true).unwrap();
        socket.bind(self.addr).unwrap();
        socket.listen(1024).unwrap()
    }
}

/// A loopback address where nothing listens; see [`ClosedPort`].
pub fn closed_port() -> ClosedPort {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket.bind(loopback0()).unwrap();
    let addr = socket.local_addr().unwrap();
    ClosedPort { addr, socket }
}

/// A hyper server running `handler` on loopback port 0; stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed()
}

/// Serves `handler` for every request.
pub async fn serve_fn<F, Fut>(addr: SocketAddr, handler: F) -> TestServer
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = Arc::clone(&hits);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let hits = Arc::clone(&h2);
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    TestServer { addr, hits, task }
}

/// What a raw upstream does with a connection once it has written its answer.
pub enum Then {
    /// Closes it: a body promised longer is cut short.
    Close,
    /// Keeps it open and silent: a body promised longer stalls.
    HoldOpen,
}

/// An upstream that answers every request with the bytes of `answer`, as they are (framing
/// faults included); stopped when dropped.
pub async fn raw_upstream(answer: impl Into<Bytes>, then: Then) -> TestServer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer: Bytes = answer.into();
    let listener = TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let hold = matches!(then, Then::HoldOpen);
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(&answer).await;
                if hold {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    TestServer { addr, hits, task }
}

/// A server answering every request with `status` and a short body.
pub async fn status_server(status: u16) -> TestServer {
    serve_fn(loopback0(), move |_req| async move {
        let mut r = Response::new(full(format!("status {status}")));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r
    })
    .await
}

/// A server that echoes the request head as text: method, target, then `name: value` lines.
pub async fn echo_server() -> TestServer {
    serve_fn(loopback0(), |req: Request<Incoming>| async move {
        let mut s = format!("{} {}\n", req.method(), req.uri());
        for (k, v) in req.headers() {
            s.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        let body = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
        s.push_str(&format!("body-bytes: {body}\n"));
        Response::new(full(s))
    })
    .await
}

/// The byte at offset `i` of the generated test pattern.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A streamed body of `len` pattern bytes in 64 KiB chunks; `alive` counts live streams.
pub fn pattern_body(len: u64, alive: Arc<AtomicUsize>) -> TestBody {
    struct Live(Arc<AtomicUsize>);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    alive.fetch_add(1, Ordering::SeqCst);
    let live = Live(alive);
    const CHUNK: u64 = 64 * 1024;
    let stream = futures_util::stream::unfold((0u64, live), move |(off, live)| async move {
        if off >= len {
            return None;
        }
        let n = CHUNK.min(len - off);
        let chunk: Vec<u8> = (off..off + n).map(pattern_byte).collect();
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), (off + n, live)))
    });
    StreamBody::new(stream).boxed()
}

/// The proxy binary running as a child process (killed when dropped).
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// Every stderr line so far (logs, including the access log).
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    /// The config file it runs on (`rewrite_config`, then send SIGHUP).
    pub config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// `mediaroute run --config PATH` at log level info, through `prefix` if any (e.g.
/// `prlimit --nofile=64:64 --`), its stderr piped to the test and its stdout discarded.
pub fn run_command(prefix: &[&str], path: &Path) -> std::process::Command {
    let mut command = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = std::process::Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_mediaroute"));
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_mediaroute")),
    };
    command
        .args(["run", "--config"])
        .arg(path)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    command
}

impl ProxyProcess {
    /// Writes `config` to a temporary file and starts `mediaroute run` on it.
    pub fn spawn(config: &str) -> ProxyProcess {
        ProxyProcess::spawn_with_env(config, &[])
    }

    /// Like `spawn`, with extra environment variables.
    pub fn spawn_with_env(config: &str, env: &[(&str, &std::ffi::OsStr)]) -> ProxyProcess {
        ProxyProcess::spawn_under(config, env, &[])
    }

    /// Like `spawn_with_env`, started through `prefix` (e.g. `prlimit --nofile=64:64 --`).
    pub fn spawn_under(config: &str, env: &[(&str, &std::ffi::OsStr)], prefix: &[&str]) -> ProxyProcess {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mediaroute.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = run_command(prefix, &path).envs(env.iter().copied()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listen_addr(&line) {
                    let _ = tx.send((line.contains("admin listening"), addr));
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut addr = None;
        let mut admin = None;
        // The admin listener (if any) reports before the proxy listener.
        while addr.is_none() {
            let Ok((is_admin, a)) = rx.recv_timeout(Duration::from_secs(30)) else {
                // Never leave an orphan proxy behind a failed test.
                let _ = child.kill();
                let _ = child.wait();
                panic!("the proxy did not report its address; log: {:?}", log.lock().unwrap());
            };
            let a: SocketAddr = a.parse().unwrap();
            if is_admin { admin = Some(a) } else { addr = Some(a) }
        }
        let addr = addr.unwrap();
        ProxyProcess { child, addr, admin, log, config_path: path, _dir: dir }
    }

    /// Replaces the config file atomically (see [`write_atomically`]); send `HUP` to apply it.
    pub fn rewrite_config(&self, text: &str) {
        write_atomically(&self.config_path, text);
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{name} failed");
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident memory of the process so far, in bytes (Linux `VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap();
        kb * 1024
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `text` to `path` so that a concurrent reader sees the old file or the new one,
/// never a half-written one: a temporary file in the same directory, renamed over `path`.
pub fn write_atomically(path: &Path, text: &str) {
    use std::io::Write;
    let dir = path.parent().expect("the file has a directory");
    let mut tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
    tmp.write_all(text.as_bytes()).unwrap();
    tmp.as_file().sync_all().unwrap();
    tmp.persist(path).unwrap();
}

/// GET `path` through the proxy at `proxy` as `user`.
pub async fn get_via(proxy: SocketAddr, path: &str, user: &str) -> Answer {
    let resp = client().get(format!("http://{proxy}{path}")).header("x-forwarded-user", user).send().await.unwrap();
    Answer::from(resp).await
}

/// Fetches an admin endpoint; (status, body).
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let resp = client().get(format!("http://{admin}{path}")).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The value of one sample line in a metrics exposition (`name{labels}` exactly), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits up to 5 s for `series` on the admin listener's `/metrics` to read `want`; the
/// whole exposition then.
pub async fn metric_reaches(admin: SocketAddr, series: &str, want: f64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, m) = admin_get(admin, "/metrics").await;
        if metric(&m, series) == want {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "{series} never reached {want}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Adds an admin listener on a free port to a config text.
pub fn with_admin(text: &str) -> String {
    text.replace("[listen]\naddr = \"127.0.0.1:0\"", "[listen]\naddr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"")
}

/// The address in a "listening" log line, text (`addr=...`) or JSON (`"addr":"..."`).
fn listen_addr(line: &str) -> Option<String> {
    if !line.contains("listening") {
        return None;
    }
    let rest = line.split("addr=").nth(1).or_else(|| line.split("\"addr\":\"").nth(1))?;
    Some(rest.split(|c: char| c == '"' || c.is_whitespace()).next()?.to_string())
}
