//! Replication status from the primary probe (README "The primary probe"): `COMPLETED`
//! serves from the replica at once, `PENDING`/`FAILED` stay on the primary past the delay,
//! and the time an object took to replicate is recorded.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;

/// What the fake primary says of each key: its replication status (if any) and its age.
type Objects = Arc<Mutex<HashMap<String, (Option<&'static str>, SystemTime)>>>;

/// A primary that answers with `x-amz-replication-status` and `Last-Modified` per key.
async fn primary(objects: Objects) -> TestServer {
    serve_fn(loopback0(), move |req: http::Request<hyper::body::Incoming>| {
        let objects = Arc::clone(&objects);
        async move {
            let key = req.uri().path().rsplit('/').next().unwrap_or("").to_string();
            let found = objects.lock().unwrap().get(&key).copied();
            let Some((status, modified)) = found else {
                let mut r = http::Response::new(full("no such key"));
                *r.status_mut() = http::StatusCode::NOT_FOUND;
                return r;
            };
            let mut r = http::Response::new(full(format!("primary:{key}")));
            r.headers_mut().insert("last-modified", httpdate::fmt_http_date(modified).parse().unwrap());
            if let Some(s) = status {
                r.headers_mut().insert("x-amz-replication-status", s.parse().unwrap());
            }
            r
        }
    })
    .await
}

fn ago(secs: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(secs)
}

async fn rig(replication: &str) -> (Objects, TestServer, TestServer, mediaroute::server::Running) {
    let objects: Objects = Arc::default();
    let primary = primary(Arc::clone(&objects)).await;
    let replica = status_server(200).await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, replication, "")).await;
    (objects, primary, replica, proxy)
}

#[tokio::test]
async fn the_status_decides_over_the_delay() {
    let (objects, _primary, replica, proxy) = rig("delay = \"15m\"").await;
    {
        let mut o = objects.lock().unwrap();
        o.insert("pending.mov".into(), (Some("PENDING"), ago(86_400)));
        o.insert("failed.mov".into(), (Some("FAILED"), ago(86_400)));
        o.insert("completed.mov".into(), (Some("COMPLETED"), ago(60)));
        o.insert("replica-copy.mov".into(), (Some("REPLICA"), ago(60)));
        o.insert("none-young.mov".into(), (None, ago(60)));
        o.insert("none-old.mov".into(), (None, ago(86_400)));
    }
    let want = [
        ("pending.mov", "primary", "not-replicated"),
        ("failed.mov", "primary", "not-replicated"),
        ("completed.mov", "replica", "replica"),
        ("replica-copy.mov", "primary", "too-young"),
        ("none-young.mov", "primary", "too-young"),
        ("none-old.mov", "replica", "replica"),
    ];
    for (key, upstream, reason) in want {
        let a = get_via(proxy.addr, &obj(key), "alice").await;
        assert_eq!((a.upstream.as_str(), a.reason.as_str()), (upstream, reason), "{key}");
    }
    assert_eq!(replica.hits.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn without_use_status_the_delay_alone_decides() {
    let (objects, _primary, _replica, proxy) = rig("delay = \"15m\"\nuse_status = false").await;
    objects.lock().unwrap().insert("completed.mov".into(), (Some("COMPLETED"), ago(60)));
    objects.lock().unwrap().insert("pending.mov".into(), (Some("PENDING"), ago(86_400)));
    let a = get_via(proxy.addr, &obj("completed.mov"), "alice").await;
    assert_eq!(a.reason, "too-young");
    let a = get_via(proxy.addr, &obj("pending.mov"), "alice").await;
    assert_eq!(a.reason, "replica");
}

#[tokio::test]
async fn the_time_an_object_took_to_replicate_is_recorded() {
    let (objects, primary, _replica, proxy) = rig("delay = \"15m\"").await;
    let hits = || primary.hits.load(std::sync::atomic::Ordering::SeqCst);
    objects.lock().unwrap().insert("new.mov".into(), (Some("PENDING"), ago(30)));
    let a = get_via(proxy.addr, &obj("new.mov"), "alice").await;
    assert_eq!(a.reason, "not-replicated");
    objects.lock().unwrap().insert("new.mov".into(), (Some("COMPLETED"), ago(30)));
    // PENDING is asked again only after two seconds.
    let a = get_via(proxy.addr, &obj("new.mov"), "alice").await;
    assert_eq!(a.reason, "not-replicated", "still the cached PENDING");
    let before = hits();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for _ in 0..3 {
        let a = get_via(proxy.addr, &obj("new.mov"), "alice").await;
        assert_eq!((a.upstream.as_str(), a.reason.as_str()), ("replica", "replica"));
    }
    assert_eq!(hits(), before + 1, "one probe, then COMPLETED is kept");
    let m = proxy.proxy.metrics().render();
    assert_eq!(metric(&m, "mediaroute_replication_lag_seconds_count"), 1.0, "{m}");
    let sum = metric(&m, "mediaroute_replication_lag_seconds_sum");
    assert!((32.0..40.0).contains(&sum), "from Last-Modified to the probe that saw COMPLETED: {sum}");
    // An object first seen COMPLETED says nothing of how long it took.
    objects.lock().unwrap().insert("done.mov".into(), (Some("COMPLETED"), ago(30)));
    get_via(proxy.addr, &obj("done.mov"), "alice").await;
    let m = proxy.proxy.metrics().render();
    assert_eq!(metric(&m, "mediaroute_replication_lag_seconds_count"), 1.0);
}
