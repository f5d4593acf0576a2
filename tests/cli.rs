//! The command line: check, explain, and the demo's tour.

use std::path::Path;
use std::process::Command;

fn mediaroute(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mediaroute")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mediaroute.toml").display().to_string()
}

#[test]
fn check_accepts_the_example() {
    let (code, out, err) = mediaroute(&["check", "--config", &example()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(": ok (5 users, 2 replica networks, delay 15m)"), "{out}");
}

#[test]
fn check_lists_every_error_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("bob = \"auto\"", "bob = \"sometimes\"")
        .replace("\"10.20.0.0/16\"", "\"10.20.0.0/40\"")
        .replace("users_file = \"users.toml\"", "users_file = \"missing.toml\"");
    std::fs::write(&path, &text).unwrap();
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let (code, out, err) = mediaroute(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let p = path.display();
    let (net, bob) = (line_of("10.20.0.0/40"), line_of("sometimes"));
    assert!(
        err.contains(&format!("{p}:{net}:13: replication.networks[0]: \"10.20.0.0/40\" is not an IP range")),
        "{err}"
    );
    assert!(err.contains("replication.users_file: cannot read"), "{err}");
    assert!(err.contains(&format!("{p}:{bob}:7: users.bob: \"sometimes\" is not a mode")), "{err}");
    assert!(err.contains("3 error(s)"), "{err}");
}

#[test]
fn check_reports_a_missing_file() {
    let (code, _, err) = mediaroute(&["check", "--config", "/nonexistent/mediaroute.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/mediaroute.toml: cannot read"), "{err}");
}

#[test]
fn explain_prints_upstream_and_reason() {
    let cfg = example();
    let (code, out, _) = mediaroute(&[
        "explain",
        "--config",
        &cfg,
        "--user",
        "bob",
        "--ip",
        "10.20.7.7",
        "--path",
        "/studio-media/a.mov",
    ]);
    assert_eq!(code, 0);
    assert!(out.starts_with("upstream: replica\nreason:   replica\n"), "{out}");
    let (_, out, _) = mediaroute(&["explain", "--config", &cfg, "--user", "bob", "--ip", "192.0.2.1"]);
    assert!(out.contains("reason:   outside-networks"), "{out}");
    let (_, out, _) = mediaroute(&["explain", "--config", &cfg, "--user", "alice", "--ip", "192.0.2.1", "--age", "5m"]);
    assert!(out.contains("reason:   too-young") && out.contains("age:      5m (delay 15m)"), "{out}");
    let (_, out, _) =
        mediaroute(&["explain", "--config", &cfg, "--user", "alice", "--ip", "192.0.2.1", "--method", "put"]);
    assert!(out.contains("upstream: primary\nreason:   write"), "{out}");
    let (code, _, err) = mediaroute(&["explain", "--config", &cfg, "--ip", "not-an-ip"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn the_demo_tour_shows_every_outcome() {
    let text = mediaroute::demo::EXAMPLE_CONFIG
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9001", "127.0.0.1:0")
        .replace("127.0.0.1:9002", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    let cfg =
        mediaroute::config::parse(Path::new("demo.toml"), &text, &|_| Ok(mediaroute::demo::EXAMPLE_USERS.to_string()))
            .unwrap();
    let demo = mediaroute::demo::start(cfg).await.unwrap();
    let tour = demo.tour().await;
    for expected in [
        "200 from replica (reason replica) shots/sh010/plate.mov from the REPLICA region",
        "200 from primary (reason too-young)",
        "200 from primary (reason fallback) archive/pilot/final.mov from the PRIMARY region",
        "200 from primary (reason outside-networks)",
        "200 from primary (reason mode-no)",
        "200 from primary (reason write)",
        "403 from - (reason -)",
    ] {
        assert!(tour.contains(expected), "missing {expected:?} in\n{tour}");
    }
}

#[test]
fn explain_shows_what_a_replication_status_does() {
    let cfg = example();
    let ask = |status: &str| {
        let (code, out, err) = mediaroute(&[
            "explain",
            "--config",
            &cfg,
            "--user",
            "alice",
            "--ip",
            "10.20.1.2",
            "--age",
            "1m",
            "--status",
            status,
        ]);
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let pending = ask("PENDING");
    assert!(pending.contains("upstream: primary") && pending.contains("reason:   not-replicated"), "{pending}");
    assert!(pending.contains("status:   PENDING (replication.use_status = true"), "{pending}");
    assert!(ask("FAILED").contains("reason:   not-replicated"));
    let completed = ask("completed");
    assert!(
        completed.contains("upstream: replica") && completed.contains("reason:   replica"),
        "young but COMPLETED: {completed}"
    );
    let (code, _, err) = mediaroute(&["explain", "--config", &cfg, "--ip", "10.20.1.2", "--status", "DONE"]);
    assert_eq!(code, 2);
    assert!(err.contains("\"DONE\" is not a replication status"), "{err}");
}

#[test]
fn check_accepts_the_tls_nlb_and_https_upstream_examples() {
    for name in ["mediaroute-tls.toml", "mediaroute-nlb.toml", "mediaroute-https-upstreams.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf").join(name);
        let (code, out, err) = mediaroute(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{name}: {out}{err}");
    }
}

#[test]
fn check_names_the_file_when_the_key_does_not_match_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let text = std::fs::read_to_string(conf.join("mediaroute-tls.toml")).unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/tls");
    let text = text
        .replace("tls/demo-fullchain.pem", conf.join("tls/demo-fullchain.pem").to_str().unwrap())
        .replace("tls/demo-key.pem", corpus.join("ec-key.pem").to_str().unwrap());
    let path = dir.path().join("m.toml");
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = mediaroute(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("listen.tls_key:") && err.contains("ec-key.pem does not belong to the certificate in"),
        "{err}"
    );
    assert!(!err.contains("BEGIN"), "{err}");
}

#[test]
fn check_accepts_the_sigv4_example() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mediaroute-sigv4.toml");
    let (code, out, err) = mediaroute(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) =
        mediaroute(&["explain", "--config", path.to_str().unwrap(), "--user", "alice", "--ip", "10.20.1.2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("signing:  sigv4 for s3.eu-west-1.amazonaws.com in eu-west-1"), "{out}");
}
