//! One step of the Llama decoder (Touvron et al., 2023), for a batch of sequences:
//! embed -> for each layer { RMSNorm -> attention with rope and the KV cache -> residual ->
//! RMSNorm -> SwiGLU MLP -> residual } -> RMSNorm -> logits.
//!
//! The Llama-shaped families differ only in switches of `LlamaConfig`: biases on q/k/v and on
//! the output projection (Qwen2), a per-head RMSNorm of q and k before rope (Qwen3), and a
//! sliding attention window per layer (Mistral, Qwen2).
//!
//! Activations are row-major `[batch * seq, features]`. Named hook points let a caller look at
//! the intermediate tensors; with no hooks nothing is formatted or copied.

use super::config::LlamaConfig;
use super::kv_cache::KvCache;
use super::weights::{linear_group, Matrix, Weights};
use crate::error::{EllmError, Result};
use crate::kernels::{activation, attention, norm, rope};

/// Receives intermediate tensors. `layer` is -1 outside the decoder layers.
pub trait Hooks {
    fn wants(&self, layer: i32, point: &str) -> bool;
    fn fire(&mut self, layer: i32, point: &str, data: &[f32], shape: &[usize]) -> Result<()>;
    /// Called between layers: an error (Ctrl-C, say) stops the step, which is then undone.
    fn interrupted(&mut self) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// `[batch, seq, vocab]`
    All,
    /// `[batch, vocab]`: the last position of each sequence (what generation needs).
    Last,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub weights: Weights,
    cache: KvCache,
    /// cos and sin for every position up to max_seq_len, `[max_seq_len, head_dim / 2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// Every tensor is present (tensors are only ever added, so this stays true once set).
    loaded: bool,
}

/// Calls a hook point when someone listens.
struct Tap<'h, 'a> {
    hooks: Option<&'h mut (dyn Hooks + 'a)>,
    batch: usize,
    seq: usize,
}

impl Tap<'_, '_> {
    /// `inner` is the shape of one token's tensor.
    fn emit(&mut self, layer: i32, point: &str, data: &[f32], inner: &[usize]) -> Result<()> {
        if let Some(h) = self.hooks.as_deref_mut() {
            if h.wants(layer, point) {
                let mut shape = vec![self.batch, self.seq];
                shape.extend_from_slice(inner);
                h.fire(layer, point, data, &shape)?;
            }
        }
        Ok(())
    }
}

fn linear(m: &Option<Matrix>, x: &[f32], rows: usize, bias: &Option<Vec<f32>>) -> Vec<f32> {
    let m = m.as_ref().expect("checked by Llama::check_loaded");
    let mut out = vec![0.0; rows * m.rows];
    m.linear(x, rows, bias.as_deref(), &mut out);
    out
}

/// Several projections of the same input, streamed together at decode.
fn group<const N: usize>(
    mats: &[&Option<Matrix>; N],
    biases: &[&Option<Vec<f32>>; N],
    x: &[f32],
    rows: usize,
) -> [Vec<f32>; N] {
    let mats: Vec<&Matrix> = mats.iter().map(|m| m.as_ref().expect("checked by Llama::check_loaded")).collect();
    let biases: Vec<Option<&[f32]>> = biases.iter().map(|b| b.as_deref()).collect();
    linear_group(&mats, &biases, x, rows).try_into().expect("one output per matrix")
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    norm::rms_norm(x, weight, eps, &mut out);
    out
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

impl Llama {
    pub fn new(config: LlamaConfig) -> Result<Self> {
        config.validate()?;
        let inv_freq = rope::inv_freq(config.head_dim, config.rope_theta, &config.rope_scaling)?;
        let positions: Vec<usize> = (0..config.max_seq_len).collect();
        let (rope_cos, rope_sin) = rope::cos_sin_table(&positions, &inv_freq);
        let mut weights = Weights::empty(&config);
        weights.check_places(&config)?;
        let cache = KvCache::new(
            config.num_layers,
            config.max_batch_size,
            config.num_kv_heads,
            config.max_seq_len,
            config.head_dim,
        )?;
        Ok(Llama { weights, config, cache, rope_cos, rope_sin, loaded: false })
    }

    pub fn set_weight(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Result<()> {
        self.weights.set(&self.config, name, shape, data)
    }

    /// Store a matrix kept in any storage (quantized blocks, halves).
    pub fn set_matrix(&mut self, name: &str, matrix: Matrix) -> Result<()> {
        self.weights.set_matrix(&self.config, name, matrix)
    }

    pub fn reset_cache(&mut self) {
        self.cache.reset();
    }

    pub fn check_loaded(&mut self) -> Result<()> {
        if self.loaded {
            return Ok(());
        }
        let missing = self.weights.missing(&self.config);
        if missing.is_empty() {
            self.loaded = true;
            Ok(())
        } else {
            Err(EllmError::Value(format!("weights not loaded: {}", missing.join(", "))))
        }
    }

    fn check_input(&self, tokens: &[u32], batch: usize, seq: usize, start_pos: usize) -> Result<()> {
        let c = &self.config;
        if tokens.len() != batch * seq || seq == 0 || batch == 0 {
            return Err(EllmError::Value(format!(
                "tokens must be [batch, seq] with both > 0, got {} ids for {batch}x{seq}",
                tokens.len()
            )));
        }
        if batch > c.max_batch_size {
            return Err(EllmError::Value(format!("batch {batch} exceeds max_batch_size {}", c.max_batch_size)));
        }
        if start_pos + seq > c.max_seq_len {
            return Err(EllmError::Value(format!(
                "start_pos {start_pos} + seq {seq} exceeds max_seq_len {}",
                c.max_seq_len
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EllmError::Value(format!("token id {bad} is out of range for vocab_size {}", c.vocab_size)));
        }
        Ok(())
    }

    /// Run `tokens` (`[batch, seq]`, sequence b at positions start_pos..start_pos+seq) through
    /// the model, updating the KV cache, and return the logits asked for. A step that fails (a
    /// hook's error, an interrupt) leaves the cache as it was before it.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        start_pos: usize,
        wanted: LogitsWanted,
        hooks: Option<&mut dyn Hooks>,
    ) -> Result<Vec<f32>> {
        self.check_input(tokens, batch, seq, start_pos)?;
        self.check_loaded()?;
        let saved = self.cache.save(batch, start_pos, start_pos + seq);
        let result = self.step(tokens, batch, seq, start_pos, wanted, hooks);
        if result.is_err() {
            self.cache.restore(saved);
        }
        result
    }

    fn step(
        &mut self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        start_pos: usize,
        wanted: LogitsWanted,
        hooks: Option<&mut dyn Hooks>,
    ) -> Result<Vec<f32>> {
        let c = self.config.clone();
        let (h, rows) = (c.hidden_size, batch * seq);
        let mut tap = Tap { hooks, batch, seq };

        let embed = self.weights.embed_tokens.as_ref().expect("checked");
        let mut x = vec![0.0; rows * h];
        for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            embed.embed_row(t as usize, row);
        }
        tap.emit(-1, "embed_tokens", &x, &[h])?;

        for l in 0..c.num_layers {
            x = self.layer(l, x, batch, seq, start_pos, &mut tap)?;
            if let Some(h) = tap.hooks.as_deref_mut() {
                h.interrupted()?;
            }
        }

        let x = rms_norm(&x, &self.weights.norm, c.rms_norm_eps);
        tap.emit(-1, "final_norm", &x, &[h])?;
        let head = self.weights.lm_head.as_ref().or(self.weights.embed_tokens.as_ref()).expect("checked");
        let logits = match wanted {
            LogitsWanted::All => {
                let mut out = vec![0.0; rows * c.vocab_size];
                head.linear(&x, rows, None, &mut out);
                tap.emit(-1, "logits", &out, &[c.vocab_size])?;
                out
            }
            LogitsWanted::Last => {
                let last: Vec<f32> =
                    (0..batch).flat_map(|b| x[((b + 1) * seq - 1) * h..(b + 1) * seq * h].iter().copied()).collect();
                let mut out = vec![0.0; batch * c.vocab_size];
                head.linear(&last, batch, None, &mut out);
                tap.seq = 1;
                tap.emit(-1, "logits", &out, &[c.vocab_size])?;
                out
            }
        };
        Ok(logits)
    }

    fn layer(
        &mut self,
        l: usize,
        mut x: Vec<f32>,
        batch: usize,
        seq: usize,
        start_pos: usize,
        tap: &mut Tap,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (d, rows, half) = (c.head_dim, batch * seq, c.head_dim / 2);
        let li = l as i32;
        let w = &self.weights.layers[l];

        // Attention block.
        let xn = rms_norm(&x, &w.input_layernorm, c.rms_norm_eps);
        tap.emit(li, "input_layernorm", &xn, &[c.hidden_size])?;
        let [mut q, mut k, v]: [Vec<f32>; 3] =
            group(&[&w.q_proj, &w.k_proj, &w.v_proj], &[&w.q_bias, &w.k_bias, &w.v_bias], &xn, rows);
        tap.emit(li, "q_after_proj", &q, &[c.num_heads, d])?;
        tap.emit(li, "k_after_proj", &k, &[c.num_kv_heads, d])?;
        tap.emit(li, "v_after_proj", &v, &[c.num_kv_heads, d])?;

        if c.qk_norm {
            // Qwen3: every head of q and k is RMS-normalized on its own before rope.
            q = rms_norm(&q, &w.q_norm, c.rms_norm_eps);
            k = rms_norm(&k, &w.k_norm, c.rms_norm_eps);
        }
        for r in 0..rows {
            let pos = start_pos + r % seq;
            let (cos, sin) =
                (&self.rope_cos[pos * half..(pos + 1) * half], &self.rope_sin[pos * half..(pos + 1) * half]);
            for head in q[r * c.q_dim()..(r + 1) * c.q_dim()].chunks_exact_mut(d) {
                rope::rotate_half(head, cos, sin);
            }
            for head in k[r * c.kv_dim()..(r + 1) * c.kv_dim()].chunks_exact_mut(d) {
                rope::rotate_half(head, cos, sin);
            }
        }
        tap.emit(li, "q_after_rope", &q, &[c.num_heads, d])?;
        tap.emit(li, "k_after_rope", &k, &[c.num_kv_heads, d])?;

        for r in 0..rows {
            let (b, s) = (r / seq, r % seq);
            let kv = c.kv_dim();
            self.cache.store(l, b, start_pos + s, &k[r * kv..(r + 1) * kv], &v[r * kv..(r + 1) * kv]);
        }
        let mut context = vec![0.0; rows * c.q_dim()];
        let shape = attention::AttentionShape {
            q_len: seq,
            kv_len: start_pos + seq,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: d,
            causal: true,
            start_pos,
            scale: 1.0 / (d as f32).sqrt(),
            window: c.layer_windows[l],
        };
        let per_seq = seq * c.q_dim();
        for b in 0..batch {
            let (keys, values) = self.cache.views(l, b);
            attention::attention(
                &q[b * per_seq..(b + 1) * per_seq],
                keys,
                values,
                &shape,
                &mut context[b * per_seq..(b + 1) * per_seq],
            )?;
        }
        tap.emit(li, "attention_context", &context, &[c.q_dim()])?;
        let attn_out = linear(&w.o_proj, &context, rows, &w.o_bias);
        tap.emit(li, "attention_output", &attn_out, &[c.hidden_size])?;
        add_in_place(&mut x, &attn_out);
        tap.emit(li, "after_attention_residual", &x, &[c.hidden_size])?;

        // MLP block.
        let xn = rms_norm(&x, &w.post_attention_layernorm, c.rms_norm_eps);
        tap.emit(li, "post_attention_layernorm", &xn, &[c.hidden_size])?;
        let [gate, up]: [Vec<f32>; 2] = group(&[&w.gate_proj, &w.up_proj], &[&w.gate_bias, &w.up_bias], &xn, rows);
        tap.emit(li, "mlp_gate_proj", &gate, &[c.intermediate_size])?;
        tap.emit(li, "mlp_up_proj", &up, &[c.intermediate_size])?;
        let mut hidden = vec![0.0; gate.len()];
        activation::swiglu(&gate, &up, &mut hidden);
        tap.emit(li, "mlp_intermediate", &hidden, &[c.intermediate_size])?;
        let mlp_out = linear(&w.down_proj, &hidden, rows, &w.down_bias);
        tap.emit(li, "mlp_output", &mlp_out, &[c.hidden_size])?;
        add_in_place(&mut x, &mlp_out);
        tap.emit(li, "output", &x, &[c.hidden_size])?;
        Ok(x)
    }
}
