//! Attention of one new token over the KV cache, on the CPU in f32: the decode step's attention.
//!
//! Through candle, each layer's `q k^T` and `p v` for a single query run as general matmuls whose
//! operand packing costs more than the arithmetic; at 4,000 cached positions that made a Q4_K_M
//! decode step 2.5x slower than at 100. Here each KV head's keys and values stream once for all
//! the query heads that share them (grouped-query attention): at 4,000 positions a Q4_K_M decode
//! step now runs at about 0.71x of its speed at 100 (0.40x before), still short of the 0.8x the
//! cache's bytes alone would allow.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::model::linear::OutPtr;

/// Query heads whose dot products with one key are computed together.
const MAX_GROUP: usize = 8;

/// `softmax(q k^T * scale) v` for `q` of shape `(1, kv_heads, group, head_dim)` (the query heads
/// sharing KV head `h` are rows `h*group..`), `k` and `v` of shape `(1, kv_heads, len, head_dim)`
/// (views of the cache: rows contiguous, heads strided). Returns `(1, 1, kv_heads*group*head_dim)`,
/// or `None` when the inputs are not f32 CPU tensors of that layout.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let on_cpu_f32 = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
    if !(on_cpu_f32(q) && on_cpu_f32(k) && on_cpu_f32(v)) {
        return Ok(None);
    }
    let (b, kv_heads, len, hd) = k.dims4()?;
    let (qb, qh, group, qd) = q.dims4()?;
    if b != 1 || qb != 1 || qh != kv_heads || qd != hd || v.dims() != k.dims() || len == 0 {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (
        Storage::Cpu(CpuStorage::F32(qv)),
        Storage::Cpu(CpuStorage::F32(kv)),
        Storage::Cpu(CpuStorage::F32(vv)),
    ) = (&*qs, &*ks, &*vs)
    else {
        return Ok(None);
    };
    let rows_ok = |s: &[usize]| s[3] == 1 && s[2] == hd;
    if !rows_ok(kl.stride()) || !rows_ok(vl.stride()) {
        return Ok(None);
    }
    let (k_head, v_head) = (kl.stride()[1], vl.stride()[1]);
    let (k0, v0, q0) = (kl.start_offset(), vl.start_offset(), ql.start_offset());
    let mut out = vec![0f32; kv_heads * group * hd];
    let out_ptr = OutPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(kv_heads, |heads| {
        let mut scores = vec![0f32; group * len];
        let mut acc = vec![0f32; group * hd];
        for h in heads {
            let keys = &kv[k0 + h * k_head..][..len * hd];
            let values = &vv[v0 + h * v_head..][..len * hd];
            let queries = &qv[q0 + h * group * hd..][..group * hd];
            for (first, qs) in queries.chunks(MAX_GROUP * hd).enumerate() {
                let scores = &mut scores[first * MAX_GROUP * len..];
                // The query count fixed at compile time keeps the accumulators in registers.
                let scores_for: ScoresFn = match qs.len() / hd {
                    1 => scores_of::<1>,
                    2 => scores_of::<2>,
                    3 => scores_of::<3>,
                    4 => scores_of::<4>,
                    5 => scores_of::<5>,
                    6 => scores_of::<6>,
                    7 => scores_of::<7>,
                    _ => scores_of::<8>,
                };
                scores_for(qs, keys, scale, scores, len);
            }
            for row in scores.chunks_exact_mut(len) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|s| *s *= inv);
            }
            acc.fill(0.0);
            // Blocks of value rows small enough for L1, each read once per query head while that
            // head's output row stays in registers.
            const BLOCK: usize = 32;
            for (b, block) in values.chunks(BLOCK * hd).enumerate() {
                for (g, a) in acc.chunks_exact_mut(hd).enumerate() {
                    let probs = &scores[g * len + b * BLOCK..];
                    match hd {
                        64 => accumulate::<64>(block, probs, a),
                        128 => accumulate::<128>(block, probs, a),
                        _ => accumulate_any(block, probs, a),
                    }
                }
            }
            for (i, &x) in acc.iter().enumerate() {
                // SAFETY: head `h` owns elements h*group*hd..(h+1)*group*hd of `out`, and
                // `execute_chunked` gives each head to one thread.
                unsafe { out_ptr.write(h * group * hd + i, x) };
            }
        }
    });
    drop((qs, ks, vs));
    Ok(Some(Tensor::from_vec(
        out,
        (1, 1, kv_heads * group * hd),
        &Device::Cpu,
    )?))
}

/// Writes `scores[g * len + t] = (queries[g] . keys[t]) * scale`.
type ScoresFn = fn(&[f32], &[f32], f32, &mut [f32], usize);

/// [`ScoresFn`] for `N` query rows: one pass over the keys with an independent accumulator per
/// query, so the multiply-adds overlap instead of waiting on one another.
fn scores_of<const N: usize>(
    queries: &[f32],
    keys: &[f32],
    scale: f32,
    scores: &mut [f32],
    len: usize,
) {
    let hd = queries.len() / N;
    for (t, key) in keys.chunks_exact(hd).enumerate() {
        let mut acc = [[0f32; 16]; N];
        let (chunks, rest) = key.as_chunks::<16>();
        for (c, k16) in chunks.iter().enumerate() {
            for (g, a) in acc.iter_mut().enumerate() {
                let q16 = &queries[g * hd + c * 16..][..16];
                for l in 0..16 {
                    a[l] = q16[l].mul_add(k16[l], a[l]);
                }
            }
        }
        let tail = chunks.len() * 16;
        for (g, a) in acc.iter().enumerate() {
            let mut s: f32 = a.iter().sum();
            for (i, kv) in rest.iter().enumerate() {
                s += queries[g * hd + tail + i] * kv;
            }
            scores[g * len + t] = s * scale;
        }
    }
}

/// `out += sum_t probs[t] * values[t]` for rows of a head size known at compile time, so that the
/// output row stays in registers over the block.
#[inline(always)]
fn accumulate<const HD: usize>(values: &[f32], probs: &[f32], out: &mut [f32]) {
    let mut a = [0f32; HD];
    a.copy_from_slice(out);
    let (rows, _) = values.as_chunks::<HD>();
    for (value, &p) in rows.iter().zip(probs) {
        for i in 0..HD {
            a[i] = p.mul_add(value[i], a[i]);
        }
    }
    out.copy_from_slice(&a);
}

/// [`accumulate`] for any head size.
fn accumulate_any(values: &[f32], probs: &[f32], out: &mut [f32]) {
    for (value, &p) in values.chunks_exact(out.len()).zip(probs) {
        for (x, &y) in out.iter_mut().zip(value) {
            *x = p.mul_add(y, *x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q k^T * scale) v through candle's matmuls.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Tensor {
        let k = k.contiguous().unwrap();
        let v = v.contiguous().unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        p.matmul(&v).unwrap().flatten_all().unwrap()
    }

    #[test]
    fn matches_candle_for_group_sizes_head_sizes_and_cache_views() {
        let dev = Device::Cpu;
        for (kv_heads, group, hd, len) in [
            (2, 6, 128, 300),
            (2, 2, 64, 1),
            (1, 1, 40, 17),
            (3, 9, 64, 50),
            (4, 7, 128, 33),
        ] {
            // A cache of capacity len + 5 holding `len` positions, as the engine's views are.
            let cap = len + 5;
            let kc = Tensor::randn(0f32, 1.0, (1, kv_heads, cap, hd), &dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (1, kv_heads, cap, hd), &dev).unwrap();
            let k = kc.narrow(2, 0, len).unwrap();
            let v = vc.narrow(2, 0, len).unwrap();
            let q = Tensor::randn(0f32, 1.0, (1, kv_heads, group, hd), &dev).unwrap();
            let scale = 1.0 / (hd as f32).sqrt();
            let got = decode_attention(&q, &k, &v, scale).unwrap().unwrap();
            let want = reference(&q, &k, &v, scale);
            let d = (got.flatten_all().unwrap() - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d < 1e-5,
                "kv_heads {kv_heads} group {group} hd {hd} len {len}: {d}"
            );
        }
    }
}
