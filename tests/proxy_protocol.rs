//! PROXY protocol v1/v2 on the listeners (README "Behind an NLB"): headers written by the
//! test byte for byte, the routing decision following the header's address, and
//! connections without a valid header closed and counted.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::{self, Ca};
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mediaroute::server::Running;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every request is anonymous and `auto`: the client address alone decides.
fn proxied(p: std::net::SocketAddr, r: std::net::SocketAddr, tail: &str) -> String {
    config_text(p, r, "delay = \"0s\"", tail)
        .replace("[listen]\naddr = \"127.0.0.1:0\"", "[listen]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true")
        .replace("default_mode = \"no\"", "default_mode = \"auto\"")
}

async fn setup(tail: &str) -> Setup {
    let s = Setup::with_config(|p, r| proxied(p, r, tail)).await;
    s.media("clip.mov", true, Duration::from_secs(3600));
    s
}

/// Sends `header`, then a GET over HTTP/1.1 on the same connection; (status, upstream).
async fn get_after<S>(mut io: S, header: &[u8], xff: Option<&str>) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    io.write_all(header).await.unwrap();
    http1_get(io, xff).await
}

async fn http1_get<S>(io: S, xff: Option<&str>) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(obj("clip.mov")).header("host", "media.test");
    if let Some(x) = xff {
        req = req.header("x-forwarded-for", x);
    }
    let resp = send.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let upstream = resp.headers().get("x-mediaroute-upstream").map(|v| v.to_str().unwrap().to_string());
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    (status, upstream.unwrap_or_default())
}

/// A v2 header: PROXY command over TCP, IPv4 or IPv6, written byte for byte.
fn v2(src: std::net::SocketAddr, dst: std::net::SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    let (family, mut addrs) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (0x11, [s.octets(), d.octets()].concat()), // TCP over IPv4
        (IpAddr::V6(s), IpAddr::V6(d)) => (0x21, [s.octets(), d.octets()].concat()), // TCP over IPv6
        _ => unreachable!("one family"),
    };
    h.push(family);
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    // An AWS TLV (type 0xEA: the VPC endpoint id), which mediaroute ignores.
    let tlv = [&[0xEA, 0x00, 0x05, 0x01][..], b"vpce"].concat();
    h.extend_from_slice(&((addrs.len() + tlv.len()) as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h.extend_from_slice(&tlv);
    h
}

/// The v2 LOCAL command (a load balancer's health check): no address.
const V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

async fn connect(s: &Running) -> TcpStream {
    TcpStream::connect(s.addr).await.unwrap()
}

#[tokio::test]
async fn the_decision_follows_the_address_in_the_header() {
    let s = setup("").await;
    let p = &s.proxy;
    let v1_in = format!("PROXY TCP4 {INSIDE} 127.0.0.1 51000 8080\r\n");
    let v1_out = format!("PROXY TCP4 {OUTSIDE} 127.0.0.1 51000 8080\r\n");
    assert_eq!(get_after(connect(p).await, v1_in.as_bytes(), None).await, (200, "replica".into()));
    assert_eq!(get_after(connect(p).await, v1_out.as_bytes(), None).await, (200, "primary".into()));
    let v1_6 = "PROXY TCP6 2001:db8::7 ::1 51000 8080\r\n";
    assert_eq!(get_after(connect(p).await, v1_6.as_bytes(), None).await, (200, "replica".into()));

    let dst: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let inside = v2(format!("{INSIDE}:51000").parse().unwrap(), dst);
    let outside = v2(format!("{OUTSIDE}:51000").parse().unwrap(), dst);
    assert_eq!(get_after(connect(p).await, &inside, None).await, (200, "replica".into()));
    assert_eq!(get_after(connect(p).await, &outside, None).await, (200, "primary".into()));
    let v6 = v2("[2001:db8::9]:51000".parse().unwrap(), "[::1]:8080".parse().unwrap());
    assert_eq!(get_after(connect(p).await, &v6, None).await, (200, "replica".into()));

    // LOCAL and v1 UNKNOWN: the TCP peer (loopback, outside the replica networks).
    assert_eq!(get_after(connect(p).await, V2_LOCAL, None).await, (200, "primary".into()));
    assert_eq!(get_after(connect(p).await, b"PROXY UNKNOWN\r\n", None).await, (200, "primary".into()));
}

#[tokio::test]
async fn the_header_address_is_the_peer_that_x_forwarded_for_is_believed_from() {
    let s = setup("").await;
    let p = &s.proxy;
    // Loopback is a trusted proxy: its X-Forwarded-For names the client.
    let trusted = b"PROXY TCP4 127.0.0.9 127.0.0.1 51000 8080\r\n";
    assert_eq!(get_after(connect(p).await, trusted, Some(INSIDE)).await, (200, "replica".into()));
    // An untrusted client cannot claim an inside address.
    let untrusted = format!("PROXY TCP4 {OUTSIDE} 127.0.0.1 51000 8080\r\n");
    assert_eq!(get_after(connect(p).await, untrusted.as_bytes(), Some(INSIDE)).await, (200, "primary".into()));
    // Without PROXY protocol the TCP peer (loopback, trusted) would have been believed:
    // the header, not the socket, is the peer.
    let inside_untrusted = format!("PROXY TCP4 {INSIDE} 127.0.0.1 51000 8080\r\n");
    assert_eq!(
        get_after(connect(p).await, inside_untrusted.as_bytes(), Some(OUTSIDE)).await,
        (200, "replica".into()),
        "the XFF of an untrusted peer is ignored"
    );
}

/// Sends `bytes`, then waits for the server to close; true if it closed within `limit`
/// without sending anything.
async fn closed_silently(s: &Running, bytes: &[u8], then_close: bool, limit: Duration) -> bool {
    let mut conn = connect(s).await;
    conn.write_all(bytes).await.unwrap();
    if then_close {
        conn.shutdown().await.unwrap();
    }
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(limit, conn.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("the server answered: {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(_) => false,
    }
}

#[tokio::test]
async fn connections_without_a_valid_header_are_closed_and_counted() {
    let s = setup("[limits]\nhandshake_timeout = \"300ms\"").await;
    let p = &s.proxy;
    let quick = Duration::from_secs(2);
    let started = Instant::now();
    // No header at all: a plain request.
    assert!(closed_silently(p, b"GET /studio-media/clip.mov HTTP/1.1\r\nHost: x\r\n\r\n", false, quick).await);
    // Garbage, a broken v1 line, a bad v2 version.
    assert!(closed_silently(p, b"\x00\x01garbage\r\n", false, quick).await);
    assert!(closed_silently(p, b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n", false, quick).await);
    let mut bad_version = V2_LOCAL.to_vec();
    bad_version[12] = 0x30;
    assert!(closed_silently(p, &bad_version, false, quick).await);
    assert!(started.elapsed() < Duration::from_millis(300), "refused at once: {:?}", started.elapsed());
    // A truncated header, then the client closes.
    assert!(closed_silently(p, b"PROXY TCP4 10.20.1.2 127.0", true, quick).await);
    // A truncated header, then silence: closed when handshake_timeout (300 ms) passes.
    let started = Instant::now();
    assert!(
        closed_silently(
            p,
            &v2(format!("{INSIDE}:1").parse().unwrap(), "127.0.0.1:2".parse().unwrap())[..20],
            false,
            quick
        )
        .await
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "{took:?}");

    let m = p.proxy.metrics().render();
    let count = |r: &str| metric(&m, &format!("mediaroute_proxy_protocol_refusals_total{{reason=\"{r}\"}}"));
    assert_eq!((count("invalid"), count("closed"), count("timeout")), (4.0, 1.0, 1.0), "{m}");
    // No request reached an upstream.
    assert_eq!(s.primary.store.hits(), 0);
}

#[tokio::test]
async fn the_header_comes_before_tls_on_the_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mediaroute test CA");
    let leaf = ca.leaf("media.studio.test", &["localhost"], 2040);
    pki::write(dir.path(), "cert.pem", &leaf.cert);
    pki::write(dir.path(), "key.pem", &leaf.key);
    let primary = mediaroute::demo::store::serve(loopback0(), mediaroute::demo::store::Store::new("p")).await.unwrap();
    let replica = mediaroute::demo::store::serve(loopback0(), mediaroute::demo::store::Store::new("r")).await.unwrap();
    let at = std::time::SystemTime::now() - Duration::from_secs(3600);
    primary.store.put(&obj("clip.mov"), "primary", at);
    replica.store.put(&format!("/{RB}/clip.mov"), "replica", at);
    let text = proxied(primary.addr, replica.addr, "").replace(
        "proxy_protocol = true",
        "proxy_protocol = true\ntls_addr = \"127.0.0.1:0\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"",
    );
    let path = pki::write(dir.path(), "mediaroute.toml", &text);
    let proxy = mediaroute::server::start(mediaroute::config::load(&path).unwrap()).await.unwrap();
    let tls_addr = proxy.tls_addr.unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki::client_config(&ca.pem()));
    for (src, want) in [(INSIDE, "replica"), (OUTSIDE, "primary")] {
        let mut tcp = TcpStream::connect(tls_addr).await.unwrap();
        tcp.write_all(&v2(format!("{src}:40000").parse().unwrap(), tls_addr)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.expect("TLS after the PROXY header");
        assert_eq!(http1_get(tls, None).await, (200, want.to_string()), "from {src}");
    }
    // A TLS client that skips the header is closed before its handshake completes.
    let tcp = TcpStream::connect(tls_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(connector.connect(name, tcp).await.is_err());
    let m = proxy.proxy.metrics().render();
    assert_eq!(metric(&m, "mediaroute_proxy_protocol_refusals_total{reason=\"invalid\"}"), 1.0, "{m}");
}
