//! One step of the Llama decoder (Touvron et al., 2023), for a batch of sequences:
//! embed -> for each layer { RMSNorm -> attention with rope and the KV cache -> residual ->
//! RMSNorm -> SwiGLU MLP -> residual } -> RMSNorm -> logits.
//!
//! The Llama-shaped families differ only in switches of `LlamaConfig`: biases on q/k/v and on
//! the output projection (Qwen2), a per-head RMSNorm of q and k before rope (Qwen3), and a
//! sliding attention window per layer (Mistral, Qwen2).
//!
//! A step takes a ragged batch, llama.cpp's `llama_batch` shape: rows of (token, KV slot,
//! position), so decode tokens of some sequences and prompt chunks of others share one pass over
//! the weights. Activations are row-major `[rows, features]`; only attention looks at which slot
//! a row belongs to. Named hook points let a caller look at the intermediate tensors; with no
//! hooks nothing is formatted or copied.
//!
//! A model split over machines runs as pipeline stages: each holds a range of layers, the first
//! also the embedding, the last also the final norm and the head. A stage after the first takes
//! the hidden states its predecessor returned instead of token ids.

use rayon::prelude::*;

use super::config::LlamaConfig;
use super::hook_points as P;
use super::kv_cache::{KvCache, Span};
use super::weights::{linear_group, Matrix, Weights};
use crate::error::{EllmError, Result};
use crate::kernels::{activation, attention, norm, pool, rope};

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

/// What a step's rows carry in: token ids, or (a later pipeline stage) the hidden states
/// `[rows, hidden_size]` the stage before returned.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    Tokens(&'a [u32]),
    Hidden(&'a [f32]),
}

/// One step's rows: row r is `input`'s row r, of sequence `slots[r]` at position `positions[r]`,
/// and its logits are returned where `logits[r]`. A slot's rows are adjacent, at consecutive
/// positions, starting at or before the slot's length (a step may rewrite a slot's tail).
pub struct Batch<'a> {
    pub input: Input<'a>,
    pub slots: &'a [usize],
    pub positions: &'a [usize],
    pub logits: &'a [bool],
}

/// A slot's rows in a batch: rows `rows`, at positions `start..start + rows.len()`.
struct Run {
    slot: usize,
    rows: std::ops::Range<usize>,
    start: usize,
}

impl Run {
    fn span(&self) -> Span {
        Span { slot: self.slot, start: self.start, end: self.start + self.rows.len() }
    }
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
    /// The leading shape of every tensor: `[batch, seq]` for `forward`, `[1, rows]` for a step.
    lead: [usize; 2],
    /// The same for the logits, of the rows asked for.
    logits_lead: [usize; 2],
}

impl Tap<'_, '_> {
    /// `inner` is the shape of one token's tensor.
    fn emit(&mut self, layer: i32, point: &str, data: &[f32], inner: &[usize]) -> Result<()> {
        self.emit_shaped(self.lead, layer, point, data, inner)
    }

    fn emit_shaped(&mut self, lead: [usize; 2], layer: i32, point: &str, data: &[f32], inner: &[usize]) -> Result<()> {
        if let Some(h) = self.hooks.as_deref_mut() {
            if h.wants(layer, point) {
                let mut shape = lead.to_vec();
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
            config.kv_f16,
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

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
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

    /// Meta's `forward(tokens, start_pos)`: `tokens` is `[batch, seq]`, sequence b in slot b at
    /// positions start_pos..start_pos+seq. Returns the logits asked for.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        start_pos: usize,
        wanted: LogitsWanted,
        hooks: Option<&mut dyn Hooks>,
    ) -> Result<Vec<f32>> {
        if !(self.config.embeds_tokens && self.config.computes_logits) {
            return Err(EllmError::Value("a pipeline stage runs ragged steps only, not forward".into()));
        }
        if tokens.len() != batch * seq || seq == 0 || batch == 0 {
            return Err(EllmError::Value(format!(
                "tokens must be [batch, seq] with both > 0, got {} ids for {batch}x{seq}",
                tokens.len()
            )));
        }
        if batch > self.cache.slots() {
            return Err(EllmError::Value(format!("batch {batch} exceeds max_batch_size {}", self.cache.slots())));
        }
        let rows = batch * seq;
        let slots: Vec<usize> = (0..rows).map(|r| r / seq).collect();
        let positions: Vec<usize> = (0..rows).map(|r| start_pos + r % seq).collect();
        let logits: Vec<bool> = (0..rows).map(|r| wanted == LogitsWanted::All || r % seq == seq - 1).collect();
        let batch_rows = Batch { input: Input::Tokens(tokens), slots: &slots, positions: &positions, logits: &logits };
        let logits_lead = if wanted == LogitsWanted::All { [batch, seq] } else { [batch, 1] };
        self.run(&batch_rows, [batch, seq], logits_lead, hooks)
    }

    /// One step over a ragged batch: logits `[rows asked for, vocab]`, in row order (a stage
    /// before the last: the hidden states `[rows, hidden_size]` of every row). A step that fails
    /// (bad rows, a hook's error, an interrupt) leaves the cache as it was before it.
    pub fn step(&mut self, batch: &Batch, hooks: Option<&mut dyn Hooks>) -> Result<Vec<f32>> {
        let (n, wanted) = (self.rows(batch), batch.logits.iter().filter(|&&w| w).count());
        self.run(batch, [1, n], [1, wanted], hooks)
    }

    fn run(
        &mut self,
        batch: &Batch,
        lead: [usize; 2],
        logits_lead: [usize; 2],
        hooks: Option<&mut dyn Hooks>,
    ) -> Result<Vec<f32>> {
        let runs = self.runs(batch)?;
        self.check_loaded()?;
        let spans: Vec<Span> = runs.iter().map(Run::span).collect();
        let saved = self.cache.save(&spans);
        let mut tap = Tap { hooks, lead, logits_lead };
        let result = self.decode(batch, &runs, &mut tap);
        if result.is_err() {
            self.cache.restore(saved);
        }
        result
    }

    fn rows(&self, batch: &Batch) -> usize {
        match batch.input {
            Input::Tokens(t) => t.len(),
            Input::Hidden(x) => x.len() / self.config.hidden_size,
        }
    }

    /// Check a batch and split it into its slots' runs of rows.
    fn runs(&self, batch: &Batch) -> Result<Vec<Run>> {
        let (c, n) = (&self.config, self.rows(batch));
        match batch.input {
            Input::Tokens(_) if !c.embeds_tokens => {
                return Err(EllmError::Value(format!(
                    "this pipeline stage starts at layer {}: it takes hidden states, not token ids",
                    c.layer_offset
                )))
            }
            Input::Hidden(_) if c.embeds_tokens => {
                return Err(EllmError::Value("this model embeds token ids itself: give it token ids".into()))
            }
            Input::Hidden(x) if !x.len().is_multiple_of(c.hidden_size) => {
                return Err(EllmError::Value(format!(
                    "hidden states must be [rows, {}], got {} values",
                    c.hidden_size,
                    x.len()
                )))
            }
            Input::Tokens(tokens) => {
                if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                    return Err(EllmError::Value(format!(
                        "token id {bad} is out of range for vocab_size {}",
                        c.vocab_size
                    )));
                }
            }
            Input::Hidden(_) => {}
        }
        if n == 0 || [batch.slots.len(), batch.positions.len(), batch.logits.len()] != [n; 3] {
            return Err(EllmError::Value(format!(
                "a batch needs one slot, position and logits flag per token, and at least one token: got {n} tokens, \
                 {} slots, {} positions, {} flags",
                batch.slots.len(),
                batch.positions.len(),
                batch.logits.len()
            )));
        }
        let mut runs: Vec<Run> = Vec::new();
        for r in 0..n {
            let (slot, pos) = (batch.slots[r], batch.positions[r]);
            if slot >= self.cache.slots() {
                return Err(EllmError::Value(format!(
                    "slot {slot} does not exist: the cache has {} slots",
                    self.cache.slots()
                )));
            }
            if pos >= c.max_seq_len {
                return Err(EllmError::Value(format!("position {pos} is past max_seq_len {}", c.max_seq_len)));
            }
            match runs.last_mut() {
                Some(run) if run.slot == slot && pos == run.start + run.rows.len() => run.rows.end = r + 1,
                Some(run) if run.slot == slot => {
                    return Err(EllmError::Value(format!(
                        "slot {slot}'s tokens must be at consecutive positions: row {r} is at position {pos} after {}",
                        run.start + run.rows.len() - 1
                    )));
                }
                _ => {
                    if runs.iter().any(|run| run.slot == slot) {
                        return Err(EllmError::Value(format!("slot {slot}'s tokens must be adjacent in the batch")));
                    }
                    let held = self.cache.len(slot);
                    if pos > held {
                        return Err(EllmError::Value(format!(
                            "slot {slot} holds {held} positions, so its tokens must start at or before position \
                             {held}, got {pos} (attention would read positions never written)"
                        )));
                    }
                    runs.push(Run { slot, rows: r..r + 1, start: pos });
                }
            }
        }
        Ok(runs)
    }

    fn decode(&mut self, batch: &Batch, runs: &[Run], tap: &mut Tap) -> Result<Vec<f32>> {
        let c = self.config.clone();
        let (h, rows) = (c.hidden_size, self.rows(batch));

        let mut x = match batch.input {
            Input::Tokens(tokens) => {
                let embed = self.weights.embed_tokens.as_ref().expect("checked");
                let mut x = vec![0.0; rows * h];
                for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
                    embed.embed_row(t as usize, row);
                }
                tap.emit(-1, P::EMBED_TOKENS, &x, &[h])?;
                x
            }
            Input::Hidden(hidden) => hidden.to_vec(),
        };

        for l in 0..c.num_layers {
            x = self.layer(l, x, batch.positions, runs, tap)?;
            if let Some(h) = tap.hooks.as_deref_mut() {
                h.interrupted()?;
            }
        }
        if !c.computes_logits {
            return Ok(x);
        }

        let x = rms_norm(&x, &self.weights.norm, c.rms_norm_eps);
        tap.emit(-1, P::FINAL_NORM, &x, &[h])?;
        let head = self.weights.lm_head.as_ref().or(self.weights.embed_tokens.as_ref()).expect("checked");
        let picked: Vec<usize> = (0..rows).filter(|&r| batch.logits[r]).collect();
        let mut logits = vec![0.0; picked.len() * c.vocab_size];
        if picked.len() == rows {
            head.linear(&x, rows, None, &mut logits);
        } else if !picked.is_empty() {
            let last: Vec<f32> = picked.iter().flat_map(|&r| x[r * h..(r + 1) * h].iter().copied()).collect();
            head.linear(&last, picked.len(), None, &mut logits);
        }
        tap.emit_shaped(tap.logits_lead, -1, P::LOGITS, &logits, &[c.vocab_size])?;
        Ok(logits)
    }

    fn layer(
        &mut self,
        l: usize,
        mut x: Vec<f32>,
        positions: &[usize],
        runs: &[Run],
        tap: &mut Tap,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (d, rows, half) = (c.head_dim, positions.len(), c.head_dim / 2);
        let li = (l + c.layer_offset) as i32;
        let w = &self.weights.layers[l];

        // Attention block.
        let xn = rms_norm(&x, &w.input_layernorm, c.rms_norm_eps);
        tap.emit(li, P::INPUT_LAYERNORM, &xn, &[c.hidden_size])?;
        let [mut q, mut k, v]: [Vec<f32>; 3] =
            group(&[&w.q_proj, &w.k_proj, &w.v_proj], &[&w.q_bias, &w.k_bias, &w.v_bias], &xn, rows);
        tap.emit(li, P::Q_AFTER_PROJ, &q, &[c.num_heads, d])?;
        tap.emit(li, P::K_AFTER_PROJ, &k, &[c.num_kv_heads, d])?;
        tap.emit(li, P::V_AFTER_PROJ, &v, &[c.num_kv_heads, d])?;

        if c.qk_norm {
            // Qwen3: every head of q and k is RMS-normalized on its own before rope.
            q = rms_norm(&q, &w.q_norm, c.rms_norm_eps);
            k = rms_norm(&k, &w.k_norm, c.rms_norm_eps);
        }
        for (r, &pos) in positions.iter().enumerate() {
            let (cos, sin) =
                (&self.rope_cos[pos * half..(pos + 1) * half], &self.rope_sin[pos * half..(pos + 1) * half]);
            for head in q[r * c.q_dim()..(r + 1) * c.q_dim()].chunks_exact_mut(d) {
                rope::rotate_half(head, cos, sin);
            }
            for head in k[r * c.kv_dim()..(r + 1) * c.kv_dim()].chunks_exact_mut(d) {
                rope::rotate_half(head, cos, sin);
            }
        }
        tap.emit(li, P::Q_AFTER_ROPE, &q, &[c.num_heads, d])?;
        tap.emit(li, P::K_AFTER_ROPE, &k, &[c.num_kv_heads, d])?;

        let kv = c.kv_dim();
        for run in runs {
            for (r, pos) in run.rows.clone().zip(run.start..) {
                self.cache.store(l, run.slot, pos, &k[r * kv..(r + 1) * kv], &v[r * kv..(r + 1) * kv]);
            }
        }
        // Each slot's rows attend to that slot's cache; slots run in parallel, so a step of many
        // sequences is not a parallel region per sequence.
        let attend = |run: &Run, context: &mut [f32]| {
            let shape = attention::AttentionShape {
                q_len: run.rows.len(),
                kv_len: run.start + run.rows.len(),
                n_heads: c.num_heads,
                n_kv_heads: c.num_kv_heads,
                head_dim: d,
                causal: true,
                start_pos: run.start,
                scale: 1.0 / (d as f32).sqrt(),
                window: c.layer_windows[l],
            };
            let (keys, values) = self.cache.views(l, run.slot);
            let span = run.rows.start * c.q_dim()..run.rows.end * c.q_dim();
            attention::attention(&q[span], keys, values, &shape, context)
        };
        let mut context = vec![0.0; rows * c.q_dim()];
        if let [run] = runs {
            attend(run, &mut context)?;
        } else {
            // runs cover the rows in order, so the context splits into theirs
            let mut parts = Vec::with_capacity(runs.len());
            let mut rest = context.as_mut_slice();
            for run in runs {
                let (theirs, after) = rest.split_at_mut(run.rows.len() * c.q_dim());
                parts.push((run, theirs));
                rest = after;
            }
            pool::install(|| parts.into_par_iter().try_for_each(|(run, out)| attend(run, out)))?;
        }
        tap.emit(li, P::ATTENTION_CONTEXT, &context, &[c.q_dim()])?;
        let attn_out = linear(&w.o_proj, &context, rows, &w.o_bias);
        tap.emit(li, P::ATTENTION_OUTPUT, &attn_out, &[c.hidden_size])?;
        add_in_place(&mut x, &attn_out);
        tap.emit(li, P::AFTER_ATTENTION_RESIDUAL, &x, &[c.hidden_size])?;

        // MLP block.
        let xn = rms_norm(&x, &w.post_attention_layernorm, c.rms_norm_eps);
        tap.emit(li, P::POST_ATTENTION_LAYERNORM, &xn, &[c.hidden_size])?;
        let [gate, up]: [Vec<f32>; 2] = group(&[&w.gate_proj, &w.up_proj], &[&w.gate_bias, &w.up_bias], &xn, rows);
        tap.emit(li, P::MLP_GATE_PROJ, &gate, &[c.intermediate_size])?;
        tap.emit(li, P::MLP_UP_PROJ, &up, &[c.intermediate_size])?;
        let mut hidden = vec![0.0; gate.len()];
        activation::swiglu(&gate, &up, &mut hidden);
        tap.emit(li, P::MLP_INTERMEDIATE, &hidden, &[c.intermediate_size])?;
        let mlp_out = linear(&w.down_proj, &hidden, rows, &w.down_bias);
        tap.emit(li, P::MLP_OUTPUT, &mlp_out, &[c.hidden_size])?;
        add_in_place(&mut x, &mlp_out);
        tap.emit(li, P::OUTPUT, &x, &[c.hidden_size])?;
        Ok(x)
    }
}
