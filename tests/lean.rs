//! The lean download path (README "The lean download path"): the same answers and the
//! same upstream requests as hyper's path for every head in the corpus, truthful bodies
//! when an upstream breaks, upstream connections reused only when that is safe, and
//! connections handed to hyper at the first request the lean path does not take.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use mediaroute::config;
use mediaroute::server::{self, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An upstream that records every request head it reads and answers each with `answer`,
/// keeping connections alive; it counts the connections it accepted.
struct Recorder {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn recorder(answer: &'static [u8]) -> Recorder {
    let listener = TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&heads);
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let heads = Arc::clone(&h);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        heads.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    Recorder { addr, heads, task }
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    match find(hay, from) {
        Some(at) => [&hay[..at], to, &hay[at + from.len()..]].concat(),
        None => hay.to_vec(),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn proxy_with(text: &str, lean: bool) -> Running {
    let mut cfg = config::parse(Path::new("test.toml"), text, &|_| Ok(String::new())).unwrap();
    cfg.limits.lean_path = lean;
    server::start(cfg).await.unwrap()
}

/// Sends `bytes` on a new connection and reads until the proxy closes it or is quiet
/// for `quiet`.
async fn exchange(addr: SocketAddr, bytes: &[u8], quiet: Duration) -> Vec<u8> {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 16384];
    while let Ok(Ok(n)) = tokio::time::timeout(quiet, conn.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    got
}

/// The response heads in `bytes`: status and fields, `date` left out, fields sorted.
fn answers(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.split("HTTP/1.1 ")
        .skip(1)
        .map(|r| {
            let head = r.split("\r\n\r\n").next().unwrap_or("");
            let mut lines = head.lines();
            let status = lines.next().unwrap_or("").split(' ').next().unwrap_or("").to_string();
            let mut fields: Vec<String> =
                lines.map(str::to_ascii_lowercase).filter(|l| !l.starts_with("date:")).collect();
            fields.sort();
            format!("{status} {}", fields.join(" | "))
        })
        .collect()
}

const OK_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-origin: yes\r\n\r\nok";

#[tokio::test]
async fn every_corpus_head_gets_the_same_answer_and_upstream_head_on_both_paths() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/h1/requests");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 20, "the corpus is in {}", dir.display());
    // One upstream pair behind both proxies, so the heads it gets can be compared byte
    // for byte (the requests go one after the other).
    let (primary, replica) = (recorder(OK_ANSWER).await, recorder(OK_ANSWER).await);
    let config = config_text(primary.addr, replica.addr, "delay = \"0s\"", "");
    let lean = proxy_with(&config, true).await;
    let full = proxy_with(&config, false).await;
    let mut lean_taken = 0;
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        // The corpus names its bucket `b`; this proxy serves another.
        let head = replace(&std::fs::read(file).unwrap(), b" /b/", format!(" /{PB}/").as_bytes());
        let quiet = Duration::from_millis(if name.starts_with("partial-") { 300 } else { 150 });
        let mut seen = Vec::new();
        let mut heard = Vec::new();
        for proxy in [&lean, &full] {
            let before = primary.heads.lock().unwrap().len();
            seen.push(answers(&exchange(proxy.addr, &head, quiet).await));
            heard.push(primary.heads.lock().unwrap()[before..].to_vec());
        }
        assert_eq!(seen[0], seen[1], "{name}: the two paths answered differently");
        assert_eq!(heard[0], heard[1], "{name}: the primary got different heads");
        if name.starts_with("lean-") {
            assert!(heard[0].len() <= 1, "{name}: a lean head reached the primary more than once");
            lean_taken += heard[0].len();
        }
    }
    assert!(lean_taken >= 5, "only {lean_taken} lean heads of the corpus reached the primary");
}

#[tokio::test]
async fn bodies_cut_short_by_the_upstream_never_look_complete() {
    // Copied (short), spliced (long) and chunked bodies, each broken off by the upstream.
    let mut long = b"HTTP/1.1 200 OK\r\ncontent-length: 4194304\r\n\r\n".to_vec();
    long.extend(std::iter::repeat_n(b'x', 300 * 1024));
    let cases: Vec<(&str, Bytes)> = vec![
        ("short", Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-length: 20000\r\n\r\nonly this much")),
        ("long", Bytes::from(long)),
        (
            "chunked",
            Bytes::from_static(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nbrok"),
        ),
    ];
    for (name, answer) in cases {
        let primary = raw_upstream(answer, Then::Close).await;
        let replica = status_server(404).await;
        let proxy = start_proxy(&with_admin(&config_text(primary.addr, replica.addr, "", ""))).await;
        let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        let body = resp.bytes().await;
        assert!(body.is_err(), "{name}: a broken body was delivered as complete: {:?}", body.map(|b| b.len()));
        let admin = proxy.admin_addr.unwrap();
        let series = "mediaroute_requests_total{upstream=\"primary\",reason=\"mode-no\",status_class=\"5xx\"}";
        metric_reaches(admin, series, 1.0).await;
    }
}

#[tokio::test]
async fn a_stalled_body_is_cut_after_the_idle_time() {
    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 10485760\r\n\r\n".to_vec();
    answer.extend(std::iter::repeat_n(b'y', 200 * 1024));
    let primary = raw_upstream(answer, Then::HoldOpen).await;
    let replica = status_server(404).await;
    let tail = "[limits]\nidle_timeout = \"400ms\"";
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "", tail)).await;
    let started = Instant::now();
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    let body = resp.bytes().await;
    let took = started.elapsed();
    assert!(body.is_err(), "a stalled body was delivered as complete");
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(5), "{took:?}");
}

/// A hyper upstream serving `len` pattern bytes per GET; counts its connections.
async fn pattern_upstream(len: u64) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&connections);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    let alive = Arc::new(AtomicUsize::new(0));
                    let mut resp = http::Response::new(pattern_body(len, alive));
                    resp.headers_mut().insert(http::header::CONTENT_LENGTH, len.into());
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, connections, task)
}

#[tokio::test]
async fn spliced_downloads_arrive_intact_and_reuse_their_upstream_connection() {
    let len = 3 * 1024 * 1024 + 17;
    let (addr, connections, _task) = pattern_upstream(len).await;
    let replica = status_server(404).await;
    let proxy = start_proxy(&config_text(addr, replica.addr, "", "")).await;
    let http = client();
    for round in 0..3 {
        let resp = http.get(format!("http://{}{}", proxy.addr, obj("big.mov"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.content_length(), Some(len));
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len() as u64, len, "round {round}");
        let wrong = body.iter().enumerate().position(|(i, b)| *b != pattern_byte(i as u64));
        assert_eq!(wrong, None, "round {round}: byte {wrong:?} differs");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1, "the upstream connection was not reused");
}

#[tokio::test]
async fn an_upstream_that_sends_past_its_body_is_not_reused() {
    let primary = raw_upstream(&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"[..], Then::HoldOpen).await;
    let replica = status_server(404).await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "", "")).await;
    for _ in 0..2 {
        let a = get_via(proxy.addr, &obj("a.mov"), "carol").await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    }
    assert_eq!(primary.hits.load(Ordering::SeqCst), 2, "a connection with stray bytes was reused");
}

#[tokio::test]
async fn close_delimited_chunked_and_interim_answers_reach_the_client_whole() {
    let cases: [(&[u8], &str); 3] = [
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", "until the end"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6;ext=1\r\nchunks\r\n5\r\n here\r\n0\r\nx-trailer: t\r\n\r\n", "chunks here"),
        (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal", "final"),
    ];
    for (answer, want) in cases {
        let primary = raw_upstream(answer, Then::Close).await;
        let replica = status_server(404).await;
        let proxy = start_proxy(&with_admin(&config_text(primary.addr, replica.addr, "", ""))).await;
        let a = get_via(proxy.addr, &obj("a.mov"), "carol").await;
        assert_eq!((a.status, a.body.as_str()), (200, want));
        // And it is counted whole: trailers, the last frame of a chunked body, end it.
        let series = "mediaroute_requests_total{upstream=\"primary\",reason=\"mode-no\",status_class=\"2xx\"}";
        let m = metric_reaches(proxy.admin_addr.unwrap(), series, 1.0).await;
        let closed =
            "mediaroute_requests_total{upstream=\"primary\",reason=\"mode-no\",status_class=\"client-closed\"}";
        assert_eq!(metric(&m, closed), 0.0, "{want}: {m}");
    }
}

#[tokio::test]
async fn a_connection_goes_to_hyper_at_the_first_request_the_lean_path_does_not_take() {
    let primary = echo_server().await;
    let replica = status_server(404).await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "", "")).await;
    let (get, put) = (obj("a.mov"), obj("b.mov"));
    // Two GETs and a PUT pipelined in one write, then a HEAD.
    let pipelined = format!(
        "GET {get} HTTP/1.1\r\nhost: x\r\n\r\nGET {get}?n=2 HTTP/1.1\r\nhost: x\r\n\r\n\
         PUT {put} HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabcHEAD {get} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    );
    let got = exchange(proxy.addr, pipelined.as_bytes(), Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&got);
    let statuses: Vec<&str> = text.matches("HTTP/1.1 200 OK").collect();
    assert_eq!(statuses.len(), 4, "{text}");
    let order: Vec<usize> = [format!("GET {get}\n"), format!("GET {get}?n=2\n"), format!("PUT {put}\n")]
        .iter()
        .map(|m| text.find(m.as_str()).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "answers out of order: {text}");
    assert!(text.contains("body-bytes: 3"), "{text}");
}

#[tokio::test]
async fn head_answers_keep_their_length_and_send_no_body() {
    let primary =
        raw_upstream(&b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\netag: \"e\"\r\n\r\n"[..], Then::HoldOpen).await;
    let replica = status_server(404).await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "", "")).await;
    let head = format!("HEAD {} HTTP/1.1\r\nhost: x\r\n\r\n", obj("a.mov"));
    let got = exchange(proxy.addr, head.as_bytes(), Duration::from_millis(300)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 1234\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "a body followed the answer to HEAD: {text}");
}

#[tokio::test]
async fn idle_lean_connections_never_make_other_requests_wait_for_the_cap() {
    // Both pools live under one cap: two downloads leave two idle lean connections, and
    // an upload (hyper's pool) must still get a connection at once.
    let primary = echo_server().await;
    let replica = status_server(404).await;
    let tail = "[limits]\nmax_upstream_connections = 2\nupstream_queue_timeout = \"1s\"";
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "", tail)).await;
    let (first, second) = (obj("a.mov"), obj("b.mov"));
    let (a, b) = tokio::join!(get_via(proxy.addr, &first, "carol"), get_via(proxy.addr, &second, "carol"));
    assert_eq!((a.status, b.status), (200, 200));
    let started = Instant::now();
    let put = client().put(format!("http://{}{}", proxy.addr, obj("c.mov"))).body("abc").send().await.unwrap();
    assert_eq!(put.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(900), "the upload waited {:?}", started.elapsed());
}

#[tokio::test]
async fn a_client_that_leaves_a_silent_upstream_is_not_an_upstream_failure() {
    let primary = raw_upstream(&b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nabc"[..], Then::HoldOpen).await;
    let replica = status_server(404).await;
    let tail = "[limits]\nidle_timeout = \"1s\"\n[health]\nfall = 1\ninterval = \"1h\"";
    let proxy = start_proxy(&with_admin(&config_text(primary.addr, replica.addr, "", tail))).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("GET {} HTTP/1.1\r\nhost: x\r\n\r\n", obj("a.mov"));
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(conn);
    let admin = proxy.admin_addr.unwrap();
    let series = "mediaroute_requests_total{upstream=\"primary\",reason=\"mode-no\",status_class=\"client-closed\"}";
    metric_reaches(admin, series, 1.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"), 1.0, "{m}");
}

/// Copied (not spliced) bodies to a client that reads late: 100 pipelined answers of
/// 60,000 bytes (6 MB, more than the proxy's socket takes: at most 4 MiB here) go out in
/// partial writes and arrive byte-exact, one after the other.
#[tokio::test]
async fn copied_bodies_reach_a_late_reader_whole_through_partial_writes() {
    const ANSWERS: usize = 100;
    let len: u64 = 60_000;
    let (addr, _connections, _task) = pattern_upstream(len).await;
    let replica = status_server(404).await;
    let proxy = start_proxy(&config_text(addr, replica.addr, "", "")).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(proxy.addr).await.unwrap();
    let get = format!("GET {} HTTP/1.1\r\nhost: x\r\n\r\n", obj("shot.mov"));
    conn.write_all(get.repeat(ANSWERS).as_bytes()).await.unwrap();
    // Nothing read for a while: the proxy's socket fills and its writes come back partial.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    let mut chunk = [0u8; 16384];
    while got.len() < ANSWERS * len as usize || find(&got[got.len() - len as usize..], b"\r\n\r\n").is_some() {
        match tokio::time::timeout(Duration::from_millis(500), conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => panic!("{e}"),
        }
    }
    let mut rest = &got[..];
    for answer in 0..ANSWERS {
        let end = find(rest, b"\r\n\r\n").unwrap_or_else(|| panic!("answer {answer}: no head")) + 4;
        let head = String::from_utf8_lossy(&rest[..end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "answer {answer}: {head}");
        assert!(head.contains(&format!("content-length: {len}\r\n")), "answer {answer}: {head}");
        let body = &rest[end..];
        assert!(body.len() >= len as usize, "answer {answer}: {} of {len} bytes", body.len());
        let wrong = body[..len as usize].iter().enumerate().position(|(i, b)| *b != pattern_byte(i as u64));
        assert_eq!(wrong, None, "answer {answer}: byte {wrong:?} differs");
        rest = &body[len as usize..];
    }
    assert!(rest.is_empty(), "{} bytes after the last answer", rest.len());
}
