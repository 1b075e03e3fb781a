//! Branch-free `exp` that the compiler can vectorize (libm's `expf` is a scalar call).
//! Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n put in the
//! exponent bits. Relative error about 2e-7 over the clamped range.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a rounding instruction.
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
pub fn exp(x_in: f32) -> f32 {
    let x = x_in.clamp(-87.0, 88.0);
    let rounded = x * LOG2E + ROUND;
    let n = rounded - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // n is the low bits of `rounded`'s mantissa; 2^n is n + 127 in the exponent field.
    let n_int = rounded.to_bits() as i32 - ROUND.to_bits() as i32;
    let y = e * f32::from_bits(((n_int + 127) << 23) as u32);
    // Exactly 0 below the range (masked attention scores are -inf): a tiny value here would
    // turn into subnormals downstream, which the FPU handles a hundred times slower.
    if x_in < -87.0 {
        0.0
    } else {
        y
    }
}

/// Natural log for x > 0 (Cephes logf): x = m 2^e with m in [sqrt(1/2), sqrt(2)), then a
/// polynomial in m - 1. Branch-free, so it vectorizes. Relative error about 1e-7.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000); // in [0.5, 1)
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    e -= small as i32;
    let f = if small { m + m - 1.0 } else { m - 1.0 };
    let z = f * f;
    let p = 7.037_683_6e-2f32;
    let p = p * f - 1.151_461_1e-1;
    let p = p * f + 1.167_699_9e-1;
    let p = p * f - 1.242_014_1e-1;
    let p = p * f + 1.424_932_3e-1;
    let p = p * f - 1.666_805_8e-1;
    let p = p * f + 2.000_071_5e-1;
    let p = p * f - 2.499_999_4e-1;
    let p = p * f + 3.333_333e-1;
    let ef = e as f32;
    let y = p * f * z + ef * LN2_LO - 0.5 * z;
    f + y + ef * LN2_HI
}

/// (cos, sin) of `2 pi u` for u in [0, 1): the turn is cut into quarter turns so the polynomials
/// (Cephes sinf/cosf) only see |a| <= pi/4.
#[inline(always)]
pub fn cos_sin_turn(u: f32) -> (f32, f32) {
    let quarters = u * 4.0;
    // The nearest quarter turn: after adding 1.5 * 2^23 it sits in the low mantissa bits (a
    // saturating `as i32` cast would keep the loop from vectorizing).
    let rounded = quarters + ROUND;
    let q = rounded.to_bits() & 3;
    let a = (quarters - (rounded - ROUND)) * std::f32::consts::FRAC_PI_2; // exact; |a| <= pi/4
    let z = a * a;
    let sin_a = a + a * z * (-1.666_665_5e-1 + z * (8.332_161e-3 + z * -1.951_529_6e-4));
    let cos_a = 1.0 - 0.5 * z + z * z * (4.166_664_6e-2 + z * (-1.388_731_6e-3 + z * 2.443_315_7e-5));
    // Rotate by q quarter turns without branches (the quadrant is random, so a branch would be
    // mispredicted most of the time): odd q swaps to (-sin, cos), q & 2 negates both.
    let odd = q & 1 == 1;
    let (c, s) = (if odd { -sin_a } else { cos_a }, if odd { cos_a } else { sin_a });
    let sign = (q & 2) << 30;
    (f32::from_bits(c.to_bits() ^ sign), f32::from_bits(s.to_bits() ^ sign))
}

/// Define `$name(args)` that runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has them.
macro_rules! dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if crate::kernels::simd::has_avx512() {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if crate::kernels::simd::has_avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    #[test]
    fn ln_and_cos_sin_are_accurate() {
        for i in 1..=100_000u32 {
            let x = i as f32 / 100_000.0;
            let err = (super::ln(x) as f64 - (x as f64).ln()).abs();
            assert!(err < 2e-7 * (x as f64).ln().abs().max(1.0), "ln({x})");
            let (c, s) = super::cos_sin_turn(x - 1e-5);
            let angle = std::f64::consts::TAU * (x - 1e-5) as f64;
            assert!((c as f64 - angle.cos()).abs() < 3e-7 && (s as f64 - angle.sin()).abs() < 3e-7, "u = {x}");
        }
    }

    #[test]
    fn exp_underflows_to_exact_zero() {
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-100.0), 0.0);
    }

    #[test]
    fn exp_is_accurate() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((super::exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 5e-7, "x = {x}: rel {rel}");
            x += 0.173;
        }
    }
}
