//! How the model's tensors are stored, under their Hugging Face names. Which tensors a model
//! has, and their shapes, come with its config (`LlamaConfig::tensors`, from the Python
//! `ModelArgs.expected_shapes`, the one list of them).
//!
//! Every matrix is a `Matrix`, and this file is the only code that looks at how one is stored:
//! f32, f16 or bf16 values, or llama.cpp's quantized blocks multiplied as they are.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::config::LlamaConfig;
use crate::error::{EllmError, Result};
use crate::kernels::aligned::AlignedF32;
use crate::kernels::pool::{self, DisjointWrites};
use crate::kernels::quant::matrix::{self as quant_matrix, QuantMatrix, SharedBytes};
use crate::kernels::quant::QuantKind;
use crate::kernels::{few_rows, matmul, simd};

pub enum Storage {
    F32(AlignedF32),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Quant(QuantMatrix),
}

/// How a stored tensor should be kept (`Transformer.from_pretrained(dtype=...)`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeepAs {
    /// As stored.
    Stored,
    /// Expanded to f32.
    F32,
    /// f32/f16/bf16 matrices quantized to this kind; quantized ones as stored.
    Quantized(QuantKind),
}

impl KeepAs {
    pub fn from_name(name: &str) -> Result<KeepAs> {
        match name.to_ascii_lowercase().as_str() {
            "auto" => Ok(KeepAs::Stored),
            "f32" | "float32" => Ok(KeepAs::F32),
            "q8_0" => Ok(KeepAs::Quantized(QuantKind::Q8_0)),
            "q4_0" => Ok(KeepAs::Quantized(QuantKind::Q4_0)),
            _ => Err(EllmError::Value(format!(
                "dtype {name:?} is not one ellm keeps weights in: use \"auto\", \"f32\", \"q8_0\" or \"q4_0\""
            ))),
        }
    }
}

/// A `[rows, cols]` tensor's bytes as a file stores them: `bytes[range]` of type `type_name`
/// (a GGML or safetensors type name).
pub struct StoredTensor<'a> {
    pub name: &'a str,
    pub type_name: &'a str,
    pub rows: usize,
    pub cols: usize,
    pub bytes: SharedBytes,
    pub range: std::ops::Range<usize>,
    /// Refuse NaN and infinite values (in quantized blocks: scales), naming the tensor.
    pub check_finite: bool,
}

/// A `[rows, cols]` weight used as `x @ W^T`.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub storage: Storage,
}

/// Rows of half-precision weights converted per task.
const HALF_ROWS_PER_TASK: usize = 64;

impl Matrix {
    pub fn f32(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        assert_eq!(data.len(), rows * cols);
        Matrix { rows, cols, storage: Storage::F32(AlignedF32::from_slice(&data)) }
    }

    /// A tensor as stored, kept as `keep` says; `row_map` puts the stored rows in the model's
    /// order (logical row i is stored row map[i]).
    pub fn from_stored(stored: StoredTensor<'_>, keep: KeepAs, row_map: Option<Vec<u32>>) -> Result<Matrix> {
        let StoredTensor { name, type_name, rows, cols, bytes, range, check_finite } = stored;
        if rows == 0 || cols == 0 {
            return Err(EllmError::Format(format!("tensor {name} has no values (shape [{rows}, {cols}])")));
        }
        let raw = &(*bytes).as_ref()[range.clone()];
        if check_finite {
            check_finite_values(name, type_name, raw)?;
        }
        let kind = QuantKind::from_name(type_name);
        let stored = match (type_name, kind) {
            (_, Some(kind)) => {
                let m = QuantMatrix::new(kind, rows, cols, bytes.clone(), range)
                    .map_err(|e| EllmError::Format(format!("tensor {name}: {e}")))?;
                Storage::Quant(
                    match row_map.clone() {
                        Some(map) => m.with_row_map(map),
                        None => m,
                    }
                    .for_this_cpu(),
                )
            }
            ("F32", _) => {
                Storage::F32(AlignedF32::from_slice(&reorder(&halves::<f32>(raw, rows * cols, name)?, cols, &row_map)))
            }
            ("F16", _) => Storage::F16(reorder(&halves::<f16>(raw, rows * cols, name)?, cols, &row_map)),
            ("BF16", _) => Storage::BF16(reorder(&halves::<bf16>(raw, rows * cols, name)?, cols, &row_map)),
            _ => {
                return Err(EllmError::Format(format!(
                    "tensor {name} has type {type_name}, which ellm does not support (it runs F32, F16, BF16, \
                     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K)"
                )))
            }
        };
        let m = Matrix { rows, cols, storage: stored };
        Ok(match (keep, &m.storage) {
            (KeepAs::Stored, _) => m,
            (KeepAs::F32, Storage::F32(_)) => m,
            (KeepAs::F32, _) => Matrix::f32(rows, cols, m.to_f32()),
            (KeepAs::Quantized(_), Storage::Quant(_)) => m,
            (KeepAs::Quantized(kind), _) => {
                let q = QuantMatrix::quantize(kind, rows, cols, &m.to_f32())
                    .map_err(|e| EllmError::Value(format!("tensor {name}: {e}")))?;
                Matrix { rows, cols, storage: Storage::Quant(q.for_this_cpu()) }
            }
        })
    }

    /// The matrix reads the bytes it was made from (blocks used in place).
    pub fn reads_source(&self) -> bool {
        matches!(&self.storage, Storage::Quant(q) if !q.is_interleaved())
    }

    /// Bytes of its storage.
    pub fn nbytes(&self) -> usize {
        match &self.storage {
            Storage::F32(w) => 4 * w.len(),
            Storage::F16(w) => 2 * w.len(),
            Storage::BF16(w) => 2 * w.len(),
            Storage::Quant(q) => q.nbytes(),
        }
    }

    /// The storage's type name ("F32", "Q4_1", ...).
    pub fn type_name(&self) -> &'static str {
        match &self.storage {
            Storage::F32(_) => "F32",
            Storage::F16(_) => "F16",
            Storage::BF16(_) => "BF16",
            Storage::Quant(q) => q.kind.name(),
        }
    }

    /// Every value as f32, row after row.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.embed_row(r, row);
        }
        out
    }

    /// `out[m, rows] = x[m, cols] @ self^T (+ bias)`
    pub fn linear(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        match &self.storage {
            Storage::F32(w) => matmul::linear(x, w, bias, out, m, self.cols, self.rows),
            Storage::Quant(q) => {
                quant_matrix::linear_many(x, m, &[q], &mut [&mut *out]);
                add_bias(out, bias);
            }
            Storage::F16(_) | Storage::BF16(_) => {
                self.half_linear(x, m, out);
                add_bias(out, bias);
            }
        }
    }

    /// Row `i` as f32 into `out[cols]` (the embedding lookup).
    pub fn embed_row(&self, i: usize, out: &mut [f32]) {
        let range = i * self.cols..(i + 1) * self.cols;
        match &self.storage {
            Storage::F32(w) => out.copy_from_slice(&w[range]),
            Storage::F16(w) => w[range].convert_to_f32_slice(out),
            Storage::BF16(w) => w[range].convert_to_f32_slice(out),
            Storage::Quant(q) => q.dequantize_row(i, out),
        }
    }

    /// f16/bf16 weights: each task converts a run of rows to f32 and multiplies them.
    fn half_linear(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (k, n) = (self.cols, self.rows);
        let writes = DisjointWrites(out.as_mut_ptr());
        let starts: Vec<usize> = (0..n).step_by(HALF_ROWS_PER_TASK).collect();
        pool::install(|| {
            starts.into_par_iter().for_each(|start| {
                let rows = HALF_ROWS_PER_TASK.min(n - start);
                let mut w = vec![0.0f32; rows * k];
                for (r, row) in w.chunks_exact_mut(k).enumerate() {
                    self.embed_row(start + r, row);
                }
                let mut part = vec![0.0f32; m * rows];
                if m == 1 {
                    for (r, o) in part.iter_mut().enumerate() {
                        *o = simd::dot(x, &w[r * k..(r + 1) * k]);
                    }
                } else {
                    matmul::matmul_with(x, &transpose(&w, rows, k), &mut part, m, k, rows, gemm::Parallelism::None);
                }
                for i in 0..m {
                    for r in 0..rows {
                        // SAFETY: each task writes only its own columns start..start + rows.
                        unsafe { *writes.at(i * n + start + r) = part[i * rows + r] };
                    }
                }
            })
        });
    }
}

/// A tensor's stored values (or, in blocks, scales) are all finite; else a ModelFormatError
/// naming it and how many are not.
fn check_finite_values(name: &str, type_name: &str, raw: &[u8]) -> Result<()> {
    let (bad, what) = match (type_name, QuantKind::from_name(type_name)) {
        (_, Some(kind)) if raw.len().is_multiple_of(kind.block_bytes()) => {
            (kind.non_finite_blocks(raw), "blocks whose scales are")
        }
        ("F32", _) => (
            raw.chunks_exact(4).filter(|b| !f32::from_le_bytes((*b).try_into().expect("4")).is_finite()).count(),
            "values",
        ),
        ("F16", _) => {
            (raw.chunks_exact(2).filter(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00).count(), "values")
        }
        ("BF16", _) => {
            (raw.chunks_exact(2).filter(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7F80 == 0x7F80).count(), "values")
        }
        _ => (0, ""),
    };
    if bad > 0 {
        return Err(EllmError::Format(format!(
            "weight {name:?} holds {bad} {what} NaN or infinite (a corrupt file? GGUF and safetensors carry no \
             checksum); pass allow_non_finite=True to load it anyway"
        )));
    }
    Ok(())
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

fn add_bias(out: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }
}

/// Little-endian values of a plain type, copied out of (possibly unaligned) bytes.
fn halves<T: Copy + Default + FromLe>(raw: &[u8], count: usize, name: &str) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if raw.len() != count * size {
        return Err(EllmError::Format(format!("tensor {name}: {} bytes for {count} values", raw.len())));
    }
    Ok(raw.chunks_exact(size).map(T::from_le).collect())
}

trait FromLe {
    fn from_le(b: &[u8]) -> Self;
}
impl FromLe for f32 {
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
}
impl FromLe for f16 {
    fn from_le(b: &[u8]) -> Self {
        f16::from_le_bytes(b.try_into().expect("2 bytes"))
    }
}
impl FromLe for bf16 {
    fn from_le(b: &[u8]) -> Self {
        bf16::from_le_bytes(b.try_into().expect("2 bytes"))
    }
}

/// Rows put in the model's order.
fn reorder<T: Copy>(values: &[T], cols: usize, row_map: &Option<Vec<u32>>) -> Vec<T> {
    match row_map {
        None => values.to_vec(),
        Some(map) => {
            map.iter().flat_map(|&r| values[r as usize * cols..(r as usize + 1) * cols].iter().copied()).collect()
        }
    }
}

/// llama.cpp's converter stores a Llama Q or K projection's rows of each head interleaved for
/// its rotary kernel; logical row `h*d + a*d/2 + b` is stored row `h*d + 2b + a`.
pub fn unpermute_map(rows: usize, heads: usize) -> Vec<u32> {
    let d = rows / heads;
    let half = d / 2;
    (0..rows)
        .map(|r| {
            let (h, within) = (r / d, r % d);
            let (a, b) = (within / half, within % half);
            (h * d + 2 * b + a) as u32
        })
        .collect()
}

/// `linear` of several matrices (all `[_, cols]`) on the same input: quantized ones share one
/// quantization of it, and for a single input row the weights of all of them stream through
/// one parallel region (q/k/v, gate/up).
pub fn linear_group(mats: &[&Matrix], biases: &[Option<&[f32]>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![0.0; m * w.rows]).collect();
    let quant: Vec<&QuantMatrix> = mats
        .iter()
        .filter_map(|w| match &w.storage {
            Storage::Quant(q) => Some(q),
            _ => None,
        })
        .collect();
    let f32s: Vec<(&[f32], usize)> = mats
        .iter()
        .filter_map(|w| match &w.storage {
            Storage::F32(d) => Some((&d[..], w.rows)),
            _ => None,
        })
        .collect();
    if quant.len() == mats.len() {
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        quant_matrix::linear_many(x, m, &quant, &mut views);
    } else if m == 1 && f32s.len() == mats.len() {
        few_rows::linear_many(x, mats[0].cols, &f32s, &mut outs);
    } else {
        for ((w, out), bias) in mats.iter().zip(outs.iter_mut()).zip(biases) {
            w.linear(x, m, *bias, out);
        }
        return outs;
    }
    for (out, bias) in outs.iter_mut().zip(biases) {
        add_bias(out, *bias);
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
        self.expected(cfg, name, shape)?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(EllmError::Value(format!("weight {name:?} has {} values for shape {shape:?}", data.len())));
        }
        let slot = self.slot(name).ok_or_else(|| EllmError::Value(format!("the engine has no place for {name:?}")))?;
        match slot {
            Slot::Vector(v) => *v = data,
            Slot::Bias(b) => *b = Some(data),
            Slot::Matrix(m) => *m = Some(Matrix::f32(shape[0], shape[1], data)),
        }
        Ok(())
    }

    /// Store a matrix kept in any storage under its Hugging Face name, checking its shape.
    pub fn set_matrix(&mut self, cfg: &LlamaConfig, name: &str, matrix: Matrix) -> Result<()> {
        let shape = [matrix.rows, matrix.cols];
        self.expected(cfg, name, &shape)?;
        match self.slot(name) {
            Some(Slot::Matrix(m)) => {
                *m = Some(matrix);
                Ok(())
            }
            _ => Err(EllmError::Value(format!("{name:?} is not a matrix of this model"))),
        }
    }

    fn expected(&self, cfg: &LlamaConfig, name: &str, shape: &[usize]) -> Result<()> {
        let expected = cfg
            .tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .ok_or_else(|| EllmError::Value(format!("unexpected weight {name:?} for this config")))?;
        if expected != shape {
            return Err(EllmError::Value(format!("weight {name:?} has shape {shape:?}, expected {expected:?}")));
        }
        Ok(())
    }

    /// (name, storage type, bytes) of every matrix set.
    pub fn matrices(&self) -> Vec<(String, &'static str, usize)> {
        let mut out = Vec::new();
        let mut add = |name: String, m: &Option<Matrix>| {
            if let Some(m) = m {
                out.push((name, m.type_name(), m.nbytes()));
            }
        };
        add("model.embed_tokens.weight".into(), &self.embed_tokens);
        add("lm_head.weight".into(), &self.lm_head);
        for (i, l) in self.layers.iter().enumerate() {
            for (field, m) in [
                ("self_attn.q_proj", &l.q_proj),
                ("self_attn.k_proj", &l.k_proj),
                ("self_attn.v_proj", &l.v_proj),
                ("self_attn.o_proj", &l.o_proj),
                ("mlp.gate_proj", &l.gate_proj),
                ("mlp.up_proj", &l.up_proj),
                ("mlp.down_proj", &l.down_proj),
            ] {
                add(format!("model.layers.{i}.{field}.weight"), m);
            }
        }
        out
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
