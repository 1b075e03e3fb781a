"""NumPy twins of `rust/kernels/`: the same names, the same signatures as `ellm._lowlevel`,
the same results. `ellm.ops` validates and converts inputs before calling either."""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(a, b)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    out = x @ weight.T
    if bias is not None:
        out += bias
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    if x.shape[-1] == 0:
        return x.copy()
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(mean_square + F32(eps)) * weight).astype(F32, copy=False)


def inv_freq(head_dim: int, theta: float, kind: str, params: list[float]) -> np.ndarray:
    """The head_dim/2 rotation frequencies after `rope_scaling` (see rust/kernels/rope.rs)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if kind == "freq_factors":
        if len(params) != len(freqs):
            raise ValueError(f"rope frequency factors: {len(params)} given for {len(freqs)} frequencies "
                             f"(head_dim {head_dim})")
        return (freqs / np.asarray(params, dtype=np.float64)).astype(F32)
    factor, low, high, old = params
    if kind == "linear":
        freqs = freqs / factor
    elif kind == "llama3":
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        ramp = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = np.where(wavelen < old / high, freqs, np.where(wavelen > old / low, freqs / factor, ramp))
    elif kind != "none":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return freqs.astype(F32)


def rope_cos_sin(positions: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin `[len(positions), head_dim/2]`; the angle is formed in float32 as in HF."""
    angles = np.asarray(positions, dtype=F32)[:, None] * freqs[None, :]
    angles = angles.astype(np.float64)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


def rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x `[..., seq, heads, d]`; cos/sin `[seq, d/2]`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope(x: np.ndarray, positions: list[int], theta: float, kind: str, params: list[float]) -> np.ndarray:
    cos, sin = rope_cos_sin(np.asarray(positions), inv_freq(x.shape[-1], theta, kind, params))
    return rotate_half(x, cos, sin)


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (F32(1) + np.exp(-x))).astype(F32, copy=False)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return silu(gate) * up


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis; a row that is all -inf gives zeros, a row holding NaN gives NaN."""
    m = np.max(x, axis=-1, keepdims=True) if x.shape[-1] else x
    m = np.where(np.isneginf(m), F32(0), m)
    e = np.exp(x - m)
    total = np.sum(e, axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=(total > 0) | np.isnan(total))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, start_pos: int, scale: float,
              window: int = 0) -> np.ndarray:
    sq, n_heads, _ = q.shape
    sk, n_kv, _ = k.shape
    group = n_heads // n_kv
    kh = np.repeat(k, group, axis=1).transpose(1, 0, 2)  # [n_heads, sk, d]
    vh = np.repeat(v, group, axis=1).transpose(1, 0, 2)
    scores = np.matmul(q.transpose(1, 0, 2), kh.transpose(0, 2, 1)) * F32(scale)  # [n_heads, sq, sk]
    if causal:
        query_pos = (start_pos + np.arange(sq))[:, None]
        visible = np.arange(sk)[None, :] <= query_pos
        if window:
            visible &= np.arange(sk)[None, :] > query_pos - window
        scores = np.where(visible[None], scores, F32(-np.inf))
    return np.matmul(softmax(scores), vh).transpose(1, 0, 2).astype(F32, copy=False)


def quantize(x: np.ndarray, bits: int, min_val: float, max_val: float) -> np.ndarray:
    lo, hi = F32(min_val), F32(max_val)
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo)
    levels = F32((1 << bits) - 1)
    return (np.round((np.clip(x, lo, hi) - lo) / span * levels) / levels * span + lo).astype(F32, copy=False)


def sample(logits: np.ndarray, u: np.ndarray, temperature: np.ndarray, top_p: np.ndarray,
           top_k: np.ndarray) -> np.ndarray:
    """One id per row of `logits` `[rows, vocab]`. Temperature <= 0 is greedy (the first maximum).
    Otherwise the probabilities are softmax(logits / temperature), as exp((x - max) / t) over their
    sum (so a vanishing temperature draws among the maxima); top_k > 0 keeps the k most
    likely ids and top_p < 1 the smallest most-likely-first prefix whose probability reaches top_p
    (Meta's sample_top_p; ties order by id); the id drawn is where the running sum of what is kept
    first exceeds `u` times its total."""
    out = np.empty(len(logits), dtype=np.int64)
    for r, x in enumerate(logits):
        m = x.max()
        if np.isnan(m) or m == np.inf:
            raise ValueError(f"sample: row {r}: the logits hold NaN or +inf")
        if m == -np.inf:
            raise ValueError(f"sample: row {r}: every logit is -inf: no token can be chosen")
        if temperature[r] <= 0:
            out[r] = np.argmax(x)
            continue
        p = np.exp((x.astype(np.float64) - float(m)) / float(F32(temperature[r])))
        p /= p.sum()
        if top_p[r] >= 1.0 and not top_k[r]:
            out[r] = _invert_running_sum(p, u[r])
            continue
        order, kept = _kept(p, float(top_p[r]), int(top_k[r]))
        out[r] = order[_invert_running_sum(kept, u[r])]
    return out


def _invert_running_sum(weights: np.ndarray, u: float) -> int:
    """The first index whose running sum of `weights` exceeds u times their total (the last
    positive weight where rounding leaves that at the total)."""
    running = np.cumsum(weights)
    return int(min(running.searchsorted(u * running[-1], side="right"), np.flatnonzero(weights)[-1]))


def _kept(p: np.ndarray, top_p: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids top-k and top-p keep, most likely first (ties by id, as a stable sort of all of p
    gives them), and their probabilities. Only candidates are sorted: the k best with every tie of
    the k-th, growing until the nucleus' cutoff falls among them."""
    n = len(p)
    want = top_k if top_k else 64
    while True:
        if want < n:
            kth = np.partition(p, n - want)[n - want]  # the want-th largest probability
            candidates = np.flatnonzero(p >= kth)
        else:
            candidates = np.arange(n)
        order = candidates[np.argsort(-p[candidates], kind="stable")]
        sorted_p = p[order]
        if top_k:
            sorted_p[top_k:] = 0.0
        if top_p < 1.0:
            cut = np.cumsum(sorted_p) - sorted_p > top_p
            if not cut.any() and not top_k and len(candidates) < n:
                want *= 4  # the nucleus may reach past the candidates
                continue
            sorted_p[cut] = 0.0
        return order, sorted_p


# ----- Xoshiro256++ normal samples: the recipe of rust/kernels/rng.rs, in uint64 arithmetic -----

LANES = 8
BLOCK = 4096
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_GAMMA = np.uint64(GOLDEN_GAMMA)


MASK64 = (1 << 64) - 1  # Python ints kept to 64 bits


def splitmix_mix(z):
    """SplitMix64's output function (Steele, Lea & Flood, 2014), elementwise on uint64; a Python
    int gives a Python int (a layer's seed per call: NumPy scalars under errstate cost ~30 us)."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the products wrap modulo 2**64, as the function means
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _rotl(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


def xoshiro_next(s: list[np.ndarray]) -> np.ndarray:
    """One Xoshiro256++ output per generator; advances the state in place."""
    s0, s1, s2, s3 = s
    result = _rotl(s0 + s3, 23) + s0
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s[3] = _rotl(s3, 45)
    return result


def normal_streams(count: int, seed: int, streams: np.ndarray) -> np.ndarray:
    """The first `count` samples of every stream in `streams`: `[len(streams), count]`."""
    streams = np.asarray(streams, dtype=np.uint64)
    if count == 0 or streams.size == 0:
        return np.zeros((streams.size, count), dtype=F32)
    n_blocks = -(-count // BLOCK)
    steps = -(-min(count, BLOCK) // (2 * LANES))
    lane_index = np.arange(n_blocks * LANES, dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = splitmix_mix(np.uint64(seed) ^ splitmix_mix(streams[:, None] ^ splitmix_mix(lane_index)[None, :]))
        state = [splitmix_mix(keys + _GAMMA * np.uint64(i)) for i in range(1, 5)]
        draws = np.stack([xoshiro_next(state) for _ in range(steps)], axis=1)  # [streams, steps, blocks*lanes]
    draws = draws.reshape(len(streams), steps, n_blocks, LANES).transpose(0, 2, 1, 3)  # [s, blocks, steps, lanes]
    u1 = ((draws >> np.uint64(40)) + np.uint64(1)).astype(np.float64) / 2.0**24
    u2 = ((draws >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float64) / 2.0**24
    r = np.sqrt(-2.0 * np.log(u1))
    pairs = np.stack([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=-1)
    return pairs.reshape(len(streams), n_blocks, -1)[:, :, :BLOCK].reshape(len(streams), -1)[:, :count].astype(F32)


def normal(count: int, seed: int, stream: int) -> np.ndarray:
    return normal_streams(count, seed, np.array([stream]))[0]


NON_FINITE_INPUT = "optical_linear: x contains NaN or infinite values"


def optical_linear(x, weight, bias, precision, noise_level, temp_drift, attenuation, thermal_std, noisy, seed, want_mask):
    """The optical layer step by step (the Rust kernel fuses the same math per element)."""
    if not np.isfinite(x).all():
        raise ValueError(NON_FINITE_INPUT)
    s = quantize(x, precision, 0.0, 1.0) @ weight.T
    if noisy:
        s = s * F32(1 - 0.8 * temp_drift) + s.mean(axis=1, keepdims=True) * F32(temp_drift * 0.5)
        noise = normal_streams(weight.shape[0], seed, np.arange(x.shape[0]))  # stream r for row r
        s = s + np.sqrt(F32(noise_level**2) * np.abs(s) + F32(thermal_std**2)) * noise
    analog = (s * F32(attenuation)).astype(F32)
    y = quantize(analog, precision, 0.0, 1.0)
    if bias is not None:
        y = y + bias
    mask = range_side(analog) if want_mask else None
    return y.astype(F32, copy=False), mask


# Where a value fell against a converter's [0, 1] range (rust/kernels/optical.rs `RangeSide`).
BELOW, INSIDE, ABOVE = 0, 1, 2


def range_side(v: np.ndarray) -> np.ndarray:
    return np.where(v > 1, ABOVE, np.where(v >= 0, INSIDE, BELOW)).astype(np.uint8)


def pass_gradient(side: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """A clip's straight-through gradient: all of it inside the range; outside, only a gradient
    whose descent step moves the value back in."""
    keep = (side == INSIDE) | ((side == BELOW) & (grad < 0)) | ((side == ABOVE) & (grad > 0))
    return np.where(keep, grad, F32(0))


def optical_linear_backward(grad_y, x, weight, pre_adc_mask, precision, attenuation):
    """Straight-through gradients of `optical_linear`: (grad_x, grad_weight)."""
    grad_s = pass_gradient(pre_adc_mask, grad_y) * F32(attenuation)
    grad_w = grad_s.T @ quantize(x, precision, 0.0, 1.0)
    grad_x = pass_gradient(range_side(x), grad_s @ weight)
    return grad_x.astype(F32, copy=False), grad_w.astype(F32, copy=False)
