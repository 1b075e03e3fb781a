//! The model's shape; mirrors the Python `ModelArgs` fields the engine needs.

use crate::error::{EllmError, Result};
use crate::kernels::rope::RopeScaling;

/// The config rules both engines apply (Python reads the same file).
const CONFIG_RULES: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/python/ellm/config_rules.json"));

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
    /// The KV cache holds f16 (else f32).
    pub kv_f16: bool,
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

    /// A size by its Hugging Face config name (the names `config_rules.json` uses).
    fn size(&self, name: &str) -> Option<usize> {
        Some(match name {
            "vocab_size" => self.vocab_size,
            "hidden_size" => self.hidden_size,
            "intermediate_size" => self.intermediate_size,
            "num_hidden_layers" => self.num_layers,
            "num_attention_heads" => self.num_heads,
            "num_key_value_heads" => self.num_kv_heads,
            "head_dim" => self.head_dim,
            "max_seq_len" => self.max_seq_len,
            "max_batch_size" => self.max_batch_size,
            _ => return None,
        })
    }

    /// The rules of `python/ellm/config_rules.json`, which Python's `ModelArgs.validate` applies too,
    /// then what only this engine needs (a window per layer).
    pub fn validate(&self) -> Result<()> {
        let rules: serde_json::Value = serde_json::from_str(CONFIG_RULES).expect("config_rules.json parses (tested)");
        let size = |name: &serde_json::Value| -> Result<(String, usize)> {
            let name = name.as_str().unwrap_or_default();
            let value =
                self.size(name).ok_or_else(|| EllmError::Value(format!("config rule names unknown field {name:?}")))?;
            Ok((name.to_string(), value))
        };
        let list = |key: &str| rules[key].as_array().cloned().unwrap_or_default();
        for name in list("positive") {
            let (name, value) = size(&name)?;
            if value == 0 {
                return Err(EllmError::Value(format!("{name} must be a positive int, got 0")));
            }
        }
        for pair in list("divisible") {
            let ((a, x), (b, y)) = (size(&pair[0])?, size(&pair[1])?);
            if !x.is_multiple_of(y) {
                return Err(EllmError::Value(format!("{a} ({x}) must be divisible by {b} ({y})")));
            }
        }
        for rule in list("even") {
            let (name, value) = size(&rule[0])?;
            if !value.is_multiple_of(2) {
                let why = rule[1].as_str().unwrap_or_default();
                return Err(EllmError::Value(format!("{name} must be even for {why}, got {value}")));
            }
        }
        if self.layer_windows.len() != self.num_layers {
            return Err(EllmError::Value(format!(
                "layer_windows has {} entries for {} layers",
                self.layer_windows.len(),
                self.num_layers
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_file_parses_and_names_only_known_sizes() {
        let rules: serde_json::Value = serde_json::from_str(CONFIG_RULES).unwrap();
        let config = LlamaConfig {
            vocab_size: 8,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: RopeScaling::from_parts("none", &[]).unwrap(),
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            layer_windows: vec![0],
            mlp_bias: false,
            tie_word_embeddings: true,
            max_seq_len: 4,
            max_batch_size: 1,
            kv_f16: false,
            tensors: vec![],
            layer_offset: 0,
            embeds_tokens: true,
            computes_logits: true,
        };
        for key in ["positive", "divisible", "even"] {
            for rule in rules[key].as_array().unwrap() {
                let names: Vec<&str> = match rule {
                    serde_json::Value::String(s) => vec![s.as_str()],
                    _ => rule
                        .as_array()
                        .unwrap()
                        .iter()
                        .take(if key == "even" { 1 } else { 2 })
                        .map(|n| n.as_str().unwrap())
                        .collect(),
                };
                for name in names {
                    assert!(config.size(name).is_some(), "{name}");
                }
            }
        }
        assert!(config.validate().is_ok());
        let odd = LlamaConfig { head_dim: 3, ..config.clone() };
        assert!(odd.validate().unwrap_err().to_string().contains("head_dim must be even"));
    }
}
