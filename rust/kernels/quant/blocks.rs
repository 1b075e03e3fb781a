//! The block formats llama.cpp stores weights in (ggml-common.h), as `#[repr(C)]` structs of
//! bytes (alignment 1, so any byte slice of whole blocks can be viewed as blocks).
//!
//! Each block unpacks into the one form the integer kernels take: unsigned 8-bit values `u`
//! with, per group of 16 values, a scale and an offset, so that `w = scale * u + offset`. The
//! signed formats get their offset from the bias they were stored with (Q4_0 holds `q - 8`,
//! Q8_0 holds `q` as `q + 128`), so every product is `u8 x i8` and the offsets meet the
//! activations' group sums instead of every product.

use half::f16;

/// Values per scale group in the unpacked form (Q6_K's sub-blocks; every other format's are
/// whole multiples of it).
pub const GROUP: usize = 16;
/// Values per 32-bit lane of the integer dot products: `scale_lanes` repeats a group's scale
/// for each of its 4 lanes.
pub const LANE: usize = 4;

/// A block of `ELEMS` weights stored in `size_of::<Self>()` bytes.
pub trait Block: Copy + Send + Sync + 'static {
    const ELEMS: usize;
    /// The largest unpacked value: above 127 the AVX2 byte product could saturate.
    const MAX_U: u8;
    /// `u[ELEMS]`, `scale_lanes[ELEMS / LANE]` (each group's scale once per lane), and
    /// `offset[ELEMS / GROUP]`.
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]);
    /// The block's f16 scale fields (d, and m or dmin where it has one).
    fn halves(&self) -> [[u8; 2]; 2];
    /// Every scale field is finite (a NaN or infinite one makes the whole block so).
    fn finite(&self) -> bool {
        self.halves().iter().all(|h| u16::from_le_bytes(*h) & 0x7C00 != 0x7C00)
    }
}

#[inline(always)]
fn half(bytes: [u8; 2]) -> f32 {
    f16::from_le_bytes(bytes).to_f32()
}

/// Fill the scale lanes and offsets of the groups `first..first + n` with one scale and offset.
#[inline(always)]
fn groups(scale_lanes: &mut [f32], offset: &mut [f32], first: usize, n: usize, scale: f32, off: f32) {
    scale_lanes[first * (GROUP / LANE)..(first + n) * (GROUP / LANE)].fill(scale);
    offset[first..first + n].fill(off);
}

/// 4-bit values: the low nibbles of `qs` are values `0..qs.len()`, the high nibbles the next.
#[inline(always)]
fn nibbles(qs: &[u8], u: &mut [u8]) {
    let n = qs.len();
    for (j, &q) in qs.iter().enumerate() {
        u[j] = q & 0x0F;
        u[j + n] = q >> 4;
    }
}

/// `d * (q - 8)`, 32 per block.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; 16],
}

/// `d * q + m`, 32 per block.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; 16],
}

/// `d * (q - 16)` with the fifth bits in `qh`, 32 per block.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `d * q + m` with the fifth bits in `qh`, 32 per block.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `d * q`, 32 signed bytes per block.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [i8; 32],
}

/// 256 values in 8 sub-blocks of 32, each `d * sc * q - dmin * m` with 6-bit `sc` and `m`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

/// Q4_K with a fifth bit per value in `qh`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

/// 256 values in 16 sub-blocks of 16, each `d * sc * (q - 32)` with 6-bit `q` and signed `sc`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: [u8; 2],
}

const _: () = {
    use std::mem::{align_of, size_of};
    assert!(size_of::<BlockQ4_0>() == 18 && align_of::<BlockQ4_0>() == 1);
    assert!(size_of::<BlockQ4_1>() == 20 && align_of::<BlockQ4_1>() == 1);
    assert!(size_of::<BlockQ5_0>() == 22 && align_of::<BlockQ5_0>() == 1);
    assert!(size_of::<BlockQ5_1>() == 24 && align_of::<BlockQ5_1>() == 1);
    assert!(size_of::<BlockQ8_0>() == 34 && align_of::<BlockQ8_0>() == 1);
    assert!(size_of::<BlockQ4K>() == 144 && align_of::<BlockQ4K>() == 1);
    assert!(size_of::<BlockQ5K>() == 176 && align_of::<BlockQ5K>() == 1);
    assert!(size_of::<BlockQ6K>() == 210 && align_of::<BlockQ6K>() == 1);
};

impl Block for BlockQ4_0 {
    fn halves(&self) -> [[u8; 2]; 2] {
        [self.d, [0, 0]]
    }
    const ELEMS: usize = 32;
    const MAX_U: u8 = 15;
    #[inline(always)]
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]) {
        nibbles(&self.qs, u);
        let d = half(self.d);
        groups(scale_lanes, offset, 0, 2, d, -8.0 * d);
    }
}

impl Block for BlockQ4_1 {
    fn halves(&self) -> [[u8; 2]; 2] {
        [self.d, self.m]
    }
    const ELEMS: usize = 32;
    const MAX_U: u8 = 15;
    #[inline(always)]
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]) {
        nibbles(&self.qs, u);
        groups(scale_lanes, offset, 0, 2, half(self.d), half(self.m));
    }
}

/// Nibbles plus fifth bits: bit j of `qh` goes to value j, bit j + 16 to value j + 16.
#[inline(always)]
fn five_bits(qs: &[u8; 16], qh: [u8; 4], u: &mut [u8]) {
    let qh = u32::from_le_bytes(qh);
    for j in 0..16 {
        u[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
}

impl Block for BlockQ5_0 {
    fn halves(&self) -> [[u8; 2]; 2] {
        [self.d, [0, 0]]
    }
    const ELEMS: usize = 32;
    const MAX_U: u8 = 31;
    #[inline(always)]
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]) {
        five_bits(&self.qs, self.qh, u);
        let d = half(self.d);
        groups(scale_lanes, offset, 0, 2, d, -16.0 * d);
    }
}

impl Block for BlockQ5_1 {
    fn halves(&self) -> [[u8; 2]; 2] {
        [self.d, self.m]
    }
    const ELEMS: usize = 32;
    const MAX_U: u8 = 31;
    #[inline(always)]
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]) {
        five_bits(&self.qs, self.qh, u);
        groups(scale_lanes, offset, 0, 2, half(self.d), half(self.m));
    }
}

impl Block for BlockQ8_0 {
    fn halves(&self) -> [[u8; 2]; 2] {
        [self.d, [0, 0]]
    }
    const ELEMS: usize = 32;
    const MAX_U: u8 = 255;
    #[inline(always)]
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]) {
        for (u, &q) in u.iter_mut().zip(&self.qs) {
            *u = (q as u8) ^ 0x80; // q + 128
        }
        let d = half(self.d);
        groups(scale_lanes, offset, 0, 2, d, -128.0 * d);
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K or Q5_K block.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The scales and offsets of Q4_K and Q5_K: sub-block j covers groups 2j and 2j + 1.
#[inline(always)]
fn k4_groups(d: [u8; 2], dmin: [u8; 2], scales: &[u8; 12], scale_lanes: &mut [f32], offset: &mut [f32]) {
    let (d, dmin) = (half(d), half(dmin));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        groups(scale_lanes, offset, 2 * j, 2, d * sc as f32, -dmin * m as f32);
    }
}

impl Block for BlockQ4K {
    fn halves(&self) -> [[u8; 2]; 2] {
        [self.d, self.dmin]
    }
    const ELEMS: usize = 256;
    const MAX_U: u8 = 15;
    #[inline(always)]
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]) {
        // each 32 bytes hold two sub-blocks: low nibbles the first, high nibbles the second
        for c in 0..4 {
            nibbles(&self.qs[32 * c..32 * (c + 1)], &mut u[64 * c..64 * (c + 1)]);
        }
        k4_groups(self.d, self.dmin, &self.scales, scale_lanes, offset);
    }
}

impl Block for BlockQ5K {
    fn halves(&self) -> [[u8; 2]; 2] {
        [self.d, self.dmin]
    }
    const ELEMS: usize = 256;
    const MAX_U: u8 = 31;
    #[inline(always)]
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]) {
        // chunk c (64 values): nibbles of qs[32c..], fifth bits from bits 2c and 2c + 1 of qh
        for c in 0..4 {
            let qs = &self.qs[32 * c..32 * (c + 1)];
            for l in 0..32 {
                let h = self.qh[l] >> (2 * c);
                u[64 * c + l] = (qs[l] & 0x0F) | ((h & 1) << 4);
                u[64 * c + 32 + l] = (qs[l] >> 4) | (((h >> 1) & 1) << 4);
            }
        }
        k4_groups(self.d, self.dmin, &self.scales, scale_lanes, offset);
    }
}

impl Block for BlockQ6K {
    fn halves(&self) -> [[u8; 2]; 2] {
        [self.d, [0, 0]]
    }
    const ELEMS: usize = 256;
    const MAX_U: u8 = 63;
    #[inline(always)]
    fn unpack(&self, u: &mut [u8], scale_lanes: &mut [f32], offset: &mut [f32]) {
        // two halves of 128; in each, 64 bytes of ql and 32 of qh make four runs of 32 values
        for n in 0..2 {
            let (ql, qh, u) = (&self.ql[64 * n..], &self.qh[32 * n..], &mut u[128 * n..]);
            for l in 0..32 {
                let h = qh[l];
                u[l] = (ql[l] & 0x0F) | ((h & 3) << 4);
                u[l + 32] = (ql[l + 32] & 0x0F) | (((h >> 2) & 3) << 4);
                u[l + 64] = (ql[l] >> 4) | (((h >> 4) & 3) << 4);
                u[l + 96] = (ql[l + 32] >> 4) | (((h >> 6) & 3) << 4);
            }
        }
        let d = half(self.d);
        for (g, &sc) in self.scales.iter().enumerate() {
            let scale = d * sc as f32;
            groups(scale_lanes, offset, g, 1, scale, -32.0 * scale);
        }
    }
}
