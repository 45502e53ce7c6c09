//! Attention of one new token over the KV cache, on the CPU in f32 over an f32 or f16 cache: the
//! decode step's attention.
//!
//! Through candle, each layer's `q k^T` and `p v` for a single query run as general matmuls whose
//! operand packing costs more than the arithmetic; at 4,000 cached positions that made a Q4_K_M
//! decode step 2.5x slower than at 100. Here each KV head's keys and values stream once for all
//! the query heads that share them (grouped-query attention), in blocks small enough for L1, with
//! the cache lines a few blocks ahead prefetched while the arithmetic runs, so that the stream
//! from memory and the arithmetic overlap. A batched step attends for all its sequences in one
//! parallel region.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::model::linear::OutPtr;

/// `softmax(q k^T * scale) v` for `q` of shape `(1, kv_heads, group, head_dim)` (the query heads
/// sharing KV head `h` are rows `h*group..`), `k` and `v` of shape `(1, kv_heads, len, head_dim)`
/// (views of the cache: rows contiguous, heads strided; f32 or f16, both the same). Returns
/// `(1, 1, kv_heads*group*head_dim)`, or `None` when the inputs are not CPU tensors of that
/// layout, `q` in f32.
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
    let mut queries = Vec::with_capacity(items.len());
    for &(q, k, v) in items {
        if !(on_cpu(q, DType::F32) && on_cpu(k, kv_dtype) && on_cpu(v, kv_dtype)) {
            return Ok(None);
        }
        let (b, kh, len, kd) = k.dims4()?;
        if b != 1 || q.dims() != [1, kv_heads, group, hd] || kh != kv_heads || kd != hd {
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
    let mut f32_heads = Vec::new();
    let mut f16_heads = Vec::new();
    for ((qs, ql), (ks, kl), (vs, vl)) in &guards {
        let Storage::Cpu(CpuStorage::F32(qv)) = &**qs else {
            return Ok(None);
        };
        let rows_ok = |s: &[usize]| s[3] == 1 && s[2] == hd;
        if !rows_ok(kl.stride()) || !rows_ok(vl.stride()) {
            return Ok(None);
        }
        let queries = &qv[ql.start_offset()..][..kv_heads * group * hd];
        match (&**ks, &**vs) {
            (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
                f32_heads.push(Heads::over(queries, k, kl, v, vl))
            }
            (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => {
                f16_heads.push(Heads::over(queries, k, kl, v, vl))
            }
            _ => return Ok(None),
        }
    }
    let out = if f16_heads.is_empty() {
        attend_all(&f32_heads, kv_heads, group, hd, scale)
    } else {
        attend_all(&f16_heads, kv_heads, group, hd, scale)
    };
    drop(guards);
    Ok(Some(Tensor::from_vec(
        out,
        (1, items.len(), kv_heads * group * hd),
        &Device::Cpu,
    )?))
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
    candle_core::utils::barrier_pool().execute_chunked(heads.len() * kv_heads, |units| {
        let mut scores = vec![0f32; group * max_len];
        let mut acc = vec![0f32; group * hd];
        let mut widened = Vec::new();
        let (score, accumulate) = (scores_for(hd), accumulate_for(hd));
        for unit in units {
            let (i, h) = (unit / kv_heads, unit % kv_heads);
            let seq = &heads[i];
            let len = seq.len;
            let keys = &seq.keys[h * seq.k_head..][..len * hd];
            let values = &seq.values[h * seq.v_head..][..len * hd];
            let queries = &seq.queries[h * group * hd..][..group * hd];
            let scores = &mut scores[..group * len];
            let ahead = Ahead::new(keys, values);
            // Keys (and below, values) in blocks widened to f32 once, then read from L1 by every
            // query head of the group. Before each head's turn at a block, a share of the cache
            // lines `PREFETCH_AHEAD` bytes further on is prefetched: spread like this, the memory
            // streams the next blocks while the arithmetic runs, instead of the block's own
            // loads waiting on memory (and a burst of prefetches holding up retirement).
            for (b, block) in keys.chunks(KEY_BLOCK * hd).enumerate() {
                let start = b * KEY_BLOCK;
                let block = T::widen(block, &mut widened);
                let rows = block.len() / hd;
                for (g, q) in queries.chunks_exact(hd).enumerate() {
                    ahead.prefetch(start * hd, KEY_BLOCK * hd, g, group);
                    score(q, block, scale, &mut scores[g * len + start..][..rows]);
                }
            }
            for row in scores.chunks_exact_mut(len) {
                softmax_in_place(row);
            }
            acc.fill(0.0);
            // Blocks of value rows small enough for L1, each read once per query head while that
            // head's output row stays in registers.
            for (b, block) in values.chunks(VALUE_BLOCK * hd).enumerate() {
                let start = b * VALUE_BLOCK;
                let block = T::widen(block, &mut widened);
                for (g, a) in acc.chunks_exact_mut(hd).enumerate() {
                    ahead.prefetch((len + start) * hd, VALUE_BLOCK * hd, g, group);
                    let probs = &scores[g * len + start..];
                    accumulate(block, probs, a);
                }
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

/// `row <- softmax(row)`: with AVX-512, 16 exponentials at a time (libm's `expf`, one value per
/// call, was 1.8% of a decode step at 4,000 positions).
fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F (checked just above).
        return unsafe { softmax_avx512(row) };
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

/// [`softmax_in_place`] on 16 lanes. `exp(x) = 2^n * exp(r)` with `n = round(x / ln 2)`, `r` the
/// remainder (|r| <= ln(2)/2, taken off in two parts for precision) and `exp(r)` its Taylor
/// polynomial to degree 7 (relative error below 1e-7, under f32's rounding); `scalef` applies
/// `2^n`, going to 0 for the far-negative scores a softmax meets.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(row: &mut [f32]) {
    use core::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let mask_at = |i: usize| -> __mmask16 {
        if i + 16 <= n {
            0xFFFF
        } else {
            (1u16 << (n - i)) - 1
        }
    };
    // SAFETY (every masked load and store below): lanes at or past `n` are masked off.
    let load = |i: usize| unsafe { _mm512_maskz_loadu_ps(mask_at(i), p.add(i)) };
    let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        let x = load(i);
        maxv = _mm512_mask_max_ps(maxv, mask_at(i), maxv, x);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(maxv));
    let coef = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let mut sumv = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        let m = mask_at(i);
        let x = _mm512_max_ps(_mm512_sub_ps(load(i), max), _mm512_set1_ps(-104.0));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut e = _mm512_set1_ps(coef[0]);
        for &c in &coef[1..] {
            e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
        }
        let e = _mm512_scalef_ps(e, k);
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

/// Keys widened and scored together: 16 rows, the scores kernel's step (8 KiB of f32 at a head
/// size of 128, well within L1 for the query heads that read them after the first).
const KEY_BLOCK: usize = 16;

/// Value rows widened and accumulated together.
const VALUE_BLOCK: usize = 32;

/// How far ahead of the block being computed a KV head's cache is prefetched, in bytes: the
/// blocks in between take longer to compute than memory takes to answer, and 16 KiB stays
/// within the core's L1 and L2 even with the widened blocks beside it.
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

    /// Prefetches share `part` of `parts` of the cache lines of `count` elements that start
    /// [`PREFETCH_AHEAD`] bytes past element `at` of the stream (keys then values).
    #[inline(always)]
    fn prefetch(&self, at: usize, count: usize, part: usize, parts: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            const LINE: usize = 64;
            let lines = (count * self.elem).div_ceil(LINE);
            let (from, to) = (lines * part / parts, lines * (part + 1) / parts);
            let base = at * self.elem + PREFETCH_AHEAD;
            for l in from..to {
                let o = base + l * LINE;
                let p = if o < self.len {
                    self.keys.wrapping_add(o)
                } else if o < 2 * self.len {
                    self.values.wrapping_add(o - self.len)
                } else {
                    return;
                };
                // SAFETY: a prefetch is only a hint: it never faults, whatever the address.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
            }
        }
    }
}

/// An element of the KV cache: f32, or f16 (half the bytes to keep, and to stream per decode
/// step at long contexts; llama.cpp's default cache type too).
pub(crate) trait KvElem: Copy + Send + Sync + 'static {
    /// `rows` as f32: themselves for f32, else converted into `buf`.
    fn widen<'a>(rows: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
}

impl KvElem for f32 {
    fn widen<'a>(rows: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        rows
    }
}

/// Whether this CPU widens an f16 cache 16 values per instruction (AVX-512 F): where an f16
/// cache costs no more arithmetic than it saves in bytes. Elsewhere half's slice conversion
/// does it, more slowly.
pub(crate) fn widens_f16_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl KvElem for f16 {
    fn widen<'a>(rows: &'a [f16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        let n = rows.len();
        buf.resize(n, 0.0);
        #[cfg(target_arch = "x86_64")]
        if widens_f16_fast() {
            // SAFETY: the CPU has AVX-512 F (checked just above).
            unsafe { widen_avx512(rows, &mut buf[..n]) };
            return &buf[..n];
        }
        rows.convert_to_f32_slice(&mut buf[..n]);
        &buf[..n]
    }
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
        // SAFETY: `i + 16 <= n`, inside both slices.
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr().add(i).cast());
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
    }
    src[whole..n].convert_to_f32_slice(&mut dst[whole..n]);
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

/// The scores kernel for a query row of `hd` values: AVX-512 where the CPU has it and `hd` is a
/// multiple of 16 (the compiler's own vectorization of [`scores_of`] used 256-bit vectors, spilt
/// its accumulators and summed them one lane at a time: 2.4% of a four-sequence decode step).
fn scores_for(hd: usize) -> ScoresFn {
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(16) && std::is_x86_feature_detected!("avx512f") {
        return scores_avx512;
    }
    scores_of
}

/// [`scores_of`] with 16-lane vectors.
#[cfg(target_arch = "x86_64")]
fn scores_avx512(query: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
    #[target_feature(enable = "avx512f")]
    unsafe fn run(q: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
        use core::arch::x86_64::*;
        let hd = q.len();
        let rows = scores.len();
        // Sixteen keys at a time: sixteen accumulators, then one transposing sum of all sixteen
        // (about 3 instructions per key) instead of a horizontal sum per key (about 8), which
        // cost as much as the multiply-adds.
        let whole = rows / 16 * 16;
        for t0 in (0..whole).step_by(16) {
            let block = &keys[t0 * hd..(t0 + 16) * hd];
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in (0..hd).step_by(16) {
                // SAFETY: `c + 16 <= hd`: inside the query and inside each key row.
                unsafe {
                    let qv = _mm512_loadu_ps(q.as_ptr().add(c));
                    for (j, a) in acc.iter_mut().enumerate() {
                        let k = _mm512_loadu_ps(block.as_ptr().add(j * hd + c));
                        *a = _mm512_fmadd_ps(qv, k, *a);
                    }
                }
            }
            let sums = _mm512_mul_ps(sum16(&acc), _mm512_set1_ps(scale));
            // SAFETY: `t0 + 16 <= rows`, the length of `scores`.
            unsafe { _mm512_storeu_ps(scores.as_mut_ptr().add(t0), sums) };
        }
        for (t, key) in keys.chunks_exact(hd).enumerate().take(rows).skip(whole) {
            let mut acc = _mm512_setzero_ps();
            for c in (0..hd).step_by(16) {
                // SAFETY: `c + 16 <= hd`, inside `key` and inside the query.
                unsafe {
                    let k = _mm512_loadu_ps(key.as_ptr().add(c));
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(c)), k, acc);
                }
            }
            scores[t] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    assert!(query.len().is_multiple_of(16) && keys.len() == scores.len() * query.len());
    // SAFETY: `scores_for` picks this kernel only where the CPU has AVX-512 F; the sizes are
    // checked above.
    unsafe { run(query, keys, scale, scores) }
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
/// cache), as many as `scores` holds.
type ScoresFn = fn(&[f32], &[f32], f32, &mut [f32]);

/// The portable [`ScoresFn`]: sixteen independent lanes per key, so the multiply-adds overlap
/// instead of waiting on one another.
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

/// `out += sum_t probs[t] * values[t]` over the rows of `values` (each `out.len()` long).
type AccumulateFn = fn(&[f32], &[f32], &mut [f32]);

/// The [`AccumulateFn`] for a head of `hd` values: on 16 lanes where the CPU has AVX-512 and
/// `hd` is 64 or 128 (the compiler's own vectorization used 256-bit vectors here, twice the
/// instructions), the output row held in registers over the block. Every lane adds its rows in
/// order with fused multiply-adds, as [`accumulate_any`] does, so both give the same bits.
fn accumulate_for(hd: usize) -> AccumulateFn {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        match hd {
            64 => return accumulate_avx512::<4>,
            128 => return accumulate_avx512::<8>,
            _ => {}
        }
    }
    accumulate_any
}

/// [`AccumulateFn`] for a head of `V * 16` values.
#[cfg(target_arch = "x86_64")]
fn accumulate_avx512<const V: usize>(values: &[f32], probs: &[f32], out: &mut [f32]) {
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const V: usize>(values: &[f32], probs: &[f32], out: &mut [f32]) {
        use core::arch::x86_64::*;
        // SAFETY (all loads and stores): `out` holds V * 16 values (asserted by the caller), and
        // each row of `values` as many.
        let mut a: [__m512; V] =
            core::array::from_fn(|c| unsafe { _mm512_loadu_ps(out.as_ptr().add(c * 16)) });
        for (row, &p) in values.chunks_exact(V * 16).zip(probs) {
            let p = _mm512_set1_ps(p);
            for (c, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(p, unsafe { _mm512_loadu_ps(row.as_ptr().add(c * 16)) }, *a);
            }
        }
        for (c, a) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), *a) };
        }
    }
    assert_eq!(out.len(), V * 16);
    // SAFETY: `accumulate_for` picks this kernel only where the CPU has AVX-512 F; the size is
    // checked above.
    unsafe { run::<V>(values, probs, out) }
}

/// The portable [`AccumulateFn`], for any head size.
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

    /// The AVX-512 accumulation adds the same products in the same order as the portable loop:
    /// the same bits, for both head sizes it takes and for one it leaves to the portable loop.
    #[test]
    fn accumulate_matches_the_portable_loop_to_the_bit() {
        for hd in [64usize, 128, 80] {
            let rows = 37;
            let values: Vec<f32> = (0..rows * hd)
                .map(|i| ((i * 7919) % 1000) as f32 / 333.0 - 1.5)
                .collect();
            let probs: Vec<f32> = (0..rows).map(|i| 1.0 / (1 + i) as f32).collect();
            let start: Vec<f32> = (0..hd).map(|i| i as f32 * 0.01).collect();
            let (mut fast, mut portable) = (start.clone(), start);
            accumulate_for(hd)(&values, &probs, &mut fast);
            accumulate_any(&values, &probs, &mut portable);
            assert_eq!(fast, portable, "head size {hd}");
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

    /// An f16 cache gives what f32 gives over the same (f16-rounded) keys and values, for head
    /// sizes with and without the AVX-512 kernels, one sequence and several.
    #[test]
    fn an_f16_cache_matches_f32_over_the_same_values() {
        let dev = Device::Cpu;
        for (kv_heads, group, hd, len) in [(2, 6, 128, 300), (2, 2, 64, 7), (1, 3, 40, 17)] {
            let r = |shape: (usize, usize, usize, usize)| {
                Tensor::randn(0f32, 1.0, shape, &dev).unwrap()
            };
            let (kc, vc) = (r((1, kv_heads, len + 2, hd)), r((1, kv_heads, len + 2, hd)));
            let (k16, v16) = (
                kc.to_dtype(DType::F16).unwrap(),
                vc.to_dtype(DType::F16).unwrap(),
            );
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
                .expect("an f16 cache is read directly");
            let d = max_diff(&wide, &narrow);
            assert!(d < 1e-5, "kv_heads {kv_heads} group {group} hd {hd}: {d}");
            let q2 = r((1, kv_heads, group, hd));
            let (k, v) = (view(&k16), view(&v16));
            let both = decode_attention_many(&[(&q, &k, &v), (&q2, &k, &v)], scale)
                .unwrap()
                .unwrap();
            let first = both.narrow(1, 0, 1).unwrap().flatten_all().unwrap();
            assert_eq!(
                first.to_vec1::<f32>().unwrap(),
                narrow.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
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
                for (i, (g, w)) in got.iter().zip(&e).enumerate() {
                    let w = w / sum;
                    assert!(
                        (f64::from(*g) - w).abs() <= 1e-6 * w + 1e-30,
                        "n {n}, spread {spread}, {i}: {g} vs {w}"
                    );
                }
            }
        }
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
