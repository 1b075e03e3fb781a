//! `ellm._lowlevel.LlamaEngine`: the Rust decoder, one call per step.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use numpy::{PyArrayDyn, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use std::sync::Arc;

use super::gguf::GgufReader;
use super::{compute, guarded, shape_of, slice, to_array};
use crate::error::{EllmError, Result};
use crate::kernels::pool;
use crate::kernels::quant::matrix::SharedBytes;
use crate::kernels::rope::RopeScaling;
use crate::model::hook_points as points;
use crate::model::weights::{unpermute_map, KeepAs, Matrix, StoredTensor};
use crate::model::{Batch, Hooks, Input, Llama, LlamaConfig, LogitsWanted};

#[pyclass(module = "ellm._lowlevel")]
struct LlamaEngine {
    model: Llama,
}

fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    d.get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("engine config is missing {key:?}")))?
        .extract::<T>()
        .map_err(|e| {
            let e: PyErr = e.into();
            PyValueError::new_err(format!("engine config {key:?}: {e}"))
        })
}

fn get_or<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str, default: T) -> PyResult<T> {
    if d.contains(key)? {
        get(d, key)
    } else {
        Ok(default)
    }
}

fn config_from_dict(d: &Bound<'_, PyDict>) -> PyResult<LlamaConfig> {
    let kind: String = get(d, "rope_scaling_kind")?;
    let p: Vec<f64> = get(d, "rope_scaling_params")?;
    let rope_scaling = RopeScaling::from_parts(&kind, &p).map_err(super::to_py_err)?;
    Ok(LlamaConfig {
        vocab_size: get(d, "vocab_size")?,
        hidden_size: get(d, "hidden_size")?,
        intermediate_size: get(d, "intermediate_size")?,
        num_layers: get(d, "num_hidden_layers")?,
        num_heads: get(d, "num_attention_heads")?,
        num_kv_heads: get(d, "num_key_value_heads")?,
        head_dim: get(d, "head_dim")?,
        rms_norm_eps: get(d, "rms_norm_eps")?,
        rope_theta: get(d, "rope_theta")?,
        rope_scaling,
        qkv_bias: get(d, "qkv_bias")?,
        o_bias: get(d, "o_bias")?,
        qk_norm: get(d, "qk_norm")?,
        layer_windows: get(d, "layer_windows")?,
        mlp_bias: get(d, "mlp_bias")?,
        tie_word_embeddings: get(d, "tie_word_embeddings")?,
        max_seq_len: get(d, "max_seq_len")?,
        max_batch_size: get(d, "max_batch_size")?,
        kv_f16: match get_or(d, "kv_cache_dtype", "f32".to_string())?.as_str() {
            "f32" => false,
            "f16" => true,
            other => {
                return Err(PyValueError::new_err(format!("kv_cache_dtype must be \"f32\" or \"f16\", got {other:?}")))
            }
        },
        tensors: get(d, "tensors")?,
        layer_offset: get_or(d, "layer_offset", 0)?,
        embeds_tokens: get_or(d, "embeds_tokens", true)?,
        computes_logits: get_or(d, "computes_logits", true)?,
    })
}

/// Calls back into Python for the hook points named in `enabled` (none without a registry), and
/// stops the step between layers once `cancel` is set (Ctrl-C seen by the calling thread).
struct PyHooks<'c> {
    callback: Option<Py<PyAny>>,
    enabled: HashSet<String>,
    error: Option<PyErr>,
    cancel: &'c AtomicBool,
}

/// How often the calling thread looks for Python signals while a step runs: Python runs signal
/// handlers only on its main thread, which waits here while the pool does the step.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(20);

fn point_name(layer: i32, point: &str) -> String {
    if layer < 0 {
        point.to_string()
    } else {
        format!("layer{layer}_{point}")
    }
}

impl Hooks for PyHooks<'_> {
    fn wants(&self, layer: i32, point: &str) -> bool {
        !self.enabled.is_empty() && self.enabled.contains(&point_name(layer, point))
    }

    fn fire(&mut self, layer: i32, point: &str, data: &[f32], shape: &[usize]) -> Result<()> {
        let Some(callback) = &self.callback else { return Ok(()) };
        let name = point_name(layer, point);
        let outcome = Python::attach(|py| -> PyResult<()> {
            let array = to_array(py, data.to_vec(), shape)?;
            callback.call1(py, (name, array, layer))?;
            Ok(())
        });
        outcome.map_err(|e| {
            self.error = Some(e);
            EllmError::Hook
        })
    }

    fn interrupted(&mut self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(EllmError::Hook) // the calling thread holds the signal's exception
        } else {
            Ok(())
        }
    }
}

#[pymethods]
impl LlamaEngine {
    #[new]
    fn new(config: &Bound<'_, PyDict>) -> PyResult<Self> {
        let config = config_from_dict(config)?;
        Ok(LlamaEngine { model: guarded(|| Llama::new(config))? })
    }

    /// Copy one tensor (a C-contiguous float32 array) into the engine; a matrix is kept as
    /// `dtype` says ("f32", or "q8_0" / "q4_0" to quantize it).
    #[pyo3(signature = (name, array, dtype="f32"))]
    fn set_weight(
        &mut self,
        py: Python<'_>,
        name: &str,
        array: PyReadonlyArrayDyn<'_, f32>,
        dtype: &str,
    ) -> PyResult<()> {
        let shape = shape_of(&array);
        let data = slice(&array, name)?;
        let keep = KeepAs::from_name(dtype).map_err(super::to_py_err)?;
        let model = &mut self.model;
        compute(py, || match (keep, shape.as_slice()) {
            (KeepAs::Quantized(_), &[rows, cols]) => {
                let bytes: SharedBytes = Arc::new(data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
                let len = data.len() * 4;
                let stored =
                    StoredTensor { name, type_name: "F32", rows, cols, bytes, range: 0..len, check_finite: false };
                model.set_matrix(name, Matrix::from_stored(stored, keep, None)?)
            }
            _ => model.set_weight(name, &shape, data.to_vec()),
        })
    }

    /// One matrix from its stored bytes (`type_name` "F16", "BF16", "F32" or a GGML block type),
    /// kept as `dtype` says ("auto": as stored); NaN or infinite values refused unless allowed.
    #[pyo3(signature = (name, type_name, shape, data, dtype, allow_non_finite=false))]
    #[allow(clippy::too_many_arguments)]
    fn set_weight_stored(
        &mut self,
        py: Python<'_>,
        name: &str,
        type_name: &str,
        shape: (usize, usize),
        data: numpy::PyReadonlyArray1<'_, u8>,
        dtype: &str,
        allow_non_finite: bool,
    ) -> PyResult<()> {
        let keep = KeepAs::from_name(dtype).map_err(super::to_py_err)?;
        let data = data.as_slice().map_err(|_| PyValueError::new_err("stored bytes must be contiguous"))?;
        let bytes: SharedBytes = Arc::new(data.to_vec());
        let model = &mut self.model;
        compute(py, || {
            let (rows, cols) = shape;
            let stored = StoredTensor {
                name,
                type_name,
                rows,
                cols,
                bytes,
                range: 0..data.len(),
                check_finite: !allow_non_finite,
            };
            let m = Matrix::from_stored(stored, keep, None)?;
            model.set_matrix(name, m)
        })
    }

    /// One tensor of a GGUF file, read in place: `gguf_name` there, `name` here. A matrix is
    /// kept as `dtype` says; `unpermute_heads` > 0 undoes llama.cpp's rotary row order of a Q or
    /// K projection with that many heads. NaN or infinite values (block scales) are refused,
    /// naming the tensor, unless allowed.
    #[pyo3(signature = (reader, gguf_name, name, dtype="auto", unpermute_heads=0, allow_non_finite=false))]
    #[allow(clippy::too_many_arguments)]
    fn load_gguf(
        &mut self,
        py: Python<'_>,
        reader: &GgufReader,
        gguf_name: &str,
        name: &str,
        dtype: &str,
        unpermute_heads: usize,
        allow_non_finite: bool,
    ) -> PyResult<()> {
        let keep = KeepAs::from_name(dtype).map_err(super::to_py_err)?;
        let entry = reader.entry(gguf_name)?;
        let model = &mut self.model;
        compute(py, || {
            let shape = entry.shape();
            let row_map = (unpermute_heads > 0 && shape.len() == 2).then(|| unpermute_map(shape[0], unpermute_heads));
            if shape.len() == 1 {
                return model.set_weight(
                    name,
                    &shape,
                    reader.matrix(entry, KeepAs::F32, None, !allow_non_finite)?.to_f32(),
                );
            }
            model.set_matrix(name, reader.matrix(entry, keep, row_map, !allow_non_finite)?)
        })
    }

    /// name -> storage type ("F32", "Q4_1", ...) of every matrix loaded.
    fn weight_types(&self) -> Vec<(String, &'static str)> {
        self.model.weights.matrices().into_iter().map(|(n, t, _)| (n, t)).collect()
    }

    /// Bytes of every matrix loaded (what one decode step reads).
    fn weight_bytes(&self) -> Vec<usize> {
        self.model.weights.matrices().into_iter().map(|(_, _, b)| b).collect()
    }

    fn reset_cache(&mut self) {
        self.model.reset_cache();
    }

    /// Raise ValueError naming every tensor not loaded yet.
    fn check_loaded(&mut self) -> PyResult<()> {
        guarded(|| self.model.check_loaded())
    }

    /// tokens `[batch, seq]` int64 -> logits `[batch, seq, vocab]` (all_logits) or `[batch, vocab]`.
    #[pyo3(signature = (tokens, start_pos, all_logits, hook=None, hook_names=None))]
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        tokens: PyReadonlyArray2<'py, i64>,
        start_pos: usize,
        all_logits: bool,
        hook: Option<Py<PyAny>>,
        hook_names: Option<HashSet<String>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let shape = tokens.shape().to_vec();
        let (batch, seq) = (shape[0], shape[1]);
        let vocab = self.model.config.vocab_size;
        let ids = token_ids(tokens.as_array().iter().copied(), vocab)?;
        let wanted = if all_logits { LogitsWanted::All } else { LogitsWanted::Last };
        let logits = run_on_pool(py, &mut self.model, hook, hook_names, |model, hooks| {
            model.forward(&ids, batch, seq, start_pos, wanted, Some(hooks))
        })?;
        let out_shape = if all_logits { vec![batch, seq, vocab] } else { vec![batch, vocab] };
        to_array(py, logits, &out_shape)
    }

    /// One ragged step: row r is `inputs[r]` (a token id, or for a later pipeline stage a row of
    /// hidden states `[rows, hidden_size]` float32) of KV slot `slots[r]` at `positions[r]`; returns
    /// the logits `[rows where logits, vocab]` (a stage before the last: the hidden states of every
    /// row). A slot's rows are adjacent, at consecutive positions starting at or before the slot's
    /// length.
    #[pyo3(signature = (inputs, slots, positions, logits, hook=None, hook_names=None))]
    #[allow(clippy::too_many_arguments)]
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        inputs: &Bound<'py, PyAny>,
        slots: PyReadonlyArray1<'py, i64>,
        positions: PyReadonlyArray1<'py, i64>,
        logits: PyReadonlyArray1<'py, bool>,
        hook: Option<Py<PyAny>>,
        hook_names: Option<HashSet<String>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let c = &self.model.config;
        let (vocab, hidden, last) = (c.vocab_size, c.hidden_size, c.computes_logits);
        let given_ids = inputs.extract::<PyReadonlyArray1<'py, i64>>().ok();
        let (ids, states): (Vec<u32>, Vec<f32>) = if let Some(tokens) = &given_ids {
            (token_ids(tokens.as_array().iter().copied(), vocab)?, Vec::new())
        } else if let Ok(states) = inputs.extract::<PyReadonlyArray2<'py, f32>>() {
            if states.shape()[1] != hidden {
                return Err(PyValueError::new_err(format!(
                    "hidden states must be [rows, {hidden}], got {:?}",
                    states.shape()
                )));
            }
            (Vec::new(), states.as_array().iter().copied().collect())
        } else {
            return Err(PyValueError::new_err(
                "inputs must be a 1-d int64 array of token ids or a 2-d float32 array of hidden states",
            ));
        };
        let index = |name: &str, a: &PyReadonlyArray1<'py, i64>| -> PyResult<Vec<usize>> {
            a.as_array()
                .iter()
                .map(|&v| {
                    usize::try_from(v).map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {v}")))
                })
                .collect()
        };
        let (slots, positions) = (index("slots", &slots)?, index("positions", &positions)?);
        let wanted: Vec<bool> = logits.as_array().iter().copied().collect();
        let n_wanted = wanted.iter().filter(|&&w| w).count();
        let (rows, tokens_given) = (slots.len(), given_ids.is_some());
        let out = run_on_pool(py, &mut self.model, hook, hook_names, |model, hooks| {
            let input = if tokens_given { Input::Tokens(&ids) } else { Input::Hidden(&states) };
            let batch = Batch { input, slots: &slots, positions: &positions, logits: &wanted };
            model.step(&batch, Some(hooks))
        })?;
        if last {
            to_array(py, out, &[n_wanted, vocab])
        } else {
            to_array(py, out, &[rows, hidden])
        }
    }

    /// Number of KV slots (max_batch_size).
    fn num_slots(&self) -> usize {
        self.model.cache().slots()
    }

    /// Positions each slot holds.
    fn slot_lengths(&self) -> Vec<usize> {
        (0..self.model.cache().slots()).map(|s| self.model.cache().len(s)).collect()
    }

    /// Keep the first `n` positions of `slot`.
    fn truncate_slot(&mut self, slot: usize, n: usize) -> PyResult<()> {
        self.check_slot(slot)?;
        self.model.cache_mut().truncate(slot, n);
        Ok(())
    }

    /// Make `dst` hold the first `n` positions of `src`.
    fn copy_slot(&mut self, src: usize, dst: usize, n: usize) -> PyResult<()> {
        self.check_slot(src)?;
        self.check_slot(dst)?;
        guarded(|| self.model.cache_mut().copy(src, dst, n))
    }
}

impl LlamaEngine {
    fn check_slot(&self, slot: usize) -> PyResult<()> {
        let n = self.model.cache().slots();
        if slot < n {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!("slot {slot} does not exist: the cache has {n} slots")))
        }
    }
}

fn token_ids(tokens: impl Iterator<Item = i64>, vocab: usize) -> PyResult<Vec<u32>> {
    tokens
        .map(|t| if (0..vocab as i64).contains(&t) { Ok(t as u32) } else { Err(t) })
        .collect::<std::result::Result<_, _>>()
        .map_err(|t| PyValueError::new_err(format!("token id {t} is out of range for vocab_size {vocab}")))
}

/// Run one engine step on a pool thread with the GIL released, so its many short parallel regions
/// are joined inside the pool instead of each one waking the pool from outside; meanwhile this
/// thread watches for Ctrl-C, which stops the step between layers (the step is then undone).
fn run_on_pool(
    py: Python<'_>,
    model: &mut Llama,
    hook: Option<Py<PyAny>>,
    hook_names: Option<HashSet<String>>,
    step: impl FnOnce(&mut Llama, &mut PyHooks) -> Result<Vec<f32>> + Send,
) -> PyResult<Vec<f32>> {
    let (callback, enabled) = match (hook, hook_names) {
        (Some(callback), Some(enabled)) if !enabled.is_empty() => (Some(callback), enabled),
        _ => (None, HashSet::new()),
    };
    let cancel = AtomicBool::new(false);
    let mut hooks = PyHooks { callback, enabled, error: None, cancel: &cancel };
    let mut signal: Option<PyErr> = None;
    let result = py.detach(|| {
        let (done, finished) = mpsc::channel();
        pool::pool().in_place_scope(|scope| {
            let hooks = &mut hooks;
            scope.spawn(move |_| {
                let outcome = guarded(|| step(model, hooks));
                let _ = done.send(outcome);
            });
            loop {
                match finished.recv_timeout(SIGNAL_CHECK_INTERVAL) {
                    Ok(outcome) => return outcome,
                    Err(RecvTimeoutError::Timeout) if signal.is_none() => {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            signal = Some(e);
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(PyRuntimeError::new_err("internal error: the engine step ended unheard"));
                    }
                }
            }
        })
    });
    if let Some(err) = signal.or(hooks.error) {
        return Err(err);
    }
    result
}

/// The hook point names the engine fires: (points outside the layers, each layer's points), each in
/// firing order.
#[pyfunction]
fn hook_points() -> (Vec<&'static str>, Vec<&'static str>) {
    (points::MODEL_POINTS.to_vec(), points::LAYER_POINTS.to_vec())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hook_points, m)?)?;
    m.add_class::<LlamaEngine>()
}
