//! The pure routing decision, table building and client-context extraction at scale.

mod fixtures;

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use mediaroute::client;
use mediaroute::route::{ClientContext, Probed, RequestFacts, decide};
use mediaroute::table::RoutingTable;

const GET: RequestFacts = RequestFacts { read: true, object: true, replica_down: false };

fn ctx(user: &str, ip: &str) -> ClientContext {
    ClientContext { ip: ip.parse().unwrap(), user: Some(user.into()) }
}

fn bench_decide(c: &mut Criterion) {
    let cfg = fixtures::big_config(100_000, 10_000);
    let table = RoutingTable::build(&cfg, 1);
    let old = Probed::Found { age: Some(Duration::from_secs(86_400)), status: None };
    let cases = [
        ("yes_user", ctx("user000001", "192.0.2.1")),
        ("auto_v4_hit", ctx("user000002", "10.3.4.77")),
        ("auto_v4_miss", ctx("user000002", "10.3.5.77")),
        ("auto_v6_hit", ctx("user050000", "2001:db8:3::1")),
        ("auto_v6_miss", ctx("user050000", "2001:db9::1")),
        ("unknown_user", ctx("nobody", "10.3.4.77")),
    ];
    let mut g = c.benchmark_group("decide_100k_users_10k_ranges");
    for (name, cx) in &cases {
        g.bench_function(*name, |b| b.iter(|| decide(black_box(&table), black_box(cx), black_box(&GET), old)));
    }
    g.finish();
}

fn bench_build(c: &mut Criterion) {
    let cfg = fixtures::big_config(100_000, 10_000);
    let mut g = c.benchmark_group("table");
    g.sample_size(20);
    g.bench_function("build_100k_users_10k_ranges", |b| b.iter(|| RoutingTable::build(black_box(&cfg), 1)));
    g.finish();
}

fn bench_client_context(c: &mut Criterion) {
    let cfg = fixtures::big_config(1_000, 10);
    let table = RoutingTable::build(&cfg, 1);
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", "198.51.100.1, 10.20.0.5, 127.0.0.2".parse().unwrap());
    headers.insert("x-forwarded-user", "user000001".parse().unwrap());
    let peer: IpAddr = "127.0.0.1".parse().unwrap();
    c.bench_function("client_context_xff_walk", |b| {
        b.iter(|| client::context(black_box(&table), peer, black_box(&headers), None))
    });
}

criterion_group!(benches, bench_decide, bench_build, bench_client_context);
criterion_main!(benches);
