//! Fallback to the primary, replica health, and unreachable upstreams.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::*;
use mediaroute::demo::store::{self, Store};

const OLD: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn replica_404_falls_back_to_the_primary() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("legacy.mov", false, OLD);
    let a = s.get_as(&obj("legacy.mov"), Some("alice"), None).await;
    assert_eq!(
        (a.status, a.upstream.as_str(), a.reason.as_str(), a.body.as_str()),
        (200, "primary", "fallback", "primary:legacy.mov")
    );
    assert_eq!(s.replica.store.hits(), 1, "the replica was asked first");
}

#[tokio::test]
async fn replica_403_and_5xx_fall_back() {
    for status in [403, 500, 503] {
        let replica = status_server(status).await;
        let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
        primary.store.put(&obj("a.mov"), "primary", SystemTime::now() - OLD);
        let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"15m\"", "")).await;
        let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
        assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "fallback", "primary"), "replica {status}");
        assert_eq!(replica.hits.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn replica_connect_failure_falls_back() {
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    primary.store.put(&obj("a.mov"), "primary", SystemTime::now() - OLD);
    let dead = closed_port();
    let proxy = start_proxy(&config_text(primary.addr, dead.addr, "delay = \"15m\"", "")).await;
    let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
    assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "fallback", "primary"));
}

#[tokio::test]
async fn primary_404_after_fallback_is_passed_on() {
    let s = Setup::new("delay = \"0s\"").await;
    let a = s.get_as(&obj("nowhere.mov"), Some("alice"), None).await;
    assert_eq!((a.status, a.reason.as_str()), (404, "fallback"));
    assert!(a.body.contains("NoSuchKey"), "{}", a.body);
}

#[tokio::test]
async fn without_fallback_the_replica_answer_stands() {
    let s = Setup::new("delay = \"0s\"\nfallback = false").await;
    s.media("legacy.mov", false, OLD);
    let a = s.get_as(&obj("legacy.mov"), Some("alice"), None).await;
    assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (404, "replica", "replica"));
    assert_eq!(s.primary.store.hits(), 0);
}

#[tokio::test]
async fn without_fallback_an_unreachable_replica_is_a_502() {
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    let dead = closed_port();
    let proxy = start_proxy(&config_text(primary.addr, dead.addr, "delay = \"0s\"\nfallback = false", "")).await;
    let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
    assert_eq!(a.status, 502);
    assert_eq!(a.headers["content-type"], "application/xml");
    assert!(a.body.contains("<Code>BadGateway</Code>"), "{}", a.body);
}

#[tokio::test]
async fn unreachable_primary_is_a_502_with_an_s3_error() {
    let replica = store::serve(loopback0(), Store::new("r")).await.unwrap();
    let dead = closed_port();
    let proxy = start_proxy(&config_text(dead.addr, replica.addr, "delay = \"0s\"", "")).await;
    let resp = client().put(format!("http://{}{}", proxy.addr, obj("a.mov"))).body("x").send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-mediaroute-upstream"], "primary");
    let body = resp.text().await.unwrap();
    assert!(body.contains("<Code>BadGateway</Code>") && body.contains("primary unreachable"), "{body}");
}

#[tokio::test]
async fn a_dead_replica_is_marked_down_and_comes_back_by_itself() {
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    primary.store.put(&obj("a.mov"), "primary", SystemTime::now() - OLD);
    let dead = closed_port();
    let tail = "[health]\nfall = 3\nrise = 1\ninterval = \"100ms\"\ntimeout = \"100ms\"";
    let proxy = start_proxy(&config_text(primary.addr, dead.addr, "delay = \"15m\"", tail)).await;
    let path = obj("a.mov");
    let get = || get_via(proxy.addr, &path, "alice");
    for _ in 0..3 {
        assert_eq!(get().await.reason, "fallback");
    }
    // After three connect failures the replica is not tried any more.
    let a = get().await;
    assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "replica-down", "primary"));

    // The replica comes back on the same address: within a few retry intervals it is used again.
    // The held socket itself starts listening, so the port is never free for another test.
    let store = Store::new("r");
    store.put(&format!("/{RB}/a.mov"), "replica", SystemTime::now() - OLD);
    let _back = store::serve_on(dead.socket.listen(1024).unwrap(), store).unwrap();
    let mut reason = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        reason = get().await.reason;
        if reason == "replica" {
            break;
        }
    }
    assert_eq!(reason, "replica");
}

#[tokio::test]
async fn head_requests_fall_back_too() {
    let s = Setup::new("delay = \"0s\"").await;
    s.media("legacy.mov", false, OLD);
    let resp = s.client.head(s.url(&obj("legacy.mov"))).header("x-forwarded-user", "alice").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mediaroute-reason"], "fallback");
    assert_eq!(resp.headers()["content-length"], "18");
}

/// A server that accepts connections and reads requests but never answers.
async fn silent_server() -> TestServer {
    serve_fn(loopback0(), |_req| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        http::Response::new(full(""))
    })
    .await
}

#[tokio::test]
async fn a_replica_that_never_answers_falls_back_after_the_header_timeout() {
    let replica = silent_server().await;
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    primary.store.put(&obj("a.mov"), "primary", SystemTime::now() - OLD);
    let tail = "[limits]\nupstream_header_timeout = \"300ms\"\nupstream_connect_timeout = \"100ms\"";
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", tail)).await;
    let started = std::time::Instant::now();
    let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
    assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "fallback", "primary"));
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_primary_that_never_answers_gives_504() {
    let primary = silent_server().await;
    let replica = status_server(200).await;
    let tail = "[limits]\nupstream_header_timeout = \"300ms\"\nupstream_connect_timeout = \"100ms\"";
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", tail)).await;
    let resp = client().put(format!("http://{}{}", proxy.addr, obj("a.mov"))).body("x").send().await.unwrap();
    let a = Answer::from(resp).await;
    assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (504, "primary", "write"));
    assert!(a.body.contains("<Code>GatewayTimeout</Code>"), "{}", a.body);
}

#[tokio::test]
async fn a_replica_failing_mid_body_is_not_retried() {
    // Promises 1 MiB, sends 10 bytes, then drops the connection.
    let raw_replica =
        raw_upstream(&b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n0123456789"[..], Then::Close).await;
    let replica_addr = raw_replica.addr;
    let primary = store::serve(loopback0(), Store::new("p")).await.unwrap();
    let proxy = start_proxy(&config_text(primary.addr, replica_addr, "delay = \"0s\"", "")).await;
    let resp = client()
        .get(format!("http://{}{}", proxy.addr, obj("a.mov")))
        .header("x-forwarded-user", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-mediaroute-upstream"], "replica");
    assert!(resp.bytes().await.is_err(), "the client must see the download break, not a spliced body");
    assert_eq!(primary.store.hits(), 0, "nothing is retried once bytes went to the client");
}

#[tokio::test]
async fn age_probe_refusals_route_to_the_primary() {
    // A primary that refuses HEAD (403, 500) or answers it without Last-Modified.
    for (status, last_modified) in [(403u16, true), (500, true), (200, false)] {
        let primary = serve_fn(loopback0(), move |req: http::Request<hyper::body::Incoming>| async move {
            let mut r = http::Response::new(full("primary"));
            if req.method() == http::Method::HEAD {
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                if last_modified {
                    r.headers_mut().insert("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
                }
            }
            r
        })
        .await;
        let replica = status_server(200).await;
        let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"15m\"", "")).await;
        let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
        assert_eq!((a.upstream.as_str(), a.reason.as_str()), ("primary", "age-unknown"), "HEAD {status}");
        assert_eq!(replica.hits.load(Ordering::SeqCst), 0);
    }
}
