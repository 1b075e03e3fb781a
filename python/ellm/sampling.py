"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), and the
repetition penalty of Keskar et al. (2019) as Hugging Face applies it."""

from __future__ import annotations

import numpy as np

from . import ops


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """logits `[batch, vocab]`; seen[b] are the ids sequence b holds so far."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for b, ids in enumerate(seen):
        ids = np.unique(ids)
        vals = logits[b, ids]
        logits[b, ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """One id per row of `[batch, vocab]` logits. Temperature 0 is greedy and draws nothing from
    `rng`; otherwise each row takes one `rng.random()` (see `ellm.ops.sample` for the rule)."""
    if temperature <= 0:
        return np.argmax(logits, axis=-1)
    return ops.sample(logits, rng.random(len(logits)), temperature=temperature, top_p=top_p, top_k=top_k or 0)


def apply_penalties(logits: np.ndarray, counts: dict[int, int], presence: float, frequency: float, *,
                    in_place: bool = False) -> np.ndarray:
    """OpenAI's presence and frequency penalties on one row of logits: every id generated so far
    loses `presence`, plus `frequency` per time it was generated. A new row unless `in_place`."""
    if not counts or (presence == 0.0 and frequency == 0.0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    out = logits if in_place else logits.copy()
    out[ids] -= presence + frequency * n
    return out


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float] | None, *, in_place: bool = False) -> np.ndarray:
    """OpenAI's logit_bias: added to the logits of the ids named (-100 bans, 100 forces). A new
    row unless `in_place`."""
    if not bias:
        return logits
    out = logits if in_place else logits.copy()
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    out[ids] += np.fromiter(bias.values(), dtype=out.dtype, count=len(bias))
    return out
