//! The model's shape; mirrors the Python `ModelArgs` fields the engine needs.

use crate::error::{EllmError, Result};
use crate::kernels::rope::RopeScaling;

#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Biases on the q, k and v projections (Qwen2 always; Llama and Qwen3 with attention_bias).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama and Qwen3 with attention_bias; never Qwen2).
    pub o_bias: bool,
    /// Qwen3: an RMSNorm over each head of q and k, before rope.
    pub qk_norm: bool,
    /// Each layer's sliding attention window (0: the layer attends to every earlier position).
    pub layer_windows: Vec<usize>,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub max_seq_len: usize,
    pub max_batch_size: usize,
    /// Every tensor this engine holds by Hugging Face name (a stage's layers renumbered from 0),
    /// with its shape.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// A pipeline stage's place in the model: the model's index of its first layer (hook names use
    /// it), whether it embeds token ids (else it takes hidden states), and whether it applies the
    /// final norm and the head (else it returns hidden states). The whole model is one stage.
    pub layer_offset: usize,
    pub embeds_tokens: bool,
    pub computes_logits: bool,
}

impl LlamaConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_seq_len", self.max_seq_len),
            ("max_batch_size", self.max_batch_size),
        ];
        for (name, v) in sizes {
            if v == 0 {
                return Err(EllmError::Value(format!("{name} must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(EllmError::Value(format!(
                "num_attention_heads ({}) must be divisible by num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.layer_windows.len() != self.num_layers {
            return Err(EllmError::Value(format!(
                "layer_windows has {} entries for {} layers",
                self.layer_windows.len(),
                self.num_layers
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(EllmError::Value(format!("head_dim must be even for rope, got {}", self.head_dim)));
        }
        Ok(())
    }
}
