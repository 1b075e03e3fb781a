//! `ellm._lowlevel` kernels. Shapes were checked by `ellm.ops`; they are checked again here so
//! a direct caller gets a ValueError too.

use numpy::{
    IntoPyArray, PyArray1, PyArrayDyn, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::{compute, shape_of, slice, to_array};
use crate::error::EllmError;
use crate::kernels::matmul as gemm_kernels;
use crate::kernels::sample::{sample_rows, Sampling};
use crate::kernels::{activation, attention, norm, optical, quantize, rng, rope, softmax};

type Array<'py, T = f32> = Bound<'py, PyArrayDyn<T>>;
type Out<'py> = PyResult<Array<'py>>;

fn expect_rank(shape: &[usize], rank: usize, what: &str) -> PyResult<()> {
    if shape.len() == rank {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!("{what} must have {rank} dimensions, got shape {shape:?}")))
    }
}

#[pyfunction]
fn matmul<'py>(py: Python<'py>, a: PyReadonlyArrayDyn<'py, f32>, b: PyReadonlyArrayDyn<'py, f32>) -> Out<'py> {
    let (sa, sb) = (shape_of(&a), shape_of(&b));
    expect_rank(&sa, 2, "a")?;
    expect_rank(&sb, 2, "b")?;
    if sa[1] != sb[0] {
        return Err(PyValueError::new_err(format!("matmul: a {sa:?} and b {sb:?} do not fit")));
    }
    let (m, k, n) = (sa[0], sa[1], sb[1]);
    let (a, b) = (slice(&a, "a")?, slice(&b, "b")?);
    let out = compute(py, || {
        let mut out = vec![0.0; m * n];
        gemm_kernels::matmul(a, b, &mut out, m, k, n);
        Ok(out)
    })?;
    to_array(py, out, &[m, n])
}

#[pyfunction]
#[pyo3(signature = (x, weight, bias=None))]
fn linear<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
) -> Out<'py> {
    let (sx, sw) = (shape_of(&x), shape_of(&weight));
    expect_rank(&sx, 2, "x")?;
    expect_rank(&sw, 2, "weight")?;
    if sx[1] != sw[1] {
        return Err(PyValueError::new_err(format!("linear: x {sx:?} and weight {sw:?} do not fit")));
    }
    let (m, k, n) = (sx[0], sx[1], sw[0]);
    let bias_slice = match &bias {
        Some(b) if shape_of(b) != [n] => {
            return Err(PyValueError::new_err(format!("linear: bias {:?} does not fit weight {sw:?}", shape_of(b))))
        }
        Some(b) => Some(slice(b, "bias")?),
        None => None,
    };
    let (x, w) = (slice(&x, "x")?, slice(&weight, "weight")?);
    let out = compute(py, || {
        let mut out = vec![0.0; m * n];
        gemm_kernels::linear(x, w, bias_slice, &mut out, m, k, n);
        Ok(out)
    })?;
    to_array(py, out, &[m, n])
}

#[pyfunction]
fn rms_norm<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    eps: f32,
) -> Out<'py> {
    let (sx, sw) = (shape_of(&x), shape_of(&weight));
    if sw.len() != 1 || sx.last() != sw.first() {
        return Err(PyValueError::new_err(format!("rms_norm: x {sx:?} and weight {sw:?} do not fit")));
    }
    let (xs, ws) = (slice(&x, "x")?, slice(&weight, "weight")?);
    let out = compute(py, || {
        let mut out = vec![0.0; xs.len()];
        norm::rms_norm(xs, ws, eps, &mut out);
        Ok(out)
    })?;
    to_array(py, out, &sx)
}

#[pyfunction]
#[pyo3(name = "rope")]
fn rope_py<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    positions: Vec<i64>,
    theta: f64,
    scaling_kind: &str,
    scaling_params: Vec<f64>,
) -> Out<'py> {
    let sx = shape_of(&x);
    expect_rank(&sx, 3, "x")?;
    if positions.len() != sx[0] {
        return Err(PyValueError::new_err(format!("rope: {} positions for x {sx:?}", positions.len())));
    }
    if positions.iter().any(|&p| p < 0) {
        return Err(PyValueError::new_err("rope: positions must be >= 0"));
    }
    let positions: Vec<usize> = positions.into_iter().map(|p| p as usize).collect();
    let scaling = rope::RopeScaling::from_parts(scaling_kind, &scaling_params).map_err(super::to_py_err)?;
    let xs = slice(&x, "x")?;
    let out = compute(py, || {
        let freqs = rope::inv_freq(sx[2], theta, &scaling)?;
        let mut out = xs.to_vec();
        rope::rope(&mut out, &positions, sx[1], sx[2], &freqs);
        Ok(out)
    })?;
    to_array(py, out, &sx)
}

#[pyfunction]
fn silu<'py>(py: Python<'py>, x: PyReadonlyArrayDyn<'py, f32>) -> Out<'py> {
    let sx = shape_of(&x);
    let xs = slice(&x, "x")?;
    let out = compute(py, || {
        let mut out = vec![0.0; xs.len()];
        activation::silu(xs, &mut out);
        Ok(out)
    })?;
    to_array(py, out, &sx)
}

#[pyfunction]
fn swiglu<'py>(py: Python<'py>, gate: PyReadonlyArrayDyn<'py, f32>, up: PyReadonlyArrayDyn<'py, f32>) -> Out<'py> {
    let (sg, su) = (shape_of(&gate), shape_of(&up));
    if sg != su {
        return Err(PyValueError::new_err(format!("swiglu: gate {sg:?} and up {su:?} differ")));
    }
    let (g, u) = (slice(&gate, "gate")?, slice(&up, "up")?);
    let out = compute(py, || {
        let mut out = vec![0.0; g.len()];
        activation::swiglu(g, u, &mut out);
        Ok(out)
    })?;
    to_array(py, out, &sg)
}

/// Softmax over the last axis.
#[pyfunction]
#[pyo3(name = "softmax")]
fn softmax_py<'py>(py: Python<'py>, x: PyReadonlyArrayDyn<'py, f32>) -> Out<'py> {
    let sx = shape_of(&x);
    let row = *sx.last().ok_or_else(|| PyValueError::new_err("softmax needs at least one dimension"))?;
    let xs = slice(&x, "x")?;
    if row == 0 {
        return to_array(py, Vec::new(), &sx);
    }
    let out = compute(py, || {
        let mut out = vec![0.0; xs.len()];
        softmax::softmax(xs, row, &mut out);
        Ok(out)
    })?;
    to_array(py, out, &sx)
}

#[pyfunction]
#[pyo3(name = "attention", signature = (q, k, v, causal, start_pos, scale, window=0))]
fn attention_py<'py>(
    py: Python<'py>,
    q: PyReadonlyArrayDyn<'py, f32>,
    k: PyReadonlyArrayDyn<'py, f32>,
    v: PyReadonlyArrayDyn<'py, f32>,
    causal: bool,
    start_pos: usize,
    scale: f32,
    window: usize,
) -> Out<'py> {
    let (sq, sk, sv) = (shape_of(&q), shape_of(&k), shape_of(&v));
    expect_rank(&sq, 3, "q")?;
    expect_rank(&sk, 3, "k")?;
    if sk != sv || sq[2] != sk[2] {
        return Err(PyValueError::new_err(format!("attention: q {sq:?}, k {sk:?}, v {sv:?} do not fit")));
    }
    let shape = attention::AttentionShape {
        q_len: sq[0],
        kv_len: sk[0],
        n_heads: sq[1],
        n_kv_heads: sk[1],
        head_dim: sq[2],
        causal,
        start_pos,
        scale,
        window,
    };
    let (qs, ks, vs) = (slice(&q, "q")?, slice(&k, "k")?, slice(&v, "v")?);
    let view = |data| attention::KvView::f32(data, sk[1] * sk[2], sk[2]);
    let out = compute(py, || {
        let mut out = vec![0.0; qs.len()];
        attention::attention(qs, view(ks), view(vs), &shape, &mut out)?;
        Ok(out)
    })?;
    to_array(py, out, &sq)
}

#[pyfunction]
#[pyo3(name = "quantize")]
fn quantize_py<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    bits: u32,
    min_val: f32,
    max_val: f32,
) -> Out<'py> {
    let sx = shape_of(&x);
    let xs = slice(&x, "x")?;
    let out = compute(py, || {
        let mut out = vec![0.0; xs.len()];
        quantize::quantize(xs, bits, min_val, max_val, &mut out)?;
        Ok(out)
    })?;
    to_array(py, out, &sx)
}

#[pyfunction]
fn normal<'py>(py: Python<'py>, count: usize, seed: u64, stream: u64) -> Out<'py> {
    let out = compute(py, || {
        let mut out = vec![0.0; count];
        rng::fill_normal(&mut out, seed, stream);
        Ok(out)
    })?;
    to_array(py, out, &[count])
}

/// One token id per row of `logits` `[rows, vocab]`; per row: the uniform draw `u`, the
/// temperature (<= 0: greedy), top_p (1: no cut) and top_k (0: no cut).
#[pyfunction]
fn sample<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray2<'py, f32>,
    u: PyReadonlyArray1<'py, f64>,
    temperature: PyReadonlyArray1<'py, f32>,
    top_p: PyReadonlyArray1<'py, f64>,
    top_k: PyReadonlyArray1<'py, i64>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let (rows, vocab) = (logits.shape()[0], logits.shape()[1]);
    let (u, temperature, top_p, top_k) = (u.as_slice()?, temperature.as_slice()?, top_p.as_slice()?, top_k.as_slice()?);
    let lengths = [u.len(), temperature.len(), top_p.len(), top_k.len()];
    if lengths.iter().any(|&n| n != rows) {
        return Err(PyValueError::new_err(format!(
            "sample: {rows} rows of logits need {rows} values each of u, temperature, top_p and top_k, got {lengths:?}"
        )));
    }
    let rows: Vec<Sampling> = (0..rows)
        .map(|r| Sampling { temperature: temperature[r], top_p: top_p[r], top_k: top_k[r].max(0) as usize, u: u[r] })
        .collect();
    let xs = logits.as_slice().map_err(|_| PyValueError::new_err("logits must be C-contiguous"))?;
    let ids = compute(py, || sample_rows(xs, vocab, &rows))?;
    Ok(ids.into_iter().map(|i| i as i64).collect::<Vec<_>>().into_pyarray(py))
}

/// Returns (y, pre_adc_mask or None).
#[pyfunction]
#[pyo3(signature = (x, weight, bias, precision, noise_level, temp_drift, attenuation, thermal_std, noisy, seed, want_mask))]
#[allow(clippy::too_many_arguments)]
fn optical_linear<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    precision: u32,
    noise_level: f32,
    temp_drift: f32,
    attenuation: f32,
    thermal_std: f32,
    noisy: bool,
    seed: u64,
    want_mask: bool,
) -> PyResult<(Array<'py>, Option<Array<'py, u8>>)> {
    let (sx, sw) = (shape_of(&x), shape_of(&weight));
    expect_rank(&sx, 2, "x")?;
    expect_rank(&sw, 2, "weight")?;
    if sx[1] != sw[1] {
        return Err(PyValueError::new_err(format!("optical_linear: x {sx:?} and weight {sw:?} do not fit")));
    }
    let (batch, n_in, n_out) = (sx[0], sx[1], sw[0]);
    let bias_slice = match &bias {
        Some(b) if shape_of(b) != [n_out] => {
            return Err(PyValueError::new_err(format!(
                "optical_linear: bias {:?} does not fit weight {sw:?}",
                shape_of(b)
            )))
        }
        Some(b) => Some(slice(b, "bias")?),
        None => None,
    };
    let params = optical::OpticalParams { precision, noise_level, temp_drift, attenuation, thermal_std, noisy, seed };
    let (xs, ws) = (slice(&x, "x")?, slice(&weight, "weight")?);
    let (out, mask) = compute(py, || {
        let mut out = vec![0.0; batch * n_out];
        let mut mask = if want_mask { Some(vec![0u8; batch * n_out]) } else { None };
        optical::optical_linear(xs, ws, bias_slice, &params, &mut out, mask.as_deref_mut(), n_in, n_out)?;
        Ok::<_, EllmError>((out, mask))
    })?;
    let y = to_array(py, out, &[batch, n_out])?;
    let mask = match mask {
        Some(m) => {
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[batch, n_out]), m)
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            Some(numpy::IntoPyArray::into_pyarray(a, py))
        }
        None => None,
    };
    Ok((y, mask))
}

/// Returns (grad_x, grad_weight).
#[pyfunction]
#[pyo3(signature = (grad_y, x, weight, pre_adc_mask, precision, attenuation))]
fn optical_linear_backward<'py>(
    py: Python<'py>,
    grad_y: PyReadonlyArrayDyn<'py, f32>,
    x: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    pre_adc_mask: PyReadonlyArrayDyn<'py, u8>,
    precision: u32,
    attenuation: f32,
) -> PyResult<(Array<'py>, Array<'py>)> {
    let (sg, sx, sw, sm) = (shape_of(&grad_y), shape_of(&x), shape_of(&weight), pre_adc_mask.shape().to_vec());
    expect_rank(&sw, 2, "weight")?;
    if sg.len() != 2 || sx.len() != 2 || sg[0] != sx[0] || sg[1] != sw[0] || sx[1] != sw[1] || sm != sg {
        return Err(PyValueError::new_err(format!(
            "optical_linear_backward: grad_y {sg:?}, x {sx:?}, weight {sw:?}, mask {sm:?} do not fit"
        )));
    }
    let (n_in, n_out) = (sw[1], sw[0]);
    let (gs, xs, ws) = (slice(&grad_y, "grad_y")?, slice(&x, "x")?, slice(&weight, "weight")?);
    let ms = pre_adc_mask.as_slice().map_err(|_| PyValueError::new_err("pre_adc_mask must be C-contiguous"))?;
    let (gx, gw) =
        compute(py, || optical::optical_linear_backward(gs, xs, ws, ms, precision, attenuation, n_in, n_out))?;
    Ok((to_array(py, gx, &sx)?, to_array(py, gw, &sw)?))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(matmul, m)?)?;
    m.add_function(wrap_pyfunction!(linear, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(rope_py, m)?)?;
    m.add_function(wrap_pyfunction!(silu, m)?)?;
    m.add_function(wrap_pyfunction!(swiglu, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_py, m)?)?;
    m.add_function(wrap_pyfunction!(attention_py, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_py, m)?)?;
    m.add_function(wrap_pyfunction!(normal, m)?)?;
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    m.add_function(wrap_pyfunction!(optical_linear, m)?)?;
    m.add_function(wrap_pyfunction!(optical_linear_backward, m)?)?;
    Ok(())
}
