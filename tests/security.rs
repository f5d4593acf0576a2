//! Bucket mapping and refusal, identity spoofing, what reaches the upstream.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OLD: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn replica_requests_use_the_replica_bucket() {
    let primary = echo_server().await;
    let replica = echo_server().await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    let resp = client()
        .get(format!("http://{}{}?versionId=7", proxy.addr, obj("dir/a b%20c.mov")))
        .header("x-forwarded-user", "alice")
        .send()
        .await
        .unwrap();
    let body = resp.text().await.unwrap();
    assert!(body.starts_with(&format!("GET /{RB}/dir/a%20b%20c.mov?versionId=7\n")), "{body}");
    // Writes keep the primary bucket.
    let resp = client().put(format!("http://{}{}", proxy.addr, obj("x.mov"))).body("abc").send().await.unwrap();
    let body = resp.text().await.unwrap();
    assert!(body.starts_with(&format!("PUT /{PB}/x.mov\n")), "{body}");
    assert!(body.contains("body-bytes: 3"), "{body}");
}

#[tokio::test]
async fn a_foreign_bucket_is_refused_and_never_forwarded() {
    let s = Setup::new("delay = \"15m\"").await;
    for path in ["/other-bucket/a.mov", "/", "//studio-media/a.mov", "/studio-media-eu/a.mov", "/studio-mediax/a.mov"] {
        let a = s.get_as(path, Some("alice"), None).await;
        assert_eq!(a.status, 403, "{path}");
        assert!(a.body.contains("<Code>AccessDenied</Code>"), "{}", a.body);
        let put = s.client.put(s.url(path)).body("x").send().await.unwrap();
        assert_eq!(put.status(), 403, "{path}");
    }
    assert_eq!(s.primary.store.hits() + s.replica.store.hits(), 0);
}

/// Sends raw bytes to the proxy and returns the raw response head and body.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn absolute_uris_and_host_headers_cannot_redirect_the_proxy() {
    let primary = echo_server().await;
    let replica = echo_server().await;
    let elsewhere = echo_server().await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    let target = format!("http://{}{}", elsewhere.addr, obj("a.mov"));
    let req = format!("GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", elsewhere.addr);
    let resp = raw(proxy.addr, &req).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(&format!("host: {}", primary.addr)), "{resp}");
    let req = format!(
        "PUT {} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        obj("a.mov"),
        elsewhere.addr
    );
    let resp = raw(proxy.addr, &req).await;
    assert!(resp.contains(&format!("host: {}", primary.addr)), "{resp}");
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn malformed_requests_get_a_400() {
    let s = Setup::new("delay = \"15m\"").await;
    let resp = raw(s.proxy.addr, "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("<Code>InvalidRequest</Code>"), "{resp}");
    let resp =
        raw(s.proxy.addr, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n")
            .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let resp = raw(s.proxy.addr, "GET /a b c HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(s.primary.store.hits() + s.replica.store.hits(), 0);
}

#[tokio::test]
async fn untrusted_peers_cannot_claim_a_user_or_an_address() {
    let primary = mediaroute::demo::store::serve(loopback0(), mediaroute::demo::store::Store::new("p")).await.unwrap();
    let replica = mediaroute::demo::store::serve(loopback0(), mediaroute::demo::store::Store::new("r")).await.unwrap();
    // Nothing on loopback is trusted here, so the test client is an ordinary client.
    let text = config_text(primary.addr, replica.addr, "delay = \"0s\"\ndefault_mode = \"auto\"", "")
        .replace("default_mode = \"no\"\n", "")
        .replace("[\"127.0.0.0/8\", \"::1/128\"]", "[\"192.0.2.0/24\"]");
    let proxy = start_proxy(&text).await;
    replica.store.put(&format!("/{RB}/a.mov"), "replica", std::time::SystemTime::now());
    primary.store.put(&obj("a.mov"), "primary", std::time::SystemTime::now());
    // Claims to be alice (mode yes) from inside the networks: both ignored.
    let resp = client()
        .get(format!("http://{}{}?user=alice", proxy.addr, obj("a.mov")))
        .header("x-forwarded-user", "alice")
        .header("x-forwarded-for", INSIDE)
        .send()
        .await
        .unwrap();
    let a = Answer::from(resp).await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("outside-networks", "primary"));
}

#[tokio::test]
async fn left_most_forwarded_for_is_not_believed() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("a.mov", true, OLD);
    // The client prepends an inside address; the trusted hop appended the real one.
    let a = s.get_as(&obj("a.mov"), Some("bob"), Some(&format!("{INSIDE}, {OUTSIDE}"))).await;
    assert_eq!(a.reason, "outside-networks");
    let a = s.get_as(&obj("a.mov"), Some("bob"), Some(&format!("{OUTSIDE}, {INSIDE}"))).await;
    assert_eq!(a.reason, "replica");
}

#[tokio::test]
async fn identity_and_hop_by_hop_headers_do_not_reach_the_upstream() {
    let primary = echo_server().await;
    let replica = echo_server().await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    let resp = client()
        .get(format!("http://{}{}?user=alice&partNumber=1", proxy.addr, obj("a.mov")))
        .header("x-forwarded-user", "alice")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("te", "trailers")
        .header("authorization", "AWS4-HMAC-SHA256 Credential=abc")
        .header("range", "bytes=0-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-mediaroute-upstream"], "replica");
    let body = resp.text().await.unwrap();
    assert!(body.starts_with(&format!("GET /{RB}/a.mov?partNumber=1\n")), "{body}");
    for gone in ["x-forwarded-user", "x-private", "te:", "user=alice"] {
        assert!(!body.contains(gone), "{gone} leaked:\n{body}");
    }
    for kept in ["authorization: AWS4-HMAC-SHA256 Credential=abc", "range: bytes=0-1", "x-forwarded-for: 127.0.0.1"] {
        assert!(body.contains(kept), "{kept} missing:\n{body}");
    }
    assert!(body.contains(&format!("host: {}", replica.addr)), "{body}");
}

#[tokio::test]
async fn dot_segments_are_refused_before_any_upstream_sees_them() {
    let s = Setup::new("delay = \"15m\"").await;
    for path in ["/studio-media/../other/key", "/studio-media/%2e%2E/other/key", "/studio-media/./key"] {
        let req = format!("PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let resp = raw(s.proxy.addr, &req).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
        assert!(resp.contains("<Code>InvalidRequest</Code>"), "{resp}");
    }
    assert_eq!(s.primary.store.hits() + s.replica.store.hits(), 0);
}

/// A proxy process with a JSON access log, where `alice` and `dave` both have mode `yes`.
fn two_yes_users(s: &Setup) -> ProxyProcess {
    let tail = "dave = \"yes\"\n[log]\nformat = \"json\"";
    ProxyProcess::spawn(&config_text(s.primary.addr, s.replica.addr, "delay = \"15m\"", tail))
}

/// The `user` field of the access log line for `path` (waits for the line).
async fn logged_user(proxy: &ProxyProcess, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = proxy.log_lines("mediaroute::access");
        let mut entries = lines.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        if let Some(v) = entries.find(|v| v["path"] == path) {
            return v["user"].as_str().unwrap_or_default().to_string();
        }
        assert!(Instant::now() < deadline, "no access line for {path}: {lines:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_header_sent_twice_is_not_believed() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("one.mov", true, OLD);
    s.media("two.mov", true, OLD);
    let proxy = two_yes_users(&s);
    let url = |key: &str| format!("http://{}{}", proxy.addr, obj(key));
    // Control: one user alone is believed and sent to the replica.
    let one = Answer::from(s.client.get(url("one.mov")).header("x-forwarded-user", "dave").send().await.unwrap()).await;
    assert_eq!((one.reason.as_str(), one.body.as_str()), ("replica", "replica:one.mov"));
    assert_eq!(logged_user(&proxy, &obj("one.mov")).await, "dave");
    // The client sent "alice"; the trusted gateway appended "dave". Both have mode yes, so
    // believing either value (first or last) would route to the replica: only an anonymous
    // request (default mode no) gets "mode-no".
    let resp = s
        .client
        .get(url("two.mov"))
        .header("x-forwarded-user", "alice")
        .header("x-forwarded-user", "dave")
        .send()
        .await
        .unwrap();
    let a = Answer::from(resp).await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("mode-no", "primary:two.mov"), "anonymous, not alice or dave");
    assert_eq!(logged_user(&proxy, &obj("two.mov")).await, "-", "the request is anonymous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_query_parameter_sent_twice_is_not_believed() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("one.mov", true, OLD);
    s.media("two.mov", true, OLD);
    let proxy = two_yes_users(&s);
    let url = |key: &str, query: &str| format!("http://{}{}?{query}", proxy.addr, obj(key));
    // Control: the parameter alone is believed and sends the user to the replica.
    let one = Answer::from(s.client.get(url("one.mov", "user=dave")).send().await.unwrap()).await;
    assert_eq!((one.reason.as_str(), one.body.as_str()), ("replica", "replica:one.mov"));
    assert_eq!(logged_user(&proxy, &obj("one.mov")).await, "dave");
    // Two yes users: believing the first or the last would route to the replica.
    let a = Answer::from(s.client.get(url("two.mov", "user=alice&user=dave")).send().await.unwrap()).await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("mode-no", "primary:two.mov"), "anonymous, not alice or dave");
    assert_eq!(logged_user(&proxy, &obj("two.mov")).await, "-", "the request is anonymous");
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let primary = serve_fn(loopback0(), |_req| async move {
        let mut r = http::Response::new(full("body"));
        r.headers_mut().insert("connection", "x-upstream-secret".parse().unwrap());
        r.headers_mut().insert("x-upstream-secret", "1".parse().unwrap());
        r.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
        r.headers_mut().insert("x-amz-request-id", "abc".parse().unwrap());
        r
    })
    .await;
    let replica = status_server(200).await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    let a = get_via(proxy.addr, &obj("a.mov"), "carol").await;
    assert_eq!(a.body, "body");
    assert!(a.headers.get("x-upstream-secret").is_none());
    assert!(a.headers.get("keep-alive").is_none());
    assert_eq!(a.headers["x-amz-request-id"], "abc");
}
