//! Keys and values of every past position, allocated once, in slots: one slot is one sequence,
//! `[layers, slots, kv_heads, max_seq_len, head_dim]` for keys and the same for values.
//!
//! Each slot has its own length: the positions it holds (`len`). Attention reads a slot only up
//! to the positions a step gives it, which never pass its length, so never-written cache is never
//! read. Everything at or past a slot's length holds zeros, so clearing touches only what was
//! written, and a step that fails can be undone (`save` before it, `restore` after).

use crate::error::{EllmError, Result};
use crate::kernels::attention::KvView;

pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    layers: usize,
    slots: usize,
    kv_heads: usize,
    max_seq_len: usize,
    head_dim: usize,
    /// Per slot: how many positions it holds; every position at or past this one holds zeros.
    filled: Vec<usize>,
}

/// The positions `start..end` of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub slot: usize,
    pub start: usize,
    pub end: usize,
}

/// What a step will overwrite: the values its spans held before it, and every slot's length.
pub struct Saved {
    spans: Vec<Span>,
    filled: Vec<usize>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    /// Zeroed memory comes from the allocator untouched, so unused capacity costs no RSS. A size
    /// the machine cannot hold is an error here, not an abort in the allocator.
    pub fn new(layers: usize, slots: usize, kv_heads: usize, max_seq_len: usize, head_dim: usize) -> Result<Self> {
        let len = [layers, slots, kv_heads, max_seq_len, head_dim]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n.checked_mul(2 * std::mem::size_of::<f32>()).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| EllmError::Memory("the KV cache's size overflows".into()))?;
        let (keys, values) = if len > 0 { (try_zeroed(len)?, try_zeroed(len)?) } else { (Vec::new(), Vec::new()) };
        Ok(KvCache { keys, values, layers, slots, kv_heads, max_seq_len, head_dim, filled: vec![0; slots] })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// How many positions `slot` holds.
    pub fn len(&self, slot: usize) -> usize {
        self.filled[slot]
    }

    /// Empty every slot.
    pub fn reset(&mut self) {
        for slot in 0..self.slots {
            self.truncate(slot, 0);
        }
    }

    /// Keep the first `n` positions of `slot` (prefix reuse) and zero the rest it held.
    pub fn truncate(&mut self, slot: usize, n: usize) {
        let held = self.filled[slot];
        if n >= held {
            return;
        }
        for at in self.head_offsets(slot, n) {
            let len = (held - n) * self.head_dim;
            self.keys[at..at + len].fill(0.0);
            self.values[at..at + len].fill(0.0);
        }
        self.filled[slot] = n;
    }

    /// Make `dst` hold the first `n` positions of `src` (a shared prompt forked into two slots).
    pub fn copy(&mut self, src: usize, dst: usize, n: usize) -> Result<()> {
        if n > self.filled[src] {
            return Err(EllmError::Value(format!("slot {src} holds {} positions, cannot copy {n}", self.filled[src])));
        }
        if src == dst {
            self.truncate(dst, n);
            return Ok(());
        }
        self.truncate(dst, 0);
        let len = n * self.head_dim;
        for (from, to) in self.head_offsets(src, 0).into_iter().zip(self.head_offsets(dst, 0)) {
            self.keys.copy_within(from..from + len, to);
            self.values.copy_within(from..from + len, to);
        }
        self.filled[dst] = n;
        Ok(())
    }

    fn offset(&self, layer: usize, slot: usize, head: usize, pos: usize) -> usize {
        (((layer * self.slots + slot) * self.kv_heads + head) * self.max_seq_len + pos) * self.head_dim
    }

    /// Store the `[kv_heads * head_dim]` key and value of `slot` at position `pos`.
    pub fn store(&mut self, layer: usize, slot: usize, pos: usize, key: &[f32], value: &[f32]) {
        let d = self.head_dim;
        for g in 0..self.kv_heads {
            let at = self.offset(layer, slot, g, pos);
            self.keys[at..at + d].copy_from_slice(&key[g * d..(g + 1) * d]);
            self.values[at..at + d].copy_from_slice(&value[g * d..(g + 1) * d]);
        }
        self.filled[slot] = self.filled[slot].max(pos + 1);
    }

    /// The spans a step is about to write, as far as they hold values (appending saves nothing).
    pub fn save(&self, spans: &[Span]) -> Saved {
        let mut saved =
            Saved { spans: spans.to_vec(), filled: self.filled.clone(), keys: Vec::new(), values: Vec::new() };
        for s in spans {
            let n = s.end.min(self.filled[s.slot]).saturating_sub(s.start) * self.head_dim;
            for at in self.head_offsets(s.slot, s.start) {
                saved.keys.extend_from_slice(&self.keys[at..at + n]);
                saved.values.extend_from_slice(&self.values[at..at + n]);
            }
        }
        saved
    }

    /// Put back what `save` kept: the cache is as it was before the step.
    pub fn restore(&mut self, saved: Saved) {
        let (d, mut from) = (self.head_dim, 0);
        for s in &saved.spans {
            let kept = s.end.min(saved.filled[s.slot]).saturating_sub(s.start) * d;
            let written = (s.end - s.start) * d;
            for at in self.head_offsets(s.slot, s.start) {
                self.keys[at..at + kept].copy_from_slice(&saved.keys[from..from + kept]);
                self.values[at..at + kept].copy_from_slice(&saved.values[from..from + kept]);
                from += kept;
                self.keys[at + kept..at + written].fill(0.0);
                self.values[at + kept..at + written].fill(0.0);
            }
        }
        self.filled = saved.filled;
    }

    /// Offset of position `start` in every (layer, kv head) run of `slot`'s positions.
    fn head_offsets(&self, slot: usize, start: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.layers * self.kv_heads);
        for layer in 0..self.layers {
            for g in 0..self.kv_heads {
                out.push(self.offset(layer, slot, g, start));
            }
        }
        out
    }

    /// Keys and values of `slot` in `layer`, as attention reads them.
    pub fn views(&self, layer: usize, slot: usize) -> (KvView<'_>, KvView<'_>) {
        let start = self.offset(layer, slot, 0, 0);
        let end = start + self.kv_heads * self.max_seq_len * self.head_dim;
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
        // rewrites positions 2, 3 and writes 4, 5 of both slots
        let saved = c.save(&[Span { slot: 0, start: 2, end: 6 }, Span { slot: 1, start: 2, end: 6 }]);
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
    fn truncate_keeps_a_prefix_and_copy_forks_a_slot() {
        let mut c = KvCache::new(2, 3, 2, 8, 2).unwrap();
        for pos in 0..5 {
            for layer in 0..2 {
                let v = (10 * layer + pos) as f32;
                c.store(layer, 1, pos, &[v, v, -v, -v], &[v, 0.5, v, 0.5]);
            }
        }
        c.store(0, 2, 6, &[3.0; 4], &[3.0; 4]); // dst held more than it will after the copy
        c.copy(1, 2, 3).unwrap();
        assert_eq!((c.len(1), c.len(2)), (5, 3));
        for layer in 0..2 {
            let ((k1, v1), (k2, v2)) = (c.views(layer, 1), c.views(layer, 2));
            let head = 8 * 2;
            for g in 0..2 {
                assert_eq!(k1.data[g * head..g * head + 6], k2.data[g * head..g * head + 6]);
                assert_eq!(v1.data[g * head..g * head + 6], v2.data[g * head..g * head + 6]);
                assert!(k2.data[g * head + 6..(g + 1) * head].iter().all(|&x| x == 0.0));
            }
        }
        c.truncate(1, 2);
        assert_eq!(c.len(1), 2);
        let (k1, _) = c.views(1, 1);
        assert_eq!(&k1.data[..6], &[10.0, 10.0, 11.0, 11.0, 0.0, 0.0]);
        assert!(c.copy(1, 0, 3).is_err()); // slot 1 holds only 2 now
        c.reset();
        assert!(c.keys.iter().chain(&c.values).all(|&v| v == 0.0));
    }

    #[test]
    fn a_cache_too_large_is_an_error() {
        assert!(KvCache::new(1 << 20, 1 << 20, 1 << 10, 1 << 20, 128).is_err());
        assert!(KvCache::new(1 << 16, 1 << 10, 64, 1 << 16, 128).is_err()); // 2^58 bytes
    }
}
