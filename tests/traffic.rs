//! Real traffic, at real durations scaled down by configuration: bucket-bound upstreams,
//! long uploads, failing replicas, waiting connections, client hang-ups, early signals,
//! what reloads and writes do to learned ages, and metrics from the first moment.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use mediaroute::demo::store::{self, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OLD: Duration = Duration::from_secs(86_400);
const MB: u64 = 1_000_000;

/// A config with no `bucket` on either upstream: each serves one bucket, the path is the key.
fn bucket_bound(primary: SocketAddr, replica: SocketAddr, replication: &str, tail: &str) -> String {
    config_text(primary, replica, replication, tail)
        .replace(&format!("bucket = \"{PB}\"\n"), "")
        .replace(&format!("bucket = \"{RB}\"\n"), "")
}

#[tokio::test]
async fn bucket_bound_upstreams_serve_keys_from_the_replica() {
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    let replica = store::serve(loopback0(), Store::new("r")).await.unwrap();
    let at = SystemTime::now() - OLD;
    for (path, body) in [("/old.mov", "old"), ("/shots/sh010/plate.exr", "plate")] {
        primary.store.put(path, format!("primary:{body}"), at);
        replica.store.put(path, format!("replica:{body}"), at);
    }
    let proxy = start_proxy(&bucket_bound(primary.addr, replica.addr, "delay = \"15m\"", "")).await;
    let a = get_via(proxy.addr, "/old.mov", "alice").await;
    assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "replica", "replica:old"));
    let a = get_via(proxy.addr, "/shots/sh010/plate.exr", "alice").await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("replica", "replica:plate"), "paths pass unchanged");
    // The bucket itself and sub-resources address no object.
    assert_eq!(get_via(proxy.addr, "/", "alice").await.reason, "not-object");
    assert_eq!(get_via(proxy.addr, "/old.mov?tagging", "alice").await.reason, "not-object");
    assert_eq!(get_via(proxy.addr, "/old.mov", "carol").await.body, "primary:old");
    // Dot segments are still refused (raw: an HTTP client would remove them itself).
    let hits = primary.store.hits() + replica.store.hits();
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /x/../old.mov HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(primary.store.hits() + replica.store.hits(), hits, "the refused request reached no upstream");
}

#[test]
fn explain_shows_the_addressing_it_assumed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.toml");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mediaroute")).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let a: SocketAddr = "127.0.0.1:9001".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:9002".parse().unwrap();
    std::fs::write(&path, bucket_bound(a, b, "delay = \"15m\"", "")).unwrap();
    let cfg = path.to_str().unwrap();
    let out = run(&["explain", "--config", cfg, "--user", "alice", "--ip", OUTSIDE, "--path", "/old.mov"]);
    assert!(out.starts_with("upstream: replica\nreason:   replica\n"), "{out}");
    assert!(out.contains("address:  bucket-bound"), "{out}");
    std::fs::write(&path, config_text(a, b, "delay = \"15m\"", "")).unwrap();
    let out = run(&["explain", "--config", cfg, "--user", "alice", "--ip", OUTSIDE, "--path", "/old.mov"]);
    assert!(out.starts_with("refused:  403"), "the same path is a foreign bucket path-style: {out}");
    assert!(out.contains(&format!("address:  path-style: /{PB}/{{key}}; the replica gets /{RB}/{{key}}")), "{out}");
    // explain and the server share admission: dot segments are refused in both.
    let out = run(&["explain", "--config", cfg, "--ip", OUTSIDE, "--path", &format!("/{PB}/x/../y")]);
    assert!(out.starts_with("refused:  400"), "{out}");
}

/// A body of `len` pattern bytes sent in 64 KiB chunks, `pause` apart.
fn paced_body(len: u64, pause: Duration) -> reqwest::Body {
    const CHUNK: u64 = 64 * 1024;
    let stream = futures_util::stream::unfold(0u64, move |off| async move {
        if off >= len {
            return None;
        }
        tokio::time::sleep(pause).await;
        let n = CHUNK.min(len - off);
        let chunk: Vec<u8> = (off..off + n).map(pattern_byte).collect();
        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), off + n))
    });
    reqwest::Body::wrap_stream(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_outlasts_the_header_timeout() {
    // 20 MB at ~2 MB/s: ten times the header timeout, and every byte must arrive.
    let tail = "[limits]\nupstream_header_timeout = \"1s\"\nupstream_connect_timeout = \"500ms\"\n[health]\nfall = 1";
    let s = Setup::with_config(|p, r| with_admin(&config_text(p, r, "delay = \"15m\"", tail))).await;
    let len = 20 * MB;
    let started = Instant::now();
    let resp = s
        .client
        .put(s.url(&obj("renders/long.exr")))
        .header("content-length", len.to_string())
        .body(paced_body(len, Duration::from_millis(31)))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap_or_default());
    assert!(took > Duration::from_secs(5), "the upload was meant to be slow: {took:?}");
    let stored = s.primary.store.get(&obj("renders/long.exr")).expect("the primary has the object").body;
    assert_eq!(stored.len() as u64, len);
    assert!(stored.iter().enumerate().all(|(i, b)| *b == pattern_byte(i as u64)), "bytes differ");
    let (_, m) = admin_get(s.proxy.admin_addr.unwrap(), "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"), 1.0, "not a health failure");
}

#[tokio::test]
async fn an_upload_that_stops_is_the_clients_fault() {
    let tail = "[limits]\nbody_timeout = \"500ms\"\n[health]\nfall = 1";
    let s = Setup::with_config(|p, r| with_admin(&config_text(p, r, "delay = \"15m\"", tail))).await;
    let mut conn = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let head = format!("PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789", obj("stuck.mov"));
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("<Code>RequestTimeout</Code>"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(400), "limited by progress, not sooner");
    let (_, m) = admin_get(s.proxy.admin_addr.unwrap(), "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"), 1.0, "the client's fault: {m}");
    assert!(s.primary.store.get(&obj("stuck.mov")).is_none(), "nothing half-written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_an_upload_is_a_504() {
    // Accepts connections and never reads from them.
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let deaf = listener.local_addr().unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    let accept = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            keep.lock().unwrap().push(conn);
        }
    });
    let replica = status_server(200).await;
    let tail = "[limits]\nbody_timeout = \"500ms\"";
    let proxy = start_proxy(&config_text(deaf, replica.addr, "delay = \"15m\"", tail)).await;
    // Far more than the socket buffers hold, so the upload must stall at the upstream.
    let len = 256 * MB;
    let resp = client()
        .put(format!("http://{}{}", proxy.addr, obj("big.exr")))
        .header("content-length", len.to_string())
        .body(paced_body(len, Duration::ZERO))
        .send()
        .await;
    match resp {
        Ok(r) => {
            assert_eq!(r.status(), 504);
            assert_eq!(r.headers()["x-mediaroute-upstream"], "primary");
        }
        // The proxy may answer and close before the client has finished sending.
        Err(e) => panic!("expected a 504 answer, got {e}"),
    }
    accept.abort();
}

/// A server answering every request with the status in `status`, and its name as the body.
async fn switchable_server(status: Arc<AtomicU16>, name: &'static str) -> TestServer {
    serve_fn(loopback0(), move |_req| {
        let status = Arc::clone(&status);
        async move {
            let mut r = http::Response::new(full(name));
            *r.status_mut() = http::StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
            r
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answering_5xx_is_marked_down_under_traffic_and_stays_down() {
    for failing in [503, 500] {
        let status = Arc::new(AtomicU16::new(failing));
        let replica = switchable_server(Arc::clone(&status), "replica").await;
        let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
        primary.store.put(&obj("a.mov"), "primary", SystemTime::now() - OLD);
        let tail = "[health]\ninterval = \"300ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2";
        let proxy = start_proxy(&with_admin(&config_text(primary.addr, replica.addr, "delay = \"0s\"", tail))).await;
        let mut reasons = Vec::new();
        for _ in 0..100 {
            let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
            assert_eq!((a.status, a.body.as_str()), (200, "primary"));
            reasons.push(a.reason);
        }
        let fallbacks = reasons.iter().filter(|r| *r == "fallback").count();
        assert!(fallbacks <= 3, "replica {failing}: kept being tried: {fallbacks} fallbacks");
        assert!(reasons[5..].iter().all(|r| r == "replica-down"), "replica {failing}: {reasons:?}");
        // Longer than `rise` check intervals: the checks agree that it is down (no flapping).
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(get_via(proxy.addr, &obj("a.mov"), "alice").await.reason, "replica-down", "replica {failing}");
        let (_, m) = admin_get(proxy.admin_addr.unwrap(), "/metrics").await;
        assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"replica\"}"), 0.0);
        assert_eq!(metric(&m, "mediaroute_fallbacks_total{cause=\"error\"}"), fallbacks as f64, "{m}");

        // The replica recovers: active checks bring it back.
        status.store(200, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
            if a.reason == "replica" {
                assert_eq!(a.body, "replica");
                break;
            }
            assert!(Instant::now() < deadline, "replica {failing}: not used again: {}", a.reason);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn a_replica_that_breaks_downloads_off_is_marked_down() {
    // Promises 1 MiB, sends 10 bytes, then drops the connection: every time.
    let raw_replica =
        raw_upstream(&b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n0123456789"[..], Then::Close).await;
    let replica_addr = raw_replica.addr;
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    primary.store.put(&obj("a.mov"), "primary", SystemTime::now() - OLD);
    let tail = "[health]\nfall = 2";
    let proxy = start_proxy(&with_admin(&config_text(primary.addr, replica_addr, "delay = \"0s\"", tail))).await;
    for _ in 0..2 {
        let resp = client()
            .get(format!("http://{}{}", proxy.addr, obj("a.mov")))
            .header("x-forwarded-user", "alice")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-mediaroute-upstream"], "replica");
        assert!(resp.bytes().await.is_err(), "a broken download never looks complete");
    }
    // The failure is recorded when the broken body is dropped.
    let m = metric_reaches(
        proxy.admin_addr.unwrap(),
        "mediaroute_requests_total{upstream=\"replica\",reason=\"replica\",status_class=\"5xx\"}",
        2.0,
    )
    .await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"replica\"}"), 0.0, "{m}");
    let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("replica-down", "primary"));
}

#[tokio::test]
async fn an_http_1_0_upstream_answer_reaches_the_client_as_http_1_1() {
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let old_addr = listener.local_addr().unwrap();
    let old_server = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        }
    });
    let proxy = start_proxy(&config_text(old_addr, old_addr, "delay = \"0s\"", "")).await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!("GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", obj("a.mov"));
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    old_server.abort();
}

/// An upstream holding one object: it answers GET/HEAD with it, and a PUT by replacing
/// it `commit_after` after the body has arrived (a slow commit, like a large multipart
/// completion), whatever became of the client.
async fn slow_commit_server(commit_after: Duration) -> TestServer {
    let object = Arc::new(std::sync::Mutex::new(("take 1 on the primary".to_string(), SystemTime::now() - OLD)));
    serve_fn(loopback0(), move |req: http::Request<hyper::body::Incoming>| {
        let object = Arc::clone(&object);
        async move {
            if req.method() == http::Method::PUT {
                let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                tokio::time::sleep(commit_after).await;
                *object.lock().unwrap() = (String::from_utf8_lossy(&body).into_owned(), SystemTime::now());
                return http::Response::new(full(""));
            }
            let (body, at) = object.lock().unwrap().clone();
            let mut r =
                http::Response::new(full(if req.method() == http::Method::HEAD { String::new() } else { body }));
            r.headers_mut().insert("last-modified", httpdate::fmt_http_date(at).parse().unwrap());
            r
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_client_gave_up_on_still_drops_the_learned_age() {
    let primary = slow_commit_server(Duration::from_millis(800)).await;
    let replica = store::serve(loopback0(), Store::new("r")).await.unwrap();
    replica.store.put(&format!("/{RB}/take.mov"), "take 1 on the replica", SystemTime::now() - OLD);
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"15m\"", "")).await;
    let a = get_via(proxy.addr, &obj("take.mov"), "alice").await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("replica", "take 1 on the replica"));
    // The client gives up before the primary commits; the primary commits anyway.
    let put = client()
        .put(format!("http://{}{}", proxy.addr, obj("take.mov")))
        .timeout(Duration::from_millis(300))
        .body("take 2")
        .send()
        .await;
    assert!(put.is_err(), "the client was meant to give up: {put:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let a = get_via(proxy.addr, &obj("take.mov"), "alice").await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("too-young", "take 2"), "the old replica copy was served");
}

/// A server that reads requests and answers after `delay`.
async fn slow_answer(delay: Duration, body: &'static str) -> TestServer {
    serve_fn(loopback0(), move |_req| async move {
        tokio::time::sleep(delay).await;
        http::Response::new(full(body))
    })
    .await
}

#[tokio::test]
async fn a_connection_waiting_on_upstreams_is_not_idle() {
    // The replica never answers in time, the primary takes a while: together far past
    // the idle timeout, and the client still gets its fallback.
    let replica = slow_answer(Duration::from_secs(3600), "replica").await;
    let primary = slow_answer(Duration::from_millis(600), "primary").await;
    let tail =
        "[limits]\nidle_timeout = \"300ms\"\nupstream_header_timeout = \"800ms\"\nupstream_connect_timeout = \"200ms\"";
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", tail)).await;
    let started = Instant::now();
    let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
    assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "fallback", "primary"));
    assert!(started.elapsed() >= Duration::from_millis(1300), "{:?}", started.elapsed());
    // A connection with nothing in flight is still closed after the idle timeout.
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "idle connection left open: {closed:?}");
}

/// The last access-log line containing `needle`, waiting for it to appear.
async fn access_line(proxy: &ProxyProcess, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(l) = proxy.log_lines("mediaroute::access").into_iter().rev().find(|l| l.contains(needle)) {
            return l;
        }
        assert!(Instant::now() < deadline, "no access line with {needle}: {:?}", proxy.log_lines(""));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hang_ups_are_counted_as_the_clients() {
    let primary = slow_answer(Duration::from_millis(800), "primary").await;
    let replica = status_server(200).await;
    let tail = "[health]\nfall = 1";
    let proxy = ProxyProcess::spawn(&with_admin(&config_text(primary.addr, replica.addr, "delay = \"15m\"", tail)));

    // An upload abandoned half way.
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n", obj("abandoned.mov"));
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&vec![7u8; 1_000_000]).await.unwrap();
    drop(conn);
    let line = access_line(&proxy, "abandoned.mov").await;
    assert!(line.contains("status=499") && line.contains("bytes=0") && line.contains("complete=false"), "{line}");

    // A download whose client leaves before the primary answers.
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("GET {} HTTP/1.1\r\nHost: x\r\nX-Forwarded-User: carol\r\n\r\n", obj("left.mov"));
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(conn);
    let line = access_line(&proxy, "left.mov").await;
    assert!(line.contains("status=499") && line.contains("reason=\"mode-no\""), "{line}");

    let (_, m) = admin_get(proxy.admin.unwrap(), "/metrics").await;
    let series = |labels: &str| metric(&m, &format!("mediaroute_requests_total{{{labels}}}"));
    assert_eq!(series("upstream=\"primary\",reason=\"write\",status_class=\"client-closed\""), 1.0, "{m}");
    assert_eq!(series("upstream=\"primary\",reason=\"mode-no\",status_class=\"client-closed\""), 1.0, "{m}");
    assert_eq!(series("upstream=\"primary\",reason=\"write\",status_class=\"5xx\""), 0.0);
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"), 1.0, "never a health failure");
    assert!(proxy.log_lines("upstream request failed").is_empty(), "no warning for a client's hang-up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_clients_half_close_at_once_are_each_logged_as_499() {
    // The client sends its request and shuts its sending side at once: the server may see
    // the end of the stream before it has started on the request. Each is still logged.
    let primary = slow_answer(Duration::from_millis(800), "primary").await;
    let replica = status_server(200).await;
    let proxy = ProxyProcess::spawn(&with_admin(&config_text(primary.addr, replica.addr, "delay = \"15m\"", "")));
    for i in 0..8 {
        let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head =
            format!("GET {} HTTP/1.1\r\nHost: x\r\nX-Forwarded-User: carol\r\n\r\n", obj(&format!("half-{i}.mov")));
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    }
    for i in 0..8 {
        let line = access_line(&proxy, &format!("half-{i}.mov")).await;
        assert!(line.contains("status=499") && line.contains("complete=false"), "{line}");
    }
    let (_, m) = admin_get(proxy.admin.unwrap(), "/metrics").await;
    let closed =
        metric(&m, "mediaroute_requests_total{upstream=\"primary\",reason=\"mode-no\",status_class=\"client-closed\"}");
    assert_eq!(closed, 8.0, "{m}");
}

#[test]
fn a_sighup_right_after_listening_reloads_and_never_kills() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.toml");
    let closed: SocketAddr = "127.0.0.1:9".parse().unwrap();
    std::fs::write(&path, config_text(closed, closed, "delay = \"15m\"", "")).unwrap();
    let survivors = Arc::new(AtomicUsize::new(0));
    // Ten at a time, fifty in all: each gets SIGHUP the moment it logs "listening".
    for _ in 0..5 {
        let batch: Vec<_> = (0..10)
            .map(|_| {
                let path = path.clone();
                let survivors = Arc::clone(&survivors);
                std::thread::spawn(move || {
                    let mut child = run_command(&[], &path).spawn().unwrap();
                    let pid = child.id().to_string();
                    let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
                    let mut reloaded = false;
                    for line in lines.map_while(Result::ok) {
                        if line.contains("listening") && !line.contains("admin") {
                            let _ = std::process::Command::new("kill").args(["-HUP", &pid]).status();
                        }
                        if line.contains("configuration reloaded") {
                            reloaded = true;
                            break;
                        }
                    }
                    let alive = matches!(child.try_wait(), Ok(None));
                    let _ = child.kill();
                    let _ = child.wait();
                    if reloaded && alive {
                        survivors.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in batch {
            t.join().unwrap();
        }
    }
    assert_eq!(survivors.load(Ordering::SeqCst), 50, "every process survives its early SIGHUP and reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_learned_ages_unless_the_primary_moved() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("clip.mov", true, OLD);
    let other = store::serve(loopback0(), Store::new("other")).await.unwrap();
    other.store.put(&obj("clip.mov"), "other:clip.mov", SystemTime::now() - OLD);
    let text = |primary: SocketAddr, dave: &str| {
        with_admin(&config_text(primary, s.replica.addr, "delay = \"15m\"", ""))
            .replace("carol = \"no\"", &format!("carol = \"no\"\ndave = \"{dave}\""))
    };
    let proxy = ProxyProcess::spawn(&text(s.primary.addr, "no"));
    let admin = proxy.admin.unwrap();
    let probes =
        || async move { metric(&admin_get(admin, "/metrics").await.1, "mediaroute_probes_total{result=\"ok\"}") };
    let reloads = || async move { metric(&admin_get(admin, "/metrics").await.1, "mediaroute_config_generation") };
    for _ in 0..2 {
        assert_eq!(get_via(proxy.addr, &obj("clip.mov"), "alice").await.reason, "replica");
    }
    assert_eq!(probes().await, 1.0);
    // A reload that changes only users keeps what was learned.
    proxy.rewrite_config(&text(s.primary.addr, "yes"));
    proxy.signal("HUP");
    wait_generation(&reloads, 2.0).await;
    assert_eq!(get_via(proxy.addr, &obj("clip.mov"), "dave").await.reason, "replica");
    assert_eq!(probes().await, 1.0, "no probe burst after a reload");
    // Another version is another object.
    assert_eq!(get_via(proxy.addr, &format!("{}?versionId=v1", obj("clip.mov")), "alice").await.reason, "replica");
    assert_eq!(probes().await, 2.0);
    // A new primary: everything learned is forgotten.
    proxy.rewrite_config(&text(other.addr, "yes"));
    proxy.signal("HUP");
    wait_generation(&reloads, 3.0).await;
    assert_eq!(get_via(proxy.addr, &obj("clip.mov"), "alice").await.reason, "replica");
    assert_eq!(probes().await, 3.0);
}

async fn wait_generation<F, Fut>(generation: &F, want: f64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while generation().await < want {
        assert!(Instant::now() < deadline, "reload {want} not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn writes_through_the_proxy_drop_what_was_learned_of_the_key() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("take.mov", true, OLD);
    let a = s.get_as(&obj("take.mov"), Some("alice"), None).await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("replica", "replica:take.mov"));
    // Overwritten through the proxy: the next read must not be the replica's old bytes.
    let put = s.client.put(s.url(&obj("take.mov"))).body("take 2").send().await.unwrap();
    assert_eq!(put.status(), 200);
    let a = s.get_as(&obj("take.mov"), Some("alice"), None).await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("too-young", "take 2"));
    // Deleted through the proxy: the replica's copy is not served.
    s.media("gone.mov", true, OLD);
    assert_eq!(s.get_as(&obj("gone.mov"), Some("alice"), None).await.reason, "replica");
    let del = s.client.delete(s.url(&obj("gone.mov"))).send().await.unwrap();
    assert_eq!(del.status(), 204);
    let a = s.get_as(&obj("gone.mov"), Some("alice"), None).await;
    assert_eq!((a.status, a.reason.as_str()), (404, "too-young"));
}

#[tokio::test]
async fn every_metric_family_is_there_before_the_first_request() {
    let s = Setup::with_config(|p, r| with_admin(&config_text(p, r, "delay = \"15m\"", ""))).await;
    let (_, m) = admin_get(s.proxy.admin_addr.unwrap(), "/metrics").await;
    for series in [
        "mediaroute_requests_total{upstream=\"replica\",reason=\"replica\",status_class=\"2xx\"} 0",
        "mediaroute_requests_total{upstream=\"primary\",reason=\"fallback\",status_class=\"2xx\"} 0",
        "mediaroute_requests_total{upstream=\"primary\",reason=\"write\",status_class=\"client-closed\"} 0",
        "mediaroute_response_bytes_total{upstream=\"replica\"} 0",
        "mediaroute_upstream_duration_seconds_count{upstream=\"primary\"} 0",
        "mediaroute_fallbacks_total{cause=\"not-found\"} 0",
        "mediaroute_replica_misses_total 0",
        "mediaroute_probes_total{result=\"ok\"} 0",
        "mediaroute_replication_lag_seconds_count 0",
        "mediaroute_config_reloads_total{result=\"error\"} 0",
        "mediaroute_config_generation 1",
        "mediaroute_upstream_up{upstream=\"replica\"} 1",
    ] {
        assert!(m.contains(series), "missing {series:?} in\n{m}");
    }
}

#[tokio::test]
async fn the_demo_moves_off_ports_that_are_taken() {
    // Hold four ports, then ask the demo for exactly those.
    let held: Vec<tokio::net::TcpListener> =
        futures_util::future::join_all((0..4).map(|_| tokio::net::TcpListener::bind(loopback0())))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let addrs: Vec<String> = held.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let text = mediaroute::demo::EXAMPLE_CONFIG
        .replace("127.0.0.1:8080", &addrs[0])
        .replace("127.0.0.1:9001", &addrs[1])
        .replace("127.0.0.1:9002", &addrs[2])
        .replace("127.0.0.1:9090", &addrs[3]);
    let cfg = mediaroute::config::parse(std::path::Path::new("demo.toml"), &text, &|_| {
        Ok(mediaroute::demo::EXAMPLE_USERS.to_string())
    })
    .unwrap();
    let demo = mediaroute::demo::start(cfg).await.expect("the demo starts on a busy machine");
    assert_eq!(demo.moved.len(), 4, "{:?}", demo.moved);
    for (taken, name) in addrs.iter().zip(["proxy", "primary", "replica", "admin"]) {
        let port = taken.rsplit(':').next().unwrap();
        assert!(demo.moved.iter().any(|m| m.starts_with(&format!("{name}: port {port} is taken"))), "{:?}", demo.moved);
    }
    assert!(!addrs.contains(&demo.proxy.addr.to_string()));
    let tour = demo.tour().await;
    assert!(tour.contains("200 from replica (reason replica)"), "{tour}");
    drop(held);
}

#[tokio::test]
async fn a_busy_flag_is_dropped_even_when_the_request_fails() {
    // After a refused request the connection is idle again and is closed in time.
    let s = Setup::with_tail("delay = \"15m\"", "[limits]\nidle_timeout = \"300ms\"").await;
    let mut conn = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    conn.write_all(b"GET /elsewhere/a.mov HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 403"));
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

#[tokio::test]
async fn a_client_that_gives_up_does_not_count_for_the_upstream() {
    // A replica that never answers: three timeouts in a row mark it down, and a client
    // that gives up in between does not break the run.
    let replica = slow_answer(Duration::from_secs(3600), "replica").await;
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    primary.store.put(&obj("a.mov"), "primary", SystemTime::now() - OLD);
    let tail =
        "[limits]\nupstream_header_timeout = \"400ms\"\nupstream_connect_timeout = \"100ms\"\n[health]\nfall = 3";
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", tail)).await;
    let path = obj("a.mov");
    let get = || get_via(proxy.addr, &path, "alice");
    for _ in 0..2 {
        assert_eq!(get().await.reason, "fallback");
    }
    let gave_up = client()
        .get(format!("http://{}{}", proxy.addr, obj("a.mov")))
        .header("x-forwarded-user", "alice")
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(gave_up.is_err());
    assert_eq!(get().await.reason, "fallback");
    assert_eq!(get().await.reason, "replica-down", "the third timeout in a row marks it down");
}

#[tokio::test]
async fn a_replica_that_stalls_mid_body_is_marked_down() {
    // Sends its head and 1000 bytes of a 1 MiB body, then nothing, and keeps the connection.
    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n".to_vec();
    answer.extend_from_slice(&[7u8; 1000]);
    let stalling = raw_upstream(answer, Then::HoldOpen).await;
    let replica_addr = stalling.addr;
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    primary.store.put(&obj("a.mov"), "primary", SystemTime::now() - OLD);
    let tail = "[limits]\nidle_timeout = \"400ms\"\n[health]\nfall = 2";
    let proxy = start_proxy(&with_admin(&config_text(primary.addr, replica_addr, "delay = \"0s\"", tail))).await;
    for _ in 0..2 {
        let resp = client()
            .get(format!("http://{}{}", proxy.addr, obj("a.mov")))
            .header("x-forwarded-user", "alice")
            .send()
            .await
            .unwrap();
        assert!(resp.bytes().await.is_err(), "a stalled download never looks complete");
    }
    // The failure is recorded when the broken body is dropped.
    let m = metric_reaches(
        proxy.admin_addr.unwrap(),
        "mediaroute_requests_total{upstream=\"replica\",reason=\"replica\",status_class=\"5xx\"}",
        2.0,
    )
    .await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"replica\"}"), 0.0, "{m}");
    let closed = "mediaroute_requests_total{upstream=\"replica\",reason=\"replica\",status_class=\"client-closed\"}";
    assert_eq!(metric(&m, closed), 0.0, "not the client's doing");
    assert_eq!(get_via(proxy.addr, &obj("a.mov"), "alice").await.reason, "replica-down");
}

/// An upstream holding one object that answers a write at once, then streams its answer
/// for `commit_after` before committing the write and ending the answer, as S3 does
/// while it assembles a multipart upload.
async fn streaming_commit_server(commit_after: Duration) -> TestServer {
    let object = Arc::new(std::sync::Mutex::new(("part 1 on the primary".to_string(), SystemTime::now() - OLD)));
    serve_fn(loopback0(), move |req: http::Request<hyper::body::Incoming>| {
        let object = Arc::clone(&object);
        async move {
            if req.method() == http::Method::POST {
                let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                let new = String::from_utf8_lossy(&body).into_owned();
                let answer = futures_util::stream::unfold(0, move |step| {
                    let (object, new) = (Arc::clone(&object), new.clone());
                    async move {
                        match step {
                            0 => Some((Ok(hyper::body::Frame::data(Bytes::from_static(b" "))), 1)),
                            1 => {
                                tokio::time::sleep(commit_after).await;
                                *object.lock().unwrap() = (new, SystemTime::now());
                                Some((Ok(hyper::body::Frame::data(Bytes::from_static(b"<Done/>"))), 2))
                            }
                            _ => None::<(Result<_, std::convert::Infallible>, i32)>,
                        }
                    }
                });
                return http::Response::new(http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(answer)));
            }
            let (body, at) = object.lock().unwrap().clone();
            let mut r =
                http::Response::new(full(if req.method() == http::Method::HEAD { String::new() } else { body }));
            r.headers_mut().insert("last-modified", httpdate::fmt_http_date(at).parse().unwrap());
            r
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_learned_while_a_write_commits_is_not_kept() {
    for client_stays in [true, false] {
        let primary = streaming_commit_server(Duration::from_millis(700)).await;
        let replica = store::serve(loopback0(), Store::new("r")).await.unwrap();
        replica.store.put(&format!("/{RB}/mp.mov"), "part 1 on the replica", SystemTime::now() - OLD);
        let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"15m\"", "")).await;
        assert_eq!(get_via(proxy.addr, &obj("mp.mov"), "alice").await.reason, "replica");
        let url = format!("http://{}{}?uploadId=u1", proxy.addr, obj("mp.mov"));
        let completion = tokio::spawn(async move {
            let resp = client().post(url).body("take 2").send().await.unwrap();
            assert_eq!(resp.status(), 200);
            if client_stays {
                assert!(resp.text().await.unwrap().ends_with("<Done/>"));
            }
            // Otherwise the client leaves as soon as it has the head.
        });
        // Asked while the primary still has the old object: the answer must not stick.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(get_via(proxy.addr, &obj("mp.mov"), "alice").await.body, "part 1 on the replica");
        completion.await.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        let a = get_via(proxy.addr, &obj("mp.mov"), "alice").await;
        assert_eq!((a.reason.as_str(), a.body.as_str()), ("too-young", "take 2"), "client stays: {client_stays}");
    }
}
