//! mediaroute's own AWS credentials (`sign::credentials::Keys`) against real sources: a
//! shared-credentials file, and, in a child process with an environment of its own (the
//! process environment is never changed here), environment variables, the shared files
//! under `HOME`, a fake ECS container endpoint and a fake EC2 instance-metadata service
//! (IMDSv2), both on loopback.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{TestBody, full, loopback0, serve_fn};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use mediaroute::config::CredentialsSource;
use mediaroute::metrics::Metrics;
use mediaroute::sign::credentials::Keys;

/// Set in the environment of a child process; the `child_*` tests do nothing without it.
const CHILD: &str = "MEDIAROUTE_CREDENTIALS_CHILD";

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs the ignored test `name` of this binary in a child process whose whole environment
/// is `HOME=home` and `env`; panics with its output unless it ran and passed; its output.
async fn run_child(name: &str, home: &Path, env: &[(&str, &str)]) -> String {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([name, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env_clear()
        .env("HOME", home)
        .env(CHILD, "1")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("child {name} did not finish in 60 s"))
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "child {name} failed:\n{text}");
    text
}

/// Logs of a child test go to its stderr, for the parent to read.
fn log_to_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn chain(profile: Option<&str>) -> CredentialsSource {
    CredentialsSource { file: None, profile: profile.map(str::to_string) }
}

fn counted(metrics: &Metrics, result: &str) -> f64 {
    common::metric(&metrics.render(), &format!("mediaroute_credential_refreshes_total{{result=\"{result}\"}}"))
}

fn expiry_gauge(metrics: &Metrics) -> f64 {
    common::metric(&metrics.render(), "mediaroute_credentials_expiry_timestamp_seconds")
}

/// Waits up to `limit` for `cond`.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `t` as RFC 3339 in UTC, whole seconds.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[test]
fn rfc3339_is_right() {
    assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)), "2023-11-14T22:13:20Z");
    assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
}

/// The JSON both IMDS and ECS answer with.
fn credentials_json(key: &str, secret: &str, token: &str, expiration: SystemTime) -> String {
    format!(
        r#"{{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"{key}","SecretAccessKey":"{secret}","Token":"{token}","Expiration":"{}"}}"#,
        rfc3339(expiration)
    )
}

fn status(code: u16) -> Response<TestBody> {
    let mut r = Response::new(full(format!("status {code}")));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

// ---------------------------------------------------------------------------------------
// A credentials file and profile, in this process: no environment is read.

fn write(path: &Path, text: &str) {
    common::write_atomically(path, text);
}

const TWO_PROFILES: &str = "\
[default]
aws_access_key_id = DEFAULTKEY
aws_secret_access_key = default-secret-1

[media]
aws_access_key_id = MEDIAKEY1
aws_secret_access_key = media-secret-1
aws_session_token = media-session-1
";

#[tokio::test]
async fn the_file_and_profile_chosen_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("aws-credentials");
    write(&file, TWO_PROFILES);
    let metrics = Arc::new(Metrics::new());
    let source = CredentialsSource { file: Some(file.clone()), profile: Some("media".into()) };
    let media = Keys::start(source, Arc::clone(&metrics), Duration::from_secs(5)).await;
    let creds = media.current().expect("credentials from the file");
    assert_eq!(creds.access_key_id(), "MEDIAKEY1");
    assert!(creds.secret_access_key() == "media-secret-1", "the media profile's secret");
    assert_eq!(creds.session_token(), Some("media-session-1"));
    assert_eq!(creds.expiry(), None, "keys from a file do not expire");
    assert_eq!(counted(&metrics, "ok"), 1.0);
    assert_eq!(expiry_gauge(&metrics), 0.0);

    let default =
        Keys::start(CredentialsSource { file: Some(file), profile: None }, metrics, Duration::from_secs(5)).await;
    assert_eq!(default.current().expect("the default profile").access_key_id(), "DEFAULTKEY");

    let debug = format!("{media:?} {creds:?}");
    assert!(debug.contains("MEDIAKEY1"), "{debug}");
    assert!(!debug.contains("media-secret") && !debug.contains("media-session"), "a secret in Debug: {debug}");
}

#[tokio::test]
async fn reload_picks_up_an_edited_file_and_keeps_the_keys_when_it_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("aws-credentials");
    write(&file, TWO_PROFILES);
    let metrics = Arc::new(Metrics::new());
    let source = CredentialsSource { file: Some(file.clone()), profile: Some("media".into()) };
    let keys = Keys::start(source.clone(), Arc::clone(&metrics), Duration::from_secs(5)).await;
    assert_eq!(keys.current().unwrap().access_key_id(), "MEDIAKEY1");

    // Rotated keys in the same file.
    write(&file, &TWO_PROFILES.replace("MEDIAKEY1", "MEDIAKEY2").replace("media-secret-1", "media-secret-2"));
    keys.reload(source.clone()).await.expect("the edited file loads");
    let creds = keys.current().unwrap();
    assert_eq!(creds.access_key_id(), "MEDIAKEY2");
    assert!(creds.secret_access_key() == "media-secret-2", "the new secret");
    assert_eq!(counted(&metrics, "ok"), 2.0);

    // A file that does not parse: an error without the secrets, and the keys stay.
    write(&file, "[media]\naws_access_key_id = MEDIAKEY3\naws_secret_access_key = media-secret-3\n[broken\n");
    let err = keys.reload(source.clone()).await.expect_err("a broken file");
    let text = format!("{err} {err:?}");
    assert!(text.contains(&file.display().to_string()), "the error names the file: {text}");
    for secret in ["media-secret", "media-session"] {
        assert!(!text.contains(secret), "a secret in the error: {text}");
    }
    assert_eq!(keys.current().unwrap().access_key_id(), "MEDIAKEY2");
    assert_eq!(counted(&metrics, "error"), 1.0);

    // A profile the file lacks.
    write(&file, TWO_PROFILES);
    let missing = CredentialsSource { file: Some(file.clone()), profile: Some("nobody".into()) };
    let err = keys.reload(missing).await.expect_err("no such profile");
    assert!(err.to_string().contains("nobody"), "{err}");
    assert_eq!(keys.current().unwrap().access_key_id(), "MEDIAKEY2");
    assert_eq!(counted(&metrics, "error"), 2.0);

    // A new source replaces the old one.
    let other = dir.path().join("other-credentials");
    write(&other, "[default]\naws_access_key_id = OTHERKEY\naws_secret_access_key = other-secret\n");
    keys.reload(CredentialsSource { file: Some(other), profile: None }).await.expect("the other file");
    assert_eq!(keys.current().unwrap().access_key_id(), "OTHERKEY");
    assert_eq!(counted(&metrics, "ok"), 3.0);
}

#[tokio::test]
async fn a_source_that_fails_at_start_is_tried_again_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-yet");
    let metrics = Arc::new(Metrics::new());
    let source = CredentialsSource { file: Some(file.clone()), profile: None };
    let started = std::time::Instant::now();
    let keys = Keys::start(source, Arc::clone(&metrics), Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "a failing source does not hold up the start");
    assert!(keys.current().is_none());
    assert_eq!(counted(&metrics, "error"), 1.0);

    write(&file, "[default]\naws_access_key_id = LATEKEY\naws_secret_access_key = late-secret\n");
    eventually(Duration::from_secs(5), "the retry", || keys.current().is_some()).await;
    assert_eq!(keys.current().unwrap().access_key_id(), "LATEKEY");
    assert_eq!(counted(&metrics, "ok"), 1.0);
}

// ---------------------------------------------------------------------------------------
// The standard chain, each in a child process with its own environment.

const HOME_CREDENTIALS: &str = "\
[default]
aws_access_key_id = HOMEDEFAULT
aws_secret_access_key = home-secret-default

[media]
aws_access_key_id = HOMEMEDIA
aws_secret_access_key = home-secret-media
";

fn home_with_credentials() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::write(home.path().join(".aws/credentials"), HOME_CREDENTIALS).unwrap();
    home
}

#[tokio::test]
async fn environment_variables_come_first() {
    let home = home_with_credentials();
    let env = [
        ("AWS_ACCESS_KEY_ID", "ENVKEY"),
        ("AWS_SECRET_ACCESS_KEY", "env-secret-1"),
        ("AWS_SESSION_TOKEN", "env-session-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let out = run_child("child_environment_variables", home.path(), &env).await;
    assert!(!out.contains("env-secret") && !out.contains("env-session"), "a secret in the logs:\n{out}");
}

#[tokio::test]
#[ignore = "run by environment_variables_come_first in a child process"]
async fn child_environment_variables() {
    if !in_child() {
        return;
    }
    log_to_stderr();
    let metrics = Arc::new(Metrics::new());
    let keys = Keys::start(chain(None), Arc::clone(&metrics), Duration::from_secs(5)).await;
    let creds = keys.current().expect("credentials from the environment");
    assert_eq!(creds.access_key_id(), "ENVKEY", "the variables win over ~/.aws/credentials");
    assert!(creds.secret_access_key() == "env-secret-1", "the secret from AWS_SECRET_ACCESS_KEY");
    assert!(creds.session_token() == Some("env-session-1"), "the token from AWS_SESSION_TOKEN");
    assert_eq!(creds.expiry(), None);
    assert_eq!(counted(&metrics, "ok"), 1.0);
}

#[tokio::test]
async fn the_shared_credentials_file_in_home_with_a_profile() {
    let home = home_with_credentials();
    let out = run_child("child_shared_file", home.path(), &[("AWS_EC2_METADATA_DISABLED", "true")]).await;
    assert!(!out.contains("home-secret"), "a secret in the logs:\n{out}");
}

#[tokio::test]
#[ignore = "run by the_shared_credentials_file_in_home_with_a_profile in a child process"]
async fn child_shared_file() {
    if !in_child() {
        return;
    }
    log_to_stderr();
    let metrics = Arc::new(Metrics::new());
    let default = Keys::start(chain(None), Arc::clone(&metrics), Duration::from_secs(5)).await;
    assert_eq!(default.current().expect("the default profile").access_key_id(), "HOMEDEFAULT");
    let media = Keys::start(chain(Some("media")), Arc::clone(&metrics), Duration::from_secs(5)).await;
    let creds = media.current().expect("the media profile");
    assert_eq!(creds.access_key_id(), "HOMEMEDIA");
    assert!(creds.secret_access_key() == "home-secret-media", "the media profile's secret");
    assert_eq!(counted(&metrics, "ok"), 2.0);
}

// ---------------------------------------------------------------------------------------
// ECS container credentials.

const ECS_AUTH: &str = "ecs-authorization-for-tests";

#[derive(Default)]
struct FakeEcs {
    up: AtomicBool,
    served: AtomicUsize,
    wrong_auth: AtomicUsize,
}

async fn fake_ecs(req: Request<Incoming>, state: Arc<FakeEcs>) -> Response<TestBody> {
    match (req.method().clone(), req.uri().path()) {
        (Method::POST, "/control/up") => {
            state.up.store(true, Ordering::SeqCst);
            status(204)
        }
        (Method::GET, "/v2/credentials") => {
            if req.headers().get("authorization").is_none_or(|v| v != ECS_AUTH) {
                state.wrong_auth.fetch_add(1, Ordering::SeqCst);
                return status(401);
            }
            if !state.up.load(Ordering::SeqCst) {
                return status(500);
            }
            state.served.fetch_add(1, Ordering::SeqCst);
            let expiration = SystemTime::now() + Duration::from_secs(3600);
            Response::new(full(credentials_json("ECSKEY", "ecs-secret-1", "ecs-session-1", expiration)))
        }
        _ => status(404),
    }
}

#[tokio::test]
async fn ecs_container_credentials_with_the_authorization_token() {
    let state = Arc::new(FakeEcs::default());
    let s = Arc::clone(&state);
    let server = serve_fn(loopback0(), move |req| fake_ecs(req, Arc::clone(&s))).await;
    let uri = format!("http://{}/v2/credentials", server.addr);
    let home = tempfile::tempdir().unwrap();
    let env = [
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri.as_str()),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN", ECS_AUTH),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let out = run_child("child_ecs", home.path(), &env).await;
    assert_eq!(state.wrong_auth.load(Ordering::SeqCst), 0, "every request carried the token");
    assert!(state.served.load(Ordering::SeqCst) >= 1);
    assert!(!out.contains("ecs-secret") && !out.contains("ecs-session"), "a secret in the logs:\n{out}");
    assert!(out.contains("loading AWS credentials failed"), "the failed start is logged:\n{out}");
}

#[tokio::test]
#[ignore = "run by ecs_container_credentials_with_the_authorization_token in a child process"]
async fn child_ecs() {
    if !in_child() {
        return;
    }
    log_to_stderr();
    let uri = std::env::var("AWS_CONTAINER_CREDENTIALS_FULL_URI").unwrap();
    let metrics = Arc::new(Metrics::new());
    // The endpoint answers 500 until told otherwise: the start gives up after its wait.
    let keys = Keys::start(chain(None), Arc::clone(&metrics), Duration::from_millis(300)).await;
    assert!(keys.current().is_none());
    assert_eq!(counted(&metrics, "error"), 1.0);

    let up = uri.replace("/v2/credentials", "/control/up");
    assert_eq!(common::client().post(up).send().await.unwrap().status(), 204);
    eventually(Duration::from_secs(10), "credentials from ECS", || keys.current().is_some()).await;
    let creds = keys.current().unwrap();
    assert_eq!(creds.access_key_id(), "ECSKEY");
    assert!(creds.secret_access_key() == "ecs-secret-1", "the secret from ECS");
    assert!(creds.session_token() == Some("ecs-session-1"), "the token from ECS");
    let left = creds.expiry().expect("ECS credentials expire").duration_since(SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(3500), "{left:?}");
    assert_eq!(counted(&metrics, "ok"), 1.0);
    assert!(expiry_gauge(&metrics) > 0.0);
}

// ---------------------------------------------------------------------------------------
// EC2 instance metadata (IMDSv2), with credentials that last a few seconds.

/// How long each set of IMDS credentials lasts (whole seconds in the answer, so a little less).
const IMDS_LIFETIME: Duration = Duration::from_secs(8);
const IMDS_TOKEN: &str = "imds-api-token-for-tests";
const IMDS_ROLE: &str = "mediaroute-role";
const IMDS_CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";

#[derive(Default)]
struct FakeImds {
    tokens: AtomicUsize,
    /// Credentials served; after two the role is gone and every lookup answers 404.
    served: AtomicUsize,
    refused: AtomicUsize,
    without_token: AtomicUsize,
}

async fn fake_imds(req: Request<Incoming>, state: Arc<FakeImds>) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    if req.method() == Method::PUT && path == "/latest/api/token" {
        let Some(ttl) = req.headers().get("x-aws-ec2-metadata-token-ttl-seconds").cloned() else {
            return status(400);
        };
        state.tokens.fetch_add(1, Ordering::SeqCst);
        let mut r = Response::new(full(IMDS_TOKEN));
        r.headers_mut().insert("x-aws-ec2-metadata-token-ttl-seconds", ttl);
        return r;
    }
    if req.method() != Method::GET {
        return status(405);
    }
    if req.headers().get("x-aws-ec2-metadata-token").is_none_or(|v| v != IMDS_TOKEN) {
        state.without_token.fetch_add(1, Ordering::SeqCst);
        return status(401);
    }
    let Some(role) = path.strip_prefix(IMDS_CREDENTIALS) else {
        return status(404);
    };
    if state.served.load(Ordering::SeqCst) >= 2 {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return status(404);
    }
    match role {
        "" => Response::new(full(IMDS_ROLE)),
        IMDS_ROLE => {
            let n = state.served.fetch_add(1, Ordering::SeqCst) + 1;
            let expiration = SystemTime::now() + IMDS_LIFETIME;
            let json = credentials_json(
                &format!("AKID{n}"),
                &format!("imds-secret-{n}"),
                &format!("imds-session-{n}"),
                expiration,
            );
            Response::new(full(json))
        }
        _ => status(404),
    }
}

#[tokio::test]
async fn instance_metadata_credentials_are_refreshed_before_they_expire() {
    let state = Arc::new(FakeImds::default());
    let s = Arc::clone(&state);
    let server = serve_fn(loopback0(), move |req| fake_imds(req, Arc::clone(&s))).await;
    let endpoint = format!("http://{}", server.addr);
    let home = tempfile::tempdir().unwrap();
    let out = run_child("child_imds", home.path(), &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.as_str())]).await;
    assert!(state.tokens.load(Ordering::SeqCst) >= 1, "an IMDSv2 token was asked for");
    assert_eq!(state.without_token.load(Ordering::SeqCst), 0, "every GET carried the token");
    assert_eq!(state.served.load(Ordering::SeqCst), 2);
    assert!(state.refused.load(Ordering::SeqCst) >= 1);
    assert!(out.contains("refreshing AWS credentials failed"), "the failed refresh is logged:\n{out}");
    assert!(!out.contains("imds-secret") && !out.contains("imds-session"), "a secret in the logs:\n{out}");
}

#[tokio::test]
#[ignore = "run by instance_metadata_credentials_are_refreshed_before_they_expire in a child process"]
async fn child_imds() {
    if !in_child() {
        return;
    }
    log_to_stderr();
    let metrics = Arc::new(Metrics::new());
    let keys = Keys::start(chain(None), Arc::clone(&metrics), Duration::from_secs(5)).await;
    let first = keys.current().expect("credentials from IMDS");
    assert_eq!(first.access_key_id(), "AKID1");
    assert!(first.secret_access_key() == "imds-secret-1", "the secret from IMDS");
    assert!(first.session_token() == Some("imds-session-1"), "the token from IMDS");
    let expiry1 = first.expiry().expect("IMDS credentials expire");

    // Sampled often: the new credentials come before the old ones expire, with no gap.
    let refreshed = loop {
        let creds = keys.current().expect("no gap while refreshing");
        if creds.access_key_id() != "AKID1" {
            break creds;
        }
        assert!(SystemTime::now() < expiry1, "AKID1 expired before a refresh");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let at = SystemTime::now();
    assert_eq!(refreshed.access_key_id(), "AKID2");
    assert!(at < expiry1, "refreshed before the expiry");
    let early = expiry1.duration_since(at).unwrap();
    // Half of a lifetime of 7 to 8 s is 3.5 to 4 s ahead; the answer takes a moment, and
    // the refresh timer may fire a few milliseconds early on a loaded machine.
    assert!(
        early > Duration::from_secs(2) && early <= IMDS_LIFETIME / 2 + Duration::from_millis(100),
        "refreshed at about half the lifetime, not {early:?} ahead"
    );
    assert_eq!(counted(&metrics, "ok"), 2.0, "the first load and one refresh");
    assert_eq!(counted(&metrics, "error"), 0.0);

    // The role is gone now: AKID2 stays until it expires, then there is nothing.
    let expiry2 = refreshed.expiry().unwrap();
    loop {
        match keys.current() {
            Some(creds) => assert_eq!(creds.access_key_id(), "AKID2"),
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gone = SystemTime::now();
    assert!(gone >= expiry2, "dropped before the expiry");
    assert!(gone < expiry2 + Duration::from_millis(500), "kept past the expiry");
    assert!(counted(&metrics, "error") >= 1.0, "the failed refresh is counted");
    assert_eq!(counted(&metrics, "ok"), 2.0);
    eventually(Duration::from_secs(2), "the expiry gauge to read 0", || expiry_gauge(&metrics) == 0.0).await;
    assert!(keys.current().is_none());
}
