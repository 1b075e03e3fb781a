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
//!
//! Blocks are independent, so they are filled in parallel; the numbers depend only on
//! (seed, stream, index).

use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;

use super::math::{cos_sin_turn, dispatch, ln};
use super::pool;

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

/// The state words of one lane's generator, as step 1 of the recipe says.
fn lane_state(seed: u64, stream: u64, lane_index: u64) -> [u64; 4] {
    let mut state = mix(seed ^ mix(stream ^ mix(lane_index)));
    std::array::from_fn(|_| {
        state = state.wrapping_add(GOLDEN_GAMMA);
        mix(state)
    })
}

/// The generator of one lane.
pub fn lane_generator(seed: u64, stream: u64, lane_index: u64) -> Xoshiro256PlusPlus {
    let mut bytes = [0u8; 32];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(lane_state(seed, stream, lane_index)) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    Xoshiro256PlusPlus::from_seed(bytes)
}

/// Steps 1 and 2 of the recipe for one block: `draws / LANES` draws from every lane, as the
/// integer parts Box–Muller takes (`top`, `mid`; draw `t` of lane `l` at `t * LANES + l`).
fn draw_block(seed: u64, stream: u64, block: u64, top: &mut [i32], mid: &mut [i32]) {
    let lane_index = |l: usize| block * LANES as u64 + l as u64;
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::has_avx512() {
            let states: [[u64; 4]; LANES] = std::array::from_fn(|l| lane_state(seed, stream, lane_index(l)));
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { x86::draw_lanes_avx512(&states, top, mid) };
        }
    }
    // Lane by lane, so one generator's state stays in registers.
    for l in 0..LANES {
        let mut lane = lane_generator(seed, stream, lane_index(l));
        for step in 0..top.len() / LANES {
            let x = lane.next_u64();
            top[step * LANES + l] = ((x >> 40) + 1) as i32;
            mid[step * LANES + l] = ((x >> 16) & 0xFF_FFFF) as i32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// The eight lanes of a block side by side, one 64-bit lane each of four vectors holding
    /// the Xoshiro256++ state words: one step draws from all eight (the same numbers as
    /// `rand_xoshiro`, which the scalar path uses and the tests compare against).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn draw_lanes_avx512(states: &[[u64; 4]; LANES], top: &mut [i32], mid: &mut [i32]) {
        let word =
            |w: usize| _mm512_loadu_si512(std::array::from_fn::<u64, LANES, _>(|l| states[l][w]).as_ptr().cast());
        let (mut s0, mut s1, mut s2, mut s3) = (word(0), word(1), word(2), word(3));
        let (one, low24) = (_mm512_set1_epi64(1), _mm512_set1_epi64(0xFF_FFFF));
        for step in 0..top.len() / LANES {
            let x = _mm512_add_epi64(_mm512_rol_epi64::<23>(_mm512_add_epi64(s0, s3)), s0);
            let t = _mm512_slli_epi64::<17>(s1);
            s2 = _mm512_xor_si512(s2, s0);
            s3 = _mm512_xor_si512(s3, s1);
            s1 = _mm512_xor_si512(s1, s2);
            s0 = _mm512_xor_si512(s0, s3);
            s2 = _mm512_xor_si512(s2, t);
            s3 = _mm512_rol_epi64::<45>(s3);
            let hi = _mm512_add_epi64(_mm512_srli_epi64::<40>(x), one);
            let md = _mm512_and_si512(_mm512_srli_epi64::<16>(x), low24);
            _mm256_storeu_si256(top.as_mut_ptr().add(step * LANES).cast(), _mm512_cvtepi64_epi32(hi));
            _mm256_storeu_si256(mid.as_mut_ptr().add(step * LANES).cast(), _mm512_cvtepi64_epi32(md));
        }
    }
}

dispatch! {
    /// Box–Muller on the draws' integer parts: `top` = (x >> 40) + 1, `mid` = (x >> 16) & 0xFFFFFF.
    /// One long loop over plain arrays, so it runs in vector registers.
    /// Writes the pair of draw i to `pairs[2 i]` and `pairs[2 i + 1]`.
    fn box_muller(top: &[i32], mid: &[i32], pairs: &mut [f32]) {
        const INV_2_24: f32 = 1.0 / 16_777_216.0;
        for ((&t, &m), pair) in top.iter().zip(mid).zip(pairs.chunks_exact_mut(2)) {
            let r = (-2.0 * ln(t as f32 * INV_2_24)).sqrt();
            let (c, s) = cos_sin_turn(m as f32 * INV_2_24);
            pair[0] = r * c;
            pair[1] = r * s;
        }
    }
}

/// Fill one block (`out.len() <= BLOCK`).
pub fn fill_block(out: &mut [f32], seed: u64, stream: u64, block: u64) {
    let draws = out.len().div_ceil(2 * LANES) * LANES;
    // Buffers sized to this block: noise for short rows (the optical layer) is drawn a block
    // per row, and clearing full-block buffers would cost a fair part of the samples' time.
    let mut ints = vec![0i32; 2 * draws];
    let (top, mid) = ints.split_at_mut(draws);
    draw_block(seed, stream, block, top, mid);
    if out.len() == 2 * draws {
        box_muller(top, mid, out);
    } else {
        let mut pairs = vec![0.0f32; 2 * draws];
        box_muller(top, mid, &mut pairs);
        out.copy_from_slice(&pairs[..out.len()]);
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
    pool::install(|| {
        out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, block)| fill_block(block, seed, stream, b as u64))
    });
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
    fn vector_lanes_draw_what_rand_xoshiro_draws() {
        let draws = 3 * LANES;
        let (mut top, mut mid) = (vec![0; draws], vec![0; draws]);
        draw_block(5, 7, 2, &mut top, &mut mid);
        for l in 0..LANES {
            let mut lane = lane_generator(5, 7, 2 * LANES as u64 + l as u64);
            for step in 0..3 {
                let x = lane.next_u64();
                assert_eq!(top[step * LANES + l], ((x >> 40) + 1) as i32);
                assert_eq!(mid[step * LANES + l], ((x >> 16) & 0xFF_FFFF) as i32);
            }
        }
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
