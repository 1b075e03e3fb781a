//! Keys and values of every past position, allocated once:
//! `[layers, batch, kv_heads, max_seq_len, head_dim]` for keys and the same for values.
//!
//! Each sequence remembers how many positions it has written (`filled`), so resetting touches
//! only those, and a step that fails can be undone (`save` before it, `restore` after).

use crate::error::{EllmError, Result};
use crate::kernels::attention::KvView;

pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    layers: usize,
    batch: usize,
    kv_heads: usize,
    max_seq_len: usize,
    head_dim: usize,
    /// Per sequence: every position at or past this one holds zeros.
    filled: Vec<usize>,
}

/// What a step will overwrite: the cached positions `start..end` of the first `rows` sequences
/// that held values before it, and how far each sequence was written.
pub struct Saved {
    rows: usize,
    start: usize,
    end: usize,
    filled: Vec<usize>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    /// Zeroed memory comes from the allocator untouched, so unused capacity costs no RSS. A size
    /// the machine cannot hold is an error here, not an abort in the allocator.
    pub fn new(layers: usize, batch: usize, kv_heads: usize, max_seq_len: usize, head_dim: usize) -> Result<Self> {
        let len = [layers, batch, kv_heads, max_seq_len, head_dim]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n.checked_mul(2 * std::mem::size_of::<f32>()).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| EllmError::Memory("the KV cache's size overflows".into()))?;
        let (keys, values) = if len > 0 { (try_zeroed(len)?, try_zeroed(len)?) } else { (Vec::new(), Vec::new()) };
        Ok(KvCache { keys, values, layers, batch, kv_heads, max_seq_len, head_dim, filled: vec![0; batch] })
    }

    /// Zero what was written; the rest is still zero.
    pub fn reset(&mut self) {
        for (b, at) in self.spans(self.batch, 0) {
            let n = self.filled[b] * self.head_dim;
            self.keys[at..at + n].fill(0.0);
            self.values[at..at + n].fill(0.0);
        }
        self.filled.fill(0);
    }

    fn sequence_len(&self) -> usize {
        self.kv_heads * self.max_seq_len * self.head_dim
    }

    fn offset(&self, layer: usize, b: usize, head: usize, pos: usize) -> usize {
        (((layer * self.batch + b) * self.kv_heads + head) * self.max_seq_len + pos) * self.head_dim
    }

    /// Store the `[kv_heads * head_dim]` key and value of sequence b at position pos.
    pub fn store(&mut self, layer: usize, b: usize, pos: usize, key: &[f32], value: &[f32]) {
        let d = self.head_dim;
        for g in 0..self.kv_heads {
            let at = self.offset(layer, b, g, pos);
            self.keys[at..at + d].copy_from_slice(&key[g * d..(g + 1) * d]);
            self.values[at..at + d].copy_from_slice(&value[g * d..(g + 1) * d]);
        }
        self.filled[b] = self.filled[b].max(pos + 1);
    }

    /// The positions `[start, end)` of sequences `0..rows` a step is about to write, as far as
    /// they hold values (appending to a sequence saves nothing).
    pub fn save(&self, rows: usize, start: usize, end: usize) -> Saved {
        let mut saved = Saved { rows, start, end, filled: self.filled.clone(), keys: Vec::new(), values: Vec::new() };
        for (b, at) in self.spans(rows, start) {
            let n = end.min(self.filled[b]).saturating_sub(start) * self.head_dim;
            saved.keys.extend_from_slice(&self.keys[at..at + n]);
            saved.values.extend_from_slice(&self.values[at..at + n]);
        }
        saved
    }

    /// Put back what `save` kept: the cache is as it was before the step.
    pub fn restore(&mut self, saved: Saved) {
        let (d, mut from) = (self.head_dim, 0);
        let (start, end) = (saved.start, saved.end);
        for (b, at) in self.spans(saved.rows, start) {
            let kept = end.min(saved.filled[b]).saturating_sub(start) * d;
            self.keys[at..at + kept].copy_from_slice(&saved.keys[from..from + kept]);
            self.values[at..at + kept].copy_from_slice(&saved.values[from..from + kept]);
            from += kept;
            let written = (end - start) * d;
            self.keys[at + kept..at + written].fill(0.0);
            self.values[at + kept..at + written].fill(0.0);
        }
        self.filled = saved.filled;
    }

    /// (sequence, offset of position `start`) of every (layer, sequence, head) run of positions,
    /// for sequences `0..rows`.
    fn spans(&self, rows: usize, start: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(self.layers * rows * self.kv_heads);
        for layer in 0..self.layers {
            for b in 0..rows {
                for g in 0..self.kv_heads {
                    out.push((b, self.offset(layer, b, g, start)));
                }
            }
        }
        out
    }

    /// Keys and values of sequence b in `layer`, as attention reads them.
    pub fn views(&self, layer: usize, b: usize) -> (KvView<'_>, KvView<'_>) {
        let start = self.offset(layer, b, 0, 0);
        let end = start + self.sequence_len();
        let view = |data| KvView { data, row_stride: self.head_dim, head_stride: self.max_seq_len * self.head_dim };
        (view(&self.keys[start..end]), view(&self.values[start..end]))
    }
}

/// `len` zeros, or an error where the allocator cannot give them (instead of aborting).
fn try_zeroed(len: usize) -> Result<Vec<f32>> {
    let layout = std::alloc::Layout::array::<f32>(len)
        .map_err(|_| EllmError::Memory(format!("{len} cache values do not fit in memory")))?;
    // SAFETY: the layout is non-zero-sized (len > 0) and f32 is valid when all bits are zero; the
    // Vec takes ownership of exactly that allocation, with length and capacity `len`.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut f32;
        if ptr.is_null() {
            return Err(EllmError::Memory(format!(
                "the KV cache needs {} bytes, which the allocator cannot give",
                layout.size()
            )));
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_undoes_a_step_over_written_and_fresh_positions() {
        let mut c = KvCache::new(2, 2, 1, 8, 2).unwrap();
        for pos in 0..4 {
            for layer in 0..2 {
                c.store(layer, 0, pos, &[pos as f32, 1.0], &[2.0, pos as f32]);
            }
        }
        let before = (c.keys.clone(), c.values.clone(), c.filled.clone());
        let saved = c.save(2, 2, 6); // rewrites positions 2, 3 and writes 4, 5 of both rows
        for pos in 2..6 {
            c.store(0, 0, pos, &[9.0, 9.0], &[9.0, 9.0]);
            c.store(0, 1, pos, &[7.0, 7.0], &[7.0, 7.0]);
        }
        c.restore(saved);
        assert_eq!((c.keys.clone(), c.values.clone(), c.filled.clone()), before);
    }

    #[test]
    fn reset_zeroes_what_was_written() {
        let mut c = KvCache::new(1, 1, 2, 16, 4).unwrap();
        c.store(0, 0, 3, &[1.0; 8], &[1.0; 8]);
        c.reset();
        assert!(c.keys.iter().chain(&c.values).all(|&v| v == 0.0));
        assert_eq!(c.filled, vec![0]);
    }

    #[test]
    fn a_cache_too_large_is_an_error() {
        assert!(KvCache::new(1 << 20, 1 << 20, 1 << 10, 1 << 20, 128).is_err());
        assert!(KvCache::new(1 << 16, 1 << 10, 64, 1 << 16, 128).is_err()); // 2^58 bytes
    }
}
