//! SiLU and the SwiGLU gate of the Llama MLP (Shazeer, 2020).

use rayon::prelude::*;

const MIN_PER_TASK: usize = 1 << 14;

#[inline]
pub fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn silu(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    out.par_iter_mut().with_min_len(MIN_PER_TASK).zip(x.par_iter()).for_each(|(o, &v)| *o = silu_scalar(v));
}

/// `out = silu(gate) * up`
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len());
    out.par_iter_mut()
        .with_min_len(MIN_PER_TASK)
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| *o = silu_scalar(g) * u);
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
