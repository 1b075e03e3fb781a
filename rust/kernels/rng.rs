//! Standard-normal samples from Xoshiro256++, identical for any number of threads.
//!
//! The recipe (the NumPy twin in `ellm/numpy_backend/kernels.py` follows it step by step):
//! 1. The output of `normal(n, seed, stream)` is cut into blocks of `BLOCK` samples. Block `b`
//!    has `LANES` generators; lane `l` is keyed by `key = mix(seed ^ mix(stream ^ mix(b * LANES + l)))`,
//!    where `mix` is the SplitMix64 output function, and its state is the next four outputs of a
//!    SplitMix64 generator started at `key` (`Xoshiro256PlusPlus::from_seed` of those words,
//!    little-endian).
//! 2. Step `t` of a block draws one u64 `x` from every lane in order; lane `l`'s draw makes
//!    samples `16 t + 2 l` and `16 t + 2 l + 1` of the block.
//! 3. Box–Muller: `u1 = ((x >> 40) + 1) / 2^24` in (0, 1], `u2 = ((x >> 16) & 0xFFFFFF) / 2^24`;
//!    `r = sqrt(-2 ln u1)`, samples `r cos(2 pi u2)` and `r sin(2 pi u2)`.
//! Blocks are independent, so they are filled in parallel; the numbers depend only on
//! (seed, stream, index).

use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;

use super::math::{cos_sin_turn, dispatch, ln};

pub const LANES: usize = 8;
pub const BLOCK: usize = 4096;
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea & Flood, 2014).
#[inline]
pub fn mix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator of one lane, seeded as step 1 of the recipe says.
pub fn lane_generator(seed: u64, stream: u64, lane_index: u64) -> Xoshiro256PlusPlus {
    let key = mix(seed ^ mix(stream ^ mix(lane_index)));
    let mut state = key;
    let mut bytes = [0u8; 32];
    for word in bytes.chunks_exact_mut(8) {
        state = state.wrapping_add(GOLDEN_GAMMA);
        word.copy_from_slice(&mix(state).to_le_bytes());
    }
    Xoshiro256PlusPlus::from_seed(bytes)
}

dispatch! {
    /// Box–Muller on the draws' integer parts: `top` = (x >> 40) + 1, `mid` = (x >> 16) & 0xFFFFFF.
    /// One long loop over plain arrays, so it runs in vector registers.
    fn box_muller(top: &[i32], mid: &[i32], cos: &mut [f32], sin: &mut [f32]) {
        const INV_2_24: f32 = 1.0 / 16_777_216.0;
        for i in 0..top.len() {
            let r = (-2.0 * ln(top[i] as f32 * INV_2_24)).sqrt();
            let (c, s) = cos_sin_turn(mid[i] as f32 * INV_2_24);
            cos[i] = r * c;
            sin[i] = r * s;
        }
    }
}

/// Fill one block (`out.len() <= BLOCK`).
pub fn fill_block(out: &mut [f32], seed: u64, stream: u64, block: u64) {
    let mut lanes: [Xoshiro256PlusPlus; LANES] =
        std::array::from_fn(|l| lane_generator(seed, stream, block * LANES as u64 + l as u64));
    let draws = out.len().div_ceil(2 * LANES) * LANES;
    // Stack buffers: noise for short rows (the optical layer) is drawn a block per row, so
    // four heap allocations per block would cost more than the samples.
    let (mut top, mut mid) = ([0i32; BLOCK / 2], [0i32; BLOCK / 2]);
    let (top, mid) = (&mut top[..draws], &mut mid[..draws]);
    // Lane by lane, so one generator's state stays in registers.
    for (l, lane) in lanes.iter_mut().enumerate() {
        for step in 0..draws / LANES {
            let x = lane.next_u64();
            top[step * LANES + l] = ((x >> 40) + 1) as i32;
            mid[step * LANES + l] = ((x >> 16) & 0xFF_FFFF) as i32;
        }
    }
    let (mut cos, mut sin) = ([0.0f32; BLOCK / 2], [0.0f32; BLOCK / 2]);
    let (cos, sin) = (&mut cos[..draws], &mut sin[..draws]);
    box_muller(top, mid, cos, sin);
    for (i, pair) in out.chunks_mut(2).enumerate() {
        pair[0] = cos[i];
        if pair.len() > 1 {
            pair[1] = sin[i];
        }
    }
}

/// `fill_normal` on the calling thread (the same numbers), for callers already inside a
/// parallel task or with too little work to be worth waking the pool.
pub fn fill_normal_serial(out: &mut [f32], seed: u64, stream: u64) {
    for (b, block) in out.chunks_mut(BLOCK).enumerate() {
        fill_block(block, seed, stream, b as u64);
    }
}

/// The first `out.len()` samples of stream (seed, stream).
pub fn fill_normal(out: &mut [f32], seed: u64, stream: u64) {
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, block)| fill_block(block, seed, stream, b as u64));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_reference_outputs() {
        let mut seed = [0u8; 32];
        for (i, w) in [1u64, 2, 3, 4].iter().enumerate() {
            seed[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let mut rng = Xoshiro256PlusPlus::from_seed(seed);
        assert_eq!(rng.next_u64(), 41943041);
        assert_eq!(rng.next_u64(), 58720359);
        assert_eq!(rng.next_u64(), 3588806011781223);
    }

    #[test]
    fn moments_and_reproducibility() {
        let mut a = vec![0.0f32; 200_000];
        fill_normal(&mut a, 7, 3);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        let mut b = vec![0.0f32; 5000];
        fill_normal(&mut b, 7, 3);
        assert_eq!(&a[..5000], &b[..]);
        fill_normal_serial(&mut b, 7, 3);
        assert_eq!(&a[..5000], &b[..]);
        fill_normal(&mut b, 7, 4);
        assert_ne!(&a[..5000], &b[..]);
    }
}

