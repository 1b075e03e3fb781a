//! Quantized weight matrices multiplied as stored: rows of llama.cpp blocks (`blocks`), the
//! activations quantized once to 8 bits (`activation`), integer dot products (`dot`), and the
//! matrix product over them (`matrix`).

/// Run `$body` with `$f` the block type of `$kind`.
macro_rules! with_kind {
    ($kind:expr, $f:ident => $body:expr) => {
        match $kind {
            QuantKind::Q4_0 => {
                type $f = BlockQ4_0;
                $body
            }
            QuantKind::Q4_1 => {
                type $f = BlockQ4_1;
                $body
            }
            QuantKind::Q5_0 => {
                type $f = BlockQ5_0;
                $body
            }
            QuantKind::Q5_1 => {
                type $f = BlockQ5_1;
                $body
            }
            QuantKind::Q8_0 => {
                type $f = BlockQ8_0;
                $body
            }
            QuantKind::Q4_K => {
                type $f = BlockQ4K;
                $body
            }
            QuantKind::Q5_K => {
                type $f = BlockQ5K;
                $body
            }
            QuantKind::Q6_K => {
                type $f = BlockQ6K;
                $body
            }
        }
    };
}
pub(crate) use with_kind;

pub mod activation;
pub mod blocks;
pub mod dot;
pub mod interleaved;
#[cfg(target_arch = "x86_64")]
pub mod interleaved_avx2;
pub mod matrix;
pub mod quantizer;
#[cfg(test)]
mod tests;

use blocks::*;

/// The block formats ellm multiplies directly, with their GGML type numbers.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl QuantKind {
    pub const ALL: [QuantKind; 8] = [
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q5_0,
        QuantKind::Q5_1,
        QuantKind::Q8_0,
        QuantKind::Q4_K,
        QuantKind::Q5_K,
        QuantKind::Q6_K,
    ];

    pub fn ggml_type(self) -> u32 {
        match self {
            QuantKind::Q4_0 => 2,
            QuantKind::Q4_1 => 3,
            QuantKind::Q5_0 => 6,
            QuantKind::Q5_1 => 7,
            QuantKind::Q8_0 => 8,
            QuantKind::Q4_K => 12,
            QuantKind::Q5_K => 13,
            QuantKind::Q6_K => 14,
        }
    }

    pub fn from_ggml_type(t: u32) -> Option<QuantKind> {
        QuantKind::ALL.into_iter().find(|k| k.ggml_type() == t)
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "Q4_0",
            QuantKind::Q4_1 => "Q4_1",
            QuantKind::Q5_0 => "Q5_0",
            QuantKind::Q5_1 => "Q5_1",
            QuantKind::Q8_0 => "Q8_0",
            QuantKind::Q4_K => "Q4_K",
            QuantKind::Q5_K => "Q5_K",
            QuantKind::Q6_K => "Q6_K",
        }
    }

    pub fn from_name(name: &str) -> Option<QuantKind> {
        QuantKind::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// Values per block.
    pub fn block_elems(self) -> usize {
        self.props().0
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.props().1
    }

    /// The two halves of a sub-block of 32 have scales of their own (Q6_K).
    pub fn split_halves(self) -> bool {
        self == QuantKind::Q6_K
    }

    /// Unpacked values may exceed 127.
    pub fn wide(self) -> bool {
        self.props().2 > 127
    }

    fn props(self) -> (usize, usize, u8) {
        with_kind!(self, B => (B::ELEMS, std::mem::size_of::<B>(), B::MAX_U))
    }

    /// How many blocks of `bytes` (whole blocks) have a NaN or infinite scale.
    pub fn non_finite_blocks(self, bytes: &[u8]) -> usize {
        with_kind!(self, B => as_blocks::<B>(bytes).iter().filter(|b| !b.finite()).count())
    }

    /// Unpack one row's blocks (`bytes`, whole blocks) into `row` (see `blocks`).
    pub fn unpack_row(self, bytes: &[u8], row: &mut UnpackedRow) {
        with_kind!(self, B => unpack_blocks::<B>(bytes, row))
    }
}

/// One weight row in the kernels' form, padded with zeros to a multiple of 64 values.
pub struct UnpackedRow {
    pub u: Vec<u8>,
    pub scale_lanes: Vec<f32>,
    pub offset: Vec<f32>,
}

impl UnpackedRow {
    pub fn new(cols: usize) -> Self {
        let stride = cols.next_multiple_of(activation::PAD);
        UnpackedRow { u: vec![0; stride], scale_lanes: vec![0.0; stride / LANE], offset: vec![0.0; stride / GROUP] }
    }

    /// The row as floats: `scale * u + offset`.
    pub fn dequantize(&self, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.scale_lanes[i / LANE] * self.u[i] as f32 + self.offset[i / GROUP];
        }
    }
}

fn unpack_blocks<B: Block>(bytes: &[u8], row: &mut UnpackedRow) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::simd::has_avx512() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { unpack_avx512::<B>(bytes, row) };
        }
        if crate::kernels::simd::has_avx2_fma() {
            // SAFETY: as above.
            return unsafe { unpack_avx2::<B>(bytes, row) };
        }
    }
    unpack_body::<B>(bytes, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn unpack_avx512<B: Block>(bytes: &[u8], row: &mut UnpackedRow) {
    unpack_body::<B>(bytes, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_avx2<B: Block>(bytes: &[u8], row: &mut UnpackedRow) {
    unpack_body::<B>(bytes, row)
}

#[inline(always)]
fn unpack_body<B: Block>(bytes: &[u8], row: &mut UnpackedRow) {
    let blocks = as_blocks::<B>(bytes);
    let (e, l, g) = (B::ELEMS, B::ELEMS / LANE, B::ELEMS / GROUP);
    for (i, b) in blocks.iter().enumerate() {
        b.unpack(
            &mut row.u[i * e..(i + 1) * e],
            &mut row.scale_lanes[i * l..(i + 1) * l],
            &mut row.offset[i * g..(i + 1) * g],
        );
    }
}

/// Whole blocks viewed in place.
pub fn as_blocks<B: Block>(bytes: &[u8]) -> &[B] {
    let size = std::mem::size_of::<B>();
    assert!(bytes.len().is_multiple_of(size), "a row is whole blocks");
    // SAFETY: `B` is a repr(C) struct of byte arrays (alignment 1, every bit pattern valid) and
    // the slice covers exactly `len / size` of them.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) }
}
