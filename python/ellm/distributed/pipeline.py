"""`PipelineModel`: a model split into pipeline stages, one Ray actor per stage, with the API of
`Transformer` (forward, generate, the serving engine's ragged step and KV slots).

A step goes through the stages in order: the first embeds the token ids and runs its layers, each
next one takes the hidden states `[rows, hidden_size]` the one before returned, and the last applies
the final norm and the head. The driver keeps no weights. A step's rows are cut, at slot
boundaries, into up to one micro-batch per stage: stage 1 works on micro-batch 1 while stage 0
works on micro-batch 2 (a Ray actor runs its calls in the order they were sent, and a stage's
output goes to the next stage as an object reference, without a round trip through the driver's
Python code).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import numpy as np

from ..errors import StageFailedError
from ..model import Transformer
from ..batch_rules import check_row_counts, check_token_ids, slot_runs
from .placement import Placement, node_resources, placements
from .stage_worker import StageWorker

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayError
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(f"ellm.distributed runs on Ray: pip install 'ellm[ray]' ({exc})") from None

# How long one step may take before the pipeline is declared stuck (a long prompt on a slow node
# takes seconds; a stage that died is noticed by Ray at once, not by this).
DEFAULT_STEP_TIMEOUT = 600.0
# How long the stages may take to be placed and load their layers.
DEFAULT_LOAD_TIMEOUT = 600.0

# Rows a micro-batch needs to be worth its own pass over a stage's weights: a decode step's few rows
# cost about what one row costs (the weights are read either way), so splitting them loses; a
# prompt's rows cost in proportion, so stages working on different micro-batches at once gain
# (measured on the 2-core machine: 4 decode rows 125 -> 94 tok/s when split, 4 x 16 prompt rows
# 419 -> 504 tok/s).
MICRO_BATCH_ROWS = 16

# Stage actors are named `ellm-<pipeline id>-stage<i>` in this Ray namespace, for operators to find.
ACTOR_NAMESPACE = "ellm"


def _stage_name(index: int, placement: Placement) -> str:
    s = placement.stage
    return f"pipeline stage {index} (layers {s.first}..{s.stop - 1} on node {placement.node_id!r})"


class PipelineEngine:
    """The engine interface `Transformer` drives (`step`, `forward`, the slot operations), carried
    out by the stages' actors. It mirrors each slot's length, so a step is checked as a whole
    before any stage sees it."""

    def __init__(self, actors: list, placements: list[Placement], max_seq_len: int, vocab_size: int, num_slots: int,
                 step_timeout: float, micro_batch_rows: int = MICRO_BATCH_ROWS) -> None:
        self.actors = actors
        self.micro_batch_rows = micro_batch_rows
        self.placements = placements
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.lengths = [0] * num_slots
        self.step_timeout = step_timeout
        self.failure: str | None = None

    # ----- failures -----

    def check_usable(self) -> None:
        if self.failure is not None:
            raise StageFailedError(f"the pipeline cannot run: {self.failure}")

    def _dead_stages(self, timeout: float = 2.0) -> list[str]:
        """The stages that do not answer a ping within `timeout` (all pinged at once)."""
        pings = [actor.ping.remote() for actor in self.actors]
        deadline = time.monotonic() + timeout
        dead = []
        for i, (ping, placement) in enumerate(zip(pings, self.placements)):
            try:
                ray.get(ping, timeout=max(0.0, deadline - time.monotonic()))
            except (RayError, GetTimeoutError) as exc:
                dead.append(f"{_stage_name(i, placement)} died ({type(exc).__name__})")
        return dead

    def _get(self, refs: list, what: str) -> list:
        """ray.get; any failure ends the pipeline (its stages' caches may no longer agree)."""
        try:
            return ray.get(refs, timeout=self.step_timeout)
        except GetTimeoutError:
            self.failure = f"{what} took more than {self.step_timeout:.0f} s"
        except RayError as exc:
            dead = self._dead_stages()
            self.failure = ("; ".join(dead) if dead else
                            f"{what} failed in a stage: {getattr(exc, 'cause', None) or exc}")
        raise StageFailedError(f"the pipeline stopped: {self.failure}")

    def check_health(self) -> str | None:
        """None when every stage answers, else why the pipeline cannot run."""
        if self.failure is None:
            dead = self._dead_stages()
            if dead:
                self.failure = "; ".join(dead)
        return self.failure

    def _all(self, method: str, *args: Any) -> None:
        self.check_usable()
        self._get([getattr(actor, method).remote(*args) for actor in self.actors], method)

    # ----- steps -----

    def _micro_batches(self, runs: list[tuple[int, int, int, int]], rows: int) -> list[tuple[int, int]]:
        """Row ranges, cut at slot boundaries into up to one per stage of about equal size, each of at
        least `micro_batch_rows` rows."""
        parts = max(1, min(len(self.actors), len(runs), rows // self.micro_batch_rows))
        cuts, goal = [0], 1
        for _, _, end, _ in runs[:-1]:
            if end >= goal * rows / parts and len(cuts) < parts:
                cuts.append(end)
                goal += 1
        cuts.append(rows)
        return list(zip(cuts[:-1], cuts[1:]))

    def step(self, inputs: np.ndarray, slots: np.ndarray, positions: np.ndarray, logits: np.ndarray,
             hook: Any = None, hook_names: Any = None) -> np.ndarray:
        self.check_usable()
        tokens = np.asarray(inputs)  # 1-d token ids (Transformer.step checked them)
        wanted = np.asarray(logits, dtype=bool)
        n = len(tokens)
        check_row_counts(n, slots, positions, wanted)
        check_token_ids(tokens, self.vocab_size)
        runs = slot_runs(slots, positions, self.lengths, self.max_seq_len)
        outputs = []
        for first, end in self._micro_batches(runs, n):
            ref = tokens[first:end]
            rows = (slots[first:end], positions[first:end], wanted[first:end])
            for actor in self.actors:
                ref = actor.step.remote(ref, *rows)
            outputs.append(ref)
        logits_out = self._get(outputs, "a step")
        for slot, first, end, pos in runs:
            self.lengths[slot] = max(self.lengths[slot], pos + end - first)
        return np.concatenate(logits_out) if len(logits_out) > 1 else np.asarray(logits_out[0])

    def forward(self, tokens: np.ndarray, start_pos: int, all_logits: bool, hook: Any = None,
                hook_names: Any = None) -> np.ndarray:
        batch, seq = tokens.shape
        rows = np.arange(batch * seq)
        wanted = np.ones(rows.size, bool) if all_logits else rows % seq == seq - 1
        logits = self.step(tokens.reshape(-1), rows // seq, start_pos + rows % seq, wanted)
        return logits.reshape(batch, seq, -1) if all_logits else logits

    # ----- KV slots -----

    def num_slots(self) -> int:
        return len(self.lengths)

    def slot_lengths(self) -> list[int]:
        return list(self.lengths)

    def truncate_slot(self, slot: int, n: int) -> None:
        self._all("truncate_slot", slot, n)
        self.lengths[slot] = min(self.lengths[slot], n)

    def copy_slot(self, src: int, dst: int, n: int) -> None:
        if n > self.lengths[src]:
            raise ValueError(f"slot {src} holds {self.lengths[src]} positions, cannot copy {n}")
        self._all("copy_slot", src, dst, n)
        self.lengths[dst] = n

    def reset_cache(self) -> None:
        self._all("reset_cache")
        self.lengths = [0] * len(self.lengths)

    def check_loaded(self) -> None:
        pass


class PipelineModel(Transformer):
    """A model split over Ray nodes by a partition plan, one actor per stage, used like a `Transformer`.

    `plan`: an `ellm.metadata.plan_partition` result (or its dict or JSON file, as `ellm metadata
    --nodes ... --out plan.json` writes it), or a list of node ids (or node dicts with node_id,
    relative_speed, memory_bytes) to plan over. A plan node's `node_id` is a custom Ray resource of
    that name (`ray start --resources='{"a": 1}'`) or a node's IP address. Each stage loads only its
    layers' tensors from `path`, which every node must be able to read.

    A step's rows go through the stages in micro-batches of whole slots, at least `micro_batch_rows`
    rows each (prompt chunks, not a few decode tokens), so stages work at the same time.

    Hooks do not run across stages. If a stage dies, the step running fails with `StageFailedError`
    within seconds, and so does every later call; `check_health()` says why."""

    def __init__(self, args, engine: PipelineEngine, path: str, dtype: str) -> None:
        self._pipeline = engine
        super().__init__(args)
        self.backend = "ray"
        self.weights_loaded = True
        self.source = path
        self.dtype = dtype

    def _new_engine(self) -> PipelineEngine:
        return self._pipeline

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, plan: Any = None, *, dtype: str = "auto",  # type: ignore[override]
                        max_seq_len: int | None = None, max_batch_size: int | None = None,
                        threads_per_stage: int | None = None, step_timeout: float = DEFAULT_STEP_TIMEOUT,
                        micro_batch_rows: int = MICRO_BATCH_ROWS, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
                        address: str | None = None) -> PipelineModel:
        from ..weights import open_checkpoint

        if plan is None:
            raise ValueError("PipelineModel.from_pretrained needs a plan: a partition plan or a list of node ids")
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model at {path}")
        if micro_batch_rows < 1:
            raise ValueError(f"micro_batch_rows must be >= 1, got {micro_batch_rows}")
        if threads_per_stage is not None and threads_per_stage < 1:
            raise ValueError(f"threads_per_stage must be >= 1, got {threads_per_stage}")
        args = open_checkpoint(path).args
        if args is None:
            raise ValueError(f"{path}: no config beside the weights, so the model's layers are unknown")
        layout = placements(plan, args, path)
        if not ray.is_initialized():
            ray.init(address=address)
        cluster = ray.cluster_resources()
        options = [node_resources(p.node_id, cluster) for p in layout]
        worker = ray.remote(StageWorker)
        pipeline_id = uuid.uuid4().hex[:8]
        actors = []
        try:
            for i, (p, resources) in enumerate(zip(layout, options)):
                actors.append(worker.options(num_cpus=threads_per_stage or 1, resources=resources, max_restarts=0,
                                             name=f"ellm-{pipeline_id}-stage{i}", namespace=ACTOR_NAMESPACE)
                              .remote(path, p.stage, dtype, max_seq_len, max_batch_size, threads_per_stage))
            loaded = [a.ping.remote() for a in actors]
            ready, waiting = ray.wait(loaded, num_returns=len(loaded), timeout=load_timeout)
            if waiting:
                late = [_stage_name(i, p) for i, (p, ref) in enumerate(zip(layout, loaded)) if ref in waiting]
                raise StageFailedError(f"{', '.join(late)} did not start within {load_timeout:.0f} s (is the node up, "
                                       f"with {threads_per_stage or 1} CPU free for it?)")
            ray.get(ready)  # a stage's loading error, if any
            args = ray.get(actors[0].model_args.remote())  # as the stages built it (max_seq_len, slots)
        except BaseException as exc:
            for actor in actors:  # nothing left half-loaded
                ray.kill(actor)
            raise _loading_error(exc) from None
        engine = PipelineEngine(actors, layout, args.max_seq_len, args.vocab_size, args.max_batch_size, step_timeout,
                                micro_batch_rows)
        return cls(args, engine, path, dtype)

    # ----- what a Transformer does differently here -----

    def set_hook_registry(self, registry, prefix: str = "") -> None:
        if registry is not None:
            raise ValueError("hooks do not run on a PipelineModel: each stage runs in its own process")

    def load_state_dict(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("a PipelineModel loads its weights in its stages: use PipelineModel.from_pretrained")

    def weight_types(self) -> dict[str, str]:
        types: dict[str, str] = {}
        for info in self.stages():
            types.update(info["weight_types"])
        return types

    # ----- the pipeline's own -----

    @property
    def num_stages(self) -> int:
        return len(self._pipeline.actors)

    def stages(self) -> list[dict[str, Any]]:
        """Each stage's layers, host, process, weight bytes and resident memory."""
        engine = self._pipeline
        engine.check_usable()
        infos = engine._get([a.describe.remote() for a in engine.actors], "describe")
        for info, placement in zip(infos, engine.placements):
            info["node_id"] = placement.node_id
        return infos

    def check_health(self) -> str | None:
        """None while every stage answers, else why the pipeline cannot run."""
        return self._pipeline.check_health()

    def shutdown(self) -> None:
        """Stop the stages' actors (the model cannot run afterwards)."""
        engine = self._pipeline
        for actor in engine.actors:
            ray.kill(actor)
        engine.failure = engine.failure or "it was shut down"

    def __enter__(self) -> PipelineModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _loading_error(exc: BaseException) -> BaseException:
    """A stage's own exception (FileNotFoundError, ModelFormatError, ...) rather than Ray's wrapper."""
    if isinstance(exc, StageFailedError):
        return exc
    cause: BaseException | None = exc
    while cause is not None and isinstance(cause, RayError):
        inner = getattr(cause, "cause", None) or getattr(cause, "error", None)
        if inner is None or inner is cause:
            break
        cause = inner
    if cause is not None and not isinstance(cause, RayError):
        return cause
    return StageFailedError(f"a pipeline stage failed to start: {exc}")

