//! Numerically stable softmax over the last axis (subtract the row maximum first).

use rayon::prelude::*;

use super::math::{dispatch, exp};
use super::pool;
use super::simd::sum;

const ROWS_PER_TASK: usize = 16;

dispatch! {
    pub fn softmax_in_place(row: &mut [f32]) {
        // Separate passes, each a plain loop the compiler vectorizes.
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = if v > *l { v } else { *l };
            }
        }
        let max = lanes.iter().chain(chunks.remainder()).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        if max == f32::NEG_INFINITY {
            // Every entry masked: no distribution exists; give zeros rather than NaN. (The max
            // skips NaN, so a row of NaN and -inf lands here too, and stays NaN.)
            let nan = row.iter().any(|v| v.is_nan());
            row.fill(if nan { f32::NAN } else { 0.0 });
            return;
        }
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Softmax of every row of length `row_len`.
pub fn softmax(x: &[f32], row_len: usize, out: &mut [f32]) {
    assert!(row_len > 0 && x.len().is_multiple_of(row_len) && out.len() == x.len());
    out.copy_from_slice(x);
    pool::install(|| {
        out.par_chunks_mut(row_len * ROWS_PER_TASK).for_each(|rows| {
            for row in rows.chunks_exact_mut(row_len) {
                softmax_in_place(row);
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_values_do_not_overflow() {
        let mut out = vec![0.0; 2];
        softmax(&[1000.0, 1000.0], 2, &mut out);
        assert_eq!(out, vec![0.5, 0.5]);
    }
}
