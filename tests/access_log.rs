//! The access log at production cost (README "Access log"): lines are buffered off the
//! request path, written at least once a second and at shutdown, and dropped and counted,
//! never waited for, when the sink does not keep up. These run the real binary, whose
//! stderr is the log's sink.

mod common;

use std::collections::HashSet;
use std::io::BufRead;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// `n` GETs of distinct keys as carol (primary, `mode-no`), `concurrency` at a time; each
/// must be answered 200.
async fn burst(proxy: std::net::SocketAddr, n: usize, concurrency: usize) {
    let client = client();
    let gets = futures_util::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let url = format!("http://{proxy}{}", obj(&format!("burst/{i}.exr")));
                let resp = client.get(url).header("x-forwarded-user", "carol").send().await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.bytes().await.unwrap();
            }
        })
        .buffer_unordered(concurrency);
    gets.collect::<Vec<()>>().await;
}

/// The keys `burst/{i}.exr` named in `lines`, checking each line is one whole access line.
fn logged_keys(lines: &[String], json: bool) -> Vec<usize> {
    let mut keys = Vec::new();
    for line in lines {
        let path = if json {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON line ({e}): {line}"));
            for field in ["timestamp", "user", "client", "method", "status", "upstream", "reason", "bytes"] {
                assert!(!v[field].is_null(), "no {field}: {line}");
            }
            assert_eq!(v["user"], "carol", "{line}");
            assert_eq!(v["complete"], true, "{line}");
            v["path"].as_str().unwrap_or_default().to_string()
        } else {
            // One line, from its timestamp to its last field, and nothing of another line.
            assert_eq!(line.matches("mediaroute::access").count(), 1, "{line}");
            assert!(line.ends_with("complete=true upstream_error=false"), "{line}");
            assert!(line.contains(" INFO mediaroute::access: user=\"carol\" client=127.0.0.1 method=GET "), "{line}");
            assert!(line.contains(" status=200 upstream=\"primary\" reason=\"mode-no\" bytes=10 "), "{line}");
            let path = line.split("path=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
            path.to_string()
        };
        let key = path.strip_prefix(&obj("burst/")).and_then(|k| k.strip_suffix(".exr"));
        keys.push(key.and_then(|k| k.parse().ok()).unwrap_or_else(|| panic!("unexpected path {path:?}: {line}")));
    }
    keys
}

/// Waits until the reader of `proxy`'s stderr has seen `n` access lines (or `limit` passed).
async fn access_lines(proxy: &ProxyProcess, n: usize, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let lines = proxy.log_lines("mediaroute::access");
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 10,000 requests, 64 at a time, then SIGTERM at once: every request has exactly one
/// whole line, in text and in JSON, none dropped, the last ones written at exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_10000_requests_has_every_line_whole_even_at_sigterm() {
    const N: usize = 10_000;
    let upstream = status_server(200).await;
    for json in [false, true] {
        let format = if json { "json" } else { "text" };
        let text = config_text(upstream.addr, upstream.addr, "", &format!("[log]\nformat = \"{format}\""));
        let mut proxy = ProxyProcess::spawn(&with_admin(&text));
        burst(proxy.addr, N, 64).await;
        let admin = proxy.admin.unwrap();
        let (_, metrics) = admin_get(admin, "/metrics").await;
        assert_eq!(metric(&metrics, "mediaroute_access_log_dropped_total"), 0.0, "the sink kept up");
        // At once: the last lines are still in the buffer, which only the exit writes out.
        proxy.signal("TERM");
        assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
        let lines = access_lines(&proxy, N, Duration::from_secs(10)).await;
        let keys = logged_keys(&lines, json);
        assert_eq!(keys.len(), N, "{format}: one line per request");
        let distinct: HashSet<usize> = keys.into_iter().collect();
        assert_eq!(distinct, (0..N).collect::<HashSet<_>>(), "{format}: every request's line");
        // Lines other than access lines came through whole too.
        assert_eq!(proxy.log_lines("stopped").len(), 2, "{:?}", proxy.log_lines("stop"));
    }
}

/// A line is written within the flush interval (1 s) with no more traffic and no exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_access_line_is_written_within_a_second() {
    let upstream = status_server(200).await;
    let proxy = ProxyProcess::spawn(&config_text(upstream.addr, upstream.addr, "", ""));
    burst(proxy.addr, 1, 1).await;
    let sent = Instant::now();
    let lines = access_lines(&proxy, 1, Duration::from_secs(5)).await;
    assert_eq!(logged_keys(&lines, false), vec![0]);
    // The interval plus scheduling slack on a loaded machine.
    assert!(sent.elapsed() < Duration::from_millis(2500), "written after {:?}", sent.elapsed());
    // And nothing else was waiting for it: the proxy is still serving.
    burst(proxy.addr, 1, 1).await;
}

/// With stderr a pipe that nobody reads, requests go on at full speed: lines that do not
/// fit in `log.buffer_size` are dropped and counted, and the drop is reported once the
/// sink moves again. No line is ever cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_drops_and_counts_lines_and_never_blocks_requests() {
    const N: usize = 3_000;
    let upstream = status_server(200).await;
    let text = config_text(upstream.addr, upstream.addr, "", "[log]\nbuffer_size = 4096");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mediaroute.toml");
    std::fs::write(&path, with_admin(&text)).unwrap();
    let mut child = Reaped(run_command(&[], &path).spawn().unwrap());
    let mut stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
    // Read only up to the listening lines; from then on, the pipe fills and stays full.
    let (mut addr, mut admin) = (None, None);
    let mut line = String::new();
    while addr.is_none() || admin.is_none() {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the proxy exited");
        if let Some(a) = line.split("addr=").nth(1).filter(|_| line.contains("listening")) {
            let a: std::net::SocketAddr = a.split_whitespace().next().unwrap().parse().unwrap();
            if line.contains("admin") { admin = Some(a) } else { addr = Some(a) }
        }
    }
    let (addr, admin) = (addr.unwrap(), admin.unwrap());
    // Blocked on the log, these would never finish: the timeout is the failure.
    let served = tokio::time::timeout(Duration::from_secs(60), burst(addr, N, 16)).await;
    assert!(served.is_ok(), "requests waited on a stalled log");
    // Counted (and logged) as each response ends, which the client may see a moment before.
    let series = "mediaroute_requests_total{upstream=\"primary\",reason=\"mode-no\",status_class=\"2xx\"}";
    let metrics = metric_reaches(admin, series, N as f64).await;
    let dropped = metric(&metrics, "mediaroute_access_log_dropped_total");
    // A pipe holds 64 KiB (about 300 lines) and the buffer 4 KiB: most lines are dropped.
    assert!(dropped >= (N / 2) as f64, "dropped {dropped} of {N}:\n{metrics}");
    // The sink moves again, and the proxy stops: what was kept comes out whole, with the
    // report of what was dropped.
    let reader = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<String>>());
    signal(child.0.id(), "TERM");
    let exited = tokio::task::spawn_blocking(move || child.0.wait()).await.unwrap().unwrap();
    assert!(exited.success(), "{exited:?}");
    let lines = reader.join().unwrap();
    let reports: Vec<&String> = lines.iter().filter(|l| l.contains("lines were dropped")).collect();
    assert!(!reports.is_empty(), "no report of the drop");
    let reported: f64 = reports
        .iter()
        .map(|r| {
            let n = r.split("access_lines=").nth(1).and_then(|r| r.split_whitespace().next());
            n.and_then(|n| n.parse::<f64>().ok()).unwrap_or_else(|| panic!("no count in the report: {r}"))
        })
        .sum();
    assert_eq!(reported, dropped, "the reports say what the metric counted");
    let access: Vec<String> = lines.iter().filter(|l| l.contains("mediaroute::access")).cloned().collect();
    let kept = logged_keys(&access, false).len();
    assert_eq!(kept as f64 + dropped, N as f64, "every line written whole or counted as dropped");
}

/// A child process killed when dropped: a failed test leaves no proxy behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends signal `name` to process `pid`.
fn signal(pid: u32, name: &str) {
    let ok = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
    assert!(ok.is_ok_and(|s| s.success()), "kill -{name} failed");
}

/// A download still running when the shutdown grace ends is cut, and its line (with
/// `complete=false`) is written before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_the_shutdown_grace_is_logged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Promises a megabyte, sends 100 bytes, then holds the connection open in silence.
    let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n";
    let upstream = raw_upstream(format!("{head}{}", "x".repeat(100)), Then::HoldOpen).await;
    let tail = "[limits]\nshutdown_grace = \"1s\"";
    let mut proxy = ProxyProcess::spawn(&config_text(upstream.addr, upstream.addr, "", tail));
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let get = format!("GET {} HTTP/1.1\r\nhost: x\r\nx-forwarded-user: carol\r\n\r\n", obj("cut.mov"));
    conn.write_all(get.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).ends_with(&"x".repeat(100)) {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let lines = access_lines(&proxy, 1, Duration::from_secs(5)).await;
    let line = lines.iter().find(|l| l.contains("cut.mov")).unwrap_or_else(|| panic!("no line: {lines:?}"));
    assert!(line.contains("bytes=100 ") && line.contains("complete=false"), "{line}");
}
