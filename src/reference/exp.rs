//! `exp` over f32 slices, vectorised, for softmax and QuickGELU in the reference engine.
//!
//! Why not `f32::exp`: it is a scalar libm call (~2–4 ns), and the ViT-B/16 attack step needs
//! about 13 million of them per forward pass (attention probabilities and QuickGELU sigmoids);
//! measured on one AVX-512 core they cost more than the attention products themselves.
//!
//! The function is Cephes' `expf` (range reduction by ln 2 in two parts, degree-5 polynomial on
//! [−ln2/2, ln2/2]), written with plain IEEE adds and multiplies only, no fused multiply-add and
//! no table, so every build path (AVX-512, AVX2, the SSE2 baseline) gives bit-identical results.
//! Its error against the exactly rounded value is within 2 ulp over the whole f32 range (tested
//! below against f64 `exp`); results that are subnormal in f32 are rounded once, correctly to
//! within the same bound; inputs above ln(f32::MAX) give +∞, below −104 give 0, NaN stays NaN.

/// `1.5 · 2²³`: adding it rounds an f32 of magnitude below 2²² to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n · LN2_HIGH` is exact for |n| ≤ 2⁸ (Cephes).
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
/// Above this `exp` overflows f32; below `UNDERFLOW` it rounds to zero.
const OVERFLOW: f32 = 88.722_84;
const UNDERFLOW: f32 = -104.0;
/// Cephes' minimax coefficients of `(exp(r) − 1 − r) / r²` on [−ln2/2, ln2/2].
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // Cephes 5.0000001201e-1, which rounds to exactly 0.5 in f32
];

/// 2ⁿ as an f32 for `n` in [−126, 127], built from its exponent bits.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `exp(x)`, branch-free so that loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(UNDERFLOW, OVERFLOW);
    // n = round(x / ln 2), r = x − n·ln 2 (in two parts, so r keeps its low bits).
    let shifted = clamped * LOG2_E + ROUND_MAGIC;
    let n_float = shifted - ROUND_MAGIC;
    let n = shifted.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let r = clamped - n_float * LN2_HIGH - n_float * LN2_LOW;
    let poly = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5];
    let exp_r = poly * (r * r) + r + 1.0;
    // 2ⁿ in two factors so that n from −150 to 128 stays inside the normal exponent range; the
    // second product rounds once, also where the result is subnormal.
    let half = n >> 1;
    let value = exp_r * pow2(half) * pow2(n - half);
    let value = if x > OVERFLOW { f32::INFINITY } else { value };
    let value = if x < UNDERFLOW { 0.0 } else { value };
    if x.is_nan() {
        x
    } else {
        value
    }
}

/// `values[i] = f(values[i])`, compiled for the widest vector unit the CPU has (AVX-512, AVX2,
/// or the baseline). With an `f` built from [`exp`] and plain IEEE arithmetic (no `mul_add`), the
/// result is the same on every path; only the speed differs.
#[inline(always)]
pub fn map_in_place(values: &mut [f32], f: impl Fn(f32) -> f32) {
    zip_map_in_place(values, &[], |x, _| f(x))
}

/// `values[i] = f(values[i], other[i])` (`other` empty: `f(values[i], 0)`), dispatched like
/// [`map_in_place`].
#[inline(always)]
pub fn zip_map_in_place(values: &mut [f32], other: &[f32], f: impl Fn(f32, f32) -> f32) {
    assert!(
        other.is_empty() || other.len() == values.len(),
        "operands differ in length"
    );
    #[inline(always)]
    fn body(values: &mut [f32], other: &[f32], f: &impl Fn(f32, f32) -> f32) {
        if other.is_empty() {
            values.iter_mut().for_each(|x| *x = f(*x, 0.0));
        } else {
            values
                .iter_mut()
                .zip(other)
                .for_each(|(x, &y)| *x = f(*x, y));
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(values: &mut [f32], other: &[f32], f: &impl Fn(f32, f32) -> f32) {
            body(values, other, f)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(values: &mut [f32], other: &[f32], f: &impl Fn(f32, f32) -> f32) {
            body(values, other, f)
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { avx512(values, other, &f) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { avx2(values, other, &f) };
        }
    }
    body(values, other, &f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_of_the_exact_value_over_the_whole_range() {
        let mut worst = (0u32, 0.0f32);
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = -105.0 + 195.0 * i as f32 / steps as f32;
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            if want == 0.0 || want.is_infinite() {
                // Beyond the ends: the exactly rounded value, or the neighbouring subnormal.
                assert!(ulps(got, want) <= 1, "exp({x}) = {got}, want {want}");
                continue;
            }
            let e = ulps(got, want);
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn special_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::MIN_POSITIVE), 1.0);
    }

    #[test]
    fn vectorised_maps_match_the_scalar_function() {
        let mut values: Vec<f32> = (0..1000).map(|i| (i as f32 - 700.0) * 0.13).collect();
        let want: Vec<f32> = values.iter().map(|&x| exp(x - 1.5)).collect();
        map_in_place(&mut values, |x| exp(x - 1.5));
        assert_eq!(values, want);
        let other: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.1).collect();
        let want: Vec<f32> = values
            .iter()
            .zip(&other)
            .map(|(&d, &x)| d / (1.0 + exp(-1.702 * x)))
            .collect();
        zip_map_in_place(&mut values, &other, |d, x| d / (1.0 + exp(-1.702 * x)));
        assert_eq!(values, want);
    }
}
