//! Object age: what a `HEAD` to the primary says of `Last-Modified`, and a bounded cache.
//!
//! Media keys are write-once, so an object once seen older than the delay stays old.
//! A younger one is probed again once it could have aged past the delay (in case it
//! was overwritten). Misses and failures are remembered for two seconds only, so a
//! failing primary is not asked once per request. Concurrent requests for one key
//! always share a single probe.
//!
//! Entries are keyed by path and `versionId`; a write through mediaroute drops every entry
//! of its path. Keys are stored as keyed hashes (random per process), so memory per entry
//! is fixed whatever the path length, and nobody can aim collisions at it.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::OnceCell;

use crate::route::Age;

/// What one probe learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The primary has the object, last modified then.
    Modified(SystemTime),
    /// The primary answered 404.
    Missing,
    /// No usable answer: error, timeout, or a status other than 2xx/404.
    Failed,
}

#[derive(Debug)]
struct Slot {
    result: OnceCell<(Probe, SystemTime)>,
}

/// How long a miss or a failed probe is remembered.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);

/// A string reduced to a fixed size: its keyed hash and its length.
type Hashed = (u64, usize);

/// Which object: its path as the client addressed it, and its `versionId`, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectKey<'a> {
    /// The request path (primary bucket).
    pub path: &'a str,
    /// The raw `versionId` query value.
    pub version: Option<&'a str>,
}

impl<'a> ObjectKey<'a> {
    /// The key a request for `path?query` addresses.
    pub fn new(path: &'a str, query: Option<&'a str>) -> ObjectKey<'a> {
        let version =
            query.and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("versionId=")).filter(|v| !v.is_empty()));
        ObjectKey { path, version }
    }
}

/// The slots of one path: one per version asked for (`None`: the current version).
type Versions = Vec<(Option<Hashed>, Arc<Slot>)>;

#[derive(Debug, Default)]
struct Slots {
    by_path: HashMap<Hashed, Versions>,
    len: usize,
    /// Writes in progress, by path: what a probe learns of such a key is not kept.
    writing: HashMap<Hashed, u32>,
    /// Writes in progress that may change any key (multi-object deletes).
    writing_any: u32,
}

impl Slots {
    /// Drops every entry of `path`, all versions.
    fn drop_path(&mut self, path: Hashed) {
        if let Some(gone) = self.by_path.remove(&path) {
            self.len -= gone.len();
        }
    }

    /// Drops every entry.
    fn drop_all(&mut self) {
        self.by_path.clear();
        self.len = 0;
    }
}

/// What a write may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The object at this path (every version).
    Key(Box<str>),
    /// Any object: a multi-object delete names its keys in its body.
    Any,
}

/// A write in progress (see [`AgeCache::begin_write`]); when dropped, what was learned
/// of the written key meanwhile is dropped too.
#[derive(Debug)]
pub struct Writing {
    cache: Arc<AgeCache>,
    what: Written,
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.cache.end_write(&self.what);
    }
}

/// The bounded cache of object ages, shared by all requests.
#[derive(Debug)]
pub struct AgeCache {
    slots: Mutex<Slots>,
    capacity: usize,
    hasher: RandomState,
}

impl AgeCache {
    /// A cache holding at most `capacity` objects.
    pub fn new(capacity: usize) -> AgeCache {
        AgeCache { slots: Mutex::new(Slots::default()), capacity: capacity.max(1), hasher: RandomState::new() }
    }

    /// Number of objects remembered (including probes in flight).
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every age (the primary moved); writes in progress stay marked.
    pub fn clear(&self) {
        self.lock().drop_all();
    }

    /// Marks a write in progress until the guard is dropped: the write may have changed
    /// the object from its first byte until its answer has ended (a multipart completion
    /// answers at once and commits later), so nothing a probe learns of it meanwhile is
    /// kept, and what was known before is dropped at both ends.
    pub fn begin_write(self: &Arc<Self>, what: Written) -> Writing {
        self.mark_write(&what, true);
        Writing { cache: Arc::clone(self), what }
    }

    fn end_write(&self, what: &Written) {
        self.mark_write(what, false);
    }

    fn mark_write(&self, what: &Written, begin: bool) {
        let key = match what {
            Written::Key(path) => Some(self.hash(path)),
            Written::Any => None,
        };
        let mut slots = self.lock();
        match key {
            Some(k) => {
                let n = slots.writing.entry(k).or_default();
                if begin {
                    *n += 1;
                } else {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        slots.writing.remove(&k);
                    }
                }
                slots.drop_path(k);
            }
            None => {
                slots.writing_any = if begin { slots.writing_any + 1 } else { slots.writing_any.saturating_sub(1) };
                slots.drop_all();
            }
        }
    }

    fn hash(&self, s: &str) -> Hashed {
        (self.hasher.hash_one(s), s.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The age of `key`, running `probe` only if no usable answer is cached or in flight.
    pub async fn age<F, Fut>(&self, key: ObjectKey<'_>, delay: Duration, probe: F) -> Age
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Probe>,
    {
        let path = self.hash(key.path);
        let version = key.version.map(|v| self.hash(v));
        let now = SystemTime::now();
        let slot = {
            let mut guard = self.lock();
            let slots = &mut *guard;
            if slots.writing_any > 0 || slots.writing.contains_key(&path) {
                // Being written: ask, but neither keep nor share the answer.
                None
            } else {
                Some(self.slot_for(slots, path, version, delay, now))
            }
        };
        let Some(slot) = slot else {
            return to_age(probe().await, now);
        };
        let (probe, _) = *slot.result.get_or_init(|| async { (probe().await, SystemTime::now()) }).await;
        to_age(probe, now)
    }

    /// The slot that answers for `path` and `version`: a cached one still good, else a new one.
    fn slot_for(
        &self,
        slots: &mut Slots,
        path: Hashed,
        version: Option<Hashed>,
        delay: Duration,
        now: SystemTime,
    ) -> Arc<Slot> {
        let known = slots.by_path.get_mut(&path).and_then(|vs| vs.iter_mut().find(|(v, _)| *v == version));
        match known {
            Some((_, slot)) if still_good(slot, delay, now) => Arc::clone(slot),
            Some((_, slot)) => {
                *slot = Arc::new(Slot { result: OnceCell::new() });
                Arc::clone(slot)
            }
            None => {
                if slots.len >= self.capacity {
                    // Any other path will do: the cost of a wrong guess is one extra probe.
                    if let Some(victim) = slots.by_path.keys().copied().find(|k| *k != path) {
                        slots.drop_path(victim);
                    }
                }
                let slot = Arc::new(Slot { result: OnceCell::new() });
                slots.by_path.entry(path).or_default().push((version, Arc::clone(&slot)));
                slots.len += 1;
                slot
            }
        }
    }
}

/// The age a probe's answer gives at `now`.
fn to_age(probe: Probe, now: SystemTime) -> Age {
    match probe {
        Probe::Modified(t) => Age::Known(now.duration_since(t).unwrap_or(Duration::ZERO)),
        Probe::Missing => Age::Missing,
        Probe::Failed => Age::Unknown,
    }
}

/// Whether a slot may answer now: in flight, old for good, young and not yet due,
/// or a recent miss or failure.
fn still_good(slot: &Slot, delay: Duration, now: SystemTime) -> bool {
    let Some((probe, checked)) = slot.result.get() else { return true };
    match probe {
        Probe::Modified(t) => {
            let old_when_checked = checked.duration_since(*t).is_ok_and(|a| a >= delay);
            // No deadline that far out (delay near the clock's limit): never due.
            old_when_checked || t.checked_add(delay).is_none_or(|due| now < due)
        }
        Probe::Missing | Probe::Failed => now.duration_since(*checked).is_ok_and(|d| d < NEGATIVE_TTL),
    }
}

/// Parses a `Last-Modified` header value.
pub fn parse_last_modified(value: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(value).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const DELAY: Duration = Duration::from_secs(900);

    fn key(path: &str) -> ObjectKey<'_> {
        ObjectKey { path, version: None }
    }

    fn ago(secs: u64) -> SystemTime {
        SystemTime::now() - Duration::from_secs(secs)
    }

    #[tokio::test]
    async fn old_objects_are_probed_once() {
        let cache = AgeCache::new(10);
        let probes = AtomicUsize::new(0);
        for _ in 0..3 {
            let age = cache
                .age(key("/b/old"), DELAY, || async {
                    probes.fetch_add(1, Ordering::SeqCst);
                    Probe::Modified(ago(3600))
                })
                .await;
            assert!(matches!(age, Age::Known(a) if a >= Duration::from_secs(3599)));
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn young_objects_are_rechecked_once_they_could_have_aged() {
        let cache = AgeCache::new(10);
        let probes = AtomicUsize::new(0);
        let short = Duration::from_millis(400);
        let probe = || async {
            probes.fetch_add(1, Ordering::SeqCst);
            Probe::Modified(SystemTime::now())
        };
        let first = cache.age(key("/b/young"), short, probe).await;
        assert!(matches!(first, Age::Known(a) if a < short));
        cache.age(key("/b/young"), short, probe).await;
        assert_eq!(probes.load(Ordering::SeqCst), 1, "not due yet");
        tokio::time::sleep(Duration::from_millis(500)).await;
        cache.age(key("/b/young"), short, probe).await;
        assert_eq!(probes.load(Ordering::SeqCst), 2, "due: probed again");
    }

    #[tokio::test]
    async fn misses_and_failures_are_remembered_briefly() {
        let cache = AgeCache::new(10);
        assert_eq!(cache.age(key("/b/x"), DELAY, || async { Probe::Missing }).await, Age::Missing);
        // Within the negative TTL the cached miss answers; the probe below is not run.
        assert_eq!(cache.age(key("/b/x"), DELAY, || async { Probe::Failed }).await, Age::Missing);
        assert_eq!(cache.age(key("/b/y"), DELAY, || async { Probe::Failed }).await, Age::Unknown);
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test]
    async fn a_huge_delay_does_not_overflow() {
        let cache = AgeCache::new(10);
        let huge = Duration::from_secs(u64::MAX / 2);
        let probes = AtomicUsize::new(0);
        let probe = || async {
            probes.fetch_add(1, Ordering::SeqCst);
            Probe::Modified(ago(60))
        };
        for _ in 0..2 {
            let age = cache.age(key("/b/z"), huge, probe).await;
            assert!(matches!(age, Age::Known(a) if (59..120).contains(&a.as_secs())), "{age:?}");
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1, "a deadline past the clock's end is never due");
    }

    #[tokio::test]
    async fn versions_are_separate_objects() {
        let cache = AgeCache::new(10);
        let old = |secs| move || async move { Probe::Modified(ago(secs)) };
        let current = ObjectKey::new("/b/v.mov", None);
        let v1 = ObjectKey::new("/b/v.mov", Some("versionId=1"));
        let v2 = ObjectKey::new("/b/v.mov", Some("x=y&versionId=2"));
        assert_eq!(v2.version, Some("2"));
        assert!(matches!(cache.age(current, DELAY, old(100)).await, Age::Known(a) if (99..101).contains(&a.as_secs())));
        assert!(matches!(cache.age(v1, DELAY, old(7200)).await, Age::Known(a) if a.as_secs() >= 7199));
        assert!(matches!(cache.age(v2, DELAY, old(3600)).await, Age::Known(a) if a.as_secs() >= 3599));
        assert_eq!(cache.len(), 3);
        // Cached: these probes are not run.
        assert!(matches!(cache.age(v1, DELAY, old(1)).await, Age::Known(a) if a.as_secs() >= 7199));
        assert!(matches!(cache.age(current, DELAY, old(1)).await, Age::Known(a) if a.as_secs() >= 99));
    }

    #[tokio::test]
    async fn nothing_learned_during_a_write_is_kept() {
        let cache = Arc::new(AgeCache::new(10));
        let probes = AtomicUsize::new(0);
        let old = || async {
            probes.fetch_add(1, Ordering::SeqCst);
            Probe::Modified(ago(3600))
        };
        cache.age(key("/b/w.mov"), DELAY, old).await;
        let writing = cache.begin_write(Written::Key("/b/w.mov".into()));
        // Probes while the write runs (e.g. before a multipart completion commits) are not kept.
        cache.age(key("/b/w.mov"), DELAY, old).await;
        cache.age(key("/b/w.mov"), DELAY, old).await;
        assert_eq!(probes.load(Ordering::SeqCst), 3);
        cache.age(key("/b/other.mov"), DELAY, old).await;
        cache.age(key("/b/other.mov"), DELAY, old).await;
        assert_eq!(probes.load(Ordering::SeqCst), 4, "other keys are cached as usual");
        drop(writing);
        let fresh = cache.age(key("/b/w.mov"), DELAY, || async { Probe::Missing }).await;
        assert_eq!(fresh, Age::Missing, "asked again once the write has ended");
        let any = cache.begin_write(Written::Any);
        assert!(cache.is_empty(), "a multi-object delete forgets everything");
        drop(any);
    }

    #[tokio::test]
    async fn a_write_forgets_every_version_of_its_path() {
        let cache = AgeCache::new(10);
        let old = || async { Probe::Modified(ago(3600)) };
        cache.age(ObjectKey::new("/b/w.mov", None), DELAY, old).await;
        cache.age(ObjectKey::new("/b/w.mov", Some("versionId=1")), DELAY, old).await;
        cache.age(ObjectKey::new("/b/other.mov", None), DELAY, old).await;
        let cache = Arc::new(cache);
        drop(cache.begin_write(Written::Key("/b/w.mov".into())));
        assert_eq!(cache.len(), 1);
        let fresh = cache.age(ObjectKey::new("/b/w.mov", None), DELAY, || async { Probe::Missing }).await;
        assert_eq!(fresh, Age::Missing, "probed again after the write");
        let other = cache.age(ObjectKey::new("/b/other.mov", None), DELAY, || async { Probe::Missing }).await;
        assert!(matches!(other, Age::Known(_)), "other keys are kept");
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_probe() {
        let cache = Arc::new(AgeCache::new(10));
        let probes = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, probes, gate) = (cache.clone(), probes.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .age(key("/b/shared"), DELAY, || async move {
                        probes.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Probe::Failed
                    })
                    .await
            }));
        }
        // Let every task reach the cache, then release the one probe.
        while probes.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Age::Unknown);
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_cache_stays_bounded() {
        let cache = AgeCache::new(4);
        for i in 0..20 {
            cache.age(key(&format!("/b/{i}")), DELAY, || async { Probe::Modified(ago(3600)) }).await;
        }
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn last_modified_parses() {
        let t = parse_last_modified("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_445_412_480);
        assert_eq!(parse_last_modified("yesterday"), None);
    }
}
