//! Keys and values of every past position, allocated once, in slots: one slot is one sequence,
//! `[layers, slots, kv_heads, max_seq_len, head_dim]` for keys and the same for values, as f32
//! or as f16 (llama.cpp's default: half the bytes attention reads, rounded to nearest).
//!
//! Each slot has its own length: the positions it holds (`len`). Attention reads a slot only up
//! to the positions a step gives it, which never pass its length, so never-written cache is never
//! read. Everything at or past a slot's length holds zeros, so clearing touches only what was
//! written, and a step that fails can be undone (`save` before it, `restore` after).

use half::f16;

use crate::error::{EllmError, Result};
use crate::kernels::attention::{KvData, KvView};

/// Cache values of one element type.
#[derive(Clone, Debug, PartialEq)]
enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// Run `$body` with each `$v` (all of one element type) bound to its Vec.
macro_rules! each {
    ($($v:ident),+ => $body:expr) => {
        match ($($v),+) {
            ($(Values::F32($v)),+) => $body,
            ($(Values::F16($v)),+) => $body,
            #[allow(unreachable_patterns)]
            _ => unreachable!("a cache and its saved values share one element type"),
        }
    };
}

impl Values {
    fn zeroed(len: usize, half: bool) -> Result<Values> {
        Ok(if half { Values::F16(try_zeroed(len)?) } else { Values::F32(try_zeroed(len)?) })
    }

    fn empty_like(&self) -> Values {
        match self {
            Values::F32(_) => Values::F32(Vec::new()),
            Values::F16(_) => Values::F16(Vec::new()),
        }
    }

    fn zero(&mut self, at: usize, len: usize) {
        match self {
            Values::F32(v) => v[at..at + len].fill(0.0),
            Values::F16(v) => v[at..at + len].fill(f16::ZERO),
        }
    }

    fn copy_within(&mut self, from: usize, len: usize, to: usize) {
        match self {
            Values::F32(v) => v.copy_within(from..from + len, to),
            Values::F16(v) => v.copy_within(from..from + len, to),
        }
    }

    fn write(&mut self, at: usize, x: &[f32]) {
        match self {
            Values::F32(v) => v[at..at + x.len()].copy_from_slice(x),
            Values::F16(v) => half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut v[at..at + x.len()], x),
        }
    }

    /// Append `len` values of `src` from `at`.
    fn append_from(&mut self, src: &Values, at: usize, len: usize) {
        let this = self;
        each!(this, src => this.extend_from_slice(&src[at..at + len]))
    }

    /// Put `len` values of `src` from `from` at `at`.
    fn put_from(&mut self, at: usize, src: &Values, from: usize, len: usize) {
        let this = self;
        each!(this, src => this[at..at + len].copy_from_slice(&src[from..from + len]))
    }

    fn view(&self, range: std::ops::Range<usize>) -> KvData<'_> {
        match self {
            Values::F32(v) => KvData::F32(&v[range]),
            Values::F16(v) => KvData::F16(&v[range]),
        }
    }
}

pub struct KvCache {
    keys: Values,
    values: Values,
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
    keys: Values,
    values: Values,
}

impl KvCache {
    /// Zeroed memory comes from the allocator untouched, so unused capacity costs no RSS. A size
    /// the machine cannot hold is an error here, not an abort in the allocator.
    pub fn new(
        layers: usize,
        slots: usize,
        kv_heads: usize,
        max_seq_len: usize,
        head_dim: usize,
        half: bool,
    ) -> Result<Self> {
        let len = [layers, slots, kv_heads, max_seq_len, head_dim]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n.checked_mul(2 * std::mem::size_of::<f32>()).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| EllmError::Memory("the KV cache's size overflows".into()))?;
        let (keys, values) = (Values::zeroed(len, half)?, Values::zeroed(len, half)?);
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
            self.keys.zero(at, len);
            self.values.zero(at, len);
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
            self.keys.copy_within(from, len, to);
            self.values.copy_within(from, len, to);
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
            self.keys.write(at, &key[g * d..(g + 1) * d]);
            self.values.write(at, &value[g * d..(g + 1) * d]);
        }
        self.filled[slot] = self.filled[slot].max(pos + 1);
    }

    /// The spans a step is about to write, as far as they hold values (appending saves nothing).
    pub fn save(&self, spans: &[Span]) -> Saved {
        let mut saved = Saved {
            spans: spans.to_vec(),
            filled: self.filled.clone(),
            keys: self.keys.empty_like(),
            values: self.values.empty_like(),
        };
        for s in spans {
            let n = s.end.min(self.filled[s.slot]).saturating_sub(s.start) * self.head_dim;
            for at in self.head_offsets(s.slot, s.start) {
                saved.keys.append_from(&self.keys, at, n);
                saved.values.append_from(&self.values, at, n);
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
                self.keys.put_from(at, &saved.keys, from, kept);
                self.values.put_from(at, &saved.values, from, kept);
                from += kept;
                self.keys.zero(at + kept, written - kept);
                self.values.zero(at + kept, written - kept);
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
        (view(self.keys.view(start..end)), view(self.values.view(start..end)))
    }
}

/// `len` zeros (f32 or f16: both are zero when all bits are), or an error where the allocator
/// cannot give them (instead of aborting).
fn try_zeroed<T: ZeroBits>(len: usize) -> Result<Vec<T>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len)
        .map_err(|_| EllmError::Memory(format!("{len} cache values do not fit in memory")))?;
    // SAFETY: the layout is non-zero-sized (len > 0) and T is valid when all bits are zero; the
    // Vec takes ownership of exactly that allocation, with length and capacity `len`.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut T;
        if ptr.is_null() {
            return Err(EllmError::Memory(format!(
                "the KV cache needs {} bytes, which the allocator cannot give",
                layout.size()
            )));
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}

/// Types whose all-zero bit pattern is the value zero.
trait ZeroBits {}
impl ZeroBits for f32 {}
impl ZeroBits for f16 {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value as f32 (the tests store values f16 holds exactly).
    fn floats(data: KvData) -> Vec<f32> {
        match data {
            KvData::F32(v) => v.to_vec(),
            KvData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    fn all(c: &KvCache) -> (Vec<f32>, Vec<f32>) {
        let n = match &c.keys {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
        };
        (floats(c.keys.view(0..n)), floats(c.values.view(0..n)))
    }

    #[test]
    fn restore_undoes_a_step_over_written_and_fresh_positions() {
        for half in [false, true] {
            let mut c = KvCache::new(2, 2, 1, 8, 2, half).unwrap();
            for pos in 0..4 {
                for layer in 0..2 {
                    c.store(layer, 0, pos, &[pos as f32, 1.0], &[2.0, pos as f32]);
                }
            }
            let before = (all(&c), c.filled.clone());
            // rewrites positions 2, 3 and writes 4, 5 of both slots
            let saved = c.save(&[Span { slot: 0, start: 2, end: 6 }, Span { slot: 1, start: 2, end: 6 }]);
            for pos in 2..6 {
                c.store(0, 0, pos, &[9.0, 9.0], &[9.0, 9.0]);
                c.store(0, 1, pos, &[7.0, 7.0], &[7.0, 7.0]);
            }
            assert_ne!(all(&c), before.0);
            c.restore(saved);
            assert_eq!((all(&c), c.filled.clone()), before);
        }
    }

    #[test]
    fn reset_zeroes_what_was_written() {
        for half in [false, true] {
            let mut c = KvCache::new(1, 1, 2, 16, 4, half).unwrap();
            c.store(0, 0, 3, &[1.0; 8], &[1.0; 8]);
            c.reset();
            let (k, v) = all(&c);
            assert!(k.iter().chain(&v).all(|&v| v == 0.0));
            assert_eq!(c.filled, vec![0]);
        }
    }

    #[test]
    fn an_f16_cache_rounds_to_the_nearest_half() {
        let mut c = KvCache::new(1, 1, 1, 4, 4, true).unwrap();
        let x = [1.0 + 1.0 / 2048.0, 0.1, -65504.0, 1e-8];
        c.store(0, 0, 0, &x, &x);
        let (k, _) = c.views(0, 0);
        let want: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        assert_eq!(floats(k.data)[..4], want[..]);
        assert_eq!(want[0], 1.0); // halfway between two halves: to the even one
    }

    #[test]
    fn truncate_keeps_a_prefix_and_copy_forks_a_slot() {
        for half in [false, true] {
            let mut c = KvCache::new(2, 3, 2, 8, 2, half).unwrap();
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
                let (k1, v1, k2, v2) = (floats(k1.data), floats(v1.data), floats(k2.data), floats(v2.data));
                let head = 8 * 2;
                for g in 0..2 {
                    assert_eq!(k1[g * head..g * head + 6], k2[g * head..g * head + 6]);
                    assert_eq!(v1[g * head..g * head + 6], v2[g * head..g * head + 6]);
                    assert!(k2[g * head + 6..(g + 1) * head].iter().all(|&x| x == 0.0));
                }
            }
            c.truncate(1, 2);
            assert_eq!(c.len(1), 2);
            let (k1, _) = c.views(1, 1);
            assert_eq!(&floats(k1.data)[..6], &[10.0, 10.0, 11.0, 11.0, 0.0, 0.0]);
            assert!(c.copy(1, 0, 3).is_err()); // slot 1 holds only 2 now
            c.reset();
            let (k, v) = all(&c);
            assert!(k.iter().chain(&v).all(|&v| v == 0.0));
        }
    }

    #[test]
    fn a_cache_too_large_is_an_error() {
        for half in [false, true] {
            assert!(KvCache::new(1 << 20, 1 << 20, 1 << 10, 1 << 20, 128, half).is_err());
            assert!(KvCache::new(1 << 16, 1 << 10, 64, 1 << 16, 128, half).is_err());
            // 2^58 bytes
        }
    }
}
