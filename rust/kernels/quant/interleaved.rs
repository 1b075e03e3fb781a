//! Quantized rows repacked at load, 16 at a time, for the AVX-512 VNNI kernel (and, half a
//! vector at a time, the AVX2 one in `interleaved_avx2`): each 32-bit lane
//! of a vector holds 4 consecutive values of one of 16 rows, so one `vpdpbusd` against 4
//! activation bytes broadcast to every lane advances 16 rows at once, and each block's scales
//! arrive as one vector of 16 rows. (The row-at-a-time form would reduce every block of every
//! row across lanes instead.)
//!
//! The layout of a group of 16 rows is, block after block: a head (the block scales of the 16
//! rows), then per sub-block of 32 values the value planes and that sub-block's scales:
//! - a nibble plane (4 vectors): vector g, lane r, byte k holds the low 4 bits of values
//!   4g + k (low nibble) and 16 + 4g + k (high nibble) of row r;
//! - for 5- and 6-bit formats one or two bit planes (1 vector each): lane r, byte k, bit j holds
//!   bit 4 (or 5) of value 4j + k of row r, so one shift by a constant per vector lines it up;
//! - for 8-bit values a byte plane (8 vectors): vector g, lane r holds values 4g..4g + 4.
//!
//! Every format keeps its bytes per weight (the K formats' 6-bit sub-block scales take a byte
//! each: Q4_K 148 bytes per 256 values instead of 144, Q5_K 180 instead of 176).

use super::blocks::*;
use super::{QuantKind, UnpackedRow};

/// Rows per interleaved group.
pub const ROWS: usize = 16;
pub(super) const VECTOR: usize = 64;
pub(super) const SUB: usize = 32;

/// How one format's blocks are repacked: the value bits, and its scale bytes.
pub trait Interleave: Block {
    /// Bits per value: 4, 5, 6 or 8.
    const BITS: u32;
    /// Bytes of the block head for 16 rows.
    const HEAD: usize;
    /// Scale bytes per sub-block for 16 rows.
    const SUB_SCALES: usize;
    /// The two halves (16 values) of a sub-block have their own scales (Q6_K).
    const SPLIT: bool = false;

    fn pack_head(rows: &[&Self; ROWS], head: &mut [u8]);
    fn pack_sub_scales(rows: &[&Self; ROWS], sub: usize, out: &mut [u8]);
    /// Write the value planes of a 32-value block straight from its stored bytes, if the
    /// format's layout allows (true); otherwise `pack` unpacks the values first.
    fn pack_values_directly(_rows: &[&Self; ROWS], _sub: &mut [u8]) -> bool {
        false
    }
    /// Scale and offset of row r's values in half `half` of sub-block `sub` (w = s * u + o).
    fn scale_offset(head: &[u8], sub_scales: &[u8], r: usize, half: usize) -> (f32, f32);
}

pub(super) const fn value_bytes(bits: u32) -> usize {
    match bits {
        8 => 8 * VECTOR,
        4 => 4 * VECTOR,
        5 => 5 * VECTOR,
        _ => 6 * VECTOR,
    }
}

pub(super) const fn sub_bytes<F: Interleave>() -> usize {
    value_bytes(F::BITS) + F::SUB_SCALES
}

/// Bytes of one block for 16 rows.
pub const fn block_bytes<F: Interleave>() -> usize {
    F::HEAD + F::ELEMS / SUB * sub_bytes::<F>()
}

fn half_le(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn put_halves(head: &mut [u8], at: usize, values: impl Iterator<Item = [u8; 2]>) {
    for (r, v) in values.enumerate() {
        head[at + 2 * r..at + 2 * r + 2].copy_from_slice(&v);
    }
}

/// A 32-value format whose offset is a fixed number of steps below zero (`w = d * (q - levels)`):
/// its head holds d.
macro_rules! scale_and_levels {
    ($t:ty, $bits:expr, $levels:expr, $direct:expr) => {
        impl Interleave for $t {
            const BITS: u32 = $bits;
            const HEAD: usize = 32;
            const SUB_SCALES: usize = 0;
            fn pack_values_directly(rows: &[&Self; ROWS], sub: &mut [u8]) -> bool {
                $direct(rows, sub);
                true
            }
            fn pack_head(rows: &[&Self; ROWS], head: &mut [u8]) {
                put_halves(head, 0, rows.iter().map(|b| b.d));
            }
            fn pack_sub_scales(_: &[&Self; ROWS], _: usize, _: &mut [u8]) {}
            fn scale_offset(head: &[u8], _: &[u8], r: usize, _: usize) -> (f32, f32) {
                let d = half_le(head, 2 * r);
                (d, -$levels * d)
            }
        }
    };
}
scale_and_levels!(BlockQ4_0, 4, 8.0, |rows: &[&BlockQ4_0; ROWS], sub| nibble_plane(rows.map(|b| &b.qs), sub));
scale_and_levels!(BlockQ5_0, 5, 16.0, |rows: &[&BlockQ5_0; ROWS], sub: &mut [u8]| {
    nibble_plane(rows.map(|b| &b.qs), sub);
    fifth_bit_plane(rows.map(|b| b.qh), sub);
});
scale_and_levels!(BlockQ8_0, 8, 128.0, |rows: &[&BlockQ8_0; ROWS], sub| byte_plane(rows.map(|b| &b.qs), sub));

/// A 32-value format with a scale and a min (`w = d * q + m`): its head holds d, then m.
macro_rules! scale_and_min {
    ($t:ty, $bits:expr, $direct:expr) => {
        impl Interleave for $t {
            const BITS: u32 = $bits;
            const HEAD: usize = 64;
            const SUB_SCALES: usize = 0;
            fn pack_values_directly(rows: &[&Self; ROWS], sub: &mut [u8]) -> bool {
                $direct(rows, sub);
                true
            }
            fn pack_head(rows: &[&Self; ROWS], head: &mut [u8]) {
                put_halves(head, 0, rows.iter().map(|b| b.d));
                put_halves(head, 32, rows.iter().map(|b| b.m));
            }
            fn pack_sub_scales(_: &[&Self; ROWS], _: usize, _: &mut [u8]) {}
            fn scale_offset(head: &[u8], _: &[u8], r: usize, _: usize) -> (f32, f32) {
                (half_le(head, 2 * r), half_le(head, 32 + 2 * r))
            }
        }
    };
}
scale_and_min!(BlockQ4_1, 4, |rows: &[&BlockQ4_1; ROWS], sub| nibble_plane(rows.map(|b| &b.qs), sub));
scale_and_min!(BlockQ5_1, 5, |rows: &[&BlockQ5_1; ROWS], sub: &mut [u8]| {
    nibble_plane(rows.map(|b| &b.qs), sub);
    fifth_bit_plane(rows.map(|b| b.qh), sub);
});

/// The nibble plane of 32-value blocks: their `qs` byte j already holds value j (low nibble)
/// and value j + 16 (high), as a lane's byte k of vector g wants for j = 4g + k.
fn nibble_plane(qs: [&[u8; 16]; ROWS], sub: &mut [u8]) {
    for (r, q) in qs.iter().enumerate() {
        for g in 0..4 {
            sub[g * VECTOR + 4 * r..g * VECTOR + 4 * r + 4].copy_from_slice(&q[4 * g..4 * g + 4]);
        }
    }
}

/// The bit plane of Q5_0 / Q5_1: bit e of `qh` is value e's fifth bit; lane byte k, bit j takes
/// value 4j + k's.
fn fifth_bit_plane(qh: [[u8; 4]; ROWS], sub: &mut [u8]) {
    for (r, h) in qh.iter().enumerate() {
        let bits = u32::from_le_bytes(*h);
        for k in 0..4 {
            sub[4 * VECTOR + 4 * r + k] = every_fourth_bit(bits >> k);
        }
    }
}

/// Bits 0, 4, 8, .., 28 of `x` as bits 0..8 of a byte, gathered in three folds of the halves.
fn every_fourth_bit(x: u32) -> u8 {
    let x = x & 0x1111_1111;
    let x = (x | x >> 3) & 0x0303_0303;
    let x = (x | x >> 6) & 0x000F_000F;
    ((x | x >> 12) & 0xFF) as u8
}

/// The byte plane of Q8_0: values as `q + 128`, vector g lane r holding values 4g..4g + 4.
fn byte_plane(qs: [&[i8; 32]; ROWS], sub: &mut [u8]) {
    for (r, q) in qs.iter().enumerate() {
        for g in 0..8 {
            // four values at once, each + 128 (a whole load's worth of Q8_0 goes through here)
            let four = u32::from_le_bytes(std::array::from_fn(|k| q[4 * g + k] as u8)) ^ 0x8080_8080;
            sub[g * VECTOR + 4 * r..g * VECTOR + 4 * r + 4].copy_from_slice(&four.to_le_bytes());
        }
    }
}

/// Q4_K and Q5_K: d and dmin per row in the head; per sub-block the 6-bit scale and min, one
/// byte each.
fn k4_head<const N: usize>(d: impl Iterator<Item = [u8; 2]>, dmin: impl Iterator<Item = [u8; 2]>, head: &mut [u8]) {
    put_halves(head, 0, d);
    put_halves(head, 32, dmin);
}

fn k4_sub_scales(scales: impl Iterator<Item = [u8; 12]>, sub: usize, out: &mut [u8]) {
    for (r, s) in scales.enumerate() {
        let (sc, m) = scale_min_k4(sub, &s);
        out[r] = sc;
        out[ROWS + r] = m;
    }
}

fn k4_scale_offset(head: &[u8], sub_scales: &[u8], r: usize) -> (f32, f32) {
    (half_le(head, 2 * r) * sub_scales[r] as f32, -half_le(head, 32 + 2 * r) * sub_scales[ROWS + r] as f32)
}

macro_rules! k_scales {
    ($t:ty, $bits:expr) => {
        impl Interleave for $t {
            const BITS: u32 = $bits;
            const HEAD: usize = 64;
            const SUB_SCALES: usize = 32;
            fn pack_head(rows: &[&Self; ROWS], head: &mut [u8]) {
                k4_head::<0>(rows.iter().map(|b| b.d), rows.iter().map(|b| b.dmin), head);
            }
            fn pack_sub_scales(rows: &[&Self; ROWS], sub: usize, out: &mut [u8]) {
                k4_sub_scales(rows.iter().map(|b| b.scales), sub, out);
            }
            fn scale_offset(head: &[u8], sub_scales: &[u8], r: usize, _: usize) -> (f32, f32) {
                k4_scale_offset(head, sub_scales, r)
            }
        }
    };
}
k_scales!(BlockQ4K, 4);
k_scales!(BlockQ5K, 5);

impl Interleave for BlockQ6K {
    const BITS: u32 = 6;
    const HEAD: usize = 32;
    const SUB_SCALES: usize = 32;
    const SPLIT: bool = true;
    fn pack_head(rows: &[&Self; ROWS], head: &mut [u8]) {
        put_halves(head, 0, rows.iter().map(|b| b.d));
    }
    fn pack_sub_scales(rows: &[&Self; ROWS], sub: usize, out: &mut [u8]) {
        for (r, b) in rows.iter().enumerate() {
            out[r] = b.scales[2 * sub] as u8;
            out[ROWS + r] = b.scales[2 * sub + 1] as u8;
        }
    }
    fn scale_offset(head: &[u8], sub_scales: &[u8], r: usize, half: usize) -> (f32, f32) {
        let s = half_le(head, 2 * r) * sub_scales[half * ROWS + r] as i8 as f32;
        (s, -32.0 * s)
    }
}

/// 16 rows of `F` blocks repacked into `out` (one group's bytes): `rows[r]` is row r's blocks.
#[allow(clippy::needless_range_loop)] // block b of all 16 rows at once
pub fn pack<F: Interleave>(rows: &[&[F]; ROWS], out: &mut [u8]) {
    let mut u = [[0u8; 256]; ROWS];
    let (mut lanes, mut offsets) = ([0.0f32; 64], [0.0f32; 16]);
    for b in 0..rows[0].len() {
        let blocks: [&F; ROWS] = std::array::from_fn(|r| &rows[r][b]);
        let block = &mut out[b * block_bytes::<F>()..(b + 1) * block_bytes::<F>()];
        F::pack_head(&blocks, &mut block[..F::HEAD]);
        if F::ELEMS == SUB && F::pack_values_directly(&blocks, &mut block[F::HEAD..]) {
            continue;
        }
        for r in 0..ROWS {
            blocks[r].unpack(&mut u[r][..F::ELEMS], &mut lanes[..F::ELEMS / LANE], &mut offsets[..F::ELEMS / GROUP]);
        }
        for j in 0..F::ELEMS / SUB {
            let sub = &mut block[F::HEAD + j * sub_bytes::<F>()..][..sub_bytes::<F>()];
            pack_values(F::BITS, &u, j * SUB, sub);
            F::pack_sub_scales(&blocks, j, &mut sub[value_bytes(F::BITS)..]);
        }
    }
}

/// The value planes of one sub-block (values `base..base + 32` of every row of `u`).
fn pack_values(bits: u32, u: &[[u8; 256]; ROWS], base: usize, sub: &mut [u8]) {
    let vectors: &mut [[u8; VECTOR]] = sub.as_chunks_mut::<VECTOR>().0;
    for (r, row) in u.iter().enumerate() {
        let v: &[u8; SUB] = row[base..base + SUB].try_into().expect("a sub-block");
        if bits == 8 {
            for g in 0..8 {
                vectors[g][4 * r..4 * r + 4].copy_from_slice(&v[4 * g..4 * g + 4]);
            }
            continue;
        }
        for g in 0..4 {
            for k in 0..4 {
                vectors[g][4 * r + k] = (v[4 * g + k] & 0x0F) | ((v[16 + 4 * g + k] & 0x0F) << 4);
            }
        }
        for plane in 0..(bits as usize - 4) {
            for k in 0..4 {
                let mut byte = 0u8;
                for j in 0..8 {
                    byte |= ((v[4 * j + k] >> (4 + plane)) & 1) << j;
                }
                vectors[4 + plane][4 * r + k] = byte;
            }
        }
    }
}

/// Row r (0..16) of one packed group back in the row-at-a-time form.
pub fn unpack_row<F: Interleave>(group: &[u8], blocks: usize, r: usize, row: &mut UnpackedRow) {
    for b in 0..blocks {
        let block = &group[b * block_bytes::<F>()..][..block_bytes::<F>()];
        let head = &block[..F::HEAD];
        for j in 0..F::ELEMS / SUB {
            let sub = &block[F::HEAD + j * sub_bytes::<F>()..][..sub_bytes::<F>()];
            let base = (b * F::ELEMS / SUB + j) * SUB;
            for e in 0..SUB {
                row.u[base + e] = packed_value(F::BITS, sub, r, e);
            }
            for half in 0..2 {
                let (s, o) = F::scale_offset(head, &sub[value_bytes(F::BITS)..], r, if F::SPLIT { half } else { 0 });
                let g = base / GROUP + half;
                row.scale_lanes[g * (GROUP / LANE)..(g + 1) * (GROUP / LANE)].fill(s);
                row.offset[g] = o;
            }
        }
    }
}

fn packed_value(bits: u32, sub: &[u8], r: usize, e: usize) -> u8 {
    let k = e % 4;
    let lane = 4 * r + k;
    if bits == 8 {
        return sub[(e / 4) * VECTOR + lane];
    }
    let (g, high) = ((e % 16) / 4, e >= 16);
    let byte = sub[g * VECTOR + lane];
    let mut v = if high { byte >> 4 } else { byte & 0x0F };
    for plane in 0..(bits as usize - 4) {
        v |= ((sub[(4 + plane) * VECTOR + lane] >> (e / 4)) & 1) << (4 + plane);
    }
    v
}

/// Bytes per group of 16 rows of `cols` values.
pub fn group_bytes(kind: QuantKind, cols: usize) -> usize {
    super::with_kind!(kind, F => cols / F::ELEMS * block_bytes::<F>())
}

/// Which weights a kernel call over one group asks the memory for ahead of its loads.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// Its own sub-blocks a fixed distance ahead (running on into the next group's first): a
    /// core streams weights from RAM faster with requests ahead of its loads.
    Ahead,
    /// Part `part` of `parts` of the group that follows, spread evenly over the call: while the
    /// later tiles of inputs compute from the cache, the memory brings the next group in, so
    /// streaming and compute overlap.
    Next { part: usize, parts: usize },
    /// Nothing: the group is already in the cache.
    Off,
}

/// How far ahead of the sub-block being multiplied `Prefetch::Ahead` asks.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 2048;

/// One kernel call's prefetching over its group, told of each sub-block as the call reaches it.
#[cfg(target_arch = "x86_64")]
pub(super) struct Prefetcher {
    mode: Prefetch,
    group: *const u8,
    group_len: usize,
    /// `Next`: the next group's bytes asked for so far, and where this call's part ends.
    next_at: usize,
    next_end: usize,
}

#[cfg(target_arch = "x86_64")]
impl Prefetcher {
    pub(super) fn new(mode: Prefetch, group: &[u8]) -> Self {
        let (next_at, next_end) = match mode {
            Prefetch::Next { part, parts } => (part * group.len() / parts, (part + 1) * group.len() / parts),
            _ => (0, 0),
        };
        Prefetcher { mode, group: group.as_ptr(), group_len: group.len(), next_at, next_end }
    }

    /// The call reached the `len` bytes at `sub` of its group.
    #[inline(always)]
    pub(super) unsafe fn reached(&mut self, sub: *const u8, len: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        match self.mode {
            Prefetch::Ahead => {
                for line in 0..len.div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(sub.wrapping_add(PREFETCH_AHEAD + 64 * line).cast());
                }
            }
            Prefetch::Next { parts, .. } => {
                // as far into the part as the call is into its group
                let left = self.group_len - (sub.offset_from(self.group) as usize + len);
                let until = self.next_end - left / parts;
                while self.next_at < until {
                    _mm_prefetch::<_MM_HINT_T0>(self.group.wrapping_add(self.group_len + self.next_at).cast());
                    self.next_at += 64;
                }
            }
            Prefetch::Off => {}
        }
    }
}

#[cfg(test)]
#[test]
fn every_fourth_bit_gathers_bits_four_apart() {
    let mut state = 0x9E37_79B9u32;
    for _ in 0..10_000 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let want = (0..8).map(|j| (((state >> (4 * j)) & 1) as u8) << j).fold(0, |a, b| a | b);
        assert_eq!(every_fourth_bit(state), want, "{state:#x}");
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    //! The AVX-512 VNNI kernel over one group of 16 rows.

    use std::arch::x86_64::*;

    use super::{block_bytes, sub_bytes, value_bytes, Interleave, Prefetch, Prefetcher, ROWS, SUB, VECTOR};

    use crate::kernels::quant::activation::{QuantizedRows, LO_SHIFT};
    use crate::kernels::quant::blocks::*;

    /// The values of lanes `4g..4g + 4` (`lo`) and `16 + 4g..` (`hi`) of a sub-block.
    #[inline(always)]
    unsafe fn values(bits: u32, sub: *const u8, g: usize) -> (__m512i, __m512i) {
        if bits == 8 {
            return (
                _mm512_loadu_si512(sub.add(g * VECTOR).cast()),
                _mm512_loadu_si512(sub.add((g + 4) * VECTOR).cast()),
            );
        }
        let nibbles = _mm512_loadu_si512(sub.add(g * VECTOR).cast());
        let mask = _mm512_set1_epi8(0x0F);
        let mut lo = _mm512_and_si512(nibbles, mask);
        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(nibbles), mask);
        for plane in 0..(bits as usize).saturating_sub(4) {
            let bits = _mm512_loadu_si512(sub.add((4 + plane) * VECTOR).cast());
            let target = _mm512_set1_epi8((0x10u8 << plane) as i8);
            // lo needs bit g of each byte at bit 4 + plane; hi needs bit 4 + g there
            let to = 4 + plane as u32;
            let lo_bits = shift(bits, g as u32, to);
            let hi_bits = shift(bits, 4 + g as u32, to);
            lo = _mm512_or_si512(lo, _mm512_and_si512(lo_bits, target));
            hi = _mm512_or_si512(hi, _mm512_and_si512(hi_bits, target));
        }
        (lo, hi)
    }

    /// Move bit `from` of every byte to bit `to` (other bits of the result are garbage).
    #[inline(always)]
    unsafe fn shift(v: __m512i, from: u32, to: u32) -> __m512i {
        if to >= from {
            _mm512_sllv_epi32(v, _mm512_set1_epi32((to - from) as i32))
        } else {
            _mm512_srlv_epi32(v, _mm512_set1_epi32((from - to) as i32))
        }
    }

    #[inline(always)]
    unsafe fn broadcast4(p: *const i8) -> __m512i {
        _mm512_set1_epi32(p.cast::<i32>().read_unaligned())
    }

    /// Each format's scale and offset vectors (16 rows) of half `half` of a sub-block, from
    /// its head and sub-block scale bytes: the vector form of `Interleave::scale_offset`.
    pub trait Scales16: Interleave {
        /// # Safety
        /// The pointers address a packed block's head and a sub-block's scale bytes, and the
        /// CPU has AVX-512F.
        unsafe fn scales16(head: *const u8, sub_scales: *const u8, half: usize) -> (__m512, __m512);
    }

    #[inline(always)]
    unsafe fn halves16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    #[inline(always)]
    unsafe fn bytes16(p: *const u8, signed: bool) -> __m512 {
        let b = _mm_loadu_si128(p.cast());
        _mm512_cvtepi32_ps(if signed { _mm512_cvtepi8_epi32(b) } else { _mm512_cvtepu8_epi32(b) })
    }

    macro_rules! levels16 {
        ($t:ty, $levels:expr) => {
            impl Scales16 for $t {
                #[inline(always)]
                unsafe fn scales16(head: *const u8, _: *const u8, _: usize) -> (__m512, __m512) {
                    let d = halves16(head);
                    (d, _mm512_mul_ps(d, _mm512_set1_ps($levels)))
                }
            }
        };
    }
    levels16!(BlockQ4_0, -8.0);
    levels16!(BlockQ5_0, -16.0);
    levels16!(BlockQ8_0, -128.0);

    macro_rules! min16 {
        ($t:ty) => {
            impl Scales16 for $t {
                #[inline(always)]
                unsafe fn scales16(head: *const u8, _: *const u8, _: usize) -> (__m512, __m512) {
                    (halves16(head), halves16(head.add(32)))
                }
            }
        };
    }
    min16!(BlockQ4_1);
    min16!(BlockQ5_1);

    macro_rules! k4 {
        ($t:ty) => {
            impl Scales16 for $t {
                #[inline(always)]
                unsafe fn scales16(head: *const u8, sub_scales: *const u8, _: usize) -> (__m512, __m512) {
                    let (d, dmin) = (halves16(head), halves16(head.add(32)));
                    let (sc, m) = (bytes16(sub_scales, false), bytes16(sub_scales.add(ROWS), false));
                    (_mm512_mul_ps(d, sc), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, m)))
                }
            }
        };
    }
    k4!(BlockQ4K);
    k4!(BlockQ5K);

    impl Scales16 for BlockQ6K {
        #[inline(always)]
        unsafe fn scales16(head: *const u8, sub_scales: *const u8, half: usize) -> (__m512, __m512) {
            let s = _mm512_mul_ps(halves16(head), bytes16(sub_scales.add(half * ROWS), true));
            (s, _mm512_mul_ps(s, _mm512_set1_ps(-32.0)))
        }
    }

    /// `out[k][c][r]` = row r of group `groups[k]` against activation row `first + c`, for RX
    /// activation rows and G groups at once: each activation broadcast feeds G products, each
    /// weight vector RX (the kernel is bound by loads otherwise).
    ///
    /// # Safety
    /// Each group is one whole packed group of `F` for rows as long as `act`'s, activation rows
    /// `first..first + RX` exist, and the CPU has AVX-512 F/BW/VL/VNNI.
    #[allow(clippy::needless_range_loop)] // index loops over arrays of vector registers
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c,fma")]
    pub unsafe fn group_dot<F: Scales16, const RX: usize, const G: usize>(
        groups: [&[u8]; G],
        act: &QuantizedRows,
        first: usize,
        prefetch: Prefetch,
        out: &mut [[[f32; ROWS]; RX]; G],
    ) {
        let blocks = groups[0].len() / block_bytes::<F>();
        let mut prefetchers: [Prefetcher; G] = std::array::from_fn(|k| Prefetcher::new(prefetch, groups[k]));
        let mut acc = [[_mm512_setzero_ps(); RX]; G];
        let subs = F::ELEMS / SUB;
        let half_of_hi = if F::SPLIT { 1 } else { 0 };
        for b in 0..blocks {
            let block: [*const u8; G] = std::array::from_fn(|k| groups[k].as_ptr().add(b * block_bytes::<F>()));
            for j in 0..subs {
                let sub: [*const u8; G] = std::array::from_fn(|k| block[k].add(F::HEAD + j * sub_bytes::<F>()));
                for (p, &at) in prefetchers.iter_mut().zip(&sub) {
                    p.reached(at, sub_bytes::<F>());
                }
                let ab = b * subs + j; // the activation block
                let zero = _mm512_setzero_si512();
                // [group][c][half][digit]
                let mut sums = [[[[zero; 2]; 2]; RX]; G];
                for g in 0..4 {
                    let vals: [(__m512i, __m512i); G] = std::array::from_fn(|k| values(F::BITS, sub[k], g));
                    for c in 0..RX {
                        let at = (first + c) * act.stride + ab * SUB + 4 * g;
                        let (h, l) = (act.hi.as_ptr().add(at), act.lo.as_ptr().add(at));
                        let digits = [broadcast4(h), broadcast4(l), broadcast4(h.add(16)), broadcast4(l.add(16))];
                        for k in 0..G {
                            let (lo, hi) = vals[k];
                            let s = &mut sums[k][c];
                            s[0][0] = _mm512_dpbusd_epi32(s[0][0], lo, digits[0]);
                            s[0][1] = _mm512_dpbusd_epi32(s[0][1], lo, digits[1]);
                            s[half_of_hi][0] = _mm512_dpbusd_epi32(s[half_of_hi][0], hi, digits[2]);
                            s[half_of_hi][1] = _mm512_dpbusd_epi32(s[half_of_hi][1], hi, digits[3]);
                        }
                    }
                }
                for half in 0..if F::SPLIT { 2 } else { 1 } {
                    let scales: [(__m512, __m512); G] =
                        std::array::from_fn(|k| F::scales16(block[k], sub[k].add(value_bytes(F::BITS)), half));
                    for c in 0..RX {
                        let row = first + c;
                        let da = _mm512_set1_ps(act.block_scale[row * act.stride / SUB + ab]);
                        let asum = _mm512_set1_ps(if F::SPLIT {
                            act.group_sums[row * act.stride / 16 + 2 * ab + half]
                        } else {
                            act.block_sums[row * act.stride / SUB + ab]
                        });
                        for k in 0..G {
                            let (scale, offset) = scales[k];
                            let [h, l] = sums[k][c][half];
                            let ints = _mm512_add_epi32(_mm512_slli_epi32::<LO_SHIFT>(h), l);
                            let a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), _mm512_mul_ps(scale, da), acc[k][c]);
                            acc[k][c] = _mm512_fmadd_ps(offset, asum, a);
                        }
                    }
                }
            }
        }
        for k in 0..G {
            for c in 0..RX {
                _mm512_storeu_ps(out[k][c].as_mut_ptr(), acc[k][c]);
            }
        }
    }
}
