//! Attacks and misbehaving peers: response framing, silent connections, stalled bodies,
//! forwarding headers, header counts, HTTP/2 fan-out and local resource limits.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OLD: Duration = Duration::from_secs(86_400);

/// Sends raw bytes and reads until the connection closes or `limit` passes.
async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, conn.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_response_is_framed_once_by_its_transfer_coding() {
    // Chunked, with a Content-Length that is shorter than the body: forwarding the length
    // would cut the body to 3 bytes that look complete.
    let upstream = raw_upstream(
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"[..],
        Then::HoldOpen,
    )
    .await;
    let proxy = start_proxy(&config_text(upstream.addr, upstream.addr, "delay = \"0s\"", "")).await;
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none(), "{:?}", resp.headers());
    assert_eq!(resp.text().await.unwrap(), "hello world");
}

#[tokio::test]
async fn a_101_to_a_plain_request_is_a_502() {
    let upstream = raw_upstream(
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"[..],
        Then::HoldOpen,
    )
    .await;
    let proxy = start_proxy(&config_text(upstream.addr, upstream.addr, "delay = \"0s\"", "")).await;
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("101"));
}

/// An upstream that records each request's raw head (as bytes reached it) and answers 200.
async fn capturing_upstream() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let keep = std::sync::Arc::clone(&keep);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = 0;
                while let Ok(n) = conn.read(&mut buf[got..]).await {
                    got += n;
                    if n == 0 || buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                keep.lock().unwrap().push(String::from_utf8_lossy(&buf[..got]).to_ascii_lowercase());
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn repeated_content_lengths_are_folded_or_refused() {
    let (upstream, seen) = capturing_upstream().await;
    let proxy = start_proxy(&config_text(upstream, upstream, "delay = \"0s\"", "")).await;
    // HTTP/2 lets a client repeat a header; identical lengths reach the upstream as one.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap();
    let resp = h2
        .put(format!("http://{}{}", proxy.addr, obj("a.mov")))
        .header("content-length", "3")
        .header("content-length", "3")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].matches("content-length: 3").count(), 1, "{}", heads[0]);
    // Different lengths for one body never reach the upstream.
    let answer = raw_exchange(
        proxy.addr,
        format!(
            "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
            obj("a.mov")
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn silent_connections_are_closed_at_the_header_timeout() {
    let tail = "[limits]\nheader_read_timeout = \"300ms\"\nmax_connections = 2";
    let s = Setup::with_tail("delay = \"15m\"", tail).await;
    s.media("a.mov", true, OLD);
    // Two connections that never send a byte hold both slots...
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap());
    }
    let started = Instant::now();
    // ...until the header timeout, counted from accept, closes them.
    for conn in &mut silent {
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a silent connection stayed open: {closed:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // A real client gets in.
    let a = s.get_as(&obj("a.mov"), Some("alice"), None).await;
    assert_eq!(a.status, 200);
    // The same holds for a client that sends only part of the HTTP/2 preface.
    let mut partial = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), partial.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

#[tokio::test]
async fn a_kept_alive_connection_that_sends_no_next_request_is_closed_at_the_header_timeout() {
    // Counted from the end of the previous answer, on both paths (README "Limits and
    // timeouts"); the idle timeout is far longer.
    let tail = "[limits]\nheader_read_timeout = \"500ms\"\nidle_timeout = \"10s\"";
    let s = Setup::with_tail("delay = \"15m\"", tail).await;
    s.media("a.mov", true, OLD);
    let mut conn = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let head = format!("GET {} HTTP/1.1\r\nHost: x\r\nX-Forwarded-User: alice\r\n\r\n", obj("a.mov"));
    conn.write_all(head.as_bytes()).await.unwrap();
    // Waits on the connection being idle, well past the header timeout: then the answer
    // is read and the connection must already be closed behind it.
    let mut got = Vec::new();
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "the kept-alive connection stayed open: {read:?}");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "closed after {took:?}");
}

#[tokio::test]
async fn a_moving_upload_is_never_ended_and_a_stopped_one_is() {
    // The upload pauses longer than the idle timeout but shorter than the body timeout:
    // only the body timeout governs an upload.
    let tail = "[limits]\nbody_timeout = \"1s\"\nidle_timeout = \"200ms\"";
    let s = Setup::with_tail("delay = \"15m\"", tail).await;
    let body = futures_util::stream::unfold(0u32, |n| async move {
        if n == 6 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")), n + 1))
    });
    let resp = s
        .client
        .put(s.url(&obj("trickle.mov")))
        .header("content-length", "6")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.primary.store.get(&obj("trickle.mov")).unwrap().body.len(), 6);
    // One that stops: ended after the body timeout with 408, not sooner.
    let started = Instant::now();
    let answer = raw_exchange(
        s.proxy.addr,
        format!("PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc", obj("stopped.mov")).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn forwarding_headers_are_ours_unless_a_trusted_proxy_set_them() {
    let primary = echo_server().await;
    let replica = echo_server().await;
    // Nothing on loopback is trusted here: the test client is an ordinary client.
    let text = config_text(primary.addr, replica.addr, "delay = \"0s\"", "")
        .replace("[\"127.0.0.0/8\", \"::1/128\"]", "[\"192.0.2.0/24\"]");
    let proxy = start_proxy(&text).await;
    let resp = client()
        .put(format!("http://{}{}", proxy.addr, obj("a.mov")))
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=1.2.3.4;host=evil.example;proto=https")
        .body("x")
        .send()
        .await
        .unwrap();
    let echoed = resp.text().await.unwrap();
    assert!(!echoed.contains("evil.example"), "{echoed}");
    assert!(!echoed.contains("forwarded: "), "{echoed}");
    assert!(echoed.contains("x-forwarded-proto: http\n"), "{echoed}");
}

#[tokio::test]
async fn a_malformed_request_body_is_a_400_not_an_upstream_failure() {
    let tail = "[health]\nfall = 1";
    let s = Setup::with_config(|p, r| with_admin(&config_text(p, r, "delay = \"15m\"", tail))).await;
    let answer = raw_exchange(
        s.proxy.addr,
        format!(
            "PUT {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            obj("bad.mov")
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let (_, m) = admin_get(s.proxy.admin_addr.unwrap(), "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"), 1.0, "{m}");
    assert!(s.primary.store.get(&obj("bad.mov")).is_none());
}

/// A GET with `n` extra header fields.
fn many_headers(path: &str, n: usize) -> Vec<u8> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Forwarded-User: alice\r\nConnection: close\r\n");
    for i in 0..n {
        req.push_str(&format!("X-Extra-{i}: {i}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

#[tokio::test]
async fn the_header_count_limit_is_a_setting() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("a.mov", true, OLD);
    let answer = raw_exchange(s.proxy.addr, &many_headers(&obj("a.mov"), 120), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "the default is 100 fields: {answer}");
    let answer = raw_exchange(s.proxy.addr, &many_headers(&obj("a.mov"), 60), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let s = Setup::with_tail("delay = \"15m\"", "[limits]\nmax_headers = 50").await;
    s.media("a.mov", true, OLD);
    let answer = raw_exchange(s.proxy.addr, &many_headers(&obj("a.mov"), 60), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

/// An upstream that answers after `delay`, counting connections and the most requests it
/// had at once.
struct Counted {
    addr: SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most_at_once: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn counted_upstream(delay: Duration) -> Counted {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let most_at_once = Arc::new(AtomicUsize::new(0));
    let now = Arc::new(AtomicUsize::new(0));
    let (c, m) = (Arc::clone(&connections), Arc::clone(&most_at_once));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (m, now) = (Arc::clone(&m), Arc::clone(&now));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let (m, now) = (Arc::clone(&m), Arc::clone(&now));
                    async move {
                        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(at_once, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(http::Response::new(full("ok")))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Counted { addr, connections, most_at_once, task }
}

/// `n` concurrent GETs as carol (the primary) over one cleartext HTTP/2 connection.
async fn fan_out(proxy: SocketAddr, n: usize) -> Vec<reqwest::Response> {
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap();
    let url = format!("http://{proxy}{}", obj("a.mov"));
    let sends = (0..n).map(|_| h2.get(&url).header("x-forwarded-user", "carol").send());
    futures_util::future::join_all(sends).await.into_iter().map(|r| r.expect("an answer")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_cannot_fan_out_past_its_stream_limit() {
    use std::sync::atomic::Ordering;
    let primary = counted_upstream(Duration::from_millis(300)).await;
    let proxy = start_proxy(&config_text(primary.addr, primary.addr, "delay = \"0s\"", "")).await;
    let answers = fan_out(proxy.addr, 300).await;
    assert!(answers.iter().all(|r| r.status() == 200));
    let most = primary.most_at_once.load(Ordering::SeqCst);
    assert!(most <= 100, "one connection had {most} requests upstream at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_an_upstream_are_capped_and_the_wait_is_counted() {
    use std::sync::atomic::Ordering;
    let primary = counted_upstream(Duration::from_millis(100)).await;
    let tail = "[limits]\nmax_upstream_connections = 8\nupstream_queue_timeout = \"20s\"";
    let proxy = start_proxy(&with_admin(&config_text(primary.addr, primary.addr, "delay = \"0s\"", tail))).await;
    let admin = proxy.admin_addr.unwrap();
    let load = tokio::spawn(fan_out(proxy.addr, 200));
    let mut most_waiting = 0.0f64;
    while !load.is_finished() {
        let (_, m) = admin_get(admin, "/metrics").await;
        most_waiting = most_waiting.max(metric(&m, "mediaroute_upstream_queue{upstream=\"primary\"}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answers = load.await.unwrap();
    assert!(answers.iter().all(|r| r.status() == 200), "everyone is served in turn");
    let opened = primary.connections.load(Ordering::SeqCst);
    assert!(opened <= 8, "{opened} connections opened to the primary");
    assert!(most_waiting > 0.0, "the waiting requests were counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_upstream_queue_is_a_503_not_an_upstream_failure() {
    let primary = counted_upstream(Duration::from_secs(1)).await;
    let tail = "[limits]\nmax_upstream_connections = 1\nupstream_queue_timeout = \"200ms\"\n[health]\nfall = 1";
    let proxy = start_proxy(&with_admin(&config_text(primary.addr, primary.addr, "delay = \"0s\"", tail))).await;
    let answers = fan_out(proxy.addr, 4).await;
    let busy: Vec<_> = answers.iter().filter(|r| r.status() == 503).collect();
    assert_eq!(busy.len(), 3, "one served, three refused");
    assert!(busy.iter().all(|r| r.headers()["retry-after"] == "1"));
    let (_, m) = admin_get(proxy.admin_addr.unwrap(), "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_queue_timeouts_total{upstream=\"primary\"}"), 3.0, "{m}");
    assert_eq!(
        metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"),
        1.0,
        "a local limit is not the upstream's fault"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_limited_across_connections() {
    let primary = counted_upstream(Duration::from_millis(500)).await;
    let tail = "[limits]\nmax_requests = 5";
    let proxy = start_proxy(&config_text(primary.addr, primary.addr, "delay = \"0s\"", tail)).await;
    let answers = fan_out(proxy.addr, 20).await;
    let ok = answers.iter().filter(|r| r.status() == 200).count();
    let busy = answers.iter().filter(|r| r.status() == 503).count();
    assert_eq!((ok, busy), (5, 15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_not_an_upstream_failure() {
    let primary = counted_upstream(Duration::from_millis(500)).await;
    let tail = "[health]\nfall = 1";
    let text = with_admin(&config_text(primary.addr, primary.addr, "delay = \"0s\"", tail));
    // Few descriptors, soft and hard: the proxy cannot raise them.
    let proxy = ProxyProcess::spawn_under(&text, &[], &["prlimit", "--nofile=40:40", "--"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.child.id())).unwrap();
    assert!(limits.lines().any(|l| l.starts_with("Max open files") && l.contains(" 40 ")), "{limits}");
    // More concurrent downloads than descriptors: each needs one for the client and one upstream.
    let url = format!("http://{}{}", proxy.addr, obj("a.mov"));
    let gets = (0..40).map(|_| {
        let url = url.clone();
        async move {
            let c = client();
            match c.get(&url).header("x-forwarded-user", "carol").timeout(Duration::from_secs(20)).send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        }
    });
    let statuses = futures_util::future::join_all(gets).await;
    assert!(statuses.contains(&503), "the descriptors ran out: {statuses:?}");
    assert!(statuses.iter().all(|s| [200, 503].contains(s)), "{statuses:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, m) = admin_get(proxy.admin.unwrap(), "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"), 1.0, "{m}");
    assert!(proxy.log_lines("upstream marked down").is_empty());
    assert!(!proxy.log_lines("local limit reached").is_empty());
}

#[test]
fn the_soft_file_limit_is_raised_to_the_hard_one() {
    let closed: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let proxy = ProxyProcess::spawn_under(
        &config_text(closed, closed, "delay = \"15m\"", ""),
        &[],
        &["prlimit", "--nofile=64:4096", "--"],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = line.split_whitespace().filter(|w| w.parse::<u64>().is_ok()).collect();
    assert_eq!(numbers, vec!["4096", "4096"], "{line}");
}

#[tokio::test]
async fn a_request_with_both_framings_is_framed_by_its_transfer_coding_only() {
    let primary = echo_server().await;
    let replica = echo_server().await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    let answer = raw_exchange(
        proxy.addr,
        format!(
            "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            obj("a.mov")
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains("content-length: 40"), "{answer}");
    assert!(answer.contains("body-bytes: 3"), "{answer}");
}

#[tokio::test]
async fn request_smuggling_and_downgrade_attempts_still_fail() {
    let primary = echo_server().await;
    let replica = echo_server().await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    let path = obj("a.mov");
    let addr = proxy.addr;
    let exchange = |req: String| async move { raw_exchange(addr, req.as_bytes(), Duration::from_secs(5)).await };
    // obs-fold header continuation lines.
    let a = exchange(format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n")).await;
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    // Two different lengths for one body.
    let a = exchange(format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd"
    ))
    .await;
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    // A cleartext HTTP/2 upgrade is not taken, nor passed on.
    let a = exchange(format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    ))
    .await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert!(!a.to_ascii_lowercase().contains("upgrade"), "{a}");
    // Pipelined requests are answered in order, each on its own.
    let a = exchange(format!(
        "GET {path}?n=1 HTTP/1.1\r\nHost: x\r\n\r\nGET {path}?n=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ))
    .await;
    let (first, second) = (a.find("?n=1").unwrap(), a.find("?n=2").unwrap());
    assert!(first < second && a.matches("HTTP/1.1 200").count() == 2, "{a}");
    assert_eq!(
        primary.hits.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "only the valid requests reached the primary"
    );
}

#[tokio::test]
async fn an_http2_request_with_too_many_header_fields_is_a_431() {
    let primary = echo_server().await;
    let proxy = start_proxy(&config_text(primary.addr, primary.addr, "delay = \"0s\"", "")).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap();
    let mut req = h2.get(format!("http://{}{}", proxy.addr, obj("a.mov")));
    for i in 0..150 {
        req = req.header(format!("x-extra-{i}"), "1");
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(primary.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_starved_of_window_gives_its_upstream_connection_back() {
    // One upstream connection in all. A client opens a stream, grants it no flow-control
    // window, and keeps its connection busy with pings: after the idle timeout the stream's
    // upstream request is ended and the connection serves others.
    // A large body: the upstream connection stays busy until the body has been read.
    let primary = serve_fn(loopback0(), |_req| async {
        let len = 16 * 1024 * 1024;
        let mut resp = http::Response::new(pattern_body(len, std::sync::Arc::default()));
        resp.headers_mut().insert("content-length", len.to_string().parse().unwrap());
        resp
    })
    .await;
    let tail = "[limits]\nmax_upstream_connections = 1\nupstream_queue_timeout = \"4s\"\nidle_timeout = \"500ms\"";
    let proxy = start_proxy(&config_text(primary.addr, primary.addr, "delay = \"0s\"", tail)).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, mut conn) =
        h2::client::Builder::new().initial_window_size(0).handshake::<_, bytes::Bytes>(tcp).await.unwrap();
    let mut pings = conn.ping_pong().unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let pinger = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if pings.ping(h2::Ping::opaque()).await.is_err() {
                break;
            }
        }
    });
    let req = http::Request::get(format!("http://{}{}", proxy.addr, obj("a.mov")))
        .header("x-forwarded-user", "carol")
        .body(())
        .unwrap();
    let (starved, _) = h2.send_request(req, true).unwrap();
    let head = starved.await.unwrap();
    assert_eq!(head.status(), 200);
    // Another client needs the only upstream connection.
    let started = Instant::now();
    let other = client().get(format!("http://{}{}", proxy.addr, obj("b.mov"))).send().await.unwrap();
    assert_eq!(other.status(), 200, "served once the starved stream let go");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(other.bytes().await.unwrap().len(), 16 * 1024 * 1024);
    pinger.abort();
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_client_left_still_count_among_requests_in_flight() {
    let primary = counted_upstream(Duration::from_millis(1500)).await;
    let tail = "[limits]\nmax_requests = 3";
    let proxy = start_proxy(&config_text(primary.addr, primary.addr, "delay = \"0s\"", tail)).await;
    for i in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let put = format!("PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", obj(&format!("gone{i}.mov")));
        conn.write_all(put.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(conn);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(busy.status(), 503, "the three writes are still in flight upstream");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ok = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn what_cannot_be_relayed_faithfully_is_refused() {
    // A status outside 100-599 from the upstream.
    let weird = raw_upstream(&b"HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\nok"[..], Then::HoldOpen).await;
    let proxy = start_proxy(&config_text(weird.addr, weird.addr, "delay = \"0s\"", "")).await;
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    // A transfer coding other than chunked, both ways.
    let coded = raw_upstream(
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..],
        Then::HoldOpen,
    )
    .await;
    let proxy = start_proxy(&config_text(coded.addr, coded.addr, "delay = \"0s\"", "")).await;
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let answer = raw_exchange(
        proxy.addr,
        format!(
            "PUT {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            obj("a.mov")
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    // An HTTP/1.1 request without Host.
    let answer = raw_exchange(
        proxy.addr,
        format!("GET {} HTTP/1.1\r\nConnection: close\r\n\r\n", obj("a.mov")).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A length written as a list reaches the client as one length.
    let listed = raw_upstream(&b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"[..], Then::HoldOpen).await;
    let proxy = start_proxy(&config_text(listed.addr, listed.addr, "delay = \"0s\"", "")).await;
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(resp.headers()["content-length"], "2");
    assert_eq!(resp.text().await.unwrap(), "ok");
}
