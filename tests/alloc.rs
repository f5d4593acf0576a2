//! `decide()` makes no heap allocation (a counting global allocator proves it).

#[path = "../benches/fixtures.rs"]
mod fixtures;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mediaroute::route::{ClientContext, Probed, RequestFacts, decide};
use mediaroute::table::RoutingTable;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decide_does_not_allocate() {
    let cfg = fixtures::big_config(100_000, 10_000);
    let table = RoutingTable::build(&cfg, 1);
    let contexts: Vec<ClientContext> = [
        ("user000001", "192.0.2.1"),
        ("user000002", "10.3.4.77"),
        ("user000002", "2001:db8:3::1"),
        ("nobody", "10.0.0.1"),
    ]
    .iter()
    .map(|(u, ip)| ClientContext { ip: ip.parse().unwrap(), user: Some((*u).into()) })
    .collect();
    let facts = RequestFacts { read: true, object: true, replica_down: false };
    let mut replicas = 0;
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..1000 {
        for c in &contexts {
            let old = Probed::Found { age: Some(Duration::from_secs(86_400)), status: None };
            let young = Probed::Found { age: Some(Duration::ZERO), status: None };
            for age in [old, young, Probed::Failed] {
                replicas += usize::from(decide(&table, c, &facts, age).0 == mediaroute::table::Upstream::Replica);
            }
        }
    }
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    assert_eq!(after - before, 0, "decide() allocated");
    assert_eq!(replicas, 3000, "the yes user and both auto users inside the networks reach the replica when old");
}
