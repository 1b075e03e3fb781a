//! How the model's tensors are stored, under their Hugging Face names. Which tensors a model
//! has, and their shapes, come with its config (`LlamaConfig::tensors`, from the Python
//! `ModelArgs.expected_shapes`, the one list of them).
//!
//! Every matrix is a `Matrix`; today its storage is f32. A quantized storage (GGUF blocks
//! multiplied directly) is a new `Storage` variant with its own `linear`.

use super::config::LlamaConfig;
use crate::error::{EllmError, Result};
use crate::kernels::{few_rows, matmul};

pub enum Storage {
    F32(Vec<f32>),
}

/// A `[rows, cols]` weight used as `x @ W^T`.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub storage: Storage,
}

impl Matrix {
    /// `out[m, rows] = x[m, cols] @ self^T (+ bias)`
    pub fn linear(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        match &self.storage {
            Storage::F32(w) => matmul::linear(x, w, bias, out, m, self.cols, self.rows),
        }
    }

    /// Row `i` as f32 (the embedding lookup).
    pub fn row(&self, i: usize) -> &[f32] {
        match &self.storage {
            Storage::F32(w) => &w[i * self.cols..(i + 1) * self.cols],
        }
    }
}

/// `linear` of several matrices (all `[_, cols]`) on the same input: for a single input row the
/// weights of all of them stream through one parallel region (q/k/v, gate/up).
pub fn linear_group(mats: &[&Matrix], biases: &[Option<&[f32]>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![0.0; m * w.rows]).collect();
    if m == 1 {
        let weights: Vec<(&[f32], usize)> = mats
            .iter()
            .map(|w| match &w.storage {
                Storage::F32(d) => (d.as_slice(), w.rows),
            })
            .collect();
        few_rows::linear_many(x, mats[0].cols, &weights, &mut outs);
        for (out, bias) in outs.iter_mut().zip(biases) {
            if let Some(b) = bias {
                out.iter_mut().zip(b.iter()).for_each(|(o, b)| *o += b);
            }
        }
    } else {
        for ((w, out), bias) in mats.iter().zip(outs.iter_mut()).zip(biases) {
            w.linear(x, m, *bias, out);
        }
    }
    outs
}

#[derive(Default)]
pub struct LayerWeights {
    pub input_layernorm: Vec<f32>,
    pub q_proj: Option<Matrix>,
    pub k_proj: Option<Matrix>,
    pub v_proj: Option<Matrix>,
    pub o_proj: Option<Matrix>,
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub o_bias: Option<Vec<f32>>,
    /// Qwen3's per-head norms of q and k (`[head_dim]`); empty where the model has none.
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: Option<Matrix>,
    pub up_proj: Option<Matrix>,
    pub down_proj: Option<Matrix>,
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    pub down_bias: Option<Vec<f32>>,
}

#[derive(Default)]
pub struct Weights {
    pub embed_tokens: Option<Matrix>,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    pub lm_head: Option<Matrix>,
}

/// Where one named tensor lives inside `Weights`.
enum Slot<'a> {
    Vector(&'a mut Vec<f32>),
    Bias(&'a mut Option<Vec<f32>>),
    Matrix(&'a mut Option<Matrix>),
}

impl Slot<'_> {
    fn is_set(&self) -> bool {
        match self {
            Slot::Vector(v) => !v.is_empty(),
            Slot::Bias(b) => b.is_some(),
            Slot::Matrix(m) => m.is_some(),
        }
    }
}

impl Weights {
    pub fn empty(cfg: &LlamaConfig) -> Self {
        Weights { layers: (0..cfg.num_layers).map(|_| LayerWeights::default()).collect(), ..Default::default() }
    }

    fn slot(&mut self, name: &str) -> Option<Slot<'_>> {
        match name {
            "model.embed_tokens.weight" => return Some(Slot::Matrix(&mut self.embed_tokens)),
            "model.norm.weight" => return Some(Slot::Vector(&mut self.norm)),
            "lm_head.weight" => return Some(Slot::Matrix(&mut self.lm_head)),
            _ => {}
        }
        let (idx, field) = name.strip_prefix("model.layers.")?.split_once('.')?;
        let l = self.layers.get_mut(idx.parse::<usize>().ok()?)?;
        Some(match field {
            "input_layernorm.weight" => Slot::Vector(&mut l.input_layernorm),
            "post_attention_layernorm.weight" => Slot::Vector(&mut l.post_attention_layernorm),
            "self_attn.q_proj.weight" => Slot::Matrix(&mut l.q_proj),
            "self_attn.k_proj.weight" => Slot::Matrix(&mut l.k_proj),
            "self_attn.v_proj.weight" => Slot::Matrix(&mut l.v_proj),
            "self_attn.o_proj.weight" => Slot::Matrix(&mut l.o_proj),
            "self_attn.q_proj.bias" => Slot::Bias(&mut l.q_bias),
            "self_attn.k_proj.bias" => Slot::Bias(&mut l.k_bias),
            "self_attn.v_proj.bias" => Slot::Bias(&mut l.v_bias),
            "self_attn.o_proj.bias" => Slot::Bias(&mut l.o_bias),
            "self_attn.q_norm.weight" => Slot::Vector(&mut l.q_norm),
            "self_attn.k_norm.weight" => Slot::Vector(&mut l.k_norm),
            "mlp.gate_proj.weight" => Slot::Matrix(&mut l.gate_proj),
            "mlp.up_proj.weight" => Slot::Matrix(&mut l.up_proj),
            "mlp.down_proj.weight" => Slot::Matrix(&mut l.down_proj),
            "mlp.gate_proj.bias" => Slot::Bias(&mut l.gate_bias),
            "mlp.up_proj.bias" => Slot::Bias(&mut l.up_bias),
            "mlp.down_proj.bias" => Slot::Bias(&mut l.down_bias),
            _ => return None,
        })
    }

    /// Store one tensor under its Hugging Face name, checking its shape.
    pub fn set(&mut self, cfg: &LlamaConfig, name: &str, shape: &[usize], data: Vec<f32>) -> Result<()> {
        let expected = cfg
            .tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .ok_or_else(|| EllmError::Value(format!("unexpected weight {name:?} for this config")))?;
        if expected != shape || data.len() != shape.iter().product::<usize>() {
            return Err(EllmError::Value(format!("weight {name:?} has shape {shape:?}, expected {expected:?}")));
        }
        let slot = self.slot(name).ok_or_else(|| EllmError::Value(format!("the engine has no place for {name:?}")))?;
        match slot {
            Slot::Vector(v) => *v = data,
            Slot::Bias(b) => *b = Some(data),
            Slot::Matrix(m) => *m = Some(Matrix { rows: shape[0], cols: shape[1], storage: Storage::F32(data) }),
        }
        Ok(())
    }

    /// The names of the tensors not set yet.
    pub fn missing(&mut self, cfg: &LlamaConfig) -> Vec<String> {
        cfg.tensors.iter().map(|(n, _)| n.clone()).filter(|n| !self.slot(n).is_some_and(|s| s.is_set())).collect()
    }

    /// Every tensor of the config has a place here, with the rank that place takes.
    pub fn check_places(&mut self, cfg: &LlamaConfig) -> Result<()> {
        for (name, shape) in &cfg.tensors {
            let rank = match self.slot(name) {
                Some(Slot::Matrix(_)) => 2,
                Some(_) => 1,
                None => return Err(EllmError::Value(format!("the engine has no place for tensor {name:?}"))),
            };
            if shape.len() != rank {
                return Err(EllmError::Value(format!("tensor {name:?} must have {rank} dimensions, got {shape:?}")));
            }
        }
        Ok(())
    }
}
