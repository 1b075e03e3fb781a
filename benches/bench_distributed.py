"""The bundled model as a two-stage pipeline on Ray against one process, on this machine.

A local Ray cluster of two nodes (1 CPU each, custom resources "a" and "b"); each stage's actor,
and the single process it is compared with, runs 1 thread. On one 2-core machine a pipeline
cannot be faster at batch 1 (the stages run one after the other); what this measures is its cost:
the time per decode step against one process, the overhead per token and per hop (driver -> stage
0 -> stage 1 -> driver), with batch 4 showing what micro-batching the slots over the stages buys
back. Also the bytes a token's hidden state carries per hop.
"""

import os
import pickle
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"  # the single process runs as one stage does
sys.path.insert(0, os.path.dirname(__file__))
from _common import table  # noqa: E402

import numpy as np  # noqa: E402

import ellm  # noqa: E402
from ellm._bundled import bundled_model_path  # noqa: E402

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:
    print("bench_distributed: skipped, Ray is not installed (pip install 'ellm[ray]')")
    sys.exit(0)

from ellm.distributed import PipelineModel  # noqa: E402

PROMPT = 32
STEPS = 32
REPEAT = 3
MAX_SEQ_LEN = 256


def decode_seconds(model, batch: int) -> float:
    """Best seconds per decode step of `batch` sequences after a PROMPT-token prefill each."""
    best = float("inf")
    for _ in range(REPEAT):
        model.reset_cache()
        rng = np.random.default_rng(0)
        ids = rng.integers(100, 20000, size=batch * PROMPT)
        slots = np.repeat(np.arange(batch), PROMPT)
        positions = np.tile(np.arange(PROMPT), batch)
        last = np.arange(1, batch + 1) * PROMPT - 1
        logits = model.step(ids, slots, positions, np.isin(np.arange(len(ids)), last))
        started = time.perf_counter()
        for s in range(STEPS):
            logits = model.step(logits.argmax(-1), np.arange(batch), np.full(batch, PROMPT + s))
        best = min(best, (time.perf_counter() - started) / STEPS)
    return best


def main() -> None:
    path = bundled_model_path()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"a": 1}})
    cluster.add_node(num_cpus=1, resources={"b": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        single = ellm.Transformer.from_pretrained(path, max_seq_len=MAX_SEQ_LEN, max_batch_size=4)
        layers = single.model_args.num_hidden_layers
        half = layers // 2
        plan = {"nodes": [{"node_id": "a", "blocks": ["embed"] + [f"layers.{i}" for i in range(half)]},
                          {"node_id": "b", "blocks": [f"layers.{i}" for i in range(half, layers)] + ["head"]}]}
        started = time.perf_counter()
        pipe = PipelineModel.from_pretrained(path, plan, max_seq_len=MAX_SEQ_LEN, max_batch_size=4,
                                             threads_per_stage=1)
        load = time.perf_counter() - started
        actor = pipe._pipeline.actors[0]
        ray.get(actor.ping.remote())
        trips = []
        for _ in range(200):
            t = time.perf_counter()
            ray.get(actor.ping.remote())
            trips.append(time.perf_counter() - t)
        round_trip = float(np.median(trips))

        rows = []
        hops = pipe.num_stages + 1
        for batch in (1, 4):
            one = decode_seconds(single, batch)
            two = decode_seconds(pipe, batch)
            overhead = two - one
            rows.append([batch, f"{batch / one:.1f}", f"{batch / two:.1f}", f"{one / two:.2f}x",
                         f"{overhead * 1e3 / batch:.2f}", f"{overhead * 1e3 / hops:.2f}"])
        table(f"decode, {STEPS} steps after a {PROMPT}-token prompt per sequence, 1 thread per process "
              f"(pipeline loaded in {load:.1f} s; an empty actor call's round trip: {round_trip * 1e3:.2f} ms)",
              ["batch", "one process tok/s", "2-stage pipeline tok/s", "pipeline/one", "overhead ms/token",
               "overhead ms/hop/step"], rows)

        hidden = np.zeros((1, single.model_args.hidden_size), np.float32)
        payload = hidden.nbytes
        serialized = len(pickle.dumps(hidden, protocol=5))
        table("bytes sent per token per hop", ["hop", "payload", "pickled"],
              [["driver -> stage 0 (token id, slot, position, flag)", 8 * 3 + 1,
                len(pickle.dumps((np.zeros(1, np.int64),) * 3 + (np.zeros(1, bool),), protocol=5))],
               ["stage -> stage (hidden state)", payload, serialized],
               ["last stage -> driver (logits)", 4 * single.model_args.vocab_size,
                len(pickle.dumps(np.zeros((1, single.model_args.vocab_size), np.float32), protocol=5))]])
        for s in pipe.stages():
            print(f"stage layers {s['first_layer']}..{s['stop_layer'] - 1} on node {s['node_id']}: weights "
                  f"{s['weight_bytes'] / 1e6:.1f} MB, resident after loading {s['loaded_rss_bytes'] / 1e6:.1f} MB")
        pipe.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
