//! Rotary position embedding (Su et al., 2021) in Hugging Face's "rotate half" layout: the
//! pair rotated together is (x[i], x[i + d/2]).

use rayon::prelude::*;

use super::pool;

use crate::error::{EllmError, Result};

/// Hugging Face `rope_scaling` types we implement.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies scaled alike).
    Linear {
        factor: f64,
    },
    /// Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Each frequency divided by its own factor: llama.cpp's `rope_freqs` tensor, which is how
    /// its converter writes Llama 3 scaling into a GGUF file.
    FreqFactors(Vec<f64>),
}

impl RopeScaling {
    /// From the flat form the Python side passes: kind "none", "linear" or "llama3" with
    /// [factor, low_freq_factor, high_freq_factor, original_max_position_embeddings], or
    /// "freq_factors" with one factor per frequency.
    pub fn from_parts(kind: &str, p: &[f64]) -> Result<Self> {
        let need = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(EllmError::Value(format!("rope scaling {kind:?} takes {n} parameters, got {}", p.len())))
            }
        };
        Ok(match kind {
            "none" => RopeScaling::None,
            "linear" => {
                need(4)?;
                RopeScaling::Linear { factor: p[0] }
            }
            "llama3" => {
                need(4)?;
                RopeScaling::Llama3 {
                    factor: p[0],
                    low_freq_factor: p[1],
                    high_freq_factor: p[2],
                    original_max_position_embeddings: p[3],
                }
            }
            "freq_factors" => RopeScaling::FreqFactors(p.to_vec()),
            other => return Err(EllmError::Value(format!("unsupported rope scaling {other:?}"))),
        })
    }
}

/// The `head_dim / 2` rotation frequencies, after scaling.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Result<Vec<f32>> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(EllmError::Value(format!("rope needs an even head_dim, got {head_dim}")));
    }
    if theta.is_nan() || theta <= 0.0 {
        return Err(EllmError::Value(format!("rope theta must be positive, got {theta}")));
    }
    let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    let scaled: Vec<f64> = match scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::FreqFactors(factors) => {
            if factors.len() != base.len() {
                return Err(EllmError::Value(format!(
                    "rope frequency factors: {} given for {} frequencies (head_dim {head_dim})",
                    factors.len(),
                    base.len()
                )));
            }
            base.iter().zip(factors).map(|(f, s)| f / s).collect()
        }
        &RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    Ok(scaled.into_iter().map(|f| f as f32).collect())
}

/// cos and sin of every (position, frequency) angle, `[positions.len(), inv_freq.len()]` each.
/// The angle is formed in f32 as Hugging Face does, then its cos and sin taken exactly.
pub fn cos_sin_table(positions: &[usize], inv_freq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len().max(1);
    let mut cos = vec![0.0f32; positions.len() * inv_freq.len()];
    let mut sin = vec![0.0f32; positions.len() * inv_freq.len()];
    pool::install(|| {
        cos.par_chunks_mut(half).zip(sin.par_chunks_mut(half)).zip(positions.par_iter()).for_each(|((c, s), &pos)| {
            for ((c, s), &f) in c.iter_mut().zip(s.iter_mut()).zip(inv_freq) {
                let (sn, cs) = ((pos as f32 * f) as f64).sin_cos();
                *c = cs as f32;
                *s = sn as f32;
            }
        })
    });
    (cos, sin)
}

/// Rotate one head vector in place with one row of the cos/sin table.
#[inline]
pub fn rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (lo, hi) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
}

/// x: `[seq, n_heads, head_dim]`, rotated in place; token s sits at `positions[s]`.
pub fn rope(x: &mut [f32], positions: &[usize], n_heads: usize, head_dim: usize, inv_freq: &[f32]) {
    assert_eq!(x.len(), positions.len() * n_heads * head_dim);
    assert_eq!(inv_freq.len() * 2, head_dim);
    if x.is_empty() {
        return;
    }
    let (cos, sin) = cos_sin_table(positions, inv_freq);
    let half = head_dim / 2;
    pool::install(|| {
        x.par_chunks_mut(n_heads * head_dim).enumerate().for_each(|(s, token)| {
            let (c, sn) = (&cos[s * half..(s + 1) * half], &sin[s * half..(s + 1) * half]);
            for head in token.chunks_exact_mut(head_dim) {
                rotate_half(head, c, sn);
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let f = inv_freq(8, 10000.0, &RopeScaling::None).unwrap();
        let orig: Vec<f32> = (0..16).map(|i| i as f32 - 3.0).collect();
        let mut x = orig.clone();
        rope(&mut x, &[0, 5], 1, 8, &f);
        assert_eq!(&x[..8], &orig[..8]);
        let n0: f32 = orig[8..].iter().map(|v| v * v).sum();
        let n1: f32 = x[8..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }

    #[test]
    fn llama3_keeps_high_and_slows_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = inv_freq(128, 500000.0, &RopeScaling::None).unwrap();
        let scaled = inv_freq(128, 500000.0, &s).unwrap();
        assert_eq!(plain[0], scaled[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn odd_head_dim_is_an_error() {
        assert!(inv_freq(7, 10000.0, &RopeScaling::None).is_err());
    }
}
