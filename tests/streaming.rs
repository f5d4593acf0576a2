//! Bodies stream through in both directions with bounded memory; hang-ups cancel upstream.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use http_body_util::BodyExt;

const MIB: u64 = 1024 * 1024;

/// An upstream serving `len` pattern bytes for every GET, and counting PUT bytes.
async fn pattern_server(len: u64, alive: Arc<AtomicUsize>, received: Arc<AtomicU64>) -> TestServer {
    serve_fn(loopback0(), move |req: http::Request<hyper::body::Incoming>| {
        let (alive, received) = (Arc::clone(&alive), Arc::clone(&received));
        async move {
            if req.method() == http::Method::PUT {
                let mut body = req.into_body();
                while let Some(Ok(frame)) = body.frame().await {
                    if let Some(d) = frame.data_ref() {
                        received.fetch_add(d.len() as u64, Ordering::SeqCst);
                    }
                }
                return http::Response::new(full("stored"));
            }
            let mut resp = http::Response::new(pattern_body(len, alive));
            resp.headers_mut().insert("content-length", len.to_string().parse().unwrap());
            resp
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_download_streams_with_bounded_proxy_memory() {
    let len = 256 * MIB;
    let alive = Arc::new(AtomicUsize::new(0));
    let primary = pattern_server(len, alive.clone(), Arc::default()).await;
    let replica = pattern_server(len, alive.clone(), Arc::default()).await;
    let proxy = ProxyProcess::spawn(&config_text(primary.addr, replica.addr, "delay = \"0s\"", ""));
    let before = proxy.peak_rss();

    let resp = client()
        .get(format!("http://{}{}", proxy.addr, obj("big.mov")))
        .header("x-forwarded-user", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-mediaroute-upstream"], "replica");
    assert_eq!(resp.headers()["content-length"], len.to_string().as_str());
    let mut stream = resp.bytes_stream();
    let mut offset = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        // Spot-check the pattern at a few places per chunk (cheap in debug builds).
        for i in [0, chunk.len() / 2, chunk.len() - 1] {
            assert_eq!(chunk[i], pattern_byte(offset + i as u64), "byte {}", offset + i as u64);
        }
        offset += chunk.len() as u64;
    }
    assert_eq!(offset, len);
    let peak = proxy.peak_rss();
    eprintln!("256 MiB download: proxy peak RSS {} KiB (before: {} KiB)", peak / 1024, before / 1024);
    assert!(peak < 64 * MIB, "proxy peak RSS {} MiB (was {} MiB before the download)", peak / MIB, before / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_streams_to_the_primary_with_bounded_memory() {
    let len = 128 * MIB;
    let received = Arc::new(AtomicU64::new(0));
    let primary = pattern_server(0, Arc::default(), received.clone()).await;
    let replica = pattern_server(0, Arc::default(), Arc::default()).await;
    let proxy = ProxyProcess::spawn(&config_text(primary.addr, replica.addr, "delay = \"0s\"", ""));
    let chunks = futures_util::stream::iter(
        (0..len / MIB).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; MIB as usize]))),
    );
    let resp = client()
        .put(format!("http://{}{}", proxy.addr, obj("upload.mov")))
        .header("x-forwarded-user", "alice")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mediaroute-reason"], "write");
    assert_eq!(received.load(Ordering::SeqCst), len);
    assert_eq!(replica.hits.load(Ordering::SeqCst), 0);
    eprintln!("128 MiB upload: proxy peak RSS {} KiB", proxy.peak_rss() / 1024);
    assert!(proxy.peak_rss() < 64 * MIB, "proxy peak RSS {} MiB", proxy.peak_rss() / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hang_up_cancels_the_upstream_download() {
    let alive = Arc::new(AtomicUsize::new(0));
    // Far more than any buffer on the way: the upstream must notice the hang-up.
    let primary = pattern_server(100 * 1024 * MIB, alive.clone(), Arc::default()).await;
    let replica = pattern_server(100 * 1024 * MIB, alive.clone(), Arc::default()).await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    let resp = client()
        .get(format!("http://{}{}", proxy.addr, obj("endless.mov")))
        .header("x-forwarded-user", "alice")
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut got = 0;
    while got < 4 * MIB {
        got += stream.next().await.unwrap().unwrap().len() as u64;
    }
    assert_eq!(alive.load(Ordering::SeqCst), 1, "one upstream stream in flight");
    drop(stream);
    let mut waited = Duration::ZERO;
    while alive.load(Ordering::SeqCst) != 0 && waited < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    assert_eq!(alive.load(Ordering::SeqCst), 0, "upstream body still being produced after the client left");
}
