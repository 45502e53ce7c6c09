//! RMSNorm with a sum of squares the compiler vectorizes, and a decode step's residual add fused
//! into it. candle-nn's op sums a row's squares one value after another (a chain of dependent
//! adds: 2.7-3 µs for a row of 1,536 on a Zen 3, twice a layer, while the other thread waits),
//! and the residual add before it is one more op and allocation.
//!
//! Written here because candle-nn's order of summation is fixed inside its op. Each row is summed
//! the same way whatever rows come with it, so a sequence's logits stay bit-identical whether it
//! is decoded alone or in a batch.

use candle_core::{DType, Module, Tensor};

use crate::model::linear::{with_cpu_f32, OutPtr};

/// Independent partial sums of a row's squares: one AVX2 register's worth, and short chains of
/// dependent adds on narrower vectors.
const LANES: usize = 8;
/// Rows above which a prefill's norms are spread over the threads (as candle-nn spreads them).
const SERIAL_ROWS: usize = 32;

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// The weight as loaded.
    weight: Tensor,
    /// Its values, where it is f32 on the CPU and the fast path applies.
    values: Option<Vec<f32>>,
    eps: f64,
}

impl RmsNorm {
    /// A norm with `weight` (`(hidden,)`) and `eps`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        let fast = weight.device().is_cpu() && weight.dtype() == DType::F32;
        let values = fast.then(|| weight.to_vec1::<f32>().ok()).flatten();
        Self {
            weight,
            values,
            eps,
        }
    }

    /// The weight, as loaded.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `(x + h, norm(x + h))`: a residual connection and the norm after it, in one pass and two
    /// allocations. The sum is the same IEEE sum candle's add gives.
    pub fn add_forward(&self, x: &Tensor, h: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let fast = self
            .fast_weight(x)
            .filter(|w| fits(h, w) && x.dims() == h.dims());
        let Some(w) = fast else {
            let sum = (x + h)?;
            let normed = self.forward(&sum)?;
            return Ok((sum, normed));
        };
        let sum = with_f32(x, |xs| {
            with_f32(h, |hs| {
                xs.iter().zip(hs).map(|(a, b)| a + b).collect::<Vec<f32>>()
            })
        })??;
        let normed = self.norm_rows(w, &sum);
        Ok((
            Tensor::from_vec(sum, x.dims(), x.device())?,
            Tensor::from_vec(normed, x.dims(), x.device())?,
        ))
    }

    /// The weight's values, where `x` takes the fast path.
    fn fast_weight(&self, x: &Tensor) -> Option<&[f32]> {
        self.values.as_deref().filter(|w| fits(x, w))
    }

    /// The norm of each row of `values` (rows of `w`'s length).
    fn norm_rows(&self, w: &[f32], values: &[f32]) -> Vec<f32> {
        let n = w.len();
        let rows = values.len() / n;
        let mut out = vec![0f32; values.len()];
        if rows <= SERIAL_ROWS {
            for (src, dst) in values.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
                norm_row(src, w, self.eps as f32, dst);
            }
        } else {
            let dst = OutPtr(out.as_mut_ptr());
            candle_core::utils::barrier_pool().execute_chunked(rows, |span| {
                for r in span {
                    // SAFETY: each row is handed to one thread, so row `r` of `out` is written by
                    // this one only, and `out` outlives the call.
                    let row = unsafe { dst.slice(r * n, n) };
                    norm_row(&values[r * n..(r + 1) * n], w, self.eps as f32, row);
                }
            });
        }
        out
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.fast_weight(x) {
            Some(w) => {
                let normed = with_f32(x, |xs| self.norm_rows(w, xs))?;
                Tensor::from_vec(normed, x.dims(), x.device())
            }
            // Other devices and dtypes: candle-nn's norm (a handle on the same weight).
            None => candle_nn::RmsNorm::new(self.weight.clone(), self.eps).forward(x),
        }
    }
}

/// Whether `t` takes the fast path with weight values `w`: f32 on the CPU, rows of `w`'s length.
fn fits(t: &Tensor, w: &[f32]) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.dims().last() == Some(&w.len())
}

/// `f` of a CPU f32 tensor's values in order.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_cpu_f32(&t.contiguous()?, f)
        .ok_or_else(|| candle_core::Error::Msg("rms_norm: expected f32 values on the CPU".into()))
}

/// One row: `src / sqrt(sum(src^2) / n + eps) * w` into `dst`. candle-nn sums the squares in
/// order and divides each value; this sums in [`LANES`] lanes and multiplies by the reciprocal,
/// which differs from it in the last bits.
fn norm_row(src: &[f32], w: &[f32], eps: f32, dst: &mut [f32]) {
    let mut lanes = [0f32; LANES];
    let mut chunks = src.chunks_exact(LANES);
    for c in &mut chunks {
        for (acc, &v) in lanes.iter_mut().zip(c) {
            *acc += v * v;
        }
    }
    let mut sum2 = lanes.iter().sum::<f32>();
    for &v in chunks.remainder() {
        sum2 += v * v;
    }
    // One division for the row: a division per value was half of a 1,536-wide row's time.
    let inv = 1.0 / (sum2 / src.len() as f32 + eps).sqrt();
    for ((d, &s), &a) in dst.iter_mut().zip(src).zip(w) {
        *d = s * inv * a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        // A fixed pseudo-random sequence, so the test needs no RNG state.
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Agrees with candle-nn's norm to f32 rounding for every row count (one row, a batch, a
    /// prefill spread over the threads) and a width that leaves a remainder after the lanes;
    /// a row's result does not depend on the rows beside it.
    #[test]
    fn matches_candle_and_rows_are_independent() {
        for (rows, n) in [(1, 1536), (3, 1536), (40, 1541), (1, 5)] {
            let w = randn(&[n], 7);
            let x = randn(&[1, rows, n], rows as u64);
            let ours = RmsNorm::new(w.clone(), 1e-6);
            let theirs = candle_nn::RmsNorm::new(w, 1e-6);
            let (a, b) = (ours.forward(&x).unwrap(), theirs.forward(&x).unwrap());
            let diff = (a.clone() - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap();
            let max = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(max < 1e-5, "{rows}x{n}: {max}");
            for r in 0..rows {
                let alone = ours.forward(&x.narrow(1, r, 1).unwrap()).unwrap();
                let row = a.narrow(1, r, 1).unwrap();
                assert_eq!(
                    alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    row.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                );
            }
        }
    }

    /// The fused residual add gives candle's sum to the bit and the norm of that sum.
    #[test]
    fn add_forward_is_the_sum_and_its_norm() {
        let (x, h) = (randn(&[1, 2, 1536], 1), randn(&[1, 2, 1536], 2));
        let norm = RmsNorm::new(randn(&[1536], 3), 1e-6);
        let (sum, normed) = norm.add_forward(&x, &h).unwrap();
        let want = (&x + &h).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&sum), flat(&want));
        assert_eq!(flat(&normed), flat(&norm.forward(&want).unwrap()));
    }

    /// Off the fast path (f16 values) it is candle-nn's norm.
    #[test]
    fn other_dtypes_take_candles_path() {
        let w = randn(&[64], 5).to_dtype(DType::F16).unwrap();
        let x = randn(&[1, 2, 64], 6).to_dtype(DType::F16).unwrap();
        let ours = RmsNorm::new(w.clone(), 1e-6).forward(&x).unwrap();
        let theirs = candle_nn::RmsNorm::new(w, 1e-6).forward(&x).unwrap();
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(flat(&ours), flat(&theirs));
    }
}
