//! Criterion benchmark of the decode step's attention at the 1.5B model's shape (2 KV heads of
//! 128, 6 query heads each, 28 layers): one token's attention over every layer's cache at 100
//! and 4,000 positions, with a bf16, a Q8_0, an f16 and an f32 cache. The caches are the model's
//! own ([`KvCache`], one buffer for all layers); throughput is in bytes of cache read, comparable
//! with the machine's memory bandwidth (`thinkrag bench` probes it). At 4,000 positions one cache
//! (115 MB in f16) is far larger than L2 but can fit a large L3 (300 MB on the Xeons these
//! benches ran on), where it stays from one iteration to the next; `f16 x4` runs over four
//! caches in turn (460 MB), so each comes from memory, as a decode step finds its cache behind a
//! gigabyte of weights.
//!   cargo bench -p thinkrag-llm --bench attention
//! Optional: THINKRAG_BENCH_THREADS (2).

mod support;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use thinkrag_llm::model::decode_attention::decode_attention;
use thinkrag_llm::model::{KvCache, KvFormat};

const LAYERS: usize = 28;
const KV_HEADS: usize = 2;
const GROUP: usize = 6;
const HEAD_DIM: usize = 128;

fn attention(c: &mut Criterion) {
    support::set_threads_from_env();
    let dev = Device::Cpu;
    let mut g = support::group(c, "decode_attention", 6);
    let q = Tensor::randn(0f32, 1.0, (1, KV_HEADS, GROUP, HEAD_DIM), &dev).expect("query");
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    for (format, copies) in [
        (KvFormat::Bf16, 1),
        (KvFormat::Q8_0, 1),
        (KvFormat::F16, 1),
        (KvFormat::F16, 4),
        (KvFormat::F32, 1),
    ] {
        for len in [100usize, 4000] {
            let caches: Vec<KvCache> = (0..copies)
                .map(|_| {
                    let mut cache = KvCache::new(LAYERS, KV_HEADS, HEAD_DIM, 4096, format, &dev);
                    cache.fill_for_benchmark(len).expect("cache");
                    cache
                })
                .collect();
            let views: Vec<(Tensor, Tensor)> = caches
                .iter()
                .flat_map(|c| (0..LAYERS).map(|l| c.layer(l).expect("a filled layer")))
                .collect();
            let bytes = copies * LAYERS * 2 * KV_HEADS * len * format.row_bytes(HEAD_DIM);
            g.throughput(Throughput::Bytes(bytes as u64));
            let name = match copies {
                1 => format.to_string(),
                n => format!("{format} x{n}"),
            };
            let id = BenchmarkId::new(name, len);
            g.bench_with_input(id, &views, |b, views| {
                b.iter(|| {
                    for (k, v) in views {
                        decode_attention(&q, k, v, scale)
                            .expect("attention")
                            .expect("the CPU kernel takes these");
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
