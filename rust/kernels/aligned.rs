//! f32 values that start on a 64-byte boundary. The SIMD kernels handle the elements before a
//! matrix's first cache-line boundary on their own (`simd::head`), so where the allocator put a
//! matrix used to decide its products' summation order: the same weights loaded twice gave
//! logits a few ulps apart. Weights kept here always have an empty head.

use std::ops::Deref;

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

pub struct AlignedF32 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedF32 {
    pub fn from_slice(values: &[f32]) -> Self {
        let mut lines = vec![Line([0.0; 16]); values.len().div_ceil(16)];
        for (line, chunk) in lines.iter_mut().zip(values.chunks(16)) {
            line.0[..chunk.len()].copy_from_slice(chunk);
        }
        AlignedF32 { lines, len: values.len() }
    }
}

impl Deref for AlignedF32 {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` contiguous f32 values (Line is 16 of them, repr(C)).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_values_on_a_cache_line_boundary() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let values: Vec<f32> = (0..len).map(|i| i as f32 * 0.5).collect();
            let aligned = AlignedF32::from_slice(&values);
            assert_eq!(&aligned[..], &values[..]);
            assert_eq!(aligned.as_ptr() as usize % 64, 0);
        }
    }
}
