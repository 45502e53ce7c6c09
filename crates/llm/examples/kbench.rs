use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Module, Tensor};
use std::sync::Arc;
use std::time::Instant;
use thinkrag_llm::model::{Linear, Weight};
fn main() {
    thinkrag_llm::device::set_cpu_threads(2).unwrap();
    let dev = Device::Cpu;
    for (name, n, k) in [
        ("up", 8960usize, 1536usize),
        ("down", 1536, 8960),
        ("head", 151936, 1536),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let bytes = q.storage_size_in_bytes();
            let l = Linear::new(Weight::Quantized(Arc::new(q)), None);
            let mut t1 = 0.0;
            for rows in [1usize, 2, 4, 8] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
                for _ in 0..3 {
                    l.forward(&x).unwrap();
                }
                let iters = if n > 100000 { 10 } else { 60 };
                let t = Instant::now();
                for _ in 0..iters {
                    l.forward(&x).unwrap();
                }
                let s = t.elapsed().as_secs_f64() / iters as f64;
                if rows == 1 {
                    t1 = s;
                }
                println!("{name} {dt:?} rows {rows}: {:.3} ms  {:.1} GB/s(file)  x{:.2} of 1 row per row-throughput", s*1e3, bytes as f64/s/1e9, rows as f64 * t1 / s);
            }
        }
    }
}
