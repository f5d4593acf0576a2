//! Raw serde structs: what the TOML file may contain, before any value is checked.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A string with its place in the file.
pub(super) type S = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: RawListen,
    #[serde(default)]
    pub(super) identity: RawIdentity,
    pub(super) primary: RawUpstream,
    pub(super) replica: RawUpstream,
    #[serde(default)]
    pub(super) replication: RawReplication,
    #[serde(default)]
    pub(super) users: BTreeMap<String, S>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) log: RawLog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) addr: Option<S>,
    pub(super) tls_addr: Option<S>,
    pub(super) tls_cert: Option<S>,
    pub(super) tls_key: Option<S>,
    pub(super) proxy_protocol: Option<Spanned<bool>>,
    pub(super) admin_addr: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) user_header: Option<S>,
    pub(super) user_query: Option<S>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: S,
    pub(super) bucket: Option<S>,
    pub(super) region: Option<S>,
    pub(super) auth: Option<S>,
    pub(super) signing_host: Option<S>,
    pub(super) credentials_file: Option<S>,
    pub(super) profile: Option<S>,
    pub(super) preserve_host: Option<Spanned<bool>>,
    pub(super) health_path: Option<S>,
    pub(super) ca_file: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReplication {
    pub(super) default_mode: Option<S>,
    #[serde(default)]
    pub(super) networks: Vec<S>,
    pub(super) delay: Option<S>,
    pub(super) fallback: Option<bool>,
    pub(super) users_file: Option<S>,
    pub(super) use_status: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) max_requests: Option<Spanned<i64>>,
    pub(super) max_streams_per_connection: Option<Spanned<i64>>,
    pub(super) max_upstream_connections: Option<Spanned<i64>>,
    pub(super) upstream_queue_timeout: Option<S>,
    pub(super) header_read_timeout: Option<S>,
    pub(super) max_header_size: Option<Spanned<i64>>,
    pub(super) max_headers: Option<Spanned<i64>>,
    pub(super) idle_timeout: Option<S>,
    pub(super) body_timeout: Option<S>,
    pub(super) upstream_connect_timeout: Option<S>,
    pub(super) upstream_header_timeout: Option<S>,
    pub(super) age_probe_timeout: Option<S>,
    pub(super) age_cache_entries: Option<Spanned<i64>>,
    pub(super) shutdown_grace: Option<S>,
    pub(super) handshake_timeout: Option<S>,
    pub(super) lean_path: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) interval: Option<S>,
    pub(super) timeout: Option<S>,
    pub(super) path: Option<S>,
    pub(super) rise: Option<Spanned<i64>>,
    pub(super) fall: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<S>,
    pub(super) level: Option<S>,
    pub(super) buffer_size: Option<Spanned<i64>>,
}
