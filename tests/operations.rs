//! Running it like nginx: reload, stop, admin endpoints, metrics, access log, limits, health.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use mediaroute::demo::store::{self, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OLD: Duration = Duration::from_secs(86_400);

/// Config for a subprocess proxy with an admin listener and `dave` set to `dave_mode`.
fn ops_config(s: &Setup, dave_mode: &str, tail: &str) -> String {
    with_admin(&config_text(s.primary.addr, s.replica.addr, "delay = \"15m\"", tail))
        .replace("carol = \"no\"", &format!("carol = \"no\"\ndave = \"{dave_mode}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request_and_applies_within_a_second() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("clip.mov", true, OLD);
    let mut proxy = ProxyProcess::spawn(&ops_config(&s, "no", ""));
    let url = format!("http://{}{}", proxy.addr, obj("clip.mov"));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).header("x-forwarded-user", "dave").send().await {
                    Ok(r) if r.status() == 200 => match r.text().await {
                        Ok(body) if body.ends_with(":clip.mov") => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    },
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for i in 0..20 {
        let mode = if i % 2 == 0 { "yes" } else { "no" };
        proxy.rewrite_config(&ops_config(&s, mode, ""));
        proxy.signal("HUP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last word: dave uses the replica. It must show within a second.
    proxy.rewrite_config(&ops_config(&s, "yes", ""));
    proxy.signal("HUP");
    let sent = Instant::now();
    loop {
        let a = get_via(proxy.addr, &obj("clip.mov"), "dave").await;
        if a.reason == "replica" {
            break;
        }
        assert!(sent.elapsed() < Duration::from_secs(1), "new table not visible after {:?}", sent.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during reloads");
    assert!(ok.load(Ordering::Relaxed) > 20, "load ran: {} requests", ok.load(Ordering::Relaxed));
    let (_, metrics) = admin_get(proxy.admin.unwrap(), "/metrics").await;
    assert!(metric(&metrics, "mediaroute_config_reloads_total{result=\"ok\"}") >= 10.0, "{metrics}");
    assert_eq!(metric(&metrics, "mediaroute_config_reloads_total{result=\"error\"}"), 0.0);
    assert!(metric(&metrics, "mediaroute_config_generation") >= 11.0);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_on_reload_keeps_the_old_table() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("clip.mov", true, OLD);
    let proxy = ProxyProcess::spawn(&ops_config(&s, "yes", ""));
    assert_eq!(get_via(proxy.addr, &obj("clip.mov"), "dave").await.reason, "replica");
    let broken = ops_config(&s, "sometimes", "");
    proxy.rewrite_config(&broken);
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.log_lines("reload rejected").is_empty() {
        assert!(Instant::now() < deadline, "no rejection logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = &proxy.log_lines("reload rejected")[0];
    let line_no = broken.lines().position(|l| l.contains("sometimes")).unwrap() + 1;
    assert!(line.contains(&format!("mediaroute.toml:{line_no}:8: users.dave")), "{line}");
    assert_eq!(get_via(proxy.addr, &obj("clip.mov"), "dave").await.reason, "replica", "old table still serves");
    let (_, metrics) = admin_get(proxy.admin.unwrap(), "/metrics").await;
    assert_eq!(metric(&metrics, "mediaroute_config_reloads_total{result=\"error\"}"), 1.0);
    assert_eq!(metric(&metrics, "mediaroute_config_generation"), 1.0);
}

/// An upstream streaming `chunks` x 64 KiB with a pause between chunks.
async fn slow_server(chunks: usize, pause: Duration) -> TestServer {
    serve_fn(loopback0(), move |_req| async move {
        let stream = futures_util::stream::unfold(0, move |i| async move {
            if i == chunks {
                return None;
            }
            tokio::time::sleep(pause).await;
            Some((
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![7u8; 65536]))),
                i + 1,
            ))
        });
        let mut r = http::Response::new(http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream)));
        r.headers_mut().insert("content-length", (chunks * 65536).to_string().parse().unwrap());
        r
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_download_finish_then_exits_0() {
    let primary = slow_server(20, Duration::from_millis(50)).await;
    let replica = slow_server(20, Duration::from_millis(50)).await;
    let mut proxy = ProxyProcess::spawn(&config_text(primary.addr, replica.addr, "delay = \"0s\"", ""));
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("slow.mov"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    proxy.signal("TERM");
    let body = resp.bytes().await.expect("the download completes after SIGTERM");
    assert_eq!(body.len(), 20 * 65536);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!proxy.log_lines("stopped accepting").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_draining() {
    let primary = slow_server(20, Duration::from_millis(50)).await;
    let replica = slow_server(1, Duration::ZERO).await;
    let text = with_admin(&config_text(primary.addr, replica.addr, "delay = \"0s\"", ""));
    let running = start_proxy(&text).await;
    let admin = running.admin_addr.unwrap();
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
    let resp = client().get(format!("http://{}{}", running.addr, obj("slow.mov"))).send().await.unwrap();
    let stopping = tokio::spawn(running.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(admin_get(admin, "/readyz").await.0, 503);
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 20 * 65536);
    stopping.await.unwrap();
}

#[tokio::test]
async fn metrics_count_requests_by_reason_and_config_shows_no_secrets() {
    let s = Setup::with_config(|p, r| with_admin(&config_text(p, r, "delay = \"15m\"", ""))).await;
    let proxy = &s.proxy;
    let admin = proxy.admin_addr.unwrap();
    s.media("old.mov", true, OLD);
    s.media("legacy.mov", false, OLD);
    for _ in 0..2 {
        assert_eq!(get_via(proxy.addr, &obj("old.mov"), "alice").await.reason, "replica");
    }
    assert_eq!(get_via(proxy.addr, &obj("legacy.mov"), "alice").await.reason, "fallback");
    assert_eq!(get_via(proxy.addr, &obj("old.mov"), "carol").await.reason, "mode-no");
    assert_eq!(get_via(proxy.addr, "/elsewhere/x", "carol").await.status, 403);

    let (status, m) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let series = |labels: &str| metric(&m, &format!("mediaroute_requests_total{{{labels}}}"));
    assert_eq!(series("upstream=\"replica\",reason=\"replica\",status_class=\"2xx\""), 2.0, "{m}");
    assert_eq!(series("upstream=\"primary\",reason=\"fallback\",status_class=\"2xx\""), 1.0);
    assert_eq!(series("upstream=\"primary\",reason=\"mode-no\",status_class=\"2xx\""), 1.0);
    assert_eq!(series("upstream=\"none\",reason=\"refused\",status_class=\"4xx\""), 1.0);
    assert_eq!(metric(&m, "mediaroute_fallbacks_total{cause=\"not-found\"}"), 1.0);
    assert_eq!(metric(&m, "mediaroute_replica_misses_total"), 1.0);
    let replica_bytes = metric(&m, "mediaroute_response_bytes_total{upstream=\"replica\"}");
    assert_eq!(replica_bytes, 2.0 * "replica:old.mov".len() as f64);
    assert_eq!(metric(&m, "mediaroute_upstream_duration_seconds_count{upstream=\"replica\"}"), 2.0);
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"replica\"}"), 1.0);
    for t in [
        "# TYPE mediaroute_requests counter",
        "# TYPE mediaroute_upstream_duration_seconds histogram",
        "# TYPE mediaroute_upstream_up gauge",
        "# TYPE mediaroute_config_generation gauge",
    ] {
        assert!(m.contains(t), "missing {t}");
    }

    let (status, cfg) = admin_get(admin, "/config").await;
    assert_eq!(status, 200);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["generation"], 1);
    assert_eq!(cfg["users"], 3);
    assert_eq!(cfg["networks"], 2);
    assert_eq!(cfg["replica"]["url"], format!("http://{}", s.replica.addr));
    assert_eq!(admin_get(admin, "/nothing").await.0, 404);
}

#[tokio::test]
async fn slowloris_connections_are_closed_after_the_header_timeout() {
    let s = Setup::with_tail("delay = \"15m\"", "[limits]\nheader_read_timeout = \"500ms\"").await;
    let mut conn = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    conn.write_all(b"GET /studio-media/a.mov HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed too early: {:?}", started.elapsed());
    assert_eq!(s.primary.store.hits() + s.replica.store.hits(), 0);
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    let s = Setup::with_tail("delay = \"15m\"", "[limits]\nmax_header_size = 8192").await;
    let big = "x".repeat(16 * 1024);
    let mut conn = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let req = format!("GET /studio-media/a.mov HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let _ = conn.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf)).await;
    let resp = String::from_utf8_lossy(&buf);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let s = Setup::with_tail("delay = \"15m\"", "[limits]\nidle_timeout = \"300ms\"").await;
    s.media("a.mov", true, OLD);
    let mut conn = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    conn.write_all(b"GET /studio-media/a.mov HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
    assert!(matches!(rest, Ok(Ok(0)) | Ok(Err(_))), "expected the idle connection to close: {rest:?}");
    assert!(started.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", started.elapsed());
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let s = Setup::with_tail("delay = \"15m\"", "[limits]\nmax_connections = 1").await;
    s.media("a.mov", true, OLD);
    let request = b"GET /studio-media/a.mov HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(first.read(&mut buf).await.unwrap() > 0);
    let mut second = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    second.write_all(request).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(waited.is_err(), "the second connection was served while the first held the only slot");
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_stopped_replica_is_reported_down_and_comes_back() {
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    // The replica's address stays reserved for the whole test: its servers listen next to
    // the held socket, and while none runs, connections are refused. No other test can
    // take the port between the stop and the restart.
    let replica_port = closed_port();
    let replica_store = Store::new("r");
    let replica = store::serve_on(replica_port.listener(), Arc::clone(&replica_store)).unwrap();
    let at = SystemTime::now() - OLD;
    primary.store.put(&obj("a.mov"), "primary", at);
    replica_store.put(&format!("/{RB}/a.mov"), "replica", at);
    let tail = "[health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2";
    let text = with_admin(&config_text(primary.addr, replica.addr, "delay = \"15m\"", tail));
    let proxy = start_proxy(&text).await;
    let admin = proxy.admin_addr.unwrap();
    assert_eq!(get_via(proxy.addr, &obj("a.mov"), "alice").await.reason, "replica");

    drop(replica);
    let wait_for = |want: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
            if a.reason == want {
                return a;
            }
            assert!(Instant::now() < deadline, "still {} instead of {want}", a.reason);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let down = wait_for("replica-down").await;
    assert_eq!((down.status, down.body.as_str()), (200, "primary"));
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"replica\"}"), 0.0, "{m}");
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"), 1.0);

    let _back = store::serve_on(replica_port.listener(), replica_store).unwrap();
    let up = wait_for("replica").await;
    assert_eq!(up.body, "replica");
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"replica\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_access_log_has_one_line_per_request() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("a.mov", true, OLD);
    let text = config_text(s.primary.addr, s.replica.addr, "delay = \"15m\"", "[log]\nformat = \"json\"");
    let proxy = ProxyProcess::spawn(&text);
    let a = get_via(proxy.addr, &format!("{}?X-Amz-Signature=secret", obj("a.mov")), "alice").await;
    assert_eq!(a.reason, "replica");
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        if let Some(l) = proxy.log_lines("mediaroute::access").into_iter().next() {
            break l;
        }
        assert!(Instant::now() < deadline, "no access line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["user"], "alice");
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], obj("a.mov"));
    assert_eq!(v["status"], 200);
    assert_eq!(v["upstream"], "replica");
    assert_eq!(v["reason"], "replica");
    assert_eq!(v["bytes"], "replica:a.mov".len());
    assert_eq!(v["complete"], true);
    assert!(v["duration_ms"].as_f64().is_some() && v["timestamp"].is_string(), "{line}");
    assert!(!line.contains("secret"), "the query never reaches the log: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_ready_reloading_and_stopping() {
    let s = Setup::new("delay = \"15m\"").await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification arrives");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let text = config_text(s.primary.addr, s.replica.addr, "delay = \"15m\"", "");
    let mut proxy = ProxyProcess::spawn_with_env(&text, &[("NOTIFY_SOCKET", socket_path.as_os_str())]);
    assert_eq!(recv(), "READY=1\n");
    // The listener is up by the time READY=1 is sent.
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_ok());
    proxy.signal("HUP");
    let reloading = recv();
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading}");
    assert_eq!(recv(), "READY=1\n");
    proxy.signal("TERM");
    assert_eq!(recv(), "STOPPING=1\n");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}
