"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), and the
repetition penalty of Keskar et al. (2019) as Hugging Face applies it."""

from __future__ import annotations

import numpy as np


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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of `[..., vocab]` logits, in float64 (one exp per value)."""
    x = logits.astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probabilities p (summing to 1): the same draw as `rng.choice(len(p), p=p)`,
    which inverts the cumulative sum at one uniform sample, without choice's checks of p."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """One id per row of `[batch, vocab]` logits. Temperature 0 is greedy."""
    if temperature <= 0:
        return np.argmax(logits, axis=-1)
    probs = softmax(logits / temperature)
    out = np.empty(len(probs), dtype=np.int64)
    for b, p in enumerate(probs):
        if top_p >= 1.0 and not top_k:  # nothing is cut: draw from the whole distribution, no sort
            out[b] = draw(p, rng)
            continue
        order, sorted_p = _kept(p, top_p, top_k)
        out[b] = order[draw(sorted_p / sorted_p.sum(), rng)]
    return out


def _kept(p: np.ndarray, top_p: float, top_k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The ids top-k and top-p keep, most likely first (ties by id, as a stable sort of all of p
    gives them), and their probabilities. Only candidates are sorted: the k best with every tie of
    the k-th, growing until the nucleus' cutoff falls among them."""
    n = len(p)
    want = top_k if top_k else 64
    while True:
        if want < n:
            kth = np.partition(p, n - want)[n - want]  # the want-th largest probability
            candidates = np.flatnonzero(p >= kth)
        else:
            candidates = np.arange(n)
        order = candidates[np.argsort(-p[candidates], kind="stable")]
        sorted_p = p[order]
        if top_k:
            sorted_p[top_k:] = 0.0
        if top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (Meta's sample_top_p).
            cut = np.cumsum(sorted_p) - sorted_p > top_p
            if not cut.any() and not top_k and len(candidates) < n:
                want *= 4  # the nucleus may reach past the candidates
                continue
            sorted_p[cut] = 0.0
        return order, sorted_p


def apply_penalties(logits: np.ndarray, counts: dict[int, int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties on one row of logits: every id generated so far
    loses `presence`, plus `frequency` per time it was generated."""
    if not counts or (presence == 0.0 and frequency == 0.0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    logits = logits.copy()
    logits[ids] -= presence + frequency * n
    return logits


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float] | None) -> np.ndarray:
    """OpenAI's logit_bias: added to the logits of the ids named (-100 bans, 100 forces)."""
    if not bias:
        return logits
    logits = logits.copy()
    for token, value in bias.items():
        logits[token] += value
    return logits
