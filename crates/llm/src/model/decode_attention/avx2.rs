//! The fused decode attention of [`super::attend_head_avx512`] on AVX2 with FMA and F16C, eight
//! lanes at a time, for x86 CPUs without AVX-512 (AMD before Zen 4, Intel's client cores since
//! Alder Lake): each key and value is read from the cache into registers, widened once and used
//! for every query head of its group; the softmax takes its exponentials eight at a time
//! ([`exp8`]).
//!
//! Without it those CPUs widened the cache block by block into a buffer and took libm's `expf`
//! one value at a time: on a 2-core Zen 3, the 1.5B Q4_K_M decoded at 4,000 positions at 0.63x
//! (f32 cache) and 0.70x (f16) of its speed at 100.

use core::arch::x86_64::*;

use super::{prefetch_lines, Ahead, Head, KvElem, Spread, VALUE_ROWS};
use crate::model::vexp::exp8;

/// Whether this CPU runs these kernels.
pub(super) fn available() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// [`super::attend_head_avx512`] on eight lanes; the same passes, prefetches and order of the
/// values' sums (so their bits are the portable path's).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C ([`available`]); the head size is a multiple of 16; `scores`
/// holds `group * len` and `out` (zeroed) `group * hd` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_head<T: KvElem>(
    head: &Head<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, len) = (head.hd, head.len());
    let group = head.queries.len() / hd;
    let ahead = Ahead::new(head.keys, head.values);
    for h0 in (0..group).step_by(8) {
        let h = (group - h0).min(8);
        let q = &head.queries[h0 * hd..][..h * hd];
        let s = &mut scores[h0 * len..][..h * len];
        // Keys a step per head count: at least eight chains of multiply-adds where the 16
        // registers allow (accumulators, keys and a query row).
        macro_rules! pick {
            ($($h:literal, $k:literal);*) => {
                match (h, hd) {
                    // SAFETY (each arm): the features are enabled here; the slices have the
                    // sizes asserted at the top of `scores_heads`.
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
        pick!(1, 8; 2, 4; 3, 3; 4, 2; 5, 2; 6, 2; 7, 1; 8, 1)
    }
    for row in scores.chunks_exact_mut(len) {
        // SAFETY: the features are enabled here.
        unsafe { softmax(row) };
    }
    for h0 in (0..group).step_by(8) {
        let h = (group - h0).min(8);
        let p = &scores[h0 * len..][..h * len];
        let o = &mut out[h0 * hd..][..h * hd];
        // SAFETY: the features are enabled here; the sizes are those `accumulate_heads` asserts.
        unsafe { accumulate_pick(h, p, head.values, hd, o, &ahead) };
    }
}

/// [`accumulate_heads`] for `h` (1 to 8) heads with the most 8-value columns a pass that fits in
/// the 16 registers (accumulators, the columns' values and a probability) and divides the head
/// size; a head size of 128 as a constant.
///
/// # Safety
/// As for [`accumulate_heads`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn accumulate_pick<T: KvElem>(
    h: usize,
    p: &[f32],
    v: &[T],
    hd: usize,
    o: &mut [f32],
    ahead: &Ahead,
) {
    let chunks = hd / 8;
    let widest = [8, 4, 2, 1]
        .into_iter()
        .find(|&c| (h == 1 || h * c + c < 16) && chunks.is_multiple_of(c))
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
    pick!(1, 8; 1, 4; 1, 2; 1, 1; 2, 4; 2, 2; 2, 1; 3, 2; 3, 1; 4, 2; 4, 1; 5, 2; 5, 1;
        6, 2; 6, 1; 7, 1; 8, 1)
}

/// The horizontal sums of 8 vectors as one: lane `j` is the sum of `v[j]`'s lanes.
#[inline(always)]
unsafe fn sum8(v: &[__m256; 8]) -> __m256 {
    // SAFETY: the callers have AVX enabled.
    unsafe {
        let (a01, a23) = (_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        let (a45, a67) = (_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        // Lanes 0-3: vectors 0-3 (then 4-7) over their low halves; lanes 4-7: the high halves.
        let (b0, b1) = (_mm256_hadd_ps(a01, a23), _mm256_hadd_ps(a45, a67));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(b0, b1),
            _mm256_permute2f128_ps::<0x31>(b0, b1),
        )
    }
}

/// `scores[g * len + t] = (q[g] . keys[t]) * scale` for the `H` query rows `q` over all `len`
/// keys, `K` keys a step (`H * K <= 16`: up to 12, with its keys and a query row, fit in the 16
/// registers), as [`super::scores_heads`] does on 16 lanes, with each step's prefetches issued
/// together.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_heads<T: KvElem, const H: usize, const K: usize, const HD: usize>(
    q: &[f32],
    keys: &[T],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    ahead: &Ahead,
) {
    let hd = if HD > 0 { HD } else { hd };
    let row = T::row_len(hd);
    let len = keys.len() / row;
    assert!(H * K <= 16 && q.len() == H * hd && scores.len() == H * len && hd.is_multiple_of(8));
    let (qp, kp, sp) = (q.as_ptr(), keys.as_ptr(), scores.as_mut_ptr());
    let scale_v = _mm256_set1_ps(scale);
    let chunks = hd / 8;
    let lines = (K * row * size_of::<T>()).div_ceil(64);
    let whole = len / K * K;
    // Eight lines a chunk cover them all: `lines <= K * hd * 4 / 64 <= hd = 8 * chunks`.
    debug_assert!(lines <= 8 * chunks);
    for t in (0..whole).step_by(K) {
        // The step's lines of the stream ahead: up to eight all at once before the chunks (two
        // 128-wide f16 keys: every head count from 4 up), more eight at a chunk (1 to 3 heads
        // take 8 to 3 keys a step), bursts no longer than the core's line-fill buffers hold.
        // Spread over the chunks with a range computed per chunk (as the AVX-512 kernel does)
        // their bookkeeping took a quarter of this loop's time: a stand-alone copy on Zen 3 (two
        // threads, 4,000 positions, the 1.5B's 28 layers) ran 5.6-5.9 ms a step so, 4.2-4.4 ms
        // with the burst (testing on every chunk whether one is due cost half that gain back in
        // the same copy; `lines` is a constant for the usual head sizes, and the tests here
        // compile away).
        let pf = ahead.at(t * row);
        if lines <= 8 {
            prefetch_lines(pf, 0, lines);
        }
        let mut acc = [_mm256_setzero_ps(); 16];
        for c in 0..chunks {
            if lines > 8 && 8 * c < lines {
                prefetch_lines(pf, 8 * c, (8 * c + 8).min(lines));
            }
            // SAFETY: `t + K <= len` and `8 c + 8 <= hd`: inside `keys` and `q`.
            let k: [__m256; K] =
                core::array::from_fn(|j| unsafe { T::load8(kp.add((t + j) * row), 8 * c) });
            for g in 0..H {
                // SAFETY: as above.
                let qv = unsafe { _mm256_loadu_ps(qp.add(g * hd + 8 * c)) };
                for j in 0..K {
                    acc[g * K + j] = _mm256_fmadd_ps(qv, k[j], acc[g * K + j]);
                }
            }
        }
        let mut lanes = [0f32; 16];
        for (half, sums) in acc.chunks_exact(8).enumerate().take((H * K).div_ceil(8)) {
            // SAFETY: AVX is enabled here; 8 floats into `lanes` from `8 half`.
            unsafe {
                let sums = _mm256_mul_ps(sum8(sums.try_into().expect("chunks of 8")), scale_v);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * half), sums);
            }
        }
        for g in 0..H {
            for j in 0..K {
                // SAFETY: `g < H` and `t + j < len`: inside `scores` (asserted above).
                unsafe { *sp.add(g * len + t + j) = lanes[g * K + j] };
            }
        }
    }
    for t in whole..len {
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..hd).step_by(8) {
            // SAFETY: `t < len`, `c + 8 <= hd`.
            let k = unsafe { T::load8(kp.add(t * row), c) };
            for (g, a) in acc.iter_mut().enumerate().take(H) {
                // SAFETY: `g < H`: inside `q`.
                *a = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(qp.add(g * hd + c)) }, k, *a);
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: AVX is enabled here; 8 floats into `lanes`.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum8(&acc)) };
        for (g, &s) in lanes.iter().enumerate().take(H) {
            scores[g * len + t] = s * scale;
        }
    }
}

/// `out[g] += sum_t probs[g * len + t] * values[t]` for `H` heads, `C * 8` columns at a time in
/// registers, each value widened once for all `H` heads; rows added in order with fused
/// multiply-adds, as [`super::accumulate_any`] does: the same bits.
#[target_feature(enable = "avx2,fma,f16c")]
// Indexed loops over the accumulator array: the kernel's register layout reads plainest so.
#[allow(clippy::needless_range_loop)]
unsafe fn accumulate_heads<T: KvElem, const H: usize, const C: usize, const HD: usize>(
    probs: &[f32],
    values: &[T],
    hd: usize,
    out: &mut [f32],
    ahead: &Ahead,
) {
    let hd = if HD > 0 { HD } else { hd };
    let row = T::row_len(hd);
    let len = values.len() / row;
    assert!(probs.len() == H * len && out.len() == H * hd && hd.is_multiple_of(8 * C));
    let (vp, pp, op) = (values.as_ptr(), probs.as_ptr(), out.as_mut_ptr());
    let passes = hd / (8 * C);
    let row_bytes = row * size_of::<T>();
    for r0 in (0..len).step_by(VALUE_ROWS) {
        let rows = r0..(r0 + VALUE_ROWS).min(len);
        let mut prefetch = Spread::new(ahead.at((len + r0) * row), row_bytes, passes);
        for c0 in (0..hd).step_by(8 * C) {
            let mut acc = [[_mm256_setzero_ps(); C]; H];
            for g in 0..H {
                for c in 0..C {
                    // SAFETY: `c0 + 8 * C <= hd`, `g < H`: inside `out`.
                    acc[g][c] = unsafe { _mm256_loadu_ps(op.add(g * hd + c0 + c * 8)) };
                }
            }
            for t in rows.clone() {
                prefetch.step();
                // SAFETY: `t < len` and `c0 + 8 * C <= hd`: inside `values`.
                let v: [__m256; C] =
                    core::array::from_fn(|c| unsafe { T::load8(vp.add(t * row), c0 + c * 8) });
                for g in 0..H {
                    // SAFETY: `g * len + t < H * len`: inside `probs` (asserted above).
                    let p = _mm256_set1_ps(unsafe { *pp.add(g * len + t) });
                    for c in 0..C {
                        acc[g][c] = _mm256_fmadd_ps(p, v[c], acc[g][c]);
                    }
                }
            }
            for g in 0..H {
                for c in 0..C {
                    // SAFETY: as for the loads.
                    unsafe { _mm256_storeu_ps(op.add(g * hd + c0 + c * 8), acc[g][c]) };
                }
            }
        }
    }
}

/// `row <- softmax(row)` on eight lanes ([`exp8`]); the tail goes through a padded vector.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax(row: &mut [f32]) {
    let n = row.len();
    let whole = n / 8 * 8;
    // The tail, padded with -inf (whose exponential is 0).
    let mut tail = [f32::NEG_INFINITY; 8];
    tail[..n - whole].copy_from_slice(&row[whole..]);
    let p = row.as_mut_ptr();
    let tp = tail.as_mut_ptr();
    // SAFETY (the loads and stores below): `i + 8 <= whole <= n`, or the 8-value `tail`.
    let mut maxv = unsafe { _mm256_loadu_ps(tp) };
    for i in (0..whole).step_by(8) {
        maxv = _mm256_max_ps(maxv, unsafe { _mm256_loadu_ps(p.add(i)) });
    }
    let mut lanes = [0f32; 8];
    // SAFETY: 8 floats into `lanes`.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), maxv) };
    let max = _mm256_set1_ps(lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    // SAFETY (the loads and stores below): as above.
    let exp_at = |at: *mut f32| unsafe {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(at), max));
        _mm256_storeu_ps(at, e);
        e
    };
    let mut sumv = exp_at(tp);
    for i in (0..whole).step_by(8) {
        // SAFETY: `i + 8 <= whole`: inside `row`.
        sumv = _mm256_add_ps(sumv, exp_at(unsafe { p.add(i) }));
    }
    // SAFETY: 8 floats into `lanes`.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sumv) };
    let inv = 1.0 / lanes.iter().sum::<f32>();
    let inv_v = _mm256_set1_ps(inv);
    for i in (0..whole).step_by(8) {
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv_v)) };
    }
    for (i, &e) in (whole..n).zip(&tail) {
        // SAFETY: `i < n`.
        unsafe { *p.add(i) = e * inv };
    }
}
