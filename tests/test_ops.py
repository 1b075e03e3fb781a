"""Every op: Rust against its NumPy twin, and each twin against an independent definition."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import ellm
from ellm import ops
from ellm.numpy_backend import kernels as N

SETTINGS = settings(max_examples=25, deadline=None)


def arrays(draw, shape, scale=3.0):
    seed = draw(st.integers(0, 2**32 - 1))
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def on_both(fn, *args, **kwargs):
    out = {}
    for b in ("rust", "numpy"):
        ellm.set_backend(b)
        out[b] = fn(*args, **kwargs)
    ellm.set_backend("rust")
    return out["rust"], out["numpy"]


# ----- Rust against NumPy, random shapes and values -----

@SETTINGS
@given(st.data())
def test_linear_and_matmul_agree(data):
    m, k, n = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 70)), data.draw(st.integers(1, 50))
    x, w, b = arrays(data.draw, (m, k)), arrays(data.draw, (n, k)), arrays(data.draw, (n,))
    r, p = on_both(ops.linear, x, w, b)
    np.testing.assert_allclose(r, p, rtol=1e-4, atol=1e-3)
    r, p = on_both(ops.matmul, x.reshape(1, m, k), w.T)
    np.testing.assert_allclose(r, p, rtol=1e-4, atol=1e-3)
    assert r.shape == (1, m, n)


@SETTINGS
@given(st.data())
def test_norm_activations_softmax_agree(data):
    rows, dim = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 100))
    x, w = arrays(data.draw, (rows, dim)), arrays(data.draw, (dim,))
    for fn, args in ((ops.rms_norm, (x, w, 1e-5)), (ops.silu, (x,)), (ops.swiglu, (x, w * x)), (ops.softmax, (x,))):
        r, p = on_both(fn, *args)
        np.testing.assert_allclose(r, p, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.data())
def test_rope_agrees(data):
    seq, heads, half = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 16))
    x = arrays(data.draw, (seq, heads, 2 * half))
    pos = np.arange(seq) + data.draw(st.integers(0, 500))
    scaling = data.draw(st.sampled_from([None, {"rope_type": "linear", "factor": 2.0},
                                         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}]))
    r, p = on_both(ops.rope, x, pos, 10000.0, scaling)
    np.testing.assert_allclose(r, p, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.data())
def test_attention_agrees(data):
    kv, group, d = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 20))
    sq, start = data.draw(st.integers(1, 8)), data.draw(st.integers(0, 8))
    q, k, v = arrays(data.draw, (sq, kv * group, d), 1.0), arrays(data.draw, (start + sq, kv, d), 1.0), arrays(data.draw, (start + sq, kv, d))
    causal = data.draw(st.booleans())
    r, p = on_both(ops.attention, q, k, v, causal=causal, start_pos=start)
    np.testing.assert_allclose(r, p, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(st.data())
def test_quantize_and_normal_agree(data):
    x = arrays(data.draw, (data.draw(st.integers(1, 300)),))
    bits = data.draw(st.integers(1, 16))
    r, p = on_both(ops.quantize, x, bits, -2.0, 2.0)
    np.testing.assert_array_equal(r, p)
    count, seed, stream = data.draw(st.integers(0, 9000)), data.draw(st.integers(0, 2**64 - 1)), data.draw(st.integers(0, 2**64 - 1))
    r, p = on_both(ops.normal, count, seed, stream)
    np.testing.assert_allclose(r, p, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.data())
def test_sample_agrees(data):
    rows, vocab = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3000))
    x = arrays(data.draw, (rows, vocab))
    if vocab > 1:
        x[:, data.draw(st.integers(0, vocab - 1))] = -np.inf  # a banned id
    u = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).random(rows)
    per_row = {"temperature": [data.draw(st.sampled_from([0.0, 0.3, 1.0, 2.0])) for _ in range(rows)],
               "top_p": [data.draw(st.sampled_from([1.0, 0.9, 0.3, 1e-6])) for _ in range(rows)],
               "top_k": [data.draw(st.sampled_from([0, 1, 5, 100])) for _ in range(rows)]}
    r, p = on_both(ops.sample, x, u, **per_row)
    np.testing.assert_array_equal(r, p)


# ----- NumPy twins against independent definitions -----

def test_attention_by_explicit_loops():
    rng = np.random.default_rng(0)
    sq, start, heads, kv, d = 3, 2, 4, 2, 5
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((sq, heads, d), (start + sq, kv, d), (start + sq, kv, d)))
    expect = np.zeros((sq, heads, d))
    for i in range(sq):
        for h in range(heads):
            g = h // (heads // kv)
            keys = range(start + i + 1)
            scores = [float(q[i, h] @ k[t, g]) / math.sqrt(d) for t in keys]
            weights = np.exp(np.array(scores) - max(scores))
            weights /= weights.sum()
            expect[i, h] = sum(wt * v[t, g] for wt, t in zip(weights, keys))
    ellm.set_backend("numpy")
    np.testing.assert_allclose(ops.attention(q, k, v, start_pos=start), expect, atol=1e-5)
    ellm.set_backend("rust")
    np.testing.assert_allclose(ops.attention(q, k, v, start_pos=start), expect, atol=1e-5)


def test_rope_as_complex_rotation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 8)).astype(np.float32)
    pos = np.array([0, 1, 7, 300])
    freqs = 1.0 / 500.0 ** (np.arange(0, 8, 2) / 8)
    z = x[..., :4] + 1j * x[..., 4:]
    rotated = z * np.exp(1j * pos[:, None, None] * freqs[None, None, :])
    expect = np.concatenate([rotated.real, rotated.imag], axis=-1)
    ellm.set_backend("numpy")
    np.testing.assert_allclose(ops.rope(x, pos, theta=500.0), expect, atol=1e-4)
    ellm.set_backend("rust")


def test_quantize_hand_worked():
    ellm.set_backend("numpy")
    # 2 bits on [0, 1]: levels 0, 1/3, 2/3, 1; 0.5 -> 1.5 rounds to even (2 -> 2/3).
    out = ops.quantize([-1.0, 0.1, 0.2, 0.5, 0.9, 3.0], 2, 0.0, 1.0)
    ellm.set_backend("rust")
    np.testing.assert_allclose(out, [0, 0, 1 / 3, 2 / 3, 1, 1], atol=1e-7)
    np.testing.assert_allclose(ops.quantize([0.26], 1, -1.0, 1.0), [1.0])


def test_softmax_axis_and_stability():
    x = np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]], dtype=np.float32)
    np.testing.assert_allclose(ops.softmax(x), [[0.5, 0.5], [0.25, 0.75]], atol=1e-6)
    np.testing.assert_allclose(ops.softmax(x, axis=0).sum(axis=0), [1.0, 1.0], atol=1e-6)


def test_xoshiro_reference_outputs():
    # Reference values of xoshiro256++ (Blackman & Vigna's C code) from state [1, 2, 3, 4].
    state = [np.array([w], dtype=np.uint64) for w in (1, 2, 3, 4)]
    expected = [41943041, 58720359, 3588806011781223, 3591011842654386, 9228616714210784205,
                9973669472204895162, 14011001112246962877, 12406186145184390807]
    with np.errstate(over="ignore"):
        got = [int(N.xoshiro_next(state)[0]) for _ in expected]
    assert got == expected


def test_normal_statistics_on_a_million_samples():
    for b in ("numpy", "rust"):
        ellm.set_backend(b)
        x = ops.normal(1_000_000, seed=12345).astype(np.float64)
        assert abs(x.mean()) < 0.005
        assert abs(x.var() - 1.0) < 0.005
        assert stats.kstest(x, "norm").pvalue > 1e-3
    ellm.set_backend("rust")


def test_normal_is_reproducible_and_extends():
    a = ops.normal((3, 5000), seed=9, stream=2)
    b = ops.normal(20000, seed=9, stream=2)
    np.testing.assert_array_equal(a.reshape(-1), b[:15000])
    assert not np.array_equal(ops.normal(100, seed=9, stream=3), b[:100])
    assert not np.array_equal(ops.normal(100, seed=10, stream=2), b[:100])


def test_non_contiguous_and_float64_inputs_are_converted():
    x = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]
    w = np.ones((2, 3))
    out = ops.linear(x, w)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x @ w.T)


def expected_sample_frequencies(logits, temperature, top_p, top_k):
    """What each id's share of draws must be: softmax, a full stable sort, top-k, then the
    smallest prefix whose probability reaches top_p, renormalized."""
    p = np.exp(logits.astype(np.float64) / temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept, mass = [], 0.0
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or mass > top_p:
            break
        kept.append(i)
        mass += p[i]
    out = np.zeros(len(p))
    out[kept] = p[kept] / p[kept].sum()
    return out


@pytest.mark.parametrize("b", ["rust", "numpy"])
@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.5, 1.0, 0), (1.0, 1.0, 2), (1.0, 0.55, 0),
                                                       (2.0, 0.7, 3), (1.0, 1e-9, 0)])
def test_sample_draws_each_id_as_often_as_its_probability(b, temperature, top_p, top_k):
    """u on an even grid of 20000 points: the inverse of the running sum gives every id a share of
    the grid equal to its kept, renormalized probability, to within one grid step."""
    logits = np.log(np.array([0.05, 0.3, 0.1, 0.3, 0.25], np.float32))  # a tie between ids 1 and 3
    u = (np.arange(20000) + 0.5) / 20000
    ellm.set_backend(b)
    try:
        ids = ops.sample(np.broadcast_to(logits, (len(u), 5)), u, temperature=temperature, top_p=top_p, top_k=top_k)
    finally:
        ellm.set_backend("rust")
    shares = np.bincount(ids, minlength=5) / len(u)
    np.testing.assert_allclose(shares, expected_sample_frequencies(logits, temperature, top_p, top_k), atol=2e-4)
    assert (np.diff(ids[np.isin(ids, [1, 3])]) >= 0).all()  # the tie: id 1 before id 3


@pytest.mark.parametrize("b", ["rust", "numpy"])
def test_a_vanishing_temperature_draws_among_the_maxima(b):
    ellm.set_backend(b)
    try:
        x = np.array([[1.0, 3.0, 2.0, 3.0]], np.float32)
        for t in (1e-45, 1e-38, 1e-20):
            assert [int(ops.sample(x, u, temperature=t)[0]) for u in (0.1, 0.9)] == [1, 3], t
    finally:
        ellm.set_backend("rust")


def test_seeded_sampling_draws_once_per_row_and_never_when_greedy():
    from ellm.sampling import sample
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    rng = np.random.default_rng(7)
    assert (sample(logits, 0.0, 1.0, None, rng) == logits.argmax(axis=1)).all()
    chosen = sample(logits, 0.9, 0.8, 10, rng)
    np.testing.assert_array_equal(chosen, ops.sample(logits, np.random.default_rng(7).random(3), temperature=0.9,
                                                     top_p=0.8, top_k=10))


# ----- errors -----

@pytest.mark.parametrize("b", ["rust", "numpy"])
def test_errors_name_the_problem(b):
    ellm.set_backend(b)
    try:
        with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
            ops.linear(np.zeros((2, 3)), np.zeros((4, 5)))
        with pytest.raises(ValueError, match="matmul"):
            ops.matmul(np.zeros((2, 3)), np.zeros((2, 3)))
        with pytest.raises(ValueError, match="bits"):
            ops.quantize([0.0], 0)
        with pytest.raises(ValueError, match="bits"):
            ops.quantize([0.0], 17)
        with pytest.raises(ValueError, match="multiple of n_kv_heads"):
            ops.attention(np.zeros((1, 3, 4)), np.zeros((1, 2, 4)), np.zeros((1, 2, 4)))
        with pytest.raises(ValueError, match="rms_norm"):
            ops.rms_norm(np.zeros((2, 3)), np.zeros(4))
        with pytest.raises(ValueError, match="even head_dim"):
            ops.rope(np.zeros((2, 1, 3)), [0, 1])
        with pytest.raises(ValueError, match="unsupported rope scaling"):
            ops.rope(np.zeros((1, 1, 4)), [0], scaling={"rope_type": "yarn", "factor": 2.0})
        with pytest.raises(ValueError, match="seed"):
            ops.normal(3, seed=-1)
        with pytest.raises(TypeError):
            ops.silu("not numbers")
        with pytest.raises(ValueError, match="row 1.*NaN"):
            ops.sample(np.array([[0.0, 1.0], [np.nan, 0.0]]), [0.5, 0.5])
        with pytest.raises(ValueError, match="row 0.*-inf"):
            ops.sample(np.full((1, 3), -np.inf), 0.5)
        for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}):
            with pytest.raises(ValueError, match=next(iter(bad))):
                ops.sample(np.zeros((1, 3)), 0.5, **bad)
        with pytest.raises(ValueError, match="u must be in"):
            ops.sample(np.zeros((1, 3)), 1.0)
        with pytest.raises(ValueError, match=r"one per row \(2\)"):
            ops.sample(np.zeros((2, 3)), [0.1, 0.2, 0.3])
        with pytest.raises(TypeError, match="top_k must be ints"):
            ops.sample(np.zeros((2, 3)), 0.5, top_k=2.5)
    finally:
        ellm.set_backend("rust")


def test_rust_bindings_reject_bad_shapes_directly():
    with pytest.raises(ValueError):
        ellm._backend.require_rust().linear(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        ellm._backend.require_rust().silu(np.zeros((4, 4), np.float32)[:, ::2])


EDGE_CASES = {
    "linear, no rows": (lambda: ops.linear(np.zeros((0, 4)), np.ones((3, 4))), (0, 3)),
    "linear, no inputs": (lambda: ops.linear(np.zeros((20, 0)), np.zeros((3, 0))), (20, 3)),
    "matmul, k = 0": (lambda: ops.matmul(np.zeros((20, 0)), np.zeros((0, 5))), (20, 5)),
    "rms_norm, empty rows": (lambda: ops.rms_norm(np.zeros((3, 0)), np.ones(0)), (3, 0)),
    "softmax, empty rows": (lambda: ops.softmax(np.zeros((3, 0))), (3, 0)),
    "attention, no queries": (lambda: ops.attention(np.zeros((0, 2, 4)), np.ones((3, 1, 4)), np.ones((3, 1, 4))), (0, 2, 4)),
    "attention, no keys": (lambda: ops.attention(np.ones((20, 2, 4)), np.zeros((0, 1, 4)), np.zeros((0, 1, 4)), causal=False), (20, 2, 4)),
    "rope, no heads": (lambda: ops.rope(np.zeros((2, 0, 4)), [0, 1]), (2, 0, 4)),
    "normal, empty": (lambda: ops.normal((2, 0), seed=1), (2, 0)),
    "optical, no inputs": (lambda: ops.optical_linear(np.zeros((100, 0)), np.zeros((3, 0)), precision=4, noise_level=0.1,
                                                      temp_drift=0.0, attenuation=1.0, training=False, seed=1), (100, 3)),
}


@pytest.mark.parametrize("name", EDGE_CASES)
def test_empty_and_zero_sized_inputs(name):
    fn, shape = EDGE_CASES[name]
    results = []
    for b in ("rust", "numpy"):
        ellm.set_backend(b)
        with np.errstate(all="ignore"):
            results.append(fn())
    ellm.set_backend("rust")
    assert results[0].shape == results[1].shape == shape
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


def test_zero_head_dim_is_a_value_error():
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention(np.zeros((2, 2, 0)), np.zeros((2, 1, 0)), np.zeros((2, 1, 0)))
