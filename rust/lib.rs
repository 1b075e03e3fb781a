//! ellm's compute core. `kernels` and `model` are plain Rust; `bindings` (behind the default
//! "python" feature) exposes them to Python as `ellm._lowlevel`.

pub mod error;
pub mod formats;
pub mod kernels;
pub mod model;

#[cfg(feature = "python")]
mod bindings;

#[cfg(feature = "python")]
use pyo3::prelude::*;

#[cfg(feature = "python")]
#[pymodule]
fn _lowlevel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    bindings::register(m)
}
