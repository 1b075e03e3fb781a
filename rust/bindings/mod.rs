//! PyO3 only: NumPy in and out, the work done with the GIL released, errors mapped, and no
//! panic ever crossing into Python.

mod gguf;
mod model;
mod ops;

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::error::EllmError;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    ops::register(m)?;
    gguf::register(m)?;
    model::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

pub(crate) fn to_py_err(e: EllmError) -> PyErr {
    match e {
        EllmError::Value(msg) => PyValueError::new_err(msg),
        EllmError::Format(msg) => format_error(msg),
        EllmError::Io(msg) => pyo3::exceptions::PyOSError::new_err(msg),
        EllmError::Hook => PyRuntimeError::new_err("a hook callback failed"),
        EllmError::Memory(msg) => pyo3::exceptions::PyMemoryError::new_err(msg),
    }
}

/// `ellm.errors.ModelFormatError` (a ValueError subclass, defined in Python so that both
/// backends raise the same class).
fn format_error(msg: String) -> PyErr {
    Python::attach(|py| match py.import("ellm.errors").and_then(|m| m.getattr("ModelFormatError")) {
        Ok(cls) => PyErr::from_type(cls.cast_into().expect("a class"), msg),
        Err(_) => PyValueError::new_err(msg),
    })
}

/// Kernel work: run with the GIL released, with errors and panics turned into Python
/// exceptions. (The kernels run their parallel parts on `kernels::pool`, which survives fork.)
pub(crate) fn compute<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, EllmError> + Send) -> PyResult<T> {
    py.detach(|| guarded(f))
}

/// Run `f`, turning a panic into a Python RuntimeError instead of unwinding into Python.
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, EllmError>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(to_py_err),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(PyRuntimeError::new_err(format!("internal error in ellm's Rust core: {msg}")))
        }
    }
}

/// A C-contiguous f32 input as a slice (the Python layer converts anything else first).
pub(crate) fn slice<'a>(a: &'a PyReadonlyArrayDyn<'_, f32>, what: &str) -> PyResult<&'a [f32]> {
    a.as_slice().map_err(|_| PyValueError::new_err(format!("{what} must be C-contiguous")))
}

pub(crate) fn shape_of(a: &PyReadonlyArrayDyn<'_, f32>) -> Vec<usize> {
    a.shape().to_vec()
}

pub(crate) fn to_array<'py>(py: Python<'py>, data: Vec<f32>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), data)
        .map_err(|e| PyRuntimeError::new_err(format!("internal shape error: {e}")))?;
    Ok(numpy::IntoPyArray::into_pyarray(array, py))
}
