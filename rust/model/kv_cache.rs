//! Keys and values of every past position, allocated once:
//! `[layers, batch, kv_heads, max_seq_len, head_dim]` for keys and the same for values.

use crate::kernels::attention::KvView;

pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    batch: usize,
    kv_heads: usize,
    max_seq_len: usize,
    head_dim: usize,
}

impl KvCache {
    /// Zeroed memory comes from the allocator untouched, so unused capacity costs no RSS.
    pub fn new(layers: usize, batch: usize, kv_heads: usize, max_seq_len: usize, head_dim: usize) -> Self {
        let len = layers * batch * kv_heads * max_seq_len * head_dim;
        KvCache { keys: vec![0.0; len], values: vec![0.0; len], batch, kv_heads, max_seq_len, head_dim }
    }

    pub fn reset(&mut self) {
        self.keys.fill(0.0);
        self.values.fill(0.0);
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
    }

    /// Keys and values of sequence b in `layer`, as attention reads them.
    pub fn views(&self, layer: usize, b: usize) -> (KvView<'_>, KvView<'_>) {
        let start = self.offset(layer, b, 0, 0);
        let end = start + self.sequence_len();
        let view = |data| KvView { data, row_stride: self.head_dim, head_stride: self.max_seq_len * self.head_dim };
        (view(&self.keys[start..end]), view(&self.values[start..end]))
    }
}
