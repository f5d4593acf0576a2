//! The lean download path's HTTP/1.1 parsing: a typical S3 GET request head, a typical S3
//! 200 response head, and a 1 MiB chunked body decoded in 16 KiB reads.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mediaroute::h1::{chunked, request, response};

const REQUEST: &[u8] = b"GET /media-primary/studio/2024/reel-0042/master.mov?versionId=3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY HTTP/1.1\r\n\
Host: s3.eu-west-1.amazonaws.com\r\n\
User-Agent: aws-sdk-rust/1.3.0 os/linux lang/rust/1.95.0\r\n\
Accept: */*\r\n\
Range: bytes=0-16777215\r\n\
x-amz-date: 20250101T120000Z\r\n\
x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n\
x-amz-security-token: IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQDexample\r\n\
Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20250101/eu-west-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature=fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024\r\n\
\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
x-amz-id-2: ef8yU9AS1ed4OpIszj7UDNEHGran\r\n\
x-amz-request-id: 318BC8BC143432E5\r\n\
Date: Wed, 01 Jan 2025 12:00:00 GMT\r\n\
Last-Modified: Tue, 31 Dec 2024 09:30:00 GMT\r\n\
ETag: \"fba9dede5f27731c9771645a39863328\"\r\n\
x-amz-replication-status: COMPLETED\r\n\
x-amz-version-id: 3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY\r\n\
Accept-Ranges: bytes\r\n\
Content-Type: video/quicktime\r\n\
Content-Length: 268435456\r\n\
Server: AmazonS3\r\n\
\r\n";

fn bench_heads(c: &mut Criterion) {
    let limits = request::Limits { max_head: 16 * 1024, max_headers: 100 };
    let mut g = c.benchmark_group("h1_head");
    g.throughput(Throughput::Bytes(REQUEST.len() as u64));
    g.bench_function("request_s3_get", |b| {
        b.iter(|| match request::parse(black_box(REQUEST), &limits) {
            request::Parsed::Lean(l) => l.head_len,
            _ => unreachable!("the bench request is lean"),
        })
    });
    g.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    g.bench_function("response_s3_200", |b| {
        b.iter(|| match response::parse(black_box(RESPONSE), false, 100, 16 * 1024) {
            Ok(response::ParsedResponse::Final(h)) => h.head_len,
            _ => unreachable!("the bench response is final"),
        })
    });
    g.finish();
}

/// 1 MiB in chunks of 8000 bytes (so chunk framing falls inside and across reads).
fn chunked_body() -> Vec<u8> {
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut out = Vec::with_capacity(data.len() + 4096);
    for piece in data.chunks(8000) {
        chunked::write_size_line(piece.len(), &mut out);
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(chunked::LAST_CHUNK);
    out
}

fn bench_chunked(c: &mut Criterion) {
    let body = chunked_body();
    let mut g = c.benchmark_group("h1_chunked");
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("decode_1mib_16k_reads", |b| {
        b.iter(|| {
            let mut d = chunked::Decoder::new();
            let mut total = 0usize;
            for read in black_box(&body).chunks(16 * 1024) {
                let mut rest = read;
                while !rest.is_empty() {
                    let fed = d.feed(rest).unwrap_or_else(|e| unreachable!("valid body: {e}"));
                    total += fed.data.len();
                    rest = &rest[fed.consumed..];
                    if fed.consumed == 0 {
                        break;
                    }
                }
            }
            assert!(d.is_done() && total == 1 << 20);
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench_heads, bench_chunked);
criterion_main!(benches);
