"""ellm's kernels, with the same signature and results on the Rust and NumPy backends.

Inputs may be anything `numpy.asarray` takes; they are converted to C-contiguous float32
(a copy only when they are not already). Outputs are new float32 arrays. Shapes that do not fit
raise ValueError with the shapes in the message.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._backend import kernels as _impl

__all__ = [
    "matmul", "linear", "rms_norm", "rope", "silu", "swiglu", "softmax", "attention",
    "quantize", "normal", "sample", "optical_linear", "optical_linear_backward", "rope_scaling_params",
]

_U64 = 1 << 64
THERMAL_STD = 0.005  # the optical layer's thermal noise floor (std of the additive noise)


def _f32(x: Any, name: str) -> np.ndarray:
    """A C-contiguous, aligned float32 array (0-d stays 0-d), copied only where needed."""
    try:
        a = np.asarray(x, dtype=np.float32)
        if a.flags.c_contiguous and a.flags.aligned:
            return a
        return np.require(a, requirements=["C", "A"])
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}: {exc}") from None


def is_positive_number(value: Any) -> bool:
    """A real, finite number > 0 (not a bool)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit we can read
        return 1 << 62


PHYSICAL_MEMORY = _physical_memory()


def check_size(count: int, what: str, itemsize: int = 4) -> None:
    """MemoryError, before anything is allocated, for `count` items that this machine's memory
    cannot hold (the same limit on both backends; Rust would abort, NumPy would swap)."""
    if count * itemsize > PHYSICAL_MEMORY:
        raise MemoryError(f"{what} would take {count * itemsize:,} bytes; this machine has {PHYSICAL_MEMORY:,}")


def _rows(x: np.ndarray) -> np.ndarray:
    """x `[..., d]` as a 2-D `[rows, d]` view (also when d or a leading dimension is 0)."""
    if x.ndim == 2:
        return x
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def check_bits(value: Any, name: str = "bits") -> int:
    """An int in 1..=16 (quantizer and DAC/ADC precision), or ValueError naming `name`."""
    if type(value) is int and 1 <= value <= 16:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 16:
        raise ValueError(f"{name} must be an int in 1..=16, got {value!r}")
    return int(value)


def _u64(value: Any, name: str) -> int:
    if type(value) is int and 0 <= value < _U64:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= int(value) < _U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return int(value)


def matmul(a: Any, b: Any) -> np.ndarray:
    """`a [..., m, k] @ b [k, n]` -> `[..., m, n]`."""
    a, b = _f32(a, "a"), _f32(b, "b")
    if a.ndim < 2 or b.ndim != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"matmul: a {a.shape} and b {b.shape} do not fit (a [..., m, k] @ b [k, n])")
    check_size(math.prod(a.shape[:-1]) * b.shape[1], "matmul's output")
    out = _impl().matmul(_rows(a), b)
    return out.reshape(*a.shape[:-1], b.shape[1])


def linear(x: Any, weight: Any, bias: Any = None) -> np.ndarray:
    """`x [..., in] @ weight[out, in].T (+ bias[out])`, as torch.nn.functional.linear."""
    x, w = _f32(x, "x"), _f32(weight, "weight")
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: x {x.shape} and weight {w.shape} do not fit (x [..., in], weight [out, in])")
    b = None
    if bias is not None:
        b = _f32(bias, "bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"linear: bias {b.shape} does not fit weight {w.shape}")
    check_size(math.prod(x.shape[:-1]) * w.shape[0], "linear's output")
    out = _impl().linear(_rows(x), w, b)
    return out if x.ndim == 2 else out.reshape(*x.shape[:-1], w.shape[0])


def rms_norm(x: Any, weight: Any, eps: float = 1e-5) -> np.ndarray:
    """`x / sqrt(mean(x**2, -1) + eps) * weight` over the last axis."""
    x, w = _f32(x, "x"), _f32(weight, "weight")
    if w.ndim != 1 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"rms_norm: x {x.shape} and weight {w.shape} do not fit")
    return _impl().rms_norm(x, w, float(eps))


def rope_scaling_params(scaling: Mapping[str, Any] | None) -> tuple[str, list[float]]:
    """A Hugging Face `rope_scaling` dict as (kind, params) for the kernels: [factor, low, high,
    original_max] for "linear" and "llama3"; for "freq_factors" (llama.cpp's `rope_freqs` tensor,
    as a GGUF file stores Llama 3 scaling) the divisor of each frequency."""
    if scaling is None:
        return "none", [1.0, 1.0, 1.0, 1.0]
    if not isinstance(scaling, Mapping):
        raise TypeError(f"rope scaling must be a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return "none", [1.0, 1.0, 1.0, 1.0]
    if kind == "freq_factors":
        factors = [float(f) for f in scaling.get("factors", ())]
        if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
            raise ValueError("rope scaling 'freq_factors' needs a non-empty list of positive 'factors'")
        return "freq_factors", factors
    names = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    if kind in names:
        params = []
        for key in names[kind]:
            if key not in scaling:
                raise ValueError(f"rope scaling {kind!r} needs the key {key!r}")
            value = scaling[key]
            if not is_positive_number(value):
                raise ValueError(f"rope scaling {kind!r}: {key} must be a finite number > 0, got {value!r}")
            params.append(float(value))
        if kind == "llama3" and not params[1] < params[2]:
            raise ValueError(f"rope scaling 'llama3': low_freq_factor ({params[1]}) must be below "
                             f"high_freq_factor ({params[2]})")
        return kind, params + [1.0] * (4 - len(params))
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: 'linear', 'llama3', 'freq_factors'")


def rope(x: Any, positions: Any, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """Rotary embedding of x `[seq, n_heads, head_dim]` (Hugging Face rotate-half layout)."""
    x = _f32(x, "x")
    pos = np.asarray(positions)
    if x.ndim != 3 or x.shape[2] % 2:
        raise ValueError(f"rope: x must be [seq, n_heads, head_dim] with an even head_dim, got {x.shape}")
    if pos.shape != (x.shape[0],) or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
        raise ValueError(f"rope: positions must be {x.shape[0]} integers, got shape {pos.shape} of {pos.dtype}")
    if pos.size and pos.min() < 0:
        raise ValueError("rope: positions must be >= 0")
    kind, params = rope_scaling_params(scaling)
    return _impl().rope(x, [int(p) for p in pos], float(theta), kind, params)


def silu(x: Any) -> np.ndarray:
    """`x * sigmoid(x)`."""
    return _impl().silu(_f32(x, "x"))


def swiglu(gate: Any, up: Any) -> np.ndarray:
    """`silu(gate) * up`."""
    gate, up = _f32(gate, "gate"), _f32(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} differ")
    return _impl().swiglu(gate, up)


def softmax(x: Any, axis: int = -1) -> np.ndarray:
    """Softmax along `axis`, computed stably (the maximum is subtracted first)."""
    x = _f32(x, "x")
    if x.ndim == 0:
        raise ValueError("softmax needs at least one dimension")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"softmax: axis {axis} is out of range for shape {x.shape}")
    moved = np.ascontiguousarray(np.moveaxis(x, axis, -1))
    return np.moveaxis(_impl().softmax(moved), -1, axis)


def attention(q: Any, k: Any, v: Any, *, causal: bool = True, start_pos: int = 0, scale: float | None = None,
              window: int | None = None) -> np.ndarray:
    """Scaled dot-product attention with grouped-query heads.

    q `[sq, n_heads, d]`, k and v `[sk, n_kv_heads, d]`; n_heads must be a multiple of
    n_kv_heads. With `causal`, query i sits at position `start_pos + i` and sees keys
    `0 ..= start_pos + i`; with a sliding `window` too, only the last `window` of them.
    Returns `[sq, n_heads, d]`.
    """
    q, k, v = _f32(q, "q"), _f32(k, "k"), _f32(v, "v")
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                         "(q [sq, n_heads, d], k and v [sk, n_kv_heads, d])")
    if q.shape[2] == 0:
        raise ValueError(f"attention: head_dim must be positive, got q {q.shape}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})")
    if start_pos < 0:
        raise ValueError(f"attention: start_pos must be >= 0, got {start_pos}")
    if causal and q.shape[0] and start_pos + q.shape[0] > k.shape[0]:
        raise ValueError(f"attention: causal queries at positions {start_pos}..{start_pos + q.shape[0] - 1} "
                         f"need {start_pos + q.shape[0]} keys, got k {k.shape}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window <= 0):
        raise ValueError(f"attention: window must be a positive int or None, got {window!r}")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    check_size(q.shape[0] * q.shape[1] * max(k.shape[0], q.shape[2]), "attention's scores")
    return _impl().attention(q, k, v, bool(causal), int(start_pos), scale, int(window or 0))


def quantize(x: Any, bits: int, min_val: float = 0.0, max_val: float = 1.0) -> np.ndarray:
    """Uniform fake quantization to `2**bits` levels on [min_val, max_val] (ties round to even)."""
    bits = check_bits(bits)
    if not min_val <= max_val:
        raise ValueError(f"min_val ({min_val}) must not exceed max_val ({max_val})")
    return _impl().quantize(_f32(x, "x"), bits, float(min_val), float(max_val))


def normal(shape: int | Sequence[int], seed: int, stream: int = 0) -> np.ndarray:
    """Standard-normal float32 samples from Xoshiro256++ (the recipe is in `rust/kernels/rng.rs`).

    The same (seed, stream) gives the same numbers on both backends and any thread count;
    a longer request extends a shorter one.
    """
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if any((not isinstance(d, (int, np.integer))) or d < 0 for d in shape):
        raise ValueError(f"normal: shape must be non-negative ints, got {shape}")
    count = math.prod(shape)
    check_size(count, "normal's samples")
    return _impl().normal(count, _u64(seed, "seed"), _u64(stream, "stream")).reshape(shape)


def _per_row(value: Any, rows: int, dtype: type, name: str) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and dtype is np.int64):
        raise TypeError(f"sample: {name} must be {'ints' if dtype is np.int64 else 'numbers'}, got {a.dtype}")
    if a.ndim > 1 or a.ndim == 1 and len(a) != rows:
        raise ValueError(f"sample: {name} must be one value or one per row ({rows}), got shape {a.shape}")
    return np.ascontiguousarray(np.broadcast_to(a, (rows,)), dtype=dtype)


def sample(logits: Any, u: Any, *, temperature: Any = 1.0, top_p: Any = 1.0, top_k: Any = 0) -> np.ndarray:
    """A token id per row of `logits` `[..., vocab]`, drawn at the uniform numbers `u` in [0, 1).

    Temperature <= 0 is greedy. Otherwise the probabilities are softmax(logits / temperature),
    cut to the `top_k` most likely ids (0: no cut) and to the smallest most-likely-first prefix
    whose probability reaches `top_p`; the id is where their running sum first exceeds `u` times
    their total (so `u` from a seeded generator gives the same ids on both backends, up to float
    rounding at a boundary). `u`, `temperature`, `top_p` and `top_k` are one value or one per row.
    Rows that hold NaN or +inf, or only -inf, raise ValueError.
    """
    x = _f32(logits, "logits")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"sample: logits must be [..., vocab] with vocab > 0, got shape {x.shape}")
    rows = _rows(x)
    n = len(rows)
    u = _per_row(u, n, np.float64, "u")
    temperature = _per_row(temperature, n, np.float32, "temperature")
    top_p = _per_row(top_p, n, np.float64, "top_p")
    top_k = _per_row(top_k, n, np.int64, "top_k")
    if not ((u >= 0) & (u < 1)).all():
        raise ValueError("sample: u must be in [0, 1)")
    if not (np.isfinite(temperature) & (temperature >= 0)).all():
        raise ValueError("sample: temperature must be finite and >= 0")
    if not ((top_p > 0) & (top_p <= 1)).all():
        raise ValueError("sample: top_p must be in (0, 1]")
    if (top_k < 0).any():
        raise ValueError("sample: top_k must be >= 0")
    return _impl().sample(rows, u, temperature, top_p, top_k).reshape(x.shape[:-1])


def optical_linear(
    x: Any,
    weight: Any,
    bias: Any = None,
    *,
    precision: int,
    noise_level: float,
    temp_drift: float,
    attenuation: float,
    training: bool,
    seed: int,
    thermal_std: float = THERMAL_STD,
    return_mask: bool = False,
):
    """The fused optical layer (see `ellm.optical`): DAC, product, drift and noise (training),
    attenuation, ADC, bias. x `[..., in]` (NaN or infinite values raise ValueError), weight
    `[out, in]`. With `return_mask`, also a uint8 mask of where each output's analog value fell
    against the ADC range, 0 below, 1 inside, 2 above (for the STE backward)."""
    x, w = _f32(x, "x"), _f32(weight, "weight")
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"optical_linear: x {x.shape} and weight {w.shape} do not fit (x [..., in], weight [out, in])")
    b = None
    if bias is not None:
        b = _f32(bias, "bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"optical_linear: bias {b.shape} does not fit weight {w.shape}")
    precision = check_bits(precision, "precision")
    noise_level, temp_drift = float(noise_level), float(temp_drift)
    if not (0.0 <= noise_level <= 1.0 and 0.0 <= temp_drift <= 1.0):
        name, value = ("noise_level", noise_level) if not 0.0 <= noise_level <= 1.0 else ("temp_drift", temp_drift)
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return optical_linear_checked(x, w, b, precision, noise_level, temp_drift, float(attenuation), float(thermal_std),
                                  bool(training), _u64(seed, "seed"), bool(return_mask))


def optical_linear_checked(x, w, b, precision, noise_level, temp_drift, attenuation, thermal_std, training, seed,
                           return_mask):
    """`optical_linear` on arguments already checked (float32 C-contiguous arrays that fit, a
    valid profile and seed): for callers that check once, such as `ellm.optical.torch`."""
    y, mask = _impl().optical_linear(_rows(x), w, b, precision, noise_level, temp_drift, attenuation, thermal_std,
                                     training, seed, return_mask)
    if x.ndim != 2:
        y = y.reshape(*x.shape[:-1], w.shape[0])
    if return_mask:
        return y, mask.reshape(y.shape)
    return y


def optical_linear_backward(grad_y: Any, x: Any, weight: Any, pre_adc_mask: Any, *, precision: int,
                            attenuation: float) -> tuple[np.ndarray, np.ndarray]:
    """The straight-through backward of `optical_linear`: (grad_x, grad_weight). `pre_adc_mask` is
    the mask `optical_linear(..., return_mask=True)` returned for the same call."""
    g, x, w = _f32(grad_y, "grad_y"), _f32(x, "x"), _f32(weight, "weight")
    mask = np.ascontiguousarray(pre_adc_mask, dtype=np.uint8)
    if w.ndim != 2 or x.shape[-1:] != (w.shape[1],) or g.shape[-1:] != (w.shape[0],) or g.shape[:-1] != x.shape[:-1] \
            or mask.shape != g.shape:
        raise ValueError(f"optical_linear_backward: grad_y {g.shape}, x {x.shape}, weight {w.shape}, "
                         f"mask {mask.shape} do not fit")
    precision = check_bits(precision, "precision")
    gx, gw = _impl().optical_linear_backward(_rows(g), _rows(x), w, _rows(mask), precision, float(attenuation))
    return gx.reshape(x.shape), gw
