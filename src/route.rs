//! Admission and the routing decision (README "How a download is routed"), as pure functions.
//!
//! Nothing here does IO or knows about HTTP types; the proxy and `explain` gather the
//! facts (who, where, which request, how old the object is) and ask the same functions.

use std::net::IpAddr;
use std::time::Duration;

use crate::config::Mode;
use crate::table::{Addressing, RoutingTable, Upstream};

/// Why a request went where it went; also the metric label and access-log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not a GET or HEAD.
    Write,
    /// The request addresses no object, or an S3 sub-resource.
    NotObject,
    /// The user's mode is `no`.
    ModeNo,
    /// Mode `auto` and the client is outside the replica networks.
    OutsideNetworks,
    /// The replica is marked down.
    ReplicaDown,
    /// The primary refused the client's own credentials in the probe.
    Denied,
    /// The primary says the object has not replicated (`PENDING` or `FAILED`).
    NotReplicated,
    /// The object is younger than the replication delay.
    TooYoung,
    /// The object's age could not be learned.
    AgeUnknown,
    /// Served by the replica.
    Replica,
    /// The replica missed or failed; served by the primary.
    Fallback,
}

impl Reason {
    /// The label used in metrics, logs and explain output.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::NotObject => "not-object",
            Reason::ModeNo => "mode-no",
            Reason::OutsideNetworks => "outside-networks",
            Reason::ReplicaDown => "replica-down",
            Reason::Denied => "denied",
            Reason::NotReplicated => "not-replicated",
            Reason::TooYoung => "too-young",
            Reason::AgeUnknown => "age-unknown",
            Reason::Replica => "replica",
            Reason::Fallback => "fallback",
        }
    }

    /// Every reason, in rule order.
    pub const ALL: [Reason; 11] = [
        Reason::Write,
        Reason::NotObject,
        Reason::ModeNo,
        Reason::OutsideNetworks,
        Reason::ReplicaDown,
        Reason::Denied,
        Reason::NotReplicated,
        Reason::TooYoung,
        Reason::AgeUnknown,
        Reason::Replica,
        Reason::Fallback,
    ];
}

/// Who is asking and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientContext {
    /// The client address after PROXY header and `X-Forwarded-For` handling.
    pub ip: IpAddr,
    /// The user name, if a trusted peer supplied one.
    pub user: Option<Box<str>>,
}

/// What the request is, reduced to what the rules need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts {
    /// GET or HEAD.
    pub read: bool,
    /// The path names an object and the query no S3 sub-resource.
    pub object: bool,
    /// Health checking has marked the replica down (read when the request arrived).
    pub replica_down: bool,
}

/// An object's `x-amz-replication-status` on the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationStatus {
    /// Not copied yet.
    Pending,
    /// Copied to the replica.
    Completed,
    /// Replication gave up on it.
    Failed,
}

impl ReplicationStatus {
    /// Parses the header value; `REPLICA` (the object is itself a copy) and others: `None`.
    pub fn parse(value: &str) -> Option<ReplicationStatus> {
        match value {
            "PENDING" => Some(ReplicationStatus::Pending),
            "COMPLETED" | "COMPLETE" => Some(ReplicationStatus::Completed),
            "FAILED" => Some(ReplicationStatus::Failed),
            _ => None,
        }
    }

    /// The header spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationStatus::Pending => "PENDING",
            ReplicationStatus::Completed => "COMPLETED",
            ReplicationStatus::Failed => "FAILED",
        }
    }
}

/// What the primary probe (README "The primary probe") said of this request and its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// No probe was made (none needed).
    NotProbed,
    /// The primary let this client read the object; what it said of it.
    Found {
        /// Now minus `Last-Modified` (zero for a timestamp in the future), if sent.
        age: Option<Duration>,
        /// `x-amz-replication-status`, if sent.
        status: Option<ReplicationStatus>,
    },
    /// The primary has no such object (404).
    Missing,
    /// The primary refused the client's credentials (401/403).
    Denied,
    /// The probe failed or timed out.
    Failed,
}

/// The rules that need no probe (1-5), or `None` when the probe decides.
fn before_probe(table: &RoutingTable, ctx: &ClientContext, facts: &RequestFacts) -> Option<Reason> {
    if !facts.read {
        return Some(Reason::Write);
    }
    if !facts.object {
        return Some(Reason::NotObject);
    }
    match table.mode_of(ctx.user.as_deref()) {
        Mode::No => return Some(Reason::ModeNo),
        Mode::Auto if !table.networks.contains(ctx.ip) => return Some(Reason::OutsideNetworks),
        Mode::Auto | Mode::Yes => {}
    }
    if facts.replica_down {
        return Some(Reason::ReplicaDown);
    }
    None
}

/// Whether the decision needs the primary probe: a read that passed rules 1-5, when
/// there is a delay to apply or the replica is signed (README "The primary probe").
pub fn needs_probe(table: &RoutingTable, ctx: &ClientContext, facts: &RequestFacts) -> bool {
    (!table.delay.is_zero() || table.signs_replica()) && before_probe(table, ctx, facts).is_none()
}

/// Decides which upstream serves the request, and why (rules 1-11, first match wins).
pub fn decide(table: &RoutingTable, ctx: &ClientContext, facts: &RequestFacts, probed: Probed) -> (Upstream, Reason) {
    if let Some(reason) = before_probe(table, ctx, facts) {
        return (Upstream::Primary, reason);
    }
    let probe_needed = needs_probe(table, ctx, facts);
    let (age, status) = match probed {
        Probed::Denied => return (Upstream::Primary, Reason::Denied),
        // The primary lacks the object, so the replica cannot have it either (and must not
        // serve a copy of what the primary deleted).
        Probed::Missing => return (Upstream::Primary, Reason::TooYoung),
        Probed::Failed => return (Upstream::Primary, Reason::AgeUnknown),
        Probed::NotProbed if probe_needed => return (Upstream::Primary, Reason::AgeUnknown),
        Probed::NotProbed => (None, None),
        Probed::Found { age, status } => (age, status),
    };
    match status.filter(|_| table.use_status) {
        Some(ReplicationStatus::Pending | ReplicationStatus::Failed) => {
            return (Upstream::Primary, Reason::NotReplicated);
        }
        Some(ReplicationStatus::Completed) => return (Upstream::Replica, Reason::Replica),
        None => {}
    }
    if !table.delay.is_zero() {
        match age {
            Some(a) if a < table.delay => return (Upstream::Primary, Reason::TooYoung),
            Some(_) => {}
            None => return (Upstream::Primary, Reason::AgeUnknown),
        }
    }
    (Upstream::Replica, Reason::Replica)
}

/// S3 query parameters that turn an object or bucket request into a sub-resource one.
const SUB_RESOURCES: &[&str] = &[
    "accelerate",
    "acl",
    "analytics",
    "attributes",
    "cors",
    "delete",
    "encryption",
    "intelligent-tiering",
    "inventory",
    "legal-hold",
    "lifecycle",
    "list-type",
    "location",
    "logging",
    "metrics",
    "notification",
    "object-lock",
    "ownershipControls",
    "policy",
    "policyStatus",
    "publicAccessBlock",
    "replication",
    "requestPayment",
    "restore",
    "retention",
    "select",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "versioning",
    "versions",
    "website",
];

/// Why a request is refused before any upstream sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The target is not a path (`*`, authority-form, `CONNECT`): 400.
    NotAPath,
    /// A `.` or `..` segment, literal or percent-encoded: 400.
    DotSegment,
    /// Path-style, and the first segment is not the primary bucket: 403.
    ForeignBucket,
}

/// A request that may be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The path names a key, whatever the query (a write to it changes that object).
    pub key: bool,
    /// The path and query address one object (rule 2 is the negation).
    pub object: bool,
}

/// Decides whether a request may be forwarded at all, and whether it addresses an object.
///
/// `connect` is true for the `CONNECT` method; `path` and `query` are the request
/// target's, raw. The server and `explain` both call this, so they cannot disagree.
pub fn admit(table: &RoutingTable, connect: bool, path: &str, query: Option<&str>) -> Result<Admitted, Refusal> {
    if connect || !path.starts_with('/') {
        return Err(Refusal::NotAPath);
    }
    if has_dot_segment(path) {
        // An upstream that normalises paths would let `/bucket/../other` escape the bucket.
        return Err(Refusal::DotSegment);
    }
    let key = match table.addressing() {
        Addressing::PathStyle { primary, .. } => {
            let rest = &path[1..];
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket != primary {
                return Err(Refusal::ForeignBucket);
            }
            !key.is_empty()
        }
        // The upstream serves one bucket: the path is the key, `/` is the bucket itself.
        Addressing::BucketBound => path.len() > 1,
    };
    Ok(Admitted { key, object: key && !names_sub_resource(query) })
}

/// The path an admitted request is sent with to `to`: path-style, the first segment
/// becomes the replica's bucket on the replica; otherwise the path as it came. Returned as
/// the bucket to put first (if any) and the rest, so the caller builds it without copies.
pub fn upstream_path<'a>(table: &'a RoutingTable, to: Upstream, path: &'a str) -> (Option<&'a str>, &'a str) {
    match (to, table.addressing()) {
        (Upstream::Replica, Addressing::PathStyle { primary, replica }) => {
            // Admission checked that the first segment is the primary bucket.
            let rest = path.strip_prefix('/').and_then(|p| p.strip_prefix(primary)).unwrap_or("");
            (Some(replica), rest)
        }
        _ => (None, path),
    }
}

/// Whether the path has a `.` or `..` segment as an upstream that decodes and normalises
/// would see it: `%XX` decoded once, `/` and `\` (also as `%2F`, `%5C`) both separators.
/// Such an upstream would turn `/bucket/..%2Fother/x` into `/other/x` (README "Buckets and
/// addressing").
fn has_dot_segment(path: &str) -> bool {
    let decoded = percent_decoded(path);
    decoded.split(|b| *b == b'/' || *b == b'\\').any(|seg| seg == b"." || seg == b"..")
}

/// `%XX` escapes decoded once; a broken escape stays as written. Borrows when there are none.
fn percent_decoded(path: &str) -> std::borrow::Cow<'_, [u8]> {
    let bytes = path.as_bytes();
    if !bytes.contains(&b'%') {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            (b'%', Some(hi), Some(lo)) => Some(hi << 4 | lo),
            _ => None,
        };
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether a query names an S3 sub-resource (`?acl`, `?uploadId=...`): not a plain object read.
fn names_sub_resource(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            SUB_RESOURCES.contains(&name)
        })
    })
}

#[cfg(test)]
mod tests;
