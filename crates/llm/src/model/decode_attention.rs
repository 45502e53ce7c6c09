//! Attention of one new token over the KV cache, on the CPU in f32 over an f32, f16, bf16 or
//! Q8_0 cache: the decode step's attention.
//!
//! Through candle, each layer's `q k^T` and `p v` for a single query run as general matmuls whose
//! operand packing costs more than the arithmetic; at 4,000 cached positions that made a Q4_K_M
//! decode step 2.5x slower than at 100. Here each KV head's keys and values stream once for all
//! the query heads that share them (grouped-query attention): with AVX-512 (or AVX2, in
//! [`avx2`]) each key and value is widened once, straight from the cache into registers, for
//! every query head of the group; the cache lines a little ahead are prefetched while the
//! arithmetic runs, so that the stream from memory and the arithmetic overlap. A batched step
//! attends for all its sequences in one parallel region.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::model::kv_cache::{dequantize_q8_0, q8_0_row_bytes, Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
use crate::model::linear::OutPtr;
use crate::model::vexp;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// `softmax(q k^T * scale) v` for `q` of shape `(1, kv_heads, group, head_dim)` (the query heads
/// sharing KV head `h` are rows `h*group..`), `k` and `v` of shape `(1, kv_heads, len, row)`
/// (views of the cache: rows contiguous, heads strided; f32, f16 or bf16 rows of `head_dim`, or
/// `U8` rows of Q8_0 blocks, both the same). Returns `(1, 1, kv_heads*group*head_dim)`, or
/// `None` when the inputs are not CPU tensors of that layout, `q` in f32.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    decode_attention_many(&[(q, k, v)], scale)
}

/// [`decode_attention`] for the new tokens of several sequences at once (a batched decode step;
/// each `(q, k, v)` as there, over its own cache, all with the same head counts and size), in one
/// parallel region: one wait for the threads per layer rather than one per sequence. Returns
/// `(1, sequences, kv_heads*group*head_dim)`, row `i` sequence `i`'s, the same numbers as
/// [`decode_attention`] gives it alone.
pub fn decode_attention_many(
    items: &[(&Tensor, &Tensor, &Tensor)],
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let on_cpu = |t: &Tensor, dtype: DType| matches!(t.device(), Device::Cpu) && t.dtype() == dtype;
    let Some(&(q_first, k_first, _)) = items.first() else {
        return Ok(None);
    };
    let kv_dtype = k_first.dtype();
    let (_, kv_heads, group, hd) = q_first.dims4()?;
    // Elements per cached row: the head size, or the bytes of its Q8_0 blocks.
    let row = match kv_dtype {
        DType::U8 if hd.is_multiple_of(Q8_0_BLOCK) => <u8 as KvElem>::row_len(hd),
        DType::U8 => return Ok(None),
        _ => hd,
    };
    let mut queries = Vec::with_capacity(items.len());
    for &(q, k, v) in items {
        if !(on_cpu(q, DType::F32) && on_cpu(k, kv_dtype) && on_cpu(v, kv_dtype)) {
            return Ok(None);
        }
        let (b, kh, len, kd) = k.dims4()?;
        if b != 1 || q.dims() != [1, kv_heads, group, hd] || kh != kv_heads || kd != row {
            return Ok(None);
        }
        if v.dims() != k.dims() || len == 0 {
            return Ok(None);
        }
        queries.push(q.contiguous()?);
    }
    let guards: Vec<_> = items
        .iter()
        .zip(&queries)
        .map(|(&(_, k, v), q)| {
            (
                q.storage_and_layout(),
                k.storage_and_layout(),
                v.storage_and_layout(),
            )
        })
        .collect();
    let out = match kv_dtype {
        DType::F32 => attend_guarded::<f32>(&guards, kv_heads, group, hd, scale),
        DType::F16 => attend_guarded::<f16>(&guards, kv_heads, group, hd, scale),
        DType::BF16 => attend_guarded::<bf16>(&guards, kv_heads, group, hd, scale),
        DType::U8 => attend_guarded::<u8>(&guards, kv_heads, group, hd, scale),
        _ => None,
    };
    drop(guards);
    let Some(out) = out else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(
        out,
        (1, items.len(), kv_heads * group * hd),
        &Device::Cpu,
    )?))
}

/// A tensor's storage, read-locked, and its layout.
type Guard<'a> = (candle_core::StorageRef<'a>, &'a candle_core::Layout);

/// [`attend_all`] over the sequences whose query, keys and values `guards` hold (keys and values
/// of `T`, checked to be the cache's rows by the caller); `None` where a storage or a layout is
/// not one the kernels read.
fn attend_guarded<T: KvElem>(
    guards: &[(Guard<'_>, Guard<'_>, Guard<'_>)],
    kv_heads: usize,
    group: usize,
    hd: usize,
    scale: f32,
) -> Option<Vec<f32>> {
    let row = T::row_len(hd);
    let mut heads = Vec::with_capacity(guards.len());
    for ((qs, ql), (ks, kl), (vs, vl)) in guards {
        let Storage::Cpu(CpuStorage::F32(qv)) = &**qs else {
            return None;
        };
        let rows_ok = |s: &[usize]| s[3] == 1 && s[2] == row;
        if !rows_ok(kl.stride()) || !rows_ok(vl.stride()) {
            return None;
        }
        let (Storage::Cpu(k), Storage::Cpu(v)) = (&**ks, &**vs) else {
            return None;
        };
        let queries = &qv[ql.start_offset()..][..kv_heads * group * hd];
        let (k, v) = (k.as_slice::<T>().ok()?, v.as_slice::<T>().ok()?);
        heads.push(Heads::over(queries, k, kl, v, vl));
    }
    Some(attend_all(&heads, kv_heads, group, hd, scale))
}

/// The attention of every sequence in `heads` over its cache, in one parallel region: rows of
/// `kv_heads * group * hd` values, one per sequence.
fn attend_all<T: KvElem>(
    heads: &[Heads<'_, T>],
    kv_heads: usize,
    group: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let width = kv_heads * group * hd;
    let mut out = vec![0f32; heads.len() * width];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let max_len = heads.iter().map(|h| h.len).max().unwrap_or(0);
    let fused = fused_kernel(hd);
    let row = T::row_len(hd);
    candle_core::utils::barrier_pool().execute_chunked(heads.len() * kv_heads, |units| {
        let mut scores = vec![0f32; group * max_len];
        let mut acc = vec![0f32; group * hd];
        let mut widened = Vec::new();
        for unit in units {
            let (i, h) = (unit / kv_heads, unit % kv_heads);
            let seq = &heads[i];
            let len = seq.len;
            let head = Head {
                queries: &seq.queries[h * group * hd..][..group * hd],
                keys: &seq.keys[h * seq.k_head..][..len * row],
                values: &seq.values[h * seq.v_head..][..len * row],
                hd,
            };
            let scores = &mut scores[..group * len];
            acc.fill(0.0);
            match fused {
                // SAFETY (both): `fused_kernel` found the CPU's features and a head size of a
                // multiple of 16; `scores` and `acc` have the head's sizes.
                Some(kernel) => unsafe { attend_fused(kernel, &head, scale, scores, &mut acc) },
                None => attend_head(&head, scale, scores, &mut acc, &mut widened),
            }
            for (j, &x) in acc.iter().enumerate() {
                // SAFETY: unit (i, h) owns elements i*width + h*group*hd.. of `out`, group*hd of
                // them, and `execute_chunked` gives each unit to one thread.
                unsafe { out_ptr.write(i * width + h * group * hd + j, x) };
            }
        }
    });
    out
}

/// One KV head of one sequence: the query rows of its group, its keys and values.
struct Head<'a, T> {
    /// `group` rows of `hd`.
    queries: &'a [f32],
    /// `len` rows of `hd` values ([`KvElem::row_len`] elements each).
    keys: &'a [T],
    values: &'a [T],
    hd: usize,
}

impl<T: KvElem> Head<'_, T> {
    fn len(&self) -> usize {
        self.keys.len() / T::row_len(self.hd)
    }
}

/// The fused kernels: [`attend_head_avx512`] or [`avx2::attend_head`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fused {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// The fused kernels this CPU runs, best first (the tests run each).
#[cfg(test)]
fn fused_kernels_here() -> Vec<Fused> {
    let mut here = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if vexp::available() {
            here.push(Fused::Avx512);
        }
        if avx2::available() {
            here.push(Fused::Avx2);
        }
    }
    here
}

/// Runs `kernel` on one KV head ([`attend_head_avx512`] or [`avx2::attend_head`]).
///
/// # Safety
/// As for those: the CPU runs `kernel`, the head size is a multiple of 16, `scores` holds
/// `group * len` and `out` (zeroed) `group * hd` values.
unsafe fn attend_fused<T: KvElem>(
    kernel: Fused,
    head: &Head<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    match kernel {
        // SAFETY (both): the caller's.
        #[cfg(target_arch = "x86_64")]
        Fused::Avx512 => unsafe { attend_head_avx512(head, scale, scores, out) },
        #[cfg(target_arch = "x86_64")]
        Fused::Avx2 => unsafe { avx2::attend_head(head, scale, scores, out) },
    }
}

/// The fused kernel this CPU and head size take: [`attend_head_avx512`] where the CPU has AVX-512
/// F (as [`vexp`] needs), else [`avx2::attend_head`] where it has AVX2, FMA and F16C.
fn fused_kernel(hd: usize) -> Option<Fused> {
    if !hd.is_multiple_of(16) {
        return None;
    }
    best_fused_kernel()
}

/// The best fused kernel this CPU runs. Asked once per layer and step: no allocation (the
/// feature checks are cached by std).
fn best_fused_kernel() -> Option<Fused> {
    #[cfg(target_arch = "x86_64")]
    {
        if vexp::available() {
            return Some(Fused::Avx512);
        }
        if avx2::available() {
            return Some(Fused::Avx2);
        }
    }
    None
}

/// The attention of a group of query heads over their KV head, `out` (zeroed, `group` rows of
/// `hd`) receiving it: keys and values in blocks widened to f32 once and then read from L1 by
/// every query head of the group, with the cache a few blocks ahead prefetched.
fn attend_head<T: KvElem>(
    head: &Head<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    widened: &mut Vec<f32>,
) {
    let (hd, len) = (head.hd, head.len());
    let row = T::row_len(hd);
    let group = head.queries.len() / hd;
    let ahead = Ahead::new(head.keys, head.values);
    for (b, block) in head.keys.chunks(KEY_BLOCK * row).enumerate() {
        let start = b * KEY_BLOCK;
        let block = T::widen(block, hd, widened);
        let rows = block.len() / hd;
        for (g, q) in head.queries.chunks_exact(hd).enumerate() {
            ahead.prefetch(start * row, KEY_BLOCK * row, g, group);
            scores_of(q, block, scale, &mut scores[g * len + start..][..rows]);
        }
    }
    for row in scores.chunks_exact_mut(len) {
        softmax_in_place(row);
    }
    for (b, block) in head.values.chunks(VALUE_BLOCK * row).enumerate() {
        let start = b * VALUE_BLOCK;
        let block = T::widen(block, hd, widened);
        for (g, a) in out.chunks_exact_mut(hd).enumerate() {
            ahead.prefetch((len + start) * row, VALUE_BLOCK * row, g, group);
            accumulate_any(block, &scores[g * len + start..], a);
        }
    }
}

/// [`attend_head`] with AVX-512, reading the cache's f16 (or f32) values straight into the
/// arithmetic: each key and value is converted once and used by up to 8 query heads from
/// registers. [`attend_head`]'s way, widening blocks into an f32 buffer first, cost a store and
/// a reload per value and a kernel call per 16 keys and head; this streams each KV head in one
/// loop per pass. The values' sums are [`attend_head`]'s to the bit; the dot products are summed
/// in another order (within 1e-6 of it).
///
/// A head size of 128 (every DeepSeek-R1 distill's) runs as a constant: with the size known,
/// the compiler unrolls each key's 8 chunks and addresses the query heads with fixed offsets,
/// and the prefetches are one check per step and one line per chunk. Before, with the size at
/// run time and a prefetch loop that checked every line, a 2-key step of six heads took about
/// 440 instructions (the query rows' offsets reloaded from the stack) for its 96 multiply-adds,
/// and the attention ran barely faster from L2 than from memory; now about 260.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_head_avx512<T: KvElem>(
    head: &Head<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, len) = (head.hd, head.len());
    let group = head.queries.len() / hd;
    let ahead = Ahead::new(head.keys, head.values);
    // Heads in passes of at most 8: each (head, key) pair of a step has its own accumulator.
    for h0 in (0..group).step_by(8) {
        let h = (group - h0).min(8);
        let q = &head.queries[h0 * hd..][..h * hd];
        let s = &mut scores[h0 * len..][..h * len];
        macro_rules! pick {
            ($($h:literal, $k:literal);*) => {
                match (h, hd) {
                    // SAFETY (each arm): AVX-512 F is enabled here; the slices have the sizes
                    // asserted at the top of `scores_heads`.
                    $(($h, 128) => unsafe {
                        scores_heads::<T, $h, $k, 128>(q, head.keys, hd, scale, s, &ahead)
                    },
                    ($h, _) => unsafe {
                        scores_heads::<T, $h, $k, 0>(q, head.keys, hd, scale, s, &ahead)
                    },)*
                    _ => unreachable!("1 to 8 heads"),
                }
            };
        }
        pick!(1, 16; 2, 8; 3, 5; 4, 4; 5, 3; 6, 2; 7, 2; 8, 2)
    }
    for row in scores.chunks_exact_mut(len) {
        softmax_in_place(row);
    }
    // Accumulators for up to 16 (heads x 16 outputs) at a time, the widest the head size allows.
    for h0 in (0..group).step_by(8) {
        let h = (group - h0).min(8);
        let p = &scores[h0 * len..][..h * len];
        let o = &mut out[h0 * hd..][..h * hd];
        // SAFETY: AVX-512 F is enabled here; the sizes are those `accumulate_heads` asserts.
        unsafe { accumulate_pick(h, p, head.values, hd, o, &ahead) };
    }
}

/// [`accumulate_heads`] for `h` (1 to 8) heads with the most columns a pass that fits in
/// registers and divides the head size; a head size of 128 as a constant (see
/// [`attend_head_avx512`]). At most 16 accumulators (`h x C`): with 24 (six heads of four
/// columns), the compiler, unrolling the rows with the head size known, kept 20 of them on the
/// stack, a load and a store around every multiply-add. More passes over the columns cost only
/// reloads of rows from L1 and of probabilities.
///
/// # Safety
/// As for [`accumulate_heads`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_pick<T: KvElem>(
    h: usize,
    p: &[f32],
    v: &[T],
    hd: usize,
    o: &mut [f32],
    ahead: &Ahead,
) {
    let chunks = hd / 16;
    let widest = [8, 4, 2, 1]
        .into_iter()
        .find(|&c| h * c <= 16 && chunks.is_multiple_of(c))
        .unwrap_or(1);
    macro_rules! pick {
        ($($h:literal, $c:literal);*) => {
            match (h, widest, hd) {
                // SAFETY: the caller's.
                $(($h, $c, 128) => unsafe {
                    accumulate_heads::<T, $h, $c, 128>(p, v, hd, o, ahead)
                },
                ($h, $c, _) => unsafe { accumulate_heads::<T, $h, $c, 0>(p, v, hd, o, ahead) },)*
                _ => unreachable!("1 to 8 heads, 1 to 8 columns"),
            }
        };
    }
    pick!(1, 8; 1, 4; 1, 2; 1, 1; 2, 8; 2, 4; 2, 2; 2, 1; 3, 8; 3, 4; 3, 2; 3, 1;
        4, 4; 4, 2; 4, 1; 5, 4; 5, 2; 5, 1; 6, 4; 6, 2; 6, 1; 7, 2; 7, 1; 8, 2; 8, 1)
}

/// `scores[g * len + t] = (q[g] . keys[t]) * scale` for the `H` query rows `q` over all `len`
/// keys, `K` keys a step: the `H x K` dot products accumulate in registers (`H * K <= 16`) and
/// are summed horizontally together. `HD` is the head size when known at compile time, else 0
/// (`hd` then).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_heads<T: KvElem, const H: usize, const K: usize, const HD: usize>(
    q: &[f32],
    keys: &[T],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    ahead: &Ahead,
) {
    use core::arch::x86_64::*;
    let hd = if HD > 0 { HD } else { hd };
    let row = T::row_len(hd);
    let len = keys.len() / row;
    assert!(H * K <= 16 && q.len() == H * hd && scores.len() == H * len && hd.is_multiple_of(16));
    let (qp, kp, sp) = (q.as_ptr(), keys.as_ptr(), scores.as_mut_ptr());
    let scale_v = _mm512_set1_ps(scale);
    let chunks = hd / 16;
    // A step's keys in lines, prefetched a few per chunk.
    let lines = (K * row * size_of::<T>()).div_ceil(64);
    let whole = len / K * K;
    for t in (0..whole).step_by(K) {
        let pf = ahead.at(t * row);
        let mut acc = [_mm512_setzero_ps(); 16];
        for c in 0..chunks {
            // SAFETY: `t + K <= len` and `16 c + 16 <= hd`: inside `keys` and `q`.
            let k: [__m512; K] =
                core::array::from_fn(|j| unsafe { T::load16(kp.add((t + j) * row), 16 * c) });
            for g in 0..H {
                let qv = unsafe { _mm512_loadu_ps(qp.add(g * hd + 16 * c)) };
                for j in 0..K {
                    acc[g * K + j] = _mm512_fmadd_ps(qv, k[j], acc[g * K + j]);
                }
            }
            prefetch_lines(pf, lines * c / chunks, lines * (c + 1) / chunks);
        }
        let sums = _mm512_mul_ps(sum16(&acc), scale_v);
        let mut lanes = [0f32; 16];
        // SAFETY: 16 floats into `lanes`.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sums) };
        for g in 0..H {
            for j in 0..K {
                // SAFETY: `g < H` and `t + j < len`: inside `scores` (asserted above).
                unsafe { *sp.add(g * len + t + j) = lanes[g * K + j] };
            }
        }
    }
    for t in whole..len {
        for g in 0..H {
            let mut acc = _mm512_setzero_ps();
            for c in (0..hd).step_by(16) {
                // SAFETY: `t < len`, `c + 16 <= hd`.
                unsafe {
                    let k = T::load16(kp.add(t * row), c);
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(g * hd + c)), k, acc);
                }
            }
            scores[g * len + t] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
}

/// Value rows a pass of [`accumulate_heads`] covers before it moves to the next columns: 64 rows
/// of a 128-wide f16 head are 16 KiB, still in L1 for the pass over the next columns.
const VALUE_ROWS: usize = 64;

/// `out[g] += sum_t probs[g * len + t] * values[t]` for `H` heads, `C * 16` columns at a time
/// in registers, each value widened once for all `H` heads. Rows are added in order with fused
/// multiply-adds, as [`accumulate_any`] does: the same bits. `HD` as for [`scores_heads`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
// Indexed loops over the accumulator array: the kernel's register layout reads plainest so.
#[allow(clippy::needless_range_loop)]
unsafe fn accumulate_heads<T: KvElem, const H: usize, const C: usize, const HD: usize>(
    probs: &[f32],
    values: &[T],
    hd: usize,
    out: &mut [f32],
    ahead: &Ahead,
) {
    use core::arch::x86_64::*;
    let hd = if HD > 0 { HD } else { hd };
    let row = T::row_len(hd);
    let len = values.len() / row;
    assert!(probs.len() == H * len && out.len() == H * hd && hd.is_multiple_of(16 * C));
    let (vp, pp, op) = (values.as_ptr(), probs.as_ptr(), out.as_mut_ptr());
    let passes = hd / (16 * C);
    let row_bytes = row * size_of::<T>();
    for r0 in (0..len).step_by(VALUE_ROWS) {
        let rows = r0..(r0 + VALUE_ROWS).min(len);
        // The values follow the keys in the prefetches' stream.
        let mut prefetch = Spread::new(ahead.at((len + r0) * row), row_bytes, passes);
        for c0 in (0..hd).step_by(16 * C) {
            let mut acc = [[_mm512_setzero_ps(); C]; H];
            for g in 0..H {
                for c in 0..C {
                    // SAFETY: `c0 + 16 * C <= hd`, `g < H`: inside `out`.
                    acc[g][c] = unsafe { _mm512_loadu_ps(op.add(g * hd + c0 + c * 16)) };
                }
            }
            for t in rows.clone() {
                prefetch.step();
                // SAFETY: `t < len` and `c0 + 16 * C <= hd`: inside `values`.
                let v: [__m512; C] =
                    core::array::from_fn(|c| unsafe { T::load16(vp.add(t * row), c0 + c * 16) });
                for g in 0..H {
                    // SAFETY: `g * len + t < H * len`: inside `probs` (asserted above).
                    let p = _mm512_set1_ps(unsafe { *pp.add(g * len + t) });
                    for c in 0..C {
                        acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
                    }
                }
            }
            for g in 0..H {
                for c in 0..C {
                    // SAFETY: as for the loads.
                    unsafe { _mm512_storeu_ps(op.add(g * hd + c0 + c * 16), acc[g][c]) };
                }
            }
        }
    }
}

/// `row <- softmax(row)`: with AVX-512, 16 exponentials at a time ([`vexp::exp16`]); with AVX2,
/// eight ([`avx2::exp8`]).
fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vexp::available() {
        // SAFETY: the CPU has AVX-512 F (checked just above).
        return unsafe { softmax_avx512(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::softmax(row) };
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|s| *s *= inv);
}

/// [`softmax_in_place`] on 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(row: &mut [f32]) {
    use core::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let mask_at = |i: usize| vexp::lanes_from(i, n);
    // SAFETY (every masked load and store below): lanes at or past `n` are masked off.
    let load = |i: usize| unsafe { _mm512_maskz_loadu_ps(mask_at(i), p.add(i)) };
    let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        let x = load(i);
        maxv = _mm512_mask_max_ps(maxv, mask_at(i), maxv, x);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(maxv));
    let mut sumv = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        let m = mask_at(i);
        let e = vexp::exp16(_mm512_sub_ps(load(i), max));
        sumv = _mm512_mask_add_ps(sumv, m, sumv, e);
        // SAFETY: as for the loads.
        unsafe { _mm512_mask_storeu_ps(p.add(i), m, e) };
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sumv));
    for i in (0..n).step_by(16) {
        // SAFETY: as for the loads.
        unsafe { _mm512_mask_storeu_ps(p.add(i), mask_at(i), _mm512_mul_ps(load(i), inv)) };
    }
}

/// Keys widened and scored together by [`attend_head`]: 16 rows (8 KiB of f32 at a head size of
/// 128, well within L1 for the query heads that read them after the first).
const KEY_BLOCK: usize = 16;

/// Value rows widened and accumulated together by [`attend_head`].
const VALUE_BLOCK: usize = 32;

/// How far ahead of the block being computed a KV head's cache is prefetched, in bytes: the
/// rows in between take longer to compute than memory takes to answer, and 16 KiB stays
/// within the core's L1 and L2 (8 KiB measured the same, 32 KiB 10% slower).
const PREFETCH_AHEAD: usize = 16 << 10;

/// Prefetches over one KV head's keys followed by its values (seen as one stream, so the end of
/// the keys prefetches the start of the values).
struct Ahead {
    keys: *const u8,
    values: *const u8,
    /// Bytes of keys (and of values).
    len: usize,
    /// Bytes per element.
    elem: usize,
}

impl Ahead {
    fn new<T>(keys: &[T], values: &[T]) -> Self {
        Ahead {
            keys: keys.as_ptr().cast(),
            values: values.as_ptr().cast(),
            len: std::mem::size_of_val(keys),
            elem: std::mem::size_of::<T>(),
        }
    }

    /// Where to prefetch for the computation at element `at` of the stream (keys then values):
    /// [`PREFETCH_AHEAD`] bytes further on, or null past the values' end.
    #[inline(always)]
    fn at(&self, at: usize) -> *const u8 {
        let o = at * self.elem + PREFETCH_AHEAD;
        if o < self.len {
            self.keys.wrapping_add(o)
        } else if o < 2 * self.len {
            self.values.wrapping_add(o - self.len)
        } else {
            std::ptr::null()
        }
    }

    /// Prefetches share `part` of `parts` of the cache lines of `count` elements that start
    /// [`PREFETCH_AHEAD`] bytes past element `at` of the stream (keys then values).
    #[inline(always)]
    fn prefetch(&self, at: usize, count: usize, part: usize, parts: usize) {
        let lines = (count * self.elem).div_ceil(64);
        let (from, to) = (lines * part / parts, lines * (part + 1) / parts);
        prefetch_lines(self.at(at), from, to);
    }
}

/// The prefetches of a value pass: a block's bytes [`PREFETCH_AHEAD`] further on (in the stream
/// of keys then values; the next block, for 128-wide f16 rows), spread evenly over every row of
/// every pass over the block's columns, so that the requests go out at the rate the arithmetic
/// consumes them. The pass used to prefetch its share of each row's lines instead; with more
/// passes than lines (AVX2: 8 passes over the 4 lines of a 128-wide f16 row) that meant a line
/// per row in every other pass, bursts of 64 misses, more than the core's outstanding-miss
/// buffers hold, and the pass waited on its loads:
/// a stand-alone f16 value pass at 4,000 positions read 8.1 GB/s so against 13.4 spread (two
/// threads, Zen 3), and the attention bench's four f16 caches went from 49.6 to 45.3 ms.
///
/// The usual shapes owe a whole line every so many rows (f16 on AVX2: every second row), or
/// whole lines every row; those run on a countdown with no other arithmetic per row. Counting
/// bytes owed on every row, as every shape once did, cost the AVX2 f16 value pass half its speed
/// (a stand-alone copy on Zen 3, two threads at 4,000 positions: 9.0-9.4 ms against 4.7-5.5 ms a
/// step for the 1.5B's 28 layers). Other shapes (Q8_0 rows) still count bytes.
struct Spread {
    /// The window's start, or null (past the values' end).
    at: *const u8,
    /// Rows left until the next prefetch (never reaching 0 for a null window).
    left: usize,
    /// Rows from one prefetch to the next.
    gap: usize,
    /// Lines a prefetch takes on a fixed cadence; 0 where the bytes owed are counted instead.
    lines: usize,
    /// The next line of the window to prefetch.
    line: usize,
    /// Bytes times passes owed to the window and not yet prefetched (counted cadence only).
    credit: usize,
    /// A row's bytes: what one step (a row of one pass) adds to `credit`.
    row_bytes: usize,
    /// A line's 64 bytes times the passes: what one prefetch pays.
    line_cost: usize,
}

impl Spread {
    /// The window that starts at `at` (from [`Ahead::at`]) for a block whose rows of
    /// `row_bytes` bytes are gone over in `passes` passes (both above 0).
    #[inline(always)]
    fn new(at: *const u8, row_bytes: usize, passes: usize) -> Self {
        let line_cost = 64 * passes;
        let (gap, lines) = if line_cost.is_multiple_of(row_bytes) {
            (line_cost / row_bytes, 1)
        } else if row_bytes.is_multiple_of(line_cost) {
            (1, row_bytes / line_cost)
        } else {
            (1, 0)
        };
        Spread {
            at,
            left: if at.is_null() { usize::MAX } else { gap },
            gap,
            lines,
            line: 0,
            credit: 0,
            row_bytes,
            line_cost,
        }
    }

    /// One row of one pass: the window's lines whose turn has come, if any.
    #[inline(always)]
    fn due(&mut self) -> Option<(usize, usize)> {
        self.left -= 1;
        if self.left != 0 {
            return None;
        }
        self.left = self.gap;
        let mut n = self.lines;
        if n == 0 {
            self.credit += self.row_bytes;
            while self.credit >= self.line_cost {
                self.credit -= self.line_cost;
                n += 1;
            }
        }
        let from = self.line;
        self.line += n;
        Some((from, self.line))
    }

    /// One row of one pass: prefetches the lines whose turn has come.
    #[inline(always)]
    fn step(&mut self) {
        if let Some((from, to)) = self.due() {
            prefetch_lines(self.at, from, to);
        }
    }
}

/// Prefetches the cache lines `from..to` after `at` (none when `at` is null). A run that starts
/// in the keys near their end can run past them, into whatever follows rather than the values:
/// a prefetch never faults, whatever the address, so those few lines are only wasted.
#[inline(always)]
fn prefetch_lines(at: *const u8, from: usize, to: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        if at.is_null() {
            return;
        }
        for l in from..to {
            // SAFETY: a prefetch is only a hint: it never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(l * 64).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, from, to);
}

/// An element of the KV cache's rows: f32, f16 (half the bytes to keep, and to stream per
/// decode step at long contexts; llama.cpp's default cache type too), bf16, or `u8`, the bytes
/// of rows of Q8_0 blocks (0.56 of f16's bytes).
pub(crate) trait KvElem: candle_core::WithDType {
    /// Elements one row of `hd` values takes.
    fn row_len(hd: usize) -> usize;

    /// Whole `rows` of `hd` values as f32: themselves for f32, else converted into `buf`.
    fn widen<'a>(rows: &'a [Self], hd: usize, buf: &'a mut Vec<f32>) -> &'a [f32];

    /// Values `c..c+16` of the row starting at `row` as f32 (`c` a multiple of 16).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and the row, of at least `c + 16` values, is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(row: *const Self, c: usize) -> core::arch::x86_64::__m512;

    /// Values `c..c+8` of the row starting at `row` as f32 (`c` a multiple of 8).
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C and the row, of at least `c + 8` values, is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(row: *const Self, c: usize) -> core::arch::x86_64::__m256;
}

impl KvElem for f32 {
    fn row_len(hd: usize) -> usize {
        hd
    }

    fn widen<'a>(rows: &'a [f32], _: usize, _: &'a mut Vec<f32>) -> &'a [f32] {
        rows
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const f32, c: usize) -> core::arch::x86_64::__m512 {
        // SAFETY: the caller's.
        unsafe { core::arch::x86_64::_mm512_loadu_ps(row.add(c)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(row: *const f32, c: usize) -> core::arch::x86_64::__m256 {
        // SAFETY: the caller's.
        unsafe { core::arch::x86_64::_mm256_loadu_ps(row.add(c)) }
    }
}

/// Rows of Q8_0 blocks (an f32 scale and 32 signed bytes each), as [`KvFormat::Q8_0`] stores
/// them. Each value is widened as `f32(q) * d`, by the portable path and AVX-512 alike, so both
/// see the same numbers.
///
/// [`KvFormat::Q8_0`]: crate::model::KvFormat::Q8_0
impl KvElem for u8 {
    fn row_len(hd: usize) -> usize {
        q8_0_row_bytes(hd)
    }

    fn widen<'a>(rows: &'a [u8], hd: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let n = rows.len() / Self::row_len(hd) * hd;
        buf.resize(n, 0.0);
        dequantize_q8_0(rows, &mut buf[..n]);
        &buf[..n]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const u8, c: usize) -> core::arch::x86_64::__m512 {
        use core::arch::x86_64::*;
        // SAFETY (the reads): the caller's; block `c / 32` holds values `c..c+16` after its
        // 4-byte scale. The sign extension and the scale's broadcast both read memory directly.
        unsafe {
            let block = row.add(c / Q8_0_BLOCK * Q8_0_BLOCK_BYTES);
            let d = _mm512_set1_ps(block.cast::<f32>().read_unaligned());
            let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(4 + c % Q8_0_BLOCK).cast()));
            _mm512_mul_ps(_mm512_cvtepi32_ps(q), d)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(row: *const u8, c: usize) -> core::arch::x86_64::__m256 {
        use core::arch::x86_64::*;
        // SAFETY: the caller's, as for `load16`.
        unsafe {
            let block = row.add(c / Q8_0_BLOCK * Q8_0_BLOCK_BYTES);
            let d = _mm256_set1_ps(block.cast::<f32>().read_unaligned());
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(block.add(4 + c % Q8_0_BLOCK).cast()));
            _mm256_mul_ps(_mm256_cvtepi32_ps(q), d)
        }
    }
}

/// Whether this CPU reads an f16 cache straight into the fused kernels' arithmetic (AVX-512 F, or
/// AVX2 with F16C): where an f16 cache costs no more arithmetic than it saves in bytes. Elsewhere
/// half's slice conversion widens it into a buffer first, more slowly.
pub(crate) fn widens_f16_fast() -> bool {
    best_fused_kernel().is_some()
}

impl KvElem for f16 {
    fn row_len(hd: usize) -> usize {
        hd
    }

    fn widen<'a>(rows: &'a [f16], _: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let n = rows.len();
        buf.resize(n, 0.0);
        #[cfg(target_arch = "x86_64")]
        if vexp::available() {
            // SAFETY: the CPU has AVX-512 F (checked just above).
            unsafe { widen_avx512(rows, &mut buf[..n]) };
            return &buf[..n];
        }
        rows.convert_to_f32_slice(&mut buf[..n]);
        &buf[..n]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const f16, c: usize) -> core::arch::x86_64::__m512 {
        // SAFETY: the caller's: the CPU has AVX-512 F; 32 readable bytes at `row + c`.
        unsafe { widen16_from_memory(row.add(c)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(row: *const f16, c: usize) -> core::arch::x86_64::__m256 {
        use core::arch::x86_64::*;
        // SAFETY: the caller's: the CPU has F16C; 16 readable bytes at `row + c`.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.add(c).cast())) }
    }
}

/// 16 f16 values at `src` as f32, converted straight from memory. By hand rather than
/// `_mm512_cvtph_ps(_mm256_loadu_si256(..))`: that intrinsic is the instruction's
/// exceptions-suppressed form, which takes no memory operand, so the load stays a separate
/// instruction and the conversion issues on port 5 as well as port 0, where the multiply-adds
/// run. Converting from memory leaves port 5 to them (exceptions are masked anyway; the
/// conversion is exact). The `f16 x4` attention bench at 4,000 positions ran 5-10% faster so.
/// A function of its own so that it carries AVX-512 F (which its `zmm` operand needs) in any
/// build, `-C target-cpu=x86-64-v3` included; the kernels that call it have the feature, so it
/// inlines into them.
///
/// # Safety
/// The CPU has AVX-512 F, and 32 bytes at `src` are readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen16_from_memory(src: *const f16) -> core::arch::x86_64::__m512 {
    let out: core::arch::x86_64::__m512;
    // SAFETY: the caller's.
    unsafe {
        core::arch::asm!(
            "vcvtph2ps {out}, ymmword ptr [{src}]",
            src = in(reg) src,
            out = out(zmm_reg) out,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    out
}

/// f16 to f32, 16 values per instruction (half's own slice conversion goes 4 or 8 at a time and
/// took 9% of a decode step at 4,000 positions, more than the bytes it saved).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(src: &[f16], dst: &mut [f32]) {
    use core::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 16 * 16;
    for i in (0..whole).step_by(16) {
        // SAFETY: `i + 16 <= n`, inside both slices; AVX-512 F is enabled here.
        unsafe {
            let wide = widen16_from_memory(src.as_ptr().add(i));
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), wide);
        }
    }
    src[whole..n].convert_to_f32_slice(&mut dst[whole..n]);
}

/// bf16, as the published weights are and as transformers and vLLM keep their caches (a bf16
/// model's default cache): widened to f32 on the way into the arithmetic (a bf16 is the high
/// half of the f32 it rounds), one shift per 16 values, so it costs what f16 does. Before, a
/// bf16 cache left this kernel for candle's matmuls. The bf16 x bf16 products of AVX-512 BF16
/// (`vdpbf16ps`) and AMX tiles were tried for it and were slower (see the README's decode
/// attention notes).
impl KvElem for bf16 {
    fn row_len(hd: usize) -> usize {
        hd
    }

    fn widen<'a>(rows: &'a [bf16], _: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let n = rows.len();
        buf.resize(n, 0.0);
        rows.convert_to_f32_slice(&mut buf[..n]);
        &buf[..n]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const bf16, c: usize) -> core::arch::x86_64::__m512 {
        use core::arch::x86_64::*;
        // SAFETY: the caller's.
        unsafe {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(row.add(c).cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(row: *const bf16, c: usize) -> core::arch::x86_64::__m256 {
        use core::arch::x86_64::*;
        // SAFETY: the caller's.
        unsafe {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.add(c).cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
    }
}

/// One sequence's query rows and cache views for [`decode_attention_many`].
struct Heads<'a, T> {
    queries: &'a [f32],
    keys: &'a [T],
    values: &'a [T],
    /// Elements between KV heads in `keys` and `values`.
    k_head: usize,
    v_head: usize,
    len: usize,
}

impl<'a, T> Heads<'a, T> {
    /// The views `kl` and `vl` of the cache buffers `k` and `v`.
    fn over(
        queries: &'a [f32],
        k: &'a [T],
        kl: &candle_core::Layout,
        v: &'a [T],
        vl: &candle_core::Layout,
    ) -> Self {
        Heads {
            queries,
            keys: &k[kl.start_offset()..],
            values: &v[vl.start_offset()..],
            k_head: kl.stride()[1],
            v_head: vl.stride()[1],
            len: kl.dims()[2],
        }
    }
}

/// The horizontal sums of 16 vectors as one: lane `j` is the sum of `v[j]`'s lanes. Pairs are
/// folded by halves (512 to 256 to 128 bits, then within 128-bit lanes), 15 additions in all;
/// the result comes out with lane `4k + e` holding vector `4e + k`, put in order at the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum16(v: &[core::arch::x86_64::__m512; 16]) -> core::arch::x86_64::__m512 {
    use core::arch::x86_64::*;
    // 16 -> 8: lanes 0-7 one vector's partial sums, lanes 8-15 the next one's.
    let s: [__m512; 8] = core::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // 8 -> 4: 128-bit lane k of u[m] holds 4 partial sums of vector 4m + k.
    let u: [__m512; 4] = core::array::from_fn(|m| {
        let (a, b) = (s[2 * m], s[2 * m + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // 4 -> 2: in lane k of w[r], elements 0-1 belong to vector 8r + k, 2-3 to 8r + 4 + k.
    let w: [__m512; 2] = core::array::from_fn(|r| {
        let (a, b) = (u[2 * r], u[2 * r + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        )
    });
    // 2 -> 1: element e of lane k is vector 4e + k.
    let z = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(w[0], w[1]),
        _mm512_shuffle_ps::<0xDD>(w[0], w[1]),
    );
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, z)
}

/// Writes `scores[t] = (query . keys[t]) * scale` for the rows `t` of `keys` (a block of the
/// cache), as many as `scores` holds: sixteen independent lanes per key, so the multiply-adds
/// overlap instead of waiting on one another.
fn scores_of(query: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
    let hd = query.len();
    for (key, score) in keys.chunks_exact(hd).zip(scores.iter_mut()) {
        let mut acc = [0f32; 16];
        let (chunks, rest) = key.as_chunks::<16>();
        for (c, k16) in chunks.iter().enumerate() {
            let q16 = &query[c * 16..][..16];
            for l in 0..16 {
                acc[l] = q16[l].mul_add(k16[l], acc[l]);
            }
        }
        let tail = chunks.len() * 16;
        let mut s: f32 = acc.iter().sum();
        for (i, kv) in rest.iter().enumerate() {
            s += query[tail + i] * kv;
        }
        *score = s * scale;
    }
}

/// `out += sum_t probs[t] * values[t]` over the rows of `values` (each `out.len()` long), for
/// any head size.
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

    /// A value pass's prefetches on their countdown go out at the rows, and for the lines, that
    /// counting the bytes owed on every row picks (the schedule measured against bursts), for
    /// rows of every format at both head sizes and every pass count; a null window never fires.
    #[test]
    fn spread_prefetches_the_lines_counting_bytes_would() {
        let window = 64usize as *const u8;
        // f32, f16 and Q8_0 rows of 64 and 128 values, and odd sizes.
        for row_bytes in [256usize, 512, 128, 72, 144, 1, 7, 64, 3 * 64] {
            for passes in [1usize, 2, 3, 4, 8, 16] {
                let mut spread = Spread::new(window, row_bytes, passes);
                let (mut credit, mut line) = (0, 0);
                for row in 0..VALUE_ROWS * passes {
                    credit += row_bytes;
                    let from = line;
                    while credit >= 64 * passes {
                        credit -= 64 * passes;
                        line += 1;
                    }
                    let expected = (line > from).then_some((from, line));
                    let got = spread.due().filter(|(a, b)| a < b);
                    assert_eq!(
                        got, expected,
                        "{row_bytes} B rows, {passes} passes, row {row}"
                    );
                }
                let mut none = Spread::new(std::ptr::null(), row_bytes, passes);
                assert!((0..VALUE_ROWS * passes).all(|_| none.due().is_none()));
            }
        }
    }

    /// The fused kernels' accumulation adds the same products in the same order as the portable
    /// loop: the same bits, for every head count a pass takes and both head sizes, over a row
    /// count that leaves a partial block of rows; in each kernel this CPU runs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn accumulate_matches_the_portable_loop_to_the_bit() {
        let rows = VALUE_ROWS + 37;
        for kernel in fused_kernels_here() {
            for hd in [64usize, 128] {
                let values: Vec<f16> = (0..rows * hd)
                    .map(|i| f16::from_f32(((i * 7919) % 1000) as f32 / 333.0 - 1.5))
                    .collect();
                let ahead = Ahead::new(&values, &values);
                for h in 1..=8 {
                    let probs: Vec<f32> =
                        (0..h * rows).map(|i| 1.0 / (1 + i % 97) as f32).collect();
                    let mut fast = vec![0f32; h * hd];
                    // SAFETY: the CPU runs `kernel`; the sizes are the ones it asserts.
                    unsafe {
                        match kernel {
                            Fused::Avx512 => {
                                accumulate_pick(h, &probs, &values, hd, &mut fast, &ahead)
                            }
                            Fused::Avx2 => {
                                avx2::accumulate_pick(h, &probs, &values, hd, &mut fast, &ahead)
                            }
                        }
                    };
                    let wide: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
                    let mut portable = vec![0f32; h * hd];
                    for g in 0..h {
                        let out = &mut portable[g * hd..][..hd];
                        accumulate_any(&wide, &probs[g * rows..][..rows], out);
                    }
                    assert_eq!(fast, portable, "{kernel:?}, head size {hd}, {h} heads");
                }
            }
        }
    }

    /// Each fused kernel this CPU runs against the portable head (blocks widened first), for
    /// every head count up to 9 (two passes), f16, bf16 and f32 caches and lengths with and
    /// without a tail of keys.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fused_kernels_match_the_portable_path() {
        for kernel in fused_kernels_here() {
            fused_kernel_matches_the_portable_path(kernel);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn fused_kernel_matches_the_portable_path(kernel: Fused) {
        for (group, hd, len) in [(1, 64, 33), (2, 128, 17), (3, 64, 40), (4, 128, 301)]
            .into_iter()
            .chain([
                (5, 128, 64),
                (6, 128, 1),
                (6, 128, 4000),
                (7, 64, 99),
                (8, 128, 3),
            ])
            .chain([(9, 64, 50), (6, 16, 9)])
        {
            let x = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i + seed) * 2654435761) % 10007) as f32 / 5003.0 - 1.0)
                    .collect()
            };
            let q = x(group * hd, 1);
            let (k32, v32) = (x(len * hd, 2), x(len * hd, 3));
            let scale = 1.0 / (hd as f32).sqrt();
            fn run<T: KvElem>(
                kernel: Option<Fused>,
                q: &[f32],
                k: &[T],
                v: &[T],
                hd: usize,
                scale: f32,
            ) -> Vec<f32> {
                let group = q.len() / hd;
                let len = k.len() / hd;
                let head = Head {
                    queries: q,
                    keys: k,
                    values: v,
                    hd,
                };
                let mut scores = vec![0f32; group * len];
                let mut out = vec![0f32; group * hd];
                match kernel {
                    // SAFETY: the CPU runs `kernel` and the head size is a multiple of 16.
                    Some(kernel) => unsafe {
                        attend_fused(kernel, &head, scale, &mut scores, &mut out)
                    },
                    None => attend_head(&head, scale, &mut scores, &mut out, &mut Vec::new()),
                }
                out
            }
            let at = format!("{kernel:?} group {group} hd {hd} len {len}");
            let close = |a: &[f32], b: &[f32], what: &str| {
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-6, "{what}, {at}: {d}");
            };
            let k16: Vec<f16> = k32.iter().map(|&v| f16::from_f32(v)).collect();
            let v16: Vec<f16> = v32.iter().map(|&v| f16::from_f32(v)).collect();
            let fast = run(Some(kernel), &q, &k16, &v16, hd, scale);
            close(&fast, &run(None, &q, &k16, &v16, hd, scale), "f16");
            // An f32 cache holding the same (f16-rounded) values: the same bits.
            let (kw, vw): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|v| v.to_f32()).collect(),
                v16.iter().map(|v| v.to_f32()).collect(),
            );
            let wide = run(Some(kernel), &q, &kw, &vw, hd, scale);
            assert_eq!(fast, wide, "an f32 cache, {at}");
            let kb: Vec<bf16> = k32.iter().map(|&v| bf16::from_f32(v)).collect();
            let vb: Vec<bf16> = v32.iter().map(|&v| bf16::from_f32(v)).collect();
            let fast = run(Some(kernel), &q, &kb, &vb, hd, scale);
            close(&fast, &run(None, &q, &kb, &vb, hd, scale), "bf16");
        }
    }

    /// Several sequences of different cache lengths in one call: each row is, to the bit, what the
    /// sequence gets alone.
    #[test]
    fn many_sequences_match_each_alone() {
        let dev = Device::Cpu;
        let (kv_heads, group, hd) = (2, 6, 128);
        let seqs: Vec<(Tensor, Tensor, Tensor)> = [1, 100, 37, 260]
            .iter()
            .map(|&len| {
                let r = |shape: (usize, usize, usize, usize)| {
                    Tensor::randn(0f32, 1.0, shape, &dev).unwrap()
                };
                let cache = r((1, kv_heads, len + 3, hd));
                let k = cache.narrow(2, 0, len).unwrap();
                let v = r((1, kv_heads, len, hd));
                (r((1, kv_heads, group, hd)), k, v)
            })
            .collect();
        let items: Vec<_> = seqs.iter().map(|(q, k, v)| (q, k, v)).collect();
        let all = decode_attention_many(&items, 0.125).unwrap().unwrap();
        assert_eq!(all.dims(), [1, seqs.len(), kv_heads * group * hd]);
        for (i, (q, k, v)) in seqs.iter().enumerate() {
            let alone = decode_attention(q, k, v, 0.125).unwrap().unwrap();
            let row = all.narrow(1, i, 1).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                alone.flatten_all().unwrap().to_vec1().unwrap(),
                row.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "sequence {i}");
        }
    }

    /// An f16 or a bf16 cache gives what f32 gives over the same (rounded) keys and values, for
    /// head sizes with and without the AVX-512 kernels, one sequence and several.
    #[test]
    fn half_caches_match_f32_over_the_same_values() {
        let dev = Device::Cpu;
        let shapes = [(2, 6, 128, 300), (2, 2, 64, 7), (1, 3, 40, 17)];
        for (dtype, (kv_heads, group, hd, len)) in [DType::F16, DType::BF16]
            .into_iter()
            .flat_map(|d| shapes.map(|s| (d, s)))
        {
            let r = |shape: (usize, usize, usize, usize)| {
                Tensor::randn(0f32, 1.0, shape, &dev).unwrap()
            };
            let (kc, vc) = (r((1, kv_heads, len + 2, hd)), r((1, kv_heads, len + 2, hd)));
            let (k16, v16) = (kc.to_dtype(dtype).unwrap(), vc.to_dtype(dtype).unwrap());
            let (k32, v32) = (
                k16.to_dtype(DType::F32).unwrap(),
                v16.to_dtype(DType::F32).unwrap(),
            );
            let view = |t: &Tensor| t.narrow(2, 0, len).unwrap();
            let q = r((1, kv_heads, group, hd));
            let scale = 1.0 / (hd as f32).sqrt();
            let wide = decode_attention(&q, &view(&k32), &view(&v32), scale)
                .unwrap()
                .unwrap();
            let narrow = decode_attention(&q, &view(&k16), &view(&v16), scale)
                .unwrap()
                .expect("an f16 or bf16 cache is read directly");
            let d = max_diff(&wide, &narrow);
            assert!(
                d < 1e-5,
                "{dtype:?} kv_heads {kv_heads} group {group} hd {hd}: {d}"
            );
            first_of_two_is_alone(&q, &view(&k16), &view(&v16), scale, &narrow);
        }
    }

    /// A Q8_0 cache (rows of blocks, as the KV cache stores them) gives what an f32 cache of its
    /// dequantized values gives, through the fused kernels and the portable path alike, for one
    /// sequence and several, and for head sizes of 64 and 128.
    #[test]
    fn a_q8_0_cache_matches_f32_over_its_values() {
        use crate::model::kv_cache::{widen_rows, KvCache, KvFormat};
        let dev = Device::Cpu;
        for (kv_heads, group, hd, len) in [(2, 6, 128, 300), (2, 2, 64, 7), (1, 9, 64, 33)] {
            let mut cache = KvCache::new(1, kv_heads, hd, 1024, KvFormat::Q8_0, &dev);
            cache.reserve(len).unwrap();
            let r = |shape: (usize, usize, usize, usize)| {
                Tensor::randn(0f32, 1.0, shape, &dev).unwrap()
            };
            cache
                .append(0, &r((1, kv_heads, len, hd)), &r((1, kv_heads, len, hd)))
                .unwrap();
            cache.advance(len);
            let (k8, v8) = cache.layer(0).unwrap();
            assert_eq!(k8.dtype(), DType::U8);
            let (k32, v32) = (
                widen_rows(&k8, hd, DType::F32).unwrap(),
                widen_rows(&v8, hd, DType::F32).unwrap(),
            );
            let q = r((1, kv_heads, group, hd));
            let scale = 1.0 / (hd as f32).sqrt();
            let wide = decode_attention(&q, &k32, &v32, scale).unwrap().unwrap();
            let q8 = decode_attention(&q, &k8, &v8, scale)
                .unwrap()
                .expect("a Q8_0 cache is read directly");
            let d = max_diff(&wide, &q8);
            assert!(d < 1e-5, "kv_heads {kv_heads} group {group} hd {hd}: {d}");
            first_of_two_is_alone(&q, &k8, &v8, scale, &q8);
            // The portable path (blocks widened first) over the same bytes.
            let bytes = |t: &Tensor| -> Vec<u8> {
                t.narrow(1, 0, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (kb, vb) = (bytes(&k8), bytes(&v8));
            let q0: Vec<f32> = q
                .narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let head = Head {
                queries: &q0,
                keys: &kb,
                values: &vb,
                hd,
            };
            let mut portable = vec![0f32; group * hd];
            let mut scores = vec![0f32; group * len];
            attend_head(&head, scale, &mut scores, &mut portable, &mut Vec::new());
            let fast = q8.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let d = fast[..group * hd]
                .iter()
                .zip(&portable)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-6, "portable, group {group} hd {hd}: {d}");
        }
    }

    /// The vectorised softmax against libm's `expf` in f64 sums, for every tail length, with
    /// scores far apart (exponentials that underflow to 0) and all equal.
    #[test]
    fn softmax_matches_a_scalar_reference() {
        for n in (1..=70).chain([4000]) {
            for spread in [0.0f32, 3.0, 40.0, 200.0] {
                let row: Vec<f32> = (0..n)
                    .map(|i| ((i as f32 * 0.71).sin() * spread) - 5.0)
                    .collect();
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = row.iter().map(|&s| f64::from(s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                let mut got = row.clone();
                softmax_in_place(&mut got);
                let mut each = vec![("dispatched", got)];
                #[cfg(target_arch = "x86_64")]
                if avx2::available() {
                    let mut got = row.clone();
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    unsafe { avx2::softmax(&mut got) };
                    each.push(("avx2", got));
                }
                for (kernel, got) in each {
                    for (i, (g, w)) in got.iter().zip(&e).enumerate() {
                        let w = w / sum;
                        assert!(
                            (f64::from(*g) - w).abs() <= 1e-6 * w + 1e-30,
                            "{kernel}: n {n}, spread {spread}, {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// `q` over `k`, `v` batched with a second random query over the same cache gives `alone`
    /// (its attention by itself) to the bit.
    fn first_of_two_is_alone(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, alone: &Tensor) {
        let q2 = q.randn_like(0.0, 1.0).unwrap();
        let both = decode_attention_many(&[(q, k, v), (&q2, k, v)], scale)
            .unwrap()
            .unwrap();
        let first = both.narrow(1, 0, 1).unwrap().flatten_all().unwrap();
        assert_eq!(
            first.to_vec1::<f32>().unwrap(),
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    /// The largest element-wise difference of two tensors of one shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap();
        d.max_all().unwrap().to_scalar::<f32>().unwrap()
    }

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
            (8, 4, 128, 4001),
            (1, 5, 64, 48),
            (2, 8, 128, 7),
            (2, 3, 16, 70),
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
            let d = max_diff(&got.flatten_all().unwrap(), &want);
            assert!(
                d < 1e-5,
                "kv_heads {kv_heads} group {group} hd {hd} len {len}: {d}"
            );
        }
    }
}
