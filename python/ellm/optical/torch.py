"""OpticalLinear for PyTorch: an `nn.Module` on ellm's fused optical kernels, trained with autograd.

    from ellm.optical.torch import OpticalLinear
    model = nn.Sequential(OpticalLinear(64, 128, "lumina_nano_v1", bias=True), nn.ReLU(),
                          OpticalLinear(128, 10, "lumina_nano_v1", bias=True))

It takes the arguments and profiles of `ellm.optical.OpticalLinear`. The forward is
`ellm.ops.optical_linear` (DAC, optical product, drift and noise in training mode, attenuation,
ADC, bias) and the backward `ellm.ops.optical_linear_backward` (the straight-through estimator),
joined by a `torch.autograd.Function`; `train()` / `eval()` switch the noise on and off.

Tensors: the kernels run on the CPU in float32. Contiguous float32 CPU tensors are handed to
them without a copy; other floating dtypes are converted to float32 (the output is float32, and
gradients flow back through the conversion); tensors on another device, or of an integer dtype,
raise an error. Under `torch.compile` the kernel call is a graph break (it is not traceable).

Seeds: `seed=n` gives the weights and the noise of `ellm.optical.OpticalLinear(..., seed=n)`;
without one, the weights come from torch's generator as `nn.Linear`'s do (so
`torch.manual_seed` reproduces them) and so does the noise seed. The seed and the count of noisy
calls travel in `state_dict`, so a restored layer continues the same noise stream.
"""

from __future__ import annotations

import math

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without torch
    raise ImportError("ellm.optical.torch needs PyTorch; install it with pip install 'ellm[torch]'") from exc

from .. import ops
from .layer import call_seed, check_features, check_seed, initial_parameters
from .profiles import DEFAULT_PROFILE, HardwareProfile, resolve_profile

__all__ = ["OpticalLinear", "OpticalLinearFunction"]


def _kernel_array(t: torch.Tensor):
    """A float32 CPU tensor as the NumPy array sharing its memory (detached only where it needs
    it: `detach` makes a new tensor, a microsecond on every call)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _as_float32_cpu(t: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dtype is torch.float32 and t.is_cpu:
        return t  # the usual case, first: checks cost microseconds on every call
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"OpticalLinear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"OpticalLinear: {name} is on {t.device}; ellm's optical kernels run on the CPU "
                         "(move the module and its inputs there with .cpu())")
    if t.dtype != torch.float32:
        if not t.is_floating_point():
            raise TypeError(f"OpticalLinear: {name} must be a floating-point tensor, got {t.dtype}")
        t = t.to(torch.float32)
    return t


def _kernel(x, weight, bias, profile: HardwareProfile, noisy: bool, seed: int, want_mask: bool):
    # the module has checked everything ops.optical_linear would (shapes, dtype, profile, seed)
    return ops.optical_linear_checked(x, weight, bias, profile.precision, float(profile.noise_level),
                                      float(profile.temp_drift), float(profile.attenuation), ops.THERMAL_STD, noisy, seed,
                                      want_mask)


class OpticalLinearFunction(torch.autograd.Function):
    """y = optical_linear(x, weight, bias) with the straight-through backward. `arrays` are the
    NumPy views of (x, weight, bias) that the kernels read."""

    @staticmethod
    def forward(ctx, x, weight, bias, arrays, profile: HardwareProfile, noisy: bool, seed: int):
        y, mask = _kernel(*arrays, profile, noisy, seed, want_mask=True)
        ctx.profile, ctx.has_bias = profile, bias is not None
        ctx.arrays, ctx.mask = arrays, mask
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, _ = ctx.arrays
        grad_y = grad_y.contiguous()
        if grad_y.dtype != torch.float32:
            grad_y = grad_y.to(torch.float32)
        grad_x, grad_w = ops.optical_linear_backward(_kernel_array(grad_y), x, weight, ctx.mask,
                                                     precision=ctx.profile.precision,
                                                     attenuation=ctx.profile.attenuation)
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return torch.from_numpy(grad_x), torch.from_numpy(grad_w), grad_b, None, None, None, None


def _optical_linear(x, weight, bias, arrays, profile, noisy, seed):
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return OpticalLinearFunction.apply(x, weight, bias, arrays, profile, noisy, seed)
    return torch.from_numpy(_kernel(*arrays, profile, noisy, seed, want_mask=False))


# Under torch.compile the kernels are a graph break: dynamo cannot trace into them.
_optical_linear_compiled = torch.compiler.disable(_optical_linear)


class OpticalLinear(nn.Module):
    """A linear layer as a photonic chip computes it. x `[..., in_features]` -> `[..., out_features]`."""

    def __init__(self, in_features: int, out_features: int, hardware_profile: str | HardwareProfile = DEFAULT_PROFILE,
                 precision: int | None = None, noise_level: float | None = None, temp_drift: float | None = None,
                 bias: bool = False, seed: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        check_features(in_features, out_features)
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"OpticalLinear runs on the CPU, got device={device!r}")
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"OpticalLinear keeps float32 parameters (the kernels' type), got dtype={dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.profile = resolve_profile(hardware_profile, precision=precision, noise_level=noise_level,
                                       temp_drift=temp_drift)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32)) if bias else None
        if seed is None:
            self.reset_parameters()
            seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
        else:
            weight, b = initial_parameters(in_features, out_features, bias, check_seed(seed))
            with torch.no_grad():
                self.weight.copy_(torch.from_numpy(weight))
                if self.bias is not None:
                    self.bias.copy_(torch.from_numpy(b))
        # kept in a plain dict: nn.Module.__setattr__ costs microseconds on every noisy call
        self._noise = {"seed": seed, "calls": 0}
        self._views: dict = {}

    def reset_parameters(self) -> None:
        """torch.nn.Linear's initialization, from torch's generator."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_float32_cpu(x, "input")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"OpticalLinear expects input [..., {self.in_features}], got shape {tuple(x.shape)}")
        if not x.is_contiguous():
            x = x.contiguous()
        weight, weight_array = self._kernel_parameter("weight")
        bias, bias_array = self._kernel_parameter("bias")
        arrays = (_kernel_array(x), weight_array, bias_array)
        seed = 0
        if self.training:
            noise = self._noise
            seed = call_seed(noise["seed"], noise["calls"])
            noise["calls"] += 1
        run = _optical_linear_compiled if torch.compiler.is_compiling() else _optical_linear
        return run(x, weight, bias, arrays, self.profile, self.training, seed)

    def _kernel_parameter(self, name: str):
        """A parameter as a float32 CPU tensor, and the NumPy view of it the kernels read. A
        float32 parameter's view is kept while the parameter keeps its memory and shape (an
        optimizer step updates it in place, so the view follows). Read from `_parameters`:
        attribute access through nn.Module costs a microsecond a call."""
        t = self._parameters.get(name)
        if t is None:
            return None, None
        cached = self._views.get(name)
        if cached is not None and cached[0] is t and cached[1] == (t.data_ptr(), t.shape):
            return t, cached[2]
        t32 = _as_float32_cpu(t, name)
        view = _kernel_array(t32)
        if t32 is t:
            self._views[name] = (t, (t.data_ptr(), t.shape), view)
        return t32, view

    @property
    def seed(self) -> int:
        return self._noise["seed"]

    @property
    def noisy_calls(self) -> int:
        """Noisy (training-mode) forwards so far: the position in the layer's noise stream."""
        return self._noise["calls"]

    def get_extra_state(self) -> dict:
        return {"seed": self.seed, "noisy_calls": self.noisy_calls}

    def set_extra_state(self, state: dict) -> None:
        self._noise = {"seed": check_seed(state["seed"]), "calls": int(state["noisy_calls"])}

    def extra_repr(self) -> str:
        p = self.profile
        return (f"in_features={self.in_features}, out_features={self.out_features}, profile={p.name!r}, "
                f"precision={p.precision}, bias={self.bias is not None}")
