//! HTTPS upstreams (README "HTTPS upstreams"): an upstream behind rustls with a private CA
//! made in the test; SNI and verification always on; an unknown CA is refused, never
//! trusted; `ca_file` is re-read on reload.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::pki::{self, Ca, TlsUpstream};
use common::*;
use mediaroute::config;
use mediaroute::server::{self, Running};

/// An HTTPS upstream whose certificate `ca` signed, for `localhost` and 127.0.0.1; it
/// answers with `body` and the path it was asked for.
async fn origin(ca: &Ca, body: &'static str) -> TlsUpstream {
    let leaf = ca.leaf("origin.studio.test", &["localhost", "127.0.0.1"], 2040);
    pki::tls_upstream(&leaf, move |req: http::Request<hyper::body::Incoming>| async move {
        http::Response::new(full(format!("{body} {}", req.uri().path())))
    })
    .await
}

/// The test config with `primary` and `replica` URLs and extra upstream lines, written to `dir`.
async fn write_config(dir: &Path, primary: &str, primary_extra: &str, replica: &str, replica_extra: &str) -> Running {
    let text = config_text("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "delay = \"0s\"", "")
        .replace("url = \"http://127.0.0.1:1\"", &format!("url = \"{primary}\"\n{primary_extra}"))
        .replace("url = \"http://127.0.0.1:2\"", &format!("url = \"{replica}\"\n{replica_extra}"));
    let path = pki::write(dir, "mediaroute.toml", &text);
    let cfg = config::load(&path).expect("valid config");
    server::start(cfg).await.expect("proxy starts")
}

async fn get(proxy: &Running, user: &str) -> Answer {
    get_via(proxy.addr, &obj("clip.mov"), user).await
}

#[tokio::test]
async fn a_private_ca_upstream_is_verified_with_its_ca_file_and_sni() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("studio private CA");
    pki::write(dir.path(), "ca.pem", &ca.pem());
    let primary = origin(&ca, "primary-tls").await;
    let replica = status_server(404).await;
    let by_name = format!("https://localhost:{}", primary.addr.port());
    let proxy =
        write_config(dir.path(), &by_name, "ca_file = \"ca.pem\"", &format!("http://{}", replica.addr), "").await;
    let a = get(&proxy, "carol").await;
    assert_eq!((a.status, a.body.as_str()), (200, "primary-tls /studio-media/clip.mov"), "{a:?}");
    assert_eq!(primary.sni.lock().unwrap().as_slice(), [Some("localhost".to_string())]);
    // The pool keeps the verified connection: a second request makes no new handshake.
    assert_eq!(get(&proxy, "carol").await.status, 200);
    assert_eq!(primary.sni.lock().unwrap().len(), 1);
    let view = mediaroute::admin::config_view(&proxy.proxy);
    assert!(view.contains("ca.pem"), "{view}");

    // By IP address: verified against the certificate's IP name (no SNI is sent for an IP).
    let ip_dir = tempfile::tempdir().unwrap();
    pki::write(ip_dir.path(), "ca.pem", &ca.pem());
    let by_ip = format!("https://127.0.0.1:{}", primary.addr.port());
    let proxy =
        write_config(ip_dir.path(), &by_ip, "ca_file = \"ca.pem\"", &format!("http://{}", replica.addr), "").await;
    assert_eq!(get(&proxy, "carol").await.status, 200);
}

#[tokio::test]
async fn an_upstream_with_an_unknown_ca_is_refused_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = Ca::new("the origin's CA");
    let ours = Ca::new("a CA mediaroute trusts");
    pki::write(dir.path(), "ca.pem", &ours.pem());
    let primary = origin(&theirs, "primary-tls").await;
    let replica = status_server(404).await;
    let url = format!("https://localhost:{}", primary.addr.port());
    let proxy = write_config(dir.path(), &url, "ca_file = \"ca.pem\"", &format!("http://{}", replica.addr), "").await;
    let a = get(&proxy, "carol").await;
    assert_eq!(a.status, 502, "{a:?}");
    assert!(!a.body.contains("primary-tls"));
    assert!(primary.handshakes_failed.load(Ordering::SeqCst) >= 1);

    // Without ca_file the system roots apply: a private CA is not among them.
    let no_ca_dir = tempfile::tempdir().unwrap();
    let proxy = write_config(no_ca_dir.path(), &url, "", &format!("http://{}", replica.addr), "").await;
    assert_eq!(get(&proxy, "carol").await.status, 502);
    assert!(primary.sni.lock().unwrap().is_empty(), "no request got through");
}

#[tokio::test]
async fn a_replica_with_an_unknown_ca_falls_back_to_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let (theirs, ours) = (Ca::new("replica's CA"), Ca::new("trusted CA"));
    pki::write(dir.path(), "ca.pem", &ours.pem());
    let replica = origin(&theirs, "replica-tls").await;
    let primary = mediaroute::demo::store::serve(loopback0(), mediaroute::demo::store::Store::new("p")).await.unwrap();
    primary.store.put(&obj("clip.mov"), "primary", SystemTime::now() - Duration::from_secs(3600));
    let url = format!("https://localhost:{}", replica.addr.port());
    let proxy = write_config(dir.path(), &format!("http://{}", primary.addr), "", &url, "ca_file = \"ca.pem\"").await;
    let a = get(&proxy, "alice").await;
    assert_eq!(
        (a.status, a.upstream.as_str(), a.reason.as_str(), a.body.as_str()),
        (200, "primary", "fallback", "primary")
    );
    let m = proxy.proxy.metrics().render();
    assert_eq!(metric(&m, "mediaroute_fallbacks_total{cause=\"connect\"}"), 1.0, "{m}");
}

#[tokio::test]
async fn a_reload_re_reads_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (right, wrong) = (Ca::new("the origin's CA"), Ca::new("last year's CA"));
    pki::write(dir.path(), "ca.pem", &wrong.pem());
    let primary = origin(&right, "primary-tls").await;
    let replica = status_server(404).await;
    let url = format!("https://localhost:{}", primary.addr.port());
    let proxy = write_config(dir.path(), &url, "ca_file = \"ca.pem\"", &format!("http://{}", replica.addr), "").await;
    assert_eq!(get(&proxy, "carol").await.status, 502);

    pki::write(dir.path(), "ca.pem", &right.pem());
    proxy.reload().await.expect("reload accepted");
    let a = get(&proxy, "carol").await;
    assert_eq!((a.status, a.body.as_str()), (200, "primary-tls /studio-media/clip.mov"), "{a:?}");

    // A CA file that is not PEM on reload: refused, the loaded one stays.
    pki::write(dir.path(), "ca.pem", "garbage\n");
    let e = proxy.reload().await.expect_err("refused").to_string();
    assert!(e.contains("primary.ca_file") && e.contains("no certificate found"), "{e}");
    assert_eq!(get(&proxy, "carol").await.status, 200);

    // A CA that no longer trusts the origin: the pooled connection, verified under the
    // old CA, is not reused after the reload.
    pki::write(dir.path(), "ca.pem", &wrong.pem());
    proxy.reload().await.expect("reload accepted");
    assert_eq!(get(&proxy, "carol").await.status, 502);
}
