"""Split a model over nodes: contiguous ranges of blocks (the embedding on the first node, the
head on the last) that minimise the slowest node's estimated time within each node's memory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .records import ModelMetadata
from .roofline import MachineModel, estimate

# Used when the caller gives no machine: a modest CPU; only ratios between nodes matter.
DEFAULT_MACHINE = MachineModel(peak_gflops=100.0, bandwidth_gbs=20.0)


@dataclass
class NodeAssignment:
    node_id: str
    blocks: list[str]
    weight_bytes: int
    kv_cache_bytes: int
    memory_bytes: int | None
    estimated_seconds: float


@dataclass
class PartitionPlan:
    mode: str
    nodes: list[NodeAssignment] = field(default_factory=list)
    bottleneck_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _node(spec: Any) -> dict:
    if not isinstance(spec, dict) or "node_id" not in spec:
        raise ValueError(f"a node is a dict with 'node_id' (and optional relative_speed, memory_bytes), got {spec!r}")
    speed = float(spec.get("relative_speed", 1.0))
    if speed <= 0:
        raise ValueError(f"node {spec['node_id']!r}: relative_speed must be positive, got {speed}")
    memory = spec.get("memory_bytes")
    return {"node_id": str(spec["node_id"]), "speed": speed, "memory": None if memory is None else int(memory)}


def plan_partition(metadata: ModelMetadata, nodes: list[dict], mode: str = "decode",
                   machine: MachineModel | None = None) -> PartitionPlan:
    if mode not in ("decode", "prefill"):
        raise ValueError(f"mode must be 'decode' or 'prefill', got {mode!r}")
    specs = [_node(n) for n in nodes]
    if not specs:
        raise ValueError("plan_partition needs at least one node")
    machine = machine or DEFAULT_MACHINE
    times = [b[f"{mode}_seconds"] for b in estimate(metadata, machine.peak_gflops, machine.bandwidth_gbs)["blocks"]]
    blocks = metadata.blocks
    memory = [b.weight_bytes + b.kv_cache_bytes for b in blocks]
    n, k = len(blocks), len(specs)
    prefix_t, prefix_m = [0.0], [0]
    for t, m in zip(times, memory):
        prefix_t.append(prefix_t[-1] + t)
        prefix_m.append(prefix_m[-1] + m)

    # A decoder's nodes each get at least one layer: a node with only the embedding or the head
    # would be a pipeline stage with nothing to pipeline.
    prefix_layers = [0]
    for b in blocks:
        prefix_layers.append(prefix_layers[-1] + b.name.startswith("layers."))
    needs_layer = prefix_layers[-1] > 0

    def shared(i: int, j: int) -> int:
        """A tied head's embedding, held a second time by a range with the head and not the embedding."""
        return sum(b.shared_weight_bytes for b in blocks[i:j]) if i > 0 else 0

    def cost(node: int, i: int, j: int) -> float:  # blocks i..j-1 on node `node`
        if needs_layer and prefix_layers[j] == prefix_layers[i]:
            return float("inf")
        limit = specs[node]["memory"]
        if limit is not None and prefix_m[j] - prefix_m[i] + shared(i, j) > limit:
            return float("inf")
        return (prefix_t[j] - prefix_t[i]) / specs[node]["speed"]

    inf = float("inf")
    # best[a][j]: the smallest bottleneck placing the first j blocks on the first a nodes.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for a in range(1, k + 1):
        for j in range(n + 1):
            for i in range(j + 1):
                value = max(best[a - 1][i], cost(a - 1, i, j))
                if value < best[a][j]:
                    best[a][j], cut[a][j] = value, i
    if best[k][n] == inf and needs_layer and k > prefix_layers[n]:
        raise ValueError(f"{k} nodes for {prefix_layers[n]} decoder layers: every node runs at least one layer")
    if best[k][n] == inf:
        need = prefix_m[n]
        offered = sum(s["memory"] for s in specs if s["memory"] is not None)
        unlimited = any(s["memory"] is None for s in specs)
        raise ValueError(f"the model cannot be placed: it needs {need:,} bytes of weights and KV cache in contiguous "
                         f"ranges, the nodes offer {'unlimited' if unlimited else f'{offered:,} bytes'} "
                         "and no split fits every node's memory_bytes")
    ranges, j = [], n
    for a in range(k, 0, -1):
        i = cut[a][j]
        ranges.append((i, j))
        j = i
    ranges.reverse()
    plan = PartitionPlan(mode=mode, bottleneck_seconds=best[k][n])
    for spec, (i, j) in zip(specs, ranges):
        plan.nodes.append(NodeAssignment(
            node_id=spec["node_id"], blocks=[b.name for b in blocks[i:j]],
            weight_bytes=sum(b.weight_bytes for b in blocks[i:j]) + shared(i, j),
            kv_cache_bytes=sum(b.kv_cache_bytes for b in blocks[i:j]),
            memory_bytes=spec["memory"], estimated_seconds=(prefix_t[j] - prefix_t[i]) / spec["speed"]))
    return plan
