"""The rules a step's rows follow, checked in Python: by the NumPy engine, by a pipeline's driver
before any stage sees a step, and, for token ids, wherever ids enter a model (forward, generate,
the serving engine). The Rust engine checks the same rules on its side of the boundary."""

from __future__ import annotations

import numpy as np


def check_token_ids(ids, vocab_size: int) -> None:
    """ValueError naming the first id outside 0..vocab_size-1."""
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad.flat[0])} is out of range for vocab_size {vocab_size}")


def check_row_counts(n: int, slots, positions, wanted) -> None:
    """A step has at least one row, and a slot, a position and a logits flag for each."""
    if n == 0 or not len(slots) == len(positions) == len(wanted) == n:
        raise ValueError(f"a batch needs one slot, position and logits flag per token, and at least one token: "
                         f"got {n} tokens, {len(slots)} slots, {len(positions)} positions, {len(wanted)} flags")


def slot_runs(slots, positions, lengths: list[int], max_seq_len: int) -> list[tuple[int, int, int, int]]:
    """Split a step's rows into (slot, first row, end row, first position) runs, refusing rows that
    break the rules: a slot's rows adjacent, at consecutive positions, starting at or before the
    slot's length `lengths[slot]`."""
    runs: list[list[int]] = []
    for r, (slot, pos) in enumerate(zip(np.asarray(slots).tolist(), np.asarray(positions).tolist())):
        if not 0 <= slot < len(lengths):
            raise ValueError(f"slot {slot} does not exist: the cache has {len(lengths)} slots")
        if not 0 <= pos < max_seq_len:
            raise ValueError(f"position {pos} is past max_seq_len {max_seq_len}")
        if runs and runs[-1][0] == slot:
            if pos != runs[-1][3] + r - runs[-1][1]:
                raise ValueError(f"slot {slot}'s tokens must be at consecutive positions: row {r} is at position "
                                 f"{pos} after {runs[-1][3] + r - runs[-1][1] - 1}")
            runs[-1][2] = r + 1
            continue
        if any(run[0] == slot for run in runs):
            raise ValueError(f"slot {slot}'s tokens must be adjacent in the batch")
        if pos > lengths[slot]:
            raise ValueError(f"slot {slot} holds {lengths[slot]} positions, so its tokens must start at or "
                             f"before position {lengths[slot]}, got {pos} (attention would read positions "
                             "never written)")
        runs.append([slot, r, r + 1, pos])
    return [tuple(run) for run in runs]
