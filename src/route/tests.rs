//! One test per rule of README "How a download is routed", plus admission and the edges.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::config;
use crate::table::RoutingTable;

const BASE: &str = r#"
[listen]
addr = "127.0.0.1:0"
[identity]
trusted_proxies = ["127.0.0.0/8"]
[primary]
url = "http://127.0.0.1:9001"
[replica]
url = "http://127.0.0.1:9002"
[replication]
default_mode = "no"
networks = ["10.20.0.0/16", "2001:db8::/32"]
delay = "15m"
users_file = "users.toml"
[users]
alice = "yes"
bob = "auto"
carol = "no"
dave = "yes"
"#;

const USERS_FILE: &str = r#"
dave = "no"
erin = "yes"
"#;

/// The base table with one line of the config replaced.
fn table_with(line: &str, replacement: &str) -> RoutingTable {
    assert!(BASE.contains(line));
    let src = BASE.replace(line, replacement);
    let cfg = config::parse(Path::new("/etc/mediaroute/mediaroute.toml"), &src, &|p: &Path| {
        assert_eq!(p, Path::new("/etc/mediaroute/users.toml"));
        Ok(USERS_FILE.to_string())
    })
    .unwrap();
    RoutingTable::build(&cfg, 1)
}

fn table() -> RoutingTable {
    table_with("", "")
}

fn ctx(user: Option<&str>, ip: &str) -> ClientContext {
    ClientContext { ip: ip.parse().unwrap(), user: user.map(Box::from) }
}

const GET: RequestFacts = RequestFacts { read: true, object: true, replica_down: false };
const OLD: Probed = found(3600, None);

const fn found(secs: u64, status: Option<ReplicationStatus>) -> Probed {
    Probed::Found { age: Some(Duration::from_secs(secs)), status }
}
const INSIDE: &str = "10.20.1.2";
const OUTSIDE: &str = "192.0.2.1";

#[test]
fn rule1_writes_go_to_the_primary() {
    let facts = RequestFacts { read: false, ..GET };
    let got = decide(&table(), &ctx(Some("alice"), INSIDE), &facts, OLD);
    assert_eq!(got, (Upstream::Primary, Reason::Write));
}

#[test]
fn rule2_not_an_object() {
    let facts = RequestFacts { object: false, ..GET };
    let got = decide(&table(), &ctx(Some("alice"), INSIDE), &facts, OLD);
    assert_eq!(got, (Upstream::Primary, Reason::NotObject));
}

#[test]
fn rule3_mode_no() {
    let got = decide(&table(), &ctx(Some("carol"), INSIDE), &GET, OLD);
    assert_eq!(got, (Upstream::Primary, Reason::ModeNo));
}

#[test]
fn rule3_unknown_and_anonymous_users_get_default_mode() {
    let t = table();
    assert_eq!(decide(&t, &ctx(Some("zed"), INSIDE), &GET, OLD).1, Reason::ModeNo);
    assert_eq!(decide(&t, &ctx(None, INSIDE), &GET, OLD).1, Reason::ModeNo);
    let yes = table_with("default_mode = \"no\"", "default_mode = \"yes\"");
    assert_eq!(decide(&yes, &ctx(None, OUTSIDE), &GET, OLD), (Upstream::Replica, Reason::Replica));
    assert_eq!(decide(&yes, &ctx(Some("zed"), OUTSIDE), &GET, OLD), (Upstream::Replica, Reason::Replica));
}

#[test]
fn rule4_auto_outside_networks() {
    let got = decide(&table(), &ctx(Some("bob"), OUTSIDE), &GET, OLD);
    assert_eq!(got, (Upstream::Primary, Reason::OutsideNetworks));
}

#[test]
fn rule4_auto_inside_networks_ipv6_and_mapped() {
    let t = table();
    for ip in [INSIDE, "2001:db8::7", "::ffff:10.20.9.9"] {
        assert_eq!(decide(&t, &ctx(Some("bob"), ip), &GET, OLD), (Upstream::Replica, Reason::Replica), "{ip}");
    }
    assert_eq!(decide(&t, &ctx(Some("bob"), "::ffff:10.21.0.1"), &GET, OLD).1, Reason::OutsideNetworks);
}

#[test]
fn rule5_replica_down() {
    let facts = RequestFacts { replica_down: true, ..GET };
    let got = decide(&table(), &ctx(Some("alice"), INSIDE), &facts, OLD);
    assert_eq!(got, (Upstream::Primary, Reason::ReplicaDown));
}

#[test]
fn rule6_denied_by_the_primary() {
    let got = decide(&table(), &ctx(Some("alice"), INSIDE), &GET, Probed::Denied);
    assert_eq!(got, (Upstream::Primary, Reason::Denied));
    let signed = table_with("url = \"http://127.0.0.1:9002\"", SIGNED);
    for t in [table_with("delay = \"15m\"", "delay = \"0s\""), signed] {
        assert_eq!(decide(&t, &ctx(Some("alice"), INSIDE), &GET, Probed::Denied).1, Reason::Denied);
    }
}

#[test]
fn rule7_pending_or_failed_stays_on_the_primary_past_the_delay() {
    let t = table();
    for status in [ReplicationStatus::Pending, ReplicationStatus::Failed] {
        let got = decide(&t, &ctx(Some("alice"), INSIDE), &GET, found(86_400, Some(status)));
        assert_eq!(got, (Upstream::Primary, Reason::NotReplicated), "{status:?}");
    }
}

#[test]
fn rule8_completed_goes_to_the_replica_whatever_the_age() {
    let t = table();
    let got = decide(&t, &ctx(Some("alice"), INSIDE), &GET, found(1, Some(ReplicationStatus::Completed)));
    assert_eq!(got, (Upstream::Replica, Reason::Replica));
    let no_age = Probed::Found { age: None, status: Some(ReplicationStatus::Completed) };
    assert_eq!(decide(&t, &ctx(Some("alice"), INSIDE), &GET, no_age).1, Reason::Replica);
}

#[test]
fn without_use_status_the_delay_alone_decides() {
    let t = table_with("delay = \"15m\"", "delay = \"15m\"\nuse_status = false");
    let c = ctx(Some("alice"), INSIDE);
    assert_eq!(decide(&t, &c, &GET, found(1, Some(ReplicationStatus::Completed))).1, Reason::TooYoung);
    assert_eq!(decide(&t, &c, &GET, found(3600, Some(ReplicationStatus::Pending))).1, Reason::Replica);
}

#[test]
fn rule9_too_young() {
    let t = table();
    assert_eq!(decide(&t, &ctx(Some("alice"), INSIDE), &GET, found(60, None)), (Upstream::Primary, Reason::TooYoung));
    // Exactly `delay` old is old enough.
    assert_eq!(decide(&t, &ctx(Some("alice"), INSIDE), &GET, found(900, None)).1, Reason::Replica);
    // Missing on the primary: the replica cannot have it yet.
    assert_eq!(decide(&t, &ctx(Some("alice"), INSIDE), &GET, Probed::Missing).1, Reason::TooYoung);
}

#[test]
fn rule10_age_unknown() {
    let t = table();
    let no_date = Probed::Found { age: None, status: None };
    for probed in [Probed::Failed, Probed::NotProbed, no_date] {
        let got = decide(&t, &ctx(Some("alice"), INSIDE), &GET, probed);
        assert_eq!(got, (Upstream::Primary, Reason::AgeUnknown), "{probed:?}");
    }
}

#[test]
fn rule11_replica() {
    let got = decide(&table(), &ctx(Some("alice"), OUTSIDE), &GET, OLD);
    assert_eq!(got, (Upstream::Replica, Reason::Replica));
}

/// The replica lines of a signed replica (README "Authentication").
const SIGNED: &str =
    "url = \"http://127.0.0.1:9002\"\nauth = \"sigv4\"\nregion = \"eu-west-1\"\nsigning_host = \"media.example\"";

#[test]
fn zero_delay_needs_no_probe_unless_the_replica_is_signed() {
    let t = table_with("delay = \"15m\"", "delay = \"0s\"");
    let c = ctx(Some("alice"), INSIDE);
    assert!(!needs_probe(&t, &c, &GET));
    assert_eq!(decide(&t, &c, &GET, Probed::NotProbed), (Upstream::Replica, Reason::Replica));
    let src = BASE.replace("delay = \"15m\"", "delay = \"0s\"").replace("url = \"http://127.0.0.1:9002\"", SIGNED);
    let cfg = config::parse(Path::new("/etc/m.toml"), &src, &|_: &Path| Ok(USERS_FILE.to_string())).unwrap();
    let signed = RoutingTable::build(&cfg, 1);
    assert!(needs_probe(&signed, &c, &GET), "a signed replica needs the primary's word first");
    assert_eq!(decide(&signed, &c, &GET, Probed::NotProbed).1, Reason::AgeUnknown, "no probe, no signing");
    assert_eq!(decide(&signed, &c, &GET, Probed::Found { age: None, status: None }).1, Reason::Replica);
    assert_eq!(decide(&signed, &c, &GET, Probed::Missing).1, Reason::TooYoung);
}

#[test]
fn the_probe_is_only_needed_when_rules_1_to_5_pass() {
    let t = table();
    assert!(needs_probe(&t, &ctx(Some("alice"), INSIDE), &GET));
    assert!(!needs_probe(&t, &ctx(Some("carol"), INSIDE), &GET));
    assert!(!needs_probe(&t, &ctx(Some("bob"), OUTSIDE), &GET));
    assert!(!needs_probe(&t, &ctx(Some("alice"), INSIDE), &RequestFacts { read: false, ..GET }));
}

#[test]
fn rules_apply_in_order() {
    // A write from a `no` user outside the networks is a write first.
    let facts = RequestFacts { read: false, object: false, replica_down: true };
    assert_eq!(decide(&table(), &ctx(Some("bob"), OUTSIDE), &facts, Probed::Failed).1, Reason::Write);
    let facts = RequestFacts { object: false, replica_down: true, ..GET };
    assert_eq!(decide(&table(), &ctx(Some("carol"), OUTSIDE), &facts, Probed::Failed).1, Reason::NotObject);
    let facts = RequestFacts { replica_down: true, ..GET };
    assert_eq!(decide(&table(), &ctx(Some("bob"), OUTSIDE), &facts, Probed::Failed).1, Reason::OutsideNetworks);
    assert_eq!(decide(&table(), &ctx(Some("alice"), OUTSIDE), &facts, Probed::Failed).1, Reason::ReplicaDown);
}

#[test]
fn users_section_wins_over_users_file() {
    let t = table();
    // dave is "yes" in [users] and "no" in the users file.
    assert_eq!(decide(&t, &ctx(Some("dave"), OUTSIDE), &GET, OLD).1, Reason::Replica);
    // erin is only in the users file.
    assert_eq!(decide(&t, &ctx(Some("erin"), OUTSIDE), &GET, OLD).1, Reason::Replica);
}

/// The base table with `bucket` set on both upstreams.
fn path_style() -> RoutingTable {
    let src = BASE
        .replace("url = \"http://127.0.0.1:9001\"", "url = \"http://127.0.0.1:9001\"\nbucket = \"media\"")
        .replace("url = \"http://127.0.0.1:9002\"", "url = \"http://127.0.0.1:9002\"\nbucket = \"media-eu\"");
    let cfg =
        config::parse(Path::new("/etc/mediaroute/mediaroute.toml"), &src, &|_| Ok(USERS_FILE.to_string())).unwrap();
    RoutingTable::build(&cfg, 1)
}

#[test]
fn path_style_objects_are_bucket_then_key() {
    let t = path_style();
    let object = |path, query| admit(&t, false, path, query).map(|a| a.object);
    assert_eq!(object("/media/movie.mov", None), Ok(true));
    assert_eq!(object("/media/a/b/c.exr", Some("versionId=3")), Ok(true));
    assert_eq!(object("/media/clip.mov", Some("partNumber=2")), Ok(true));
    for (path, query) in [
        ("/media", None),
        ("/media/", None),
        ("/media/key", Some("acl")),
        ("/media/key", Some("tagging")),
        ("/media/key", Some("uploadId=abc")),
        ("/media/key", Some("x=1&uploads")),
        ("/media/", Some("list-type=2")),
    ] {
        assert_eq!(object(path, query), Ok(false), "{path} {query:?}");
    }
    for path in ["/", "//media/key", "/other/key", "/media-eu/key", "/mediax/key"] {
        assert_eq!(object(path, None), Err(Refusal::ForeignBucket), "{path}");
    }
}

#[test]
fn bucket_bound_paths_are_keys() {
    let t = table();
    assert_eq!(t.addressing(), Addressing::BucketBound);
    let object = |path, query| admit(&t, false, path, query).map(|a| a.object);
    for path in ["/old.mov", "/media/movie.mov", "/media", "/media/", "//key", "/a/b/c.exr"] {
        assert_eq!(object(path, None), Ok(true), "{path}");
    }
    assert_eq!(object("/", None), Ok(false), "the bucket itself");
    assert_eq!(object("/", Some("list-type=2")), Ok(false));
    assert_eq!(object("/old.mov", Some("tagging")), Ok(false));
    assert_eq!(object("/old.mov", Some("versionId=4")), Ok(true));
}

#[test]
fn targets_that_are_not_paths_and_dot_segments_are_refused() {
    for t in [table(), path_style()] {
        assert_eq!(admit(&t, true, "/media/a", None), Err(Refusal::NotAPath));
        for target in ["*", "", "example.com:443", "http://x/media/a"] {
            assert_eq!(admit(&t, false, target, None), Err(Refusal::NotAPath), "{target}");
        }
        for p in [
            "/media/../x",
            "/media/./x",
            "/media/%2e%2E/x",
            "/media/.%2e/x",
            "/media/%2E",
            "/..",
            // Whole segments only once `%2F` and `\` are separators too.
            "/media/..%2fother/x",
            "/media/%2e%2e%2fother/x",
            "/media/x/..%2f..%2fother%2fx",
            "/media/..%5cother",
            "/media/..\\other",
            "/media/x\\..\\..\\other",
            "/media/%2E%2E%2F",
        ] {
            assert_eq!(admit(&t, false, p, None), Err(Refusal::DotSegment), "{p}");
        }
        for p in ["/media/..x", "/media/x.mov", "/media/.hidden", "/media/%2e%2ex", "/media/a%2fb", "/media/%zz/..x"] {
            assert!(admit(&t, false, p, None).is_ok(), "{p}");
        }
    }
}

#[test]
fn all_reasons_are_listed_in_declaration_order() {
    // Metrics index their counters by `reason as usize`.
    for (i, r) in Reason::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i, "{r:?}");
    }
}
