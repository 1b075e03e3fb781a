"""A request's sampling settings, checked once for the Python API and the HTTP server alike."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import EllmError


class InvalidRequestError(EllmError, ValueError):
    """A request the engine cannot run as asked; `param` names the field, `code` is OpenAI's."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # how many of the most likely ids to report per token (None: no logprobs)


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}", name)
    return value


def sampling_params(*, max_tokens: Any, room: int, vocab_size: int, temperature: Any = 1.0, top_p: Any = 1.0,
                    top_k: Any = None, seed: Any = None, stop: Any = None, presence_penalty: Any = 0.0,
                    frequency_penalty: Any = 0.0, repeat_penalty: Any = 1.0, logit_bias: Any = None,
                    logprobs: Any = None) -> SamplingParams:
    """Check OpenAI-named settings; `max_tokens` None means up to the `room` left in the context."""
    if max_tokens is None:
        max_tokens = room
    max_tokens = min(_integer(max_tokens, "max_tokens", 1), room)
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("stop must be a string or a list of strings", "stop")
    if len(stop) > 4:
        raise InvalidRequestError(f"stop takes at most 4 sequences, got {len(stop)}", "stop")
    bias: dict[int, float] | None = None
    if logit_bias:
        if not isinstance(logit_bias, dict):
            raise InvalidRequestError("logit_bias must map token ids to numbers", "logit_bias")
        bias = {}
        for key, value in logit_bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise InvalidRequestError(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
            if not 0 <= token < vocab_size:
                raise InvalidRequestError(f"logit_bias token id {token} is out of range for vocab_size {vocab_size}",
                                          "logit_bias")
            bias[token] = _number(value, "logit_bias value", -100, 100)
    if top_k is not None:
        top_k = _integer(top_k, "top_k", 0) or None
    if seed is not None:
        seed = _integer(seed, "seed", -(2**63), 2**64 - 1) % 2**64
    if logprobs is not None:
        logprobs = _integer(logprobs, "logprobs", 0, 20)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(temperature, "temperature", 0, 2),
        top_p=_number(top_p, "top_p", 0, 1) or 1e-9,  # top_p 0 keeps only the most likely id
        top_k=top_k,
        seed=seed,
        stop=list(stop),
        presence_penalty=_number(presence_penalty, "presence_penalty", -2, 2),
        frequency_penalty=_number(frequency_penalty, "frequency_penalty", -2, 2),
        repetition_penalty=_number(repeat_penalty, "repeat_penalty", 1e-6, 100),
        logit_bias=bias,
        logprobs=logprobs,
    )
