//! Criterion benchmark of a decode step's residual add and RMSNorm (twice a layer, serial work
//! while the memory sits idle): thinkrag's fused `add_forward` against its peer, candle's add
//! followed by candle-nn's norm, on one row (a decode step) and 512 (a prefill chunk) of the
//! 1.5B's width (1,536) and the 8B's (4,096).
//!   cargo bench -p thinkrag-llm --bench rms_norm
//! Optional: THINKRAG_BENCH_THREADS (2).

mod support;

use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use thinkrag_llm::model::rms_norm::RmsNorm;

fn rms_norm(c: &mut Criterion) {
    support::set_threads_from_env();
    let dev = Device::Cpu;
    let mut g = support::group(c, "add_rms_norm", 3);
    for width in [1536usize, 4096] {
        let w = Tensor::randn(1f32, 0.1, width, &dev).expect("weight");
        let ours = RmsNorm::new(w.clone(), 1e-6);
        let candle = candle_nn::RmsNorm::new(w, 1e-6);
        for rows in [1usize, 512] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, width), &dev).expect("x");
            let h = Tensor::randn(0f32, 1.0, (1, rows, width), &dev).expect("h");
            let id = format!("{rows}x{width}");
            g.bench_with_input(BenchmarkId::new("thinkrag", &id), &(), |b, _| {
                b.iter(|| ours.add_forward(&x, &h).expect("norm"))
            });
            g.bench_with_input(BenchmarkId::new("candle", &id), &(), |b, _| {
                b.iter(|| {
                    let sum = (&x + &h).expect("add");
                    let normed = candle.forward(&sum).expect("norm");
                    (sum, normed)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, rms_norm);
criterion_main!(benches);
