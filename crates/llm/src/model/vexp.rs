//! `exp` on 16 lanes of AVX-512 or 8 of AVX2, for the CPU kernels that take many exponentials in
//! a row: the decode attention's softmax and the MLP's SiLU. libm's `expf` goes one value per call
//! (1.8% of a decode step at 4,000 positions in the softmax, 2% at any position in the SiLU).

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// `exp(r)`'s Taylor polynomial to degree 7, highest power first (Horner's order).
#[cfg(target_arch = "x86_64")]
const COEF: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];
/// `ln 2` in two parts, the first with trailing zero bits, so `x - n ln 2` loses no precision.
#[cfg(target_arch = "x86_64")]
const LN2_HI: f32 = 0.693_145_75;
#[cfg(target_arch = "x86_64")]
const LN2_LO: f32 = 1.428_606_8e-6;

/// `exp(x)` lane by lane: `2^n * exp(r)` with `n = round(x / ln 2)`, `r` the remainder
/// (|r| <= ln(2)/2, taken off in two parts for precision) and `exp(r)` its Taylor polynomial to
/// degree 7 (relative error below 1e-7, under f32's rounding); `scalef` applies `2^n`, giving 0
/// below about -104 and infinity above about 88.7, as `expf` does. NaN stays NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp16(x: __m512) -> __m512 {
    // Far-negative inputs would make `n` so large that `r` loses its precision; their
    // exponentials are 0 in f32 anyway. (`max` keeps a NaN in `x`: it returns its second operand
    // when either is NaN.)
    let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_LO), r);
    let mut e = _mm512_set1_ps(COEF[0]);
    for &c in &COEF[1..] {
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(e, k)
}

/// [`exp16`] on the eight lanes of AVX2, which has no `scalef`: `2^n` goes into the exponent
/// bits of two factors, `2^(n/2)` and `2^(n - n/2)`, each a normal float for every `n` the
/// clamped input gives (-150 to 128), so their product rounds to 0, a subnormal or infinity
/// exactly where `scalef` (and `expf`) does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp8(x: __m256) -> __m256 {
    // As in `exp16`, and above 88.8 (`n` = 128) the product is infinite anyway. (`max` and
    // `min` return their second operand, `x`, when it is NaN.)
    let x = _mm256_min_ps(
        _mm256_set1_ps(88.8),
        _mm256_max_ps(_mm256_set1_ps(-104.0), x),
    );
    let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_LO), r);
    let mut e = _mm256_set1_ps(COEF[0]);
    for &c in &COEF[1..] {
        e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(c));
    }
    let n = _mm256_cvtps_epi32(k);
    let half = _mm256_srai_epi32::<1>(n);
    let pow2 = |m: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            m,
            _mm256_set1_epi32(127),
        )))
    };
    _mm256_mul_ps(
        _mm256_mul_ps(e, pow2(half)),
        pow2(_mm256_sub_epi32(n, half)),
    )
}

/// Whether this CPU has AVX2 and FMA, which [`exp8`] needs.
pub(crate) fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The lanes of a 16-wide step at element `i` of `n` that are inside: all 16, the tail's, or
/// none past the end.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lanes_from(i: usize, n: usize) -> __mmask16 {
    if i + 16 <= n {
        0xFFFF
    } else {
        (1u16 << n.saturating_sub(i)) - 1
    }
}

/// Whether this CPU has AVX-512 F, which [`exp16`] and the decode attention's kernels need.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]` (candle's formula)
/// for as many elements as `out` holds; with AVX-512, 16 at a time through [`exp16`]; with AVX2,
/// 8 at a time through [`exp8`].
pub(crate) fn silu_mul_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len();
    let (gate, up) = (&gate[..n], &up[..n]);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512 F (checked just above); all three slices hold `n` values.
        return unsafe { silu_mul_avx512(gate, up, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        // SAFETY: AVX2 and FMA (checked just above); all three slices hold `n` values.
        return unsafe { silu_mul_avx2(gate, up, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len();
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        let m = lanes_from(i, n);
        // SAFETY: lanes at or past `n` are masked off; the slices hold `n` values.
        unsafe {
            let g = _mm512_maskz_loadu_ps(m, gate.as_ptr().add(i));
            let u = _mm512_maskz_loadu_ps(m, up.as_ptr().add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let v = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len();
    let whole = n / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let silu_mul = |g: __m256, u: __m256| {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u)
    };
    for i in (0..whole).step_by(8) {
        // SAFETY: `i + 8 <= n`: inside all three slices.
        unsafe {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), silu_mul(g, u));
        }
    }
    if whole < n {
        // The tail through a padded vector, so it gets the same numbers as the rest.
        let (mut g, mut u, mut o) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        g[..n - whole].copy_from_slice(&gate[whole..]);
        u[..n - whole].copy_from_slice(&up[whole..]);
        // SAFETY: 8 values each.
        unsafe {
            let v = silu_mul(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
            _mm256_storeu_ps(o.as_mut_ptr(), v);
        }
        out[whole..].copy_from_slice(&o[..n - whole]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type SiluMul = fn(&[f32], &[f32], &mut [f32]);

    /// The dispatched SiLU and, where this CPU runs it, the AVX2 one (which an AVX-512 CPU's
    /// dispatch skips).
    fn silu_kernels() -> Vec<(&'static str, SiluMul)> {
        let mut kernels: Vec<(&'static str, SiluMul)> = vec![("dispatched", silu_mul_into)];
        #[cfg(target_arch = "x86_64")]
        if avx2_available() {
            // SAFETY: AVX2 and FMA (checked just above); callers pass equal lengths.
            kernels.push(("avx2", |g, u, o| unsafe { silu_mul_avx2(g, u, o) }));
        }
        kernels
    }

    /// SiLU times `up` against the scalar formula in f64, for every tail length, across the
    /// range where `exp` underflows and overflows, and with infinities and NaN.
    #[test]
    fn silu_mul_matches_the_formula() {
        for (kernel, silu_mul) in silu_kernels() {
            for n in (1..=40).chain([8960]) {
                let gate: Vec<f32> = (0..n)
                    .map(|i| ((i as f32 * 0.37).sin() * 120.0) + (i % 7) as f32 * 0.01)
                    .collect();
                let up: Vec<f32> = (0..n).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
                let mut out = vec![0f32; n];
                silu_mul(&gate, &up, &mut out);
                for i in 0..n {
                    let g = f64::from(gate[i]);
                    let want = g / (1.0 + (-g).exp()) * f64::from(up[i]);
                    let got = f64::from(out[i]);
                    assert!(
                        (got - want).abs() <= 3e-7 * want.abs() + 1e-30,
                        "{kernel}: n {n}, {i}: silu({g}) * {}: {got} vs {want}",
                        up[i]
                    );
                }
            }
            let gate = [
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                0.0,
                -0.0,
                100.0,
                -100.0,
            ];
            let mut out = [0f32; 7];
            silu_mul(&gate, &[1.0; 7], &mut out);
            let scalar: Vec<f32> = gate.iter().map(|&g| g / (1.0 + (-g).exp())).collect();
            for (got, want) in out.iter().zip(&scalar) {
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{kernel}: {got} vs {want}"
                );
            }
        }
    }

    /// [`exp8`] against f64's `exp` rounded to f32 over its whole range, the subnormal results
    /// and both overflows included: within 2 units in the last place where the result is normal,
    /// and the same 0, infinity or NaN where `expf` gives one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp8_matches_exp_over_its_range() {
        if !avx2_available() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut xs: Vec<f32> = (0..200_000).map(|i| -110.0 + i as f32 * 0.001).collect();
        xs.extend([
            88.72,
            88.73,
            89.0,
            1e6,
            -1e6,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        xs.resize(xs.len().div_ceil(8) * 8, 0.0);
        for chunk in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA (checked above); 8 values in and out.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(chunk.as_ptr()))) };
            for (&x, &g) in chunk.iter().zip(&got) {
                let want = f64::from(x).exp() as f32;
                if want.is_nan() || !want.is_normal() {
                    let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
                    // A subnormal may round differently by a unit of its own.
                    let near = want.is_finite() && (g - want).abs() <= 2.0 * f32::from_bits(1);
                    assert!(same || near, "exp({x}): {g} vs {want}");
                } else {
                    let ulps = (g.to_bits() as i64 - want.to_bits() as i64).abs();
                    assert!(ulps <= 2, "exp({x}): {g} vs {want} ({ulps} ulps)");
                }
            }
        }
    }
}
