//! `exp` on 16 lanes of AVX-512, for the CPU kernels that take many exponentials in a row: the
//! decode attention's softmax and the MLP's SiLU. libm's `expf` goes one value per call (1.8% of
//! a decode step at 4,000 positions in the softmax, 2% at any position in the SiLU).

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// `exp(x)` lane by lane: `2^n * exp(r)` with `n = round(x / ln 2)`, `r` the remainder
/// (|r| <= ln(2)/2, taken off in two parts for precision) and `exp(r)` its Taylor polynomial to
/// degree 7 (relative error below 1e-7, under f32's rounding); `scalef` applies `2^n`, giving 0
/// below about -104 and infinity above about 88.7, as `expf` does. NaN stays NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp16(x: __m512) -> __m512 {
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
    // Far-negative inputs would make `n` so large that `r` loses its precision; their
    // exponentials are 0 in f32 anyway. (`max` keeps a NaN in `x`: it returns its second operand
    // when either is NaN.)
    let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut e = _mm512_set1_ps(COEF[0]);
    for &c in &COEF[1..] {
        e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(e, k)
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
/// for as many elements as `out` holds; with AVX-512, 16 at a time through [`exp16`].
pub(crate) fn silu_mul_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len();
    let (gate, up) = (&gate[..n], &up[..n]);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512 F (checked just above); all three slices hold `n` values.
        return unsafe { silu_mul_avx512(gate, up, out) };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// SiLU times `up` against the scalar formula in f64, for every tail length, across the
    /// range where `exp` underflows and overflows, and with infinities and NaN.
    #[test]
    fn silu_mul_matches_the_formula() {
        for n in (1..=40).chain([8960]) {
            let gate: Vec<f32> = (0..n)
                .map(|i| ((i as f32 * 0.37).sin() * 120.0) + (i % 7) as f32 * 0.01)
                .collect();
            let up: Vec<f32> = (0..n).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
            let mut out = vec![0f32; n];
            silu_mul_into(&gate, &up, &mut out);
            for i in 0..n {
                let g = f64::from(gate[i]);
                let want = g / (1.0 + (-g).exp()) * f64::from(up[i]);
                let got = f64::from(out[i]);
                assert!(
                    (got - want).abs() <= 3e-7 * want.abs() + 1e-30,
                    "n {n}, {i}: silu({g}) * {}: {got} vs {want}",
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
        silu_mul_into(&gate, &[1.0; 7], &mut out);
        let scalar: Vec<f32> = gate.iter().map(|&g| g / (1.0 + (-g).exp())).collect();
        for (got, want) in out.iter().zip(&scalar) {
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{got} vs {want}"
            );
        }
    }
}
