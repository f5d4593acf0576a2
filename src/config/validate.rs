//! Checking raw values: every mistake is collected with its file, line, column and key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::raw::*;
use super::*;
use crate::duration::parse_duration;

pub(super) fn serde_error(file: &Path, src: &str, e: &toml::de::Error) -> ConfigError {
    let (pos, key) = match e.span() {
        // The whole document (a missing top-level table): no line to point at.
        Some(span) if span.start == 0 && e.message().starts_with("missing field") => (None, None),
        Some(span) => {
            let pos = line_col(src, span.start);
            (Some(pos), key_at(src, pos.0))
        }
        None => (None, None),
    };
    ConfigError { file: file.to_path_buf(), pos, key, message: e.message().trim().to_string() }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// The dotted key on a 1-based line: the nearest `[table]` header above plus the key.
fn key_at(src: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = src.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?.trim();
    let table = lines
        .get(..line.saturating_sub(1))?
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if here.starts_with('[') {
        return Some(here.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    }
    let key = here.split('=').next()?.trim().trim_matches('"');
    if key.is_empty() || here.starts_with('#') {
        return table;
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

/// No setting needs longer; the cap keeps time arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// hyper needs at least this much buffer for a request head.
const MIN_HEADER_SIZE: u32 = 8192;

/// The log's buffer by default: about a second of access lines at 40,000 requests/s.
const DEFAULT_LOG_BUFFER: u32 = 8 << 20;

/// A log buffer must hold a few long lines.
const MIN_LOG_BUFFER: u32 = 4096;

/// hyper parses headers into a buffer of this many slots per request.
const MAX_HEADERS: u32 = 1000;

type Span = std::ops::Range<usize>;

/// Where settings that are checked against each other are written, if they are.
struct Written {
    connect: Option<Span>,
    header: Option<Span>,
    check_timeout: Option<Span>,
    interval: Option<Span>,
}

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) src: &'a str,
    pub(super) errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn err_at(&mut self, span: std::ops::Range<usize>, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            pos: Some(line_col(self.src, span.start)),
            key: Some(key.to_string()),
            message: message.into(),
        });
    }

    fn err_nowhere(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            pos: None,
            key: Some(key.to_string()),
            message: message.into(),
        });
    }

    pub(super) fn config(
        &mut self,
        raw: RawConfig,
        read_users: &dyn Fn(&Path) -> std::io::Result<String>,
    ) -> Option<Config> {
        let (listen, tls) = self.listen(raw.listen);
        let identity = self.identity(raw.identity);
        // The bucket pairing is checked whatever else is wrong with either upstream.
        self.buckets(raw.primary.bucket.as_ref(), raw.replica.bucket.as_ref());
        let primary = self.upstream(raw.primary, "primary");
        let replica = self.upstream(raw.replica, "replica");
        let users_file = raw.replication.users_file.as_ref().map(|f| {
            let base = self.file.parent().unwrap_or(Path::new("."));
            (base.join(f.get_ref()), f.span())
        });
        let replication = self.replication(raw.replication, users_file.as_ref().map(|(p, _)| p.clone()));
        let mut users = BTreeMap::new();
        let mut overridden_users = Vec::new();
        if let Some((file, span)) = &users_file {
            users = self.users_file(file, span.clone(), read_users);
        }
        for (name, mode) in &raw.users {
            if let Some(m) = self.mode(mode, &format!("users.{}", quote_key(name)))
                && users.insert(name.clone(), m).is_some()
            {
                overridden_users.push(name.clone());
            }
        }
        let span = |v: &Option<S>| v.as_ref().map(Spanned::span);
        let written = Written {
            connect: span(&raw.limits.upstream_connect_timeout),
            header: span(&raw.limits.upstream_header_timeout),
            check_timeout: span(&raw.health.timeout),
            interval: span(&raw.health.interval),
        };
        let limits = self.limits(raw.limits);
        let health = self.health(raw.health);
        if let (Some(l), Some(h)) = (&limits, &health) {
            self.timeout_relations(l, h, &written);
        }
        let log = self.log(raw.log);
        let mut warnings = Vec::new();
        if health.as_ref().is_some_and(|h| h.path.is_some()) {
            warnings.push(
                "health.path is deprecated: set primary.health_path and replica.health_path (default: the bucket)"
                    .to_string(),
            );
        }
        if let Some(w) = tls.as_ref().and_then(|c| tls::expiry_warning(c, std::time::SystemTime::now())) {
            warnings.push(w);
        }
        Some(Config {
            path: self.file.to_path_buf(),
            listen: listen?,
            tls,
            identity: identity?,
            primary: primary?,
            replica: replica?,
            replication: replication?,
            users,
            overridden_users,
            warnings,
            limits: limits?,
            health: health?,
            log: log?,
        })
    }

    fn socket_addr(&mut self, s: &S, key: &str) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err_at(
                    s.span(),
                    key,
                    format!("{:?} is not an address with a port (e.g. \"0.0.0.0:8080\" or \"[::]:8080\")", s.get_ref()),
                );
                None
            }
        }
    }

    /// `[listen]`, and the TLS listener's certificate (read here so that `check` and a
    /// reload refuse a bad pair; README "TLS").
    fn listen(&mut self, raw: RawListen) -> (Option<Listen>, Option<ServerCert>) {
        let mut ok = true;
        let mut addr_of = |v: &mut Self, s: &Option<S>, key: &str| match s {
            Some(s) => {
                let a = v.socket_addr(s, key);
                ok &= a.is_some();
                a
            }
            None => None,
        };
        let addr = addr_of(self, &raw.addr, "listen.addr");
        let tls_addr = addr_of(self, &raw.tls_addr, "listen.tls_addr");
        let admin_addr = addr_of(self, &raw.admin_addr, "listen.admin_addr");
        if raw.addr.is_none() && raw.tls_addr.is_none() {
            ok = false;
            self.err_nowhere("listen.addr", "missing: the address to serve on (or listen.tls_addr)");
        }
        let cert = match (&raw.tls_addr, &raw.tls_cert, &raw.tls_key) {
            (Some(_), Some(cert), Some(key)) => {
                let base = self.file.parent().unwrap_or(Path::new(".")).to_path_buf();
                let key_file = base.join(key.get_ref());
                match tls::load_server_cert(&base.join(cert.get_ref()), &key_file) {
                    Ok(c) => Some(c),
                    // Each error names its file first: report it at that file's key.
                    Err(e) if e.starts_with(&key_file.display().to_string()) => {
                        ok = false;
                        self.err_at(key.span(), "listen.tls_key", e);
                        None
                    }
                    Err(e) => {
                        ok = false;
                        self.err_at(cert.span(), "listen.tls_cert", e);
                        None
                    }
                }
            }
            (Some(a), cert, _) => {
                ok = false;
                let missing = if cert.is_none() { "listen.tls_cert" } else { "listen.tls_key" };
                self.err_at(a.span(), missing, "missing: the TLS listener needs tls_cert and tls_key (PEM files)");
                None
            }
            (None, cert, key) => {
                for (s, k) in [(cert, "listen.tls_cert"), (key, "listen.tls_key")] {
                    if let Some(s) = s {
                        ok = false;
                        self.err_at(s.span(), k, "only used with listen.tls_addr");
                    }
                }
                None
            }
        };
        let named = [(addr, "listen.addr"), (tls_addr, "listen.tls_addr"), (admin_addr, "listen.admin_addr")];
        for (i, (a, key)) in named.iter().enumerate() {
            // Port 0 (any free port) may appear more than once.
            let Some(a) = a.filter(|a| a.port() != 0) else { continue };
            if let Some((_, first)) = named[..i].iter().find(|(b, _)| *b == Some(a)) {
                ok = false;
                self.err_nowhere(key, format!("{a} is also {first}: each listener needs its own port"));
            }
        }
        let proxy_protocol = raw.proxy_protocol.is_some_and(|p| *p.get_ref());
        let listen = ok.then_some(Listen { addr, tls_addr, proxy_protocol, admin_addr });
        (listen, cert)
    }

    fn identity(&mut self, raw: RawIdentity) -> Option<Identity> {
        let mut ok = true;
        let user_header = match &raw.user_header {
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) if http::HeaderName::from_bytes(s.get_ref().as_bytes()).is_err() => {
                self.err_at(s.span(), "identity.user_header", format!("{:?} is not a valid header name", s.get_ref()));
                ok = false;
                None
            }
            Some(s) => Some(s.get_ref().to_ascii_lowercase()),
            // A gateway that names users in the query may pass client headers through:
            // then only the query parameter is believed.
            None if raw.user_query.is_some() => None,
            None => Some("x-forwarded-user".to_string()),
        };
        let user_query = match &raw.user_query {
            Some(s) if s.get_ref().is_empty() || s.get_ref().contains(['&', '=', '#', ' ']) => {
                self.err_at(
                    s.span(),
                    "identity.user_query",
                    format!("{:?} is not a usable query parameter name", s.get_ref()),
                );
                ok = false;
                None
            }
            Some(s) => Some(s.get_ref().clone()),
            None => None,
        };
        let trusted_proxies = self.cidrs(&raw.trusted_proxies, "identity.trusted_proxies")?;
        ok.then_some(Identity { user_header, user_query, trusted_proxies })
    }

    fn cidrs(&mut self, list: &[S], key: &str) -> Option<Vec<IpNet>> {
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        for (i, s) in list.iter().enumerate() {
            match parse_cidr(s.get_ref()) {
                Some(net) => out.push(net),
                None => {
                    ok = false;
                    self.err_at(
                        s.span(),
                        &format!("{key}[{i}]"),
                        format!(
                            "{:?} is not an IP range (e.g. \"10.20.0.0/16\", \"2001:db8::/32\" or a single address)",
                            s.get_ref()
                        ),
                    );
                }
            }
        }
        ok.then_some(out)
    }

    fn upstream(&mut self, raw: RawUpstream, name: &str) -> Option<UpstreamConfig> {
        let url = self.url(&raw.url, &format!("{name}.url"));
        let mut ok = true;
        if let Some(b) = &raw.bucket
            && !valid_bucket(b.get_ref())
        {
            ok = false;
            self.err_at(
                b.span(),
                &format!("{name}.bucket"),
                format!("{:?} is not a valid S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')", b.get_ref()),
            );
        }
        let auth = self.auth(&raw, name);
        if let Some(p) = raw.preserve_host.as_ref().filter(|p| *p.get_ref() && name != "primary") {
            ok = false;
            self.err_at(
                p.span(),
                &format!("{name}.preserve_host"),
                "only the primary may get the client's Host: the replica's requests are made for the replica",
            );
        }
        let health_path = match raw.health_path {
            None => None,
            Some(p) => {
                let path = self.check_path(&p, &format!("{name}.health_path"));
                ok &= path.is_some();
                path
            }
        };
        let ca_file = match &raw.ca_file {
            None => None,
            Some(f) => {
                let path = self.file.parent().unwrap_or(Path::new(".")).join(f.get_ref());
                match tls::load_ca(&path) {
                    Ok(ca) => Some(ca),
                    Err(e) => {
                        ok = false;
                        self.err_at(f.span(), &format!("{name}.ca_file"), e);
                        None
                    }
                }
            }
        };
        if let (Some(f), Some(u)) = (&raw.ca_file, &url)
            && u.scheme_str() != Some("https")
        {
            ok = false;
            self.err_at(f.span(), &format!("{name}.ca_file"), format!("only used with an https:// {name}.url"));
        }
        let cfg = UpstreamConfig {
            ca_file,
            url: url?,
            bucket: raw.bucket.as_ref().map(|b| b.get_ref().clone()),
            region: raw.region.map(Spanned::into_inner),
            auth: auth?,
            preserve_host: raw.preserve_host.is_some_and(|p| *p.get_ref()),
            health_path,
        };
        ok.then_some(cfg)
    }

    /// `auth` and the keys that go with it (README "Authentication").
    fn auth(&mut self, raw: &RawUpstream, name: &str) -> Option<Auth> {
        let key = |k: &str| format!("{name}.{k}");
        let sigv4 = match &raw.auth {
            None => false,
            Some(s) if s.get_ref() == "pass" => false,
            Some(s) if s.get_ref() == "sigv4" && name == "primary" => {
                self.err_at(
                    s.span(),
                    &key("auth"),
                    "the primary is never signed by mediaroute: it stays the authority over who may read and write",
                );
                return None;
            }
            Some(s) if s.get_ref() == "sigv4" => true,
            Some(s) => {
                self.err_at(
                    s.span(),
                    &key("auth"),
                    format!("{:?} is not an auth mode: expected \"pass\" or \"sigv4\"", s.get_ref()),
                );
                return None;
            }
        };
        if !sigv4 {
            let mut ok = true;
            for (opt, k) in [
                (&raw.signing_host, "signing_host"),
                (&raw.credentials_file, "credentials_file"),
                (&raw.profile, "profile"),
            ] {
                if let Some(s) = opt {
                    ok = false;
                    self.err_at(s.span(), &key(k), "only used with auth = \"sigv4\"");
                }
            }
            return ok.then_some(Auth::Pass);
        }
        let region = match &raw.region {
            Some(r) if valid_region(r.get_ref()) => Some(r.get_ref().clone()),
            Some(r) => {
                self.err_at(r.span(), &key("region"), format!("{:?} is not an AWS region name", r.get_ref()));
                None
            }
            None => {
                self.err_nowhere(&key("region"), "missing: auth = \"sigv4\" signs for the replica's region");
                None
            }
        };
        let host = match (&raw.signing_host, &raw.bucket, &region) {
            (Some(h), _, _) if h.get_ref().parse::<http::uri::Authority>().is_ok_and(|a| a.as_str() == h.get_ref()) => {
                Some(h.get_ref().to_ascii_lowercase())
            }
            (Some(h), _, _) => {
                self.err_at(h.span(), &key("signing_host"), format!("{:?} is not a host name", h.get_ref()));
                None
            }
            // Path-style: the bucket is in the path, the regional endpoint is the host.
            (None, Some(_), Some(r)) => Some(format!("s3.{r}.amazonaws.com")),
            (None, Some(_), None) => None,
            (None, None, _) => {
                self.err_nowhere(
                    &key("signing_host"),
                    "missing: without a bucket the replica serves one bucket, whose host name mediaroute cannot guess \
                     (e.g. \"my-bucket.s3.eu-west-1.amazonaws.com\")",
                );
                None
            }
        };
        let file = raw.credentials_file.as_ref().map(|f| {
            let base = self.file.parent().unwrap_or(Path::new("."));
            base.join(f.get_ref())
        });
        let credentials = CredentialsSource { file, profile: raw.profile.as_ref().map(|p| p.get_ref().clone()) };
        Some(Auth::SigV4(Signing { region: region?, host: host?, credentials }))
    }

    fn url(&mut self, s: &S, key: &str) -> Option<http::Uri> {
        let text = s.get_ref();
        let problem = match text.parse::<http::Uri>() {
            Err(_) => Some("is not a URL".to_string()),
            Ok(u) => match (u.scheme_str(), u.authority()) {
                (Some("http" | "https"), Some(a)) if a.as_str().contains('@') => {
                    Some("must not carry user info".to_string())
                }
                (Some("http" | "https"), Some(_)) if u.path() != "/" || u.query().is_some() => {
                    Some("must be scheme and host only, without a path or query".to_string())
                }
                (Some("http" | "https"), Some(_)) => return Some(u),
                (Some(other), _) => Some(format!("has scheme {other:?}: only http and https are supported")),
                (None, _) => Some("needs a scheme: http:// or https://".to_string()),
            },
        };
        if let Some(p) = problem {
            self.err_at(s.span(), key, format!("{text:?} {p}"));
        }
        None
    }

    /// Bucket mapping needs both buckets or neither.
    fn buckets(&mut self, primary: Option<&S>, replica: Option<&S>) {
        match (primary, replica) {
            (Some(b), None) => {
                self.err_at(b.span(), "primary.bucket", "set on the primary only: set replica.bucket too, or neither")
            }
            (None, Some(b)) => {
                self.err_at(b.span(), "replica.bucket", "set on the replica only: set primary.bucket too, or neither")
            }
            _ => {}
        }
    }

    fn mode(&mut self, s: &S, key: &str) -> Option<Mode> {
        let m = Mode::parse(s.get_ref());
        if m.is_none() {
            self.err_at(
                s.span(),
                key,
                format!("{:?} is not a mode: expected \"no\", \"yes\" or \"auto\"", s.get_ref()),
            );
        }
        m
    }

    fn duration(&mut self, s: &Option<S>, key: &str, default: Duration) -> Option<Duration> {
        let Some(s) = s else { return Some(default) };
        match parse_duration(s.get_ref()) {
            Some(d) if d <= MAX_DURATION => Some(d),
            Some(_) => {
                self.err_at(s.span(), key, format!("{:?} is too long: at most 365d", s.get_ref()));
                None
            }
            None => {
                let msg = format!("{:?} is not a duration (e.g. \"15m\", \"30s\", \"250ms\", \"1h\")", s.get_ref());
                self.err_at(s.span(), key, msg);
                None
            }
        }
    }

    fn replication(&mut self, raw: RawReplication, users_file: Option<PathBuf>) -> Option<Replication> {
        let default_mode = match &raw.default_mode {
            Some(s) => self.mode(s, "replication.default_mode"),
            None => Some(Mode::No),
        };
        let networks = self.cidrs(&raw.networks, "replication.networks");
        let delay = self.duration(&raw.delay, "replication.delay", Duration::from_secs(15 * 60));
        Some(Replication {
            default_mode: default_mode?,
            networks: networks?,
            delay: delay?,
            fallback: raw.fallback.unwrap_or(true),
            use_status: raw.use_status.unwrap_or(true),
            users_file,
        })
    }

    /// Reads the users file: top-level `name = "mode"` pairs, errors located in that file.
    fn users_file(
        &mut self,
        file: &Path,
        span: std::ops::Range<usize>,
        read: &dyn Fn(&Path) -> std::io::Result<String>,
    ) -> BTreeMap<String, Mode> {
        let mut users = BTreeMap::new();
        let src = match read(file) {
            Ok(s) => s,
            Err(e) => {
                self.err_at(span, "replication.users_file", format!("cannot read {}: {e}", file.display()));
                return users;
            }
        };
        let raw: BTreeMap<String, S> = match toml::from_str(&src) {
            Ok(r) => r,
            Err(e) => {
                self.errors.push(serde_error(file, &src, &e));
                return users;
            }
        };
        let mut sub = Validator { file, src: &src, errors: Vec::new() };
        for (name, mode) in &raw {
            if let Some(m) = sub.mode(mode, &quote_key(name)) {
                users.insert(name.clone(), m);
            }
        }
        self.errors.append(&mut sub.errors);
        users
    }

    fn limits(&mut self, raw: RawLimits) -> Option<Limits> {
        let secs = Duration::from_secs;
        let max_connections = self.positive(&raw.max_connections, "limits.max_connections", 10_000);
        let max_requests = self.positive(&raw.max_requests, "limits.max_requests", 10_000);
        let streams = self.positive(&raw.max_streams_per_connection, "limits.max_streams_per_connection", 100);
        let upstream_conns = self.positive(&raw.max_upstream_connections, "limits.max_upstream_connections", 4096);
        let queue = self.duration(&raw.upstream_queue_timeout, "limits.upstream_queue_timeout", secs(5));
        let header_read = self.duration(&raw.header_read_timeout, "limits.header_read_timeout", secs(30));
        let header_size = self.positive(&raw.max_header_size, "limits.max_header_size", 64 * 1024);
        if let (Some(size), Some(v)) = (header_size, &raw.max_header_size)
            && size < MIN_HEADER_SIZE
        {
            self.err_at(v.span(), "limits.max_header_size", format!("{size} is too small: at least {MIN_HEADER_SIZE}"));
        }
        let max_headers = self.positive(&raw.max_headers, "limits.max_headers", 100);
        if let (Some(n), Some(v)) = (max_headers, &raw.max_headers)
            && n > MAX_HEADERS
        {
            self.err_at(v.span(), "limits.max_headers", format!("{n} is too many: at most {MAX_HEADERS}"));
        }
        let idle = self.duration(&raw.idle_timeout, "limits.idle_timeout", secs(75));
        let body = self.duration(&raw.body_timeout, "limits.body_timeout", secs(180));
        let connect = self.duration(&raw.upstream_connect_timeout, "limits.upstream_connect_timeout", secs(3));
        let upstream_header = self.duration(&raw.upstream_header_timeout, "limits.upstream_header_timeout", secs(60));
        let probe = self.duration(&raw.age_probe_timeout, "limits.age_probe_timeout", secs(2));
        let entries = self.positive(&raw.age_cache_entries, "limits.age_cache_entries", 100_000);
        let grace = self.duration(&raw.shutdown_grace, "limits.shutdown_grace", secs(30));
        let handshake = self.duration(&raw.handshake_timeout, "limits.handshake_timeout", secs(10));
        for (d, key) in [
            (header_read, "limits.header_read_timeout"),
            (idle, "limits.idle_timeout"),
            (body, "limits.body_timeout"),
            (queue, "limits.upstream_queue_timeout"),
            (connect, "limits.upstream_connect_timeout"),
            (upstream_header, "limits.upstream_header_timeout"),
            (probe, "limits.age_probe_timeout"),
            (handshake, "limits.handshake_timeout"),
        ] {
            if d == Some(Duration::ZERO) {
                self.err_nowhere(key, "must be more than 0s");
            }
        }
        Some(Limits {
            max_connections: max_connections?,
            max_requests: max_requests?,
            max_streams_per_connection: streams?,
            max_upstream_connections: upstream_conns?,
            upstream_queue_timeout: queue?,
            header_read_timeout: header_read?,
            max_header_size: header_size.filter(|s| *s >= MIN_HEADER_SIZE)?,
            max_headers: max_headers.filter(|n| *n <= MAX_HEADERS)?,
            idle_timeout: idle?,
            body_timeout: body?,
            upstream_connect_timeout: connect?,
            upstream_header_timeout: upstream_header?,
            age_probe_timeout: probe?,
            age_cache_entries: entries? as usize,
            shutdown_grace: grace?,
            handshake_timeout: handshake?,
            lean_path: raw.lean_path.unwrap_or(true),
        })
    }

    fn positive(&mut self, v: &Option<Spanned<i64>>, key: &str, default: u32) -> Option<u32> {
        let Some(v) = v else { return Some(default) };
        match u32::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.err_at(v.span(), key, format!("{} is out of range: expected 1 to {}", v.get_ref(), u32::MAX));
                None
            }
        }
    }

    fn health(&mut self, raw: RawHealth) -> Option<Health> {
        let interval = self.duration(&raw.interval, "health.interval", Duration::from_secs(5));
        let timeout = self.duration(&raw.timeout, "health.timeout", Duration::from_secs(2));
        let rise = self.positive(&raw.rise, "health.rise", 2);
        let fall = self.positive(&raw.fall, "health.fall", 3);
        let path = match raw.path {
            None => Some(None),
            Some(p) => self.check_path(&p, "health.path").map(Some),
        };
        for (d, key) in [(interval, "health.interval"), (timeout, "health.timeout")] {
            if d == Some(Duration::ZERO) {
                self.err_nowhere(key, "must be more than 0s");
            }
        }
        Some(Health { interval: interval?, timeout: timeout?, path: path?, rise: rise?, fall: fall? })
    }

    /// A path for a health check: starts with `/` and is a valid request target.
    fn check_path(&mut self, p: &S, key: &str) -> Option<String> {
        let text = p.get_ref();
        if text.starts_with('/') && text.parse::<http::uri::PathAndQuery>().is_ok() {
            return Some(text.clone());
        }
        self.err_at(p.span(), key, format!("{text:?} is not a path starting with /"));
        None
    }

    /// Timeouts that are each fine alone but cannot work together (README "Limits and timeouts").
    fn timeout_relations(&mut self, l: &Limits, h: &Health, written: &Written) {
        // A zero is already reported on its own.
        let set = |d: Duration| !d.is_zero();
        let show = |d: Duration, at: &Option<Span>| {
            let d = crate::duration::format_duration(d);
            if at.is_some() { d } else { format!("{d} (the default)") }
        };
        if set(l.upstream_header_timeout) && l.upstream_connect_timeout >= l.upstream_header_timeout {
            // The header timeout also runs while a GET connects: the connect timeout would never fire.
            let message = format!(
                "{} must be shorter than limits.upstream_header_timeout, {}",
                show(l.upstream_connect_timeout, &written.connect),
                show(l.upstream_header_timeout, &written.header)
            );
            self.err_where("limits.upstream_connect_timeout", [&written.connect, &written.header], message);
        }
        if set(h.interval) && h.timeout > h.interval {
            // Checks run one after another: one that may outlast the interval delays the next.
            let message = format!(
                "{} must not be longer than health.interval, {}",
                show(h.timeout, &written.check_timeout),
                show(h.interval, &written.interval)
            );
            self.err_where("health.timeout", [&written.check_timeout, &written.interval], message);
        }
    }

    /// An error at the first of `places` that is written in the file, or nowhere.
    fn err_where(&mut self, key: &str, places: [&Option<Span>; 2], message: String) {
        match places.into_iter().flatten().next() {
            Some(span) => self.err_at(span.clone(), key, message),
            None => self.err_nowhere(key, message),
        }
    }

    fn log(&mut self, raw: RawLog) -> Option<Log> {
        let json = match &raw.format {
            None => Some(false),
            Some(s) if s.get_ref() == "text" => Some(false),
            Some(s) if s.get_ref() == "json" => Some(true),
            Some(s) => {
                self.err_at(
                    s.span(),
                    "log.format",
                    format!("{:?} is not a log format: expected \"text\" or \"json\"", s.get_ref()),
                );
                None
            }
        };
        let level = raw.level.map_or_else(|| "info".to_string(), Spanned::into_inner);
        let buffer_size = self.positive(&raw.buffer_size, "log.buffer_size", DEFAULT_LOG_BUFFER);
        if let (Some(size), Some(v)) = (buffer_size, &raw.buffer_size)
            && size < MIN_LOG_BUFFER
        {
            self.err_at(v.span(), "log.buffer_size", format!("{size} is too small: at least {MIN_LOG_BUFFER}"));
        }
        Some(Log { json: json?, level, buffer_size: buffer_size.filter(|s| *s >= MIN_LOG_BUFFER)? })
    }
}

/// Quotes a TOML key when it is not a bare key.
fn quote_key(name: &str) -> String {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a single address (as a /32 or /128).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<std::net::IpAddr>().ok().map(IpNet::from)
}

/// An AWS region name: lower-case letters, digits and dashes (`eu-west-1`).
fn valid_region(r: &str) -> bool {
    !r.is_empty() && r.len() <= 32 && r.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// S3 bucket naming rules, loosely: 3-63 of a-z, 0-9, '.', '-'.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && !b.starts_with(['.', '-'])
        && !b.ends_with(['.', '-'])
}
