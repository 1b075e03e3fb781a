"""Optical layers: profiles, the fused kernel, the STE backward and noise-aware training."""

import os
import subprocess
import sys

import numpy as np
import pytest

import ellm
from ellm import ops
from ellm.optical import PROFILES, NoiseAwareTrainer, OpticalLinear, gradient_noise_level, resolve_profile

KW = dict(precision=8, noise_level=0.1, temp_drift=0.05, attenuation=0.9)


def test_profiles_and_overrides():
    assert set(PROFILES) == {"lumina_nano_v1", "lumina_micro_v1", "edge_ultra_low_power", "datacenter_high_precision", "custom"}
    nano = PROFILES["lumina_nano_v1"]
    assert (nano.noise_level, nano.precision, nano.temp_drift, nano.attenuation) == (0.15, 4, 0.05, 0.85)
    layer = OpticalLinear(4, 3, "lumina_micro_v1", precision=6, noise_level=0.0, seed=1)
    assert (layer.profile.precision, layer.profile.noise_level, layer.profile.temp_drift, layer.profile.attenuation) == (6, 0.0, 0.03, 0.9)
    assert OpticalLinear(4, 3, seed=1).profile == nano
    with pytest.raises(ValueError, match="lumina_nano_v1"):
        resolve_profile("photon_x")
    for bad in (dict(precision=0), dict(precision=17), dict(noise_level=1.5), dict(temp_drift=-0.1), dict(noise_level=float("nan"))):
        with pytest.raises(ValueError):
            OpticalLinear(4, 3, seed=0, **bad)


def test_weights_kaiming_uniform_and_seeded():
    a, b = OpticalLinear(100, 50, bias=True, seed=7), OpticalLinear(100, 50, bias=True, seed=7)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert a.weight.dtype == np.float32 and a.weight.shape == (50, 100) and a.bias.shape == (50,)
    assert np.abs(a.weight).max() <= 0.1 and np.abs(a.weight).max() > 0.09  # bound 1/sqrt(fan_in)
    assert OpticalLinear(4, 2).bias is None
    a.weight[0, 0] = 0.5  # writable


def test_forward_hand_worked():
    layer = OpticalLinear(3, 2, "custom", precision=2, seed=0).eval()
    layer.weight[:] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]
    # DAC at 2 bits: (-0.5, 0.4, 0.9) -> (0, 1/3, 1); products 0 and 2/3; attenuation 1; ADC keeps 0 and 2/3
    np.testing.assert_allclose(layer(np.array([[-0.5, 0.4, 0.9]])), [[0.0, 2 / 3]], atol=1e-7)
    layer.bias = np.array([0.25, -1.0], np.float32)
    np.testing.assert_allclose(layer(np.array([[-0.5, 0.4, 0.9]])), [[0.25, 2 / 3 - 1.0]], atol=1e-6)


def test_eval_deterministic_training_fresh_and_seed_replays():
    x = np.random.default_rng(0).random((8, 16), dtype=np.float32)
    layer = OpticalLinear(16, 32, "lumina_micro_v1", seed=3)
    layer.eval()
    np.testing.assert_array_equal(layer(x), layer(x))
    layer.train()
    first, second = layer(x), layer(x)
    assert (first != second).mean() > 0.3  # fresh noise every call
    again = OpticalLinear(16, 32, "lumina_micro_v1", seed=3)
    np.testing.assert_array_equal(again(x), first)
    np.testing.assert_array_equal(again(x), second)
    assert not np.array_equal(layer.eval()(x, noisy=True), layer(x))  # noisy inference


def noise_of(rows, weights, noise_level=0.2):
    """Noise added to s = weights (one input of value 1), one row per sample."""
    x = np.ones((rows, 1), np.float32)
    w = np.asarray(weights, np.float32)[:, None]
    args = dict(precision=16, noise_level=noise_level, temp_drift=0.0, attenuation=1.0)
    noisy = ops.optical_linear(x, w, training=True, seed=11, **args)
    clean = ops.optical_linear(x, w, training=False, seed=11, **args)
    return noisy - clean


def test_rows_get_independent_noise():
    n = noise_of(64, np.full(4096, 0.5))
    off = np.corrcoef(n)[~np.eye(64, dtype=bool)]
    assert np.abs(off).max() < 0.1 and abs(off.mean()) < 0.01
    assert abs(n.mean()) < 0.003


@pytest.mark.parametrize("b", ["rust", "numpy"])
def test_noise_variance_follows_shot_plus_thermal(b):
    ellm.set_backend(b)
    try:
        # s = 0.2 and 0.6, both many standard deviations inside the ADC range
        n = noise_of(16, np.repeat([0.2, 0.6], 4096), noise_level=0.05)
    finally:
        ellm.set_backend("rust")
    for part, s in ((n[:, :4096], 0.2), (n[:, 4096:], 0.6)):
        assert part.var() == pytest.approx(0.05**2 * s + 0.005**2, rel=0.03)


def test_same_result_for_any_thread_count():
    """The Rust kernel's threads: a batch they split by rows, a lone row whose outputs they split
    (its noise drawn beside the product) and a few rows whose outputs they split. (The NumPy twin
    has no threads of its own; test_rust_against_numpy_for_the_same_seed compares the two.)"""
    code = ("import numpy as np, ellm; from ellm import ops; ellm.set_backend('rust')\n"
            "for batch, n_in, n_out in ((33, 40, 70), (1, 300, 300), (3, 300, 300)):\n"
            "    x = np.random.default_rng(0).random((batch, n_in), dtype=np.float32)\n"
            "    w = np.random.default_rng(1).standard_normal((n_out, n_in)).astype(np.float32) * 0.1\n"
            "    y = ops.optical_linear(x, w, precision=8, noise_level=0.1, temp_drift=0.05, attenuation=0.9,\n"
            "                           training=True, seed=5)\n"
            "    print(y.tobytes().hex())")
    outs = set()
    for threads in ("1", "2"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1


def test_rust_against_numpy_for_the_same_seed():
    rng = np.random.default_rng(2)
    x = rng.random((64, 100), dtype=np.float32) * 1.2 - 0.1
    w = (rng.standard_normal((80, 100)) * 0.1).astype(np.float32)
    b = rng.standard_normal(80).astype(np.float32)
    out = {}
    for backend in ("rust", "numpy"):
        ellm.set_backend(backend)
        out[backend] = ops.optical_linear(x, w, b, training=True, seed=99, return_mask=True, **KW)
    ellm.set_backend("rust")
    (yr, mr), (yn, mn) = out["rust"], out["numpy"]
    level = 1 / 255
    differs = yr != yn
    assert differs.mean() <= 0.001 and np.all(np.abs(yr - yn)[differs] <= level * 1.001)
    assert (mr != mn).mean() <= 0.001


def test_ste_backward_against_finite_differences():
    rng = np.random.default_rng(4)
    make = lambda: OpticalLinear(6, 5, "custom", precision=16, noise_level=0.0, temp_drift=0.0, bias=True, seed=2)  # noqa: E731
    layer, probe = make(), make().eval()
    layer.weight[:] = rng.uniform(-0.3, 0.3, layer.weight.shape)
    x = rng.uniform(0.05, 0.95, (3, 6)).astype(np.float32)
    x[0, 0] = 1.3  # above the DAC range: only a gradient that lowers it passes
    g = rng.standard_normal((3, 5)).astype(np.float32)
    y = layer.train()(x, noisy=False)
    # compare only outputs well inside the ADC range, where the quantizer is (nearly) the identity
    inside = (y - layer.bias > 0.02) & (y - layer.bias < 0.98)
    g = np.where(inside, g, 0).astype(np.float32)
    grad_x = layer.backward(g)

    def loss(xx, ww):
        probe.weight[:] = ww
        return float(np.sum(probe(xx) * g))

    eps = 1e-2  # the map is linear inside the ranges; a wide step keeps the 16-bit output levels small
    num_gx = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num_gx[idx] = (loss(xp, layer.weight) - loss(xm, layer.weight)) / (2 * eps)
    through = g * layer.profile.attenuation
    want_00 = float((through @ layer.weight)[0, 0])
    assert grad_x[0, 0] == pytest.approx(want_00 if want_00 > 0 else 0.0, abs=1e-6)
    num_gx[0, 0] = grad_x[0, 0]  # the clip's own derivative there is 0; the STE's rule is checked above
    np.testing.assert_allclose(grad_x, num_gx, atol=2e-3)
    num_gw = np.zeros_like(layer.weight)
    for idx in np.ndindex(layer.weight.shape):
        wp, wm = layer.weight.copy(), layer.weight.copy()
        wp[idx] += eps
        wm[idx] -= eps
        num_gw[idx] = (loss(x, wp) - loss(x, wm)) / (2 * eps)
    np.testing.assert_allclose(layer.grad_weight, num_gw, atol=2e-3)
    np.testing.assert_allclose(layer.grad_bias, g.sum(axis=0), atol=1e-6)


@pytest.mark.parametrize("backend", ["rust", "numpy"], indirect=True)
def test_clipped_values_pass_only_the_gradient_back_into_range(backend):
    """Mask 0/1/2 = below/inside/above [0, 1]; outside the range a clip passes a gradient only
    when a descent step (value -= lr * grad) moves the value back in."""
    rng = np.random.default_rng(8)
    x = rng.uniform(-0.5, 1.5, (40, 16)).astype(np.float32)
    w = rng.uniform(-0.4, 0.6, (12, 16)).astype(np.float32)
    kw = dict(precision=8, attenuation=0.9)
    _, mask = ops.optical_linear(x, w, None, noise_level=0.0, temp_drift=0.0, training=False, seed=0,
                                 return_mask=True, **kw)
    analog = ops.quantize(x, 8) @ w.T * np.float32(0.9)
    assert set(np.unique(mask)) == {0, 1, 2}
    np.testing.assert_array_equal(mask, np.where(analog > 1, 2, np.where(analog >= 0, 1, 0)))
    g = rng.standard_normal(mask.shape).astype(np.float32)
    gx, gw = ops.optical_linear_backward(g, x, w, mask, **kw)

    def inward(side_is_below, side_is_above, grad):
        return np.where(~(side_is_below | side_is_above) | (side_is_below & (grad < 0)) | (side_is_above & (grad > 0)),
                        grad, 0)

    gs = inward(mask == 0, mask == 2, g) * np.float32(0.9)
    np.testing.assert_allclose(gw, gs.T @ ops.quantize(x, 8), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, inward(x < 0, x > 1, gs @ w), rtol=1e-4, atol=1e-4)
    assert (gs == 0).any() and (gs[mask != 1] != 0).any()  # both kinds occur outside the range


def test_plain_training_does_not_stall_on_clipped_outputs():
    """Blocking every gradient outside the ADC range left classes stuck below 0: this run reached
    0.75 clean accuracy that way, and 0.92 with the inward rule."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = (d.data / 16.0).astype(np.float32), d.target
    trainer = NoiseAwareTrainer([64, 128, 10], noise_aware=False, seed=0)
    trainer.fit(X[:1300], y[:1300], epochs=10, batch_size=32)
    assert trainer.evaluate(X[1300:], y[1300:], noisy=False)["clean_accuracy"] > 0.9


@pytest.mark.parametrize("backend", ["rust", "numpy"], indirect=True)
def test_errors(backend):
    layer = OpticalLinear(4, 2, seed=0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(np.array([[0.1, np.nan, 0.2, 0.3]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(np.array([[0.1, np.inf, 0.2, 0.3]]))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        layer(np.zeros((2, 5)))
    with pytest.raises(RuntimeError, match="training mode"):
        OpticalLinear(4, 2, seed=0).eval().backward(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="precision"):
        ops.optical_linear(np.zeros((1, 4)), np.zeros((2, 4)), precision=0, noise_level=0.1, temp_drift=0.0,
                           attenuation=1.0, training=False, seed=0)
    with pytest.raises(ValueError, match="schedule"):
        NoiseAwareTrainer([4, 2], noise_schedule="exponential")


def test_gradient_noise_schedules():
    assert gradient_noise_level("constant", 0.2, 0.1) == 0.2
    assert gradient_noise_level("linear", 0.2, 0.5) == pytest.approx(0.1)
    assert gradient_noise_level("cosine", 0.2, 1.0) == pytest.approx(0.2)
    assert gradient_noise_level("cosine", 0.2, 0.0) == pytest.approx(0.0)


def test_short_nat_run_learns_and_holds_up_under_noise():
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = (d.data / 16.0).astype(np.float32), d.target
    trainer = NoiseAwareTrainer([64, 128, 10], noise_aware=True, noise_schedule="linear", seed=0)
    losses = trainer.fit(X[:1200], y[:1200], epochs=8, batch_size=32)
    assert losses[-1] < losses[0]
    r = trainer.evaluate(X[1200:], y[1200:], noisy=True, trials=3)
    assert r["clean_accuracy"] > 0.5 and r["noisy_accuracy"] > 0.5  # chance is 0.1
    assert r["robustness"] == pytest.approx(r["noisy_accuracy"] / r["clean_accuracy"])
