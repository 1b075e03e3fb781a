//! Uniform k-bit fake quantization: clamp to [min, max], snap to one of 2^bits levels, map back.

use super::math::dispatch;
use super::pool::DisjointWrites;
use super::team;
use crate::error::{EllmError, Result};

pub fn check_bits(bits: u32) -> Result<()> {
    if (1..=16).contains(&bits) {
        Ok(())
    } else {
        Err(EllmError::Value(format!("bits must be in 1..=16, got {bits}")))
    }
}

/// The steps between the lowest and the highest of `bits`-bit levels: 2^bits - 1.
pub fn levels(bits: u32) -> f32 {
    ((1u32 << bits) - 1) as f32
}

/// One value. Rounds half to even, as NumPy does, so both backends agree on ties.
#[inline(always)]
pub fn quantize_scalar(x: f32, levels: f32, min_val: f32, max_val: f32) -> f32 {
    let range = max_val - min_val;
    if range <= 0.0 {
        return min_val;
    }
    let clamped = x.clamp(min_val, max_val);
    ((clamped - min_val) / range * levels).round_ties_even() / levels * range + min_val
}

pub fn quantize(x: &[f32], bits: u32, min_val: f32, max_val: f32, out: &mut [f32]) -> Result<()> {
    check_bits(bits)?;
    if min_val.is_nan() || max_val.is_nan() || min_val > max_val {
        return Err(EllmError::Value(format!("min_val ({min_val}) must not exceed max_val ({max_val})")));
    }
    let levels = levels(bits);
    assert_eq!(x.len(), out.len());
    let dst = DisjointWrites(out.as_mut_ptr());
    team::run(&|part, parts| {
        let share = team::share(x.len(), 16, part, parts);
        // SAFETY: each part writes its own share of `out`.
        let out = unsafe { dst.slice(share.start, share.len()) };
        quantize_slice(&x[share], levels, min_val, max_val, out);
    });
    Ok(())
}

dispatch! {
    /// `quantize_scalar` over a slice. The vector path matters beyond speed of the loop:
    /// without SSE4.1 `round_ties_even` is a library call per element.
    pub fn quantize_slice(x: &[f32], levels: f32, min_val: f32, max_val: f32, out: &mut [f32]) {
        if (min_val, max_val) == (0.0, 1.0) {
            // The optical DAC and ADC range: with the bounds constant, the compiler drops the
            // division by the range (exactly 1), one of the loop's two divisions.
            for (o, &v) in out.iter_mut().zip(x) {
                *o = quantize_scalar(v, levels, 0.0, 1.0);
            }
            return;
        }
        for (o, &v) in out.iter_mut().zip(x) {
            *o = quantize_scalar(v, levels, min_val, max_val);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_bits_on_unit_range() {
        let mut out = vec![0.0; 5];
        quantize(&[-1.0, 0.1, 0.2, 0.5, 2.0], 2, 0.0, 1.0, &mut out).unwrap();
        // levels 0, 1/3, 2/3, 1; 0.5 * 3 = 1.5 rounds to even 2.
        assert_eq!(out, vec![0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]);
    }

    #[test]
    fn bits_out_of_range() {
        let mut out = vec![0.0; 1];
        assert!(quantize(&[0.0], 0, 0.0, 1.0, &mut out).is_err());
        assert!(quantize(&[0.0], 17, 0.0, 1.0, &mut out).is_err());
    }
}
