//! Property tests (bounded, run by `cargo test`): admission and bucket mapping never let a
//! path leave the bucket, the X-Forwarded-For walk believes only what it may, `decide()`
//! keeps its invariants, and the config parser never panics. The seed corpus of attack
//! paths lives in `tests/corpus/`; failures found are kept in
//! `tests/properties.proptest-regressions`, next to this file.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use mediaroute::config;
use mediaroute::route::{self, ClientContext, Probed, Reason, ReplicationStatus, RequestFacts};
use mediaroute::table::{RoutingTable, Upstream};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const BASE: &str = r#"
[listen]
addr = "127.0.0.1:0"
[identity]
trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]
[primary]
url = "http://127.0.0.1:9001"
[replica]
url = "http://127.0.0.1:9002"
[replication]
default_mode = "DEFAULT"
networks = ["10.20.0.0/16", "2001:db8::/32"]
delay = "15m"
[users]
alice = "yes"
bob = "auto"
carol = "no"
"#;

fn table(path_style: bool, default_mode: &str) -> RoutingTable {
    let mut src = BASE.replace("DEFAULT", default_mode);
    if path_style {
        src = src
            .replace("url = \"http://127.0.0.1:9001\"", "url = \"http://127.0.0.1:9001\"\nbucket = \"media\"")
            .replace("url = \"http://127.0.0.1:9002\"", "url = \"http://127.0.0.1:9002\"\nbucket = \"media-eu\"");
    }
    let cfg = config::parse(Path::new("p.toml"), &src, &|_| Ok(String::new())).unwrap();
    RoutingTable::build(&cfg, 1)
}

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: 3000,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        ..ProptestConfig::default()
    }
}

/// What an upstream that decodes once and normalises makes of a path: `%XX` decoded,
/// `\` as `/`, dot segments removed (RFC 3986 section 5.2.4).
fn normalised(path: &str) -> String {
    let b = path.as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c)))
        {
            decoded.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        decoded.push(b[i]);
        i += 1;
    }
    let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = text.split('/').collect();
    for (n, seg) in segments.iter().enumerate().skip(1) {
        let last = n == segments.len() - 1;
        match *seg {
            "." if last => out.push(""),
            "." => {}
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// The first segment of a normalised path.
fn first_segment(path: &str) -> &str {
    path.trim_start_matches('/').split('/').next().unwrap_or("")
}

/// Paths made of the pieces that matter to admission.
fn paths() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "/", "media", "media-eu", "other", "..", ".", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "a", "x.mov",
        "%", "%z", "%25", "%2e%2e", ".%2e", "%2", "//",
    ]);
    (any::<bool>(), prop::collection::vec(piece, 0..10)).prop_map(|(slash, pieces)| {
        let body = pieces.concat();
        if slash { format!("/{body}") } else { body }
    })
}

/// The full path sent to `to` for an admitted `path`.
fn sent(t: &RoutingTable, to: Upstream, path: &str) -> String {
    let (bucket, rest) = route::upstream_path(t, to, path);
    match bucket {
        Some(b) => format!("/{b}{rest}"),
        None => rest.to_string(),
    }
}

fn check_stays_in_bucket(path: &str) -> Result<(), TestCaseError> {
    let t = table(true, "no");
    if route::admit(&t, false, path, None).is_ok() {
        for (to, bucket) in [(Upstream::Primary, "media"), (Upstream::Replica, "media-eu")] {
            let n = normalised(&sent(&t, to, path));
            prop_assert_eq!(first_segment(&n), bucket, "{} sent to {:?} normalises to {}", path, to, n);
        }
    }
    // Bucket-bound: the upstream serves the path under its own bucket (`/bucket` + path).
    let t = table(false, "no");
    if route::admit(&t, false, path, None).is_ok() {
        let n = normalised(&format!("/bound{}", sent(&t, Upstream::Replica, path)));
        prop_assert_eq!(first_segment(&n), "bound", "{} normalises to {}", path, n);
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn no_forwarded_path_leaves_the_bucket(path in paths()) {
        check_stays_in_bucket(&path)?;
    }

    #[test]
    fn no_arbitrary_path_leaves_the_bucket(key in any::<String>(), bucket_first in any::<bool>()) {
        // Rooted in the bucket, so that admission has something to admit.
        let path = if bucket_first { format!("/media/{key}") } else { format!("/{key}") };
        check_stays_in_bucket(&path)?;
    }

    #[test]
    fn the_forwarded_for_walk_believes_only_what_it_may(
        entries in prop::collection::vec(prop::sample::select(vec![
            "10.0.0.1", "10.9.9.9", "127.0.0.1", "198.51.100.4", "203.0.113.9", "[2001:db8::5]", "::1",
            "::ffff:10.0.0.7", "garbage", "", " ", "10.0.0.1:80", "1.2.3.4, 5.6.7.8",
        ]), 0..6),
        lines in 1usize..3,
        trusted_peer in any::<bool>(),
    ) {
        let t = table(true, "no");
        let peer: IpAddr = if trusted_peer { "127.0.0.1" } else { "192.0.2.7" }.parse().unwrap();
        let mut headers = HeaderMap::new();
        for chunk in entries.chunks(entries.len().div_ceil(lines).max(1)) {
            if let Ok(v) = HeaderValue::from_str(&chunk.join(", ")) {
                headers.append("x-forwarded-for", v);
            }
        }
        headers.insert("x-forwarded-user", HeaderValue::from_static("alice"));
        let ctx = mediaroute::client::context(&t, peer, &headers, None);
        if trusted_peer {
            let named: Vec<IpAddr> = entries
                .iter()
                .flat_map(|e| e.split(','))
                .filter_map(|e| e.trim().trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical())
                .collect();
            prop_assert!(ctx.ip == peer || named.contains(&ctx.ip), "{:?} from {:?}", ctx.ip, entries);
            prop_assert_eq!(ctx.user.as_deref(), Some("alice"));
        } else {
            prop_assert_eq!(ctx.ip, peer, "an untrusted peer is the client");
            prop_assert_eq!(ctx.user, None, "an untrusted peer is anonymous");
        }
    }

    #[test]
    fn decide_keeps_its_invariants(
        default_mode in prop::sample::select(vec!["no", "yes", "auto"]),
        user in prop::sample::select(vec![None, Some("alice"), Some("bob"), Some("carol"), Some("zed")]),
        ip in prop::sample::select(vec!["10.20.1.2", "192.0.2.1", "2001:db8::9", "::ffff:10.20.0.1"]),
        read in any::<bool>(),
        object in any::<bool>(),
        replica_down in any::<bool>(),
        probed in prop::sample::select(vec![
            Probed::NotProbed, Probed::Missing, Probed::Failed, Probed::Denied,
            Probed::Found { age: Some(Duration::from_secs(10)), status: None },
            Probed::Found { age: Some(Duration::from_secs(86_400)), status: None },
            Probed::Found { age: None, status: None },
            Probed::Found { age: Some(Duration::from_secs(10)), status: Some(ReplicationStatus::Completed) },
            Probed::Found { age: Some(Duration::from_secs(86_400)), status: Some(ReplicationStatus::Pending) },
            Probed::Found { age: Some(Duration::from_secs(86_400)), status: Some(ReplicationStatus::Failed) },
        ]),
    ) {
        let t = table(true, default_mode);
        let ctx = ClientContext { ip: ip.parse().unwrap(), user: user.map(Box::from) };
        let facts = RequestFacts { read, object, replica_down };
        let (upstream, reason) = route::decide(&t, &ctx, &facts, probed);
        let mode = t.mode_of(user);
        if upstream == Upstream::Replica {
            prop_assert!(read, "a write never goes to the replica");
            prop_assert!(object, "only objects go to the replica");
            prop_assert!(!replica_down, "a down replica is not used");
            prop_assert_ne!(mode, config::Mode::No, "mode no never gets the replica");
            if mode == config::Mode::Auto {
                prop_assert!(t.networks.contains(ctx.ip), "auto only inside the networks");
            }
            let Probed::Found { age, status } = probed else {
                return Err(TestCaseError::fail(format!("only objects the primary let this client read: {probed:?}")));
            };
            match status {
                Some(s) => prop_assert_eq!(s, ReplicationStatus::Completed, "never an unreplicated object"),
                None => prop_assert!(age.is_some_and(|a| a >= t.delay), "only objects known to be old enough"),
            }
            prop_assert_eq!(reason, Reason::Replica);
        } else {
            prop_assert_ne!(reason, Reason::Replica);
        }
        if !read {
            prop_assert_eq!(reason, Reason::Write);
        }
    }

    #[test]
    fn the_config_parser_never_panics(text in any::<String>()) {
        let _ = config::parse(Path::new("f.toml"), &text, &|_| Ok(String::new()));
    }

    #[test]
    fn a_damaged_example_config_is_refused_or_valid_never_a_panic(
        at in any::<prop::sample::Index>(),
        len in 0usize..12,
        insert in prop::sample::select(vec!["", "\"", "[", "]", "=", "\n", "0", "-1", "\"x\"", "[[a]]", "99999999999999999999", "\u{0}"]),
    ) {
        let text = mediaroute::demo::EXAMPLE_CONFIG;
        let start = at.index(text.len());
        let start = (0..=start).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (start + len).min(text.len());
        let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        let damaged = format!("{}{}{}", &text[..start], insert, &text[end..]);
        match config::parse(Path::new("f.toml"), &damaged, &|_| Ok(mediaroute::demo::EXAMPLE_USERS.to_string())) {
            Ok(_) => {}
            Err(errors) => {
                prop_assert!(!errors.0.is_empty());
                prop_assert!(errors.0.iter().all(|e| e.to_string().starts_with("f.toml")));
            }
        }
    }
}

#[test]
fn the_attack_path_corpus_is_refused_or_kept_in_the_bucket() {
    let corpus = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/paths.txt")).unwrap();
    let t = table(true, "no");
    let mut seen = 0;
    for line in corpus.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (verdict, path) = line.split_once('\t').expect("verdict<TAB>path");
        let admitted = route::admit(&t, false, path, None);
        match verdict {
            "refused" => assert!(admitted.is_err(), "{path} must be refused"),
            "forwarded" => assert!(admitted.is_ok(), "{path} must be forwarded: {admitted:?}"),
            other => panic!("unknown verdict {other}"),
        }
        check_stays_in_bucket(path).unwrap();
        seen += 1;
    }
    assert!(seen >= 30, "the corpus was read: {seen} paths");
}
