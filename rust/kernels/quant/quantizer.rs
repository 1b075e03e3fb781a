//! f32 rows to Q8_0 and Q4_0 blocks, with llama.cpp's reference rounding
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`), for `dtype="q8_0"` / `"q4_0"` on load.

use half::f16;

use super::activation::quantize_block;
use super::QuantKind;

/// The blocks of `x` (a multiple of 32 values) in `kind`, which must be Q8_0 or Q4_0.
pub fn quantize(x: &[f32], kind: QuantKind) -> Vec<u8> {
    assert!(x.len().is_multiple_of(32));
    let mut out = Vec::with_capacity(x.len() / 32 * kind.block_bytes());
    for block in x.chunks_exact(32) {
        match kind {
            QuantKind::Q8_0 => {
                let mut q = [0i8; 32];
                let d = quantize_block(block, &mut q);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(q.iter().map(|&v| v as u8));
            }
            QuantKind::Q4_0 => {
                // the value of largest magnitude, with its sign, maps to -8
                let max = block.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let level = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend((0..16).map(|j| level(block[j]) | (level(block[j + 16]) << 4)));
            }
            other => panic!("no quantizer for {}", other.name()),
        }
    }
    out
}
