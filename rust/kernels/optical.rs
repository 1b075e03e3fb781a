//! The fused optical linear layer: DAC quantization, the optical matrix product, thermal drift,
//! shot and thermal noise, attenuation and ADC quantization, applied to each output element
//! before it is written. Noise for sample row r comes from normal stream (seed, r), so the
//! result does not depend on how rows are spread over threads.

use rayon::prelude::*;

use super::quantize::{check_bits, quantize_scalar};
use super::rng::fill_normal;
use super::simd::dot;
use crate::error::{EllmError, Result};

#[derive(Clone, Copy, Debug)]
pub struct OpticalParams {
    pub precision: u32,
    pub noise_level: f32,
    pub temp_drift: f32,
    pub attenuation: f32,
    pub thermal_std: f32,
    /// Drift and noise on (the chip in training mode, or noisy inference).
    pub noisy: bool,
    pub seed: u64,
}

impl OpticalParams {
    pub fn check(&self) -> Result<()> {
        check_bits(self.precision)?;
        for (name, v) in [("noise_level", self.noise_level), ("temp_drift", self.temp_drift)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(EllmError::Value(format!("{name} must be in [0, 1], got {v}")));
            }
        }
        if !self.attenuation.is_finite() || !self.thermal_std.is_finite() || self.thermal_std < 0.0 {
            return Err(EllmError::Value("attenuation and thermal_std must be finite, thermal_std >= 0".into()));
        }
        Ok(())
    }

    fn levels(&self) -> f32 {
        ((1u32 << self.precision) - 1) as f32
    }
}

/// x `[batch, n_in]`, weight `[n_out, n_in]` -> out `[batch, n_out]`. When `pre_adc_mask` is
/// given, it receives 1 where the value reaching the ADC was inside [0, 1] (the straight-through
/// gradient passes there) and 0 where the ADC clipped it.
pub fn optical_linear(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    p: &OpticalParams,
    out: &mut [f32],
    mut pre_adc_mask: Option<&mut [u8]>,
    n_in: usize,
    n_out: usize,
) -> Result<()> {
    p.check()?;
    let batch = if n_in == 0 { out.len() / n_out.max(1) } else { x.len() / n_in };
    assert_eq!(x.len(), batch * n_in);
    assert_eq!(weight.len(), n_out * n_in);
    assert_eq!(out.len(), batch * n_out);
    let levels = p.levels();
    // Few rows: split each row's outputs over threads; many rows: one row per task.
    let split_outputs = batch < 2 * rayon::current_num_threads();
    let rows: Vec<(usize, &mut [f32])> = out.chunks_mut(n_out.max(1)).enumerate().collect();
    let masks: Vec<Option<&mut [u8]>> = match pre_adc_mask.as_deref_mut() {
        Some(m) => m.chunks_mut(n_out.max(1)).map(Some).collect(),
        None => (0..batch).map(|_| None).collect(),
    };
    rows.into_par_iter().zip(masks).for_each_init(
        || (Vec::new(), Vec::new()),
        |(xq, noise), ((r, row), mask)| {
            xq.clear();
            xq.extend(x[r * n_in..(r + 1) * n_in].iter().map(|&v| quantize_scalar(v, levels, 0.0, 1.0)));
            let xq: &[f32] = xq;
            let dot_row = |(j, o): (usize, &mut f32)| *o = dot(xq, &weight[j * n_in..(j + 1) * n_in]);
            if split_outputs {
                row.par_iter_mut().with_min_len(32).enumerate().for_each(dot_row);
            } else {
                row.iter_mut().enumerate().for_each(dot_row);
            }
            if p.noisy {
                let mean = row.iter().sum::<f32>() / n_out.max(1) as f32;
                noise.resize(n_out, 0.0);
                fill_normal(noise, p.seed, r as u64);
                let keep = 1.0 - 0.8 * p.temp_drift;
                let shift = mean * p.temp_drift * 0.5;
                let thermal_var = p.thermal_std * p.thermal_std;
                let shot = p.noise_level * p.noise_level;
                for (s, z) in row.iter_mut().zip(noise.iter()) {
                    let drifted = *s * keep + shift;
                    *s = drifted + (shot * drifted.abs() + thermal_var).sqrt() * z;
                }
            }
            let mut mask = mask;
            for (j, s) in row.iter_mut().enumerate() {
                let analog = *s * p.attenuation;
                if let Some(m) = mask.as_deref_mut() {
                    m[j] = (0.0..=1.0).contains(&analog) as u8;
                }
                *s = quantize_scalar(analog, levels, 0.0, 1.0) + bias.map_or(0.0, |b| b[j]);
            }
        },
    );
    Ok(())
}

/// The straight-through backward of `optical_linear`: each quantizer passes the gradient where
/// its input was inside [0, 1] and blocks it elsewhere, drift and noise count as constants, and
/// attenuation scales it. Returns (grad_x `[batch, n_in]`, grad_weight `[n_out, n_in]`).
pub fn optical_linear_backward(
    grad_y: &[f32],
    x: &[f32],
    weight: &[f32],
    pre_adc_mask: &[u8],
    precision: u32,
    attenuation: f32,
    n_in: usize,
    n_out: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_bits(precision)?;
    let batch = grad_y.len() / n_out.max(1);
    assert_eq!(grad_y.len(), batch * n_out);
    assert_eq!(pre_adc_mask.len(), grad_y.len());
    assert_eq!(x.len(), batch * n_in);
    assert_eq!(weight.len(), n_out * n_in);
    let levels = ((1u32 << precision) - 1) as f32;
    let grad_s: Vec<f32> = grad_y.iter().zip(pre_adc_mask).map(|(&g, &m)| if m != 0 { g * attenuation } else { 0.0 }).collect();
    let x_q: Vec<f32> = x.par_iter().with_min_len(1 << 14).map(|&v| quantize_scalar(v, levels, 0.0, 1.0)).collect();
    let mut grad_w = vec![0.0f32; n_out * n_in];
    super::matmul::matmul_tn(&grad_s, &x_q, &mut grad_w, batch, n_out, n_in);
    let mut grad_x = vec![0.0f32; batch * n_in];
    super::matmul::matmul(&grad_s, weight, &mut grad_x, batch, n_out, n_in);
    for (g, &v) in grad_x.iter_mut().zip(x) {
        if !(0.0..=1.0).contains(&v) {
            *g = 0.0;
        }
    }
    Ok((grad_x, grad_w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(noisy: bool) -> OpticalParams {
        OpticalParams { precision: 8, noise_level: 0.1, temp_drift: 0.05, attenuation: 0.9, thermal_std: 0.005, noisy, seed: 3 }
    }

    #[test]
    fn eval_mode_is_quantized_product() {
        // x quantizes to (0, 1/3, 2/3, 1) at 2 bits; one weight row of ones gives 2, clipped to 1.
        let p = OpticalParams { precision: 2, attenuation: 0.25, ..params(false) };
        let mut out = vec![0.0; 1];
        optical_linear(&[-0.2, 0.3, 0.7, 1.4], &[1.0, 1.0, 1.0, 1.0], None, &p, &mut out, None, 4, 1).unwrap();
        assert_eq!(out, vec![2.0 / 3.0]); // 2 * 0.25 = 0.5 -> 1.5 levels -> rounds to even 2 -> 2/3
    }

    #[test]
    fn result_does_not_depend_on_the_row_split() {
        // 40 rows run one row per task; a lone row splits its outputs over threads instead.
        let x: Vec<f32> = (0..40 * 16).map(|i| ((i as f32) * 0.37).sin().abs()).collect();
        let w: Vec<f32> = (0..24 * 16).map(|i| ((i as f32) * 0.11).cos() * 0.2).collect();
        let mut all = vec![0.0; 40 * 24];
        optical_linear(&x, &w, None, &params(true), &mut all, None, 16, 24).unwrap();
        let mut one = vec![0.0; 24];
        optical_linear(&x[..16], &w, None, &params(true), &mut one, None, 16, 24).unwrap();
        assert_eq!(&one[..], &all[..24]);
    }
}
