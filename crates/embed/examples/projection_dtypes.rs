//! What int8 (Q8_0, candle's VNNI kernels) and bf16 weights would gain over f32 at the
//! embedders' projection shapes (MiniLM and bge-small: hidden 384, intermediate 1536; bge-base:
//! 768 and 3072; 8,192 rows = 64 passages of 128 tokens), on candle's CPU kernels, with each
//! one's error against f32. On the AVX-512 VNNI/BF16 machines thinkrag is developed on both
//! were slower than f32 at every shape, so the embedders run in f32 (README, "Retrieval").
//!
//!     cargo run --release -p thinkrag-embed --example projection_dtypes
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (8192, 384, 1152),
        (8192, 384, 1536),
        (8192, 1536, 384),
        (8192, 768, 2304),
        (8192, 768, 3072),
        (8192, 3072, 768),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let wt = w.t()?.contiguous()?;
        let _ = x.matmul(&wt)?;
        let t = Instant::now();
        for _ in 0..3 {
            let _ = x.matmul(&wt)?;
        }
        let f = t.elapsed().as_secs_f64() / 3.0;
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        let _ = q.forward(&x)?;
        let t = Instant::now();
        for _ in 0..3 {
            let _ = q.forward(&x)?;
        }
        let qs = t.elapsed().as_secs_f64() / 3.0;
        let (xb, wb) = (
            x.to_dtype(candle_core::DType::BF16)?,
            wt.to_dtype(candle_core::DType::BF16)?,
        );
        let _ = xb.matmul(&wb)?;
        let t = Instant::now();
        let _ = xb.matmul(&wb)?;
        let bs = t.elapsed().as_secs_f64();
        let c = xb.matmul(&wb)?.to_dtype(candle_core::DType::F32)?;
        let a = x.matmul(&wt)?;
        let berr = ((a.clone() - c)?.sqr()?.mean_all()?.to_scalar::<f32>()?
            / a.sqr()?.mean_all()?.to_scalar::<f32>()?)
        .sqrt();
        println!(
            "   bf16 {:.1} ms ({:.2}x), rel err {berr:.4}",
            bs * 1e3,
            f / bs
        );
        let a = x.matmul(&wt)?;
        let b = q.forward(&x)?;
        let err = ((a.clone() - b)?.sqr()?.mean_all()?.to_scalar::<f32>()?
            / a.sqr()?.mean_all()?.to_scalar::<f32>()?)
        .sqrt();
        println!("m{m} k{k} n{n}: f32 {:.1} ms ({:.0} GFLOP/s), q8_0 {:.1} ms ({:.2}x), rel err {err:.4}", f*1e3, 2.0*(m*k*n) as f64/f/1e9, qs*1e3, f/qs);
    }
    Ok(())
}
