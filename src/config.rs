//! TOML configuration: raw serde structs, then checked types.
//!
//! This is the only module that reads files. Parsing happens in two steps so that
//! `check` can report every mistake at once: serde catches syntax, unknown keys and
//! wrong types (first error only), then [`validate`] checks every value and collects
//! all errors, each with file, line, column and key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

/// A user's "Use S3 Replication" setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Always the primary.
    No,
    /// The replica for every download that may use it.
    Yes,
    /// The replica only when the client IP is in `replication.networks`.
    Auto,
}

impl Mode {
    /// Parses `no` / `yes` / `auto`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "no" => Some(Mode::No),
            "yes" => Some(Mode::Yes),
            "auto" => Some(Mode::Auto),
            _ => None,
        }
    }

    /// The config spelling of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::No => "no",
            Mode::Yes => "yes",
            Mode::Auto => "auto",
        }
    }
}

/// How requests to an upstream are authenticated (README "Authentication").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// The client's `Authorization` header and presigned query go through untouched.
    Pass,
    /// Downloads are signed anew with mediaroute's own credentials (replica only).
    SigV4(Signing),
}

/// What signing for the replica needs (README "Authentication").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signing {
    /// The region the replica bucket is in (`replica.region`).
    pub region: String,
    /// The host name signed for and sent as `Host` (`replica.signing_host`).
    pub host: String,
    /// Where the credentials come from.
    pub credentials: CredentialsSource,
}

/// Where mediaroute's own AWS credentials come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CredentialsSource {
    /// A shared-credentials-format file (`credentials_file`); `None`: the standard chain.
    pub file: Option<PathBuf>,
    /// The profile in that file, or in the standard shared files (`profile`).
    pub profile: Option<String>,
}

/// One located configuration mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the mistake is in.
    pub file: PathBuf,
    /// 1-based line and column, when the mistake has a place in the file.
    pub pos: Option<(usize, usize)>,
    /// Dotted key path, e.g. `users.carol`, when known.
    pub key: Option<String>,
    /// What is wrong, in plain words.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.pos {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every mistake found in a configuration (never empty).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A checked configuration, ready to build a routing table from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// Listener settings (need a restart to change).
    pub listen: Listen,
    /// The TLS listener's certificate and key, re-read on every reload (README "TLS").
    pub tls: Option<ServerCert>,
    /// Who the client is and whom to believe.
    pub identity: Identity,
    /// The region where media is uploaded.
    pub primary: UpstreamConfig,
    /// The region that S3 Replication copies to.
    pub replica: UpstreamConfig,
    /// Replica routing settings.
    pub replication: Replication,
    /// Every listed user with the mode that applies (`[users]` wins over `users_file`).
    pub users: BTreeMap<String, Mode>,
    /// Users listed in both `users_file` and `[users]`; `[users]` wins.
    pub overridden_users: Vec<String>,
    /// Settings that work but should be changed (printed by `check`, logged at load).
    pub warnings: Vec<String>,
    /// Timeouts and sizes.
    pub limits: Limits,
    /// Active and passive health checking.
    pub health: Health,
    /// Log output.
    pub log: Log,
}

/// `[listen]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Plain HTTP listener; at least one of `addr` and `tls_addr` is set.
    pub addr: Option<SocketAddr>,
    /// TLS listener (README "TLS"); its certificate is [`Config::tls`].
    pub tls_addr: Option<SocketAddr>,
    /// Every connection starts with a PROXY v1/v2 header (README "Behind an NLB").
    pub proxy_protocol: bool,
    /// Admin listener (metrics, health), if any.
    pub admin_addr: Option<SocketAddr>,
}

/// `[identity]`.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Header carrying the user name (lower-case), believed from trusted peers only.
    pub user_header: Option<String>,
    /// Query parameter carrying the user name, believed from trusted peers only.
    pub user_query: Option<String>,
    /// Peers whose `X-Forwarded-For` and user header are believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// `[primary]` or `[replica]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL: scheme and authority only.
    pub url: http::Uri,
    /// Bucket name when requests are mapped between buckets.
    pub bucket: Option<String>,
    /// AWS region (the replica's is needed for signing).
    pub region: Option<String>,
    /// How requests are authenticated.
    pub auth: Auth,
    /// Pass the client's `Host` untouched (primary only; README "Host").
    pub preserve_host: bool,
    /// Path of the active health check's `HEAD`; `None`: the bucket (README "Health").
    pub health_path: Option<String>,
    /// Private CA for an `https` upstream, instead of the system roots (README "HTTPS upstreams").
    pub ca_file: Option<CaFile>,
}

/// `[replication]`.
#[derive(Debug, Clone)]
pub struct Replication {
    /// Mode of users not listed and of anonymous requests.
    pub default_mode: Mode,
    /// "IP addresses for S3 replication", used by mode `auto`.
    pub networks: Vec<IpNet>,
    /// New media stays on the primary this long.
    pub delay: Duration,
    /// Replica miss or failure: retry GET/HEAD on the primary.
    pub fallback: bool,
    /// Trust `x-amz-replication-status` from the probe over the delay.
    pub use_status: bool,
    /// Extra users file, resolved against the config file's folder.
    pub users_file: Option<PathBuf>,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most client connections open at once; further ones wait in the accept queue.
    pub max_connections: u32,
    /// Most requests in flight at once, over all connections; more get 503.
    pub max_requests: u32,
    /// Most requests one HTTP/2 connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Most connections open to each upstream; more requests wait for one.
    pub max_upstream_connections: u32,
    /// How long a request may wait for an upstream connection; then 503.
    pub upstream_queue_timeout: Duration,
    /// Time a client has to send a complete request head (slowloris guard).
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger ones get 431.
    pub max_header_size: u32,
    /// Most header fields in a request head; more get 431.
    pub max_headers: u32,
    /// A client connection with no bytes read or written, and no request waiting on an
    /// upstream, for this long is closed.
    pub idle_timeout: Duration,
    /// An upload that moves no byte for this long is ended (408, or 504 when the
    /// upstream stopped reading it).
    pub body_timeout: Duration,
    /// TCP connect timeout to either upstream.
    pub upstream_connect_timeout: Duration,
    /// Time an upstream has to start its response once the request body has been sent.
    pub upstream_header_timeout: Duration,
    /// Time allowed for the primary probe.
    pub age_probe_timeout: Duration,
    /// Most objects whose facts (age, replication status) are remembered.
    pub age_cache_entries: usize,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// Time a new connection has for its PROXY header and TLS handshake.
    pub handshake_timeout: Duration,
    /// Serve plain HTTP/1.1 downloads on mediaroute's own HTTP/1.1 code, splicing their
    /// bodies (README "The lean download path"); `false` sends everything through hyper.
    pub lean_path: bool,
}

/// `[health]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Time between active checks of each upstream.
    pub interval: Duration,
    /// Time an active check may take.
    pub timeout: Duration,
    /// Deprecated `health.path`: the check path of upstreams without their own `health_path`.
    pub path: Option<String>,
    /// Consecutive successes that mark a down upstream up.
    pub rise: u32,
    /// Consecutive failures (checks or connect errors) that mark an upstream down.
    pub fall: u32,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// `text` or `json`.
    pub json: bool,
    /// Default filter when `RUST_LOG` is not set.
    pub level: String,
    /// The most bytes of log lines waiting to be written; lines beyond are dropped
    /// (README "Access log").
    pub buffer_size: u32,
}

/// Reads, parses and checks the config file at `path` and its users file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        one(ConfigError { file: path.to_path_buf(), pos: None, key: None, message: format!("cannot read: {e}") })
    })?;
    let users_loader = |file: &Path| std::fs::read_to_string(file);
    parse(path, &src, &users_loader)
}

/// Parses and checks config text; `read_users` reads the users file (a seam for tests).
pub fn parse(
    path: &Path,
    src: &str,
    read_users: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = toml::from_str(src).map_err(|e| one(serde_error(path, src, &e)))?;
    let mut v = Validator { file: path, src, errors: Vec::new() };
    let cfg = v.config(raw, read_users);
    match cfg {
        Some(cfg) if v.errors.is_empty() => Ok(cfg),
        _ => Err(ConfigErrors(v.errors)),
    }
}

fn one(e: ConfigError) -> ConfigErrors {
    ConfigErrors(vec![e])
}

/// Turns a toml/serde error into a located error, naming the key on that line.
mod raw;
pub mod tls;
mod validate;

pub use tls::{CaFile, ServerCert};

use raw::RawConfig;
use validate::{Validator, serde_error};

pub use validate::parse_cidr;

#[cfg(test)]
mod tests;
