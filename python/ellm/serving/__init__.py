"""Serving many users at once: continuous batching over KV slots (`Engine`), OpenAI's request and
response shapes (`OpenAIServing`), and the HTTP server (`ellm.serving.server`, extra `ellm[server]`)."""

from .engine import ContextLengthError, Engine, EngineClosedError, Event, QueueFullError, Request, TokenLogprob
from .openai import Call, OpenAIServing
from .params import InvalidRequestError, SamplingParams, sampling_params

__all__ = ["Engine", "Request", "Event", "TokenLogprob", "SamplingParams", "sampling_params", "OpenAIServing",
           "Call", "QueueFullError", "ContextLengthError", "EngineClosedError", "InvalidRequestError"]
