//! Who and where: the client address and user name of a request.

use std::net::IpAddr;

use http::HeaderMap;

use crate::headers::X_FORWARDED_FOR;
use crate::route::ClientContext;
use crate::table::{NetSet, RoutingTable};

/// Builds the client context for a request that arrived from `peer`.
///
/// The address is the peer's, or, when the peer is a trusted proxy, the right-most
/// untrusted address of `X-Forwarded-For`. The user comes from the user header or
/// query parameter, and only from a trusted peer.
pub fn context(table: &RoutingTable, peer: IpAddr, headers: &HeaderMap, query: Option<&str>) -> ClientContext {
    let peer = peer.to_canonical();
    let trusted = table.trusted_proxies.contains(peer);
    let ip = if trusted { walk_forwarded(&table.trusted_proxies, peer, headers) } else { peer };
    let user = if trusted { user(table, headers, query) } else { None };
    ClientContext { ip, user }
}

/// nginx `real_ip_recursive on`: from the right, skip trusted addresses; a malformed
/// entry stops the walk and the last good address stands.
fn walk_forwarded(trusted: &NetSet, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let mut ip = peer;
    for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(value) = value.to_str() else { return ip };
        for entry in value.rsplit(',') {
            if !trusted.contains(ip) {
                return ip;
            }
            match parse_forwarded_ip(entry.trim()) {
                Some(next) => ip = next.to_canonical(),
                None => return ip,
            }
        }
    }
    ip
}

/// An `X-Forwarded-For` entry: a bare IPv4 or IPv6 address, or `[v6]`.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    let s = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    s.parse().ok()
}

fn user(table: &RoutingTable, headers: &HeaderMap, query: Option<&str>) -> Option<Box<str>> {
    if let Some(h) = &table.user_header {
        let mut values = headers.get_all(h).iter();
        if let Some(first) = values.next() {
            // Two values mean someone before the trusted proxy sent one too: believe neither.
            if values.next().is_some() {
                return None;
            }
            let v = first.to_str().ok()?.trim();
            if !v.is_empty() {
                return Some(Box::from(v));
            }
        }
    }
    let name = table.user_query.as_deref()?;
    let value = single_query_param(query?, name)?;
    let value = percent_decode(value)?;
    (!value.is_empty()).then(|| value.into_boxed_str())
}

/// The raw value of the `name=value` pair in a query string; `None` if absent or repeated.
fn single_query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    let mut found = query.split('&').filter_map(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        (n == name).then_some(v)
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Decodes `%XX` escapes; `None` for a broken escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Removes the identity header and query parameter so they never reach an upstream.
///
/// Returns the query without the user parameter (`None` when nothing is left).
pub fn strip_identity<'q>(
    table: &RoutingTable,
    headers: &mut HeaderMap,
    query: Option<&'q str>,
) -> Option<std::borrow::Cow<'q, str>> {
    if let Some(h) = &table.user_header {
        headers.remove(h);
    }
    let query = query?;
    let Some(name) = table.user_query.as_deref() else {
        return Some(query.into());
    };
    if !query.split('&').any(|pair| pair.split_once('=').map_or(pair, |(n, _)| n) == name) {
        return Some(query.into());
    }
    let kept: Vec<&str> =
        query.split('&').filter(|pair| pair.split_once('=').map_or(*pair, |(n, _)| n) != name).collect();
    (!kept.is_empty()).then(|| kept.join("&").into())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;
    use http::header::HeaderName;

    fn table(identity: &str) -> RoutingTable {
        let src = format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n[identity]\n{identity}\n[primary]\nurl = \"http://127.0.0.1:1\"\n[replica]\nurl = \"http://127.0.0.1:2\"\n[replication]\n"
        );
        let cfg = config::parse(Path::new("t.toml"), &src, &|_| unreachable!()).unwrap();
        RoutingTable::build(&cfg, 1)
    }

    fn trusted() -> RoutingTable {
        table(
            "trusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\", \"::1/128\"]\nuser_header = \"X-Forwarded-User\"\nuser_query = \"user\"",
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_and_anonymous() {
        let h = headers(&[("x-forwarded-for", "10.20.0.1"), ("x-forwarded-user", "alice")]);
        let c = context(&trusted(), ip("192.0.2.7"), &h, Some("user=alice"));
        assert_eq!(c, ClientContext { ip: ip("192.0.2.7"), user: None });
    }

    #[test]
    fn trusted_peer_walks_from_the_right() {
        // The left-most entry is whatever the client claimed; the right-most untrusted one counts.
        let h = headers(&[("x-forwarded-for", "10.20.0.1, 198.51.100.4, 10.1.1.1")]);
        let c = context(&trusted(), ip("127.0.0.1"), &h, None);
        assert_eq!(c.ip, ip("198.51.100.4"));
    }

    #[test]
    fn several_header_lines_are_one_list() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-for", "10.0.0.2")]);
        assert_eq!(context(&trusted(), ip("127.0.0.1"), &h, None).ip, ip("203.0.113.9"));
    }

    #[test]
    fn all_trusted_gives_the_left_most() {
        let h = headers(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(context(&trusted(), ip("127.0.0.1"), &h, None).ip, ip("10.0.0.3"));
    }

    #[test]
    fn malformed_entry_stops_the_walk() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9, garbage, 10.0.0.2")]);
        assert_eq!(context(&trusted(), ip("127.0.0.1"), &h, None).ip, ip("10.0.0.2"));
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 10.0.0.2:80")]);
        assert_eq!(context(&trusted(), ip("127.0.0.1"), &h, None).ip, ip("127.0.0.1"));
    }

    #[test]
    fn ipv6_and_mapped_peers() {
        let h = headers(&[("x-forwarded-for", "[2001:db8::5]")]);
        assert_eq!(context(&trusted(), ip("::1"), &h, None).ip, ip("2001:db8::5"));
        let h = headers(&[("x-forwarded-for", "::ffff:203.0.113.1")]);
        assert_eq!(context(&trusted(), ip("::ffff:127.0.0.1"), &h, None).ip, ip("203.0.113.1"));
    }

    #[test]
    fn user_from_header_then_query() {
        let t = trusted();
        let h = headers(&[("x-forwarded-user", "alice")]);
        assert_eq!(context(&t, ip("127.0.0.1"), &h, Some("user=bob")).user.as_deref(), Some("alice"));
        let h = HeaderMap::new();
        let c = context(&t, ip("127.0.0.1"), &h, Some("a=1&user=b%C3%B6b&x"));
        assert_eq!(c.user.as_deref(), Some("böb"));
        assert_eq!(context(&t, ip("127.0.0.1"), &h, Some("user=%zz")).user, None);
        assert_eq!(context(&t, ip("127.0.0.1"), &h, Some("user=")).user, None);
    }

    #[test]
    fn repeated_identity_values_are_not_believed() {
        let t = trusted();
        let h = headers(&[("x-forwarded-user", "alice"), ("x-forwarded-user", "carol")]);
        assert_eq!(context(&t, ip("127.0.0.1"), &h, None).user, None);
        let c = context(&t, ip("127.0.0.1"), &HeaderMap::new(), Some("user=alice&user=carol"));
        assert_eq!(c.user, None);
    }

    #[test]
    fn only_the_query_counts_when_only_the_query_is_configured() {
        let t = table("trusted_proxies = [\"127.0.0.0/8\"]\nuser_query = \"user\"");
        let h = headers(&[("x-forwarded-user", "alice")]);
        assert_eq!(context(&t, ip("127.0.0.1"), &h, Some("user=carol")).user.as_deref(), Some("carol"));
        assert_eq!(context(&t, ip("127.0.0.1"), &h, None).user, None);
        let off = table("trusted_proxies = [\"127.0.0.0/8\"]\nuser_header = \"\"");
        assert_eq!(context(&off, ip("127.0.0.1"), &h, None).user, None);
    }

    #[test]
    fn identity_is_stripped() {
        let t = trusted();
        let mut h = headers(&[("x-forwarded-user", "alice"), ("range", "bytes=0-1")]);
        let q = strip_identity(&t, &mut h, Some("user=alice&versionId=2"));
        assert_eq!(q.as_deref(), Some("versionId=2"));
        assert!(h.get("x-forwarded-user").is_none());
        assert!(h.get("range").is_some());
        assert_eq!(strip_identity(&t, &mut h, Some("user=alice")), None);
        assert_eq!(strip_identity(&t, &mut h, Some("acl")).as_deref(), Some("acl"));
        assert_eq!(strip_identity(&t, &mut h, None), None);
    }
}
