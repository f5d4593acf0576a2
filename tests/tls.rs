//! The TLS listener (README "TLS"): real rustls clients over HTTP/1.1 and HTTP/2 against
//! certificates made in the test; certificate reload while a download streams; plain
//! HTTP, garbage and silence on the TLS port.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use common::pki::{self, Ca, Leaf};
use common::*;
use futures_util::StreamExt;
use mediaroute::config;
use mediaroute::demo::store::{self, Store, StoreServer};
use mediaroute::server::{self, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A config file in `dir` with a plain and a TLS listener over `cert`/`key`.
fn write_config(dir: &Path, primary: std::net::SocketAddr, replica: std::net::SocketAddr, limits: &str) -> PathBuf {
    let text = config_text(primary, replica, "delay = \"0s\"", limits).replace(
        "[listen]\naddr = \"127.0.0.1:0\"",
        "[listen]\naddr = \"127.0.0.1:0\"\ntls_addr = \"127.0.0.1:0\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"",
    );
    pki::write(dir, "mediaroute.toml", &text)
}

fn install(dir: &Path, leaf: &Leaf) {
    pki::write(dir, "cert.pem", &leaf.cert);
    pki::write(dir, "key.pem", &leaf.key);
}

async fn start(path: &Path) -> Running {
    server::start(config::load(path).expect("valid config")).await.expect("proxy starts")
}

struct Tls {
    dir: tempfile::TempDir,
    ca: Ca,
    primary: StoreServer,
    _replica: StoreServer,
    proxy: Running,
}

impl Tls {
    async fn new(limits: &str) -> Tls {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("mediaroute test CA");
        install(dir.path(), &ca.leaf("media-1.studio.test", &["localhost", "127.0.0.1"], 2040));
        let primary = store::serve(loopback0(), Store::new("primary")).await.unwrap();
        let replica = store::serve(loopback0(), Store::new("replica")).await.unwrap();
        let path = write_config(dir.path(), primary.addr, replica.addr, limits);
        let proxy = start(&path).await;
        primary.store.put(&obj("clip.mov"), "primary:clip", std::time::SystemTime::now());
        Tls { dir, ca, primary, _replica: replica, proxy }
    }

    fn https(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.proxy.tls_addr.expect("a TLS listener").port())
    }

    fn metrics(&self) -> String {
        self.proxy.proxy.metrics().render()
    }
}

#[tokio::test]
async fn serves_http2_and_http1_over_tls_next_to_the_plain_listener() {
    let t = Tls::new("").await;
    let h2 = pki::https_client(&t.ca.pem()).build().unwrap();
    let resp = h2.get(t.https(&obj("clip.mov"))).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_2));
    assert_eq!(pki::served_cn(&resp), "media-1.studio.test");
    assert_eq!(resp.text().await.unwrap(), "primary:clip");

    let h1 = pki::https_client(&t.ca.pem()).http1_only().build().unwrap();
    let resp = h1.get(t.https(&obj("clip.mov"))).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_11));
    assert_eq!(resp.text().await.unwrap(), "primary:clip");

    // TLS 1.2 as well as 1.3.
    let tls12 = pki::https_client(&t.ca.pem()).max_tls_version(reqwest::tls::Version::TLS_1_2).build().unwrap();
    let resp = tls12.get(t.https(&obj("clip.mov"))).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    // The plain listener serves too.
    let plain = client().get(format!("http://{}{}", t.proxy.addr, obj("clip.mov"))).send().await.unwrap();
    assert_eq!(plain.text().await.unwrap(), "primary:clip");

    // /config shows the certificate, never the key; the expiry is a metric.
    let view = mediaroute::admin::config_view(&t.proxy.proxy);
    assert!(view.contains("media-1.studio.test") && view.contains("2040"), "{view}");
    assert!(!view.contains("PRIVATE KEY") && !view.contains("key.pem"), "{view}");
    // 2040-01-01T00:00:00Z
    assert_eq!(metric(&t.metrics(), "mediaroute_tls_certificate_expiry_timestamp_seconds"), 2208988800.0);
}

#[tokio::test]
async fn a_reload_swaps_the_certificate_for_new_connections_while_an_old_one_keeps_streaming() {
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mediaroute test CA");
    install(dir.path(), &ca.leaf("media-1.studio.test", &["localhost"], 2040));
    let alive = Arc::new(AtomicUsize::new(0));
    let upstream = serve_fn(loopback0(), move |_req| {
        let alive = Arc::clone(&alive);
        async move { http::Response::new(pattern_body(SIZE, alive)) }
    })
    .await;
    let replica = status_server(404).await;
    let proxy = start(&write_config(dir.path(), upstream.addr, replica.addr, "")).await;
    let url = |p: &str| format!("https://localhost:{}{p}", proxy.tls_addr.unwrap().port());

    // An old connection starts a large download and reads only its beginning.
    let old = pki::https_client(&ca.pem()).http1_only().build().unwrap();
    let resp = old.get(url(&obj("movie.mov"))).send().await.unwrap();
    assert_eq!(pki::served_cn(&resp), "media-1.studio.test");
    let mut body = resp.bytes_stream();
    let mut got: Vec<u8> = Vec::new();
    while got.len() < 1 << 20 {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }

    // New files, then a reload: new handshakes get the new certificate.
    install(dir.path(), &ca.leaf("media-2.studio.test", &["localhost"], 2041));
    let reloaded = proxy.reload().await.expect("reload accepted");
    assert_eq!(reloaded.generation, 2);
    let fresh = pki::https_client(&ca.pem()).build().unwrap();
    let resp = fresh.get(url(&obj("small"))).send().await.unwrap();
    assert_eq!(pki::served_cn(&resp), "media-2.studio.test");
    let m = proxy.proxy.metrics().render();
    assert_eq!(metric(&m, "mediaroute_tls_certificate_expiry_timestamp_seconds"), 2240611200.0, "2041-01-01");

    // The old download ends complete and intact on its old connection.
    let mut total = got.len() as u64;
    let mut bad = got.iter().enumerate().filter(|(i, b)| **b != pattern_byte(*i as u64)).count();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("the old download is not cut");
        bad += chunk.iter().enumerate().filter(|(i, b)| **b != pattern_byte(total + *i as u64)).count();
        total += chunk.len() as u64;
    }
    assert_eq!((total, bad), (SIZE, 0));
}

#[tokio::test]
async fn a_bad_pair_on_reload_keeps_the_old_certificate_and_is_counted() {
    let t = Tls::new("").await;
    let other = Ca::new("another CA");
    // The new certificate with the key of a different one: a half-finished renewal.
    let new = t.ca.leaf("media-2.studio.test", &["localhost"], 2041);
    pki::write(t.dir.path(), "cert.pem", &new.cert);
    pki::write(t.dir.path(), "key.pem", &other.leaf("x", &["x.test"], 2041).key);
    let errors = t.proxy.reload().await.expect_err("a mismatched pair is refused");
    let text = errors.to_string();
    assert!(text.contains("key.pem does not belong to the certificate in"), "{text}");
    assert!(!text.contains("PRIVATE"), "{text}");
    assert_eq!(metric(&t.metrics(), "mediaroute_config_reloads_total{result=\"error\"}"), 1.0);

    let c = pki::https_client(&t.ca.pem()).build().unwrap();
    let resp = c.get(t.https(&obj("clip.mov"))).send().await.unwrap();
    assert_eq!(pki::served_cn(&resp), "media-1.studio.test", "still the old certificate");

    // A key file that is not PEM at all, then a missing file: the same.
    pki::write(t.dir.path(), "key.pem", "not a key\n");
    assert!(t.proxy.reload().await.is_err());
    std::fs::remove_file(t.dir.path().join("cert.pem")).unwrap();
    assert!(t.proxy.reload().await.is_err());
    let resp = c.get(t.https(&obj("clip.mov"))).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), pki::served_cn(&resp)), (200, "media-1.studio.test".to_string()));
    assert_eq!(metric(&t.metrics(), "mediaroute_config_reloads_total{result=\"error\"}"), 3.0);

    // Fixed files are taken on the next reload.
    install(t.dir.path(), &new);
    t.proxy.reload().await.expect("a good pair is taken");
    let resp = pki::https_client(&t.ca.pem()).build().unwrap().get(t.https("/")).send().await.unwrap();
    assert_eq!(pki::served_cn(&resp), "media-2.studio.test");
}

/// Everything the server sends on a raw connection until it closes it (or `limit` passes).
async fn read_until_closed(conn: &mut tokio::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_clear_answer_at_once() {
    let t = Tls::new("").await;
    let tls_addr = t.proxy.tls_addr.unwrap();
    let started = Instant::now();
    let mut conn = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    conn.write_all(b"GET /studio-media/clip.mov HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let (answer, closed) = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(closed && answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("use https://"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    // Bytes that are neither TLS nor HTTP: closed, without an answer.
    let mut conn = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    conn.write_all(&[0u8; 64]).await.unwrap();
    let (answer, closed) = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(closed && answer.is_empty(), "{answer:?}");

    let m = t.metrics();
    assert_eq!(metric(&m, "mediaroute_tls_handshake_failures_total{reason=\"plain-http\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "mediaroute_tls_handshake_failures_total{reason=\"error\"}"), 1.0, "{m}");
}

#[tokio::test]
async fn a_handshake_that_does_not_finish_in_time_is_cut() {
    // Scaled down from the 10 s default; the client stays longer than the limit.
    let t = Tls::new("[limits]\nhandshake_timeout = \"400ms\"").await;
    let tls_addr = t.proxy.tls_addr.unwrap();
    let started = Instant::now();
    // Silent after connecting, and a slowloris that sends the first byte of a ClientHello.
    let mut silent = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    slow.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    for conn in [&mut silent, &mut slow] {
        let (answer, closed) = read_until_closed(conn, Duration::from_secs(5)).await;
        assert!(closed && answer.is_empty(), "{answer:?}");
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "{took:?}");
    let m = t.metrics();
    assert_eq!(metric(&m, "mediaroute_tls_handshake_failures_total{reason=\"timeout\"}"), 2.0, "{m}");

    // A client that completes its handshake in time is served after the same wait.
    let c = pki::https_client(&t.ca.pem()).build().unwrap();
    assert_eq!(c.get(t.https(&obj("clip.mov"))).send().await.unwrap().status().as_u16(), 200);
    drop(t.primary);
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_certificate_fails_and_is_counted() {
    let t = Tls::new("").await;
    let stranger = Ca::new("someone else");
    let c = pki::https_client(&stranger.pem()).build().unwrap();
    let e = c.get(t.https(&obj("clip.mov"))).send().await.expect_err("untrusted certificate");
    assert!(e.is_connect(), "{e:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&t.metrics(), "mediaroute_tls_handshake_failures_total{reason=\"error\"}") < 1.0 {
        assert!(Instant::now() < deadline, "{}", t.metrics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn upstreams_are_told_the_client_came_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mediaroute test CA");
    install(dir.path(), &ca.leaf("media.studio.test", &["localhost"], 2040));
    let echo = echo_server().await;
    let replica = status_server(404).await;
    let proxy = start(&write_config(dir.path(), echo.addr, replica.addr, "")).await;
    let c = pki::https_client(&ca.pem()).build().unwrap();
    let url = format!("https://localhost:{}{}", proxy.tls_addr.unwrap().port(), obj("clip.mov"));
    let seen = c.get(url).send().await.unwrap().text().await.unwrap();
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
    let seen = client().get(format!("http://{}{}", proxy.addr, obj("clip.mov"))).send().await.unwrap();
    let seen = seen.text().await.unwrap();
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
}

/// Waits up to 10 s for a log line of `p` containing `needle`; that line.
fn wait_for_log(p: &ProxyProcess, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = p.log_lines(needle);
        if lines.len() >= count {
            return lines[count - 1].clone();
        }
        assert!(Instant::now() < deadline, "no {needle:?} in {:?}", p.log_lines(""));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_to_the_running_process_swaps_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mediaroute test CA");
    install(dir.path(), &ca.leaf("media-1.studio.test", &["localhost"], 2040));
    let primary = store::serve(loopback0(), Store::new("primary")).await.unwrap();
    let replica = store::serve(loopback0(), Store::new("replica")).await.unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let text = config_text(primary.addr, replica.addr, "", "").replace(
        "[listen]\naddr = \"127.0.0.1:0\"",
        &format!(
            "[listen]\naddr = \"127.0.0.1:0\"\ntls_addr = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let p = ProxyProcess::spawn(&text);
    let line = wait_for_log(&p, "listening (TLS)", 1);
    let port = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next()).unwrap();
    let port: std::net::SocketAddr = port.parse().unwrap();
    let url = format!("https://localhost:{}/", port.port());
    let cn = |ca: &Ca| {
        let (ca, url) = (ca.pem(), url.clone());
        async move { pki::served_cn(&pki::https_client(&ca).build().unwrap().get(url).send().await.unwrap()) }
    };
    assert_eq!(cn(&ca).await, "media-1.studio.test");

    install(dir.path(), &ca.leaf("media-2.studio.test", &["localhost"], 2041));
    p.signal("HUP");
    wait_for_log(&p, "configuration reloaded", 1);
    assert_eq!(cn(&ca).await, "media-2.studio.test");

    // A key that is not this certificate's: refused, logged by file name, never by content.
    pki::write(dir.path(), "key.pem", &ca.leaf("x", &["x.test"], 2041).key);
    p.signal("HUP");
    let refused = wait_for_log(&p, "reload rejected", 1);
    assert!(refused.contains("does not belong to the certificate"), "{refused}");
    assert_eq!(cn(&ca).await, "media-2.studio.test");
    assert!(p.log_lines("PRIVATE KEY").is_empty());
}
