"""Rust kernels against their NumPy twins, same run, 2 threads. Prints one table."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import best_of, table  # noqa: E402

import numpy as np  # noqa: E402

from ellm import _lowlevel as R  # noqa: E402
from ellm.numpy_backend import kernels as N  # noqa: E402

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


x128, x512, x1 = f32(128, 576), f32(512, 576), f32(1, 576)
w_mlp, w_vocab = f32(1536, 576), f32(49152, 576)
norm_w = f32(576)
q, k, v = f32(1, 9, 64), f32(1024, 3, 64), f32(1024, 3, 64)
xr = f32(512, 9, 64)
pos = list(range(512))
gen = np.random.default_rng(1)

cases = [
    ("linear [128,576]x[1536,576]", lambda m: m.linear(x128, w_mlp, None), 2 * 128 * 576 * 1536, 0.9),
    ("linear [512,576]x[1536,576]", lambda m: m.linear(x512, w_mlp, None), 2 * 512 * 576 * 1536, 0.9),
    ("linear [1,576]x[1536,576]", lambda m: m.linear(x1, w_mlp, None), 2 * 576 * 1536, 1.2),
    ("linear [1,576]x[49152,576]", lambda m: m.linear(x1, w_vocab, None), 2 * 576 * 49152, 1.2),
    ("attention 1q x 1024k (9/3 heads)", lambda m: m.attention(q, k, v, True, 1023, 0.125), None, 2.0),
    ("rms_norm [512,576]", lambda m: m.rms_norm(x512, norm_w, 1e-5), None, 2.0),
    ("softmax [512,576]", lambda m: m.softmax(x512), None, 2.0),
    ("swiglu [512,576]", lambda m: m.swiglu(x512, x512), None, 2.0),
    ("rope [512,9,64]", lambda m: m.rope(xr, pos, 10000.0, "none", [1.0, 1.0, 1.0, 1.0]), None, 2.0),
]

rows = []
for name, fn, flops, target in cases:
    t_rust, t_numpy = best_of(lambda: fn(R)), best_of(lambda: fn(N))
    gflops = f"{flops / t_rust / 1e9:.1f}" if flops else ""
    ratio = t_numpy / t_rust
    rows.append((name, f"{t_rust * 1e6:.1f}", f"{t_numpy * 1e6:.1f}", f"{ratio:.2f}x", gflops, f">= {target}x",
                 "ok" if ratio >= target else "MISS"))

n = 1 << 20
t_rust = best_of(lambda: R.normal(n, 1, 0))
t_np = best_of(lambda: gen.standard_normal(n, dtype=np.float32))
rows.append(("normal 1M (vs default_rng float32)", f"{t_rust * 1e6:.1f}", f"{t_np * 1e6:.1f}", f"{t_np / t_rust:.2f}x",
             "", ">= 4.0x", "ok" if t_np / t_rust >= 4 else "MISS"))

table(f"ellm.ops: Rust vs NumPy (RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']})",
      ["kernel", "rust us", "numpy us", "speedup", "rust GFLOPS", "target", ""], rows)
