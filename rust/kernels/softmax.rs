//! Numerically stable softmax over the last axis (subtract the row maximum first).

use rayon::prelude::*;

use super::math::{dispatch, exp};

const ROWS_PER_TASK: usize = 16;

dispatch! {
    pub fn softmax_in_place(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // Every entry masked: no distribution exists; give zeros rather than NaN.
            row.fill(0.0);
            return;
        }
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Softmax of every row of length `row_len`.
pub fn softmax(x: &[f32], row_len: usize, out: &mut [f32]) {
    assert!(row_len > 0 && x.len() % row_len == 0 && out.len() == x.len());
    out.copy_from_slice(x);
    out.par_chunks_mut(row_len * ROWS_PER_TASK).for_each(|rows| {
        for row in rows.chunks_exact_mut(row_len) {
            softmax_in_place(row);
        }
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
