//! Authenticated S3 on both sides (README "Authentication"): two s3s-fs servers that verify
//! SigV4, the primary with the client's key, the replica with a key only mediaroute has.
//! Clients sign with the aws-sigv4 crate for the primary bucket, as an SDK would.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_smithy_runtime_api::client::identity::Identity;
use common::*;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

const CLIENT_KEY: (&str, &str) = ("AKIDCLIENT", "client-secret-key");
const MEDIAROUTE_KEY: (&str, &str) = ("AKIDMEDIAROUTE", "mediaroute-secret-key");
const PRIMARY_REGION: &str = "us-east-1";
const REPLICA_REGION: &str = "eu-west-1";

/// One request as an S3 server saw it: method, raw target, and the access key it was
/// signed with (from the `Authorization` header or the presigned query), if any.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    key_id: Option<String>,
    host: String,
}

/// A real S3 server that verifies SigV4 for one key, on loopback port 0.
struct S3 {
    addr: SocketAddr,
    root: tempfile::TempDir,
    bucket: &'static str,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl S3 {
    async fn start(bucket: &'static str, key: (&str, &str)) -> S3 {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(bucket)).unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(key.0, key.1));
        let service = builder.build();
        let listener = TcpListener::bind(loopback0()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let http = Builder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                let (service, log) = (service.clone(), Arc::clone(&log));
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    log.lock().unwrap().push(Seen {
                        method: req.method().to_string(),
                        target: req.uri().to_string(),
                        key_id: key_id(&req),
                        host: req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_string(),
                    });
                    hyper::service::Service::call(&service, req)
                });
                let conn = http.serve_connection(TokioIo::new(socket), svc).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3 { addr, root, bucket, seen, task }
    }

    /// Writes an object straight to disk, `age` old (s3s-fs reports the file's mtime).
    fn put(&self, key: &str, body: &str, age: Duration) {
        let path = self.root.path().join(self.bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, body).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The access key id a request was signed with.
fn key_id<B>(req: &http::Request<B>) -> Option<String> {
    let from_header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| Some(a.split_once("Credential=")?.1.split('/').next()?.to_string()));
    let from_query = || {
        req.uri().query()?.split('&').find_map(|p| {
            let v = p.strip_prefix("X-Amz-Credential=")?;
            Some(v.split("%2F").next()?.to_string())
        })
    };
    from_header.or_else(from_query)
}

/// A key encoded as S3 SDKs encode a key into a path: every byte but unreserved ones and `/`.
fn sdk_path(bucket: &str, key: &str) -> String {
    let mut out = format!("/{bucket}/");
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How the client signs.
#[derive(Clone, Copy)]
enum Signed {
    /// `Authorization` header.
    Header,
    /// A presigned URL valid for `lasts` from `at`.
    Presigned { at: SystemTime, lasts: Duration },
}

/// Signs a request as an SDK would for the primary bucket: `host` is the name signed for,
/// `target` the encoded path and query, `headers` the extra headers (signed too).
fn signed_request(
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    key: (&str, &str),
    how: Signed,
) -> http::Request<()> {
    let creds = Credentials::new(key.0, key.1, None, None, "test");
    let identity = Identity::from(creds);
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let (time, body) = match how {
        Signed::Header => {
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            (SystemTime::now(), SignableBody::Bytes(&[]))
        }
        Signed::Presigned { at, lasts } => {
            settings.signature_location = SignatureLocation::QueryParams;
            settings.expires_in = Some(lasts);
            (at, SignableBody::UnsignedPayload)
        }
    };
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(PRIMARY_REGION)
        .name("s3")
        .time(time)
        .settings(settings)
        .build()
        .unwrap()
        .into();
    let uri = format!("http://{host}{target}");
    let mut all = vec![("host", host)];
    all.extend_from_slice(headers);
    let signable = SignableRequest::new(method, uri.clone(), all.iter().copied(), body).unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut req = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(()).unwrap();
    instructions.apply_to_request_http1x(&mut req);
    req
}

/// Sends a request signed for some host to the proxy at `proxy`, with the `Host` header
/// the client signed for, as `alice` (mode yes).
async fn send_via(proxy: SocketAddr, req: http::Request<()>) -> Answer {
    let target = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let mut out = client().request(req.method().clone(), format!("http://{proxy}{target}"));
    for (k, v) in req.headers() {
        out = out.header(k, v);
    }
    Answer::from(out.header("x-forwarded-user", "alice").send().await.unwrap()).await
}

/// Both S3 servers and mediaroute, with the replica signed by mediaroute's own key from a
/// credentials file (profile `mediaroute`). `extra` goes into `[replication]`.
struct Rig {
    primary: S3,
    replica: S3,
    proxy: mediaroute::server::Running,
    _keys: tempfile::TempDir,
}

impl Rig {
    async fn new(replication: &str, replica_secret: &str, primary_extra: &str) -> Rig {
        let primary = S3::start(PB, CLIENT_KEY).await;
        let replica = S3::start(RB, MEDIAROUTE_KEY).await;
        let keys = tempfile::tempdir().unwrap();
        let file = keys.path().join("aws-credentials");
        // A decoy default profile: the chosen profile must be the one used.
        std::fs::write(
            &file,
            format!(
                "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = nope\n\n\
                 [mediaroute]\naws_access_key_id = {}\naws_secret_access_key = {replica_secret}\n",
                MEDIAROUTE_KEY.0
            ),
        )
        .unwrap();
        let text = config_text(primary.addr, replica.addr, replication, "")
            .replace(
                &format!("bucket = \"{RB}\""),
                &format!(
                    "bucket = \"{RB}\"\nauth = \"sigv4\"\nregion = \"{REPLICA_REGION}\"\n\
                     credentials_file = \"{}\"\nprofile = \"mediaroute\"",
                    file.display()
                ),
            )
            .replace(&format!("bucket = \"{PB}\""), &format!("bucket = \"{PB}\"\n{primary_extra}"));
        let proxy = start_proxy(&text).await;
        Rig { primary, replica, proxy, _keys: keys }
    }

    /// An object on both sides, old enough, with bodies that say where they came from.
    fn media(&self, key: &str) {
        self.primary.put(key, &format!("primary:{key}"), Duration::from_secs(7200));
        self.replica.put(key, &format!("replica:{key}"), Duration::from_secs(7200));
    }

    /// Signed for the primary's own address, which is the `Host` mediaroute sends it.
    fn signed(&self, method: &str, key: &str, headers: &[(&str, &str)], how: Signed) -> http::Request<()> {
        signed_request(method, &self.primary.addr.to_string(), &sdk_path(PB, key), headers, CLIENT_KEY, how)
    }

    fn metrics(&self) -> String {
        self.proxy.proxy.metrics().render()
    }
}

/// A presigned URL made now, valid for ten minutes.
fn presigned_now() -> Signed {
    Signed::Presigned { at: SystemTime::now(), lasts: Duration::from_secs(600) }
}

#[tokio::test]
async fn signed_downloads_are_served_by_the_replica_with_mediaroutes_own_signature() {
    let rig = Rig::new("delay = \"15m\"", MEDIAROUTE_KEY.1, "").await;
    rig.media("shots/a.mov");
    let cases = [
        ("GET", vec![], Signed::Header, 200, "replica:shots/a.mov"),
        ("HEAD", vec![], Signed::Header, 200, ""),
        ("GET", vec![("range", "bytes=8-11")], Signed::Header, 206, "shot"),
        ("GET", vec![], presigned_now(), 200, "replica:shots/a.mov"),
        ("GET", vec![("range", "bytes=0-6")], presigned_now(), 206, "replica"),
    ];
    for (method, headers, how, status, body) in cases {
        let a = send_via(rig.proxy.addr, rig.signed(method, "shots/a.mov", &headers, how)).await;
        let what = format!("{method} {headers:?}: {a:?}");
        assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (status, "replica", "replica"), "{what}");
        assert_eq!(a.body, body, "{what}");
    }
    // The replica saw only mediaroute's key, for its own bucket and host; the primary only the client's.
    let replica = rig.replica.seen();
    assert_eq!(replica.len(), 5, "{replica:?}");
    for s in &replica {
        assert_eq!(s.key_id.as_deref(), Some(MEDIAROUTE_KEY.0), "{s:?}");
        assert!(s.target.starts_with(&format!("/{RB}/shots/a.mov")), "{s:?}");
        assert!(!s.target.contains("X-Amz-"), "presign parameters never reach the replica: {s:?}");
        assert_eq!(s.host, format!("s3.{REPLICA_REGION}.amazonaws.com"));
    }
    let primary = rig.primary.seen();
    assert!(primary.iter().all(|s| s.key_id.as_deref() == Some(CLIENT_KEY.0)), "{primary:?}");
    assert_eq!(primary.len(), 5, "one probe each, as the client's own method: {primary:?}");
    assert_eq!(primary.iter().filter(|s| s.method == "HEAD").count(), 1);
    let m = rig.metrics();
    assert_eq!(metric(&m, "mediaroute_probes_total{result=\"ok\"}"), 5.0, "{m}");
}

#[tokio::test]
async fn a_client_the_primary_refuses_never_reaches_the_replica() {
    let rig = Rig::new("delay = \"0s\"", MEDIAROUTE_KEY.1, "").await;
    rig.media("secret.mov");
    let wrong = ("AKIDCLIENT", "not-the-secret");
    let target = sdk_path(PB, "secret.mov");
    let host = rig.primary.addr.to_string();
    let expired =
        Signed::Presigned { at: SystemTime::now() - Duration::from_secs(7200), lasts: Duration::from_secs(60) };
    let refused = [
        signed_request("GET", &host, &target, &[], wrong, Signed::Header),
        signed_request("HEAD", &host, &target, &[], wrong, Signed::Header),
        signed_request("GET", &host, &target, &[], wrong, presigned_now()),
        signed_request("GET", &host, &target, &[], CLIENT_KEY, expired),
        // Signed for a GET, sent as a HEAD: a signature covers the method.
        {
            let mut r = signed_request("GET", &host, &target, &[], CLIENT_KEY, Signed::Header);
            *r.method_mut() = http::Method::HEAD;
            r
        },
    ];
    for (i, req) in refused.into_iter().enumerate() {
        let a = send_via(rig.proxy.addr, req).await;
        assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (403, "primary", "denied"), "case {i}: {a:?}");
    }
    // Unsigned too: the bucket is private.
    let a = get_via(rig.proxy.addr, &obj("secret.mov"), "alice").await;
    assert_eq!((a.status, a.reason.as_str()), (403, "denied"));
    assert!(rig.replica.seen().is_empty(), "the replica saw: {:?}", rig.replica.seen());
    let m = rig.metrics();
    assert_eq!(metric(&m, "mediaroute_probes_total{result=\"denied\"}"), 6.0, "{m}");
    assert_eq!(
        metric(&m, "mediaroute_requests_total{upstream=\"primary\",reason=\"denied\",status_class=\"4xx\"}"),
        6.0
    );
}

#[tokio::test]
async fn keys_with_awkward_characters_sign_correctly_on_both_sides() {
    let rig = Rig::new("delay = \"0s\"", MEDIAROUTE_KEY.1, "").await;
    let keys = [
        "with space.mov",
        "plus+sign.mov",
        "per%cent.mov",
        "colon:at@dollar$.mov",
        "paren(1)'quote!*.mov",
        "unicodé/ファイル.mov",
        "double//slash.mov",
        "semi;comma,eq=amp&.mov",
    ];
    for key in keys {
        rig.media(key);
    }
    for key in keys {
        for how in [Signed::Header, presigned_now()] {
            let a = send_via(rig.proxy.addr, rig.signed("GET", key, &[], how)).await;
            assert_eq!((a.status, a.upstream.as_str()), (200, "replica"), "{key}: {a:?}");
            assert_eq!(a.body, format!("replica:{key}"), "{key}");
        }
    }
    let denied = metric(&rig.metrics(), "mediaroute_fallbacks_total{cause=\"denied\"}");
    assert_eq!(denied, 0.0, "no signature was refused by the replica");
}

#[tokio::test]
async fn a_replica_miss_falls_back_with_the_clients_own_request() {
    let rig = Rig::new("delay = \"0s\"", MEDIAROUTE_KEY.1, "").await;
    rig.primary.put("only-primary.mov", "primary:only-primary.mov", Duration::from_secs(7200));
    for how in [Signed::Header, presigned_now()] {
        let a = send_via(rig.proxy.addr, rig.signed("GET", "only-primary.mov", &[], how)).await;
        assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (200, "primary", "fallback"), "{a:?}");
        assert_eq!(a.body, "primary:only-primary.mov");
    }
    let m = rig.metrics();
    assert_eq!(metric(&m, "mediaroute_fallbacks_total{cause=\"not-found\"}"), 2.0, "{m}");
    // The fallback is the client's own request: its key, its signature, the primary bucket.
    let primary = rig.primary.seen();
    assert_eq!(primary.len(), 4, "a probe and a fallback each: {primary:?}");
    assert!(primary.iter().all(|s| s.key_id.as_deref() == Some(CLIENT_KEY.0)));
}

#[tokio::test]
async fn a_replica_that_refuses_mediaroutes_key_is_counted_as_denied() {
    let rig = Rig::new("delay = \"0s\"", "a-wrong-secret", "").await;
    rig.media("k.mov");
    let a = send_via(rig.proxy.addr, rig.signed("GET", "k.mov", &[], Signed::Header)).await;
    assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (200, "primary", "fallback"), "{a:?}");
    assert_eq!(a.body, "primary:k.mov");
    let m = rig.metrics();
    assert_eq!(metric(&m, "mediaroute_fallbacks_total{cause=\"denied\"}"), 1.0, "{m}");
}

#[tokio::test]
async fn with_preserve_host_a_client_may_sign_for_mediaroutes_own_name() {
    let rig = Rig::new("delay = \"0s\"", MEDIAROUTE_KEY.1, "preserve_host = true").await;
    rig.media("own-name.mov");
    // An SDK whose endpoint is mediaroute signs for mediaroute's address.
    let host = rig.proxy.addr.to_string();
    let target = sdk_path(PB, "own-name.mov");
    for how in [Signed::Header, presigned_now()] {
        let req = signed_request("GET", &host, &target, &[], CLIENT_KEY, how);
        let a = send_via(rig.proxy.addr, req).await;
        assert_eq!((a.status, a.upstream.as_str()), (200, "replica"), "{a:?}");
        assert_eq!(a.body, "replica:own-name.mov");
    }
    let primary = rig.primary.seen();
    assert!(primary.iter().all(|s| s.host == host), "the primary got the client's Host: {primary:?}");
    // A write goes to the primary with the client's Host too, so its signature holds.
    let put = signed_request("PUT", &host, &sdk_path(PB, "new.mov"), &[], CLIENT_KEY, Signed::Header);
    let a = send_via(rig.proxy.addr, put).await;
    assert_eq!((a.status, a.reason.as_str()), (200, "write"), "{a:?}");
}

#[tokio::test]
async fn a_presigned_urls_success_is_remembered_until_it_expires() {
    let rig = Rig::new("delay = \"15m\"", MEDIAROUTE_KEY.1, "").await;
    rig.media("p.mov");
    let how = Signed::Presigned { at: SystemTime::now(), lasts: Duration::from_secs(3) };
    let url = rig.signed("GET", "p.mov", &[], how);
    let again = || {
        let mut r = http::Request::new(());
        *r.uri_mut() = url.uri().clone();
        r
    };
    for _ in 0..3 {
        let a = send_via(rig.proxy.addr, again()).await;
        assert_eq!((a.status, a.upstream.as_str()), (200, "replica"), "{a:?}");
    }
    assert_eq!(rig.primary.seen().len(), 1, "one probe for the same URL");
    // A header-signed request is never remembered.
    for _ in 0..2 {
        let a = send_via(rig.proxy.addr, rig.signed("GET", "p.mov", &[], Signed::Header)).await;
        assert_eq!(a.upstream, "replica");
    }
    assert_eq!(rig.primary.seen().len(), 3);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let a = send_via(rig.proxy.addr, again()).await;
    assert_eq!((a.status, a.upstream.as_str(), a.reason.as_str()), (403, "primary", "denied"), "{a:?}");
    assert!(rig.replica.seen().len() == 5, "the expired URL never reached the replica");
}

#[tokio::test]
async fn only_true_presigned_urls_are_remembered() {
    let rig = Rig::new("delay = \"15m\"", MEDIAROUTE_KEY.1, "").await;
    rig.media("f.mov");
    // A header-signed request whose query merely looks presigned is never remembered: the
    // same target without the header must be refused by the primary again.
    // (Lower-case names: the primary ignores them and accepts the header signature.)
    let fake = "?x-amz-algorithm=AWS4-HMAC-SHA256&x-amz-credential=x&x-amz-signature=z\
                &x-amz-date=20991231T000000Z&x-amz-expires=604800&x-amz-signedheaders=host";
    let target = format!("{}{fake}", sdk_path(PB, "f.mov"));
    let host = rig.primary.addr.to_string();
    let first = signed_request("GET", &host, &target, &[], CLIENT_KEY, Signed::Header);
    let a = send_via(rig.proxy.addr, first).await;
    assert_eq!((a.status, a.upstream.as_str()), (200, "replica"), "{a:?}");
    let bare = get_via(rig.proxy.addr, &target, "alice").await;
    assert_eq!((bare.status, bare.upstream.as_str(), bare.reason.as_str()), (403, "primary", "denied"), "{bare:?}");
    // A URL that signs a Range is not remembered: its Range is not in its target.
    let ranged = rig.signed("GET", "f.mov", &[("range", "bytes=0-1")], presigned_now());
    let a = send_via(rig.proxy.addr, ranged).await;
    assert_eq!((a.status, a.upstream.as_str()), (206, "replica"));
    let before = rig.primary.seen().len();
    let a = send_via(rig.proxy.addr, rig.signed("GET", "f.mov", &[("range", "bytes=0-1")], presigned_now())).await;
    assert_eq!(a.upstream, "replica");
    assert_eq!(rig.primary.seen().len(), before + 1, "probed again");
}
