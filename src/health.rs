//! Upstream health: consecutive failures mark an upstream down, consecutive successes
//! bring it back (README "Health"). Fed by active checks, real requests and responses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::metrics::Metrics;
use crate::table::Upstream;

/// Health of one upstream: `fall` consecutive failures mark it down, `rise` successes up.
#[derive(Debug)]
pub struct Health {
    upstream: Upstream,
    rise: u32,
    fall: u32,
    successes: AtomicU32,
    failures: AtomicU32,
    down: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Health {
    /// A healthy upstream with the given thresholds.
    pub fn new(upstream: Upstream, rise: u32, fall: u32, metrics: Arc<Metrics>) -> Health {
        Health {
            upstream,
            rise: rise.max(1),
            fall: fall.max(1),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            down: AtomicBool::new(false),
            metrics,
        }
    }

    /// Whether the upstream is currently marked down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Forgets everything known: the upstream moved to a new address.
    pub fn reset(&self) {
        self.successes.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.down.store(false, Ordering::Relaxed);
        self.metrics.set_up(self.upstream, true);
    }

    /// Records a good answer to a real request: it breaks a run of failures, but only
    /// checks bring a down upstream back (README "Health").
    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Records a passed active check; returns true when this one brought the upstream back.
    pub fn check_passed(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        let n = self.successes.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n >= self.rise && self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(upstream = self.upstream.as_str(), "upstream is up again");
            self.metrics.set_up(self.upstream, true);
            return true;
        }
        false
    }

    /// Records a failure; returns true when this one marked the upstream down.
    pub fn failure(&self, why: &str) -> bool {
        self.successes.store(0, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n >= self.fall && !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(upstream = self.upstream.as_str(), failures = n, why, "upstream marked down");
            self.metrics.set_up(self.upstream, false);
            return true;
        }
        false
    }
}

/// The health of both upstreams.
#[derive(Debug)]
pub struct HealthBoard {
    primary: Health,
    replica: Health,
}

impl HealthBoard {
    /// Both upstreams healthy, with the given thresholds.
    pub fn new(rise: u32, fall: u32, metrics: &Arc<Metrics>) -> HealthBoard {
        HealthBoard {
            primary: Health::new(Upstream::Primary, rise, fall, Arc::clone(metrics)),
            replica: Health::new(Upstream::Replica, rise, fall, Arc::clone(metrics)),
        }
    }

    /// The health of one upstream.
    pub fn of(&self, which: Upstream) -> &Health {
        match which {
            Upstream::Primary => &self.primary,
            Upstream::Replica => &self.replica,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_falls_and_rises() {
        let m = Arc::new(Metrics::new());
        let h = Health::new(Upstream::Replica, 2, 3, Arc::clone(&m));
        assert!(!h.failure("x"));
        assert!(!h.failure("x"));
        assert!(!h.is_down());
        assert!(h.failure("x"), "the third failure marks it down");
        assert!(h.is_down());
        assert!(m.render().contains("mediaroute_upstream_up{upstream=\"replica\"} 0"));
        assert!(!h.failure("x"), "only the crossing reports");
        h.success();
        h.success();
        assert!(h.is_down(), "answers to real requests never bring it back");
        assert!(!h.check_passed(), "one check is not enough to rise");
        assert!(h.is_down());
        assert!(h.check_passed());
        assert!(!h.is_down());
        assert!(m.render().contains("mediaroute_upstream_up{upstream=\"replica\"} 1"));
        // A success in between resets the failure count.
        assert!(!h.failure("x"));
        assert!(!h.failure("x"));
        h.success();
        assert!(!h.failure("x"));
        assert!(!h.is_down());
    }
}
