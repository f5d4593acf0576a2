//! Every routing rule and reason over real HTTP, with two real upstream servers.

mod common;

use std::time::Duration;

use common::*;

const OLD: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn rule1_write_goes_to_the_primary_only() {
    let s = Setup::new("delay = \"15m\"").await;
    let body = vec![7u8; 3 * 1024 * 1024];
    let resp = s
        .client
        .put(s.url(&obj("up/new.mov")))
        .header("x-forwarded-user", "alice")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let a = Answer::from(resp).await;
    assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (200, "primary", "write"));
    assert_eq!(s.primary.store.get(&obj("up/new.mov")).unwrap().body.as_ref(), &body[..]);
    assert_eq!(s.replica.store.hits(), 0);
}

#[tokio::test]
async fn rule2_not_an_object() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("a.mov", true, OLD);
    for path in
        [format!("/{PB}"), format!("/{PB}/"), format!("{}?acl", obj("a.mov")), format!("{}?tagging", obj("a.mov"))]
    {
        let a = s.get_as(&path, Some("alice"), None).await;
        assert_eq!((a.upstream.as_str(), a.reason.as_str()), ("primary", "not-object"), "{path}");
    }
    assert_eq!(s.replica.store.hits(), 0);
}

#[tokio::test]
async fn rule3_mode_no_unknown_and_anonymous() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("a.mov", true, OLD);
    for user in [Some("carol"), Some("zed"), None] {
        let a = s.get_as(&obj("a.mov"), user, Some(INSIDE)).await;
        assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "mode-no", "primary:a.mov"), "{user:?}");
    }
}

#[tokio::test]
async fn default_mode_yes_applies_to_anonymous() {
    let primary = mediaroute::demo::store::serve(loopback0(), mediaroute::demo::store::Store::new("p")).await.unwrap();
    let replica = mediaroute::demo::store::serve(loopback0(), mediaroute::demo::store::Store::new("r")).await.unwrap();
    let text = config_text(primary.addr, replica.addr, "delay = \"0s\"", "")
        .replace("default_mode = \"no\"", "default_mode = \"yes\"");
    let proxy = start_proxy(&text).await;
    replica.store.put(&format!("/{RB}/k.mov"), "replica", std::time::SystemTime::now());
    let resp = client().get(format!("http://{}{}", proxy.addr, obj("k.mov"))).send().await.unwrap();
    let a = Answer::from(resp).await;
    assert_eq!((a.upstream.as_str(), a.reason.as_str(), a.body.as_str()), ("replica", "replica", "replica"));
}

#[tokio::test]
async fn rule4_auto_follows_the_client_network() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("a.mov", true, OLD);
    let inside = s.get_as(&obj("a.mov"), Some("bob"), Some(INSIDE)).await;
    assert_eq!((inside.reason.as_str(), inside.body.as_str()), ("replica", "replica:a.mov"));
    let v6 = s.get_as(&obj("a.mov"), Some("bob"), Some("2001:db8::42")).await;
    assert_eq!(v6.reason, "replica");
    let outside = s.get_as(&obj("a.mov"), Some("bob"), Some(OUTSIDE)).await;
    assert_eq!((outside.reason.as_str(), outside.body.as_str()), ("outside-networks", "primary:a.mov"));
    // No X-Forwarded-For: the loopback peer itself is the client, outside the networks.
    let direct = s.get_as(&obj("a.mov"), Some("bob"), None).await;
    assert_eq!(direct.reason, "outside-networks");
}

#[tokio::test]
async fn rule6_too_young_and_rule8_replica() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("young.mov", true, Duration::from_secs(60));
    s.media("old.mov", true, OLD);
    let young = s.get_as(&obj("young.mov"), Some("alice"), None).await;
    assert_eq!((young.reason.as_str(), young.body.as_str()), ("too-young", "primary:young.mov"));
    let old = s.get_as(&obj("old.mov"), Some("alice"), None).await;
    assert_eq!(
        (old.upstream.as_str(), old.reason.as_str(), old.body.as_str()),
        ("replica", "replica", "replica:old.mov")
    );
    // Missing on the primary: it cannot have replicated; the primary's 404 is passed on.
    let missing = s.get_as(&obj("nope.mov"), Some("alice"), None).await;
    assert_eq!((missing.status, missing.reason.as_str()), (404, "too-young"));
    assert!(missing.body.contains("NoSuchKey"));
}

#[tokio::test]
async fn old_objects_are_probed_once() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("old.mov", true, OLD);
    for _ in 0..5 {
        assert_eq!(s.get_as(&obj("old.mov"), Some("alice"), None).await.reason, "replica");
    }
    // One HEAD probe for five downloads.
    assert_eq!(s.primary.store.hits(), 1);
    assert_eq!(s.replica.store.hits(), 5);
}

#[tokio::test]
async fn rule7_age_unknown_when_the_probe_times_out() {
    // A primary that never answers HEAD within the probe timeout, but serves GET.
    let primary = serve_fn(loopback0(), |req: http::Request<hyper::body::Incoming>| async move {
        if req.method() == http::Method::HEAD {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        http::Response::new(full("primary"))
    })
    .await;
    let replica = status_server(200).await;
    let text = config_text(primary.addr, replica.addr, "delay = \"15m\"", "[limits]\nage_probe_timeout = \"200ms\"");
    let proxy = start_proxy(&text).await;
    let started = std::time::Instant::now();
    let a = get_via(proxy.addr, &obj("a.mov"), "alice").await;
    assert_eq!((a.upstream.as_str(), a.reason.as_str(), a.body.as_str()), ("primary", "age-unknown", "primary"));
    assert!(started.elapsed() < Duration::from_secs(4), "the probe timeout bounds the wait");
    assert_eq!(replica.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn zero_delay_tries_the_replica_without_probing() {
    let s = Setup::new("delay = \"0s\"").await;
    s.media("new.mov", true, Duration::ZERO);
    let a = s.get_as(&obj("new.mov"), Some("alice"), None).await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("replica", "replica:new.mov"));
    assert_eq!(s.primary.store.hits(), 0, "no probe with delay 0");
}

#[tokio::test]
async fn user_query_parameter_identifies_and_is_stripped() {
    // Upstreams that echo the request head, so the test sees exactly what reached them.
    let primary = echo_server().await;
    let replica = echo_server().await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"0s\"", "")).await;
    let base = format!("http://{}{}", proxy.addr, obj("a.mov"));
    // (query sent, user header sent, target the replica must see)
    let cases = [
        ("user=alice&versionId=7", None, format!("/{RB}/a.mov?versionId=7")),
        ("versionId=7&user=alice", None, format!("/{RB}/a.mov?versionId=7")),
        ("partNumber=2&user=alice&versionId=7", None, format!("/{RB}/a.mov?partNumber=2&versionId=7")),
        ("user=alice", None, format!("/{RB}/a.mov")),
        ("versionId=7&user=alice", Some("alice"), format!("/{RB}/a.mov?versionId=7")),
    ];
    for (query, header, target) in cases {
        let mut req = client().get(format!("{base}?{query}"));
        if let Some(u) = header {
            req = req.header("x-forwarded-user", u);
        }
        let a = Answer::from(req.send().await.unwrap()).await;
        // Alice (mode yes) was recognised: only she goes to the replica (anonymous is mode no).
        assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (200, "replica", "replica"), "{query}");
        let first = a.body.lines().next().unwrap_or_default();
        assert_eq!(first, format!("GET {target}"), "{query}:\n{}", a.body);
        assert!(!a.body.contains("user="), "the user parameter leaked ({query}):\n{}", a.body);
        assert!(!a.body.contains("x-forwarded-user"), "the user header leaked ({query}):\n{}", a.body);
    }
    assert_eq!(primary.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "delay 0s: no probe, no fallback");
}

#[tokio::test]
async fn range_conditional_and_head_pass_through() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("clip.mov", true, OLD);
    let ranged = s
        .client
        .get(s.url(&obj("clip.mov")))
        .header("x-forwarded-user", "alice")
        .header("range", "bytes=0-6")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.headers()["content-range"], "bytes 0-6/16");
    assert_eq!(ranged.text().await.unwrap(), "replica");

    let full = s.client.get(s.url(&obj("clip.mov"))).header("x-forwarded-user", "alice").send().await.unwrap();
    let etag = full.headers()["etag"].clone();
    let not_modified = s
        .client
        .get(s.url(&obj("clip.mov")))
        .header("x-forwarded-user", "alice")
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["x-mediaroute-upstream"], "replica");

    let head = s.client.head(s.url(&obj("clip.mov"))).header("x-forwarded-user", "alice").send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "16");
    assert_eq!(head.headers()["x-mediaroute-reason"], "replica");
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn cleartext_http2_clients_are_served() {
    let s = Setup::new("delay = \"15m\"").await;
    s.media("a.mov", true, OLD);
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();
    let resp = h2.get(s.url(&obj("a.mov"))).header("x-forwarded-user", "alice").send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let a = Answer::from(resp).await;
    assert_eq!((a.status, a.body.as_str()), (200, "replica:a.mov"));
}

#[tokio::test]
async fn cleartext_http2_uploads_stream_to_the_primary() {
    let s = Setup::new("delay = \"15m\"").await;
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();
    let body = vec![9u8; 2 * 1024 * 1024];
    let resp = h2.put(s.url(&obj("h2/upload.mov"))).body(body.clone()).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.headers()["x-mediaroute-reason"], "write");
    assert_eq!(s.primary.store.get(&obj("h2/upload.mov")).unwrap().body.len(), body.len());
    assert_eq!(s.replica.store.hits(), 0);
}

#[tokio::test]
async fn the_probe_is_the_clients_own_get_with_its_credentials_but_not_its_identity() {
    // The primary answers the probe only as the client's own GET for one byte (a signature
    // covers the method), with the right credentials and without the identity header.
    let primary = serve_fn(loopback0(), |req: http::Request<hyper::body::Incoming>| async move {
        let h = req.headers();
        let ok = h.get("authorization").is_some_and(|v| v == "AWS4-HMAC-SHA256 Credential=studio")
            && h.get("x-forwarded-user").is_none()
            && req.method() == http::Method::GET;
        let mut r = http::Response::new(full("p"));
        if h.get("range").is_some_and(|v| v == "bytes=0-0") {
            if ok {
                *r.status_mut() = http::StatusCode::PARTIAL_CONTENT;
                r.headers_mut().insert("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
            } else {
                *r.status_mut() = http::StatusCode::FORBIDDEN;
            }
        }
        r
    })
    .await;
    let replica = status_server(200).await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, "delay = \"15m\"", "")).await;
    let resp = client()
        .get(format!("http://{}{}", proxy.addr, obj("a.mov")))
        .header("x-forwarded-user", "alice")
        .header("authorization", "AWS4-HMAC-SHA256 Credential=studio")
        .header("range", "bytes=0-3")
        .send()
        .await
        .unwrap();
    let a = Answer::from(resp).await;
    assert_eq!((a.upstream.as_str(), a.reason.as_str()), ("replica", "replica"), "the probe was refused");
}
