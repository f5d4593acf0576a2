//! Config parsing and validation: every error names file, line, column and key.

use std::path::Path;

use super::*;

const GOOD: &str = r#"
[listen]
addr = "127.0.0.1:8080"
[identity]
trusted_proxies = ["127.0.0.0/8", "::1"]
[primary]
url = "http://127.0.0.1:9001"
[replica]
url = "https://replica.example:8443"
[replication]
networks = ["10.20.0.0/16"]
delay = "15m"
[users]
alice = "yes"
"#;

fn parse_str(src: &str) -> Result<Config, ConfigErrors> {
    parse(Path::new("/etc/mr/m.toml"), src, &|_| Ok("zed = \"auto\"\n".to_string()))
}

fn errors(src: &str) -> Vec<String> {
    parse_str(src).unwrap_err().0.iter().map(|e| e.to_string()).collect()
}

#[test]
fn good_config_parses_with_defaults() {
    let cfg = parse_str(GOOD).unwrap();
    assert_eq!(cfg.replication.delay, Duration::from_secs(900));
    assert_eq!(cfg.replication.default_mode, Mode::No);
    assert!(cfg.replication.fallback);
    assert_eq!(cfg.identity.user_header.as_deref(), Some("x-forwarded-user"));
    assert_eq!(cfg.identity.trusted_proxies[1].to_string(), "::1/128");
    assert_eq!(cfg.users["alice"], Mode::Yes);
    assert_eq!(cfg.limits.age_cache_entries, 100_000);
    assert_eq!(cfg.replica.url.scheme_str(), Some("https"));
}

#[test]
fn bad_mode_names_line_column_and_key() {
    let src = GOOD.replace("alice = \"yes\"", "alice = \"yes\"\ncarol = \"sometimes\"");
    let errs = errors(&src);
    assert_eq!(
        errs,
        vec!["/etc/mr/m.toml:15:9: users.carol: \"sometimes\" is not a mode: expected \"no\", \"yes\" or \"auto\""]
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let src = GOOD
        .replace("\"10.20.0.0/16\"", "\"10.20.0.0/33\", \"10.1.0.0/16\", \"banana\"")
        .replace("http://127.0.0.1:9001", "ftp://127.0.0.1:9001")
        .replace("alice = \"yes\"", "alice = \"maybe\"")
        .replace("delay = \"15m\"", "delay = \"soon\"");
    let errs = errors(&src);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(errs[0].contains(":7:7: primary.url: \"ftp://127.0.0.1:9001\" has scheme \"ftp\""), "{}", errs[0]);
    assert!(errs[1].contains(":11:13: replication.networks[0]: \"10.20.0.0/33\" is not an IP range"), "{}", errs[1]);
    assert!(errs[2].contains(":11:44: replication.networks[2]: \"banana\""), "{}", errs[2]);
    assert!(errs[3].contains("replication.delay: \"soon\" is not a duration"), "{}", errs[3]);
    assert!(errs[4].contains("users.alice"), "{}", errs[4]);
}

#[test]
fn unknown_keys_are_errors_with_position() {
    let src = GOOD.replace("delay = \"15m\"", "delay = \"15m\"\ndelays = \"1m\"");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("/etc/mr/m.toml:13:1: replication.delays: unknown field `delays`"), "{}", errs[0]);
}

#[test]
fn syntax_errors_have_a_position() {
    let errs = errors(&GOOD.replace("alice = \"yes\"", "alice = yes"));
    assert!(errs[0].starts_with("/etc/mr/m.toml:14:9: users.alice:"), "{}", errs[0]);
}

#[test]
fn url_must_be_http_or_https_with_host_only() {
    for (url, why) in [
        ("127.0.0.1:9001", "needs a scheme"),
        ("http://127.0.0.1:9001/prefix", "without a path"),
        ("http://user:pw@127.0.0.1:9001", "user info"),
        ("not a url", "is not a URL"),
    ] {
        let errs = errors(&GOOD.replace("http://127.0.0.1:9001", url));
        assert!(errs[0].contains(why), "{url}: {}", errs[0]);
    }
}

#[test]
fn bucket_on_one_upstream_only_is_an_error() {
    let src =
        GOOD.replace("url = \"http://127.0.0.1:9001\"", "url = \"http://127.0.0.1:9001\"\nbucket = \"studio-media\"");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].contains(":8:10: primary.bucket: set on the primary only"), "{}", errs[0]);
    let both = src.replace(
        "url = \"https://replica.example:8443\"",
        "url = \"https://replica.example:8443\"\nbucket = \"studio-media-eu\"",
    );
    let cfg = parse_str(&both).unwrap();
    assert_eq!(cfg.replica.bucket.as_deref(), Some("studio-media-eu"));
    let bad = both.replace("studio-media-eu", "Bad_Bucket");
    assert!(errors(&bad)[0].contains("not a valid S3 bucket name"));
}

#[test]
fn users_file_is_relative_and_config_users_win() {
    let src = GOOD.replace("delay = \"15m\"", "users_file = \"users.toml\"");
    let cfg = parse(Path::new("/etc/mr/m.toml"), &src, &|p| {
        assert_eq!(p, Path::new("/etc/mr/users.toml"));
        Ok("alice = \"no\"\nzed = \"auto\"\n".to_string())
    })
    .unwrap();
    assert_eq!(cfg.users["alice"], Mode::Yes);
    assert_eq!(cfg.users["zed"], Mode::Auto);
    assert_eq!(cfg.overridden_users, vec!["alice".to_string()]);
}

#[test]
fn users_file_errors_name_that_file() {
    let src = GOOD.replace("delay = \"15m\"", "users_file = \"users.toml\"");
    let errs =
        parse(Path::new("/etc/mr/m.toml"), &src, &|_| Ok("# users\nzed = \"always\"\n".to_string())).unwrap_err();
    assert_eq!(
        errs.0[0].to_string(),
        "/etc/mr/users.toml:2:7: zed: \"always\" is not a mode: expected \"no\", \"yes\" or \"auto\""
    );
    let errs = parse(Path::new("/etc/mr/m.toml"), &src, &|_| Err(std::io::Error::from(std::io::ErrorKind::NotFound)))
        .unwrap_err();
    assert!(errs.0[0].to_string().contains("replication.users_file: cannot read /etc/mr/users.toml"), "{}", errs.0[0]);
}

#[test]
fn tls_and_proxy_protocol_keys_are_checked_together() {
    let listen = |lines: &str| GOOD.replace("addr = \"127.0.0.1:8080\"", lines);
    let e = errors(&listen("tls_addr = \"127.0.0.1:8443\""));
    assert!(e[0].contains("listen.tls_cert: missing: the TLS listener needs tls_cert and tls_key"), "{e:?}");
    let e = errors(&listen("addr = \"127.0.0.1:8080\"\ntls_cert = \"c.pem\""));
    assert!(e[0].contains("listen.tls_cert: only used with listen.tls_addr"), "{e:?}");
    let e = errors(&listen("proxy_protocol = true"));
    assert!(e[0].contains("listen.addr: missing"), "{e:?}");
    let e =
        errors(&listen("addr = \"127.0.0.1:8080\"\ntls_addr = \"127.0.0.1:8080\"\ntls_cert = \"c\"\ntls_key = \"k\""));
    assert!(e.iter().any(|e| e.contains("listen.tls_addr: 127.0.0.1:8080 is also listen.addr")), "{e:?}");
    let e = errors(&listen("addr = \"127.0.0.1:8080\"\nadmin_addr = \"127.0.0.1:8080\""));
    assert!(e.iter().any(|e| e.contains("listen.admin_addr: 127.0.0.1:8080 is also listen.addr")), "{e:?}");
    // Files are resolved next to the config file and read at load.
    let e = errors(&listen("tls_addr = \"127.0.0.1:8443\"\ntls_cert = \"tls/c.pem\"\ntls_key = \"tls/k.pem\""));
    assert!(e[0].contains("listen.tls_cert: /etc/mr/tls/c.pem: cannot read certificates"), "{e:?}");
    let cfg = parse_str(&listen("addr = \"127.0.0.1:8080\"\nproxy_protocol = true")).unwrap();
    assert!(cfg.listen.proxy_protocol && cfg.tls.is_none());
    assert_eq!(cfg.limits.handshake_timeout, Duration::from_secs(10));
    let e = errors(
        &GOOD.replace("url = \"http://127.0.0.1:9001\"", "url = \"http://127.0.0.1:9001\"\nca_file = \"ca.pem\""),
    );
    assert!(e.iter().any(|e| e.contains("primary.ca_file: only used with an https:// primary.url")), "{e:?}");
}

#[test]
fn signing_is_for_the_replica_and_needs_a_region_and_a_host() {
    let replica = "url = \"https://replica.example:8443\"";
    let with = |lines: &str| GOOD.replace(replica, &format!("{replica}\n{lines}"));
    let src = GOOD.replace("url = \"http://127.0.0.1:9001\"", "url = \"http://127.0.0.1:9001\"\nauth = \"sigv4\"");
    assert!(errors(&src)[0].contains("primary.auth: the primary is never signed by mediaroute"), "{:?}", errors(&src));
    let e = errors(&with("auth = \"sigv4\"\nsigning_host = \"b.s3.eu-west-1.amazonaws.com\""));
    assert!(e[0].contains("replica.region: missing"), "{e:?}");
    let e = errors(&with("auth = \"sigv4\"\nregion = \"eu-west-1\""));
    assert!(e[0].contains("replica.signing_host: missing"), "bucket-bound needs the host: {e:?}");
    let e = errors(&with("auth = \"sigv4\"\nregion = \"EU West\"\nsigning_host = \"x\""));
    assert!(e[0].contains("replica.region: \"EU West\" is not an AWS region name"), "{e:?}");
    let e = errors(&with("profile = \"x\""));
    assert!(e[0].contains("replica.profile: only used with auth = \"sigv4\""), "{e:?}");
    let e = errors(&with("preserve_host = true"));
    assert!(e[0].contains("replica.preserve_host: only the primary"), "{e:?}");
    let e = errors(&with("auth = \"sign\""));
    assert!(e[0].contains("\"sign\" is not an auth mode"), "{e:?}");

    let cfg = parse_str(&with(
        "auth = \"sigv4\"\nregion = \"eu-west-1\"\nsigning_host = \"media.s3.eu-west-1.amazonaws.com\"\n\
         credentials_file = \"keys/aws\"\nprofile = \"mediaroute\"",
    ))
    .unwrap();
    let Auth::SigV4(s) = &cfg.replica.auth else { panic!("{:?}", cfg.replica.auth) };
    assert_eq!(s.region, "eu-west-1");
    assert_eq!(s.host, "media.s3.eu-west-1.amazonaws.com");
    assert_eq!(s.credentials.file.as_deref(), Some(Path::new("/etc/mr/keys/aws")), "relative to the config");
    assert_eq!(s.credentials.profile.as_deref(), Some("mediaroute"));

    // Path-style: the regional endpoint is the default host.
    let src = with("auth = \"sigv4\"\nregion = \"eu-west-1\"\nbucket = \"media-eu\"").replace(
        "url = \"http://127.0.0.1:9001\"",
        "url = \"http://127.0.0.1:9001\"\nbucket = \"media\"\npreserve_host = true",
    );
    let cfg = parse_str(&src).unwrap();
    let Auth::SigV4(s) = &cfg.replica.auth else { panic!() };
    assert_eq!(s.host, "s3.eu-west-1.amazonaws.com");
    assert_eq!(s.credentials, CredentialsSource::default(), "the standard chain");
    assert!(cfg.primary.preserve_host);
    assert!(cfg.replication.use_status, "use_status defaults to true");
}

#[test]
fn the_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mediaroute.toml");
    let cfg = load(&dir).unwrap();
    assert_eq!(cfg.users["alice"], Mode::Yes);
    assert_eq!(cfg.users["dana"], Mode::Yes);
    assert_eq!(cfg.primary.bucket.as_deref(), Some("studio-media"));
}

#[test]
fn durations_are_bounded_and_timeouts_positive() {
    let errs = errors(&GOOD.replace("delay = \"15m\"", "delay = \"400d\""));
    assert!(errs[0].contains("replication.delay: \"400d\" is too long: at most 365d"), "{}", errs[0]);
    let errs = errors(&format!("{GOOD}\n[limits]\nupstream_header_timeout = \"0s\"\n[health]\ninterval = \"0s\"\n"));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].contains("limits.upstream_header_timeout: must be more than 0s"), "{}", errs[0]);
    assert!(errs[1].contains("health.interval: must be more than 0s"), "{}", errs[1]);
    let errs = errors(&format!("{GOOD}\n[limits]\nmax_header_size = 1024\n"));
    assert!(errs[0].contains("limits.max_header_size: 1024 is too small"), "{}", errs[0]);
}

#[test]
fn timeouts_that_cannot_work_together_are_refused() {
    let errs = errors(&format!("{GOOD}\n[limits]\nupstream_header_timeout = \"2s\"\n[health]\ninterval = \"1s\"\n"));
    assert_eq!(
        errs,
        vec![
            "/etc/mr/m.toml:17:27: limits.upstream_connect_timeout: 3s (the default) must be shorter than limits.upstream_header_timeout, 2s",
            "/etc/mr/m.toml:19:12: health.timeout: 2s (the default) must not be longer than health.interval, 1s",
        ]
    );
    let ok = format!(
        "{GOOD}\n[limits]\nupstream_header_timeout = \"2s\"\nupstream_connect_timeout = \"1s\"\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\n"
    );
    assert!(parse_str(&ok).is_ok());
}

#[test]
fn a_bad_upstream_does_not_hide_the_bucket_pairing() {
    let src = GOOD.replace(
        "url = \"http://127.0.0.1:9001\"",
        "url = \"http://127.0.0.1:9001\"\nbucket = \"media\"\nhealth_path = \"ping\"",
    );
    let errs = errors(&src);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains("primary.bucket: set on the primary only")), "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains("primary.health_path")), "{errs:#?}");
}

#[test]
fn health_paths_default_to_the_bucket_and_the_global_path_is_deprecated() {
    let cfg = parse_str(GOOD).unwrap();
    assert!(cfg.warnings.is_empty());
    let src =
        GOOD.replace("url = \"http://127.0.0.1:9001\"", "url = \"http://127.0.0.1:9001\"\nhealth_path = \"/ping\"");
    assert_eq!(parse_str(&src).unwrap().primary.health_path.as_deref(), Some("/ping"));
    let bad =
        GOOD.replace("url = \"http://127.0.0.1:9001\"", "url = \"http://127.0.0.1:9001\"\nhealth_path = \"ping\"");
    assert_eq!(errors(&bad), vec!["/etc/mr/m.toml:8:15: primary.health_path: \"ping\" is not a path starting with /"]);
    let cfg = parse_str(&format!("{GOOD}\n[health]\npath = \"/\"\n")).unwrap();
    assert_eq!(cfg.health.path.as_deref(), Some("/"));
    assert!(cfg.warnings[0].contains("health.path is deprecated"), "{:?}", cfg.warnings);
}

#[test]
fn replication_may_be_left_out_and_missing_tables_are_named() {
    let src = GOOD.replace("[replication]\nnetworks = [\"10.20.0.0/16\"]\ndelay = \"15m\"\n", "");
    assert!(!src.contains("[replication]"));
    let cfg = parse_str(&src).unwrap();
    assert_eq!(cfg.replication.delay, Duration::from_secs(900));
    assert!(cfg.replication.networks.is_empty());
    let src = GOOD.replace("[primary]\nurl = \"http://127.0.0.1:9001\"\n", "");
    assert_eq!(errors(&src), vec!["/etc/mr/m.toml: missing field `primary`"]);
}
