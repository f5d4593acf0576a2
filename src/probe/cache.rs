//! The object-facts cache: what primary probes said of each object (README "The primary
//! probe"), bounded.
//!
//! Media keys are write-once, so an object once seen older than the delay, or `COMPLETED`,
//! stays so. A younger one is probed again once it could have aged past the delay (in case
//! it was overwritten), a `PENDING` or `FAILED` one after [`RECHECK`]. Misses and failures
//! are remembered for [`RECHECK`] too, so a failing primary is not asked once per request;
//! a refusal is never kept beyond the probe that concurrent requests shared.
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

use crate::metrics::Metrics;
use crate::route::{Probed, ReplicationStatus};

/// What one probe learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// The primary let the client read the object.
    Found {
        /// Its `Last-Modified`, if sent and valid.
        modified: Option<SystemTime>,
        /// Its `x-amz-replication-status`, if sent and known.
        status: Option<ReplicationStatus>,
    },
    /// The primary answered 404.
    Missing,
    /// The primary refused the client's credentials (401/403).
    Denied,
    /// No usable answer: error, timeout, or another status.
    Failed,
}

impl Learned {
    /// What the routing rules see of this at `now`.
    pub fn at(self, now: SystemTime) -> Probed {
        match self {
            Learned::Found { modified, status } => {
                Probed::Found { age: modified.map(|t| now.duration_since(t).unwrap_or(Duration::ZERO)), status }
            }
            Learned::Missing => Probed::Missing,
            Learned::Denied => Probed::Denied,
            Learned::Failed => Probed::Failed,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// What was learned, and when.
    result: OnceCell<(Learned, SystemTime)>,
    /// When the object was first seen `PENDING`, for the replication lag.
    pending_since: Option<SystemTime>,
}

impl Slot {
    /// A slot to replace `old`, carrying over when the object was first seen `PENDING`.
    fn after(old: &Slot) -> Slot {
        let pending = match old.result.get() {
            Some((Learned::Found { status: Some(ReplicationStatus::Pending), .. }, at)) => Some(*at),
            _ => None,
        };
        Slot { result: OnceCell::new(), pending_since: old.pending_since.or(pending) }
    }
}

/// How long a miss, a failed probe, or a `PENDING`/`FAILED` status is remembered.
pub const RECHECK: Duration = Duration::from_secs(2);

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

/// A write in progress (see [`FactsCache::begin_write`]); when dropped, what was learned
/// of the written key meanwhile is dropped too.
#[derive(Debug)]
pub struct Writing {
    cache: Arc<FactsCache>,
    what: Written,
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.cache.end_write(&self.what);
    }
}

/// The bounded cache of object facts, shared by all requests.
#[derive(Debug)]
pub struct FactsCache {
    slots: Mutex<Slots>,
    capacity: usize,
    hasher: RandomState,
    metrics: Arc<Metrics>,
}

impl FactsCache {
    /// A cache holding at most `capacity` objects; replication lags go to `metrics`.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> FactsCache {
        FactsCache {
            slots: Mutex::new(Slots::default()),
            capacity: capacity.max(1),
            hasher: RandomState::new(),
            metrics,
        }
    }

    /// Number of objects remembered (including probes in flight).
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every object (the primary moved); writes in progress stay marked.
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

    /// What is known of `key`, running `probe` only if no usable answer is cached or in
    /// flight: concurrent callers share one probe (README "The primary probe": with
    /// `replica.auth = "pass"` cached facts serve everyone).
    pub async fn shared<F, Fut>(&self, key: ObjectKey<'_>, delay: Duration, probe: F) -> Learned
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Learned>,
    {
        let now = SystemTime::now();
        let Some(slot) = self.slot(key, |slots, path, version| self.slot_for(slots, path, version, delay, now)) else {
            // Being written: ask, but neither keep nor share the answer.
            return probe().await;
        };
        let (learned, _) = *slot
            .result
            .get_or_init(|| async {
                let learned = probe().await;
                let at = SystemTime::now();
                self.note_lag(&slot, learned, at);
                (learned, at)
            })
            .await;
        learned
    }

    /// Facts about `key` still good at `now`, without probing; never a refusal or failure.
    pub fn cached(&self, key: ObjectKey<'_>, delay: Duration) -> Option<Learned> {
        let now = SystemTime::now();
        let (path, version) = (self.hash(key.path), key.version.map(|v| self.hash(v)));
        let slots = self.lock();
        let (_, slot) = slots.by_path.get(&path)?.iter().find(|(v, _)| *v == version)?;
        let (learned, _) = slot.result.get()?;
        (matches!(learned, Learned::Found { .. }) && still_good(slot, delay, now)).then_some(*learned)
    }

    /// Runs `probe` for one request alone (its answer is that client's own: README "The
    /// primary probe" with `replica.auth = "sigv4"`) and keeps what it says of the object.
    pub async fn own<F, Fut>(&self, key: ObjectKey<'_>, probe: F) -> Learned
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Learned>,
    {
        let learned = probe().await;
        if matches!(learned, Learned::Found { .. } | Learned::Missing) {
            let at = SystemTime::now();
            let slot = self.slot(key, |slots, path, version| {
                let fresh = Arc::new(Slot::default());
                self.replace(slots, path, version, fresh)
            });
            if let Some(slot) = slot {
                self.note_lag(&slot, learned, at);
                let _ = slot.result.set((learned, at));
            }
        }
        learned
    }

    /// The slot `pick` chooses for `key`, or `None` while the key is being written.
    fn slot(
        &self,
        key: ObjectKey<'_>,
        pick: impl FnOnce(&mut Slots, Hashed, Option<Hashed>) -> Arc<Slot>,
    ) -> Option<Arc<Slot>> {
        let path = self.hash(key.path);
        let version = key.version.map(|v| self.hash(v));
        let mut guard = self.lock();
        let slots = &mut *guard;
        if slots.writing_any > 0 || slots.writing.contains_key(&path) {
            return None;
        }
        Some(pick(slots, path, version))
    }

    /// Records the replication lag when an object seen `PENDING` is now `COMPLETED`: an upper
    /// bound, from `Last-Modified` (or the first `PENDING` sighting) to this probe.
    fn note_lag(&self, slot: &Slot, learned: Learned, at: SystemTime) {
        if let (Learned::Found { modified, status: Some(ReplicationStatus::Completed) }, Some(pending)) =
            (learned, slot.pending_since)
        {
            let since = modified.unwrap_or(pending);
            self.metrics.replication_lag(at.duration_since(since).unwrap_or(Duration::ZERO));
        }
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
        let known = slots.by_path.get(&path).and_then(|vs| vs.iter().find(|(v, _)| *v == version));
        match known {
            Some((_, slot)) if still_good(slot, delay, now) => Arc::clone(slot),
            _ => self.replace(slots, path, version, Arc::new(Slot::default())),
        }
    }

    /// Puts `fresh` in the place of `path` and `version` (carrying over a `PENDING`
    /// sighting), making room if the cache is full.
    fn replace(&self, slots: &mut Slots, path: Hashed, version: Option<Hashed>, fresh: Arc<Slot>) -> Arc<Slot> {
        if let Some((_, slot)) = slots.by_path.get_mut(&path).and_then(|vs| vs.iter_mut().find(|(v, _)| *v == version))
        {
            let next = Arc::new(Slot::after(slot));
            *slot = Arc::clone(&next);
            return next;
        }
        if slots.len >= self.capacity {
            // Any other path will do: the cost of a wrong guess is one extra probe.
            if let Some(victim) = slots.by_path.keys().copied().find(|k| *k != path) {
                slots.drop_path(victim);
            }
        }
        slots.by_path.entry(path).or_default().push((version, Arc::clone(&fresh)));
        slots.len += 1;
        fresh
    }
}

/// Whether a slot may answer now: in flight, old or `COMPLETED` for good, young and not
/// yet due, or a recent miss, failure or unfinished replication. A refusal never is.
fn still_good(slot: &Slot, delay: Duration, now: SystemTime) -> bool {
    let Some((learned, checked)) = slot.result.get() else { return true };
    let recent = now.duration_since(*checked).is_ok_and(|d| d < RECHECK);
    match learned {
        Learned::Found { status: Some(ReplicationStatus::Completed), .. } => true,
        Learned::Found { status: Some(_), .. } => recent,
        Learned::Found { modified: Some(t), .. } => {
            let old_when_checked = checked.duration_since(*t).is_ok_and(|a| a >= delay);
            // No deadline that far out (delay near the clock's limit): never due.
            old_when_checked || t.checked_add(delay).is_none_or(|due| now < due)
        }
        Learned::Found { modified: None, .. } | Learned::Missing | Learned::Failed => recent,
        Learned::Denied => false,
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

    fn age_of(l: Learned) -> Option<Duration> {
        match l.at(SystemTime::now()) {
            Probed::Found { age, .. } => age,
            _ => None,
        }
    }

    fn found(modified: SystemTime) -> Learned {
        Learned::Found { modified: Some(modified), status: None }
    }

    fn ago(secs: u64) -> SystemTime {
        SystemTime::now() - Duration::from_secs(secs)
    }

    #[tokio::test]
    async fn old_objects_are_probed_once() {
        let cache = FactsCache::new(10, Arc::default());
        let probes = AtomicUsize::new(0);
        for _ in 0..3 {
            let age = cache
                .shared(key("/b/old"), DELAY, || async {
                    probes.fetch_add(1, Ordering::SeqCst);
                    found(ago(3600))
                })
                .await;
            assert!(age_of(age).is_some_and(|a| a >= Duration::from_secs(3599)));
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn young_objects_are_rechecked_once_they_could_have_aged() {
        let cache = FactsCache::new(10, Arc::default());
        let probes = AtomicUsize::new(0);
        let short = Duration::from_millis(400);
        let probe = || async {
            probes.fetch_add(1, Ordering::SeqCst);
            found(SystemTime::now())
        };
        let first = cache.shared(key("/b/young"), short, probe).await;
        assert!(age_of(first).is_some_and(|a| a < short));
        cache.shared(key("/b/young"), short, probe).await;
        assert_eq!(probes.load(Ordering::SeqCst), 1, "not due yet");
        tokio::time::sleep(Duration::from_millis(500)).await;
        cache.shared(key("/b/young"), short, probe).await;
        assert_eq!(probes.load(Ordering::SeqCst), 2, "due: probed again");
    }

    #[tokio::test]
    async fn misses_and_failures_are_remembered_briefly() {
        let cache = FactsCache::new(10, Arc::default());
        assert_eq!(cache.shared(key("/b/x"), DELAY, || async { Learned::Missing }).await, Learned::Missing);
        // Within the negative TTL the cached miss answers; the probe below is not run.
        assert_eq!(cache.shared(key("/b/x"), DELAY, || async { Learned::Failed }).await, Learned::Missing);
        assert_eq!(cache.shared(key("/b/y"), DELAY, || async { Learned::Failed }).await, Learned::Failed);
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test]
    async fn a_huge_delay_does_not_overflow() {
        let cache = FactsCache::new(10, Arc::default());
        let huge = Duration::from_secs(u64::MAX / 2);
        let probes = AtomicUsize::new(0);
        let probe = || async {
            probes.fetch_add(1, Ordering::SeqCst);
            found(ago(60))
        };
        for _ in 0..2 {
            let age = cache.shared(key("/b/z"), huge, probe).await;
            assert!(age_of(age).is_some_and(|a| (59..120).contains(&a.as_secs())), "{age:?}");
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1, "a deadline past the clock's end is never due");
    }

    #[tokio::test]
    async fn versions_are_separate_objects() {
        let cache = FactsCache::new(10, Arc::default());
        let old = |secs| move || async move { found(ago(secs)) };
        let current = ObjectKey::new("/b/v.mov", None);
        let v1 = ObjectKey::new("/b/v.mov", Some("versionId=1"));
        let v2 = ObjectKey::new("/b/v.mov", Some("x=y&versionId=2"));
        assert_eq!(v2.version, Some("2"));
        assert!(age_of(cache.shared(current, DELAY, old(100)).await).is_some_and(|a| (99..101).contains(&a.as_secs())));
        assert!(age_of(cache.shared(v1, DELAY, old(7200)).await).is_some_and(|a| a.as_secs() >= 7199));
        assert!(age_of(cache.shared(v2, DELAY, old(3600)).await).is_some_and(|a| a.as_secs() >= 3599));
        assert_eq!(cache.len(), 3);
        // Cached: these probes are not run.
        assert!(age_of(cache.shared(v1, DELAY, old(1)).await).is_some_and(|a| a.as_secs() >= 7199));
        assert!(age_of(cache.shared(current, DELAY, old(1)).await).is_some_and(|a| a.as_secs() >= 99));
    }

    #[tokio::test]
    async fn nothing_learned_during_a_write_is_kept() {
        let cache = Arc::new(FactsCache::new(10, Arc::default()));
        let probes = AtomicUsize::new(0);
        let old = || async {
            probes.fetch_add(1, Ordering::SeqCst);
            found(ago(3600))
        };
        cache.shared(key("/b/w.mov"), DELAY, old).await;
        let writing = cache.begin_write(Written::Key("/b/w.mov".into()));
        // Probes while the write runs (e.g. before a multipart completion commits) are not kept.
        cache.shared(key("/b/w.mov"), DELAY, old).await;
        cache.shared(key("/b/w.mov"), DELAY, old).await;
        assert_eq!(probes.load(Ordering::SeqCst), 3);
        cache.shared(key("/b/other.mov"), DELAY, old).await;
        cache.shared(key("/b/other.mov"), DELAY, old).await;
        assert_eq!(probes.load(Ordering::SeqCst), 4, "other keys are cached as usual");
        drop(writing);
        let fresh = cache.shared(key("/b/w.mov"), DELAY, || async { Learned::Missing }).await;
        assert_eq!(fresh, Learned::Missing, "asked again once the write has ended");
        let any = cache.begin_write(Written::Any);
        assert!(cache.is_empty(), "a multi-object delete forgets everything");
        drop(any);
    }

    #[tokio::test]
    async fn a_write_forgets_every_version_of_its_path() {
        let cache = FactsCache::new(10, Arc::default());
        let old = || async { found(ago(3600)) };
        cache.shared(ObjectKey::new("/b/w.mov", None), DELAY, old).await;
        cache.shared(ObjectKey::new("/b/w.mov", Some("versionId=1")), DELAY, old).await;
        cache.shared(ObjectKey::new("/b/other.mov", None), DELAY, old).await;
        let cache = Arc::new(cache);
        drop(cache.begin_write(Written::Key("/b/w.mov".into())));
        assert_eq!(cache.len(), 1);
        let fresh = cache.shared(ObjectKey::new("/b/w.mov", None), DELAY, || async { Learned::Missing }).await;
        assert_eq!(fresh, Learned::Missing, "probed again after the write");
        let other = cache.shared(ObjectKey::new("/b/other.mov", None), DELAY, || async { Learned::Missing }).await;
        assert!(matches!(other, Learned::Found { .. }), "other keys are kept");
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_probe() {
        let cache = Arc::new(FactsCache::new(10, Arc::default()));
        let probes = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, probes, gate) = (cache.clone(), probes.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .shared(key("/b/shared"), DELAY, || async move {
                        probes.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Learned::Failed
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
            assert_eq!(t.await.unwrap(), Learned::Failed);
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_cache_stays_bounded() {
        let cache = FactsCache::new(4, Arc::default());
        for i in 0..20 {
            cache.shared(key(&format!("/b/{i}")), DELAY, || async { found(ago(3600)) }).await;
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
