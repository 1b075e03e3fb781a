//! The AVX2 kernel over the groups of 16 rows of `interleaved`: a 64-byte plane vector is two
//! 256-bit halves of 8 rows each, and the kernel takes one half at a time (16 registers hold
//! no more). Without `vpdpbusd`, a product is `vpmaddubsw` (u8 x i8 pairs summed into i16),
//! summed in 16 bits for as many values as cannot saturate, then widened by `vpmaddwd` with
//! both digits at once: the first weighted 128, the second 1.
//!
//! 8-bit weights take another form: both digits as one 16-bit integer (`QuantizedRows::wide`)
//! against the stored `q + 128` widened to 16 bits, by `vpmaddwd`. That is 16 products per
//! instruction and nothing to widen afterwards, where `vpmaddubsw` would need each digit's
//! products widened on their own and, since `q + 128` times 127 twice saturates, the sign of
//! `q` moved onto the activation first: about half the instructions. `128 * sum(a)` per block
//! comes off the sums after, which are then the same integers the digit-by-digit form gives.

use std::arch::x86_64::*;

use super::activation::{QuantizedRows, LO_SHIFT};
use super::blocks::*;
use super::interleaved::{block_bytes, sub_bytes, value_bytes, Interleave, Prefetch, Prefetcher, ROWS, SUB, VECTOR};

/// Rows per 256-bit vector: half a group.
pub const HALF: usize = 8;

/// Each format's scale and offset vectors of 8 rows (`r0` = 0 or 8: the group's half), of half
/// `half` of a sub-block: the vector form of `Interleave::scale_offset`.
pub trait Scales8: Interleave {
    /// # Safety
    /// The pointers address a packed block's head and a sub-block's scale bytes, and the CPU
    /// has AVX2 and F16C.
    unsafe fn scales8(head: *const u8, sub_scales: *const u8, half: usize, r0: usize) -> (__m256, __m256);
}

#[inline(always)]
unsafe fn halves8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

#[inline(always)]
unsafe fn bytes8(p: *const u8, signed: bool) -> __m256 {
    let b = _mm_loadl_epi64(p.cast());
    _mm256_cvtepi32_ps(if signed { _mm256_cvtepi8_epi32(b) } else { _mm256_cvtepu8_epi32(b) })
}

macro_rules! levels8 {
    ($t:ty, $levels:expr) => {
        impl Scales8 for $t {
            #[inline(always)]
            unsafe fn scales8(head: *const u8, _: *const u8, _: usize, r0: usize) -> (__m256, __m256) {
                let d = halves8(head.add(2 * r0));
                (d, _mm256_mul_ps(d, _mm256_set1_ps($levels)))
            }
        }
    };
}
levels8!(BlockQ4_0, -8.0);
levels8!(BlockQ5_0, -16.0);
levels8!(BlockQ8_0, 0.0); // `eight_bit_dot` takes the offset off in integers

macro_rules! min8 {
    ($t:ty) => {
        impl Scales8 for $t {
            #[inline(always)]
            unsafe fn scales8(head: *const u8, _: *const u8, _: usize, r0: usize) -> (__m256, __m256) {
                (halves8(head.add(2 * r0)), halves8(head.add(32 + 2 * r0)))
            }
        }
    };
}
min8!(BlockQ4_1);
min8!(BlockQ5_1);

macro_rules! k4 {
    ($t:ty) => {
        impl Scales8 for $t {
            #[inline(always)]
            unsafe fn scales8(head: *const u8, sub_scales: *const u8, _: usize, r0: usize) -> (__m256, __m256) {
                let (d, dmin) = (halves8(head.add(2 * r0)), halves8(head.add(32 + 2 * r0)));
                let (sc, m) = (bytes8(sub_scales.add(r0), false), bytes8(sub_scales.add(ROWS + r0), false));
                (_mm256_mul_ps(d, sc), _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(dmin, m)))
            }
        }
    };
}
k4!(BlockQ4K);
k4!(BlockQ5K);

impl Scales8 for BlockQ6K {
    #[inline(always)]
    unsafe fn scales8(head: *const u8, sub_scales: *const u8, half: usize, r0: usize) -> (__m256, __m256) {
        let s = _mm256_mul_ps(halves8(head.add(2 * r0)), bytes8(sub_scales.add(half * ROWS + r0), true));
        (s, _mm256_mul_ps(s, _mm256_set1_ps(-32.0)))
    }
}

/// The values of 8 rows (from row `r0`) in lanes `4g..4g + 4` (`lo`) and `16 + 4g..` (`hi`) of
/// a sub-block of 4- to 6-bit values.
#[inline(always)]
unsafe fn values8(bits: u32, sub: *const u8, g: usize, r0: usize) -> (__m256i, __m256i) {
    let plane = |v: usize| _mm256_loadu_si256(sub.add(v * VECTOR + 4 * r0).cast());
    let nibbles = plane(g);
    let mask = _mm256_set1_epi8(0x0F);
    let mut lo = _mm256_and_si256(nibbles, mask);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(nibbles), mask);
    for p in 0..(bits as usize).saturating_sub(4) {
        let bits = plane(4 + p);
        let target = _mm256_set1_epi8((0x10u8 << p) as i8);
        // lo needs bit g of each byte at bit 4 + p; hi needs bit 4 + g there
        let to = 4 + p as i32;
        lo = _mm256_or_si256(lo, _mm256_and_si256(shift(bits, g as i32, to), target));
        hi = _mm256_or_si256(hi, _mm256_and_si256(shift(bits, 4 + g as i32, to), target));
    }
    (lo, hi)
}

/// Move bit `from` of every byte to bit `to` (other bits of the result are garbage).
#[inline(always)]
unsafe fn shift(v: __m256i, from: i32, to: i32) -> __m256i {
    if to >= from {
        _mm256_sllv_epi32(v, _mm256_set1_epi32(to - from))
    } else {
        _mm256_srlv_epi32(v, _mm256_set1_epi32(from - to))
    }
}

#[inline(always)]
unsafe fn broadcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// The g-steps (4 per sub-block) whose 16-bit sums cannot saturate: a pair of products is at
/// most `max_u * 127 * 2`, and each step adds two pairs to an accumulator (one where the two
/// halves of a sub-block have scales of their own). 8-bit values go to `eight_bit_dot` and never
/// sum in 16 bits; the floor of 1 only keeps `% steps` defined in their unused instantiation.
const fn steps<F: Interleave>() -> usize {
    let max_u = (1 << F::BITS) - 1;
    let per_accumulator = 32767 / (max_u * 127 * 2);
    let steps = per_accumulator / if F::SPLIT { 1 } else { 2 };
    if steps > 0 {
        steps
    } else {
        1
    }
}

/// `out[c][h][r]` = row `r0 + 8h + r` of one group against activation row `first + c`, for RX
/// activation rows and H halves of the group at once (each activation broadcast feeds H
/// products, each weight vector RX).
///
/// # Safety
/// `group` is one whole packed group of `F` for rows as long as `act`'s, activation rows
/// `first..first + RX` exist, `r0 + 8H` is at most 16, and the CPU has AVX2, FMA and F16C.
#[allow(clippy::needless_range_loop)] // index loops over arrays of vector registers
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn half_group_dot<F: Scales8, const RX: usize, const H: usize>(
    group: &[u8],
    r0: usize,
    act: &QuantizedRows,
    first: usize,
    prefetch: Prefetch,
    out: &mut [[[f32; HALF]; H]; RX],
) {
    if F::BITS == 8 {
        return eight_bit_dot::<RX, H>(group, r0, act, first, prefetch, out);
    }
    let blocks = group.len() / block_bytes::<F>();
    let mut prefetcher = Prefetcher::new(prefetch, group);
    let subs = F::ELEMS / SUB;
    let half_of_hi = if F::SPLIT { 1 } else { 0 };
    let (first_digit, second_digit) = (_mm256_set1_epi16(1 << LO_SHIFT), _mm256_set1_epi16(1));
    let zero = _mm256_setzero_si256();
    let mut acc = [[_mm256_setzero_ps(); H]; RX];
    for b in 0..blocks {
        let block = group.as_ptr().add(b * block_bytes::<F>());
        for j in 0..subs {
            let sub = block.add(F::HEAD + j * sub_bytes::<F>());
            prefetcher.reached(sub, sub_bytes::<F>());
            let ab = b * subs + j; // the activation block
                                   // [c][h][half]: i32 sums of both digits; [c][h][half][digit]: i16 sums not yet widened
            let mut ints = [[[zero; 2]; H]; RX];
            let mut short = [[[[zero; 2]; 2]; H]; RX];
            for g in 0..4 {
                let vals: [(__m256i, __m256i); H] = std::array::from_fn(|h| values8(F::BITS, sub, g, r0 + HALF * h));
                for c in 0..RX {
                    let at = (first + c) * act.stride + ab * SUB + 4 * g;
                    let (hp, lp) = (act.hi.as_ptr().add(at), act.lo.as_ptr().add(at));
                    let digits = [broadcast4(hp), broadcast4(lp), broadcast4(hp.add(16)), broadcast4(lp.add(16))];
                    for h in 0..H {
                        let (lo, hi) = vals[h];
                        let products = [
                            (0, 0, _mm256_maddubs_epi16(lo, digits[0])),
                            (0, 1, _mm256_maddubs_epi16(lo, digits[1])),
                            (half_of_hi, 0, _mm256_maddubs_epi16(hi, digits[2])),
                            (half_of_hi, 1, _mm256_maddubs_epi16(hi, digits[3])),
                        ];
                        for (half, digit, p) in products {
                            short[c][h][half][digit] = _mm256_add_epi16(short[c][h][half][digit], p);
                        }
                    }
                }
                if (g + 1) % steps::<F>() == 0 {
                    for c in 0..RX {
                        for h in 0..H {
                            for half in 0..=half_of_hi {
                                let [s1, s2] = short[c][h][half];
                                let wide = _mm256_add_epi32(
                                    _mm256_madd_epi16(s1, first_digit),
                                    _mm256_madd_epi16(s2, second_digit),
                                );
                                ints[c][h][half] = _mm256_add_epi32(ints[c][h][half], wide);
                                short[c][h][half] = [zero; 2];
                            }
                        }
                    }
                }
            }
            for h in 0..H {
                for half in 0..=half_of_hi {
                    let (scale, offset) = F::scales8(block, sub.add(value_bytes(F::BITS)), half, r0 + HALF * h);
                    for c in 0..RX {
                        let row = first + c;
                        let da = _mm256_set1_ps(act.block_scale[row * act.stride / SUB + ab]);
                        let sum = _mm256_cvtepi32_ps(ints[c][h][half]);
                        let a = _mm256_fmadd_ps(sum, _mm256_mul_ps(scale, da), acc[c][h]);
                        let asum = _mm256_set1_ps(if F::SPLIT {
                            act.group_sums[row * act.stride / 16 + 2 * ab + half]
                        } else {
                            act.block_sums[row * act.stride / SUB + ab]
                        });
                        acc[c][h] = _mm256_fmadd_ps(offset, asum, a);
                    }
                }
            }
        }
    }
    for c in 0..RX {
        for h in 0..H {
            _mm256_storeu_ps(out[c][h].as_mut_ptr(), acc[c][h]);
        }
    }
}

/// `half_group_dot` for 8-bit weights (Q8_0), in the 16-bit form of the module's note. A 16-byte
/// load is 4 rows' 4 values, widened to 16 bits; `vpmaddwd` against 4 activations leaves each
/// row's sum in two adjacent lanes, which `vphaddd` joins at the end of a block.
///
/// # Safety
/// As `half_group_dot`.
#[allow(clippy::needless_range_loop)] // index loops over arrays of vector registers
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn eight_bit_dot<const RX: usize, const H: usize>(
    group: &[u8],
    r0: usize,
    act: &QuantizedRows,
    first: usize,
    prefetch: Prefetch,
    out: &mut [[[f32; HALF]; H]; RX],
) {
    type F = BlockQ8_0;
    let blocks = group.len() / block_bytes::<F>();
    let mut prefetcher = Prefetcher::new(prefetch, group);
    let zero = _mm256_setzero_si256();
    let mut acc = [[_mm256_setzero_ps(); H]; RX];
    for b in 0..blocks {
        let block = group.as_ptr().add(b * block_bytes::<F>());
        let sub = block.add(F::HEAD); // a block is one sub-block, with no scales of its own
        prefetcher.reached(sub, sub_bytes::<F>());
        // [c][h][rows 0-3 or 4-7 of the half]: per row two lanes of `sum (q + 128) * a`
        let mut ints = [[[zero; 2]; H]; RX];
        for g in 0..SUB / 4 {
            let w: [[__m256i; 2]; H] = std::array::from_fn(|h| {
                std::array::from_fn(|quad| {
                    let at = g * VECTOR + 4 * (r0 + HALF * h + 4 * quad);
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(sub.add(at).cast()))
                })
            });
            for c in 0..RX {
                let a = act.wide.as_ptr().add((first + c) * act.stride + b * SUB + 4 * g);
                let a = _mm256_set1_epi64x(a.cast::<i64>().read_unaligned());
                for h in 0..H {
                    for quad in 0..2 {
                        ints[c][h][quad] = _mm256_add_epi32(ints[c][h][quad], _mm256_madd_epi16(w[h][quad], a));
                    }
                }
            }
        }
        for h in 0..H {
            let (scale, _) = F::scales8(block, sub, 0, r0 + HALF * h);
            for c in 0..RX {
                let row = first + c;
                // lanes [r0, r1, r4, r5 | r2, r3, r6, r7], put in row order
                let sums = _mm256_permute4x64_epi64::<0xD8>(_mm256_hadd_epi32(ints[c][h][0], ints[c][h][1]));
                let offset = _mm256_set1_epi32(128 * act.wide_sums[row * act.stride / SUB + b]);
                let sums = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, offset));
                let da = _mm256_set1_ps(act.block_scale[row * act.stride / SUB + b]);
                acc[c][h] = _mm256_fmadd_ps(sums, _mm256_mul_ps(scale, da), acc[c][h]);
            }
        }
    }
    for c in 0..RX {
        for h in 0..H {
            _mm256_storeu_ps(out[c][h].as_mut_ptr(), acc[c][h]);
        }
    }
}
