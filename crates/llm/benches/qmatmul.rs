//! Criterion benchmarks of the projection layer at the 1.5B model's shapes: decode (1 row) and
//! prefill (512 rows) through the MLP's up (1536 -> 8960) and down (8960 -> 1536) projections, for
//! f32, Q8_0 and Q4_K weights. Prefill rows are where a quantized matmul without a batched path
//! falls to decode speed per row.
//!   cargo bench -p thinkrag-llm --bench qmatmul
//! Optional: THINKRAG_BENCH_THREADS (2).

mod support;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use thinkrag_llm::model::{Linear, Weight};

fn qmatmul(c: &mut Criterion) {
    support::set_threads_from_env();
    let dev = Device::Cpu;
    let mut g = support::group(c, "qmatmul", 8);
    for (name, n, k) in [
        ("up_1536x8960", 8960usize, 1536usize),
        ("down_8960x1536", 1536, 8960),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).expect("weights");
        let layers: Vec<(&str, Linear)> = vec![
            ("f32", Linear::dense(w.clone(), None)),
            ("q8_0", quantized(&w, GgmlDType::Q8_0)),
            ("q4k", quantized(&w, GgmlDType::Q4K)),
        ];
        for rows in [1usize, 512] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).expect("input");
            g.throughput(Throughput::Elements(rows as u64));
            for (format, layer) in &layers {
                g.bench_with_input(
                    BenchmarkId::new(format!("{name}/{format}"), rows),
                    &x,
                    |b, x| b.iter(|| layer.forward(x).expect("forward")),
                );
            }
        }
    }
    g.finish();
}

fn quantized(w: &Tensor, dtype: GgmlDType) -> Linear {
    let q = QTensor::quantize(w, dtype).expect("quantize");
    Linear::new(Weight::Quantized(Arc::new(q)), None)
}

criterion_group!(benches, qmatmul);
criterion_main!(benches);
