//! Activations as 8-bit integers, quantized once per layer input and read by every projection
//! of it: blocks of 32 values with one scale `d` each (llama.cpp's Q8_0 rounding,
//! `d = max|x| / 127`), written as two signed 8-bit digits, `x ~ d * (hi + lo / 128)`.
//!
//! One digit alone (what llama.cpp multiplies) leaves an error of up to d/2 per value, enough to
//! change greedy choices of a 135M model against its own f32 weights; the second digit shrinks
//! it to d/256 for one more integer multiply-add per value, and the integer sums combine
//! exactly as `(sum_hi << 7) + sum_lo`.

use super::blocks::{GROUP, LANE};

/// Values per activation block (one scale each).
pub const ACT_BLOCK: usize = 32;
/// The second digit's weight: `x ~ d * (hi + lo / LO_SCALE)`; `lo` lies in -64..=64.
pub const LO_SHIFT: u32 = 7;
pub const LO_SCALE: f32 = (1 << LO_SHIFT) as f32;

/// The padding the kernels read to: one AVX-512 vector of bytes.
pub const PAD: usize = 64;

/// Rows of `k` activations in the kernels' form. Per row, padded with zeros to `stride`:
/// the digits `hi` and `lo`; per 4-value lane the scale of the combined sum, `d / 128`
/// (`scale_lanes`, for the row-at-a-time kernel); per block of 32 the same scale
/// (`block_scale`) and the dequantized sum (`block_sums`); per group of 16 the dequantized sum
/// (`group_sums`). The sums meet the weights' offsets. For kernels that multiply 16-bit values
/// (AVX2 on 8-bit weights), also both digits as one integer, `(hi << 7) + lo` (`wide`), and
/// per block the sum of those (`wide_sums`).
pub struct QuantizedRows {
    pub rows: usize,
    pub k: usize,
    /// Values per row in `hi` and `lo` (a multiple of 64, so the widest kernel needs no tail).
    pub stride: usize,
    pub hi: Vec<i8>,
    pub lo: Vec<i8>,
    pub scale_lanes: Vec<f32>,
    pub block_scale: Vec<f32>,
    pub block_sums: Vec<f32>,
    pub group_sums: Vec<f32>,
    pub wide: Vec<i16>,
    pub wide_sums: Vec<i32>,
}

impl QuantizedRows {
    /// `x` is `[rows, k]` with k a multiple of 32.
    pub fn new(x: &[f32], k: usize) -> Self {
        Self::new_with(x, k, quantize_row)
    }

    fn new_with(x: &[f32], k: usize, quantize_row: fn(&[f32], RowParts<'_>)) -> Self {
        assert!(k.is_multiple_of(ACT_BLOCK), "activation rows must be whole blocks of {ACT_BLOCK}");
        let rows = x.len() / k.max(1);
        let stride = k.next_multiple_of(PAD);
        let mut out = QuantizedRows {
            rows,
            k,
            stride,
            hi: vec![0; rows * stride],
            lo: vec![0; rows * stride],
            scale_lanes: vec![0.0; rows * stride / LANE],
            block_scale: vec![0.0; rows * stride / ACT_BLOCK],
            block_sums: vec![0.0; rows * stride / ACT_BLOCK],
            group_sums: vec![0.0; rows * stride / GROUP],
            wide: vec![0; rows * stride],
            wide_sums: vec![0; rows * stride / ACT_BLOCK],
        };
        fill(&mut out, x, quantize_row);
        out
    }

    pub fn hi_row(&self, r: usize) -> &[i8] {
        &self.hi[r * self.stride..(r + 1) * self.stride]
    }

    pub fn lo_row(&self, r: usize) -> &[i8] {
        &self.lo[r * self.stride..(r + 1) * self.stride]
    }

    pub fn lanes_row(&self, r: usize) -> &[f32] {
        &self.scale_lanes[r * self.stride / LANE..(r + 1) * self.stride / LANE]
    }

    pub fn sums_row(&self, r: usize) -> &[f32] {
        &self.group_sums[r * self.stride / GROUP..(r + 1) * self.stride / GROUP]
    }

    pub fn block_scale_row(&self, r: usize) -> &[f32] {
        &self.block_scale[r * self.stride / ACT_BLOCK..(r + 1) * self.stride / ACT_BLOCK]
    }

    pub fn block_sums_row(&self, r: usize) -> &[f32] {
        &self.block_sums[r * self.stride / ACT_BLOCK..(r + 1) * self.stride / ACT_BLOCK]
    }
}

/// llama.cpp's `quantize_row_q8_0_ref` for one block: `d = max|x| / 127`, `q = round(x / d)`.
/// Returns d. A block with a NaN quantizes to zeros with d = NaN, so the NaN still shows.
#[inline]
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    if x.iter().any(|v| v.is_nan()) {
        f32::NAN
    } else {
        d
    }
}

/// Rows per parallel task of the quantizer.
const ROWS_PER_TASK: usize = 16;

/// Every block of every row of `x` into `out` (allocated by `new`), rows in parallel for a
/// prefill.
fn fill(out: &mut QuantizedRows, x: &[f32], quantize_row: fn(&[f32], RowParts<'_>)) {
    let (k, stride) = (out.k.max(1), out.stride);
    let (lanes, blocks, groups) = (stride / LANE, stride / ACT_BLOCK, stride / GROUP);
    let parts: Vec<RowParts<'_>> = out
        .hi
        .chunks_mut(stride)
        .zip(out.lo.chunks_mut(stride))
        .zip(out.scale_lanes.chunks_mut(lanes))
        .zip(out.block_scale.chunks_mut(blocks).zip(out.block_sums.chunks_mut(blocks)))
        .zip(out.group_sums.chunks_mut(groups))
        .zip(out.wide.chunks_mut(stride).zip(out.wide_sums.chunks_mut(blocks)))
        .map(|(((((hi, lo), scale_lanes), (block_scale, block_sums)), group_sums), (wide, wide_sums))| RowParts {
            hi,
            lo,
            scale_lanes,
            block_scale,
            block_sums,
            group_sums,
            wide,
            wide_sums,
        })
        .collect();
    let rows: Vec<(&[f32], RowParts<'_>)> = x.chunks_exact(k).zip(parts).collect();
    if rows.len() <= ROWS_PER_TASK {
        rows.into_iter().for_each(|(x, part)| quantize_row(x, part));
    } else {
        use rayon::prelude::*;
        crate::kernels::pool::install(|| {
            rows.into_par_iter().with_min_len(ROWS_PER_TASK).for_each(|(x, part)| quantize_row(x, part))
        });
    }
}

/// One row's share of every array of `QuantizedRows`.
struct RowParts<'a> {
    hi: &'a mut [i8],
    lo: &'a mut [i8],
    scale_lanes: &'a mut [f32],
    block_scale: &'a mut [f32],
    block_sums: &'a mut [f32],
    group_sums: &'a mut [f32],
    wide: &'a mut [i16],
    wide_sums: &'a mut [i32],
}

/// One row's blocks in two digits, with their scales and sums.
fn quantize_row(x: &[f32], out: RowParts<'_>) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::has_avx512() {
        // SAFETY: the CPU has AVX-512F/VL.
        return unsafe { x86::quantize_row(x, out) };
    }
    quantize_row_any(x, out)
}

crate::kernels::math::dispatch! {
    /// `quantize_row` for any CPU: the definition the AVX-512 form is held to.
    fn quantize_row_any(x: &[f32], out: RowParts<'_>) {
        for (b, xs) in x.chunks_exact(ACT_BLOCK).enumerate() {
            let at = b * ACT_BLOCK;
            let (hi, lo) = (&mut out.hi[at..at + ACT_BLOCK], &mut out.lo[at..at + ACT_BLOCK]);
            let d = quantize_two_digits(xs, hi, lo);
            let scale = d / LO_SCALE;
            out.scale_lanes[at / LANE..(at + ACT_BLOCK) / LANE].fill(scale);
            out.block_scale[b] = scale;
            let wide = &mut out.wide[at..at + ACT_BLOCK];
            for ((w, &h), &l) in wide.iter_mut().zip(hi.iter()).zip(lo.iter()) {
                *w = ((h as i16) << LO_SHIFT) + l as i16;
            }
            let mut sums = [0i32; ACT_BLOCK / GROUP];
            for (g, sum) in sums.iter_mut().enumerate() {
                *sum = wide[g * GROUP..(g + 1) * GROUP].iter().map(|&w| w as i32).sum();
                out.group_sums[at / GROUP + g] = scale * *sum as f32;
            }
            out.wide_sums[b] = sums.iter().sum();
            out.block_sums[b] = scale * out.wide_sums[b] as f32;
        }
    }
}

/// The two digits of a block: `d = max|x| / 127`, `hi = round(x / d)`, then the remainder
/// `x - d * hi` in steps of `d / 128` (ties to even: these are ellm's own activations, and that
/// rounding vectorizes). Returns d; NaN where the block holds a NaN.
#[inline(always)]
pub fn quantize_two_digits(x: &[f32], hi: &mut [i8], lo: &mut [i8]) -> f32 {
    // max |x| as the largest bit pattern with the sign cleared: the same order for floats that
    // are not NaN, an integer max that vectorizes, and NaN wins (so d is NaN and shows)
    let amax = f32::from_bits(x.iter().map(|v| v.to_bits() & 0x7FFF_FFFF).max().unwrap_or(0));
    let d = amax / 127.0;
    if d == 0.0 || !d.is_finite() {
        // all zeros, or a NaN or infinity somewhere: zeros, and d shows it in every product
        hi.fill(0);
        lo.fill(0);
        return d;
    }
    let (id, id_lo) = (1.0 / d, LO_SCALE / d);
    for ((h, l), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(x) {
        let q = (v * id).round_ties_even().clamp(-127.0, 127.0);
        let r = ((v - d * q) * id_lo).round_ties_even().clamp(-64.0, 64.0);
        // SAFETY: every value is finite (max |x| is), so q and r are whole numbers in range;
        // the checked conversion would not vectorize
        unsafe {
            *h = q.to_int_unchecked::<i32>() as i8;
            *l = r.to_int_unchecked::<i32>() as i8;
        }
    }
    d
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! `quantize_row` 16 values to a vector: the same steps in the same order as
    //! `quantize_two_digits`, so the same digits, scales and sums.

    use std::arch::x86_64::*;

    use super::{RowParts, ACT_BLOCK, LO_SCALE, LO_SHIFT};
    use crate::kernels::quant::blocks::{GROUP, LANE};

    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    /// # Safety
    /// The CPU has AVX-512F/VL; `out` is one row's share of `QuantizedRows` for `x`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub unsafe fn quantize_row(x: &[f32], out: RowParts<'_>) {
        let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
        let (hi_max, lo_max) = (_mm512_set1_ps(127.0), _mm512_set1_ps(64.0));
        for (b, xs) in x.chunks_exact(ACT_BLOCK).enumerate() {
            let at = b * ACT_BLOCK;
            let v = [_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(GROUP))];
            // max |x| as the largest bit pattern with the sign cleared, as in quantize_two_digits
            let bits = v.map(|v| _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
            let amax = f32::from_bits(_mm512_reduce_max_epu32(_mm512_max_epu32(bits[0], bits[1])));
            let d = amax / 127.0;
            let scale = d / LO_SCALE;
            let mut sums = [0i32; ACT_BLOCK / GROUP];
            if d == 0.0 || !d.is_finite() {
                out.hi[at..at + ACT_BLOCK].fill(0);
                out.lo[at..at + ACT_BLOCK].fill(0);
                out.wide[at..at + ACT_BLOCK].fill(0);
            } else {
                let (id, id_lo, dv) = (_mm512_set1_ps(1.0 / d), _mm512_set1_ps(LO_SCALE / d), _mm512_set1_ps(d));
                for (g, v) in v.into_iter().enumerate() {
                    let q = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(v, id));
                    let q = _mm512_max_ps(_mm512_min_ps(q, hi_max), _mm512_sub_ps(_mm512_setzero_ps(), hi_max));
                    let rest = _mm512_sub_ps(v, _mm512_mul_ps(dv, q));
                    let r = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(rest, id_lo));
                    let r = _mm512_max_ps(_mm512_min_ps(r, lo_max), _mm512_sub_ps(_mm512_setzero_ps(), lo_max));
                    let (qi, ri) = (_mm512_cvtps_epi32(q), _mm512_cvtps_epi32(r));
                    let wide = _mm512_add_epi32(_mm512_slli_epi32::<LO_SHIFT>(qi), ri);
                    let to = at + g * GROUP;
                    _mm_storeu_si128(out.hi.as_mut_ptr().add(to).cast(), _mm512_cvtepi32_epi8(qi));
                    _mm_storeu_si128(out.lo.as_mut_ptr().add(to).cast(), _mm512_cvtepi32_epi8(ri));
                    _mm256_storeu_si256(out.wide.as_mut_ptr().add(to).cast(), _mm512_cvtepi32_epi16(wide));
                    sums[g] = _mm512_reduce_add_epi32(wide);
                }
            }
            out.scale_lanes[at / LANE..(at + ACT_BLOCK) / LANE].fill(scale);
            out.block_scale[b] = scale;
            for (g, &sum) in sums.iter().enumerate() {
                out.group_sums[at / GROUP + g] = scale * sum as f32;
            }
            out.wide_sums[b] = sums.iter().sum();
            out.block_sums[b] = scale * out.wide_sums[b] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cpu_path_quantizes_to_the_same_digits_scales_and_sums() {
        let mut x: Vec<f32> =
            (0..40 * 96u32).map(|i| ((i.wrapping_mul(2654435761) >> 8) as f32 / 16777216.0 - 0.5) * 7.0).collect();
        // a block of zeros, one with a NaN, one with an infinity, one with huge and tiny values,
        // and values exactly halfway between steps
        x[96..128].fill(0.0);
        x[200] = f32::NAN;
        x[300] = f32::INFINITY;
        x[320..352].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 2 == 0 { 3e38 } else { 1e-30 });
        x[352..384].iter_mut().enumerate().for_each(|(i, v)| *v = (i as f32 - 16.0) + 0.5);
        let (a, b) = (QuantizedRows::new(&x, 96), QuantizedRows::new_with(&x, 96, quantize_row_any));
        assert_eq!((&a.hi, &a.lo, &a.wide, &a.wide_sums), (&b.hi, &b.lo, &b.wide, &b.wide_sums));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (p, q) in [
            (&a.scale_lanes, &b.scale_lanes),
            (&a.block_scale, &b.block_scale),
            (&a.block_sums, &b.block_sums),
            (&a.group_sums, &b.group_sums),
        ] {
            assert_eq!(bits(p), bits(q));
        }
        let block_of = |i: usize| (i / 96) * a.stride / ACT_BLOCK + (i % 96) / ACT_BLOCK;
        assert!(a.block_scale[block_of(200)].is_nan() && a.block_scale[block_of(300)].is_infinite());
        assert!(a.hi.contains(&127) && a.lo.iter().any(|&l| l != 0));
    }
}
