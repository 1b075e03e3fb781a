//! RMSNorm (Zhang & Sennrich, 2019), as Llama uses it: `x / sqrt(mean(x^2) + eps) * weight`.

use rayon::prelude::*;

use super::pool;

/// Rows per parallel task: small inputs stay on one thread.
const ROWS_PER_TASK: usize = 16;

pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    assert!(out.len() == x.len() && (dim == 0 || x.len().is_multiple_of(dim)));
    if dim == 0 || x.is_empty() {
        return;
    }
    pool::install(|| {
        out.par_chunks_mut(dim * ROWS_PER_TASK).zip(x.par_chunks(dim * ROWS_PER_TASK)).for_each(|(out_rows, x_rows)| {
            for (o, row) in out_rows.chunks_exact_mut(dim).zip(x_rows.chunks_exact(dim)) {
                rms_norm_row(row, weight, eps, o);
            }
        })
    });
}

#[inline]
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = super::simd::dot(x, x) / x.len() as f32;
    let inv = 1.0 / (mean_square + eps).sqrt();
    for ((o, xi), w) in out.iter_mut().zip(x).zip(weight) {
        *o = xi * inv * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_rows_come_out_scaled_by_weight() {
        let x = vec![2.0f32, -2.0, 2.0, -2.0];
        let w = vec![1.0f32, 2.0, 3.0, 4.0];
        let mut out = vec![0.0; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        assert_eq!(out, vec![1.0, -2.0, 3.0, -4.0]);
    }
}
