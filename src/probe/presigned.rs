//! Presigned URLs whose probe succeeded, remembered by their exact signature until they
//! expire (README "The primary probe"): the only authorization mediaroute ever reuses.
//!
//! The key is a keyed hash of the method and the whole request target: the signature is
//! in the target and covers the method, path and query, so the same key means the same
//! request the primary already allowed, and nothing about one client carries to another.
//! Only true SigV4 presigned URLs that sign no header but `host` are remembered (a signed
//! `Range` or condition is not in the target), never one that also carries an
//! `Authorization` header, and never for more than [`AT_MOST`]: keys deactivated, sessions
//! ended or policies changed at the primary take effect within that time.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::Method;

/// The longest a presigned URL's success is remembered, whatever its own expiry.
pub const AT_MOST: Duration = Duration::from_secs(300);

/// How far in the future a URL's signing time may be (S3 allows 15 minutes of skew).
const SKEW: Duration = Duration::from_secs(900);

/// Successful presigned requests and when each URL expires.
#[derive(Debug)]
pub struct Presigned {
    expiries: Mutex<HashMap<u64, SystemTime>>,
    capacity: usize,
    hasher: RandomState,
}

impl Presigned {
    /// Remembers at most `capacity` URLs.
    pub fn new(capacity: usize) -> Presigned {
        Presigned { expiries: Mutex::new(HashMap::new()), capacity: capacity.max(1), hasher: RandomState::new() }
    }

    fn key(&self, method: &Method, target: &str) -> u64 {
        self.hasher.hash_one((method.as_str(), target))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SystemTime>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.expiries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether this exact presigned request succeeded before and its URL has not expired.
    pub fn allowed(&self, method: &Method, target: &str, now: SystemTime) -> bool {
        let key = self.key(method, target);
        self.lock().get(&key).is_some_and(|expiry| now < *expiry)
    }

    /// Remembers that the primary allowed this request, if it is a SigV4 presigned one
    /// that signs only `host`, has no `Authorization` header, and has not expired: until
    /// it expires, and at most [`AT_MOST`].
    pub fn remember(&self, method: &Method, target: &str, query: Option<&str>, authorized: bool, now: SystemTime) {
        if authorized {
            return;
        }
        let Some(expiry) = query.and_then(|q| expiry(q, now)).filter(|e| now < *e) else { return };
        let expiry = expiry.min(now + AT_MOST);
        let key = self.key(method, target);
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, e| now < *e);
            if map.len() >= self.capacity {
                // Any entry will do: the cost of a wrong guess is one extra probe.
                if let Some(victim) = map.keys().next().copied() {
                    map.remove(&victim);
                }
            }
        }
        map.insert(key, expiry);
    }

    /// Number of URLs remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// When a presigned URL expires: `X-Amz-Date` plus `X-Amz-Expires`; `None` when the query
/// is not a SigV4 presigned URL (names as S3 spells them) signing only `host`, or was
/// signed in the future.
pub fn expiry(query: &str, now: SystemTime) -> Option<SystemTime> {
    let param = |name: &str| {
        query.split('&').filter_map(|pair| pair.split_once('=')).find_map(|(k, v)| (k == name).then_some(v))
    };
    if param("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" || param("X-Amz-SignedHeaders")? != "host" {
        return None;
    }
    param("X-Amz-Credential")?;
    param("X-Amz-Signature")?;
    let signed_at = amz_date(param("X-Amz-Date")?)?;
    if signed_at > now + SKEW {
        return None;
    }
    let lasts: u64 = param("X-Amz-Expires")?.parse().ok()?;
    // S3 accepts at most seven days.
    signed_at.checked_add(Duration::from_secs(lasts.min(7 * 86_400)))
}

/// Parses SigV4's basic ISO 8601 time, `20261124T093000Z`.
fn amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| s.get(range)?.parse::<u32>().ok();
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, min, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + min * 60 + sec);
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=a&X-Amz-Date=20261124T093000Z\
                     &X-Amz-Expires=600&X-Amz-SignedHeaders=host&X-Amz-Signature=abc";

    fn at(s: &str) -> SystemTime {
        amz_date(s).unwrap()
    }

    #[test]
    fn the_expiry_is_the_signing_time_plus_its_lifetime() {
        let signed = at("20261124T093000Z");
        assert_eq!(signed.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_795_512_600);
        assert_eq!(expiry(Q, signed), Some(signed + Duration::from_secs(600)));
        assert_eq!(expiry("versionId=1", signed), None);
        for not_a_presign in [
            Q.replace("X-Amz-Signature=abc", "x=y"),
            Q.replace("X-Amz-Credential=a", "x=y"),
            Q.replace("X-Amz-Algorithm", "x-amz-algorithm"),
            Q.replace("SignedHeaders=host", "SignedHeaders=host%3Brange"),
        ] {
            assert_eq!(expiry(&not_a_presign, signed), None, "{not_a_presign}");
        }
        assert_eq!(expiry(Q, signed - Duration::from_secs(3600)), None, "signed in the future");
        assert_eq!(amz_date("2026-11-24T09:30"), None);
        assert_eq!(amz_date("20261324T093000Z"), None);
    }

    #[test]
    fn only_the_exact_request_is_remembered_and_only_until_it_expires() {
        let p = Presigned::new(10);
        let target = format!("/b/k?{Q}");
        let now = at("20261124T093100Z");
        p.remember(&Method::GET, &target, Some(Q), true, now);
        assert!(!p.allowed(&Method::GET, &target, now), "never with an Authorization header too");
        p.remember(&Method::GET, &target, Some(Q), false, now);
        assert!(p.allowed(&Method::GET, &target, now));
        assert!(!p.allowed(&Method::HEAD, &target, now), "another method");
        assert!(!p.allowed(&Method::GET, &target.replace("/b/k", "/b/j"), now), "another path");
        assert!(!p.allowed(&Method::GET, &format!("{target}&versionId=2"), now), "another query");
        assert!(!p.allowed(&Method::GET, &target, at("20261124T094001Z")), "expired");
        let late = at("20261124T094500Z");
        p.remember(&Method::GET, "/b/other", Some(Q), false, late);
        assert_eq!(p.len(), 1, "an expired URL is not remembered");
    }

    #[test]
    fn it_stays_bounded() {
        let p = Presigned::new(3);
        let now = at("20261124T093100Z");
        for i in 0..10 {
            p.remember(&Method::GET, &format!("/b/{i}?{Q}"), Some(Q), false, now);
        }
        assert_eq!(p.len(), 3);
    }
}
