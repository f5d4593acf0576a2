//! `mediaroute explain`: the decision for a hypothetical request, without serving.

use std::fmt::Write;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::Config;
use crate::duration::format_duration;
use crate::route::{self, ClientContext, Probed, Refusal, ReplicationStatus, RequestFacts};
use crate::table::{Addressing, RoutingTable};

/// The request to explain.
#[derive(Debug, Clone)]
pub struct Question {
    /// User name; `None` is anonymous.
    pub user: Option<String>,
    /// Client address (after any proxies).
    pub ip: IpAddr,
    /// HTTP method.
    pub method: String,
    /// Request path, with an optional `?query`; `None`: an object in the primary bucket.
    pub path: Option<String>,
    /// Object age; `None` assumes older than the delay.
    pub age: Option<Duration>,
    /// The object's `x-amz-replication-status` as the probe would see it.
    pub status: Option<ReplicationStatus>,
    /// Pretend health checking marked the replica down.
    pub replica_down: bool,
}

/// Decides as the proxy would and describes why, one fact per line.
pub fn explain(cfg: &Config, q: &Question) -> String {
    let table = RoutingTable::build(cfg, 1);
    let target = q.path.clone().unwrap_or_else(|| match table.addressing() {
        Addressing::PathStyle { primary, .. } => format!("/{primary}/object"),
        Addressing::BucketBound => "/object".to_string(),
    });
    let (path, query) = match target.split_once('?') {
        Some((p, qs)) => (p, Some(qs)),
        None => (target.as_str(), None),
    };
    let method = q.method.to_ascii_uppercase();
    let mut out = String::new();
    let admitted = route::admit(&table, method == "CONNECT", path, query);
    let addressing = match table.addressing() {
        Addressing::PathStyle { primary, replica } => {
            format!("path-style: /{primary}/{{key}}; the replica gets /{replica}/{{key}}")
        }
        Addressing::BucketBound => "bucket-bound (no bucket set): the path is the key, passed unchanged".to_string(),
    };
    let admitted = match admitted {
        Ok(a) => a,
        Err(refusal) => {
            let (status, why) = match refusal {
                Refusal::NotAPath => (400, "the request target is not a path starting with /"),
                Refusal::DotSegment => (400, "the path has a . or .. segment"),
                Refusal::ForeignBucket => (403, "the first path segment is not the primary bucket"),
            };
            let _ = writeln!(out, "refused:  {status} before any upstream: {why}");
            let _ = writeln!(out, "request:  {method} {target}");
            let _ = writeln!(out, "address:  {addressing}");
            return out;
        }
    };
    let ctx = ClientContext { ip: q.ip, user: q.user.as_deref().map(Box::from) };
    let facts = RequestFacts {
        read: method == "GET" || method == "HEAD",
        object: admitted.object,
        replica_down: q.replica_down,
    };
    let probed = if route::needs_probe(&table, &ctx, &facts) {
        Probed::Found { age: Some(q.age.unwrap_or(Duration::MAX)), status: q.status }
    } else {
        Probed::NotProbed
    };
    let (upstream, reason) = route::decide(&table, &ctx, &facts, probed);
    let mode = table.mode_of(ctx.user.as_deref());
    let listed = q.user.as_ref().is_some_and(|u| cfg.users.contains_key(u));
    let _ = writeln!(out, "upstream: {}", upstream.as_str());
    let _ = writeln!(out, "reason:   {}", reason.as_str());
    let who = match (&q.user, listed) {
        (Some(u), true) => format!("{u} (mode {})", mode.as_str()),
        (Some(u), false) => format!("{u} (not listed: default_mode {})", mode.as_str()),
        (None, _) => format!("anonymous (default_mode {})", mode.as_str()),
    };
    let _ = writeln!(out, "user:     {who}");
    let inside = if table.networks.contains(q.ip) { "inside" } else { "outside" };
    let _ = writeln!(out, "client:   {} ({inside} replication.networks)", q.ip);
    let _ = writeln!(out, "request:  {method} {target} ({})", if facts.object { "object" } else { "not an object" });
    let _ = writeln!(out, "address:  {addressing}");
    let delay = format_duration(table.delay);
    let age = match q.age {
        Some(a) => format!("{} (delay {delay})", format_duration(a)),
        None => format!("not given, assumed older than the delay ({delay})"),
    };
    let _ = writeln!(out, "age:      {age}");
    let status = match (q.status, table.use_status) {
        (Some(s), true) => format!("{} (replication.use_status = true: it decides over the delay)", s.as_str()),
        (Some(s), false) => format!("{} (ignored: replication.use_status = false)", s.as_str()),
        (None, _) => "not given (the primary sends none: the delay decides)".to_string(),
    };
    let _ = writeln!(out, "status:   {status}");
    if let Some(s) = &table.signing {
        let host = s.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("?");
        let _ = writeln!(
            out,
            "signing:  sigv4 for {host} in {}, only after the primary allowed the client's own request",
            s.region
        );
    }
    out
}
