//! `ellm._lowlevel.GgufReader`: the Rust GGUF reader, its metadata handed to Python in one
//! call, its tensors read in place by the engine; and the quantized kernels' path switch.

use std::sync::Arc;

use numpy::PyArrayDyn;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::{compute, to_array};
use crate::error::Result;
use crate::formats::gguf::{Array, GgufFile, TensorEntry, Value};
use crate::kernels::quant::dot::{self, DotPath};
use crate::model::weights::{KeepAs, Matrix};

#[pyclass(module = "ellm._lowlevel", frozen)]
pub struct GgufReader {
    pub file: Arc<GgufFile>,
}

fn array_to_py<'py>(py: Python<'py>, a: &Array) -> PyResult<Bound<'py, PyAny>> {
    Ok(match a {
        Array::Int(v) => PyList::new(py, v)?.into_any(),
        Array::UInt(v) => PyList::new(py, v)?.into_any(),
        Array::Float(v) => PyList::new(py, v)?.into_any(),
        Array::Bool(v) => PyList::new(py, v)?.into_any(),
        Array::Str(v) => PyList::new(py, v)?.into_any(),
        Array::Nested(v) => {
            PyList::new(py, v.iter().map(|a| array_to_py(py, a)).collect::<PyResult<Vec<_>>>()?)?.into_any()
        }
    })
}

fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::UInt(u) => u.into_pyobject(py)?.into_any(),
        Value::Float(f) => f.into_pyobject(py)?.into_any(),
        Value::Bool(b) => pyo3::types::PyBool::new(py, *b).to_owned().into_any(),
        Value::Str(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => array_to_py(py, a)?,
    })
}

impl GgufReader {
    pub fn entry(&self, name: &str) -> PyResult<&TensorEntry> {
        self.file
            .tensor(name)
            .ok_or_else(|| PyValueError::new_err(format!("{}: no tensor named {name:?}", self.file.path)))
    }

    /// A tensor as a `Matrix` kept as `keep` says: `[rows, cols]` with cols its first GGUF
    /// dimension and rows all the others.
    pub fn matrix(
        &self,
        entry: &TensorEntry,
        keep: KeepAs,
        row_map: Option<Vec<u32>>,
        check_finite: bool,
    ) -> Result<Matrix> {
        let stored = self.file.stored(entry, check_finite);
        let matrix = Matrix::from_stored(stored, keep, row_map)?;
        if !matrix.reads_source() {
            self.file.release(entry);
        }
        Ok(matrix)
    }
}

#[pymethods]
impl GgufReader {
    #[new]
    fn new(py: Python<'_>, path: &str) -> PyResult<Self> {
        let path = path.to_string();
        let file = compute(py, move || GgufFile::open(&path))?;
        Ok(GgufReader { file: Arc::new(file) })
    }

    #[getter]
    fn path(&self) -> &str {
        &self.file.path
    }

    /// The metadata keys, in file order.
    fn keys(&self) -> Vec<String> {
        self.file.metadata.iter().map(|(k, _)| k.clone()).collect()
    }

    /// One metadata value (arrays as lists), or None.
    fn get<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.file.get(key).map(|v| value_to_py(py, v)).transpose()
    }

    /// `(name, shape slowest first, type name, bytes)` of every tensor, in file order.
    fn tensors(&self) -> Vec<(String, Vec<usize>, &'static str, usize)> {
        self.file.tensors.iter().map(|t| (t.name.clone(), t.shape(), t.type_name(), t.nbytes)).collect()
    }

    /// One tensor as float32 values, in its shape.
    fn read<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let entry = self.entry(name)?;
        let values = compute(py, || Ok(self.matrix(entry, KeepAs::F32, None, false)?.to_f32()))?;
        to_array(py, values, &entry.shape())
    }
}

/// The quantized kernels' dot path now in use ("avx512vnni", "avxvnni", "avx2", "portable").
#[pyfunction]
fn quant_path() -> &'static str {
    dot::active().name()
}

/// Force a dot path (None: the best this CPU has). ValueError for one it cannot run.
#[pyfunction]
#[pyo3(signature = (name=None))]
fn set_quant_path(name: Option<&str>) -> PyResult<()> {
    let path = match name {
        None => None,
        Some(n) => Some(DotPath::from_name(n).ok_or_else(|| {
            PyValueError::new_err(format!("unknown quantized path {n:?}: use avx512vnni, avxvnni, avx2 or portable"))
        })?),
    };
    dot::force(path).map_err(super::to_py_err)
}

/// The dot paths this CPU can run.
#[pyfunction]
fn quant_paths() -> Vec<&'static str> {
    DotPath::ALL.into_iter().filter(|p| p.available()).map(DotPath::name).collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GgufReader>()?;
    m.add_function(wrap_pyfunction!(quant_path, m)?)?;
    m.add_function(wrap_pyfunction!(set_quant_path, m)?)?;
    m.add_function(wrap_pyfunction!(quant_paths, m)?)?;
    Ok(())
}
