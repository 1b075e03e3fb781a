"""From a partition plan (`ellm.metadata.plan_partition`) to pipeline stages and where Ray runs them.

A plan node's `node_id` names a Ray node in one of two ways: a custom resource of that name (start
the node with `ray start --resources='{"gpu-box-1": 1}'`), or the node's IP address (Ray's own
`node:<ip>` resource).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .._files import read_json_object
from ..config import ModelArgs
from ..metadata import PartitionPlan, generate_metadata, plan_partition
from ..stage import Stage

# A share of the node's resource small enough that stages and replicas can share a node.
RESOURCE_SHARE = 0.001


@dataclass(frozen=True)
class Placement:
    node_id: str
    stage: Stage


def _plan_nodes(plan: Any, model_path: str) -> list[dict]:
    """The plan's nodes as dicts with node_id and blocks, whatever form the plan came in."""
    if isinstance(plan, (str, os.PathLike)):
        plan = read_json_object(plan, "partition plan")
    if isinstance(plan, PartitionPlan):
        plan = plan.to_dict()
    if isinstance(plan, dict) and "partition" in plan and "nodes" not in plan:  # `ellm metadata --nodes` output
        plan = plan["partition"]
    if isinstance(plan, dict):
        nodes = plan.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise ValueError("a partition plan needs a non-empty 'nodes' list")
        return nodes
    if isinstance(plan, (list, tuple)) and plan:
        specs = [{"node_id": n} if isinstance(n, str) else n for n in plan]
        if all(isinstance(s, dict) and "blocks" in s for s in specs):
            return specs
        return plan_partition(generate_metadata(model_path), specs).to_dict()["nodes"]
    raise TypeError("plan must be a PartitionPlan, its dict or JSON file, or a list of node ids or node dicts "
                    f"(node_id, relative_speed, memory_bytes), got {type(plan).__name__}")


def placements(plan: Any, args: ModelArgs, model_path: str) -> list[Placement]:
    """One pipeline stage per plan node, in order: each node's decoder layers, the embedding on the
    first, the final norm and head on the last."""
    nodes = _plan_nodes(plan, model_path)
    ranges = []
    for node in nodes:
        if not isinstance(node, dict) or "node_id" not in node or not isinstance(node.get("blocks"), list):
            raise ValueError(f"a plan node needs 'node_id' and a 'blocks' list, got {node!r}")
        layers = [int(m.group(1)) for b in node["blocks"] if (m := re.fullmatch(r"layers\.(\d+)", str(b)))]
        if not layers:
            raise ValueError(f"plan node {node['node_id']!r} has no decoder layers (blocks {node['blocks']}); "
                             "every pipeline stage runs at least one layer: plan over fewer nodes")
        if layers != list(range(layers[0], layers[-1] + 1)):
            raise ValueError(f"plan node {node['node_id']!r}: its layers are not one contiguous range")
        ranges.append((str(node["node_id"]), layers[0], layers[-1] + 1))
    expected_first = 0
    for node_id, first, stop in ranges:
        if first != expected_first:
            raise ValueError(f"plan node {node_id!r} starts at layer {first}, expected {expected_first}: the nodes' "
                             "layers must follow one another")
        expected_first = stop
    if expected_first != args.num_hidden_layers:
        raise ValueError(f"the plan covers {expected_first} layers, the model has {args.num_hidden_layers}")
    last = len(ranges) - 1
    return [Placement(node_id, Stage(first, stop, i == 0, i == last))
            for i, (node_id, first, stop) in enumerate(ranges)]


def node_resources(node_id: str, cluster: dict[str, float]) -> dict[str, float]:
    """The Ray resources that pin an actor to the node the plan calls `node_id`."""
    for name in (node_id, f"node:{node_id}"):
        if name in cluster:
            return {name: RESOURCE_SHARE}
    custom = sorted(k for k in cluster if not k.startswith("node:") and k not in ("CPU", "GPU", "memory",
                                                                                   "object_store_memory"))
    raise ValueError(f"no Ray node is {node_id!r}: start one with ray start --resources='{{\"{node_id}\": 1}}' "
                     f"(custom resources now: {custom or 'none'}), or use a node's IP address as its node_id")
