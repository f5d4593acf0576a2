//! Attacks and misbehaving peers: response framing, silent connections, stalled bodies,
//! forwarding headers, header counts, HTTP/2 fan-out and local resource limits.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OLD: Duration = Duration::from_secs(86_400);

/// An upstream that answers every request with the bytes of `answer`, raw.
async fn raw_upstream(answer: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(answer).await;
                // Leave the connection open: its end must not be what ends the body.
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    (addr, task)
}

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
    let (upstream, task) = raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let proxy = start_proxy(&config_text(upstream, upstream, "delay = \"0s\"", "")).await;
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none(), "{:?}", resp.headers());
    assert_eq!(resp.text().await.unwrap(), "hello world");
    task.abort();
}

#[tokio::test]
async fn a_101_to_a_plain_request_is_a_502() {
    let (upstream, task) =
        raw_upstream(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n").await;
    let proxy = start_proxy(&config_text(upstream, upstream, "delay = \"0s\"", "")).await;
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("a.mov"))).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("101"));
    task.abort();
}

#[tokio::test]
async fn repeated_content_lengths_are_folded_or_refused() {
    let primary = echo_server().await;
    let replica = echo_server().await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    // HTTP/2 lets a client repeat a header; identical lengths become one.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap();
    let resp = h2
        .put(format!("http://{}{}", proxy.addr, obj("a.mov")))
        .header("content-length", "3")
        .header("content-length", "3")
        .body("abc")
        .send()
        .await
        .unwrap();
    let echoed = resp.text().await.unwrap();
    assert_eq!(echoed.matches("content-length: 3").count(), 1, "{echoed}");
    assert!(echoed.contains("body-bytes: 3"), "{echoed}");
    assert_eq!(primary.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
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
async fn a_moving_upload_is_never_ended_and_a_stopped_one_is() {
    let tail = "[limits]\nbody_timeout = \"400ms\"\nidle_timeout = \"300ms\"";
    let s = Setup::with_tail("delay = \"15m\"", tail).await;
    // One byte every 200 ms for 2.4 s: longer than both limits, never quiet for either.
    let body = futures_util::stream::unfold(0u32, |n| async move {
        if n == 12 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")), n + 1))
    });
    let resp = s
        .client
        .put(s.url(&obj("trickle.mov")))
        .header("content-length", "12")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.primary.store.get(&obj("trickle.mov")).unwrap().body.len(), 12);
    // One that stops: ended after the body timeout with 408.
    let started = Instant::now();
    let answer = raw_exchange(
        s.proxy.addr,
        format!("PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc", obj("stopped.mov")).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));
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
