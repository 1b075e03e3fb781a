"""ellm.optical.torch: the nn.Module on the fused kernels (torch comes with `ellm[torch]`, which
`make test` installs)."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="ellm[torch] is not installed (pip install 'ellm[torch]')")

import ellm  # noqa: E402
from ellm.optical import OpticalLinear as NumpyOpticalLinear  # noqa: E402
from ellm.optical.torch import OpticalLinear  # noqa: E402


def tensor(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def test_seeded_layer_equals_the_numpy_layer_train_and_eval():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.2, 1.2, (16, 20)).astype(np.float32)
    ours, ref = OpticalLinear(20, 12, "lumina_nano_v1", bias=True, seed=7), NumpyOpticalLinear(20, 12, bias=True, seed=7)
    np.testing.assert_array_equal(ours.weight.detach().numpy(), ref.weight)
    np.testing.assert_array_equal(ours.bias.detach().numpy(), ref.bias)
    for _ in range(3):  # the same noise stream, call after call
        np.testing.assert_array_equal(ours(tensor(x)).detach().numpy(), ref(x))
    ours.eval()
    ref.eval()
    np.testing.assert_array_equal(ours(tensor(x)).detach().numpy(), ref(x))
    # the straight-through gradients too
    ours.train()
    ref.train()
    xt = tensor(x).requires_grad_()
    g = rng.standard_normal((16, 12)).astype(np.float32)
    ours(xt).backward(tensor(g))
    ref(x)
    np.testing.assert_allclose(xt.grad.numpy(), ref.backward(g), atol=1e-6)
    np.testing.assert_allclose(ours.weight.grad.numpy(), ref.grad_weight, atol=1e-5)
    np.testing.assert_allclose(ours.bias.grad.numpy(), ref.grad_bias, atol=1e-5)


def test_train_and_eval_switch_the_noise():
    layer = OpticalLinear(30, 10, "edge_ultra_low_power", seed=1)
    x = torch.rand(8, 30, generator=torch.Generator().manual_seed(0))
    noisy = [layer(x) for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert layer.noisy_calls == 2


def test_unseeded_layers_follow_torch_manual_seed():
    torch.manual_seed(5)
    a = OpticalLinear(10, 4, bias=True)
    torch.manual_seed(5)
    b = OpticalLinear(10, 4, bias=True)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.seed == b.seed
    bound = 1 / np.sqrt(10)  # nn.Linear's init
    assert a.weight.abs().max() <= bound and a.weight.abs().max() > 0.5 * bound


def test_finite_differences_with_noise_off_at_16_bits():
    """gradcheck-style: inside the converters' ranges the 16-bit layer is nearly linear, and the
    STE's gradients equal central differences of the forward."""
    rng = np.random.default_rng(4)
    # eval mode: no noise at all (training adds the thermal floor); gradients still flow
    layer = OpticalLinear(6, 5, "custom", precision=16, noise_level=0.0, temp_drift=0.0, bias=True, seed=2).eval()
    with torch.no_grad():
        layer.weight.copy_(tensor(rng.uniform(0.02, 0.3, (5, 6))))
    x = tensor(rng.uniform(0.1, 0.9, (3, 6))).requires_grad_()
    g = tensor(rng.standard_normal((3, 5)))
    (layer(x) * g).sum().backward()

    def loss(xx, ww):
        with torch.no_grad():
            saved = layer.weight.clone()
            layer.weight.copy_(ww)
            out = float((layer(xx) * g).sum())
            layer.weight.copy_(saved)
        return out

    eps = 1e-2
    num_x, num_w = torch.zeros_like(x), torch.zeros_like(layer.weight)
    for target, num, other in ((x.detach(), num_x, "x"), (layer.weight.detach(), num_w, "w")):
        for idx in np.ndindex(tuple(target.shape)):
            plus, minus = target.clone(), target.clone()
            plus[idx] += eps
            minus[idx] -= eps
            if other == "x":
                num[idx] = (loss(plus, layer.weight) - loss(minus, layer.weight)) / (2 * eps)
            else:
                num[idx] = (loss(x.detach(), plus) - loss(x.detach(), minus)) / (2 * eps)
    torch.testing.assert_close(x.grad, num_x, atol=2e-3, rtol=0)
    torch.testing.assert_close(layer.weight.grad, num_w, atol=2e-3, rtol=0)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_two_layer_model_learns_digits_with_torch_optim():
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = torch.from_numpy((d.data / 16.0).astype(np.float32)), torch.from_numpy(d.target).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(OpticalLinear(64, 128, "lumina_nano_v1", bias=True), torch.nn.ReLU(),
                                OpticalLinear(128, 10, "lumina_nano_v1", bias=True))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(1300, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        for idx in order.split(32):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X[idx]) * 10, y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = float((model(X[1300:]).argmax(1) == y[1300:]).float().mean())
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert accuracy > 0.85  # chance is 0.1


def test_state_dict_round_trip_continues_the_noise_stream():
    a = OpticalLinear(12, 6, bias=True, seed=3)
    x = torch.rand(4, 12, generator=torch.Generator().manual_seed(1))
    a(x)
    b = OpticalLinear(12, 6, bias=True, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight) and b.seed == 3 and b.noisy_calls == 1
    assert torch.equal(a(x), b(x))


def test_no_grad_and_sequential():
    model = torch.nn.Sequential(OpticalLinear(8, 8, seed=0), torch.nn.ReLU(), OpticalLinear(8, 3, seed=1))
    x = torch.rand(5, 8, requires_grad=True)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (5, 3) and not out.requires_grad
    assert model(x).requires_grad


def test_torch_compile_falls_back_to_the_same_numbers():
    model = torch.nn.Sequential(OpticalLinear(8, 16, bias=True, seed=0), torch.nn.ReLU(),
                                OpticalLinear(16, 4, bias=True, seed=1)).eval()
    x = torch.rand(3, 8, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    model.train()
    xg = x.clone().requires_grad_()
    compiled(xg).sum().backward()
    assert xg.grad is not None and model[0].weight.grad is not None


def test_the_kernels_follow_the_parameters_however_they_change():
    # the layer keeps NumPy views of its parameters between calls: each change must reach them
    layer = OpticalLinear(6, 3, bias=True, seed=0).eval()
    x = torch.rand(2, 6, generator=torch.Generator().manual_seed(1))

    def expected():
        w = layer.weight.detach().to(torch.float32).numpy()
        b = layer.bias.detach().to(torch.float32).numpy()
        p = layer.profile
        return ellm.ops.optical_linear(x.numpy(), w, b, precision=p.precision, noise_level=p.noise_level,
                                       temp_drift=p.temp_drift, attenuation=p.attenuation, training=False, seed=0)

    before = layer(x).detach().numpy()
    np.testing.assert_array_equal(before, expected())
    with torch.no_grad():
        layer.weight.mul_(-1.5)  # in place, as an optimizer step: same memory
    np.testing.assert_array_equal(layer(x).detach().numpy(), expected())
    layer.weight.data = torch.rand(3, 6)  # new memory
    np.testing.assert_array_equal(layer(x).detach().numpy(), expected())
    layer.bias = torch.nn.Parameter(torch.full((3,), 0.25))  # a new parameter
    np.testing.assert_array_equal(layer(x).detach().numpy(), expected())
    layer.double()  # float64 parameters: converted on every call
    np.testing.assert_array_equal(layer(x).detach().numpy(), expected())
    assert not np.array_equal(layer(x).detach().numpy(), before)


def test_dtypes_devices_and_shapes():
    layer = OpticalLinear(4, 2, seed=0)
    x64 = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    out = layer(x64)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x64.grad.dtype == torch.float64  # the gradient flows back through the conversion
    torch.testing.assert_close(layer.eval()(x64.detach()), layer(x64.detach().float()))
    assert layer(torch.rand(2, 3, 4)).shape == (2, 3, 2)  # leading dimensions kept
    strided = torch.rand(8, 4)[::2]
    assert not strided.is_contiguous()
    assert torch.equal(layer(strided), layer(strided.contiguous()))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="meta"):
        layer(torch.empty(3, 4, device="meta"))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        layer(torch.rand(3, 5))
    with pytest.raises(ValueError, match="CPU"):
        OpticalLinear(4, 2, device="meta")
    with pytest.raises(ValueError, match="float32"):
        OpticalLinear(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(torch.tensor([[0.1, float("nan"), 0.2, 0.3]]))
    with pytest.raises(ValueError, match="unknown hardware profile"):
        OpticalLinear(4, 2, "lumina_giga")


def test_same_numbers_on_both_backends_and_any_thread_count():
    code = ("import torch, ellm\n"
            "from ellm.optical.torch import OpticalLinear\n"
            "l = OpticalLinear(300, 200, bias=True, seed=5)\n"
            "x = torch.rand(33, 300, generator=torch.Generator().manual_seed(0))\n"
            "y = l(x); print(ellm.get_backend(), float(y.sum()), float(y.abs().max()))\n")
    outs = {}
    for env in ({"RAYON_NUM_THREADS": "1", "LUMINA_USE_RUST": "1"}, {"RAYON_NUM_THREADS": "2", "LUMINA_USE_RUST": "1"},
                {"LUMINA_USE_RUST": "0"}):
        run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                             text=True, check=True)
        outs[tuple(env.items())] = run.stdout.split()
    rust = [v for k, v in outs.items() if v[0] == "rust"]
    numpy_out = [v for k, v in outs.items() if v[0] == "numpy"]
    assert len(rust) == 2 and len(numpy_out) == 1 and rust[0] == rust[1]
    # the twins agree up to an output level in rare ties: sums within a few levels of 2**-4
    assert abs(float(rust[0][1]) - float(numpy_out[0][1])) < 0.5


def test_import_without_torch_says_how_to_install():
    code = "import sys; sys.modules['torch'] = None\nimport ellm.optical.torch\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "pip install 'ellm[torch]'" in run.stderr
    assert ellm.optical.OpticalLinear is NumpyOpticalLinear  # the NumPy layers import without torch
