//! The tile kernels of [`super::x86`] for x86 CPUs with AVX2 but not AVX-512 VNNI (AMD before Zen
//! 4, Intel's client cores since Alder Lake: most laptops): the same tiles, each 64-byte group of
//! 16 rows taken as two halves of 8 rows, one 256-bit register each.
//!
//! Without `vpdpbusd`, `vpmaddubsw` multiplies pairs of unsigned weight bytes by signed activation
//! bytes into 16-bit sums, and `vpmaddwd` widens those to 32 bits, multiplied by the sub-blocks'
//! integer scales on the way where the format has them. The 16-bit sums saturate past 32,767, so
//! each kernel says why its own cannot reach that; everything stays in exact integer sums up to the
//! per-superblock float scales, as in the AVX-512 kernels. The activations' Q8_K and Q8_0
//! quantizers are here too, to the bit ggml's (candle's scalar ones took 3.1% of a 512-token
//! prefill on a 2-core Zen 3; these 1.3%).

use core::arch::x86_64::*;

use super::x86::{prefetch_step, prefetch_target, Q4K_LINES, Q6K_LINES, Q80_LINES};
use super::{ActQ80, ActQ8K, OutPtr, ScalesMins, TileQ4K, TileQ6K, TileQ80, QK, TILE_ROWS};

/// Weight rows in one 256-bit register: half a tile.
const HALF: usize = TILE_ROWS / 2;

/// The four quants at `at` of an activation superblock, in every 32-bit lane.
#[inline(always)]
unsafe fn quads(qs: &[i8; QK], at: usize) -> __m256i {
    // SAFETY: the caller keeps `at + 4 <= 256`.
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(qs.as_ptr().add(at).cast::<i32>())) }
}

/// `[b0, b0, b1, b1, .., b7, b7]`: the byte order that doubles eight bytes into 16 by `vpshufb`.
#[inline(always)]
unsafe fn doubled(p: *const u8) -> __m128i {
    // SAFETY: the caller passes 8 readable bytes; SSSE3 is part of AVX2.
    unsafe {
        let dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        _mm_shuffle_epi8(_mm_loadl_epi64(p.cast()), dup)
    }
}

/// Eight unsigned scales (a half tile's rows), each in both 16-bit halves of its row's 32-bit
/// lane: the second operand of a `vpmaddwd` that scales a row's two 16-bit sums alike.
#[inline(always)]
unsafe fn scales_u8(p: &[u8; TILE_ROWS], half: usize) -> __m256i {
    // SAFETY: `half < 2`: 8 bytes from `8 half`.
    unsafe { _mm256_cvtepu8_epi16(doubled(p.as_ptr().add(half * HALF))) }
}

/// [`scales_u8`] for signed scales.
#[inline(always)]
unsafe fn scales_i8(p: &[i8; TILE_ROWS], half: usize) -> __m256i {
    // SAFETY: `half < 2`: 8 bytes from `8 half`.
    unsafe { _mm256_cvtepi8_epi16(doubled(p.as_ptr().add(half * HALF).cast())) }
}

/// The 32 bytes of half `half` of the 64-byte group at byte `at`.
#[inline(always)]
unsafe fn half_group(p: *const u8, at: usize, half: usize) -> __m256i {
    // SAFETY: the caller keeps the group inside the tile.
    unsafe { _mm256_loadu_si256(p.add(at + 32 * half).cast()) }
}

/// Stores the accumulated outputs of rows `r0..r0 + M`, columns `16 col..16 col + 16`.
#[inline(always)]
unsafe fn store<const M: usize>(
    acc: &[[__m256; 2]; M],
    out: OutPtr,
    r0: usize,
    n: usize,
    col: usize,
) {
    for (m, halves) in acc.iter().enumerate() {
        for (h, v) in halves.iter().enumerate() {
            // SAFETY: row `r0 + m` and these 16 columns are the calling unit's own.
            unsafe { _mm256_storeu_ps(out.0.add((r0 + m) * n + col * TILE_ROWS + h * HALF), *v) };
        }
    }
}

/// A Q4_K tile's scales and mins unpacked, as [`super::x86::unpack_scales_mins`] does with
/// 64-byte vectors, here with two 32-byte halves of each.
#[inline(always)]
unsafe fn unpack_scales_mins(p: &[u8; 192]) -> ScalesMins {
    let low4 = _mm256_set1_epi8(0x0F);
    let bits45 = _mm256_set1_epi8(0x30);
    let join = |a, b| _mm256_or_si256(a, _mm256_and_si256(b, bits45));
    let mut parts = [_mm256_setzero_si256(); 8];
    for half in 0..2 {
        // SAFETY: 192 readable bytes, read 32 at a time at offsets below 192.
        let (ls, lm, h) = unsafe {
            (
                _mm256_loadu_si256(p.as_ptr().add(32 * half).cast()),
                _mm256_loadu_si256(p.as_ptr().add(64 + 32 * half).cast()),
                _mm256_loadu_si256(p.as_ptr().add(128 + 32 * half).cast()),
            )
        };
        parts[half] = join(_mm256_and_si256(ls, low4), _mm256_slli_epi16::<4>(h));
        parts[2 + half] = join(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ls), low4),
            _mm256_slli_epi16::<2>(h),
        );
        parts[4 + half] = join(_mm256_and_si256(lm, low4), h);
        parts[6 + half] = join(
            _mm256_and_si256(_mm256_srli_epi16::<4>(lm), low4),
            _mm256_srli_epi16::<2>(h),
        );
    }
    // SAFETY: eight 32-byte vectors are the 256 bytes of `ScalesMins`, in its order.
    unsafe { std::mem::transmute::<[__m256i; 8], ScalesMins>(parts) }
}

/// [`unpack_scales_mins`] on its own, for tests.
#[cfg(test)]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unpack_scales_mins_alone(p: &[u8; 192]) -> ScalesMins {
    // SAFETY: the features it needs are enabled here.
    unsafe { unpack_scales_mins(p) }
}

/// `M` activation rows against one column of Q4_K tiles (16 outputs per row). A 32-value
/// sub-block's eight `vpmaddubsw` each give at most `2 * 15 * 128` per lane, 30,720 in all: its
/// 16-bit sums cannot saturate, and `vpmaddwd` by its 6-bit scale widens them.
// Indexed loops over the accumulators' halves: the kernel's register layout reads plainest so.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k<const M: usize, const STREAM: bool>(
    column: &[TileQ4K],
    end: *const u8,
    acts: &[ActQ8K],
    kb: usize,
    out: OutPtr,
    r0: usize,
    n: usize,
    col: usize,
) {
    let nib = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    for (b, t) in column.iter().enumerate() {
        let a: [&ActQ8K; M] = std::array::from_fn(|m| &acts[m * kb + b]);
        let ahead = prefetch_target(t, end);
        // SAFETY: AVX2, enabled on this function.
        let sm = unsafe { unpack_scales_mins(&t.scales_mins) };
        let qs = t.qs.as_ptr();
        for half in 0..2 {
            let mut sums = [_mm256_setzero_si256(); M];
            for sub in 0..8 {
                // SAFETY: prefetches only.
                unsafe { prefetch_step::<Q4K_LINES, 16, STREAM, false>(ahead, 8 * half + sub) };
                let mut pairs = [_mm256_setzero_si256(); M];
                for g in 4 * sub..4 * sub + 4 {
                    // SAFETY: group g < 32, inside `qs`.
                    let w = unsafe { half_group(qs, 64 * g, half) };
                    let lo = _mm256_and_si256(w, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), nib);
                    for m in 0..M {
                        // SAFETY: offsets < 256.
                        let (qa, qb) =
                            unsafe { (quads(&a[m].qs, 8 * g), quads(&a[m].qs, 8 * g + 4)) };
                        pairs[m] = _mm256_add_epi16(pairs[m], _mm256_maddubs_epi16(lo, qa));
                        pairs[m] = _mm256_add_epi16(pairs[m], _mm256_maddubs_epi16(hi, qb));
                    }
                }
                // SAFETY: sub-block < 8.
                let sc = unsafe { scales_u8(&sm.scales[sub], half) };
                for m in 0..M {
                    sums[m] = _mm256_add_epi32(sums[m], _mm256_madd_epi16(pairs[m], sc));
                }
            }
            // The mins' sums: two sub-blocks per `vpmaddwd` (below 8 * 63 * 4096).
            let mut mins = [_mm256_setzero_si256(); M];
            for pair in 0..4 {
                // SAFETY: 16 bytes of the 32 of `mins[pair]`; the activations' two i16 sums at
                // `2 pair` < 8.
                unsafe {
                    let mn = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                        sm.mins[pair].as_ptr().add(2 * HALF * half).cast(),
                    ));
                    for m in 0..M {
                        let bsums = std::ptr::read_unaligned(
                            a[m].bsum32.as_ptr().add(2 * pair).cast::<i32>(),
                        );
                        let prod = _mm256_madd_epi16(mn, _mm256_set1_epi32(bsums));
                        mins[m] = _mm256_add_epi32(mins[m], prod);
                    }
                }
            }
            // SAFETY: 8 f16 of 16 each.
            let (d, dmin) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(HALF * half).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(t.dmin.as_ptr().add(HALF * half).cast())),
                )
            };
            for m in 0..M {
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[m]), d);
                let v = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mins[m]), dmin, v);
                acc[m][half] = _mm256_fmadd_ps(v, _mm256_set1_ps(a[m].d), acc[m][half]);
            }
        }
    }
    // SAFETY: the unit's own outputs.
    unsafe { store(&acc, out, r0, n, col) };
}

/// `M` activation rows against one column of Q6_K tiles. The 6-bit values go into `vpmaddubsw`
/// unsigned: two of them give at most `4 * 63 * 128` per lane, 32,256, so each 16-value sub-block
/// is widened in two halves, and its start (`-32` times the activations' sum,
/// [`ActQ8K::q6k_start`], which makes the sum one over `q - 32`) is scaled by a third `vpmaddwd`,
/// as half of it in each 16-bit half of a lane.
// Indexed loops over the accumulators' halves: the kernel's register layout reads plainest so.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q6k<const M: usize, const STREAM: bool>(
    column: &[TileQ6K],
    end: *const u8,
    acts: &[ActQ8K],
    kb: usize,
    out: OutPtr,
    r0: usize,
    n: usize,
    col: usize,
) {
    let (nib, top) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    // `(low & 0x0F) | (high & 0x30)`.
    let join = |low, high| _mm256_or_si256(_mm256_and_si256(low, nib), _mm256_and_si256(high, top));
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    for (b, t) in column.iter().enumerate() {
        let a: [&ActQ8K; M] = std::array::from_fn(|m| &acts[m * kb + b]);
        // Each start halved (exact: a multiple of 32) into both 16-bit halves of a lane.
        let starts: [[i32; 16]; M] = std::array::from_fn(|m| {
            a[m].q6k_start.map(|s| {
                let h = (s / 2) as u32 & 0xFFFF;
                (h | h << 16) as i32
            })
        });
        let ahead = prefetch_target(t, end);
        let (ql, qh) = (t.ql.as_ptr(), t.qh.as_ptr());
        for half in 0..2 {
            let mut sums = [_mm256_setzero_si256(); M];
            for g in 0..16 {
                // SAFETY: prefetches only.
                unsafe { prefetch_step::<Q6K_LINES, 32, STREAM, false>(ahead, 16 * half + g) };
                // SAFETY: group g < 16 of `qh`, groups 2g, 2g + 1 < 32 of `ql`.
                let (h, l0, l1) = unsafe {
                    (
                        half_group(qh, 64 * g, half),
                        half_group(ql, 128 * g, half),
                        half_group(ql, 128 * g + 64, half),
                    )
                };
                // Values 16g + j, + 4, + 8, + 12 (j < 4): high bit pairs 0, 1, 2, 3 of `h`,
                // moved to bits 4 and 5 (16-bit shifts: the masks drop what crosses a byte).
                let v0 = join(l0, _mm256_slli_epi16::<4>(h));
                let v1 = join(_mm256_srli_epi16::<4>(l0), _mm256_slli_epi16::<2>(h));
                let v2 = join(l1, h);
                let v3 = join(_mm256_srli_epi16::<4>(l1), _mm256_srli_epi16::<2>(h));
                // SAFETY: sub-block g < 16.
                let sc = unsafe { scales_i8(&t.scales[g], half) };
                for m in 0..M {
                    let q = 16 * g;
                    // SAFETY: offsets < 256.
                    let (p01, p23) = unsafe {
                        (
                            _mm256_add_epi16(
                                _mm256_maddubs_epi16(v0, quads(&a[m].qs, q)),
                                _mm256_maddubs_epi16(v1, quads(&a[m].qs, q + 4)),
                            ),
                            _mm256_add_epi16(
                                _mm256_maddubs_epi16(v2, quads(&a[m].qs, q + 8)),
                                _mm256_maddubs_epi16(v3, quads(&a[m].qs, q + 12)),
                            ),
                        )
                    };
                    let start = _mm256_madd_epi16(_mm256_set1_epi32(starts[m][g]), sc);
                    let s =
                        _mm256_add_epi32(_mm256_madd_epi16(p01, sc), _mm256_madd_epi16(p23, sc));
                    sums[m] = _mm256_add_epi32(sums[m], _mm256_add_epi32(s, start));
                }
            }
            // SAFETY: 8 f32 of 16.
            let d = unsafe { _mm256_loadu_ps(t.d.as_ptr().add(HALF * half)) };
            for m in 0..M {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(a[m].d));
                acc[m][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[m]), scale, acc[m][half]);
            }
        }
    }
    // SAFETY: the unit's own outputs.
    unsafe { store(&acc, out, r0, n, col) };
}

/// `M` activation rows against one column of Q8_0 tiles. The tiles hold `q + 128`; flipped back to
/// signed, each weight's magnitude goes into `vpmaddubsw` and its sign onto the activation
/// (`vpsignb`, as ggml's AVX2 dot product does): at most `2 * 128 * 127` per lane, so the block
/// sums need no start (the AVX-512 kernel's [`ActQ80::start`] takes the `+ 128` out instead).
// Indexed loops over the accumulators' halves: the kernel's register layout reads plainest so.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q80<const M: usize, const STREAM: bool>(
    column: &[TileQ80],
    end: *const u8,
    acts: &[ActQ80],
    kb: usize,
    out: OutPtr,
    r0: usize,
    n: usize,
    col: usize,
) {
    let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    for (b, t) in column.iter().enumerate() {
        let a: [&ActQ80; M] = std::array::from_fn(|m| &acts[m * kb + b]);
        let ahead = prefetch_target(t, end);
        let qs = t.qs.as_ptr();
        for half in 0..2 {
            for blk in 0..8 {
                // SAFETY: prefetches only.
                unsafe { prefetch_step::<Q80_LINES, 16, STREAM, false>(ahead, 8 * half + blk) };
                let mut s = [_mm256_setzero_si256(); M];
                for j in 0..8 {
                    let g = 8 * blk + j;
                    // SAFETY: group g < 64, inside `qs`.
                    let w = _mm256_xor_si256(unsafe { half_group(qs, 64 * g, half) }, flip);
                    let magnitude = _mm256_abs_epi8(w);
                    for m in 0..M {
                        // SAFETY: offset < 256.
                        let signed = _mm256_sign_epi8(unsafe { quads(&a[m].qs, 4 * g) }, w);
                        let p = _mm256_maddubs_epi16(magnitude, signed);
                        s[m] = _mm256_add_epi32(s[m], _mm256_madd_epi16(p, ones));
                    }
                }
                // SAFETY: 8 f16 scales of 16.
                let dw = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(t.d[blk].as_ptr().add(HALF * half).cast()))
                };
                for m in 0..M {
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(a[m].d[blk]));
                    acc[m][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m]), scale, acc[m][half]);
                }
            }
        }
    }
    // SAFETY: the unit's own outputs.
    unsafe { store(&acc, out, r0, n, col) };
}

/// `|v|` lane by lane.
#[inline(always)]
fn abs8(v: __m256) -> __m256 {
    // SAFETY: no memory access; the callers have AVX enabled.
    unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), v) }
}

/// The largest of the eight lanes of `v`.
#[inline(always)]
fn max_lane(v: __m256) -> f32 {
    // SAFETY: no memory access; the callers have AVX enabled.
    unsafe {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        _mm_cvtss_f32(m)
    }
}

/// `y` (16 values, two vectors) rounded as `f32::round` does (half away from zero) and clamped
/// to i8, into the first 16 bytes of `dst`; returns their sum. As the AVX-512 `store_rounded`.
#[inline(always)]
unsafe fn store_rounded16(y: [__m256; 2], dst: &mut [i8]) -> i32 {
    assert!(dst.len() >= 16);
    // SAFETY: the callers have AVX2 enabled; `dst` holds 16 bytes (asserted).
    unsafe {
        let q = y.map(|y| {
            // The integer part, plus one away from zero from a half up.
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(abs8(_mm256_sub_ps(y, t)), _mm256_set1_ps(0.5));
            let away = _mm256_or_ps(_mm256_and_ps(y, _mm256_set1_ps(-0.0)), _mm256_set1_ps(1.0));
            let r = _mm256_add_ps(t, _mm256_and_ps(up, away));
            let r = _mm256_min_ps(
                _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
                _mm256_set1_ps(127.0),
            );
            _mm256_cvtps_epi32(r)
        });
        // 32-bit to 16-bit lanes ([a0-3 b0-3 | a4-7 b4-7]), back in order, then to bytes.
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
        let b = _mm256_packs_epi16(w, w);
        _mm_storel_epi64(dst.as_mut_ptr().cast(), _mm256_castsi256_si128(b));
        _mm_storel_epi64(
            dst.as_mut_ptr().add(8).cast(),
            _mm256_extracti128_si256::<1>(b),
        );
        let s = _mm256_add_epi32(q[0], q[1]);
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_hadd_epi32(s, s);
        let s = _mm_hadd_epi32(s, s);
        _mm_cvtsi128_si32(s)
    }
}

/// One Q8_K activation block: the AVX-512 [`super::x86::quantize_q8k`] on eight lanes, to the
/// bit what ggml's `quantize_row_q8_K` gives (scale by `-127 / x`, `x` the first value of largest
/// magnitude; round half away from zero; clamp to i8), with the sums of 16 and 32 quants.
///
/// # Safety
/// The CPU has AVX2 and FMA ([`super::Isa::Avx2`]); `x` holds 256 values.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_q8k(x: &[f32], a: &mut ActQ8K) {
    assert_eq!(x.len(), QK);
    let p = x.as_ptr();
    // SAFETY: `x` holds 32 vectors of 8 values (asserted).
    let v = |i: usize| unsafe { _mm256_loadu_ps(p.add(8 * i)) };
    let mut largest = _mm256_setzero_ps();
    for i in 0..32 {
        largest = _mm256_max_ps(largest, abs8(v(i)));
    }
    let amax = max_lane(largest);
    // (NaNs aside, as in the AVX-512 quantizer.)
    let first = (amax > 0.0)
        .then(|| {
            (0..32).find_map(|i| {
                let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(abs8(v(i)), _mm256_set1_ps(amax));
                let at = _mm256_movemask_ps(eq);
                (at != 0).then(|| x[8 * i + at.trailing_zeros() as usize])
            })
        })
        .flatten();
    let Some(max) = first else {
        a.clear();
        return;
    };
    let iscale = -127f32 / max;
    let scale = _mm256_set1_ps(iscale);
    for i in 0..16 {
        let y = [
            _mm256_mul_ps(scale, v(2 * i)),
            _mm256_mul_ps(scale, v(2 * i + 1)),
        ];
        // SAFETY: the CPU has AVX2, as for this function.
        let sum = unsafe { store_rounded16(y, &mut a.qs[16 * i..]) };
        a.q6k_start[i] = -32 * sum;
    }
    a.finish(iscale);
}

/// Eight Q8_0 activation blocks: the AVX-512 [`super::x86::quantize_q80`] on eight lanes, to the
/// bit what candle's `BlockQ8_0::from_float` gives.
///
/// # Safety
/// As for [`quantize_q8k`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_q80(x: &[f32], a: &mut ActQ80) {
    assert_eq!(x.len(), QK);
    let p = x.as_ptr();
    for b in 0..8 {
        // SAFETY: `x` holds 256 values (asserted).
        let v: [__m256; 4] =
            std::array::from_fn(|j| unsafe { _mm256_loadu_ps(p.add(32 * b + 8 * j)) });
        let m = _mm256_max_ps(
            _mm256_max_ps(abs8(v[0]), abs8(v[1])),
            _mm256_max_ps(abs8(v[2]), abs8(v[3])),
        );
        let d = max_lane(m) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let scale = _mm256_set1_ps(id);
        let mut sum = 0;
        for i in 0..2 {
            let y = [
                _mm256_mul_ps(v[2 * i], scale),
                _mm256_mul_ps(v[2 * i + 1], scale),
            ];
            // SAFETY: the CPU has AVX2, as for this function.
            sum += unsafe { store_rounded16(y, &mut a.qs[32 * b + 16 * i..]) };
        }
        a.d[b] = half::f16::from_f32(d).to_f32();
        a.start[b] = -128 * sum;
    }
}
