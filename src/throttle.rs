//! Warnings an attacker could repeat at will (refusals at a limit, accept errors) are
//! written at most once per interval, with the count of those held back.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// A gate that opens at most once per interval.
#[derive(Debug)]
pub struct Every {
    interval_ms: u64,
    next_ms: AtomicU64,
    held: AtomicU64,
}

impl Every {
    /// A gate that opens at most once per `interval`.
    pub const fn new(interval: Duration) -> Every {
        Every { interval_ms: interval.as_millis() as u64, next_ms: AtomicU64::new(0), held: AtomicU64::new(0) }
    }

    /// `Some(n)` when the line may be written now, `n` being how many were held back since
    /// the last one; `None` when it must be held back.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now.saturating_add(self.interval_ms), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_once_per_interval_and_counts_the_rest() {
        let gate = Every::new(Duration::from_millis(100));
        assert_eq!(gate.allow(), Some(0));
        assert_eq!(gate.allow(), None);
        assert_eq!(gate.allow(), None);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(gate.allow(), Some(2));
    }
}
