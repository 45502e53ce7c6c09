//! The projection layer of the model: candle's `Linear`, plus a CPU fast path for a single row.
//!
//! Decoding multiplies one activation row by every weight matrix, so its speed is the memory
//! bandwidth at which the weights stream through. candle's CPU matmul (the `gemm` crate) reaches
//! about 10 GB/s for a (1 x 1536) x (1536 x 8960) f32 product on the 2-core reference machine, well
//! short of what the memory delivers; a row-parallel dot-product kernel over the (out, in) weight
//! rows, which are contiguous, streams each weight once at close to full bandwidth. Everything else
//! (prefill, other dtypes, GPUs) goes through candle.

use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use rayon::prelude::*;

/// A linear layer `y = x W^T + b` with weights `(out, in)` as published.
#[derive(Debug, Clone)]
pub struct Dense {
    inner: candle_nn::Linear,
}

impl Dense {
    /// Wraps a weight `(out, in)` and an optional bias `(out,)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    /// The weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = single_row_f32(x, self.inner.weight(), self.inner.bias())? {
            return Ok(y);
        }
        self.inner.forward(x)
    }
}

/// `x W^T + b` for an `x` of one row on the CPU in f32; `None` when the fast path does not apply.
fn single_row_f32(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        return Ok(None);
    };
    if lead.iter().product::<usize>() != 1 || !w.is_contiguous() {
        return Ok(None);
    }
    let (out_dim, in_dim) = w.dims2()?;
    if in_dim != k {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(wv))) = (&*xs, &*ws)
    else {
        return Ok(None);
    };
    let xv = &xv[xl.start_offset()..xl.start_offset() + k];
    let wv = &wv[wl.start_offset()..wl.start_offset() + out_dim * k];
    let mut y = vec![0f32; out_dim];
    matvec(wv, xv, &mut y);
    drop((xs, ws));
    let mut out_shape = lead.to_vec();
    out_shape.push(out_dim);
    let y = Tensor::from_vec(y, out_shape, x.device())?;
    Ok(Some(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    }))
}

/// `y[r] = w[r, :] . x` for all rows, the rows split across rayon's threads.
pub fn matvec(w: &[f32], x: &[f32], y: &mut [f32]) {
    let k = x.len();
    // Enough blocks to balance the threads, each big enough to amortise scheduling (>= 64 KiB).
    let threads = rayon::current_num_threads().max(1);
    let rows_per_block = (y.len() / (threads * 8)).clamp(16, 1024);
    let dot = dot_fn();
    y.par_chunks_mut(rows_per_block)
        .enumerate()
        .for_each(|(block, out)| {
            let first = block * rows_per_block;
            for (i, yi) in out.iter_mut().enumerate() {
                let row = &w[(first + i) * k..(first + i + 1) * k];
                *yi = dot(row, x);
            }
        });
}

/// Sixteen independent lanes: written so that LLVM vectorises it without reassociating floats.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (a16, a_rest) = a.as_chunks::<16>();
    let (b16, _) = b.as_chunks::<16>();
    for (ca, cb) in a16.iter().zip(b16) {
        for l in 0..16 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail = a.len() - a_rest.len();
    let mut s: f32 = acc.iter().sum();
    for (i, v) in a_rest.iter().enumerate() {
        s += v * b[tail + i];
    }
    s
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_impl(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: only selected by `dot_fn` after the CPU reported AVX2 and FMA.
    unsafe { dot_avx2_impl(a, b) }
}

/// The widest dot product this CPU runs (checked once per call of `matvec`, which is cheap).
fn dot_fn() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return dot_avx2;
        }
    }
    dot_portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_row_path_matches_candle_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 53), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 37, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 1, 53), &dev).unwrap();
        let fast = Dense::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
        let reference = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
        assert_eq!(fast.dims(), reference.dims());
        let d = (fast - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn several_rows_go_through_candle() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 16), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 16), &dev).unwrap();
        assert!(single_row_f32(&x, &w, None).unwrap().is_none());
        let y = Dense::new(w, None).forward(&x).unwrap();
        assert_eq!(y.dims(), &[1, 3, 8]);
    }
}
