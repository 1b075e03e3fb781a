"""A roofline model of where time goes: each block takes the longer of its compute at peak
FLOP/s and its memory traffic at the machine's bandwidth."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .records import ModelMetadata


@dataclass
class MachineModel:
    peak_gflops: float
    bandwidth_gbs: float


@dataclass
class BlockEstimate:
    name: str
    prefill_seconds: float
    decode_seconds: float
    prefill_bound: str   # "compute" or "memory"
    decode_bound: str


def _roofline(flops: float, nbytes: float, machine: MachineModel) -> tuple[float, str]:
    compute = flops / (machine.peak_gflops * 1e9)
    memory = nbytes / (machine.bandwidth_gbs * 1e9)
    return (compute, "compute") if compute >= memory else (memory, "memory")


def _embedding_rows_bytes(metadata: ModelMetadata, tokens: int) -> int:
    total = 0
    for layer in metadata.layers:
        if layer.block == "embed" and len(layer.shape) == 2:
            rows = layer.shape[0]
            total += min(rows, tokens) * layer.weight_bytes // max(rows, 1)
    return total


def estimate(metadata: ModelMetadata, peak_gflops: float, bandwidth_gbs: float) -> dict:
    """Per-block roofline times for prefill and decode, with totals."""
    if peak_gflops <= 0 or bandwidth_gbs <= 0:
        raise ValueError(f"peak_gflops and bandwidth_gbs must be positive, got {peak_gflops}, {bandwidth_gbs}")
    machine = MachineModel(peak_gflops, bandwidth_gbs)
    tokens = {"prefill": metadata.batch_size * metadata.sequence_length, "decode": metadata.batch_size}
    rows = []
    for b in metadata.blocks:
        moved = {}
        for mode, n in tokens.items():
            if b.name == "embed":
                moved[mode] = _embedding_rows_bytes(metadata, n)  # a lookup reads one row per token
            else:
                moved[mode] = b.weight_bytes + b.kv_cache_bytes
                if b.name == "head" and b.flops_decode and not any(x.block == "head" and len(x.shape) == 2
                                                                   for x in metadata.layers):
                    moved[mode] += metadata.block("embed").weight_bytes  # a tied head reads the embedding
        p, pb = _roofline(b.flops_prefill, moved["prefill"], machine)
        d, db = _roofline(b.flops_decode, moved["decode"], machine)
        rows.append(BlockEstimate(b.name, p, d, pb, db))
    return {
        "machine": asdict(machine),
        "blocks": [asdict(r) for r in rows],
        "prefill_seconds": sum(r.prefill_seconds for r in rows),
        "decode_seconds": sum(r.decode_seconds for r in rows),
    }


def measure_machine(seconds: float = 0.5) -> MachineModel:
    """Measure this machine: GFLOP/s of `ellm.ops.matmul` on 1024-square matrices and the read
    bandwidth of a pass over a 256 MiB array."""
    from .. import ops

    a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    ops.matmul(a, a)
    best = float("inf")
    deadline = time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline or best == float("inf"):
        t = time.perf_counter()
        ops.matmul(a, a)
        best = min(best, time.perf_counter() - t)
    gflops = 2 * 1024**3 / best / 1e9
    big = np.ones(1 << 26, dtype=np.float32)
    matrix, vector = big.reshape(-1, 1024), np.ones(1024, dtype=np.float32)
    best = float("inf")
    deadline = time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline or best == float("inf"):
        t = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - t)
    return MachineModel(peak_gflops=gflops, bandwidth_gbs=big.nbytes / best / 1e9)
