//! One GET over loopback: straight to the upstream vs through mediaroute.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mediaroute::config;
use mediaroute::demo::store::{self, Store};
use mediaroute::server;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

async fn fetch(client: &HttpClient, url: &str) -> usize {
    let req = http::Request::get(url).header("x-forwarded-user", "alice").body(Empty::new()).unwrap();
    let resp = client.request(req).await.unwrap();
    assert!(resp.status().is_success());
    resp.into_body().collect().await.unwrap().to_bytes().len()
}

fn bench_proxy(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (proxy_addr, replica_addr, _keep) = rt.block_on(async {
        let primary = store::serve("127.0.0.1:0".parse().unwrap(), Store::new("primary")).await.unwrap();
        let replica = store::serve("127.0.0.1:0".parse().unwrap(), Store::new("replica")).await.unwrap();
        let old = SystemTime::now() - Duration::from_secs(86_400);
        for (key, len) in [("4k", 4096), ("1m", 1 << 20)] {
            primary.store.put(&format!("/media/{key}"), vec![1u8; len], old);
            replica.store.put(&format!("/media/{key}"), vec![2u8; len], old);
        }
        let text = format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n[identity]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
             [primary]\nurl = \"http://{}\"\n[replica]\nurl = \"http://{}\"\n\
             [replication]\ndelay = \"15m\"\n[users]\nalice = \"yes\"\n",
            primary.addr, replica.addr
        );
        let cfg = config::parse(Path::new("bench.toml"), &text, &|_| Ok(String::new())).unwrap();
        let proxy = server::start(cfg).await.unwrap();
        (proxy.addr, replica.addr, (primary, replica, proxy))
    });
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for (key, len) in [("4k", 4096u64), ("1m", 1 << 20)] {
        let mut g = c.benchmark_group(format!("get_{key}"));
        g.throughput(Throughput::Bytes(len));
        let direct = format!("http://{replica_addr}/media/{key}");
        let proxied = format!("http://{proxy_addr}/media/{key}");
        g.bench_function("direct", |b| b.to_async(&rt).iter(|| fetch(black_box(&client), &direct)));
        g.bench_function("proxied", |b| b.to_async(&rt).iter(|| fetch(black_box(&client), &proxied)));
        g.finish();
    }
}

criterion_group!(benches, bench_proxy);
criterion_main!(benches);
