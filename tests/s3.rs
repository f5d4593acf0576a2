//! Against a real S3 implementation (s3s-fs): Last-Modified ages, NoSuchKey fallback,
//! ranges, and a multipart upload that reaches only the primary.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

/// A real S3 server on loopback port 0, rooted at a fresh directory holding `bucket`.
struct S3 {
    addr: SocketAddr,
    root: tempfile::TempDir,
    bucket: &'static str,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl S3 {
    async fn start(bucket: &'static str) -> S3 {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(bucket)).unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        // No auth configured: anonymous path-style requests are served.
        let service = S3ServiceBuilder::new(fs).build();
        let listener = TcpListener::bind(loopback0()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let http = Builder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3 { addr, root, bucket, task }
    }

    /// Writes an object straight to disk with the given age (s3s-fs reports the file mtime).
    fn put_aged(&self, key: &str, body: &str, age: Duration) {
        let path = self.root.path().join(self.bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, body).unwrap();
        set_age(&path, age);
    }

    fn has(&self, key: &str) -> bool {
        self.root.path().join(self.bucket).join(key).exists()
    }
}

fn set_age(path: &Path, age: Duration) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

async fn setup(replication: &str) -> (S3, S3, mediaroute::server::Running) {
    let primary = S3::start(PB).await;
    let replica = S3::start(RB).await;
    let proxy = start_proxy(&config_text(primary.addr, replica.addr, replication, "")).await;
    (primary, replica, proxy)
}

#[tokio::test]
async fn ages_come_from_last_modified() {
    let (primary, replica, proxy) = setup("delay = \"15m\"").await;
    // Uploaded through the proxy just now: too young for the replica.
    let put = client()
        .put(format!("http://{}{}", proxy.addr, obj("new.mov")))
        .header("x-forwarded-user", "alice")
        .body("fresh")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(put.headers()["x-mediaroute-reason"], "write");
    assert!(primary.has("new.mov") && !replica.has("new.mov"));
    let a = get_via(proxy.addr, &obj("new.mov"), "alice").await;
    assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "too-young", "fresh"));

    // An hour old and replicated: the replica serves it.
    primary.put_aged("shots/old.mov", "from primary", Duration::from_secs(3600));
    replica.put_aged("shots/old.mov", "from replica", Duration::from_secs(3600));
    let a = get_via(proxy.addr, &obj("shots/old.mov"), "alice").await;
    assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "replica", "from replica"));
    assert!(a.headers.contains_key("last-modified"));
}

#[tokio::test]
async fn no_such_key_on_the_replica_falls_back() {
    let (primary, _replica, proxy) = setup("delay = \"15m\"").await;
    primary.put_aged("legacy/pilot.mov", "only on the primary", Duration::from_secs(400 * 86_400));
    let a = get_via(proxy.addr, &obj("legacy/pilot.mov"), "alice").await;
    assert_eq!((a.status, a.reason.as_str(), a.body.as_str()), (200, "fallback", "only on the primary"));
    // Missing everywhere: the primary's NoSuchKey reaches the client.
    let a = get_via(proxy.addr, &obj("legacy/none.mov"), "alice").await;
    assert_eq!(a.status, 404);
    assert!(a.body.contains("<Code>NoSuchKey</Code>"), "{}", a.body);
}

#[tokio::test]
async fn ranges_and_heads_against_real_s3() {
    let (primary, replica, proxy) = setup("delay = \"0s\"").await;
    primary.put_aged("clip.mov", "0123456789-primary", Duration::from_secs(7200));
    replica.put_aged("clip.mov", "0123456789-replica", Duration::from_secs(7200));
    let resp = client()
        .get(format!("http://{}{}", proxy.addr, obj("clip.mov")))
        .header("x-forwarded-user", "alice")
        .header("range", "bytes=11-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-range"], "bytes 11-17/18");
    assert_eq!(resp.text().await.unwrap(), "replica");
    let head = client()
        .head(format!("http://{}{}", proxy.addr, obj("clip.mov")))
        .header("x-forwarded-user", "carol")
        .send()
        .await
        .unwrap();
    assert_eq!((head.status().as_u16(), head.headers()["content-length"].to_str().unwrap()), (200, "18"));
    assert_eq!(head.headers()["x-mediaroute-upstream"], "primary");
}

/// Pulls `<Tag>value</Tag>` out of an XML body.
fn xml_value(body: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = body.find(&open).unwrap_or_else(|| panic!("no {tag} in {body}")) + open.len();
    let end = body[start..].find("</").unwrap() + start;
    body[start..end].to_string()
}

#[tokio::test]
async fn multipart_upload_reaches_only_the_primary() {
    let (primary, replica, proxy) = setup("delay = \"0s\"").await;
    let url = format!("http://{}{}", proxy.addr, obj("renders/final.exr"));
    let c = client();
    let init = c.post(format!("{url}?uploads")).header("x-forwarded-user", "alice").send().await.unwrap();
    assert_eq!(init.headers()["x-mediaroute-upstream"], "primary");
    let upload_id = xml_value(&init.text().await.unwrap(), "UploadId");

    let part1 = vec![b'a'; 5 * 1024 * 1024];
    let part2 = b"tail".to_vec();
    let mut etags = Vec::new();
    for (n, part) in [(1, part1.clone()), (2, part2.clone())] {
        let resp = c
            .put(format!("{url}?partNumber={n}&uploadId={upload_id}"))
            .header("x-forwarded-user", "alice")
            .body(part)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-mediaroute-reason"], "write");
        etags.push(resp.headers()["etag"].to_str().unwrap().to_string());
    }
    let complete = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{}</ETag></Part><Part><PartNumber>2</PartNumber><ETag>{}</ETag></Part></CompleteMultipartUpload>",
        etags[0], etags[1]
    );
    let done = c
        .post(format!("{url}?uploadId={upload_id}"))
        .header("x-forwarded-user", "alice")
        .body(complete)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200, "{}", done.text().await.unwrap());

    let stored = std::fs::read(primary.root.path().join(PB).join("renders/final.exr")).unwrap();
    assert_eq!(stored.len(), part1.len() + part2.len());
    assert!(stored.ends_with(b"tail"));
    assert!(!replica.has("renders/final.exr"));

    // Listing the parts of an upload is a sub-resource read: primary.
    let a = get_via(proxy.addr, &format!("{}?uploadId=x", obj("renders/final.exr")), "alice").await;
    assert_eq!(a.reason, "not-object");
}

#[tokio::test]
async fn health_checks_keep_a_real_s3_up() {
    let primary = S3::start(PB).await;
    let replica = S3::start(RB).await;
    // What made the old default path fail: a real S3 answers a bare `HEAD /` with 501.
    let bare = client().head(format!("http://{}/", replica.addr)).send().await.unwrap();
    assert_eq!(bare.status(), 501);
    primary.put_aged("old.mov", "from primary", Duration::from_secs(3600));
    replica.put_aged("old.mov", "from replica", Duration::from_secs(3600));
    // The primary is checked on its bucket (the default); the replica on `/`, its 501 included.
    let tail = "[health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\nrise = 1";
    let text = with_admin(&config_text(primary.addr, replica.addr, "delay = \"15m\"", tail))
        .replace(&format!("bucket = \"{RB}\""), &format!("bucket = \"{RB}\"\nhealth_path = \"/\""));
    let proxy = start_proxy(&text).await;
    // Ten check intervals: any failure would have marked an upstream down by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, m) = admin_get(proxy.admin_addr.unwrap(), "/metrics").await;
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"primary\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "mediaroute_upstream_up{upstream=\"replica\"}"), 1.0, "{m}");
    let a = get_via(proxy.addr, &obj("old.mov"), "alice").await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("replica", "from replica"));
}

#[tokio::test]
async fn overwrites_by_multipart_upload_or_copy_are_never_served_from_the_old_replica_copy() {
    let (primary, replica, proxy) = setup("delay = \"15m\"").await;
    for key in ["take.mov", "copied.mov"] {
        primary.put_aged(key, "take 1 on the primary", Duration::from_secs(3600));
        replica.put_aged(key, "take 1 on the replica", Duration::from_secs(3600));
        let a = get_via(proxy.addr, &obj(key), "alice").await;
        assert_eq!((a.reason.as_str(), a.body.as_str()), ("replica", "take 1 on the replica"), "{key}");
    }
    primary.put_aged("source.mov", "the copy source", Duration::from_secs(3600));

    // Overwrite take.mov with a one-part multipart upload through the proxy.
    let c = client();
    let url = format!("http://{}{}", proxy.addr, obj("take.mov"));
    let init = c.post(format!("{url}?uploads")).send().await.unwrap();
    let upload_id = xml_value(&init.text().await.unwrap(), "UploadId");
    let part = c.put(format!("{url}?partNumber=1&uploadId={upload_id}")).body("take 2").send().await.unwrap();
    let etag = part.headers()["etag"].to_str().unwrap().to_string();
    let complete = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part></CompleteMultipartUpload>"
    );
    let done = c.post(format!("{url}?uploadId={upload_id}")).body(complete).send().await.unwrap();
    assert_eq!(done.status(), 200);
    let a = get_via(proxy.addr, &obj("take.mov"), "alice").await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("too-young", "take 2"));

    // Overwrite copied.mov with a server-side copy through the proxy.
    let copy = c
        .put(format!("http://{}{}", proxy.addr, obj("copied.mov")))
        .header("x-amz-copy-source", format!("/{PB}/source.mov"))
        .send()
        .await
        .unwrap();
    assert_eq!(copy.status(), 200, "{}", copy.text().await.unwrap());
    let a = get_via(proxy.addr, &obj("copied.mov"), "alice").await;
    assert_eq!((a.reason.as_str(), a.body.as_str()), ("too-young", "the copy source"));
}
