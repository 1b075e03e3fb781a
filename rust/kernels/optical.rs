//! The fused optical linear layer: DAC quantization, the optical matrix product, thermal drift,
//! shot and thermal noise, attenuation and ADC quantization, applied to each output element
//! before it is written. Noise for sample row r comes from normal stream (seed, r), so the
//! result does not depend on how rows are spread over threads.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use super::few_rows;
use super::math::dispatch;
use super::matmul;
use super::pool::DisjointWrites;
use super::quantize::{check_bits, levels, quantize_scalar, quantize_slice};
use super::rng::fill_normal_serial;
use super::simd::{sum, RowsAlignedLike};
use super::{pool, team};
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
}

/// Up to this many multiply-adds everything runs on the calling thread.
const SERIAL_WORK: usize = 1 << 16;
/// Sample rows per thread from which the threads split the batch rather than the outputs: the
/// product kernel's tile takes 8 input rows at a time.
const ROWS_PER_THREAD: usize = 8;
/// A normal sample costs about as much time as this many multiply-adds of a product whose
/// weights sit in cache (measured: 0.9 ns against 0.03 ns).
const NORMAL_SAMPLE_WORK: usize = 32;

/// x `[batch, n_in]`, weight `[n_out, n_in]` -> out `[batch, n_out]`. When `pre_adc_mask` is
/// given, it receives 1 where the value reaching the ADC was inside [0, 1] (the straight-through
/// gradient passes there) and 0 where the ADC clipped it.
///
/// The product lands in `out` and each row is finished there (drift, noise, attenuation, ADC,
/// bias): no batch-sized intermediate of products or noise exists.
#[allow(clippy::too_many_arguments)]
pub fn optical_linear(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    p: &OpticalParams,
    out: &mut [f32],
    pre_adc_mask: Option<&mut [u8]>,
    n_in: usize,
    n_out: usize,
) -> Result<()> {
    p.check()?;
    if n_out == 0 || out.is_empty() {
        return Ok(());
    }
    let batch = out.len() / n_out;
    assert_eq!(x.len(), batch * n_in);
    assert_eq!(weight.len(), n_out * n_in);
    if let Some(mask) = &pre_adc_mask {
        assert_eq!(mask.len(), out.len());
    }
    let layer = Layer {
        x,
        weight,
        bias,
        p,
        levels: levels(p.precision),
        n_in,
        n_out,
        out: DisjointWrites(out.as_mut_ptr()),
        mask: pre_adc_mask.map(|m| DisjointWrites(m.as_mut_ptr())),
        non_finite: AtomicBool::new(false),
    };
    // SAFETY (each call below): the rows handed out are disjoint.
    if batch * n_in * n_out <= SERIAL_WORK {
        unsafe { layer.whole_rows(0..batch) };
    } else if batch >= ROWS_PER_THREAD * pool::pool().current_num_threads() {
        // Each thread takes whole sample rows, so that it finishes them while they are in its
        // cache; the weights fit in each core's cache.
        team::run(&|part, parts| unsafe { layer.whole_rows(team::share(batch, 1, part, parts)) });
    } else {
        unsafe { layer.split_outputs(batch) };
    }
    if layer.non_finite.load(Relaxed) {
        return Err(EllmError::Value("optical_linear: x contains NaN or infinite values".into()));
    }
    Ok(())
}

/// One call of the layer, shared by the threads that compute it.
struct Layer<'a> {
    x: &'a [f32],
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    p: &'a OpticalParams,
    levels: f32,
    n_in: usize,
    n_out: usize,
    out: DisjointWrites,
    mask: Option<DisjointWrites<u8>>,
    /// Set when a row of x holds NaN or an infinity (they have no light level).
    non_finite: AtomicBool,
}

impl Layer<'_> {
    /// The DAC for sample rows `rows`, written straight into the layout the product kernel
    /// reads; notes NaN and infinities while the rows are in cache.
    fn dac(&self, rows: Range<usize>) -> Option<RowsAlignedLike> {
        let finite = Cell::new(true);
        let x = &self.x[rows.start * self.n_in..rows.end * self.n_in];
        let x_q = RowsAlignedLike::map(x, self.n_in, self.weight.as_ptr(), |src, dst| {
            finite.set(dac_row(src, dst, self.levels) & finite.get());
        });
        if !finite.get() {
            self.non_finite.store(true, Relaxed);
            return None;
        }
        Some(x_q)
    }

    /// Sample rows `rows`, start to finish, on the calling thread.
    ///
    /// # Safety
    /// Nobody else writes these rows (of the output and the mask) meanwhile.
    unsafe fn whole_rows(&self, rows: Range<usize>) {
        let Some(x_q) = self.dac(rows.clone()) else { return };
        let out = self.out.slice(rows.start * self.n_out, rows.len() * self.n_out);
        few_rows::linear_aligned_serial(&x_q, self.weight, out, rows.len(), self.n_in, self.n_out);
        let mut noise = vec![0.0f32; if self.p.noisy { self.n_out } else { 0 }];
        for r in rows {
            if self.p.noisy {
                fill_normal_serial(&mut noise, self.p.seed, r as u64);
            }
            self.finish_row(r, &noise);
        }
    }

    /// A batch too small to split by rows: the threads split the product's outputs instead, and
    /// the rows are finished afterwards (a row's drift takes all its outputs). The first row's
    /// noise is drawn by the calling thread beside the product, whose share is cut to match.
    ///
    /// # Safety
    /// Nobody else writes the output or the mask meanwhile.
    unsafe fn split_outputs(&self, batch: usize) {
        let Some(x_q) = self.dac(0..batch) else { return };
        let out = self.out.slice(0, batch * self.n_out);
        let first_noise = Mutex::new(Vec::new());
        let draw_first_noise = || {
            let mut noise = vec![0.0f32; self.n_out];
            fill_normal_serial(&mut noise, self.p.seed, 0);
            *first_noise.lock().unwrap_or_else(|e| e.into_inner()) = noise;
        };
        if self.p.noisy {
            few_rows::linear_aligned_beside(
                &x_q,
                self.weight,
                out,
                batch,
                self.n_in,
                self.n_out,
                &draw_first_noise,
                self.n_out * NORMAL_SAMPLE_WORK,
            );
        } else {
            few_rows::linear_aligned(&x_q, self.weight, out, batch, self.n_in, self.n_out);
        }
        let mut noise = first_noise.into_inner().unwrap_or_else(|e| e.into_inner());
        for r in 0..batch {
            if self.p.noisy && r > 0 {
                fill_normal_serial(&mut noise, self.p.seed, r as u64);
            }
            self.finish_row(r, &noise);
        }
    }

    /// Everything after the product, for sample row `r`: drift and `noise` (stream r, or empty
    /// when not noisy), attenuation, the ADC and the digital bias.
    ///
    /// # Safety
    /// As `whole_rows`.
    unsafe fn finish_row(&self, r: usize, noise: &[f32]) {
        let (n, p) = (self.n_out, self.p);
        let row = self.out.slice(r * n, n);
        if p.noisy {
            let mean = sum(row) / n as f32;
            add_drift_and_noise(
                row,
                noise,
                1.0 - 0.8 * p.temp_drift,
                mean * p.temp_drift * 0.5,
                p.noise_level * p.noise_level,
                p.thermal_std * p.thermal_std,
            );
        }
        let mask = self.mask.as_ref().map_or(&mut [][..], |m| m.slice(r * n, n));
        attenuate_and_convert(row, mask, p.attenuation, self.levels, self.bias.unwrap_or(&[]));
    }
}

dispatch! {
    /// The DAC for one row: clip to [0, 1] and quantize. False if the row holds NaN or an
    /// infinity (checked in the same pass, so both vectorize).
    fn dac_row(src: &[f32], dst: &mut [f32], levels: f32) -> bool {
        let mut finite = true;
        for (d, &v) in dst.iter_mut().zip(src) {
            finite &= v.is_finite();
            *d = quantize_scalar(v, levels, 0.0, 1.0);
        }
        finite
    }
}

dispatch! {
    fn add_drift_and_noise(row: &mut [f32], noise: &[f32], keep: f32, shift: f32, shot: f32, thermal: f32) {
        for (s, &z) in row.iter_mut().zip(noise) {
            let drifted = *s * keep + shift;
            *s = drifted + (shot * drifted.abs() + thermal).sqrt() * z;
        }
    }
}

dispatch! {
    /// Attenuation, the ADC and the bias; `mask` (empty when not wanted) records where the
    /// analog value was against the ADC range (`RangeSide`).
    fn attenuate_and_convert(row: &mut [f32], mask: &mut [u8], attenuation: f32, levels: f32, bias: &[f32]) {
        for s in row.iter_mut() {
            *s *= attenuation;
        }
        for (m, &s) in mask.iter_mut().zip(row.iter()) {
            *m = RangeSide::of(s) as u8;
        }
        for s in row.iter_mut() {
            *s = quantize_scalar(*s, levels, 0.0, 1.0);
        }
        for (s, b) in row.iter_mut().zip(bias) {
            *s += b;
        }
    }
}

/// Where a value fell against a converter's [0, 1] range; the forward's mask holds these.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum RangeSide {
    /// Below 0, or NaN.
    Below = 0,
    Inside = 1,
    Above = 2,
}

impl RangeSide {
    #[inline]
    pub fn of(v: f32) -> Self {
        if v > 1.0 {
            RangeSide::Above
        } else if v >= 0.0 {
            RangeSide::Inside
        } else {
            RangeSide::Below
        }
    }

    /// The straight-through gradient of a clip to [0, 1]: the whole gradient inside the range;
    /// outside it, only a gradient whose descent step moves the value back in. (Blocking it
    /// there, the clip's true derivative, leaves a clipped output with no way back: a correct
    /// class stuck below 0 can never be raised, and plain training stalls.)
    #[inline]
    pub fn pass(self, grad: f32) -> f32 {
        match self {
            RangeSide::Inside => grad,
            RangeSide::Below if grad < 0.0 => grad,
            RangeSide::Above if grad > 0.0 => grad,
            _ => 0.0,
        }
    }

    fn from_mask(m: u8) -> Self {
        match m {
            1 => RangeSide::Inside,
            2 => RangeSide::Above,
            _ => RangeSide::Below,
        }
    }
}

/// The straight-through backward of `optical_linear`: each converter (DAC, ADC) passes the
/// gradient as `RangeSide::pass` says, drift and noise count as constants, and attenuation
/// scales it. Returns (grad_x `[batch, n_in]`, grad_weight `[n_out, n_in]`).
#[allow(clippy::too_many_arguments)]
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
    let levels = levels(precision);
    let grad_s: Vec<f32> =
        grad_y.iter().zip(pre_adc_mask).map(|(&g, &m)| RangeSide::from_mask(m).pass(g) * attenuation).collect();
    let mut x_q = vec![0.0f32; x.len()];
    quantize_slice(x, levels, 0.0, 1.0, &mut x_q);
    let mut grad_w = vec![0.0f32; n_out * n_in];
    matmul::matmul_tn(&grad_s, &x_q, &mut grad_w, batch, n_out, n_in, gemm::Parallelism::Rayon(0));
    let mut grad_x = vec![0.0f32; batch * n_in];
    matmul::matmul(&grad_s, weight, &mut grad_x, batch, n_out, n_in);
    for (g, &v) in grad_x.iter_mut().zip(x) {
        *g = RangeSide::of(v).pass(*g);
    }
    Ok((grad_x, grad_w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(noisy: bool) -> OpticalParams {
        OpticalParams {
            precision: 8,
            noise_level: 0.1,
            temp_drift: 0.05,
            attenuation: 0.9,
            thermal_std: 0.005,
            noisy,
            seed: 3,
        }
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
    fn non_finite_input_is_an_error_on_every_path() {
        // Serial, a few rows with the outputs split, and rows split over the threads.
        for (batch, n) in [(1, 100), (2, 300), (40, 300)] {
            let mut x = vec![0.5f32; batch * n];
            x[batch * n - 1] = f32::NAN;
            let w = vec![0.01f32; n * n];
            let mut out = vec![0.0; batch * n];
            let err = optical_linear(&x, &w, None, &params(true), &mut out, None, n, n).unwrap_err();
            assert!(err.to_string().contains("NaN or infinite"), "batch {batch}: {err}");
        }
    }

    #[test]
    fn result_does_not_depend_on_the_row_split() {
        // 40 rows split by rows over the threads; 3 rows and a lone row split their outputs
        // (the lone row's noise drawn beside the product); each row must come out the same.
        let (n_in, n_out) = (300, 300);
        let x: Vec<f32> = (0..40 * n_in).map(|i| ((i as f32) * 0.37).sin().abs()).collect();
        let w: Vec<f32> = (0..n_out * n_in).map(|i| ((i as f32) * 0.11).cos() * 0.01).collect();
        let mut all = vec![0.0; 40 * n_out];
        optical_linear(&x, &w, None, &params(true), &mut all, None, n_in, n_out).unwrap();
        for batch in [1, 3] {
            let mut few = vec![0.0; batch * n_out];
            optical_linear(&x[..batch * n_in], &w, None, &params(true), &mut few, None, n_in, n_out).unwrap();
            assert_eq!(&few[..], &all[..batch * n_out], "batch {batch}");
        }
        assert!(all.iter().any(|&v| v > 0.0 && v < 1.0), "the test should see unclipped outputs");
    }
}
