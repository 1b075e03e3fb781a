//! SiLU and the SwiGLU gate of the Llama MLP (Shazeer, 2020).

use rayon::prelude::*;

use super::math::{dispatch, exp};
use super::pool;

const MIN_PER_TASK: usize = 1 << 14;

#[inline(always)]
pub fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

dispatch! {
    fn silu_slice(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = silu_scalar(v);
        }
    }
}

dispatch! {
    fn swiglu_slice(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu_scalar(g) * u;
        }
    }
}

pub fn silu(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    pool::install(|| {
        out.par_chunks_mut(MIN_PER_TASK).zip(x.par_chunks(MIN_PER_TASK)).for_each(|(o, x)| silu_slice(x, o))
    });
}

/// `out = silu(gate) * up`
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len());
    pool::install(|| {
        out.par_chunks_mut(MIN_PER_TASK)
            .zip(gate.par_chunks(MIN_PER_TASK).zip(up.par_chunks(MIN_PER_TASK)))
            .for_each(|(o, (g, u))| swiglu_slice(g, u, o))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_known_values() {
        let mut out = vec![0.0; 3];
        silu(&[0.0, 1.0, -1.0], &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 0.731_058_6).abs() < 1e-6);
        assert!((out[2] + 0.268_941_4).abs() < 1e-6);
    }
}
