"""What runs inside one pipeline stage's Ray actor: a `Transformer` holding that stage's tensors
only (memory-mapped from the file where they are used as stored) and its KV slots."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..model import Transformer
from ..stage import Stage


def process_memory() -> dict[str, int]:
    """This process's resident bytes: all, anonymous (heap), and file-backed (mapped weights)."""
    fields = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes"}
    out = dict.fromkeys(fields.values(), 0)
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: resident figures unknown
        pass
    return out


class StageWorker:
    def __init__(self, path: str, stage: Stage, dtype: str, max_seq_len: int | None, max_batch_size: int | None,
                 threads: int | None) -> None:
        if threads:
            os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the engine's pool starts
        before = process_memory()["rss_bytes"]
        # A constructor's exception reaches the driver only as text; kept, `ping` raises it whole.
        self.failure: BaseException | None = None
        try:
            self.model = Transformer.from_pretrained(path, dtype=dtype, max_seq_len=max_seq_len,
                                                     max_batch_size=max_batch_size, stage=stage)
        except Exception as exc:
            self.failure = exc
            return
        self.model._gguf_metadata = None
        self.loaded_rss_bytes = process_memory()["rss_bytes"] - before

    def model_args(self):
        return self.model.model_args

    def describe(self) -> dict[str, Any]:
        """The stage's layers, where it runs, its weights' types and bytes, and its memory."""
        import socket

        m = self.model
        names = m.stage.tensor_names(m.model_args)
        shapes = m.stage.expected_shapes(m.model_args)
        vector_bytes = sum(4 * int(np.prod(s)) for s in shapes.values() if len(s) == 1)
        if m.backend == "rust":
            matrix_bytes = sum(m._engine.weight_bytes())
        else:
            matrix_bytes = sum(4 * int(np.prod(s)) for s in shapes.values() if len(s) == 2)
        return {"first_layer": m.stage.first, "stop_layer": m.stage.stop, "embeds": m.stage.embeds,
                "heads": m.stage.heads, "host": socket.gethostname(), "pid": os.getpid(), "backend": m.backend,
                "weight_types": {names[n]: t for n, t in m.weight_types().items()},
                "weight_bytes": matrix_bytes + vector_bytes, "loaded_rss_bytes": self.loaded_rss_bytes,
                **process_memory()}

    def step(self, inputs: np.ndarray, slots: np.ndarray, positions: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return self.model.step(inputs, slots, positions, logits)

    def truncate_slot(self, slot: int, n: int) -> None:
        self.model.truncate_slot(slot, n)

    def copy_slot(self, src: int, dst: int, n: int) -> None:
        self.model.copy_slot(src, dst, n)

    def reset_cache(self) -> None:
        self.model.reset_cache()

    def ping(self) -> int:
        """This process's id, once the stage loaded (else its loading error)."""
        if self.failure is not None:
            raise self.failure
        return os.getpid()
