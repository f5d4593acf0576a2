//! The routing table: an immutable snapshot built once per config load, and the
//! holder that requests load it from and reloads swap it into.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use ipnet::IpNet;

use crate::config::{self, Config, ConfigErrors, Mode};

/// One of the two upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// The region where media is uploaded.
    Primary,
    /// The region S3 Replication copies to.
    Replica,
}

impl Upstream {
    /// The label used in headers, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Upstream::Primary => "primary",
            Upstream::Replica => "replica",
        }
    }
}

/// A set of IP ranges with logarithmic lookup.
///
/// Ranges are merged into sorted, disjoint intervals, so overlapping and nested
/// ranges cost nothing and a lookup is one binary search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl NetSet {
    /// Builds the set from any ranges, IPv4 and IPv6 mixed.
    pub fn new<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> NetSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        NetSet { v4: merge(v4), v6: merge(v6) }
    }

    /// Whether `ip` is in any range; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => lookup(&self.v4, u32::from(a)),
            IpAddr::V6(a) => lookup(&self.v6, u128::from(a)),
        }
    }

    /// Number of disjoint intervals after merging.
    pub fn intervals(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

fn merge<T: Ord + Copy + num_succ::Succ>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            // Overlapping or adjacent: extend the previous interval.
            Some(last) if last.1.succ().is_none_or(|n| lo <= n) => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn lookup<T: Ord + Copy>(v: &[(T, T)], x: T) -> bool {
    // Index of the first interval starting after x; the one before it may hold x.
    let i = v.partition_point(|&(lo, _)| lo <= x);
    i > 0 && v[i - 1].1 >= x
}

mod num_succ {
    /// The next integer, if any.
    pub trait Succ: Sized {
        fn succ(self) -> Option<Self>;
    }
    impl Succ for u32 {
        fn succ(self) -> Option<u32> {
            self.checked_add(1)
        }
    }
    impl Succ for u128 {
        fn succ(self) -> Option<u128> {
            self.checked_add(1)
        }
    }
}

/// Where one upstream is and which bucket it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// Bucket name when requests are path-style (README "Buckets and addressing").
    pub bucket: Option<Box<str>>,
    /// Path of the active health check's `HEAD` (README "Health").
    pub health_path: Box<str>,
    /// The private CA its certificate is verified against, if not the system roots.
    pub ca_file: Option<PathBuf>,
}

impl UpstreamTarget {
    /// Whether two targets are the same place: same scheme, host, port and bucket.
    pub fn same_place(&self, other: &UpstreamTarget) -> bool {
        self.scheme == other.scheme && self.authority == other.authority && self.bucket == other.bucket
    }
}

/// How request paths name buckets and keys (README "Buckets and addressing").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing<'a> {
    /// `/{bucket}/{key}`: the first segment is the primary bucket, swapped for the
    /// replica's when a request goes there.
    PathStyle {
        /// The bucket clients address.
        primary: &'a str,
        /// The bucket the replica holds.
        replica: &'a str,
    },
    /// Each upstream serves one bucket: the path is the key and passes unchanged.
    BucketBound,
}

/// Everything a request needs to be routed, frozen at load time.
#[derive(Debug)]
pub struct RoutingTable {
    users: HashMap<Box<str>, Mode>,
    /// Mode of unlisted and anonymous users.
    pub default_mode: Mode,
    /// Replica networks for mode `auto`.
    pub networks: NetSet,
    /// Number of ranges in `replication.networks` as written.
    pub network_count: usize,
    /// Peers believed for `X-Forwarded-For` and the user header.
    pub trusted_proxies: NetSet,
    /// Header carrying the user name (lower-case).
    pub user_header: Option<http::HeaderName>,
    /// Query parameter carrying the user name.
    pub user_query: Option<Box<str>>,
    /// Minimum object age before the replica may serve it.
    pub delay: Duration,
    /// Retry replica misses on the primary.
    pub fallback: bool,
    /// Trust `x-amz-replication-status` over the delay.
    pub use_status: bool,
    /// Pass the client's `Host` to the primary (README "Host").
    pub preserve_host: bool,
    /// Signing for the replica, when `replica.auth = "sigv4"`.
    pub signing: Option<ReplicaSigning>,
    /// The primary upstream.
    pub primary: UpstreamTarget,
    /// The replica upstream.
    pub replica: UpstreamTarget,
    /// The TLS listener's certificate (README "TLS"): served to every new handshake, so a
    /// reload swaps it with the rest of the table.
    pub server_cert: Option<config::ServerCert>,
    /// TLS settings of upstreams with a `ca_file`: [primary, replica] (README "HTTPS upstreams").
    upstream_tls: [Option<Arc<rustls::ClientConfig>>; 2],
    /// Load counter, starting at 1.
    pub generation: u64,
    /// When this table was built.
    pub loaded_at: SystemTime,
}

impl RoutingTable {
    /// Builds the table from a checked config.
    pub fn build(cfg: &Config, generation: u64) -> RoutingTable {
        let users = cfg.users.iter().map(|(name, mode)| (Box::from(name.as_str()), *mode)).collect();
        RoutingTable {
            users,
            default_mode: cfg.replication.default_mode,
            networks: NetSet::new(&cfg.replication.networks),
            network_count: cfg.replication.networks.len(),
            trusted_proxies: NetSet::new(&cfg.identity.trusted_proxies),
            user_header: cfg
                .identity
                .user_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            user_query: cfg.identity.user_query.as_deref().map(Box::from),
            delay: cfg.replication.delay,
            fallback: cfg.replication.fallback,
            use_status: cfg.replication.use_status,
            preserve_host: cfg.primary.preserve_host,
            signing: match &cfg.replica.auth {
                config::Auth::SigV4(s) => Some(ReplicaSigning {
                    region: Box::from(s.region.as_str()),
                    host: http::HeaderValue::from_str(&s.host).ok(),
                }),
                config::Auth::Pass => None,
            },
            primary: target(&cfg.primary, cfg.health.path.as_deref()),
            replica: target(&cfg.replica, cfg.health.path.as_deref()),
            server_cert: cfg.tls.clone(),
            upstream_tls: [&cfg.primary, &cfg.replica]
                .map(|u| u.ca_file.as_ref().map(|ca| Arc::new(config::tls::client_config(Arc::clone(&ca.roots))))),
            generation,
            loaded_at: SystemTime::now(),
        }
    }

    /// The TLS settings for connecting to `scheme://authority` when it is an upstream with
    /// a `ca_file`; `None`: the system roots.
    pub fn upstream_tls(&self, scheme: Option<&str>, authority: Option<&str>) -> Option<&Arc<rustls::ClientConfig>> {
        if scheme != Some("https") {
            return None;
        }
        [&self.primary, &self.replica]
            .iter()
            .zip(&self.upstream_tls)
            .find(|(t, tls)| {
                tls.is_some() && Some(t.authority.as_str()) == authority && t.scheme == http::uri::Scheme::HTTPS
            })
            .and_then(|(_, tls)| tls.as_ref())
    }

    /// Whether downloads from the replica are signed with mediaroute's own credentials.
    pub fn signs_replica(&self) -> bool {
        self.signing.is_some()
    }

    /// The mode that applies to `user` (`None` is anonymous).
    pub fn mode_of(&self, user: Option<&str>) -> Mode {
        user.and_then(|u| self.users.get(u).copied()).unwrap_or(self.default_mode)
    }

    /// Number of listed users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// How paths address objects (README "Buckets and addressing").
    pub fn addressing(&self) -> Addressing<'_> {
        // Validation sets both buckets or neither.
        match (self.primary.bucket.as_deref(), self.replica.bucket.as_deref()) {
            (Some(primary), Some(replica)) => Addressing::PathStyle { primary, replica },
            _ => Addressing::BucketBound,
        }
    }

    /// The target of one upstream.
    pub fn target(&self, which: Upstream) -> &UpstreamTarget {
        match which {
            Upstream::Primary => &self.primary,
            Upstream::Replica => &self.replica,
        }
    }
}

/// The upstream's place; its check path is its own `health_path`, else the deprecated
/// global `health.path`, else its bucket (`/{bucket}` path-style, `/` bucket-bound).
fn target(u: &crate::config::UpstreamConfig, global_health_path: Option<&str>) -> UpstreamTarget {
    let parts = u.url.clone().into_parts();
    let health_path = match (u.health_path.as_deref().or(global_health_path), u.bucket.as_deref()) {
        (Some(p), _) => Box::from(p),
        (None, Some(bucket)) => format!("/{bucket}").into_boxed_str(),
        (None, None) => Box::from("/"),
    };
    UpstreamTarget {
        scheme: parts.scheme.unwrap_or(http::uri::Scheme::HTTP),
        authority: parts.authority.unwrap_or_else(|| http::uri::Authority::from_static("localhost")),
        bucket: u.bucket.as_deref().map(Box::from),
        health_path,
        ca_file: u.ca_file.as_ref().map(|c| c.path.clone()),
    }
}

/// Where and how the replica's requests are signed (README "Authentication"); the
/// credentials live outside the table, in `sign::credentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSigning {
    /// The replica bucket's region.
    pub region: Box<str>,
    /// The host signed for and sent as `Host` (validated as a host name).
    pub host: Option<http::HeaderValue>,
}

/// Holds the current routing table; requests load it once, reloads swap it whole.
#[derive(Debug)]
pub struct Tables {
    current: ArcSwap<RoutingTable>,
    path: PathBuf,
    generation: AtomicU64,
    started_with: Config,
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The new table's generation.
    pub generation: u64,
    /// Settings that changed in the file but need a restart to take effect.
    pub needs_restart: Vec<&'static str>,
    /// Warnings about the new config (deprecated settings and the like).
    pub warnings: Vec<String>,
    /// Where the replica's signing credentials now come from, if it is signed.
    pub credentials: Option<config::CredentialsSource>,
}

impl Tables {
    /// Starts with the table built from `cfg` (generation 1).
    pub fn new(cfg: Config) -> Tables {
        Tables {
            current: ArcSwap::from_pointee(RoutingTable::build(&cfg, 1)),
            path: cfg.path.clone(),
            generation: AtomicU64::new(1),
            started_with: cfg,
        }
    }

    /// The table for one request; keep it for the whole request.
    pub fn current(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// The config file reloads read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the config file and swaps in a new table; on error the old one stays.
    ///
    /// Runs on a blocking thread: reading files and building a large table take a while.
    pub fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let cfg = config::load(&self.path)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let table = RoutingTable::build(&cfg, generation);
        // One store: a request sees the whole old table or the whole new one.
        self.current.store(Arc::new(table));
        Ok(Reloaded {
            generation,
            needs_restart: restart_only_changes(&self.started_with, &cfg),
            credentials: credentials_of(&cfg),
            warnings: cfg.warnings,
        })
    }
}

/// Where the replica's signing credentials come from, if it is signed.
pub fn credentials_of(cfg: &Config) -> Option<config::CredentialsSource> {
    match &cfg.replica.auth {
        config::Auth::SigV4(s) => Some(s.credentials.clone()),
        config::Auth::Pass => None,
    }
}

/// Settings read only at start-up that differ between two configs.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("listen");
    }
    if old.limits != new.limits {
        changed.push("limits");
    }
    // The check path lives in the table and follows reloads; interval and thresholds do not.
    let timing = |h: &config::Health| (h.interval, h.timeout, h.rise, h.fall);
    if timing(&old.health) != timing(&new.health) {
        changed.push("health");
    }
    if old.log != new.log {
        changed.push("log");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> NetSet {
        let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        NetSet::new(&nets)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_and_overlapping_ranges_merge() {
        let s = set(&["10.0.0.0/8", "10.20.0.0/16", "10.255.0.0/16", "11.0.0.0/8", "192.168.1.0/24"]);
        assert_eq!(s.v4, vec![(0x0a00_0000, 0x0bff_ffff), (0xc0a8_0100, 0xc0a8_01ff)]);
        assert!(s.contains(ip("10.20.3.4")));
        assert!(s.contains(ip("11.255.255.255")));
        assert!(!s.contains(ip("12.0.0.0")));
        assert!(!s.contains(ip("9.255.255.255")));
        assert!(s.contains(ip("192.168.1.0")));
        assert!(!s.contains(ip("192.168.2.0")));
    }

    #[test]
    fn ipv6_and_mapped_ipv4() {
        let s = set(&["2001:db8::/32", "10.20.0.0/16"]);
        assert!(s.contains(ip("2001:db8::1")));
        assert!(!s.contains(ip("2001:db9::1")));
        assert!(s.contains(ip("::ffff:10.20.0.9")));
        assert!(!s.contains(ip("::ffff:10.21.0.9")));
    }

    #[test]
    fn whole_address_space_and_empty() {
        let all = set(&["0.0.0.0/0", "::/0"]);
        assert!(all.contains(ip("255.255.255.255")));
        assert!(all.contains(ip("ffff::1")));
        assert!(!NetSet::default().contains(ip("127.0.0.1")));
    }
}
